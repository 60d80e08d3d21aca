"""Video ABNN, data and models: 3D ResNeXt-101 target, R3D-18 substitute, OUDefend, UCF-101."""

from __future__ import annotations

import copy
import importlib.util
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abnn import ABNN
from abnn.errors import AbnnError, CheckpointError, DataNotFoundError
from abnn.models.oudefend import OUDefend2d, OUDefend3d, with_oudefend
from abnn.models.r3d import R3D18Substitute, r3d18_substitute
from abnn.models.resnext3d import ResNeXt3D, convert_hara_state_dict, resnext3d_101

from abnn.data import ucf101
from abnn.data.ucf101 import (
    SHARED_VIDEO_LABELS, UCF101Clips, collate_clips, decode_clip, load_shared_clips, parse_split,
    sample_indices, ucf101_classes,
)

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (pip install av) not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _reduced(num_classes: int = 101) -> ResNeXt3D:
    return resnext3d_101(num_classes, blocks=(1, 1, 1, 1), width=1 / 8)


# -- 3D ResNeXt-101 -----------------------------------------------------------------------------

def _expected_resnext_params(num_classes: int, blocks=(3, 4, 23, 3), cardinality=32) -> tuple[int, int]:
    """Parameter count and number of weight layers from the architecture (Hara et al. 2018)."""

    def conv(k: int, cin: int, cout: int, groups: int = 1) -> int:
        return k * (cin // groups) * cout

    def bn(c: int) -> int:
        return 2 * c

    total = conv(7 ** 3, 3, 64) + bn(64)
    layers = 1
    inp = 64
    for planes, n, stride in zip((128, 256, 512, 1024), blocks, (1, 2, 2, 2)):
        mid, out = cardinality * planes // 32, 2 * planes
        for i in range(n):
            total += conv(1, inp, mid) + bn(mid) + conv(27, mid, mid, cardinality) + bn(mid)
            total += conv(1, mid, out) + bn(out)
            layers += 3
            if inp != out or (i == 0 and stride != 1):  # shortcut type B
                total += conv(1, inp, out) + bn(out)
            inp = out
    total += inp * num_classes + num_classes
    return total, layers + 1


def test_resnext101_parameter_count_matches_architecture():
    with torch.device("meta"):
        model = resnext3d_101(101)
    expected, depth = _expected_resnext_params(101)
    assert sum(p.numel() for p in model.parameters()) == expected
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)]
    shortcuts = [n for n in convs if ".downsample." in n]
    assert len(shortcuts) == 4 and len(convs) - len(shortcuts) + 1 == depth == 101  # 101 weight layers
    assert model.fc.in_features == 2048 and model.stages == ("stem", "layer1", "layer2", "layer3", "layer4")
    # Hara et al. report 48.34M parameters for the 400-class (Kinetics) model
    assert abs(_expected_resnext_params(400)[0] - 48.34e6) < 0.01e6


def test_reduced_resnext_forward_backward_and_stage_shapes():
    torch.manual_seed(0)
    model = _reduced().train()
    shapes = {}
    for name in model.stages:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape[1:])))
    x = torch.rand(2, 3, 8, 112, 112)
    t0 = time.perf_counter()
    out = model(x)
    F.cross_entropy(out, torch.tensor([0, 100])).backward()
    elapsed = time.perf_counter() - t0
    print(f"reduced ResNeXt3D forward+backward (2,3,8,112,112): {elapsed:.3f} s")
    assert out.shape == (2, 101)
    assert shapes == {"stem": (8, 4, 28, 28), "layer1": (32, 4, 28, 28), "layer2": (64, 2, 14, 14),
                      "layer3": (128, 1, 7, 7), "layer4": (256, 1, 4, 4)}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert isinstance(model.stem, torch.nn.Sequential) and len(model.stem) == 4


def test_convert_hara_state_dict_keys():
    model = _reduced()
    hara = {("module." + k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")): v
            for k, v in model.state_dict().items()}
    assert any(k.startswith("module.conv1.") for k in hara)
    model.load_state_dict(convert_hara_state_dict(hara))


# -- R3D-18 substitute ----------------------------------------------------------------------------

def test_r3d_substitute_taps_and_keys(tmp_path):
    torch.manual_seed(0)
    sub = r3d18_substitute(10, width=1 / 8).eval()
    x = torch.rand(1, 3, 4, 32, 32)
    taps = sub(x, return_taps=True)
    assert [tuple(t.shape[1:]) for t in taps] == [(8, 4, 16, 16), (8, 4, 16, 16), (16, 2, 8, 8), (32, 1, 4, 4), (64, 1, 2, 2)]
    assert sub(x).shape == (1, 10)
    assert all(k.startswith("model.") for k in sub.state_dict())
    # a bare torchvision-style state dict (no prefix) loads, and another width is refused clearly
    torch.save({k[len("model."):]: v for k, v in sub.state_dict().items()}, tmp_path / "bare.pt")
    again = r3d18_substitute(10, width=1 / 8, weights=tmp_path / "bare.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), sub(x))
    with pytest.raises(CheckpointError, match="does not fit"):
        r3d18_substitute(10, width=1 / 4, weights=tmp_path / "bare.pt")


def test_r3d_full_matches_torchvision_layout():
    from torchvision.models.video import r3d_18

    with torch.device("meta"):
        sub = r3d18_substitute(400)
        ref = r3d_18()
    assert isinstance(sub, R3D18Substitute)
    assert {"model." + k: tuple(v.shape) for k, v in ref.state_dict().items()} == {
        k: tuple(v.shape) for k, v in sub.state_dict().items()}


def test_kinetics_weights_offline_error(monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(AbnnError, match=r"KINETICS400_V1.*--substitute PATH.*r3d_18-b3b3357e.pth"):
        r3d18_substitute(weights="KINETICS400_V1")


# -- ABNN on video ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_abnn():
    torch.manual_seed(0)
    target = _reduced(5)
    sub = r3d18_substitute(400)  # the full R3D-18, random init (never downloaded in tests)
    return ABNN(target, sub, input_shape=(3, 8, 112, 112))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_video_abnn_training_step_keeps_substitute(video_abnn):
    model = copy.deepcopy(video_abnn).train()
    assert model.encoder == "pooled"
    before, t_before = _snapshot(model.substitute), _snapshot(model.target)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(2, 3, 8, 112, 112), torch.tensor([1, 3])
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = _snapshot(model.substitute)
    assert all(torch.equal(before[k], after[k]) for k in before), "substitute changed during training"
    assert not model.substitute.training
    assert all(p.grad is None for p in model.substitute.parameters())
    assert any(not torch.equal(t_before[k], v) for k, v in _snapshot(model.target).items())


def test_video_abnn_input_gradient_depends_on_substitute(video_abnn):
    model = video_abnn.eval()
    x, y = torch.rand(1, 3, 8, 112, 112), torch.tensor([2])

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


def test_video_abnn_sample_stats_independent_of_batch(video_abnn):
    model = video_abnn.eval()
    assert model.substitute_stats == "sample"
    x = torch.rand(3, 3, 8, 112, 112)
    x[1:] *= 0.3
    with torch.no_grad():
        alone = model(x[:1])
        batch = model(x)
    torch.testing.assert_close(alone, batch[:1], rtol=1e-4, atol=1e-5)


# -- OUDefend ------------------------------------------------------------------------------------

def test_oudefend_blocks_preserve_shape_without_bias_or_norm():
    torch.manual_seed(0)
    for block, shape in ((OUDefend3d(24), (2, 24, 3, 7, 7)), (OUDefend2d(16), (2, 16, 7, 9))):
        f = torch.relu(torch.randn(shape))
        out = block(f)
        assert out.shape == f.shape and (out >= 0).all()
        assert all(m.bias is None for m in block.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in block.modules())
    zero = OUDefend2d(16, zero_init=True)
    f = torch.relu(torch.randn(2, 16, 8, 8))
    torch.testing.assert_close(zero(f), f)  # identity at init on a post-ReLU feature
    with pytest.raises(ValueError, match="expects"):
        OUDefend3d(24)(torch.randn(2, 24, 7, 7))


def test_with_oudefend_changes_output_and_trains():
    torch.manual_seed(0)
    plain = _reduced(5).eval()
    x = torch.rand(2, 3, 4, 56, 56)
    with torch.no_grad():
        ref = plain(x)
    defended = with_oudefend(copy.deepcopy(plain), after="layer3")
    assert isinstance(defended.oudefend, OUDefend3d) and defended.oudefend.channels == 128
    assert any(k.startswith("oudefend.") for k in defended.state_dict())
    with torch.no_grad():
        out = defended(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    F.cross_entropy(defended(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in defended.oudefend.parameters())
    # a deep copy uses its own block
    clone = copy.deepcopy(defended)
    with torch.no_grad():
        for p in clone.oudefend.parameters():
            p.mul_(2)
        assert not torch.allclose(clone(x), defended(x))
        torch.testing.assert_close(defended(x), out)
    with pytest.raises(ValueError, match="no submodule"):
        with_oudefend(_reduced(5), after="layer9")


def test_with_oudefend_2d_on_image_resnet():
    from abnn.models import resnet18_cifar

    torch.manual_seed(0)
    model = with_oudefend(resnet18_cifar(width=1 / 16).eval())
    assert isinstance(model.oudefend, OUDefend2d) and model.oudefend.channels == 16
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# -- UCF-101 --------------------------------------------------------------------------------------

def _write_avi(path: Path, frames: np.ndarray) -> None:
    """frames: (N, H, W, 3) uint8 -> mpeg4 .avi"""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture
def fake_ucf(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "UCF-101"
    gray = np.repeat((np.arange(12, dtype=np.uint8) * 20)[:, None, None, None], 3, axis=3)
    _write_avi(root / "Alpha" / "v_Alpha_g01_c01.avi", np.broadcast_to(gray, (12, 32, 32, 3)).copy())
    _write_avi(root / "Alpha" / "v_Alpha_g02_c01.avi", rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8))
    # the official lists spell this class "HandStandPushups", its folder is "HandstandPushups"
    _write_avi(root / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi",
               rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    (root / "HandstandPushups" / "v_HandStandPushups_g02_c01.avi").write_bytes(rng.bytes(3000))  # corrupt
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 Alpha\r\n2 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_bytes(
        b"Alpha/v_Alpha_g01_c01.avi 1\r\nHandStandPushups/v_HandStandPushups_g01_c01.avi 2\r\n")
    (lists / "testlist01.txt").write_bytes(
        b"Alpha/v_Alpha_g02_c01.avi\r\nHandStandPushups/v_HandStandPushups_g02_c01.avi\r\n")
    return root


def test_sample_indices_uniform_and_repeating():
    assert sample_indices(12, 6) == [1, 3, 5, 7, 9, 11]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    idx = sample_indices(141, 40)
    assert len(idx) == 40 and idx == sorted(idx) and idx[0] < 4 and idx[-1] > 136
    with pytest.raises(ValueError):
        sample_indices(0, 40)


@needs_av
def test_parse_split(fake_ucf):
    assert ucf101_classes(fake_ucf) == ("Alpha", "HandstandPushups")
    assert parse_split(fake_ucf, 1, train=True) == [
        ("Alpha/v_Alpha_g01_c01.avi", 0), ("HandStandPushups/v_HandStandPushups_g01_c01.avi", 1)]
    assert parse_split(fake_ucf, 1, train=False) == [
        ("Alpha/v_Alpha_g02_c01.avi", 0), ("HandStandPushups/v_HandStandPushups_g02_c01.avi", 1)]
    with pytest.raises(DataNotFoundError, match="trainlist02"):
        parse_split(fake_ucf, 2)
    with pytest.raises(AbnnError, match="1, 2 or 3"):
        parse_split(fake_ucf, 4)


@needs_av
def test_missing_ucf101_root_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ABNN_UCF101_ROOT", raising=False)
    with pytest.raises(DataNotFoundError, match=r"ucfTrainTestlist.*classInd\.txt"):
        UCF101Clips(tmp_path / "nowhere")


@needs_av
def test_decode_clip_samples_uniformly(fake_ucf):
    clip = decode_clip(fake_ucf / "Alpha" / "v_Alpha_g01_c01.avi", n_frames=6, size=16)
    assert clip.shape == (3, 6, 16, 16) and clip.dtype == torch.uint8
    means = clip.float().mean(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.tensor([20.0, 60, 100, 140, 180, 220]), atol=6, rtol=0)
    wide = decode_clip(fake_ucf / "Alpha" / "v_Alpha_g02_c01.avi", n_frames=8, size=16)  # 48x32, 5 frames
    assert wide.shape == (3, 8, 16, 16)
    with pytest.raises(ucf101.VideoDecodeError, match="v_HandStandPushups_g02_c01"):
        decode_clip(fake_ucf / "HandstandPushups" / "v_HandStandPushups_g02_c01.avi")


@needs_av
def test_dataset_skips_corrupt_video_and_uses_cache(fake_ucf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = UCF101Clips(fake_ucf, 1, train=False, n_frames=4, size=16, cache_dir=cache)
    assert len(ds) == 2 and ds.num_classes == 2
    with pytest.warns(RuntimeWarning, match="v_HandStandPushups_g02_c01"):
        first = list(ds.batches(2))
    assert len(first) == 1
    x, y = first[0]
    assert x.shape == (1, 3, 4, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0]
    assert [p for p, _ in ds.skipped] == ["HandStandPushups/v_HandStandPushups_g02_c01.avi"]
    assert "cannot decode" in ds.skipped[0][1]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(ucf101, "decode_clip", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same video
        second = list(ds.batches(2))
    torch.testing.assert_close(second[0][0], x)
    assert len(ds.skipped) == 1
    # a new dataset on the same cache decodes nothing and knows the failure from its marker
    fresh = UCF101Clips(fake_ucf, 1, train=False, n_frames=4, size=16, cache_dir=cache)
    with pytest.warns(RuntimeWarning, match="skipping"):
        batch = collate_clips([fresh[0], fresh[1]])
    torch.testing.assert_close(batch[0], x)
    assert [p for p, _ in fresh.skipped] == ["HandStandPushups/v_HandStandPushups_g02_c01.avi"]


@needs_av
def test_dataset_prepare_train_split(fake_ucf, tmp_path):
    ds = UCF101Clips(fake_ucf, 1, train=True, n_frames=4, size=16, cache_dir=tmp_path / "c")
    assert ds.prepare(workers=2) == 2 and ds.skipped == []
    assert ds.cache_path(1).is_file()  # "HandStandPushups" list entry found in "HandstandPushups"
    (x, y), = list(ds.batches(4, shuffle=True, seed=1))
    assert x.shape == (2, 3, 4, 16, 16) and sorted(y.tolist()) == [0, 1]


# -- the shared real clips ------------------------------------------------------------------------

def test_load_shared_clips(data_root):
    if not (data_root / "video_clips_112.npz").is_file():
        pytest.skip("video_clips_112.npz not in the data root")
    clips, labels = load_shared_clips(data_root)
    assert clips.shape == (13, 3, 32, 112, 112) and clips.dtype == torch.uint8
    with np.load(data_root / "video_clips_112.npz") as z:
        names = [str(s) for s in z["filename"]]
    assert labels == [SHARED_VIDEO_LABELS[n] for n in names]
    assert labels.count("wave") == 3 and labels.count("using segway") == 3


@needs_av
def test_decode_real_ucf101_clip(data_root):
    path = data_root / "video" / "v_Basketball_g01_c01.avi"
    if not path.is_file():
        pytest.skip("video/ not in the data root")
    clip = decode_clip(path)
    assert clip.shape == (3, 40, 112, 112) and clip.dtype == torch.uint8
    assert 20 < clip.float().mean() < 235 and clip.float().std() > 10
    # the same pipeline on consecutive frames reproduces the pre-decoded clip (PIL vs swscale
    # bilinear differ by about one grey level)
    if (data_root / "video_clips_112.npz").is_file():
        with np.load(data_root / "video_clips_112.npz") as z:
            names = [str(s) for s in z["filename"]]
            i = names.index("v_Basketball_g01_c01.avi")
            ref, start = z["clips"][i], int(z["start_frame"][i])
        frames = ucf101._decode_frames(path, 112)
        assert len(frames) == 141
        h, w = frames.shape[1:3]
        mine = frames[start:start + 32, (h - 112) // 2:(h - 112) // 2 + 112, (w - 112) // 2:(w - 112) // 2 + 112]
        assert np.abs(mine.astype(np.float64) - ref).mean() < 3


def test_training_on_ucf101_layout_reports_skipped_videos(fake_ucf, tmp_path, monkeypatch):
    """A corrupt video never crashes a run: it is skipped, warned about and counted in the results."""
    from abnn.config import TrainConfig
    from abnn.training import train

    monkeypatch.setenv("HOME", str(tmp_path / "home"))          # the clip cache goes under ~/.cache
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("ABNN_UCF101_ROOT", raising=False)
    cfg = TrainConfig(method="standard", dataset="ucf101", arch="resnext3d_101_b1", width=0.125, epochs=1,
                      batch_size=2, lr=0.01, val_size=None, data_root=str(fake_ucf.parent))
    with pytest.warns(RuntimeWarning, match="v_HandStandPushups_g02_c01"):
        res = train(cfg, tmp_path / "run", progress=False)
    assert res.n_skipped_videos == 1
    assert res.skipped_videos[0]["video"] == "HandStandPushups/v_HandStandPushups_g02_c01.avi"
    assert res.cost_N_per_step == 2.0 and res.final_val_acc is not None
