"""The suite's report: ``suite.json`` (:class:`~abnn.evaluation.results.SuiteResult`), ``suite.md``
(checklist table, worst case, flags, PASS/SUSPECT verdict) and the two sanity curves as PNG.
Reads results of every schema version (:meth:`SuiteResult.from_dict`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..attacks.pgd import FIRST_FOOLING, FIRST_FOOLING_NOTE
from ..files import write_json_atomic
from ..plotting import pyplot
from .results import SuiteResult


__all__ = ["write_suite_report", "suite_markdown"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _curve_png(xs: list[float], ys: list[float], path: Path, xlabel: str, title: str, *,
               mark: float | None = None) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    pos = list(range(len(xs)))  # evenly spaced points, labelled with the values (eps and steps grow ~x2)
    ax.plot(pos, [100 * v for v in ys], "o-", color="tab:red")
    for a, b in zip(pos, ys):
        ax.annotate(_pct(b), (a, 100 * b), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    if mark is not None and mark in xs:
        ax.axvline(xs.index(mark), color="gray", ls=":", lw=1, label="evaluated eps")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(pos, [f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-3, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_suite_report(res: SuiteResult, out_dir: str | os.PathLike) -> None:
    """Write ``suite.json``, ``suite.md``, ``eps_curve.png`` and ``steps_curve.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "suite.json", res.to_dict())
    ev, ec, sc = res.evaluation, res.eps_curve, res.steps_curve
    eps_255 = ev.eps * 255
    _curve_png(ec.xs, ec.robust_acc, out / "eps_curve.png", "eps (/255)",
               f"PGD-{ec.settings['steps']} robust accuracy vs eps (n={ev.n_eval})", mark=round(eps_255, 6))
    _curve_png(sc.xs, sc.robust_acc, out / "steps_curve.png", "PGD steps",
               f"PGD robust accuracy vs steps, eps {eps_255:g}/255 (n={ev.n_eval})")
    (out / "suite.md").write_text(suite_markdown(res))


def suite_markdown(res: SuiteResult) -> str:
    ev = res.evaluation
    eps_255 = ev.eps * 255
    lines = [f"# Robustness checklist: {ev.metadata.get('run') or res.model}", "",
             f"Generated {res.generated}; {ev.n_eval} samples of shape {tuple(res.input_shape)}, L-inf eps "
             f"{eps_255:g}/255 (of the pixel range [0, 1]), budget `{res.suite}`, batch size {ev.batch_size}, seed "
             f"{ev.seed}, device {ev.device} ({ev.threads} threads), {ev.seconds / 60:.1f} min.", ""]
    short = ev.metadata.get("training_cut_short")
    if short:
        from ..runs import cut_short_note

        lines += [f"**Note:** {cut_short_note(ev.metadata.get('run'), short)}.", ""]
    if res.is_abnn:
        lines += [f"ABNN with substitute statistics `{res.substitute_stats}`: white-box attacks differentiate "
                  "through target, substitute and statistics.", ""]
    lines += [f"## Verdict: **{res.verdict}**", "",
              f"Clean accuracy **{_pct(ev.clean_acc)}%**; robust accuracy, per-sample worst case over all attacks"
              f"{' and evaluation protocols' if res.batch_checks else ''}: **{_pct(res.robust_acc)}%** "
              f"(measured with the paper's attack, PGD-5 ({FIRST_FOOLING}): {_pct(ev.attacks['pgd-5'].robust_acc)}%).",
              ""]
    if res.flags:
        lines += ["Flags:", ""] + [f"- {f}" for f in res.flags] + [""]
    else:
        lines += ["No flag: the eps sweep reaches ~0%, robust accuracy never rises with eps or steps, no "
                  "gradient-free or transfer attack breaks a sample that the white-box attacks leave robust, "
                  "gradients are non-zero.", ""]
    lines += _attack_table(res) + _curves(res)
    if res.batch_checks:
        lines += _batch_section(res.batch_checks)
    lines += ["## How to read this", "",
              "Robust accuracy counts a sample only if it is classified correctly clean and under attack. The "
              "checklist follows Carlini et al. 2019 (\"On evaluating adversarial robustness\"), Athalye et al. 2018 "
              "(obfuscated gradients) and Croce et al., ICML 2022 (\"Evaluating the adversarial robustness of adaptive "
              "test-time defenses\"): an honest evaluation reaches ~0% at a large eps, does not get weaker with more "
              "steps, and its white-box attacks break every sample that a gradient-free or transfer attack breaks. A "
              "flag means the number above may overstate robustness; it makes the verdict SUSPECT. The row `autoattack` "
              "is the AutoAttack-style ensemble, run as AutoAttack runs it: APGD-CE, then APGD-T, APGD-DLR (standing "
              "in for FAB-T) and Square, each on the samples still robust after the ones before it; its number is the "
              "ensemble's. The rows `autoattack/NAME` are the robust accuracy after that component and those before "
              "it (their runtime is in the `autoattack` row). The authors' AutoAttack is "
              "`abnn evaluate RUN --suite autoattack`.", "", FIRST_FOOLING_NOTE, "",
              "Full machine-readable results: `suite.json`.", ""]
    return "\n".join(lines)


def _attack_table(res: SuiteResult) -> list[str]:
    lines = ["## Attacks", "", "| Attack | Kind | Settings | Robust accuracy (%) | Runtime |", "|---|---|---|---:|---:|"]
    for name, r in res.attacks.items():
        if r.group == "attack":
            runtime = f"in {r.part_of}" if r.part_of else f"{r.seconds:.1f} s"
            lines.append(f"| {name} | {r.kind} | `{r.settings}` | {_pct(r.robust_acc)} | {runtime} |")
    w = res.worst
    sweeps = any(k in res.attacks and res.attacks[k].group != "attack" for k in w.attacks)
    over = "every row above" + (" and the sweep points at this eps" if sweeps else "")
    lines.append(f"| **worst case** | per sample | over {over} | **{_pct(w.robust_acc)}** | |")
    lines += ["", f"Worst-case inputs re-evaluated in one pass (fully adversarial batches): {_pct(res.recheck_acc)}%.",
              "Samples broken by one attack only: " + (", ".join(f"{k}: {v}" for k, v in res.broken_only_by.items() if v)
                                                       or "none") + "."]
    if res.masking:
        lines.append("Samples broken by a gradient-free or transfer attack and by no white-box attack: "
                     + ", ".join(f"{k}: {v}" for k, v in res.masking.items()) + ".")
    return lines + [""]


def _curves(res: SuiteResult) -> list[str]:
    ec, sc, eps_255 = res.eps_curve, res.steps_curve, res.evaluation.eps * 255
    g = res.gradients
    return ["## Sanity curves", "", "| eps (/255) | " + " | ".join(f"{e:g}" for e in ec.xs) + " |",
            "|---|" + "---:|" * len(ec.xs),
            f"| PGD-{ec.settings['steps']} robust acc (%) | " + " | ".join(_pct(v) for v in ec.robust_acc) + " |", "",
            "| PGD steps | " + " | ".join(str(s) for s in sc.xs) + " |", "|---|" + "---:|" * len(sc.xs),
            f"| robust acc (%) at {eps_255:g}/255 | " + " | ".join(_pct(v) for v in sc.robust_acc) + " |", "",
            "![eps curve](eps_curve.png) ![steps curve](steps_curve.png)", "",
            f"Input gradients exactly zero for {_pct(g['zero_grad_frac'])}% of the correctly classified "
            f"samples; non-finite gradients: {'yes' if g['nonfinite_grad'] else 'no'}.", ""]


def _batch_section(b: dict) -> list[str]:
    lines = ["## Batch statistics (predictions depend on the batch)", "",
             "| Protocol | Accuracy (%) |", "|---|---:|",
             f"| clean, batches of {b['batch_size']} | {_pct(b['clean_acc_batch'])} |",
             f"| clean, batch size 1 | {_pct(b['clean_acc_bs1'])} |",
             f"| worst-case inputs, fully adversarial batches | {_pct(b['worst_inputs_in_adversarial_batches'])} |",
             f"| worst-case inputs, batch size 1 | {_pct(b['worst_inputs_at_bs1'])} |",
             f"| PGD + APGD-CE crafted and evaluated at batch size 1 | {_pct(b['bs1_robust_acc'])} |",
             f"| crafted at batch size 1, evaluated in adversarial batches | {_pct(b['bs1_crafted_in_adversarial_batches'])} |",
             f"| **worst case over protocols** | **{_pct(b['worst_over_protocols'])}** |", ""]
    if b["mixed"]:
        lines += [f"Mixed batches: {b['mixed_settings']}.", "",
                  "| k | clean samples | flips (transferred) | wrong (transferred) | flips (poison) | wrong (poison) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for m in b["mixed"]:
            lines.append(f"| {m['k']} | {m['n_clean']} | {_pct(m['transferred_flip_rate'])}% | "
                         f"{_pct(m['transferred_broken_rate'])}% | {_pct(m['poison_flip_rate'])}% | "
                         f"{_pct(m['poison_broken_rate'])}% |")
        lines.append("")
    return lines
