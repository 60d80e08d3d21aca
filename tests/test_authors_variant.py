"""The authors' exact variant as named options (issue 19, item 4): unbiased substitute std, their
3D ResNet-18 substitute with type-A shortcuts, their clip-stack evaluation."""


import pytest
import torch
import torch.nn.functional as F

from abnn import ABNN
from abnn.config import TrainConfig, config_differences
from abnn.evaluation import ClipStackEvaluator
from abnn.framework import ProtocolView
from abnn.layers import AdaptiveBatchNorm2d, substitute_moments
from abnn.models import R3DAuthors, r3d18_authors_substitute, resnext3d_101


def test_unbiased_std_on_hand_computed_values():
    z = torch.tensor([1.0, 3.0, 5.0, 9.0]).view(2, 1, 2, 1)   # sample 0: (1, 3), sample 1: (5, 9)
    mu, sd = substitute_moments(z, "sample", std="unbiased")
    assert mu.flatten().tolist() == [2.0, 7.0]
    assert torch.allclose(sd.flatten(), torch.tensor([2 ** 0.5, 8 ** 0.5]))        # var (1+1)/1, (4+4)/1
    mu, sd = substitute_moments(z, "sample", eps=0.0)                              # biased: (1+1)/2, (4+4)/2
    assert torch.allclose(sd.flatten(), torch.tensor([1.0, 2.0]))
    mu, sd = substitute_moments(z, "batch", std="unbiased")                        # mean 4.5, var 35/3
    assert mu.item() == 4.5 and abs(sd.item() - (35 / 3) ** 0.5) < 1e-6
    assert torch.allclose(sd, torch.std(z))
    with pytest.raises(ValueError):
        substitute_moments(z, "sample", std="population")


def test_layer_and_config_carry_the_option():
    layer = AdaptiveBatchNorm2d(4, (2, 4, 4), substitute_std="unbiased")
    z_s = torch.rand(3, 2, 4, 4)
    assert torch.allclose(layer.moments(z_s)[1].flatten(), z_s.flatten(1).std(1))
    assert TrainConfig().substitute_std == "biased"
    # a run recorded before the field existed keeps its identity
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "substitute_std"}
    assert config_differences(old, TrainConfig()) == []
    assert [d.name for d in config_differences(old, TrainConfig(substitute_std="unbiased"))] == ["substitute_std"]
    with pytest.raises(Exception, match="substitute-std"):
        TrainConfig(substitute_std="x").validate()


def _tiny_video_abnn(**kw):
    torch.manual_seed(0)
    sub = r3d18_authors_substitute(5, width=1 / 16, **kw)
    return ABNN(resnext3d_101(5, width=1 / 32, blocks=(1, 1, 1, 1)), sub, input_shape=(3, 8, 32, 32),
                substitute_stats="batch", substitute_std="unbiased").eval()


def test_authors_r3d_builds_and_runs_in_abnn():
    sub = R3DAuthors(7, width=1 / 16).eval()
    x = torch.rand(2, 3, 8, 32, 32)
    taps = sub(x, return_taps=True)
    assert [t.shape[1] for t in taps] == [4, 4, 8, 16, 32]
    assert taps[0].shape[2:] == (4, 8, 8)          # stem stride (1, 2, 2) then max-pool stride 2
    assert sub(x).shape == (2, 7)
    assert len([m for m in sub.modules() if type(m).__name__ == "TypeAShortcut3d"]) == 3
    model = _tiny_video_abnn()
    assert model(x).shape == (2, 5)


def test_authors_shortcut_detach_option_is_the_protocol():
    model, cut = _tiny_video_abnn(), _tiny_video_abnn(detach_shortcut=True)
    x, y = torch.rand(2, 3, 8, 32, 32), torch.tensor([1, 3])

    def grad(m):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(m(xi), y), xi)[0]
    with torch.no_grad():
        assert torch.equal(model(x), cut(x))
    g_cut, g_view, g_full = grad(cut), grad(ProtocolView(model, "typeA-detach")), grad(model)
    assert torch.allclose(g_cut, g_view, atol=1e-7)
    assert not torch.allclose(g_cut, g_full, atol=1e-7)


def test_runs_builds_the_authors_substitute():
    from abnn.runs import build_substitute

    cfg = TrainConfig(method="abnn", dataset="clips13", substitute="random", substitute_arch="r3d_18_authors",
                      substitute_width=1 / 16, substitute_num_classes=400)
    assert isinstance(build_substitute(cfg), R3DAuthors)


def test_clip_stack_averages_logits_over_windows():
    model = _tiny_video_abnn()
    ev = ClipStackEvaluator(model, stack=8, step=2).eval()
    video = torch.rand(2, 3, 13, 32, 32)
    with torch.no_grad():
        got = ev(video)
        for b in range(2):
            wins = torch.cat([video[b:b + 1, :, t:t + 8] for t in range(0, 13 - 8 + 1, 2)])   # 3 windows, one batch
            assert torch.allclose(got[b], model(wins).mean(0), atol=1e-6)
            # batch statistics are shared: one window alone gives other logits
            assert not torch.allclose(model(wins[:1])[0], model(wins)[0])
    with pytest.raises(ValueError):
        ev(torch.rand(1, 3, 7, 32, 32))
