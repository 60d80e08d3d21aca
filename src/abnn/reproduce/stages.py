"""The stages every reproduce pipeline is made of: training points, evaluations, the schedule.

A pipeline declares its trained models as :class:`TrainPoint` (a label, a run folder, the
settings); :func:`train_stages` turns them into training stages (reusing finished runs, resuming
interrupted ones) and :func:`eval_stages` into one evaluation stage per run folder, under an
evaluation spec: :class:`TableEval` (the paper's clean / PGD / ROA, ``eval_table.json``, Tables
1-3) or :class:`StudyEval` (PGD-5 and a strong white-box worst case, ``eval_strong.json``, the
studies).  :func:`schedule` runs them with :func:`~abnn.reproduce.schedule.run_stages`.

A training stage whose finished run already exists elsewhere with the same settings (the Table 1
reproduction of the same preset) is reused in place, never copied (:func:`place`).  A finished
stage whose settings differ from the preset's is never silently reused: it is an error that says so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

from tqdm.auto import tqdm

from ..config import TrainConfig, run_identity, write_json_atomic
from ..data import load_dataset
from ..evaluation.results import EvalResult, read_evaluation
from ..runs import LOCK_NAME, check_same_run, load_run, read_json, recorded_differences, run_lock
from ..training.methods import get_method
from .schedule import Stage, plan_workers, run_stages

#: file, in a run folder, of the study evaluation (PGD-5 + strong white-box worst case)
EVAL_FILE = "eval_strong.json"
#: file, in a run folder, of the table evaluation (clean, the paper's PGD and ROA)
TABLE_EVAL_FILE = "eval_table.json"
#: seconds a training stage waits for a run folder that another pipeline is training
STAGE_LOCK_WAIT = 12 * 3600.0
#: seconds an evaluation stage waits for a run folder that another study's stage is writing
STUDY_LOCK_WAIT = 6 * 3600.0


def log(msg: str) -> None:
    """One line of a reproduce pipeline's log (above any progress bar)."""
    tqdm.write(f"[reproduce] {msg}")


# -- training ----------------------------------------------------------------------------------

def _check_same(run: Path, cfg: TrainConfig) -> None:
    """A stage is reused or resumed only if it was recorded with the preset's defining settings."""
    check_same_run(run, cfg, fix="the preset wants the new values: rerun with --fresh to redo it, or choose another --out")


def finished_train(run: Path, cfg: TrainConfig) -> dict | None:
    """A finished training stage's results when its settings match, else None."""
    if (run / "model.pt").is_file() and (run / "train_results.json").is_file():
        _check_same(run, cfg)
        log(f"{run.name}: finished earlier, reused")
        return read_json(run / "train_results.json")
    return None


def job_train(run: Path, cfg: TrainConfig, force: bool, progress: bool | str) -> dict:
    """The training stage: train a run folder, or reuse it when finished with the same settings.
    A run that another process is training (another study's pipeline) is waited for, then reused."""
    from ..training import train

    if force and run.exists():
        shutil.rmtree(run)
    if (run / LOCK_NAME).is_file():
        log(f"{run.name}: a lock is on it; if another process is training it, waiting for that to finish")
    with run_lock(run, wait=STAGE_LOCK_WAIT):
        done = finished_train(run, cfg)
        if done is not None:
            return done
        resume = (run / "checkpoint.pt").is_file()
        if resume:
            _check_same(run, cfg)
        log(f"{run.name}: {'resuming' if resume else 'training'} ({cfg.method}, width {cfg.width}, "
            f"{cfg.epochs} epochs)")
        return train(cfg, run, resume=resume, progress=progress).to_dict()


def stage_weight(cfg: TrainConfig) -> float:
    """A rough size of a training stage, only to start the longest chains first: the method's
    expected passes per step (the method registry's cost) times epochs, images and width."""
    images = 50_000 if cfg.full_cifar10 else (cfg.train_size or 20_000)
    return cfg.epochs * get_method(cfg.method).cost(cfg) * images * cfg.width


@dataclass
class TrainPoint:
    """One trained model of a pipeline: its label (the stage name), run folder and settings, and
    the stages it waits for (its substitute's training)."""

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
        finished = None if force else finished_train(p.run, p.cfg)
        if finished is not None:
            done[p.name] = finished
        else:
            stages.append(Stage(p.name, job_train, (p.run, p.cfg, force), after=p.after, weight=stage_weight(p.cfg)))
    return stages, done


# -- evaluation --------------------------------------------------------------------------------

class EvalSpec(Protocol):
    """How a pipeline evaluates a finished run folder: its cached result (None: to do), the
    evaluation itself (writes its record into the run folder), and how long to wait for the lock."""

    lock_wait: ClassVar[float]

    def finished(self, run: Path) -> EvalResult | None: ...

    def evaluate(self, run: Path, data_root: str | None, device: str, progress: bool) -> EvalResult: ...


def eval_data(dataset: str, data_root: str | None, n: int | None, frames: int | None = None):
    """The first ``n`` test samples of ``dataset`` (clips with ``frames`` frames; None: the dataset's)."""
    return load_dataset(dataset, "test", data_root, frames=frames).subset(n)


def cached_evaluation(path: Path, key: dict, what: str = "evaluation") -> EvalResult | None:
    """The evaluation record at ``path`` when it was made with the settings ``key`` (any
    version of the record format), else None."""
    if not path.is_file():
        return None
    try:
        ev = read_evaluation(path)
    except (KeyError, ValueError):  # another format under this name: made again
        return None
    if ev.spec != key:
        return None
    log(f"{path.parent.name}: {what} finished earlier, reused")
    return ev


def record_evaluation(path: Path, ev: EvalResult, key: dict) -> EvalResult:
    """Write ``ev`` with its reuse key ``key`` as the evaluation record at ``path``."""
    ev = dataclasses.replace(ev, spec=key)
    write_json_atomic(path, ev.to_dict())
    return ev


class _RecordedEval:
    """An evaluation spec whose result is one evaluation record, ``RUN/<file>``, reused when
    made with the same :meth:`key`."""

    file: ClassVar[str]
    what: ClassVar[str]
    lock_wait: ClassVar[float]

    def key(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def finished(self, run: Path) -> EvalResult | None:
        return cached_evaluation(run / self.file, self.key(), self.what)

    def evaluate(self, run: Path, data_root: str | None, device: str, progress: bool) -> EvalResult:
        return record_evaluation(run / self.file, self.attack(run, data_root, device, progress), self.key())

    def attack(self, run: Path, data_root: str | None, device: str, progress: bool) -> EvalResult:
        raise NotImplementedError


@dataclass(frozen=True)
class TableEval(_RecordedEval):
    """The paper's evaluation of Tables 1-3: clean accuracy and the preset's PGD and ROA
    (``attack_options``) on the first ``n_eval`` test samples, in ``RUN/eval_table.json``."""

    dataset: str
    n_eval: int
    batch_size: int
    seed: int
    attack_options: dict
    frames: int | None = None
    file: ClassVar[str] = TABLE_EVAL_FILE
    what: ClassVar[str] = "evaluation"
    lock_wait: ClassVar[float] = 0.0

    @classmethod
    def of(cls, preset) -> "TableEval":
        """The evaluation of a :class:`~abnn.reproduce.presets.Table1Preset` or ``VideoPreset``."""
        return cls(preset.dataset, preset.n_eval, preset.eval_batch_size, preset.seed, preset.attack_options(),
                   getattr(preset, "frames", None))

    def key(self) -> dict:
        return json.loads(json.dumps({"n_eval": self.n_eval, "attack_options": self.attack_options, "seed": self.seed}))

    def attack(self, run: Path, data_root: str | None, device: str, progress: bool) -> EvalResult:
        from ..attacks import AttackSpec
        from ..evaluation import run_attacks

        opts = self.attack_options
        model, _ = load_run(run, device=device)
        data = eval_data(self.dataset, data_root, self.n_eval, self.frames)
        log(f"{run.name}: evaluating clean, {', '.join(n.upper() for n in opts)} on {len(data)} test samples")
        return run_attacks(model, data, [AttackSpec(name, o, label=name) for name, o in opts.items()], device=device,
                           batch_size=self.batch_size, seed=self.seed, progress=progress)


@dataclass(frozen=True)
class StudyEval(_RecordedEval):
    """How every point of a study is evaluated: registry attack specs (the paper's PGD-5 first,
    then the strong white-box attacks of the worst case), on the first ``n_eval`` test images,
    per sample with the one evaluation runner, in ``RUN/eval_strong.json``."""

    attacks: tuple[str, ...]
    n_eval: int
    batch_size: int
    seed: int
    file: ClassVar[str] = EVAL_FILE
    what: ClassVar[str] = "study evaluation"
    lock_wait: ClassVar[float] = STUDY_LOCK_WAIT

    def attack(self, run: Path, data_root: str | None, device: str, progress: bool) -> EvalResult:
        """Clean accuracy, each attack's robust accuracy and the per-sample worst case of a
        finished run (resumable: the runner keeps finished attacks)."""
        from ..evaluation import run_attacks

        model, cfg = load_run(run, device=device)
        data = eval_data(cfg.dataset, data_root or cfg.data_root, self.n_eval, cfg.frames)
        log(f"{run.name}: evaluating {', '.join(self.attacks)} on {len(data)} test images")
        return run_attacks(model, data, list(self.attacks), batch_size=self.batch_size, device=device, seed=self.seed,
                           progress=progress, progress_dir=run / "eval_strong-progress", identity=run_identity(cfg))


def job_eval(run: Path, spec: EvalSpec, data_root: str | None, device: str, force: bool,
             progress: bool) -> EvalResult:
    """The evaluation stage: ``spec``'s evaluation of a finished run, or its cached result."""
    done = None if force else spec.finished(run)
    if done is not None:
        return done
    with run_lock(run, wait=spec.lock_wait):  # one writer per run folder
        return spec.evaluate(run, data_root, device, progress)


def job_attribution(run: Path, n: int, batch_size: int, seed: int, data_root: str | None, device: str,
                    force: bool) -> dict:
    """The gradient attribution and path swap of an ABNN run (:func:`abnn.evaluation.attribution.
    forensics_run`, ``RUN/forensics.json``), reused when made with the same images, batches and seed."""
    from ..evaluation.attribution import forensics_run

    path = run / "forensics.json"
    if path.is_file() and not force:
        old = read_json(path)
        if (old.get("n"), old.get("seed"), old.get("batch_size", batch_size)) == (n, seed, batch_size):
            return old
    with run_lock(run, wait=STUDY_LOCK_WAIT):
        return forensics_run(run, n_eval=n, batch_size=batch_size, data_root=data_root, device=device, seed=seed)


def eval_stages(points: Sequence[TrainPoint], spec: EvalSpec, data_root: str | None, device: str, *,
                force: bool) -> tuple[list[Stage], dict[str, Any]]:
    """One evaluation stage ``eval:NAME`` per distinct run folder (a run shared by two points is
    evaluated once), and the results of those finished earlier."""
    stages, done, seen = [], {}, set()
    for p in points:
        if p.run in seen:
            continue
        seen.add(p.run)
        finished = None if force or not p.is_finished() else spec.finished(p.run)
        if finished is not None:
            done[f"eval:{p.name}"] = finished
        else:
            stages.append(Stage(f"eval:{p.name}", job_eval, (p.run, spec, data_root, device, force),
                                after=(p.name,), weight=0.5))
    return stages, done


def train_and_eval_stages(points: Sequence[TrainPoint], models: Sequence[TrainPoint], spec: EvalSpec,
                          data_root: str | None, device: str, *, force: bool) -> tuple[list[Stage], dict[str, Any]]:
    """The training stages of ``points`` and the evaluation stages of ``models`` (a subset of
    the points: substitutes are not evaluated), with the results of those finished earlier."""
    stages, done = train_stages(points, force=force)
    ev, ev_done = eval_stages(models, spec, data_root, device, force=force)
    return stages + ev, done | ev_done


def eval_of(point: TrainPoint, points: Sequence[TrainPoint], results: dict) -> EvalResult:
    """The evaluation of a point (made under the name of the first point with the same run)."""
    first = next(q for q in points if q.run == point.run)
    return results[f"eval:{first.name}"]


# -- the schedule ------------------------------------------------------------------------------

def with_progress(stages: list[Stage], workers: int, progress: bool) -> None:
    """Append each stage's progress argument: bars when one stage runs at a time, else epoch lines."""
    for s in stages:
        s.args = (*s.args, progress if workers == 1 else ("lines" if progress and s.fn is job_train else False))


def schedule(title: str, stages: list[Stage], done: dict, *, jobs: int | None, threads: int | None,
             progress: bool, quiet: tuple[str, ...] = ()) -> tuple[dict, int, int]:
    """Run ``stages`` after those finished earlier (``done``, their results) on as many workers
    as ``jobs`` and ``threads`` allow; return (every result by stage name, workers, threads per
    stage).  Stages whose names start with a prefix in ``quiet`` take no progress argument."""
    workers, per_stage = plan_workers(jobs, threads, stages)
    with_progress([s for s in stages if not s.name.startswith(quiet)], workers, progress)
    log(f"{title}: {len(stages)} stages to run, {len(done)} reused; {workers} at a time, {per_stage} thread(s) each")
    results = run_stages(stages, workers=workers, threads=per_stage, done=done,
                         on_done=lambda name, _: log(f"stage {name} done") if workers > 1 else None)
    return results, workers, per_stage
