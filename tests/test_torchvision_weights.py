"""Offline weights (issue 14, item 1): a state dict in torchvision's own format loads through
``--substitute PATH`` onto our tapped substitutes, tap for tap equal to torchvision's model; the
download names (IMAGENET1K_V1, KINETICS400_V1) fail offline in one line that names that way."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from abnn.cli import main
from abnn.config import TrainConfig
from abnn.models import R3D18_TAPS, VGG19_BN_TAPS
from abnn.runs import build_substitute, resolve_config


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affines, so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _hooked(modules: list[nn.Module]) -> tuple[list[torch.Tensor], list]:
    feats: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: feats.append(out.detach().clone())) for m in modules]
    return feats, handles


def _substitute_from_file(path, arch: str) -> nn.Module:
    """Our substitute as `abnn train --substitute PATH` builds it (arch, width, classes from the file)."""
    cfg = resolve_config(TrainConfig(method="abnn", substitute=str(path), substitute_width=0.25))
    assert (cfg.substitute_arch, cfg.substitute_width) == (arch, 1.0)  # recognised by its keys
    return build_substitute(cfg).eval()


def _check_same_features(tv, arch: str, tap_modules, x, mean, std, tmp_path) -> None:
    """Save torchvision's (BN-randomised) model as a state dict, load it as our substitute
    through the --substitute PATH route; our five taps equal torchvision's features there."""
    _randomise_bn(tv)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    sub = _substitute_from_file(path, arch)
    feats, handles = _hooked(tap_modules(tv))
    with torch.no_grad():
        tv((x - mean) / std)
        ours = sub(x, return_taps=True)
    for h in handles:
        h.remove()
    assert len(ours) == len(feats) == 5
    for a, b in zip(ours, feats):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_torchvision_vgg19_bn_file_gives_torchvision_features(tmp_path):
    from torchvision.models import vgg19_bn

    torch.manual_seed(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    _check_same_features(vgg19_bn(weights=None).eval(), "vgg19_bn", lambda tv: [tv.features[i] for i in VGG19_BN_TAPS],
                         torch.rand(2, 3, 32, 32), mean, std, tmp_path)


def test_torchvision_r3d_18_file_gives_torchvision_features(tmp_path):
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    mean = torch.tensor([0.43216, 0.394666, 0.37645]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.22803, 0.22145, 0.216989]).view(1, 3, 1, 1, 1)
    _check_same_features(r3d_18(weights=None).eval(), "r3d_18", lambda tv: [getattr(tv, n) for n in R3D18_TAPS],
                         torch.rand(1, 3, 4, 32, 32), mean, std, tmp_path)


def test_torchvision_file_at_another_width_is_one_clear_error(tmp_path):
    from torchvision.models.video import r3d_18

    from abnn.errors import CheckpointError
    from abnn.models import r3d18_substitute

    path = tmp_path / "r3d_18.pth"
    torch.save(r3d_18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"r3d_18.pth does not fit .*shape mismatch"):
        r3d18_substitute(weights=str(path), width=0.25)


@pytest.mark.parametrize("name, file", [("IMAGENET1K_V1", "vgg19_bn-c79401a0.pth"),
                                        ("KINETICS400_V1", "r3d_18-b3b3357e.pth")])
def test_download_names_fail_offline_in_one_line(name, file, monkeypatch, tmp_path, capsys, fake_data_root):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(["train", "--method", "abnn", "--substitute", name, "--out", str(tmp_path / "run"),
                 "--data-root", str(fake_data_root), "--no-progress", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and name in err and "URLError" in err
    assert "--substitute PATH" in err and str(tmp_path / "torch" / "hub" / "checkpoints" / file) in err
