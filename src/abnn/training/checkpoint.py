"""Atomic checkpoints: written to a temporary file and renamed, so a kill never leaves a
half-written checkpoint; read back with ``weights_only=True``."""

from __future__ import annotations

import os

from ..models.io import safe_torch_load, save_atomic

__all__ = ["load_checkpoint", "save_atomic"]


def load_checkpoint(path: str | os.PathLike) -> dict:
    return safe_torch_load(path)
