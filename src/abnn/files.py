"""Writing files you can trust: one atomic-write helper, strict JSON, and a writability check.

Every file the package writes goes through :func:`atomic_write`: a temporary file beside the
target, flushed and fsynced, then renamed onto it, with the permissions an ordinary ``open()``
would give (0666 less the umask).  A kill, a full disk or any other failure
leaves the previous file intact and no temporary file behind, and ends in one
:class:`~abnn.errors.WriteError` line naming the file.  Standard library only (no torch), so
that the settings and the CLI import it cheaply.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from .errors import WriteError

__all__ = ["atomic_write", "write_json_atomic", "append_jsonl", "strict_json", "dumps_strict", "ensure_writable"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it onto ``path``.

    The rename is atomic (POSIX): readers see the old file or the complete new one, never a
    part.  On any failure the temporary file is removed and ``path`` is untouched; an
    ``OSError`` (full disk, read-only folder) or a ``RuntimeError`` (``torch.save``'s report of
    a failed write) becomes one :class:`WriteError` line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {_why(exc)}; choose another --out or fix the folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            raise WriteError(f"cannot write {path}: {_why(exc)}; the previous file, if any, is unchanged "
                             "(full disk? free space or choose another --out)") from None
        raise


def _umask() -> int:
    """The process umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _why(exc: BaseException) -> str:
    """One line about a failed file operation."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return "a file is in the way of this folder or of one of its parents"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).splitlines() or [""])[0] or type(exc).__name__


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None`` and paths and
    one-element tensors/arrays turned into plain values: strict JSON, which has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return strict_json(obj.item())
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json` (``null`` for missing and non-finite values)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON through :func:`atomic_write`."""
    data = (dumps_strict(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one strict-JSON line (a log such as ``metrics.jsonl``; readers skip a torn last line)."""
    line = dumps_strict(record) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as exc:
        raise WriteError(f"cannot append to {path}: {_why(exc)} (full disk or read-only folder?)") from None


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed and prove that a file can be created in it.

    Call it before any long computation whose results go there.  Permission bits alone do not
    stop root, so the proof is an actual file, created and removed.  Raises one
    :class:`WriteError` line naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".abnn-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(f"cannot write to {folder}: {_why(exc)}; choose another --out or fix the folder") from None
    return folder
