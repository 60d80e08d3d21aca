"""Typed evaluation results, and their JSON form.

:class:`AttackResult` is one attack over a dataset; :class:`EvalResult` is what the runner
returns (clean accuracy, every attack, the per-sample worst case); :class:`SuiteResult` adds the
robustness checklist (curves, checks, flags, verdict).

**One evaluation record format.**  Every file that records attacks over a dataset is an
:class:`EvalResult`'s ``to_dict``: ``abnn evaluate``'s ``eval.json`` / ``autoattack.json``, and the
reproduce pipelines' ``eval_table.json`` (Tables 1-3), ``eval_strong.json`` (the studies),
``forensics_eval.json`` and ``autoattack_official.json``; ``suite.json`` is a :class:`SuiteResult`,
that record plus the checklist.  :func:`read_evaluation` reads any of them back, the files of
earlier versions included (see "Older files" below).

Schema, version 3 (``schema_version``; files without it are version 1, see below)::

    eval.json, eval_table.json, eval_strong.json, forensics_eval.json, autoattack_official.json
      schema_version  3
      type            "evaluation"
      spec            null, or the settings a pipeline made this evaluation with; a rerun reuses
                      the file only when they match (version 3)
      n_eval          number of samples (the first n_eval of the test split)
      clean_acc       fraction correct on clean inputs
      clean_mask      per sample "0"/"1" string: correct on the clean input
      eps, eps_255    the evaluated L-inf radius, as a fraction of the pixel range [0, 1] and in
                      1/255 units (8.0 = 8/255)
      robust_acc      {label: robust accuracy} (the same numbers as attacks[label].robust_acc)
      attacks         {label: attack row}, in running order
      worst_case      {eps, eps_255, robust_acc, attacks: [labels], robust_mask}: per sample, robust
                      under every L-inf attack at eps (sweep points at eps included); with no
                      L-inf attack at eps, robust_acc and robust_mask are null and note says why
      seed, batch_size, device, threads, seconds, resumed_attacks, and the run's metadata
                      (run, method, dataset, arch, width) when evaluated from a run folder;
                      training_cut_short {steps, planned_steps, max_steps} when its training
                      stopped early (--max-steps)

    attack row
      attack          registry name (abnn evaluate --list-attacks)
      kind            white-box | black-box | transfer | ensemble
      norm            "linf", or null for another threat model (ROA)
      eps, eps_255    its L-inf radius (null without one)
      options         the resolved options (eps, alpha as fractions of the pixel range)
      settings        the attack's repr: every setting and its seed
      seed            the attack's own seed, derived from the run seed and its label
      group           "attack", or the suite sweep it belongs to ("eps-sweep", "steps-sweep")
      derived_from    null, or the labels whose per-sample worst case this row is (no run of its own;
                      suites before the AutoAttack row was run as an ensemble)
      part_of         null, or the label of the ensemble run this row is a stage of: the row
                      "autoattack/apgd-t" is robust accuracy after the ensemble's components up to
                      and including APGD-T, in running order (its seconds count in the ensemble's row)
      robust_acc      fraction correct both clean and under this attack (RobustBench convention)
      robust_mask     per sample "0"/"1" string
      seconds         wall-clock seconds of the attack

    suite.json: the keys of eval.json (type "suite", robust_acc the headline float: the worst case,
      over evaluation protocols too for batch statistics), and suite, model, is_abnn,
      substitute_stats, input_shape, num_classes, budget, budget_settings, worst_case (plus
      recheck_acc, broken_only_by), masking ({label: samples that gradient-free or transfer attack
      breaks and no white-box attack does}), eps_curve, steps_curve, gradients, batch_checks,
      flags, verdict ("PASS" | "SUSPECT"), generated.

Older files.  Version 2 is version 3 without ``spec``.  Version 1 (suite.json before
schema_version): attack rows held kind, settings, robust_acc and seconds only, without masks;
sweep points were not rows.  They load with ``robust_mask=None``.  Before version 3 the pipelines
wrote their own formats, read by :func:`read_evaluation`: ``eval_table.json`` held ``n_eval``,
``clean_acc``, ``robust_acc``, ``attacks`` (label: settings), ``attack_seconds``,
``attack_options`` and ``seed`` (rows load without masks), and ``eval_strong.json`` wrapped a
version-2 record as ``result`` beside its ``spec``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["AttackResult", "Curve", "EvalResult", "SCHEMA_VERSION", "SuiteResult", "WorstCase", "read_evaluation"]

SCHEMA_VERSION = 3


def mask_to_str(mask: Tensor | None) -> str | None:
    return None if mask is None else "".join("1" if v else "0" for v in mask.tolist())


def mask_from_str(text: str | None) -> Tensor | None:
    return None if text is None else torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _acc(mask: Tensor) -> float:
    return mask.float().mean().item() if mask.numel() else 0.0


def same_eps(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass
class AttackResult:
    """One attack over a dataset."""

    label: str
    attack: str
    kind: str
    norm: str | None
    eps: float | None
    options: dict[str, Any]
    settings: str
    seed: int | None
    robust_acc: float
    seconds: float
    robust_mask: Tensor | None = None
    group: str = "attack"
    derived_from: list[str] | None = None
    part_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "kind": self.kind, "norm": self.norm, "eps": self.eps,
                "eps_255": None if self.eps is None else self.eps * 255, "options": self.options,
                "settings": self.settings, "seed": self.seed, "group": self.group, "derived_from": self.derived_from,
                "part_of": self.part_of,
                "robust_acc": self.robust_acc, "robust_mask": mask_to_str(self.robust_mask), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, label: str, d: dict[str, Any], *, eps: float | None = None, seed: int | None = None) -> "AttackResult":
        """A row of any schema version (``eps``/``seed``: the file's, for version-1 rows)."""
        return cls(label=label, attack=d.get("attack", label), kind=d["kind"], norm=d.get("norm", "linf"),
                   eps=d.get("eps", eps), options=d.get("options", {}), settings=d["settings"], seed=d.get("seed", seed),
                   robust_acc=d["robust_acc"], seconds=d["seconds"], robust_mask=mask_from_str(d.get("robust_mask")),
                   group=d.get("group", "attack"), derived_from=d.get("derived_from"),
                   part_of=d.get("part_of"))


@dataclass
class WorstCase:
    """Per sample: robust under every L-inf attack at ``eps`` (listed in ``attacks``).

    With no L-inf attack at ``eps`` there is no worst case: ``robust_acc`` and ``robust_mask``
    are ``None`` (never the clean accuracy) and ``note`` says why."""

    eps: float | None
    robust_acc: float | None
    attacks: list[str]
    robust_mask: Tensor | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"eps": self.eps, "eps_255": None if self.eps is None else self.eps * 255,
               "robust_acc": self.robust_acc, "attacks": self.attacks, "robust_mask": mask_to_str(self.robust_mask)}
        return {**out, "note": self.note} if self.note else out


@dataclass
class EvalResult:
    """Clean accuracy and attacks over one dataset (the runner's result)."""

    n_eval: int
    clean_acc: float
    clean_mask: Tensor | None
    eps: float | None
    attacks: dict[str, AttackResult]
    seed: int
    batch_size: int
    device: str
    threads: int
    seconds: float
    resumed: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    x_worst: Tensor | None = field(default=None, repr=False)  # worst-case inputs (runner option); not saved
    spec: dict[str, Any] | None = None  # the settings a pipeline made it with (its reuse key)

    @property
    def robust_acc(self) -> dict[str, float]:
        """Robust accuracy by attack label."""
        return {k: r.robust_acc for k, r in self.attacks.items()}

    def merged(self, other: "EvalResult") -> "EvalResult":
        """This evaluation with the attack rows of ``other``, a second evaluation of the same
        model on the same samples (its clean mask must agree)."""
        if other.n_eval != self.n_eval or (self.clean_mask is not None and other.clean_mask is not None
                                           and not torch.equal(self.clean_mask, other.clean_mask)):
            raise ValueError("merged: the two evaluations are not of the same model on the same samples")
        return dataclasses.replace(self, attacks={**self.attacks, **other.attacks}, seconds=self.seconds + other.seconds,
                                   resumed=self.resumed + other.resumed, x_worst=None)

    def worst_case(self, eps: float | None = None) -> WorstCase:
        """Per-sample worst case over every L-inf attack run at ``eps`` (default: the evaluated
        eps), whatever its kind or group (a sweep point at eps counts), derived rows aside."""
        eps = self.eps if eps is None else eps
        rows = [r for r in self.attacks.values() if r.norm == "linf" and same_eps(r.eps, eps) and not r.derived_from]
        if self.clean_mask is None or any(r.robust_mask is None for r in rows):
            raise ValueError("this result has no per-sample masks (a version-1 file); its stored worst case is "
                             "SuiteResult.worst")
        if not rows:
            ran = sorted({f"{r.eps * 255:g}/255" for r in self.attacks.values() if r.norm == "linf" and r.eps is not None})
            return WorstCase(eps, None, [], None, note=(
                f"no L-inf attack ran at the evaluated eps {eps * 255:g}/255"
                + (f" (they ran at {', '.join(ran)})" if ran else "") + ", so there is no worst case; give the "
                "attacks that eps (or --eps the attacks' eps)"))
        mask = self.clean_mask.clone()
        for r in rows:
            mask &= r.robust_mask
        return WorstCase(eps, _acc(mask), [r.label for r in rows], mask)

    def to_dict(self) -> dict[str, Any]:
        try:
            worst: dict[str, Any] | None = self.worst_case().to_dict()
        except ValueError:
            worst = None
        return {"schema_version": SCHEMA_VERSION, "type": "evaluation", "spec": self.spec, **self.metadata,
                "n_eval": self.n_eval,
                "clean_acc": self.clean_acc, "clean_mask": mask_to_str(self.clean_mask), "eps": self.eps,
                "eps_255": None if self.eps is None else self.eps * 255,
                "robust_acc": self.robust_acc,
                "attacks": {k: r.to_dict() for k, r in self.attacks.items()}, "worst_case": worst,
                "seed": self.seed, "batch_size": self.batch_size, "device": self.device, "threads": self.threads,
                "seconds": self.seconds, "resumed_attacks": self.resumed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        rows = {k: AttackResult.from_dict(k, r, eps=d.get("eps"), seed=d.get("seed")) for k, r in d["attacks"].items()}
        meta = {k: d[k] for k in ("run", "method", "dataset", "arch", "width", "sources", "training_cut_short")
                if k in d}
        return cls(n_eval=d["n_eval"], clean_acc=d["clean_acc"], clean_mask=mask_from_str(d.get("clean_mask")),
                   eps=d.get("eps"), attacks=rows, seed=d.get("seed", 0), batch_size=d.get("batch_size", 0),
                   device=d.get("device", "?"), threads=d.get("threads", 0), seconds=d.get("seconds", 0.0),
                   resumed=list(d.get("resumed_attacks", [])), metadata=meta, spec=d.get("spec"))


def _legacy_table(d: dict[str, Any]) -> EvalResult:
    """An ``eval_table.json`` written before version 3 (no masks; rows keep their numbers)."""
    opts, seconds = d["attack_options"], d.get("attack_seconds", {})
    rows = {k: AttackResult(label=k, attack=k, kind="white-box", norm="linf" if "eps" in opts.get(k, {}) else None,
                            eps=opts.get(k, {}).get("eps"), options=opts.get(k, {}), settings=d["attacks"][k],
                            seed=d.get("seed"), robust_acc=acc, seconds=seconds.get(k, 0.0))
            for k, acc in d["robust_acc"].items()}
    return EvalResult(n_eval=d["n_eval"], clean_acc=d["clean_acc"], clean_mask=None,
                      eps=next((r.eps for r in rows.values() if r.eps is not None), None), attacks=rows,
                      seed=d.get("seed", 0), batch_size=0, device="?", threads=0, seconds=d.get("seconds", 0.0),
                      spec={"n_eval": d["n_eval"], "attack_options": opts, "seed": d.get("seed")})


def read_evaluation(source: str | Path | dict[str, Any]) -> EvalResult:
    """The evaluation record in a file (or its parsed JSON), of any version: ``eval.json``,
    ``suite.json`` (its evaluation part), and the pipelines' ``eval_table.json``,
    ``eval_strong.json``, ``forensics_eval.json``, ``autoattack_official.json``."""
    d = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if "schema_version" not in d and "attack_options" in d:
        return _legacy_table(d)
    if "schema_version" not in d and isinstance(d.get("result"), dict):  # eval_strong.json, version 2
        return dataclasses.replace(EvalResult.from_dict(d["result"]), spec=d.get("spec"))
    if "attacks" not in d:
        raise ValueError(f"not an evaluation record: {source if not isinstance(source, dict) else 'JSON'} has no attacks")
    return EvalResult.from_dict(d)


@dataclass
class Curve:
    """Robust accuracy along a sweep: ``xs`` (eps in 1/255, or PGD steps) against ``robust_acc``."""

    xs: list[float]
    robust_acc: list[float]
    settings: dict[str, Any]


@dataclass
class SuiteResult:
    """The robustness checklist of :func:`abnn.evaluation.run_suite` on one model."""

    evaluation: EvalResult
    suite: str
    budget: dict[str, Any]
    model: str
    is_abnn: bool
    substitute_stats: str | None
    input_shape: list[int]
    num_classes: int
    worst: WorstCase
    recheck_acc: float | None
    broken_only_by: dict[str, int]
    masking: dict[str, int]
    eps_curve: Curve
    steps_curve: Curve
    gradients: dict[str, Any]
    batch_checks: dict[str, Any] | None
    robust_acc: float
    flags: list[str]
    verdict: str
    generated: str

    @property
    def attacks(self) -> dict[str, AttackResult]:
        return self.evaluation.attacks

    def to_dict(self) -> dict[str, Any]:
        ev = self.evaluation.to_dict()
        ev.update({"type": "suite", "suite": self.suite, "model": self.model, "is_abnn": self.is_abnn,
                   "substitute_stats": self.substitute_stats, "input_shape": self.input_shape,
                   "num_classes": self.num_classes, "budget": self.suite,
                   "budget_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in self.budget.items()},
                   "worst_case": {**self.worst.to_dict(), "recheck_acc": self.recheck_acc,
                                  "broken_only_by": self.broken_only_by},
                   "masking": self.masking,
                   "eps_curve": {"eps_255": self.eps_curve.xs, "robust_acc": self.eps_curve.robust_acc,
                                 **self.eps_curve.settings},
                   "steps_curve": {"steps": self.steps_curve.xs, "robust_acc": self.steps_curve.robust_acc,
                                   **self.steps_curve.settings},
                   "gradients": self.gradients, "batch_checks": self.batch_checks, "robust_acc": self.robust_acc,
                   "flags": self.flags, "verdict": self.verdict, "generated": self.generated})
        return ev

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        ev = EvalResult.from_dict(d)
        w = d["worst_case"]
        worst = WorstCase(w.get("eps", d.get("eps")), w["robust_acc"], w.get("attacks", list(ev.attacks)),
                          mask_from_str(w.get("robust_mask")))
        ec, sc = dict(d["eps_curve"]), dict(d["steps_curve"])
        return cls(evaluation=ev, suite=d.get("suite", d.get("budget", "?")), budget=d.get("budget_settings", {}),
                   model=d.get("model", "?"), is_abnn=d.get("is_abnn", False), substitute_stats=d.get("substitute_stats"),
                   input_shape=d.get("input_shape", []), num_classes=d.get("num_classes", 0), worst=worst,
                   recheck_acc=w.get("recheck_acc"), broken_only_by=w.get("broken_only_by", {}),
                   masking=d.get("masking", {}),
                   eps_curve=Curve(ec.pop("eps_255"), ec.pop("robust_acc"), ec),
                   steps_curve=Curve(sc.pop("steps"), sc.pop("robust_acc"), sc),
                   gradients=d["gradients"], batch_checks=d.get("batch_checks"), robust_acc=d["robust_acc"],
                   flags=list(d["flags"]), verdict=d["verdict"], generated=d.get("generated", "?"))
