"""The suites: lists of registry attacks with their budgets, and the checklist that runs them.

``run_suite`` runs the checklist of Carlini et al. (2019, "On evaluating adversarial robustness"),
Athalye, Carlini & Wagner (ICML 2018) and Croce et al. (ICML 2022, "Evaluating the adversarial
robustness of adaptive test-time defenses") on a model and a test set, through the one runner:

* attacks: the paper's PGD-5; PGD with many steps and restarts; the AutoAttack-style ensemble,
  run as :class:`~abnn.attacks.AutoAttack` runs it (APGD-CE, then APGD-T, APGD-DLR in FAB-T's
  place and Square with the reference schedule, each on the samples still robust after the ones
  before it): the row ``autoattack`` is the ensemble's number, the rows ``autoattack/NAME`` the
  robust accuracy after each component; for ABNN models the statistics attack and the transfer
  from the ABNN target with plain BatchNorm; transfers from any given source models;
* an eps sweep and a steps sweep of PGD, whose points are rows too (a point at the evaluated eps
  counts in the worst case);
* the checks of :mod:`abnn.evaluation.checks`, and the verdict: PASS, or SUSPECT with flags.

``SUITES["autoattack"]`` is a plain list: the authors' AutoAttack, no checklist.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import AttackSpec, default_eps, parse_spec
from ..data import load_dataset
from ..config import run_identity
from ..errors import AbnnError
from ..files import ensure_writable
from ..framework import ABNN
from ..runs import load_run, training_cut_short
from . import checks
from .report import write_suite_report
from .results import Curve, EvalResult, SuiteResult
from .runner import PROGRESS_FILE, as_tensors, predict, run_attacks, to_float

__all__ = ["BUDGETS", "SUITES", "pgd_alpha", "resolve_budget", "run_suite", "run_suite_on_run", "suite_specs"]

#: Attack budgets of the checklist.  ``full`` follows the literature (PGD-100 x 5 restarts, APGD
#: 100 steps, Square 5000 queries); ``quick`` scales everything down so that CPU runs finish.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        "pgd_steps": 100, "pgd_restarts": 5, "apgd_steps": 100, "apgd_targets": 9, "square_queries": 5000,
        "stats_steps": 100, "stats_weights": (0.01, 0.1, 1.0, 10.0), "transfer_steps": 100,
        "sweep_steps": 50, "steps_grid": (5, 10, 20, 50, 100), "eps_grid_255": (0, 2, 4, 8, 16, 32, 64),
        "mixed_k": (1, 4, 16), "mixed_steps": 50, "bs1_steps": 100,
    },
    "quick": {
        "pgd_steps": 20, "pgd_restarts": 2, "apgd_steps": 20, "apgd_targets": 3, "square_queries": 300,
        "stats_steps": 20, "stats_weights": (0.1, 1.0), "transfer_steps": 20,
        "sweep_steps": 10, "steps_grid": (5, 10, 20), "eps_grid_255": (0, 2, 4, 8, 16, 32, 64),
        "mixed_k": (1, 4), "mixed_steps": 10, "bs1_steps": 20,
    },
}

#: suites that are plain lists of attacks (no checklist)
SUITES: dict[str, tuple[str, ...]] = {"autoattack": ("autoattack-official",)}


def pgd_alpha(eps: float, steps: int) -> float:
    """Step size for PGD with ``steps`` iterations: ``2.5 * eps / steps`` (Madry et al. 2018),
    at least ``eps / 10`` and at most ``eps / 4`` (the paper's 2/255 at 8/255)."""
    return min(eps / 4, max(eps / 10, 2.5 * eps / max(steps, 1)))


def resolve_budget(budget: str | Mapping[str, Any] | None, quick: bool = False) -> tuple[str, dict[str, Any]]:
    """``(name, settings)`` of a budget name or of a dict of overrides on top of quick/full."""
    if budget is None:
        budget = "quick" if quick else "full"
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise AbnnError(f"unknown budget {budget!r}; choose from {sorted(BUDGETS)} or pass a dict of overrides")
        return budget, dict(BUDGETS[budget])
    base = "quick" if quick else "full"
    bad = set(budget) - set(BUDGETS[base])
    if bad:
        raise AbnnError(f"unknown budget keys {sorted(bad)}; known: {sorted(BUDGETS[base])}")
    return f"{base}+custom", {**BUDGETS[base], **budget}


def autoattack_options(budget: dict[str, Any], eps: float, num_classes: int) -> dict[str, Any]:
    """The options of the suite's ``autoattack`` (the registry's :class:`~abnn.attacks.AutoAttack`)."""
    return {"eps": eps, "steps": budget["apgd_steps"], "queries": budget["square_queries"],
            "n_target_classes": min(budget["apgd_targets"], max(num_classes - 1, 1))}


def suite_specs(budget: dict[str, Any], *, eps: float, num_classes: int, is_abnn: bool,
                sources: list[str]) -> list[AttackSpec]:
    """The checklist's attacks, sweeps included, as registry specs."""
    S, R = budget["pgd_steps"], budget["pgd_restarts"]
    specs = [AttackSpec("pgd", {"eps": eps, "alpha": eps / 4, "steps": 5}, label="pgd-5"),
             AttackSpec("pgd", {"eps": eps, "alpha": pgd_alpha(eps, S), "steps": S, "restarts": R}, label=f"pgd-{S}x{R}")]
    specs.append(AttackSpec("autoattack", autoattack_options(budget, eps, num_classes), label="autoattack"))
    if is_abnn:
        T = budget["stats_steps"]
        specs += [AttackSpec("stats", {"eps": eps, "alpha": pgd_alpha(eps, T), "steps": T, "weight": w},
                             label=f"stats-w{w:g}") for w in budget["stats_weights"]]
    Tt = budget["transfer_steps"]
    transfer = {"eps": eps, "alpha": pgd_alpha(eps, Tt), "steps": Tt}
    if is_abnn:
        specs.append(AttackSpec("transfer-bn", transfer, label="transfer-abnn-target-bn"))
    specs += [AttackSpec("transfer", {**transfer, "source": name}, label=f"transfer-{name}") for name in sources]
    Ss = budget["sweep_steps"]
    for e in _eps_grid(budget, eps):
        if e:
            specs.append(AttackSpec("pgd", {"eps": e / 255, "alpha": pgd_alpha(e / 255, Ss), "steps": Ss},
                                    label=f"eps-{e:g}", group="eps-sweep"))
    # the steps sweep shares pgd-5's random start: with first-fooling iterates, more steps can
    # then only break more samples, for any model that is deterministic and batch-independent
    specs += [AttackSpec("pgd", {"eps": eps, "alpha": eps / 4, "steps": s}, label=f"steps-{s}", group="steps-sweep",
                         seed_key="pgd-5") for s in budget["steps_grid"] if s != 5]
    return specs


def _eps_grid(budget: dict[str, Any], eps: float) -> list[float]:
    grid = sorted(set(budget["eps_grid_255"]) | {round(eps * 255, 6)})
    return [int(e) if float(e).is_integer() else e for e in grid]


def _curves(ev: EvalResult, budget: dict[str, Any], eps: float) -> tuple[Curve, Curve]:
    grid = _eps_grid(budget, eps)
    eps_acc = [ev.clean_acc if e == 0 else ev.attacks[f"eps-{e:g}"].robust_acc for e in grid]
    steps = list(budget["steps_grid"])
    steps_acc = [ev.attacks["pgd-5" if s == 5 else f"steps-{s}"].robust_acc for s in steps]
    return (Curve(grid, eps_acc, {"steps": budget["sweep_steps"], "alpha": "min(eps/4, max(eps/10, 2.5 eps/steps))",
                                  "attack": "PGD, random start"}),
            Curve(steps, steps_acc, {"eps_255": eps * 255, "alpha_255": eps / 4 * 255,
                                     "attack": "PGD, random start, the random start of pgd-5"}))


def run_suite(model: nn.Module, data: Any, *, eps: float | None = None, n_eval: int | None = None,
              batch_size: int = 128, device: torch.device | str = "cpu", seed: int = 0,
              out_dir: str | os.PathLike | None = None, quick: bool = False,
              budget: str | Mapping[str, Any] | None = None, source_models: Mapping[str, nn.Module] | None = None,
              extra_attacks: Sequence[str | AttackSpec] = (), progress: bool = True,
              progress_dir: str | os.PathLike | None = None, metadata: Mapping[str, Any] | None = None,
              identity: Mapping[str, Any] | None = None, refuse_changed: bool = False) -> SuiteResult:
    """Run the robustness checklist on ``model`` and return (and write) its :class:`SuiteResult`.

    Args:
        model: maps [0, 1] inputs (images or clips) to logits; an :class:`~abnn.framework.ABNN`
            also gets the statistics attack, the transfer from its target with plain BatchNorm
            and, with ``substitute_stats="batch"``, the batch checks.  Its mode is restored.
        data: see :func:`abnn.evaluation.run_attacks`.
        eps: L-inf radius (a fraction of the pixel range); default 8/255 images, 1/255 clips.
        n_eval: first ``n_eval`` samples (``None``: all).
        batch_size: attack and evaluation batch (for batch statistics, the batch whose
            composition matters).
        device: where the model runs.
        seed: the run seed; every attack derives its own seed from it and its label.
        out_dir: where ``suite.json``, ``suite.md``, ``eps_curve.png``, ``steps_curve.png`` go
            (``None``: nothing written).
        quick: the ``quick`` budget (CPU-sized) instead of ``full``.
        budget: ``"full"``, ``"quick"``, or a dict overriding keys of :data:`BUDGETS` (on top of
            ``quick`` when ``quick`` else ``full``).
        source_models: transfer sources, name -> model (e.g. an undefended network).
        extra_attacks: attacks added to the checklist (registry specs, e.g. your own adaptive
            attack, registered with :func:`abnn.attacks.register`); they count in the worst case
            and in the masking checks like the suite's own.
        progress: tqdm bars.
        progress_dir: resumable runner state (see :func:`abnn.evaluation.run_attacks`).
        metadata: extra fields for the results and the report (e.g. the run folder).
        identity: the evaluated run's defining settings, checked on resume (see ``run_attacks``).
        refuse_changed: refuse a progress file of other settings (see ``run_attacks``).
    """
    budget_name, cfg = resolve_budget(budget, quick)
    device = torch.device(device)
    x, y = as_tensors(data, n_eval)
    eps = default_eps(video=x.dim() == 5) if eps is None else eps
    sources = dict(source_models or {})
    is_abnn = isinstance(model, ABNN)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            num_classes = model(to_float(x[:1], device)).shape[1]
        specs = suite_specs(cfg, eps=eps, num_classes=num_classes, is_abnn=is_abnn, sources=list(sources))
        specs += [parse_spec(s) for s in extra_attacks]
        ev = run_attacks(model, (x, y), specs, eps=eps, batch_size=batch_size, device=device, seed=seed,
                         sources=sources, progress=progress, progress_dir=progress_dir, keep_progress=True,
                         keep_worst_inputs=True, identity=identity, refuse_changed=refuse_changed)
        t0 = time.perf_counter()
        res = _checklist(model, x, y, ev, cfg, budget_name, eps, num_classes, is_abnn, seed, device, progress)
    finally:
        model.train(was_training)
    ev.metadata.update(metadata or {})
    ev.seconds += time.perf_counter() - t0  # the runner's seconds (resumed runs included) and the checks'
    if out_dir is not None:
        write_suite_report(res, out_dir)
    if progress_dir is not None:  # complete: the finished attacks are no longer needed
        (Path(progress_dir) / PROGRESS_FILE).unlink(missing_ok=True)
    return res


def _checklist(model: nn.Module, x: Tensor, y: Tensor, ev: EvalResult, cfg: dict[str, Any], budget_name: str,
               eps: float, num_classes: int, is_abnn: bool, seed: int, device: torch.device,
               progress: bool) -> SuiteResult:
    worst = ev.worst_case()
    recheck = (ev.clean_mask & (predict(model, ev.x_worst, ev.batch_size, device) == y)).float().mean().item()
    eps_curve, steps_curve = _curves(ev, cfg, eps)
    gradients = checks.gradient_check(model, x, y, ev.clean_mask, ev.batch_size, device)
    batch = None
    if is_abnn and getattr(model, "substitute_stats", None) == "batch":
        batch = checks.batch_checks(model, x, y, ev, eps=eps, budget=cfg, seed=seed, device=device, progress=progress,
                                    alphas={"bs1": pgd_alpha(eps, cfg["bs1_steps"]),
                                            "mixed": pgd_alpha(eps, cfg["mixed_steps"])})
    masking = checks.masking_counts(ev)
    flags = checks.flags(n=ev.n_eval, eps_curve=eps_curve, steps_curve=steps_curve, masking=masking,
                         kinds={k: r.kind for k, r in ev.attacks.items()}, gradients=gradients, batch=batch,
                         worst_acc=worst.robust_acc)
    return SuiteResult(
        evaluation=ev, suite=budget_name, budget=cfg, model=type(model).__name__, is_abnn=is_abnn,
        substitute_stats=getattr(model, "substitute_stats", None) if is_abnn else None,
        input_shape=list(x.shape[1:]), num_classes=num_classes, worst=worst, recheck_acc=recheck,
        broken_only_by=_broken_only_by(ev), masking=masking, eps_curve=eps_curve, steps_curve=steps_curve,
        gradients=gradients, batch_checks=batch,
        robust_acc=min(worst.robust_acc, batch["worst_over_protocols"]) if batch else worst.robust_acc,
        flags=flags, verdict="SUSPECT" if flags else "PASS",
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _broken_only_by(ev: EvalResult) -> dict[str, int]:
    """Per attack of the worst case: how many samples it alone breaks."""
    w = ev.worst_case()
    names = [k for k in w.attacks if ev.attacks[k].group == "attack" and not ev.attacks[k].part_of]
    if len(names) < 2:
        return {}
    fooled = ev.clean_mask & ~torch.stack([ev.attacks[k].robust_mask for k in names])
    only = fooled & (fooled.sum(0) == 1)
    return {k: int(only[i].sum()) for i, k in enumerate(names)}


def run_suite_on_run(run_dir: str | os.PathLike, *, n_eval: int = 1000, batch_size: int = 256,
                     data_root: str | None = None, device: str = "cpu", seed: int = 0, eps: float | None = None,
                     out_dir: str | os.PathLike | None = None, quick: bool = False,
                     budget: str | Mapping[str, Any] | None = None,
                     source_models: Mapping[str, nn.Module | str | os.PathLike] | None = None,
                     extra_attacks: Sequence[str | AttackSpec] = (), progress: bool = True,
                     resume: bool = True) -> SuiteResult:
    """:func:`run_suite` on a finished run: loads it with :func:`abnn.runs.load_run`, evaluates
    the first ``n_eval`` test samples of its dataset and writes into ``run_dir/suite/`` (or
    ``out_dir``).  ``source_models`` values may be modules or run folders (loaded the same way).
    With ``resume`` (default), finished attacks are kept in ``<out>/attack-progress.pt`` as the
    suite goes, and an interrupted suite continues from there when run again with the same
    settings (other settings are refused: rerun as before or ``resume=False``); ``resume=False``
    discards that file first."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "suite"
    model, cfg = load_run(run_dir, device=device)
    ensure_writable(out)
    test = load_dataset(cfg.dataset, "test", data_root or cfg.data_root, frames=cfg.frames)
    data = as_tensors(test.subset(n_eval), n_eval)
    sources = {name: src if isinstance(src, nn.Module) else load_run(src, device=device)[0]
               for name, src in (source_models or {}).items()}
    if not resume:
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    meta = {"run": str(run_dir), "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "sources": {k: (type(v).__name__ if isinstance(v, nn.Module) else str(v))
                        for k, v in (source_models or {}).items()}}
    short = training_cut_short(run_dir)
    if short is not None:
        meta["training_cut_short"] = short
    return run_suite(model, data, eps=eps, batch_size=batch_size, device=device, seed=seed, out_dir=out, quick=quick,
                     budget=budget, source_models=sources, extra_attacks=extra_attacks, progress=progress,
                     progress_dir=out, metadata=meta, identity=run_identity(cfg), refuse_changed=True)
