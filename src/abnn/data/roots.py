"""Where the data lives: the data root (``--data-root`` or ``$ABNN_DATA_ROOT``), the files a
dataset needs in it, and ``.npz`` reading with one-line errors.  Every dataset module reads its
files through these helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import AbnnError, DataNotFoundError

__all__ = ["ENV_VAR", "read_npz", "require_files", "resolve_data_root"]

#: the environment variable of the data root
ENV_VAR = "ABNN_DATA_ROOT"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path | None:
    """``data_root`` if given, else ``$ABNN_DATA_ROOT``, else ``None``."""
    root = data_root if data_root not in (None, "") else os.environ.get(ENV_VAR)
    return Path(root).expanduser() if root else None


def read_npz(path: str | os.PathLike, *keys: str) -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of an ``.npz`` file, read at once; a truncated or corrupt file, or one
    without these arrays, is one :class:`AbnnError` line naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise AbnnError(f"{path} lacks the arrays {missing} (has {z.files}); is it the right file?")
            return tuple(z[k] for k in keys)
    except AbnnError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, numpy and OS errors alike
        msg = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise AbnnError(f"cannot read {path}: {msg} (truncated or corrupt file? copy it again)") from None


def require_files(root: Path | None, files: list[str], dataset: str, alternative: str = "") -> Path:
    """``root``, checked to hold ``files``; else a :class:`DataNotFoundError` that says how to give
    them (``alternative``: another way, appended to the message)."""
    if root is None:
        raise DataNotFoundError(
            f"no data root for {dataset}: pass --data-root DIR or set {ENV_VAR}=DIR to a folder holding {', '.join(files)}"
            + alternative
        )
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{dataset}: {', '.join(missing)} not found in data root {root}" + alternative)
    return root
