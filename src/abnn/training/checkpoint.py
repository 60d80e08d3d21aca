"""The training checkpoint: everything an exact resume needs, written atomically.

``checkpoint.pt`` is written at every epoch end and every ``checkpoint_every`` steps within an
epoch (and on Ctrl-C).  It holds the model, optimizer, scheduler and GradScaler states, the
counted cost, every rank's RNG states (torch CPU and CUDA), the position (epoch, whether it is
done, the batches done in it, the global step), the partial epoch's sums, the training clocks,
the config and the package version.  The loader's order and augmentation are functions of
(seed, epoch), so a resumed epoch replays its generator over the batches already done and
continues with exactly the batches an uninterrupted run would see.

Files are written to a temporary file and renamed (:func:`save_atomic`), so a kill never leaves
a half-written checkpoint, and read back with ``weights_only=True`` (:func:`load_checkpoint`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.io import safe_torch_load, save_atomic

__all__ = ["EpochPartial", "TrainingCheckpoint", "load_checkpoint", "rng_state", "save_atomic", "set_rng_state"]


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` of ``path`` on CPU, weights only; every failure is one :class:`CheckpointError` line."""
    return safe_torch_load(path)


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch's CPU generator and, on CUDA, the device's."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class EpochPartial:
    """The sums of an epoch stopped part-way, over all ranks: the loss summed over samples, the
    correct predictions, the samples seen and the training seconds so far."""

    loss_sum: Tensor
    correct: Tensor
    seen: int
    seconds: float


#: the entries without which a file is not a training checkpoint
_REQUIRED = ("model", "optimizer", "scheduler", "epoch")


@dataclass(kw_only=True)
class TrainingCheckpoint:
    """One ``checkpoint.pt``.  ``epoch`` is 0-based; with ``epoch_done`` False the epoch stopped
    after ``batch_in_epoch`` batches and ``epoch_partial`` holds its sums.  ``rng`` is rank 0's
    state (what a single process resumes from), ``rng_per_rank`` every rank's.  Checkpoints of
    older versions may lack the later entries: they load with the defaults."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None = None
    cost: dict = field(default_factory=dict)
    epoch: int
    epoch_done: bool = True
    batch_in_epoch: int = 0
    step: int | None = None
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    rng: dict | None = None
    rng_per_rank: list[dict] | None = None
    world_size: int = 1
    config: dict | None = None
    version: str | None = None
    epoch_partial: EpochPartial | None = None

    def to_dict(self) -> dict:
        """The file's content: plain containers of tensors (``weights_only`` loadable);
        ``epoch_partial`` only for a checkpoint taken mid-epoch."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "epoch_partial"}
        if self.epoch_partial is not None:
            state["epoch_partial"] = asdict(self.epoch_partial)
        return state

    def save(self, path: str | os.PathLike) -> None:
        save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingCheckpoint":
        """Read and check ``path``; a file that is not an abnn training checkpoint is one
        :class:`CheckpointError` line."""
        state = load_checkpoint(path)
        if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
            raise CheckpointError(f"{path} is not an abnn training checkpoint (needs {', '.join(_REQUIRED)}); "
                                  "delete it to start the run over")
        known = {f.name for f in fields(cls)}
        ck = cls(**{k: v for k, v in state.items() if k in known})
        if isinstance(ck.epoch_partial, dict):
            ck.epoch_partial = EpochPartial(**ck.epoch_partial)
        return ck

    def resume_position(self) -> tuple[int, int]:
        """``(epoch, batches)``: the 0-based epoch to continue and the batches of it already done."""
        if self.epoch_done:
            return int(self.epoch) + 1, 0
        return int(self.epoch), int(self.batch_in_epoch)

    def rng_for(self, rank: int, world_size: int) -> dict | None:
        """The RNG state ``rank`` resumes from: its own when the process count is unchanged,
        else rank 0 the single-process state and the other ranks none (their fresh seeds)."""
        if self.rng_per_rank and len(self.rng_per_rank) == world_size:
            return self.rng_per_rank[rank]
        return self.rng if rank == 0 else None
