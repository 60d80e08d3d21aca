"""Is ABNN worth its cost?  A robustness frontier at matched training budgets.

Five models on the Table 1 preset's target, data, schedule and seed (METHOD.md s. 5, "Comparing
defenses at equal budget"): no defense, ABNN, Fast-AT (Wong, Rice & Kolter 2020), PGD-AT at the
preset's epochs, and PGD-AT *cost-matched*: a step budget (``total_steps``, the cosine schedule
over it) cut so that its measured training seconds match ABNN's (:func:`matching`).  Every model is evaluated with the paper's PGD-5 and a strong white-box
worst case (APGD-CE and APGD-T, per sample) on the same test images.  The report gives, per
method, the counted passes per step, the total counted cost (N x steps) and the measured
training seconds (and, apart, the seconds of the per-epoch validation), and plots clean and
worst-case accuracy against both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig, write_json_atomic
from ..evaluation.results import EvalResult
from ..training.loop import VALIDATION_CLOCKS, software_versions
from .presets import Table1Preset
from .schedule import Stage
from .stages import StudyEval, TrainPoint, eval_of, job_train, log, place, schedule, train_and_eval_stages

#: every point of the frontier, in report order
FRONTIER = ("standard", "abnn", "fast-at", "pgd-at", "pgd-at-matched")
NAMES = {"standard": "No defense", "abnn": "ABNN", "fast-at": "Fast-AT", "pgd-at": "PGD-AT",
         "pgd-at-matched": "PGD-AT, cost-matched"}


@dataclass(frozen=True)
class StudySettings:
    """What the studies add to a Table 1 preset."""

    strong: tuple[str, ...]           # the strong white-box attacks of the worst case (registry specs)
    eval_batch_size: int = 250
    autoattack_n: int = 200           # the authors' AutoAttack runs on the first this many test images (0: none)


STUDY_SETTINGS = {
    "smoke": StudySettings(strong=("apgd-ce:steps=5", "apgd-t:steps=5,n_target_classes=3"),
                           eval_batch_size=48, autoattack_n=0),  # smoke: no AutoAttack (minutes on a CPU)
    "cpu": StudySettings(strong=("apgd-ce:steps=100", "apgd-t:steps=100,n_target_classes=9")),
}


def study_settings(preset: Table1Preset) -> StudySettings:
    from ..errors import AbnnError

    if preset.name not in STUDY_SETTINGS:
        raise AbnnError(f"the studies run with the presets {', '.join(STUDY_SETTINGS)}; got {preset.name!r}")
    return STUDY_SETTINGS[preset.name]


def study_eval(preset: Table1Preset) -> StudyEval:
    st = study_settings(preset)
    return StudyEval(attacks=("pgd", *st.strong), n_eval=preset.n_eval, batch_size=st.eval_batch_size,
                     seed=preset.seed)


#: how far the cost-matched PGD-AT's predicted seconds may be from ABNN's
MATCH_TOLERANCE = 0.05


def matched_steps(abnn_seconds: float, pgdat_seconds: float, pgdat_steps: int) -> int:
    """PGD-AT optimiser steps whose predicted training seconds (PGD-AT's measured seconds per
    step times the steps) match ABNN's measured seconds: the nearest whole step, at least one.
    The prediction is off by at most half a step's seconds."""
    return max(1, round(abnn_seconds * pgdat_steps / pgdat_seconds))


#: the clocks that the cost matching can compare, and their names in reports
CLOCKS = {"train_cpu_seconds": "process CPU seconds (one thread)", "train_seconds": "wall-clock seconds"}


def common_clock(*results: dict) -> str:
    """The clock to compare runs by: the process CPU seconds when every run recorded them on one
    CPU thread (what a run costs on one core, whatever else the machine runs), else wall-clock."""
    cpu = all(r.get("train_cpu_seconds") and r.get("threads") == 1 and str(r.get("device", "cpu")) == "cpu"
              for r in results)
    return "train_cpu_seconds" if cpu else "train_seconds"


def matching(abnn: dict, pgdat: dict) -> dict:
    """How the cost-matched PGD-AT's step budget follows from ABNN's measured seconds and
    PGD-AT's measured seconds per step (both ``train_results.json``), by :func:`common_clock`;
    ``matched_epochs`` is the epochs the budget spans (the last one partial)."""
    clock = common_clock(abnn, pgdat)
    steps, epochs = pgdat["cost"]["steps"], pgdat["epochs"]
    per_step = pgdat[clock] / steps
    budget = matched_steps(abnn[clock], pgdat[clock], steps)
    return {"clock": CLOCKS[clock], "clock_key": clock, "abnn_seconds": abnn[clock], "pgd_at_seconds": pgdat[clock],
            "pgd_at_epochs": epochs, "pgd_at_steps": steps, "pgd_at_seconds_per_step": per_step,
            "matched_steps": budget, "matched_epochs": math.ceil(budget * epochs / steps),
            "predicted_seconds": budget * per_step, "tolerance": MATCH_TOLERANCE}


def _job_matched(run: Path, base: TrainConfig, abnn_run: Path, pgdat_run: Path, force: bool,
                 progress: bool | str) -> dict:
    from ..runs import read_json

    m = matching(read_json(abnn_run / "train_results.json"), read_json(pgdat_run / "train_results.json"))
    cfg = dataclasses.replace(base, epochs=m["matched_epochs"], total_steps=m["matched_steps"])
    return job_train(run, cfg, force, progress)


def matched_stage(by: dict[str, TrainPoint], done: dict, force: bool) -> list[Stage]:
    """The cost-matched PGD-AT's training stage (none when it finished earlier): its step budget
    is fixed only once ABNN and PGD-AT have trained (:func:`_job_matched`)."""
    matched = by["pgd-at-matched"]
    if not force and matched.is_finished():
        return []
    return [Stage("pgd-at-matched", _job_matched, (matched.run, matched.cfg, by["abnn"].run, by["pgd-at"].run, force),
                  after=tuple(n for n in ("abnn", "pgd-at") if n not in done), weight=2.0)]


def frontier_points(preset: Table1Preset, out: Path, table1_dir: Path | None, data_root: str | None,
                    device: str) -> list[TrainPoint]:
    """The training stages: the substitute and the five models (the matched one's step budget
    is fixed only once ABNN and PGD-AT have trained; see :func:`_job_matched`)."""
    shared = [table1_dir] if table1_dir is not None else []

    def cfg_for(method: str, substitute: str | None) -> TrainConfig:
        cfg = preset.method_config("pgd-at" if method == "pgd-at-matched" else method, substitute)
        cfg.data_root, cfg.device = data_root, device  # Fast-AT's robust_val_size and keep_best: the preset's
        return cfg

    sub_cfg = preset.substitute_config()
    sub_cfg.data_root, sub_cfg.device = data_root, device
    sub = TrainPoint("substitute", place("substitute", sub_cfg, out, shared), sub_cfg)
    points = [sub]
    for m in FRONTIER:
        cfg = cfg_for(m, str(sub.run) if m == "abnn" else None)
        after = ("substitute",) if m == "abnn" else ()
        points.append(TrainPoint(m, place(m, cfg, out, shared, folder=m), cfg, after))
    return points


def run_frontier(preset: Table1Preset, out: str | Path, *, table1_dir: str | Path | None = None,
                 data_root: str | None = None, device: str = "cpu", force: bool = False, progress: bool = True,
                 command: str = "", jobs: int | None = None, threads: int | None = None) -> dict:
    """Train (or reuse) and evaluate the five frontier models; write report.md, results.json,
    frontier.png and fast_at_epochs.png into ``out``."""
    from ..reports.studies import write_frontier_report
    from ..runs import read_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    table1 = Path(table1_dir) if table1_dir is not None else None
    points = frontier_points(preset, out, table1, data_root, device)
    by = {p.name: p for p in points}
    matched = by["pgd-at-matched"]
    if matched.is_finished() and not force:  # its step budget was fixed when it trained
        matched.cfg = TrainConfig.load(matched.run / "config.json")
    models = [by[m] for m in FRONTIER]
    spec = study_eval(preset)
    stages, done = train_and_eval_stages([p for p in points if p is not matched], models, spec, data_root, device,
                                         force=force)
    to_train = matched_stage(by, done, force)
    stages += to_train
    if not to_train:
        done["pgd-at-matched"] = read_json(matched.run / "train_results.json")
    results, workers, per_stage = schedule("frontier", stages, done, jobs=jobs, threads=threads, progress=progress)
    matched.cfg = TrainConfig.load(matched.run / "config.json")

    records = [frontier_record(p, results[p.name], eval_of(p, models, results), p.run) for p in models]
    summary = {
        "preset": preset.to_dict(), "records": records, "evaluation": spec.key(),
        "substitute": {"run": str(by["substitute"].run), **_substitute_info(results["substitute"])},
        "matched": (m := matching(results["abnn"], results["pgd-at"]))
                   | {"epochs_trained": matched.cfg.epochs, "steps_trained": results["pgd-at-matched"]["cost"]["steps"],
                      "matched_seconds": results["pgd-at-matched"].get(m["clock_key"])},
        "command": command, "versions": software_versions(), "workers": workers, "threads_per_stage": per_stage,
        "pipeline_seconds_this_call": time.perf_counter() - t_start,
    }
    write_json_atomic(out / "results.json", summary)
    write_frontier_report(out, summary)
    log(f"report written to {out / 'report.md'}")
    return summary


def _substitute_info(tr: dict) -> dict:
    return {"dataset": tr.get("dataset"), "arch": tr.get("arch"), "width": tr.get("width"), "epochs": tr.get("epochs"),
            "val_acc": tr.get("final_val_acc"), "val_size": tr.get("val_size"), "train_seconds": tr.get("train_seconds")}


def frontier_record(point: TrainPoint, tr: dict, ev: EvalResult, run: Path) -> dict:
    """One method's record: settings, counted and measured cost, clean / PGD-5 / worst case."""
    cost = tr["cost"]
    rec = {
        "method": point.name, "name": NAMES.get(point.name, point.name), "run": str(run),
        "train_method": point.cfg.method, "epochs": point.cfg.epochs, "width": point.cfg.width,
        "train_size": tr["train_size"], "batch_size": point.cfg.batch_size, "seed": point.cfg.seed,
        "cost_N_per_step": tr["cost_N_per_step"], "cost_counts": cost["per_network"], "steps": cost["steps"],
        "total_cost_N": cost["total_N"], "train_seconds": tr["train_seconds"],
        "train_cpu_seconds": tr.get("train_cpu_seconds"), "seconds_per_step": tr["seconds_per_step"],
        "steps_per_epoch": tr.get("steps_per_epoch"), **{k: tr.get(k) for k in VALIDATION_CLOCKS},
        "threads": tr.get("threads"), "amp": tr.get("amp", "off"),
        "clean_acc": ev.clean_acc, "robust_acc": ev.robust_acc, "worst_case_acc": ev.worst_case().robust_acc,
        "n_eval": ev.n_eval, "eval_seconds": ev.seconds,
    }
    for key in ("robust_val", "best_robust_epoch", "best_val_pgd_acc", "final_val_pgd_acc",
                "catastrophic_overfitting_epochs", "model_pt_epoch", "substitute"):
        if key in tr:
            rec[key] = tr[key]
    return rec
