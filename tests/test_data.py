"""Datasets from a data root, the vectorised augmentation, clear errors for missing data."""

import pytest
import torch

from abnn.data import BatchLoader, augment_crop_flip, load_cifar10, load_dataset, load_tinyimagenet32
from abnn.errors import DataNotFoundError


def test_fake_root_loads(fake_data_root):
    train = load_cifar10("train", fake_data_root)
    assert train.x.shape == (128, 3, 32, 32) and train.x.dtype == torch.uint8
    test = load_dataset("cifar10", "test", fake_data_root)
    assert len(test) == 32
    tiny = load_tinyimagenet32("val", fake_data_root)
    assert tiny.num_classes == 200


def test_env_var_is_the_default_root(fake_data_root, monkeypatch):
    monkeypatch.setenv("ABNN_DATA_ROOT", str(fake_data_root))
    assert len(load_tinyimagenet32("train")) == 64


def test_missing_data_names_both_options(tmp_path, monkeypatch):
    monkeypatch.delenv("ABNN_DATA_ROOT", raising=False)
    import abnn.data.datasets as ds

    def no_network(*a, **k):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(ds, "_download_cifar10", no_network)
    with pytest.raises(DataNotFoundError, match="npz.*cifar-10-batches-py.*download"):
        load_cifar10("train", tmp_path, download_dir=tmp_path / "dl")
    with pytest.raises(DataNotFoundError, match="tinyimagenet32_train.npz"):
        load_tinyimagenet32("train", tmp_path)
    with pytest.raises(DataNotFoundError, match="ABNN_DATA_ROOT"):
        load_tinyimagenet32("train", None)


def test_real_cifar10_sizes(data_root):
    train = load_cifar10("train", data_root)
    test = load_cifar10("test", data_root)
    assert len(train) == 20_000 and len(test) == 10_000
    assert torch.bincount(test.y).tolist() == [1000] * 10


def test_augment_is_a_crop_of_the_padded_image_or_its_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment_crop_flip(x, pad=2, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crops = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in crops)


def test_loader_batches_and_determinism(fake_data_root):
    data = load_cifar10("train", fake_data_root)
    a = [y for _, y in BatchLoader(data, 32, shuffle=True, augment=True, seed=1)]
    b = [y for _, y in BatchLoader(data, 32, shuffle=True, augment=True, seed=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, _ = next(iter(BatchLoader(data, 32)))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert len(BatchLoader(data, 50, drop_last=True)) == 2
    shards = [torch.cat([y for _, y in BatchLoader(data, 8, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 64


def test_subset_prefix():
    from abnn.data import ImageData

    d = ImageData(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10), 10, "t")
    assert len(d.subset(3)) == 3 and d.subset(None) is d
    with pytest.raises(Exception, match="empty"):
        ImageData(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 10, "t")



def test_reference_resnet20_loads_and_is_accurate(data_root):
    """The legacy reference checkpoint loads with weights_only=True and scores ~91.7% (README)."""
    from abnn.models import resnet20_reference

    model = resnet20_reference(str(data_root / "weights" / "resnet20-12fca82f.th")).eval()
    data = load_cifar10("test", data_root).subset(500)
    with torch.no_grad():
        acc = (model(data.x.float() / 255).argmax(1) == data.y).float().mean().item()
    assert acc > 0.88


@pytest.mark.parametrize("clips", [False, True])
def test_on_device_loader_yields_the_same_batches(fake_data_root, clips):
    """The on-device path (split resident on the device, gather/crop/flip there) draws from the
    same CPU generators as the host path: same seed, same epoch, same batches, bit for bit."""
    from abnn.data.datasets import ImageData

    data = load_cifar10("train", fake_data_root)
    if clips:  # (N, C, T, H, W): the per-clip flip path
        data = ImageData(data.x[:, :, None].expand(-1, -1, 2, -1, -1).contiguous(), data.y, 10, "clips")
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=3, rank=1, world_size=2)
    host, dev = BatchLoader(data, 8, **kw), BatchLoader(data, 8, on_device=True, **kw)
    for epoch in (0, 1):
        host.set_epoch(epoch)
        dev.set_epoch(epoch)
        pairs = list(zip(host, dev, strict=True))
        assert len(pairs) == len(host) == 8
        for (xh, yh), (xd, yd) in pairs:
            assert torch.equal(xh, xd) and torch.equal(yh, yd) and xd.dtype == torch.float32
    assert dev._resident is not None and host._resident is None


def test_train_data_on_device_flag_trains_the_same_weights(fake_data_root, tmp_path, capsys):
    """`abnn train --data-on-device` (execution only) trains bit-identical weights on the CPU."""
    import json

    from abnn.cli import main

    states = []
    for extra in ([], ["--data-on-device"]):
        run = tmp_path / f"r{len(extra)}"
        assert main(["train", "--out", str(run), "--width", "0.0625", "--epochs", "1", "--batch-size", "16",
                     "--val-size", "0", "--max-steps", "2", "--data-root", str(fake_data_root), "--no-progress",
                     "--device", "cpu", *extra]) == 0
        assert json.loads((run / "config.json").read_text())["data_on_device"] == bool(extra)
        states.append(torch.load(run / "model.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
