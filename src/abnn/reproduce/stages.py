"""Stages shared by the study pipelines (``frontier``, ``substitute-study``).

A study is a set of training stages (run folders) and evaluation stages (files in those run
folders), scheduled by :func:`~abnn.reproduce.schedule.run_stages`.  A training stage whose
finished run already exists elsewhere with the same settings (the Table 1 reproduction of the
same preset) is reused in place, never copied; everything else lives under the study's folder.
Every point is evaluated the same way: the paper's PGD-5 and a strong white-box worst case, per
sample, on the same first ``n_eval`` test images, with the one evaluation runner.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import TrainConfig, run_identity, write_json_atomic
from ..data import load_dataset
from ..runs import load_run, read_json, recorded_differences, run_lock
from .schedule import Stage
from .table1 import _finished_train, _job_train, _log, _weight

#: file, in a run folder, of the study evaluation (PGD-5 + strong white-box worst case)
EVAL_FILE = "eval_strong.json"
#: seconds an evaluation stage waits for a run folder that another study's stage is writing
STUDY_LOCK_WAIT = 6 * 3600.0


@dataclass(frozen=True)
class StudyEval:
    """How every point of a study is evaluated: registry attack specs (the paper's PGD-5 first,
    then the strong white-box attacks of the worst case), on the first ``n_eval`` test images."""

    attacks: tuple[str, ...]
    n_eval: int
    batch_size: int
    seed: int

    def key(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class TrainPoint:
    """One trained model of a study: its label, run folder and settings."""

    name: str
    run: Path
    cfg: TrainConfig
    after: tuple[str, ...] = ()

    def is_finished(self) -> bool:
        return (self.run / "model.pt").is_file() and (self.run / "train_results.json").is_file()


def place(name: str, cfg: TrainConfig, home: Path, shared: Sequence[Path] = (), *,
          folder: str | None = None) -> Path:
    """Where a training stage lives: a finished run with the same settings in one of the
    ``shared`` folders (under ``folder``, default ``name``), else ``home / name``."""
    for d in shared:
        run = Path(d) / (folder or name)
        if (run / "model.pt").is_file() and (run / "config.json").is_file() and not recorded_differences(run, cfg):
            return run
    return home / name


def train_stages(points: Sequence[TrainPoint], *, force: bool) -> tuple[list[Stage], dict[str, dict]]:
    """Stages for the points still to train, and the results of those finished earlier."""
    stages, done = [], {}
    for p in points:
        finished = None if force else _finished_train(p.run, p.cfg)
        if finished is not None:
            done[p.name] = finished
        else:
            stages.append(Stage(p.name, _job_train, (p.run, p.cfg, force), after=p.after, weight=_weight(p.cfg)))
    return stages, done


def finished_eval(run: Path, spec: StudyEval) -> dict | None:
    path = run / EVAL_FILE
    if path.is_file():
        res = read_json(path)
        if res.get("spec") == spec.key():
            _log(f"{run.name}: study evaluation finished earlier, reused")
            return res
    return None


def job_eval(run: Path, spec: StudyEval, data_root: str | None, device: str, force: bool, progress: bool) -> dict:
    """Clean accuracy, each attack's robust accuracy and the per-sample worst case of a finished
    run, written to ``RUN/eval_strong.json`` (resumable: the runner keeps finished attacks)."""
    from ..evaluation import run_attacks

    done = None if force else finished_eval(run, spec)
    if done is not None:
        return done
    with run_lock(run, wait=STUDY_LOCK_WAIT):  # one writer per run folder
        model, cfg = load_run(run, device=device)
        data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root, frames=cfg.frames).subset(spec.n_eval)
        _log(f"{run.name}: evaluating {', '.join(spec.attacks)} on {len(data)} test images")
        t0 = time.perf_counter()
        res = run_attacks(model, data, list(spec.attacks), batch_size=spec.batch_size, device=device, seed=spec.seed,
                          progress=progress, progress_dir=run / "eval_strong-progress", identity=run_identity(cfg))
        out = {"spec": spec.key(), "n_eval": len(data), "clean_acc": res.clean_acc,
               "robust_acc": {name: a.robust_acc for name, a in res.attacks.items()},
               "worst_case_acc": res.worst_case().robust_acc, "seconds": time.perf_counter() - t0,
               "result": res.to_dict()}
        write_json_atomic(run / EVAL_FILE, out)
        return out


def eval_stages(points: Sequence[TrainPoint], spec: StudyEval, data_root: str | None, device: str, *,
                force: bool) -> tuple[list[Stage], dict[str, dict]]:
    """One evaluation stage per distinct run folder (a run shared by two points is evaluated once)."""
    stages, done, seen = [], {}, set()
    for p in points:
        if p.run in seen:
            continue
        seen.add(p.run)
        finished = None if force or not p.is_finished() else finished_eval(p.run, spec)
        if finished is not None:
            done[f"eval:{p.name}"] = finished
        else:
            stages.append(Stage(f"eval:{p.name}", job_eval, (p.run, spec, data_root, device, force),
                                after=(p.name,), weight=0.5))
    return stages, done


def eval_of(point: TrainPoint, points: Sequence[TrainPoint], results: dict) -> dict:
    """The evaluation of a point (made under the name of the first point with the same run)."""
    first = next(q for q in points if q.run == point.run)
    return results[f"eval:{first.name}"]


def with_progress(stages: list[Stage], workers: int, progress: bool) -> None:
    """Append each stage's progress argument: bars when one stage runs at a time, else epoch lines."""
    for s in stages:
        s.args = (*s.args, progress if workers == 1 else ("lines" if progress and s.fn is _job_train else False))
