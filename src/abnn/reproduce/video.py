"""Tables 2 and 3 (UCF-101) in one command: no defense, OUDefend, ABNN; clean, PGD, ROA.

The same stages as Table 1 (run folders, resumable, ``force`` redoes) with 5-D clips: PGD at
eps 1/255 (alpha eps/4, 5 steps), ROA with a 35x35 rectangle per frame (about 10% of 112x112)
at independent random positions (METHOD.md s. 4).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import write_json_atomic
from ..files import ensure_writable
from .presets import VideoPreset
from .stages import TableEval, TrainPoint, log, schedule, train_and_eval_stages
from .table1 import make_examples, table_record


def video_points(preset: VideoPreset, out: Path, data_root: str | None, device: str) -> list[TrainPoint]:
    """One run folder ``out / METHOD`` per method of the preset (the substitute is a weights file)."""
    points = []
    for method in preset.methods:
        cfg = preset.method_config(method)
        cfg.data_root, cfg.device = data_root, device
        points.append(TrainPoint(method, out / method, cfg))
    return points


def run_video_tables(preset: VideoPreset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
                     force: bool = False, progress: bool = True, command: str = "", jobs: int | None = 1,
                     threads: int | None = None) -> dict:
    """Train and evaluate every method of ``preset``; write report.md, results.json, figures.

    The stages run one at a time (``jobs``) with the process's torch threads (``threads``) by
    default, as Table 1's do with ``--jobs 1``."""
    from ..reports.video import write_video_report

    out = Path(out)
    ensure_writable(out)
    t_start = time.perf_counter()
    write_json_atomic(out / "preset.json", preset.to_dict())
    points = video_points(preset, out, data_root, device)
    stages, done = train_and_eval_stages(points, points, TableEval.of(preset), data_root, device, force=force)
    results, _, _ = schedule("video", stages, done, jobs=jobs, threads=threads or torch.get_num_threads(),
                             progress=progress)
    records = [table_record(p.name, p.cfg, results[p.name], results[f"eval:{p.name}"], "video") for p in points]
    examples = make_examples(out, preset, data_root, device, force=force)
    summary = {"preset": preset.to_dict(), "records": records, "command": command,
               "pipeline_seconds_this_call": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", summary)
    write_video_report(out, summary, examples)
    log(f"report written to {out / 'report.md'}")
    return summary
