"""The ABNN framework: frozen substitute, gradients through it, per-sample independence."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from abnn import ABNN
from abnn.models import resnet18_cifar, vgg19_bn_substitute


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_step_leaves_substitute_bit_identical(tiny_abnn):
    model = tiny_abnn.train()
    before = _snapshot(model.substitute)
    target_before = _snapshot(model.target)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _snapshot(model.substitute)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "substitute changed during training"
    assert not model.substitute.training, "substitute left eval mode"
    assert all(p.grad is None for p in model.substitute.parameters())
    assert any(not torch.equal(target_before[k], v) for k, v in _snapshot(model.target).items())


def test_input_gradient_depends_on_substitute(tiny_abnn):
    model = tiny_abnn.eval()
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))

    def input_grad(m):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xi), y), xi)
        return g

    g1 = input_grad(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.substitute.parameters():
            p.mul_(1.5)
    g2 = input_grad(other)
    assert g1.abs().sum() > 0
    assert not torch.allclose(g1, g2), "input gradient ignores the substitute"
    # and the deep copy is independent of the original (hooks rebound to the copy)
    assert not torch.allclose(model(x), other(x))


def test_substitute_features_carry_input_gradient(tiny_abnn):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    feats = tiny_abnn.substitute_features(x)
    assert len(feats) == 5 and all(f.requires_grad for f in feats)
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_sample_stats_prediction_independent_of_batch(tiny_abnn):
    model = tiny_abnn.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        alone = model(x[:1])
        batch = model(x)
    torch.testing.assert_close(alone, batch[:1], rtol=1e-4, atol=1e-5)


def test_batch_stats_prediction_depends_on_batch():
    """The `batch` option (authors' video code) makes a sample's output depend on its batch."""
    from abnn import AdaptiveBatchNorm2d

    torch.manual_seed(0)
    layer = AdaptiveBatchNorm2d(4, (3, 4, 4), substitute_stats="batch").eval()
    z_t, z_s = torch.randn(5, 4, 4, 4), torch.randn(5, 3, 4, 4)
    z_s[1:] *= 3
    with torch.no_grad():
        assert not torch.allclose(layer(z_t[:1], z_s[:1]), layer(z_t, z_s)[:1], atol=1e-3)
        sample = AdaptiveBatchNorm2d(4, (3, 4, 4), substitute_stats="sample").eval()
        torch.testing.assert_close(sample(z_t[:1], z_s[:1]), sample(z_t, z_s)[:1])


def test_train_mode_keeps_substitute_in_eval(tiny_abnn):
    tiny_abnn.train()
    assert tiny_abnn.target.training and not tiny_abnn.substitute.training
    assert all(not p.requires_grad for p in tiny_abnn.substitute.parameters())
    trainable = {id(p) for p in tiny_abnn.trainable_parameters()}
    assert trainable.isdisjoint({id(p) for p in tiny_abnn.substitute.parameters()})


def test_calling_target_directly_is_an_error(tiny_abnn):
    with pytest.raises(RuntimeError, match="call the ABNN module"):
        tiny_abnn.target(torch.rand(2, 3, 32, 32))


def test_wraps_a_torchvision_resnet_by_stage_names():
    torch.manual_seed(0)
    target = torchvision.models.resnet18(num_classes=10, width_per_group=64)
    sub = vgg19_bn_substitute(width=1 / 16)
    model = ABNN(target, sub, target_stages=("maxpool", "layer1", "layer2", "layer3", "layer4"),
                 input_shape=(3, 64, 64), encoder="pooled")
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert set(model.adaptive.keys()) == {"maxpool", "layer1", "layer2", "layer3", "layer4"}


def test_substitute_taps_by_module_name():
    torch.manual_seed(0)
    sub = vgg19_bn_substitute(width=1 / 16)
    taps = [f"features.{i}" for i in (5, 12, 25, 38, 51)]
    a = ABNN(resnet18_cifar(width=1 / 16), sub, substitute_taps=taps, encoder="pooled").eval()
    b = ABNN(resnet18_cifar(width=1 / 16), sub, encoder="pooled").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="no submodule"):
        ABNN(resnet18_cifar(width=1 / 16), vgg19_bn_substitute(width=1 / 16), target_stages=("stem", "nope", "a", "b", "c"))
    with pytest.raises(ValueError, match="paired"):
        ABNN(resnet18_cifar(width=1 / 16), vgg19_bn_substitute(width=1 / 16), target_stages=("stem", "layer1"))
    model = ABNN(resnet18_cifar(width=1 / 16), vgg19_bn_substitute(width=1 / 16))
    with pytest.raises(ValueError, match="expects input of shape"):
        model(torch.rand(2, 1, 32, 32))
