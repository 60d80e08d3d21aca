"""``train_results.json``: what a finished training run records, as a :class:`TrainResult`."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import AbnnError
from ..files import write_json_atomic
from ..runs import read_json

__all__ = ["RESULTS_NAME", "TrainResult", "software_versions"]

RESULTS_NAME = "train_results.json"


def software_versions() -> dict:
    import torchvision

    return {"abnn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


#: the per-epoch robust validation's entries (:func:`abnn.training.validation.robust_summary`),
#: written only by runs with robust validation
ROBUST_KEYS = ("robust_val", "best_robust_epoch", "best_val_pgd_acc", "final_val_pgd_acc",
               "catastrophic_overfitting_epochs", "model_pt_epoch")


@dataclass
class TrainResult:
    """What :func:`abnn.training.train` returns and rank 0 writes as ``train_results.json``.

    ``steps`` were trained of ``planned_steps`` (= ``total_steps``, the cosine schedule's
    length); ``complete`` is False after a ``max_steps`` stop.  ``train_seconds`` counts the
    training steps only; the per-epoch validation is timed apart (``validation_seconds`` and
    the rest, :data:`abnn.training.validation.VALIDATION_CLOCKS`).  ``cost`` is the pass
    counter's summary, ``cost_N_per_step`` its N per step (METHOD.md s. 5).  The robust entries
    (:data:`ROBUST_KEYS`) are set only with robust validation, ``substitute`` only for methods
    with a substitute, ``skipped_videos`` only for datasets that can skip them.

    Under torchrun the other ranks return a result with ``rank`` set and only ``method``,
    ``world_size``, ``cost_N_per_step`` and ``train_seconds`` (their own).  Files of older
    versions may lack entries: they load as ``None``; entries this class does not know are kept
    in ``extra`` and written back.
    """

    method: str
    dataset: str | None = None
    arch: str | None = None
    width: float | None = None
    epochs: int | None = None
    train_size: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    final_val_acc: float | None = None
    val_size: int | None = None
    steps: int | None = None
    planned_steps: int | None = None
    max_steps: int | None = None
    complete: bool | None = None
    train_seconds: float | None = None
    seconds_per_step: float | None = None
    train_cpu_seconds: float | None = None
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    validation_seconds: float | None = None
    validation_cpu_seconds: float | None = None
    robust_validation_seconds: float | None = None
    robust_validation_cpu_seconds: float | None = None
    cost: dict | None = None
    cost_N_per_step: float | None = None
    device: str | None = None
    threads: int | None = None
    versions: dict | None = None
    world_size: int | None = None
    per_rank_batch_size: int | None = None
    cost_scope: str | None = None
    amp: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    sync_bn: bool | None = None
    robust_val: dict | None = None
    best_robust_epoch: int | None = None
    best_val_pgd_acc: float | None = None
    final_val_pgd_acc: float | None = None
    catastrophic_overfitting_epochs: list[int] | None = None
    model_pt_epoch: int | None = None
    substitute: dict | None = None
    skipped_videos: list[dict] | None = None
    rank: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_skipped_videos(self) -> int | None:
        return None if self.skipped_videos is None else len(self.skipped_videos)

    def to_dict(self) -> dict:
        """The JSON object of ``train_results.json`` (the keys every version since the first wrote)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rank", "extra")}
        if self.robust_val is None:
            for k in ROBUST_KEYS:
                del out[k]
        for k in ("substitute", "skipped_videos"):
            if out[k] is None:
                del out[k]
        if self.skipped_videos is not None:
            out["n_skipped_videos"] = self.n_skipped_videos
        return {**out, **self.extra}

    def save(self, run_dir: str | os.PathLike) -> None:
        write_json_atomic(Path(run_dir) / RESULTS_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "TrainResult":
        known = {f.name for f in fields(cls)} - {"rank", "extra"}
        extra = {k: v for k, v in data.items() if k not in known and k != "n_skipped_videos"}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "TrainResult":
        """The ``train_results.json`` of ``run_dir`` (one :class:`~abnn.errors.AbnnError` line
        when it is missing or not JSON)."""
        path = Path(run_dir) / RESULTS_NAME
        data = read_json(path)
        if not isinstance(data, dict) or "method" not in data:
            raise AbnnError(f"{path} is not a train_results.json: a JSON object with a method is expected")
        return cls.from_dict(data)
