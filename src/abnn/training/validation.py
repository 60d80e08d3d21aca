"""Per-epoch validation of a training run: clean accuracy and PGD-5 robust accuracy.

Every epoch records the clean accuracy on the first ``val_size`` test images and, with
``robust_val_size``, the PGD-5 accuracy (METHOD.md s. 4: the paper's evaluation attack) on
held-out images (:func:`robust_val_data`): the signal that shows catastrophic overfitting
(Wong et al. 2020 s. 5) and that ``keep_best`` selects by.  Both run in float32 whatever the
training's ``--amp``, and are timed apart from the training steps (wall and CPU seconds per
epoch in ``metrics.jsonl``, totals in ``train_results.json``: :func:`validation_totals`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..attacks import PGD
from ..config import TrainConfig
from ..data import BatchLoader, load_dataset
from ..data.datasets import ImageData, load_cifar10_heldout
from ..errors import AbnnError
from .metrics import metric_lines

__all__ = ["CATASTROPHIC_DROP", "ROBUST_VAL_ATTACK", "VALIDATION_CLOCKS", "accuracy", "clean_val_data",
           "clean_val_size", "dataset_options", "is_best_epoch", "robust_accuracy", "robust_summary",
           "robust_val_data", "validate_epoch", "validation_totals"]

#: the batch size of the per-epoch validation
VAL_BATCH = 256


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int, device: torch.device, *,
             amp_dtype: torch.dtype | None = None) -> float:
    """Clean top-1 accuracy (model put in eval mode, previous mode restored), in float32 unless
    ``amp_dtype`` asks for autocast (training validates in float32 whatever its ``--amp``)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    ac = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ac:
        for x, y in BatchLoader(data, batch_size, device=device):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was)
    return correct.item() / len(data)


#: the per-epoch robust accuracy: the paper's evaluation attack, PGD-5 (METHOD.md s. 4)
ROBUST_VAL_ATTACK = {"alpha": 2 / 255, "steps": 5, "random_start": True}


def robust_accuracy(model: nn.Module, data, batch_size: int, device: torch.device, *, eps: float,
                    seed: int) -> float:
    """PGD-5 robust accuracy (correct clean and under attack) of ``model`` on ``data``: the
    per-epoch signal that shows catastrophic overfitting (Wong et al. 2020 s. 5)."""
    attack = PGD(model, eps=eps, seed=seed, **ROBUST_VAL_ATTACK)
    robust = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size, device=device):
        x_adv = attack(x, y)  # eval mode inside, previous mode restored
        with torch.no_grad():
            was = model.training
            model.eval()
            robust += ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).sum()
            model.train(was)
    return robust.item() / len(data)


def dataset_options(cfg: TrainConfig, split: str) -> dict:
    """The ``load_dataset`` options of a run's ``split``: frames per clip, the full CIFAR-10, and
    for training the JPEG-q75 images."""
    opts: dict = {"frames": cfg.frames}
    if cfg.full_cifar10:
        opts["full"] = True
    if split == "train" and cfg.include_jpeg:
        opts["include_jpeg"] = True
    return opts


def _heldout_jpeg(cfg: TrainConfig) -> bool:
    """Whether robust validation can use CIFAR-10's JPEG training images (the run trains on none)."""
    return cfg.dataset == "cifar10" and not (cfg.include_jpeg or cfg.full_cifar10)


def _test_split(cfg: TrainConfig):
    return load_dataset(cfg.dataset, "test", cfg.data_root, **dataset_options(cfg, "test"))


def robust_val_data(cfg: TrainConfig) -> tuple[ImageData | None, str]:
    """Images for the per-epoch robust accuracy and where they come from: for CIFAR-10 the first
    ``robust_val_size`` JPEG training images that no run without ``include_jpeg`` trains on (held-out
    training images); otherwise the LAST images of the test split, disjoint from the first
    ``val_size`` ones (and from the first-n images every evaluation uses)."""
    k = cfg.robust_val_size
    if k == 0:
        return None, ""
    if _heldout_jpeg(cfg):
        held = load_cifar10_heldout(k, cfg.data_root)
        if held is not None and len(held) == k:
            return held, f"the first {k} JPEG-q75 CIFAR-10 training images (held out of training)"
    test = _test_split(cfg)
    first = len(test) if cfg.val_size is None else cfg.val_size
    if first + k > len(test):
        raise AbnnError(f"--robust-val-size {k} overlaps the {first} validation images of the {len(test)}-image "
                        f"test split; use at most {len(test) - first} (or a smaller --val-size)")
    tail = ImageData(test.x[-k:], test.y[-k:], test.num_classes, f"{test.name}-last{k}", test.class_names)
    return tail, f"the last {k} images of the {test.name} split (disjoint from the first {first})"


def clean_val_size(cfg: TrainConfig) -> int | None:
    """``cfg.val_size``, except that "all" (``None``) leaves out the last ``robust_val_size``
    test images when the per-epoch robust accuracy takes them (:func:`robust_val_data`): the
    value a run records for "every validation image not held out for robust validation"."""
    tail = cfg.robust_val_size and not _heldout_jpeg(cfg)
    if cfg.val_size is not None or not tail:
        return cfg.val_size
    n = len(_test_split(cfg))
    if cfg.robust_val_size >= n:
        raise AbnnError(f"--robust-val-size {cfg.robust_val_size} leaves no validation image of the {n}-image "
                        f"{cfg.dataset} validation split; use fewer")
    return n - cfg.robust_val_size


def clean_val_data(cfg: TrainConfig):
    """The first ``val_size`` test images (``None`` for ``val_size`` 0: no clean validation)."""
    return _test_split(cfg).subset(cfg.val_size) if cfg.val_size != 0 else None


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and its process CPU seconds."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t, time.process_time() - c


def validate_epoch(model: nn.Module, val_data, rob_data, device: torch.device, *, eps: float,
                   seed: int) -> dict[str, float]:
    """An epoch's validation entries of ``metrics.jsonl``: ``val_acc`` with its wall and CPU
    seconds, and with ``rob_data`` ``val_pgd_acc`` with its own; float32, as every evaluation."""
    out: dict[str, float] = {}
    if val_data is not None:
        out["val_acc"], out["val_seconds"], out["val_cpu_seconds"] = _timed(
            lambda: accuracy(model, val_data, VAL_BATCH, device))
    if rob_data is not None:
        out["val_pgd_acc"], out["robust_val_seconds"], out["robust_val_cpu_seconds"] = _timed(
            lambda: robust_accuracy(model, rob_data, VAL_BATCH, device, eps=eps, seed=seed))
    return out


#: train_results.json's totals of the per-epoch validation clocks in metrics.jsonl (not in the training time)
VALIDATION_CLOCKS = {"validation_seconds": "val_seconds", "validation_cpu_seconds": "val_cpu_seconds",
                     "robust_validation_seconds": "robust_val_seconds",
                     "robust_validation_cpu_seconds": "robust_val_cpu_seconds"}


def validation_totals(run: Path) -> dict[str, float]:
    """Wall and process CPU seconds of the run's per-epoch clean and robust validation, summed
    over the epochs of ``metrics.jsonl`` (a resume keeps the lines of the epochs it keeps)."""
    records = metric_lines(run)
    return {total: sum(r.get(key) or 0.0 for r in records) for total, key in VALIDATION_CLOCKS.items()}


#: a drop of the per-epoch robust accuracy by more than this from its best marks catastrophic
#: overfitting (Wong et al. 2020 stop when it falls by 0.2 between checks)
CATASTROPHIC_DROP = 0.2


def _robust_history(run: Path) -> list[tuple[int, float]]:
    return [(r["epoch"], r["val_pgd_acc"]) for r in metric_lines(run)
            if r.get("val_pgd_acc") is not None and not r.get("partial")]


def _best(hist: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The epoch with the highest robust accuracy (the earliest on ties)."""
    return max(hist, key=lambda e: (e[1], -e[0]), default=None)


def is_best_epoch(run: Path, epoch: int) -> bool:
    """Whether ``epoch`` has the highest per-epoch robust accuracy so far (the earliest on ties)."""
    best = _best(_robust_history(run))
    return best is not None and best[0] == epoch


def robust_summary(run: Path, cfg: TrainConfig, source: str, epochs: int) -> dict:
    """The per-epoch robust accuracies, the best epoch, and whether catastrophic overfitting
    happened (a fall of more than CATASTROPHIC_DROP below the best so far)."""
    hist = _robust_history(run)
    best = _best(hist) or (None, None)
    peak, drops = 0.0, []
    for ep, acc in hist:
        peak = max(peak, acc)
        if peak - acc > CATASTROPHIC_DROP:
            drops.append(ep)
    return {"robust_val": {"source": source, "n": cfg.robust_val_size, "attack": f"PGD-5, eps {cfg.at_eps * 255:g}/255",
                           "per_epoch": [acc for _, acc in hist]},
            "best_robust_epoch": best[0], "best_val_pgd_acc": best[1],
            "final_val_pgd_acc": hist[-1][1] if hist else None,
            "catastrophic_overfitting_epochs": drops, "model_pt_epoch": best[0] if cfg.keep_best else epochs}
