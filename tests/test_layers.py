"""Eq. (2) of the paper on hand-computed values, and the layer's invariants."""

import math

import pytest
import torch

from abnn import AdaptiveBatchNorm2d
from abnn.layers import FlattenEncoder, PooledEncoder, substitute_moments


EPS = 1e-12  # BatchNorm refuses eps=0 in training; this is numerically zero here


def _layer_with_identity_encoder(stats: str) -> AdaptiveBatchNorm2d:
    """One target channel; encoder weights zeroed so gamma_s = 1, beta_s = 0 (its bias init)."""
    layer = AdaptiveBatchNorm2d(1, (1, 1, 2), substitute_stats=stats, encoder="flatten", eps=EPS)
    with torch.no_grad():
        layer.encoder.weight.zero_()
    return layer.train()


def test_eq2_sample_stats_hand_computed():
    layer = _layer_with_identity_encoder("sample")
    # target feature: batch of 2, one channel, 1x2 -> batch mean 2.5, batch var 1.25 over {1,2,3,4}
    z_t = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    # substitute: sample 0 = {0, 2} (mean 1, std 1); sample 1 = {4, 8} (mean 6, std 2)
    z_s = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 8.0]]]])
    out = layer(z_t, z_s)
    norm = (z_t - 2.5) / math.sqrt(1.25)
    expected = torch.stack([norm[0] * 1 + 1, norm[1] * 2 + 6])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eq2_batch_stats_hand_computed():
    layer = _layer_with_identity_encoder("batch")
    z_t = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    z_s = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 8.0]]]])   # all four: mean 3.5, var 8.75
    out = layer(z_t, z_s)
    expected = (z_t - 2.5) / math.sqrt(1.25) * math.sqrt(8.75) + 3.5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eq2_gamma_beta_from_encoder():
    layer = _layer_with_identity_encoder("sample")
    with torch.no_grad():
        layer.encoder.bias.copy_(torch.tensor([3.0, -1.0]))  # gamma_s = 3, beta_s = -1
    z_t = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    z_s = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 8.0]]]])
    norm = (z_t - 2.5) / math.sqrt(1.25)
    expected = 3 * torch.stack([norm[0] + 1, norm[1] * 2 + 6]) - 1
    torch.testing.assert_close(layer(z_t, z_s), expected)


def test_flatten_encoder_is_equalized_linear():
    enc = FlattenEncoder(6, 2)
    assert enc.weight.shape == (4, 6)
    assert torch.equal(enc.bias, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    z = torch.randn(3, 6)
    gamma, beta = enc(z)
    full = z @ (enc.weight * math.sqrt(2 / 6)).T + enc.bias
    torch.testing.assert_close(torch.cat([gamma, beta], 1), full)


def test_flatten_encoder_refuses_huge_layers():
    with pytest.raises(ValueError, match="pooled"):
        FlattenEncoder(512 * 5 * 7 * 7, 2048)


def test_pooled_encoder_starts_at_identity_bias():
    enc = PooledEncoder(4, 3)
    assert torch.equal(enc.mlp[2].bias, torch.tensor([1.0, 1, 1, 0, 0, 0]))
    gamma, beta = enc(torch.randn(2, 4, 5, 5))
    assert gamma.shape == beta.shape == (2, 3)


def test_substitute_moments_shapes():
    z = torch.randn(4, 3, 5, 5)
    mu, sd = substitute_moments(z, "sample")
    assert mu.shape == sd.shape == (4, 1, 1, 1)
    torch.testing.assert_close(mu.flatten(), z.flatten(1).mean(1))
    mu, sd = substitute_moments(z, "batch")
    assert mu.shape == (1, 1, 1, 1)


@pytest.mark.parametrize("encoder", ["flatten", "pooled"])
def test_gradcheck_through_both_features(encoder):
    torch.manual_seed(0)
    layer = AdaptiveBatchNorm2d(2, (3, 2, 2), encoder=encoder, encoder_hidden=4).double().train()
    z_t = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    z_s = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (z_t, z_s), eps=1e-6, atol=1e-5)


def test_shape_errors_are_clear():
    layer = AdaptiveBatchNorm2d(4, (3, 2, 2))
    with pytest.raises(ValueError, match="target feature"):
        layer(torch.randn(2, 5, 2, 2), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="substitute feature"):
        layer(torch.randn(2, 4, 2, 2), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="substitute_stats"):
        AdaptiveBatchNorm2d(4, (3, 2, 2), substitute_stats="channelwise")
