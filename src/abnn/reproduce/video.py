"""Tables 2 and 3 (UCF-101) in one command: no defense, OUDefend, ABNN; clean, PGD, ROA.

The same stages as Table 1 (run folders, resumable, ``force`` redoes) with 5-D clips: PGD at
eps 1/255 (alpha eps/4, 5 steps), ROA with a 35x35 rectangle per frame (about 10% of 112x112)
at independent random positions (METHOD.md s. 4).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import write_json_atomic
from ..files import ensure_writable
from .presets import PAPER_VIDEO, VideoPreset
from .stages import TableEval, job_eval, job_train, log
from .table1 import make_examples, table_record


def run_video_tables(preset: VideoPreset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
                     force: bool = False, progress: bool = True, command: str = "") -> dict:
    """Train and evaluate every method of ``preset``; write report.md, results.json, figures."""
    from ..report import write_video_report

    out = Path(out)
    ensure_writable(out)
    t_start = time.perf_counter()
    write_json_atomic(out / "preset.json", preset.to_dict())
    records = []
    for method in preset.methods:
        cfg = preset.method_config(method)
        cfg.data_root = data_root
        cfg.device = device
        tr = job_train(out / method, cfg, force, progress)
        ev = job_eval(out / method, TableEval.of(preset), data_root, device, force, progress)
        records.append(table_record(method, cfg, tr, ev, PAPER_VIDEO[method]))
    examples = make_examples(out, preset, data_root, device, force=force)
    results = {"preset": preset.to_dict(), "records": records, "command": command,
               "pipeline_seconds_this_call": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", results)
    write_video_report(out, results, examples)
    log(f"report written to {out / 'report.md'}")
    return results
