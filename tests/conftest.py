"""Shared fixtures: tiny models and data; the real data of ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    """$ABNN_DATA_ROOT, else ../shared/data next to the repository (as laid out for CI)."""
    for cand in (os.environ.get("ABNN_DATA_ROOT"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "cifar10.npz").is_file():
            return Path(cand)
    return None


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and never oversubscribes
    yield


@pytest.fixture
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not found (set ABNN_DATA_ROOT or place shared/data next to the repo)")
    return root


@pytest.fixture
def tiny_abnn():
    """A tiny ABNN: ResNet-18 at width 1/16 with a VGG-19-BN substitute at width 1/16."""
    from abnn import ABNN
    from abnn.models import resnet18_cifar, vgg19_bn_substitute

    torch.manual_seed(0)
    return ABNN(resnet18_cifar(width=1 / 16), vgg19_bn_substitute(width=1 / 16), input_shape=(3, 32, 32))


def write_fake_npz(root: Path, n_train: int = 64, n_test: int = 32, n_tiny: int = 64) -> Path:
    """Fake cifar10/tinyimagenet32 npz files in the layout of shared/data (for CLI tests)."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)

    def imgs(n):
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

    names = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    np.savez_compressed(root / "cifar10.npz", x_train=imgs(n_train), y_train=rng.integers(0, 10, n_train),
                        x_test=imgs(n_test), y_test=rng.integers(0, 10, n_test), class_names=names)
    np.savez_compressed(root / "cifar10_train_extra.npz", x=imgs(n_train), y=rng.integers(0, 10, n_train),
                        class_names=names)
    for split in ("train", "val"):
        np.savez_compressed(root / f"tinyimagenet32_{split}.npz", x=imgs(n_tiny), y=rng.integers(0, 200, n_tiny),
                            class_names=np.array([f"c{i}" for i in range(200)]))
    return root


@pytest.fixture
def fake_data_root(tmp_path) -> Path:
    return write_fake_npz(tmp_path / "data")


@pytest.fixture
def study_data_root(tmp_path) -> Path:
    """The real data when present (as in CI), else fake npz files large enough for the smoke
    preset: 256 training images, 64 validation + 32 robust-validation images, 48 test images."""
    return shared_data_root() or write_fake_npz(tmp_path / "data", n_train=256, n_test=128, n_tiny=256)


def record(clean: str, rows: dict[str, str], *, spec: dict | None = None, eps: float = 8 / 255):
    """An evaluation record made by hand: per-sample masks as "0"/"1" strings (clean, and each
    L-inf attack's robust mask at ``eps``)."""
    from abnn.evaluation.results import AttackResult, EvalResult, mask_from_str

    def acc(m: str) -> float:
        return m.count("1") / len(m)

    attacks = {k: AttackResult(label=k, attack=k, kind="white-box", norm="linf", eps=eps, options={}, settings=k,
                               seed=0, robust_acc=acc(m), seconds=1.0, robust_mask=mask_from_str(m))
               for k, m in rows.items()}
    return EvalResult(n_eval=len(clean), clean_acc=acc(clean), clean_mask=mask_from_str(clean), eps=eps,
                      attacks=attacks, seed=0, batch_size=len(clean), device="cpu", threads=1,
                      seconds=float(len(rows)), spec={"seed": 0} if spec is None else spec)
