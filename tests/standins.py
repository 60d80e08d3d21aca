"""Local stand-ins, in tmp folders, for everything the paper presets would download (issue 14):
torchvision-format VGG-19-BN and R3D-18 state dicts (random values), CIFAR-10 in torchvision's
python version layout and UCF-101 in its official layout, both made of real images and clips of
``shared/data``.  Nothing is copied into the repository; the UCF-101 videos are symlinks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _random_bn_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm running statistics (what pretrained weights have)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.05)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)


def write_torchvision_vgg19_bn(path: Path) -> Path:
    """A state dict with torchvision's ``vgg19_bn`` keys and shapes: random ``features`` (about
    80 MB, float32, torchvision's initialisation) and the 4096-4096-1000 classifier, which ABNN
    never loads, as zero-stride constants of the right shapes (a 4-byte storage each instead of
    the 480 MB of torchvision's file)."""
    from torchvision.models import vgg as tv_vgg

    torch.manual_seed(0)
    features = tv_vgg.make_layers(tv_vgg.cfgs["E"], batch_norm=True)
    for m in features.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    _random_bn_statistics(features)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    for i, (n_out, n_in) in ((0, (4096, 512 * 7 * 7)), (3, (4096, 4096)), (6, (1000, 4096))):
        state[f"classifier.{i}.weight"] = torch.zeros(1).expand(n_out, n_in)
        state[f"classifier.{i}.bias"] = torch.zeros(1).expand(n_out)
    torch.save(state, path)
    return path


def write_torchvision_r3d_18(path: Path) -> Path:
    """torchvision's ``r3d_18`` with random weights (its own initialisation), saved as its state
    dict (about 130 MB, float32): the format of the Kinetics-400 file."""
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    model = r3d_18(weights=None)
    _random_bn_statistics(model)
    torch.save(model.state_dict(), path)
    return path


def write_cifar10_python(folder: Path, shared: Path, *, per_batch: int = 8, n_test: int = 16) -> Path:
    """``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta; pickles as in
    torchvision's download: dicts with ``data`` N x 3072 uint8 in R, G, B planes and ``labels``)
    holding ``5 * per_batch`` training and ``n_test`` test images of ``shared/cifar10.npz``."""
    z = np.load(shared / "cifar10.npz")
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    def batch(x: np.ndarray, y: np.ndarray, label: str) -> dict:
        return {"batch_label": label, "labels": [int(v) for v in y],
                "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1)),
                "filenames": [f"img_{i}.png" for i in range(len(x))]}

    x, y = z["x_train"], z["y_train"]
    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", batch(x[sl], y[sl], f"training batch {i + 1} of 5"))
    dump("test_batch", batch(z["x_test"][:n_test], z["y_test"][:n_test], "testing batch 1 of 1"))
    dump("batches.meta", {"label_names": [str(n) for n in z["class_names"]], "num_cases_per_batch": per_batch,
                          "num_vis": 3072})
    return folder


#: UCF-101 class of each of the 13 real clips (their labels in shared/data/README.md, s. 3, CamelCase)
_UCF_CLASS = {"wave": "Wave", "cartwheel": "Cartwheel", "abseiling": "Abseiling", "arm wrestling": "ArmWrestling",
              "cleaning pool": "CleaningPool", "using segway": "UsingSegway"}


def write_ucf101(root: Path, shared: Path) -> tuple[Path, dict[str, list[str]]]:
    """UCF-101 in its official layout under ``root``: ``UCF-101/<Class>/v_<Class>_gXX_c01.avi``
    (symlinks to the 13 real clips of ``shared/video``; the mp4 ones keep their container, which
    the decoder recognises by content) and ``ucfTrainTestlist/`` with ``classInd.txt``,
    ``trainlist01.txt`` (the first clip of each of the 9 classes) and ``testlist01.txt`` (the
    other 4).  Returns the root and ``{"train": [...], "test": [...]}`` relative paths."""
    from abnn.data.ucf101 import SHARED_VIDEO_LABELS

    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    groups: dict[str, int] = {}
    split: dict[str, list[str]] = {"train": [], "test": []}
    for name, label in sorted(SHARED_VIDEO_LABELS.items()):
        cls = _UCF_CLASS.get(label, label)
        groups[cls] = groups.get(cls, 0) + 1
        rel = f"{cls}/v_{cls}_g{groups[cls]:02d}_c01.avi"
        (videos / cls).mkdir(parents=True, exist_ok=True)
        (videos / rel).symlink_to(shared / "video" / name)
        split["train" if groups[cls] == 1 else "test"].append(rel)
    classes = sorted(groups)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (lists / "trainlist01.txt").write_text(
        "".join(f"{r} {classes.index(r.split('/')[0]) + 1}\n" for r in split["train"]))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in split["test"]))
    return root, split
