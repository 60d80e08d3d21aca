"""``abnn evaluate``: its settings (:class:`EvalSettings`) and what it does with them.

    from abnn.evaluation.command import EvalSettings, evaluate_command
    summary, notes = evaluate_command(EvalSettings("runs/abnn", attacks=("pgd:steps=20",), n_eval=500))

Its flags (:func:`add_evaluate_flags`) stand beside the settings they fill.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import AbnnError

__all__ = ["EvalSettings", "add_evaluate_flags", "evaluate_command", "parse_source"]

#: ``--suite`` values: the checklist (full, quick) or the authors' AutoAttack
SUITE_CHOICES = ("full", "quick", "autoattack")


def parse_source(text: str) -> tuple[str, str]:
    """``[NAME=]RUN`` -> (name, run folder); the name defaults to the folder's name."""
    name, sep, run = text.partition("=")
    return (name, run) if sep else (Path(text).name, text)


@dataclass
class EvalSettings:
    """Everything ``abnn evaluate`` was asked to do (the CLI builds it from its flags).

    ``eps`` is a fraction of the pixel range (the CLI parses ``8`` and ``8/255`` into 8/255);
    ``attacks`` are registry spec strings (``pgd:steps=20``); ``sources`` maps a transfer
    source's name to its run folder.  ``fresh`` discards an interrupted evaluation's progress
    (by default the same command continues from it)."""

    run: str | None
    attacks: tuple[str, ...] = ()
    n_eval: int = 1000
    batch_size: int = 256
    eps: float | None = None
    steps: int | None = None
    seed: int = 0
    out: str | None = None
    suite: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    attribution: bool = False
    fresh: bool = False
    data_root: str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        self.attacks, self.sources = tuple(self.attacks or ()), dict(self.sources or {})
        if self.run is None:
            raise AbnnError("evaluate needs a RUN folder (or --list-attacks)")
        if self.n_eval < 1 or self.batch_size < 1:
            raise AbnnError(f"--n-eval and --batch-size must be >= 1, got {self.n_eval} and {self.batch_size}")
        if self.suite is not None and self.suite not in SUITE_CHOICES:
            raise AbnnError(f"unknown --suite {self.suite!r}; choose one of {', '.join(SUITE_CHOICES)}")
        if self.suite and self.steps is not None:
            raise AbnnError("--suite runs with its own budgets; leave out --steps (--attack adds attacks to a suite)")

    def output(self) -> Path:
        """The JSON file written (the suite's folder for ``--suite full/quick``)."""
        if self.suite in ("full", "quick"):
            return Path(self.out or Path(self.run) / "suite")
        if self.attribution:
            return Path(self.out or Path(self.run) / "forensics.json")
        return Path(self.out or Path(self.run) / ("autoattack.json" if self.suite == "autoattack" else "eval.json"))

    def specs(self) -> list:
        """The attack specs of a non-checklist evaluation, ``steps`` applied to those that have steps."""
        from ..attacks import attack_defaults, parse_spec
        from .suites import SUITES

        texts = [*SUITES[self.suite], *self.attacks] if self.suite else list(self.attacks or ("pgd",))
        specs = [parse_spec(s) for s in texts]
        if self.steps is None:
            return specs
        return [s if "steps" in s.options or "steps" not in attack_defaults(s.name, attack=s.options.get("attack"))
                else replace(s, options={**s.options, "steps": self.steps}) for s in specs]


def add_evaluate_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``abnn evaluate``: one per :class:`EvalSettings` field, its destination the
    field's name (the CLI builds the settings from them by name), and ``--list-attacks``; the
    CLI adds the flags every command has (``--data-root``, ``--device``, ``--fresh``, ...)."""
    from ..attacks import pixel_budget_type

    p.add_argument("run", nargs="?", help="run folder (holds config.json and model.pt)")
    p.add_argument("--attack", dest="attacks", action="append", default=None, metavar="NAME[:key=value,...]",
                   help="attack to run, repeatable (default pgd); options override the registry's defaults, e.g. "
                        "pgd:steps=20,alpha=0.5/255 or apgd-t:n_target_classes=3; with --suite, added to the suite")
    p.add_argument("--list-attacks", action="store_true", help="list every attack with its defaults and exit")
    p.add_argument("--attribution", action="store_true",
                   help="ABNN forensics instead of attacks: split of the input gradient (target path vs substitute "
                        "statistics/encoder) and the path swap, on the first --n-eval images (JSON: --out, default "
                        "RUN/forensics.json)")
    p.add_argument("--n-eval", type=int, default=1000, help="test samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=pixel_budget_type("--eps"), default=None, metavar="K[/255]",
                   help="the evaluated L-inf radius in 1/255 of the pixel range, e.g. 8 or 8/255 (default 8/255 for "
                        "images, 1/255 for clips); every attack with an eps takes it unless its spec sets one")
    p.add_argument("--steps", type=int, default=None, help="steps of every --attack that has steps (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="run seed; every attack derives its own seed from it and its name")
    p.add_argument("--out", default=None, help="JSON output (default RUN/eval.json; --suite autoattack: "
                   "RUN/autoattack.json); with --suite full/quick a folder (default RUN/suite)")
    p.add_argument("--suite", choices=SUITE_CHOICES, default=None,
                   help="full/quick: the robustness checklist instead of --attack (all attacks, per-sample worst case, "
                        "eps/steps sanity curves, gradient-masking flags; 'quick' scales the budgets down for CPU); "
                        "autoattack: the authors' AutoAttack, standard version (pip install -e '.[autoattack]')")
    p.add_argument("--source", dest="sources", action="append", type=parse_source, default=None, metavar="[NAME=]RUN",
                   help="a finished run folder to transfer attacks from (repeatable): the suite transfers from each, "
                        "--attack transfer:source=NAME from one")


def evaluate_command(s: EvalSettings) -> tuple[dict[str, Any], list[str]]:
    """Run the evaluation ``s`` asks for, holding the lock of the folder it writes
    (:func:`abnn.runs.run_lock`, so a second writer is refused before any computation); return
    its one-line summary and the notes to show (a training cut short, a worst case's caveat)."""
    from ..runs import run_lock

    folder = s.output() if s.suite in ("full", "quick") else s.output().parent
    with run_lock(folder) if Path(s.run).is_dir() else contextlib.nullcontext():
        return _evaluate(s)


def _evaluate(s: EvalSettings) -> tuple[dict[str, Any], list[str]]:
    common = dict(n_eval=s.n_eval, batch_size=s.batch_size, data_root=s.data_root, device=s.device, seed=s.seed)
    if s.attribution:
        from .attribution import forensics_run

        res = forensics_run(s.run, **common, out=s.out)
        return ({k: res[k] for k in ("run", "n", "path_swap")}
                | {"share_median": {p: m["share"] for p, m in res["attribution_median"].items()}}), []
    if s.suite in ("full", "quick"):
        from ..attacks import parse_spec
        from .suites import run_suite_on_run

        res = run_suite_on_run(s.run, **common, eps=s.eps, out_dir=s.out, quick=s.suite == "quick",
                               source_models=s.sources, extra_attacks=[parse_spec(a) for a in s.attacks],
                               progress=s.progress, resume=not s.fresh)
        meta = res.evaluation.metadata
        return ({"run": meta["run"], "method": meta["method"], "n_eval": res.evaluation.n_eval,
                 "clean_acc": res.evaluation.clean_acc, "robust_acc": res.robust_acc, "verdict": res.verdict,
                 "flags": res.flags}, _cut_short(meta))
    from .runner import evaluate_run

    res = evaluate_run(s.run, attacks=s.specs(), **common, eps=s.eps, sources=s.sources, progress=s.progress,
                       out=s.output(), resume=not s.fresh)
    worst = res.worst_case()
    return ({"run": str(s.run), "method": res.metadata["method"], "n_eval": res.n_eval, "clean_acc": res.clean_acc,
             "robust_acc": {k: r.robust_acc for k, r in res.attacks.items()}, "worst_case": worst.robust_acc,
             "eps_255": res.eps * 255}, _cut_short(res.metadata) + ([worst.note] if worst.note else []))


def _cut_short(metadata: dict) -> list[str]:
    """A note when the evaluated run's training stopped early (--max-steps)."""
    from ..runs import cut_short_note

    short = metadata.get("training_cut_short")
    return [cut_short_note(metadata["run"], short)] if short else []
