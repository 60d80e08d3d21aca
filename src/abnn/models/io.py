"""Safe saving and loading of weights: atomic writes (:func:`abnn.files.atomic_write`: a kill or
a full disk never leaves a half-written file), ``torch.load(weights_only=True)`` and errors that
name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import atomic_write


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`abnn.files.atomic_write`: the previous file stays valid
    until the new one is complete; a failed write raises one :class:`~abnn.errors.WriteError` line."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | os.PathLike, *, weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` on CPU that refuses pickled code (``weights_only=True``) and turns every
    failure into a :class:`CheckpointError` naming the file.  ``mmap`` maps the tensors of a
    zip-format file instead of reading them (a legacy-format file is then read as usual)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint: neither torch.save's zip format nor its legacy format "
                              "(a wrong or damaged file?)")
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
            except RuntimeError as exc:  # a legacy (pre-1.6) file cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "global" in str(exc).lower() and ("Weights only load failed" in str(exc) or "Unsupported" in str(exc)):
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled objects other than tensors "
                "(possible code execution); only weights-only checkpoints are accepted"
            ) from None
        if "Weights only load failed" in str(exc):  # torch's message then is about trust, not the bytes
            msg = "its contents are not what torch.save writes"
        raise CheckpointError(f"cannot read checkpoint {path}: {msg} (truncated or corrupt file?)") from None


#: the first bytes of what torch.save writes: a zip archive, or a pickle (legacy format, protocol 2+)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _looks_like_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let torch.load report it
    return any(head.startswith(m) for m in _TORCH_MAGIC)


def extract_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: a bare state dict, ``{"model": ...}``,
    ``{"state_dict": ...}``; a DataParallel ``module.`` prefix is stripped."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, path: str | os.PathLike) -> None:
    """Raise a :class:`CheckpointError` naming the file and the first mismatches if ``state``
    does not fit ``model`` (missing/unexpected keys, shape differences such as another class count)."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is absent from older checkpoints and unused in eval mode
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if shapes:
        problems.append("shape mismatch (another architecture, width or class count?): " + "; ".join(shapes[:3]))
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_state_dict_file(path: str | os.PathLike, *, expect: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file safely; with ``expect`` also check that it fits that model."""
    state = extract_state_dict(safe_torch_load(path), path)
    if expect is not None:
        check_state_dict(state, expect, path)
    return state
