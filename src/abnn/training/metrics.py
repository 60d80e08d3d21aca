"""``metrics.jsonl``: one strict-JSON line per epoch of a run (the last one ``"partial"`` when
the run stopped mid-epoch), read back by resume, keep-best and the results."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..files import append_jsonl, atomic_write, dumps_strict

__all__ = ["METRICS_NAME", "append_metrics", "last_metrics", "metric_lines", "truncate_metrics"]

METRICS_NAME = "metrics.jsonl"


def metric_lines(run: Path) -> list[dict]:
    """The epoch records of the run's ``metrics.jsonl``; a torn line (a kill or a full disk
    mid-append) is skipped."""
    path = run / METRICS_NAME
    records = []
    for ln in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rec = json.loads(ln)
            if isinstance(rec, dict) and "epoch" in rec:
                records.append(rec)
    return records


def last_metrics(run: Path) -> dict:
    records = metric_lines(run)
    return records[-1] if records else {}


def append_metrics(run: Path, record: dict) -> None:
    append_jsonl(run / METRICS_NAME, record)


def truncate_metrics(run: Path, epochs_done: int) -> None:
    """Drop the lines of epochs after the checkpoint's completed epochs (a kill between the
    two writes, or the partial line of a ``max_steps`` stop)."""
    path = run / METRICS_NAME
    if path.is_file():
        keep = "".join(dumps_strict(r) + "\n" for r in metric_lines(run) if r["epoch"] <= epochs_done)
        atomic_write(path, lambda f: f.write(keep.encode()))
