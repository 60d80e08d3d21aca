"""``abnn reproduce TABLE``: pick the preset and the pipeline, reuse what exists, summarise.

Every pipeline reuses its finished stages (and continues interrupted ones) when their recorded
settings match; ``fresh=True`` redoes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import AbnnError

__all__ = ["TABLES", "reproduce_command"]

#: the tables ``abnn reproduce`` makes, with what each is
TABLES = {
    "table1": "CIFAR-10 PGD",
    "table2": "UCF-101 PGD and ROA (one run makes table2, table3 and video)",
    "table3": "as table2", "video": "as table2",
    "frontier": "clean and worst-case accuracy against training cost (no defense, ABNN, Fast-AT, PGD-AT at the "
                "preset's and at ABNN's training time)",
    "substitute-study": "ABNN with substitutes of increasing strength (both on the Table 1 preset)",
    "studies": "both, in one schedule that trains their shared models once (OUT/frontier, OUT/substitute-study)",
    "robust-substitute": "ABNN with an adversarially pretrained substitute against a probe on it and Fast-AT / PGD-AT",
    "forensics": "ABNN under weaker attack protocols, gradient attribution and path swap (why the paper saw "
                 "robustness)",
}


def reproduce_command(table: str, preset_name: str, *, overrides: Sequence[str] = (), out: str | None = None,
                      estimate: bool = False, table1_out: str | None = None, studies_out: str | None = None,
                      data_root: str | None = None, device: str = "cpu", fresh: bool = False, progress: bool = True,
                      command: str = "", jobs: int | None = None, threads: int | None = None) -> str:
    """Run ``table`` with preset ``preset_name`` (``--set`` ``overrides`` applied, checked before
    any work) into ``out`` (default ``out/<table>-<preset>``); return the text to print (a JSON
    summary, or with ``estimate`` the counted FLOPs and time of Table 1, running nothing)."""
    from .presets import apply_overrides, get_preset, get_video_preset

    if estimate and table != "table1":
        raise AbnnError(f"--estimate is for table1 only, got {table}; drop --estimate")
    if table1_out is not None and table not in ("frontier", "substitute-study"):
        raise AbnnError(f"--table1-out is for the frontier and substitute-study tables, not {table}; drop it")
    video = table in ("table2", "table3", "video")
    preset = apply_overrides((get_video_preset if video else get_preset)(preset_name), overrides)
    run = dict(data_root=data_root, device=device, force=fresh, progress=progress, command=command)
    scheduled = dict(run, jobs=jobs, threads=threads)
    if table == "table1" and estimate:
        from ..files import write_json_atomic
        from .estimate import estimate_table1, format_estimate

        est = estimate_table1(preset, data_root=data_root)
        if out:
            write_json_atomic(Path(out), est)
        return format_estimate(est)
    out = out or (f"out/video-{preset_name}" if video else f"out/{table}-{preset_name}")
    if table in ("table1", "table2", "table3", "video"):
        from .sources import check_sources

        check_sources(preset, data_root)
        if video:
            from .video import run_video_tables

            return _records(out, run_video_tables(preset, out, **run))
        from .table1 import run_table1

        return _records(out, run_table1(preset, out, **scheduled))
    from .frontier import study_settings

    study_settings(preset)
    if table == "studies":
        from .studies import run_studies

        both = run_studies(preset, out, **scheduled)
        return json.dumps({"out": out, "frontier": f"{out}/frontier/report.md",
                           "substitute_study": f"{out}/substitute-study/report.md",
                           "records": len(both["frontier"]["records"]) + len(both["substitute_study"]["records"])})
    if table in ("frontier", "substitute-study"):
        from .frontier import run_frontier
        from .substitute_study import run_substitute_study

        if table1_out is not None and not Path(table1_out).is_dir():
            raise AbnnError(f"--table1-out {table1_out}: no such folder (a Table 1 reproduction's --out, e.g. "
                            f"out/table1-{preset_name}); fix the path, or leave the flag out to train every stage here")
        default = f"out/table1-{preset_name}"
        table1 = table1_out or (default if Path(default).is_dir() else None)
        runner = run_frontier if table == "frontier" else run_substitute_study
        res = runner(preset, out, table1_dir=table1, **scheduled)
        return json.dumps({"out": out, "records": [{k: r[k] for k in ("clean_acc", "worst_case_acc")} | {
            "name": r.get("name") or r.get("label")} for r in res["records"]]})
    # the studies that build on `reproduce studies` (its models reused from studies_out)
    if studies_out is not None and not Path(studies_out, "frontier").is_dir():
        raise AbnnError(f"--studies-out {studies_out}: no `reproduce studies` output there (no {studies_out}/frontier "
                        "folder); check the path, or leave the option out to train what is missing")
    if studies_out is None and Path(f"out/studies-{preset_name}/frontier").is_dir():
        studies_out = f"out/studies-{preset_name}"
    if table == "robust-substitute":
        from .robust_substitute import run_robust_substitute as runner
    else:
        from .forensics import run_forensics as runner
    res = runner(preset, out, studies_dir=studies_out, **scheduled)
    return json.dumps({"out": out, "report": f"{out}/report.md", "records": [
        {k: r.get(k) for k in ("name", "clean_acc", "worst_case_acc")} for r in res["records"]]})


def _records(out: str, res: dict[str, Any]) -> str:
    keys = ("method", "clean_acc", "robust_acc", "cost_N_per_step")
    return json.dumps({"out": out, "records": [{k: r[k] for k in keys} for r in res["records"]]})
