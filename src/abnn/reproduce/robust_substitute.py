"""Can ABNN carry robustness?  A robust substitute pretrained once, against a probe and Fast-AT.

Every substitute of the substitute study was trained on clean data; ABNN's clean accuracy
followed the substitute's strength while its white-box robustness stayed at 0%.  This study
measures the one version of the idea that could work: a substitute that is itself adversarially
trained (Fast-AT, eps 8/255), pretrained once on another dataset and reused for any number of
targets, each trained on clean data at 3N.  **It breaks the paper's "no adversarial training"
premise for the substitute, on purpose.**  Rows, all on the Table 1 preset's target, data,
schedule and evaluation images:

* ``abnn``: ABNN with the clean tinyimagenet32 substitute (the Table 1 / studies model);
* ``abnn:fast-at-tiny``: ABNN with a Fast-AT tinyimagenet32 VGG-19-BN (out of domain, the
  paper's setting made robust);
* ``abnn:fast-at-cifar``: ABNN with the frontier's Fast-AT CIFAR-10 ResNet-18 tapped by stage
  names (in domain and adversarially trained: an upper bound that breaks the premise twice);
* ``probe:*``: the same frozen robust substitutes with only a small head trained on their pooled
  last feature, at the same epochs (the control: if ABNN does no better, the target adds nothing);
* ``fast-at`` and ``pgd-at``: the frontier's adversarially trained targets, for reference.

Each row gets the studies' evaluation (PGD-5 and the APGD-CE / APGD-T worst case), each ABNN row
the gradient attribution and path swap of the forensics study, the counted cost of its target, its substitute's one-time cost, and the cost amortised over k targets; rows
whose worst case exceeds 5% are also attacked with the authors' AutoAttack on the first 200
test images, with both per-sample robust index lists written beside each other.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig, write_json_atomic
from ..evaluation.results import EvalResult, read_evaluation
from ..models import RESNET18_STAGES
from ..training.loop import clean_val_size, software_versions
from .frontier import common_clock, frontier_points, study_eval
from .presets import Table1Preset
from .schedule import Stage
from .stages import (STUDY_LOCK_WAIT, TrainPoint, cached_evaluation, eval_of, job_attribution, log, place,
                     record_evaluation, schedule, train_and_eval_stages)

#: a row is attacked with the authors' AutoAttack when its worst case exceeds this
AUTOATTACK_ABOVE = 0.05
#: the number of targets a substitute's one-time cost is shared by
AMORTISE_OVER = (1, 5, 20)
AUTOATTACK_FILE = "autoattack_official.json"


@dataclass(frozen=True)
class Row:
    """One row of the study: a trained point and the point of its substitute (if any)."""

    name: str
    label: str
    substitute: str | None = None       # the point whose training is this row's one-time substitute cost
    robust_substitute: bool = False
    in_domain: bool = False


ROWS = (
    Row("abnn", "ABNN, clean tinyimagenet32 substitute (Table 1)", "substitute"),
    Row("abnn:fast-at-tiny", "ABNN, Fast-AT tinyimagenet32 substitute", "sub:fast-at-tiny", True),
    Row("abnn:fast-at-cifar", "ABNN, Fast-AT CIFAR-10 ResNet-18 substitute (in-domain upper bound)", "fast-at",
        True, True),
    Row("probe:fast-at-tiny", "probe on the Fast-AT tinyimagenet32 substitute", "sub:fast-at-tiny", True),
    Row("probe:fast-at-cifar", "probe on the Fast-AT CIFAR-10 ResNet-18 (in domain)", "fast-at", True, True),
    Row("fast-at", "Fast-AT target (frontier)"),
    Row("pgd-at", "PGD-AT target (frontier)"),
)


def robust_substitute_config(preset: Table1Preset, data_root: str | None, device: str) -> TrainConfig:
    """The Fast-AT tinyimagenet32 substitute: the clean substitute's settings with Fast-AT at
    eps 8/255, per-epoch PGD-5 on the last ``robust_val_size`` validation images (left out of
    its clean validation), the best-robust epoch kept."""
    cfg = dataclasses.replace(preset.substitute_config(), method="fast-at", robust_val_size=preset.robust_val_size,
                              keep_best=True, data_root=data_root, device=device)
    cfg.val_size = clean_val_size(cfg)
    return cfg


def _on_substitute(preset: Table1Preset, method: str, sub: TrainPoint, *, in_domain: bool,
                   data_root: str | None, device: str) -> TrainConfig:
    cfg = preset.method_config(method, str(sub.run))
    cfg.data_root, cfg.device = data_root, device
    if in_domain:  # a CIFAR-10 ResNet-18 run, tapped after the same stages the target pairs
        cfg.substitute_taps, cfg.in_domain_substitute = list(RESNET18_STAGES), True
    return cfg


def robust_points(preset: Table1Preset, out: Path, studies_dir: Path | None, data_root: str | None,
                  device: str) -> list[TrainPoint]:
    """Every training point: the frontier's (reused from ``studies_dir/frontier`` when finished
    there with the same settings) and the study's own."""
    home = studies_dir / "frontier" if studies_dir is not None else out / "frontier"
    by = {p.name: p for p in frontier_points(preset, home, None, data_root, device)}
    points = [by[n] for n in ("substitute", "abnn", "fast-at", "pgd-at")]
    sub_cfg = robust_substitute_config(preset, data_root, device)
    tiny = TrainPoint("sub:fast-at-tiny", place("tinyimagenet32-fast-at", sub_cfg, out / "substitutes"), sub_cfg)
    points.append(tiny)
    for method in ("abnn", "probe"):
        for sub, in_domain in ((tiny, False), (by["fast-at"], True)):
            name = f"{method}:fast-at-{'cifar' if in_domain else 'tiny'}"
            cfg = _on_substitute(preset, method, sub, in_domain=in_domain, data_root=data_root, device=device)
            points.append(TrainPoint(name, out / name.replace(":", "-"), cfg, (sub.name,)))
    return points


def autoattack_check(theirs: EvalResult, ours: EvalResult) -> dict:
    """AutoAttack's robust accuracy on its first ``n`` images beside our worst case on the same
    images, with the indices of the images each leaves robust."""
    aa = theirs.attacks["autoattack-official"]
    mine = ours.worst_case().robust_mask[:theirs.n_eval]
    out = {"key": theirs.spec, "n": theirs.n_eval, "autoattack_acc": aa.robust_acc,
           "ours_acc": mine.float().mean().item(), "autoattack_robust_indices": aa.robust_mask.nonzero().flatten().tolist(),
           "ours_robust_indices": mine.nonzero().flatten().tolist(), "seconds": aa.seconds}
    return out | {"agree_sample_by_sample": out["autoattack_robust_indices"] == out["ours_robust_indices"]}


def job_autoattack(run: Path, ours: EvalResult, n: int, batch_size: int, data_root: str | None, device: str,
                   force: bool) -> dict:
    """The authors' AutoAttack (standard version) on the first ``n`` test images when the
    row's worst case (``ours``) exceeds :data:`AUTOATTACK_ABOVE`, as an evaluation record
    (``RUN/autoattack_official.json``), compared image by image with ours."""
    from ..data import load_dataset
    from ..evaluation import run_attacks
    from ..runs import load_run, read_json, run_lock

    path, worst = run / AUTOATTACK_FILE, ours.worst_case().robust_acc
    key = {"n": n, "seed": ours.spec["seed"], "batch_size": batch_size}
    if n == 0:
        return {"skipped": "this preset runs no AutoAttack (autoattack_n = 0)"}
    if worst <= AUTOATTACK_ABOVE + 1e-6:  # accuracies are float32 fractions: 50/1000 is not above 5%
        return {"skipped": f"worst case {100 * worst:.1f}% <= {100 * AUTOATTACK_ABOVE:g}%"}
    if not force and path.is_file() and "autoattack_robust_indices" in (old := read_json(path)) and old["key"] == key:
        return old  # written before the one record format: the comparison itself
    done = None if force else cached_evaluation(path, key, "AutoAttack")
    if done is not None:
        return autoattack_check(done, ours)
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        return {"skipped": "the authors' AutoAttack is not installed (pip install -e '.[autoattack]')"}
    with run_lock(run, wait=STUDY_LOCK_WAIT):
        model, cfg = load_run(run, device=device)
        data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root).subset(n)
        res = run_attacks(model, data, ["autoattack-official"], batch_size=batch_size, device=device, seed=key["seed"],
                          progress=False)
        return autoattack_check(record_evaluation(path, res, key), ours)


def _aa_stages(models: list[TrainPoint], st, data_root, device, force) -> list[Stage]:
    """One AutoAttack stage per row; it reads the row's evaluation to decide whether to run."""
    return [Stage(f"aa:{p.name}", _job_autoattack_after_eval,
                  (p.run, st.autoattack_n, st.eval_batch_size, data_root, device, force),
                  after=(f"eval:{p.name}",), weight=0.5) for p in models]


def _job_autoattack_after_eval(run: Path, n: int, batch_size: int, data_root, device, force) -> dict:
    from .stages import EVAL_FILE

    return job_autoattack(run, read_evaluation(run / EVAL_FILE), n, batch_size, data_root, device, force)


def run_robust_substitute(preset: Table1Preset, out: str | Path, *, studies_dir: str | Path | None = None,
                          data_root: str | None = None, device: str = "cpu", force: bool = False,
                          progress: bool = True, command: str = "", jobs: int | None = None,
                          threads: int | None = None) -> dict:
    """Train (or reuse) and evaluate every row; write report.md, results.json and
    robust_substitute.png into ``out``."""
    from ..reports.robust_substitute import write_robust_substitute_report
    from .frontier import study_settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    points = robust_points(preset, out, Path(studies_dir) if studies_dir else None, data_root, device)
    by = {p.name: p for p in points}
    models = [by[r.name] for r in ROWS]
    spec, st = study_eval(preset), study_settings(preset)
    stages, done = train_and_eval_stages(points, models, spec, data_root, device, force=force)
    stages += _aa_stages(models, st, data_root, device, force)
    stages += [Stage(f"attr:{p.name}", job_attribution,
                     (p.run, spec.n_eval, spec.batch_size, spec.seed, data_root, device, force),
                     after=(f"eval:{p.name}",), weight=0.3) for p in models if p.cfg.method == "abnn"]
    results, workers, per_stage = schedule("robust substitute", stages, done, jobs=jobs, threads=threads,
                                           progress=progress, quiet=("aa:", "attr:"))
    records = [row_record(r, by, models, results) for r in ROWS]
    summary = {"preset": preset.to_dict(), "records": records, "evaluation": spec.key(),
               "clock": common_clock(*(results[p.name] for p in points)), "amortise_over": list(AMORTISE_OVER),
               "autoattack_above": AUTOATTACK_ABOVE, "autoattack_n": st.autoattack_n,
               "command": command, "versions": software_versions(), "workers": workers,
               "threads_per_stage": per_stage, "pipeline_seconds_this_call": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", summary)
    write_robust_substitute_report(out, summary)
    log(f"report written to {out / 'report.md'}")
    return summary


def _cost(tr: dict) -> dict:
    return {"steps": tr["cost"]["steps"], "N_per_step": tr["cost_N_per_step"], "total_N": tr["cost"]["total_N"],
            "train_seconds": tr["train_seconds"], "train_cpu_seconds": tr.get("train_cpu_seconds"),
            "threads": tr.get("threads"), "amp": tr.get("amp", "off"), "epochs": tr.get("epochs"),
            "final_val_acc": tr.get("final_val_acc"), "best_val_pgd_acc": tr.get("best_val_pgd_acc"),
            "robust_validation_seconds": tr.get("robust_validation_seconds")}


def row_record(row: Row, by: dict[str, TrainPoint], models: list[TrainPoint], results: dict) -> dict:
    """One row: accuracies, the AutoAttack check, the target's cost, the substitute's one-time
    cost and the amortised cost (target + substitute / k) by each clock and in counted N."""
    p = by[row.name]
    ev, aa = eval_of(p, models, results), results.get(f"aa:{row.name}", {})
    attr = results.get(f"attr:{row.name}")
    target = _cost(results[p.name])
    sub = _cost(results[row.substitute]) if row.substitute else None
    amortised = {}
    for key in ("total_N", "train_seconds", "train_cpu_seconds"):
        if target[key] is None or (sub is not None and sub[key] is None):
            continue
        amortised[key] = {str(k): target[key] + (sub[key] / k if sub else 0.0) for k in AMORTISE_OVER}
    return {"name": row.name, "label": row.label, "run": str(p.run), "method": p.cfg.method,
            "robust_substitute": row.robust_substitute, "in_domain": row.in_domain,
            "substitute_run": str(by[row.substitute].run) if row.substitute else None,
            "clean_acc": ev.clean_acc, "robust_acc": ev.robust_acc, "worst_case_acc": ev.worst_case().robust_acc,
            "n_eval": ev.n_eval, "autoattack": aa, "target_cost": target, "substitute_cost": sub,
            "attribution_median": attr["attribution_median"] if attr else None,
            "path_swap": attr["path_swap"] if attr else None,
            "amortised": amortised}
