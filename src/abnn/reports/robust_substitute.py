"""Report of the robust-substitute study: ``report.md`` and ``robust_substitute.png``."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot
from .common import pct, save_figure, study_header
from .forensics import attribution_table, path_swap_table

_CLOCK_NAMES = {"train_cpu_seconds": "CPU s", "train_seconds": "wall s"}


def figure_robust_substitute(records: list[dict], clock: str, path: Path, title: str) -> None:
    """Clean and worst-case accuracy against the amortised training cost (the frontier's axes),
    one point per row at k = 1 (filled) and k = 20 targets per substitute (open), joined."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    for ax, key, label in ((axes[0], "worst_case_acc", "worst-case robust accuracy (%)"),
                           (axes[1], "clean_acc", "clean accuracy (%)")):
        for i, r in enumerate(records):
            costs = r["amortised"].get(clock)
            if not costs:
                continue
            ks = sorted(costs, key=int)
            xs = [costs[k] / 60 for k in ks]
            y = 100 * r[key]
            color = f"C{i}"
            ax.plot(xs, [y] * len(xs), "-", color=color, lw=0.8, alpha=0.6)
            ax.scatter(xs[:1], [y], color=color, s=45, zorder=3)
            ax.scatter(xs[-1:], [y], facecolors="none", edgecolors=color, s=45, zorder=3)
            ax.annotate(r["name"], (xs[0], y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.set_xlabel(f"training cost per target (min, {_CLOCK_NAMES[clock]}), substitute amortised")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 100)
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], color="k", label="k = 1 target per substitute")
    axes[0].scatter([], [], facecolors="none", edgecolors="k", label="k = 20 targets")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _minutes(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 60:.1f}"


def _aa_cell(aa: dict) -> str:
    if not aa:
        return "n/a"
    if "skipped" in aa:
        return "not run"
    agree = "agrees sample by sample" if aa["agree_sample_by_sample"] else "differs per sample"
    return f"{pct(aa['autoattack_acc'])} (ours {pct(aa['ours_acc'])}, {agree})"


def write_robust_substitute_report(out: Path, summary: dict) -> None:
    clock, ks = summary["clock"], [str(k) for k in summary["amortise_over"]]
    recs = summary["records"]
    figure_robust_substitute(recs, clock, out / "robust_substitute.png",
                             f"Robust substitute study ({summary['preset']['name']} preset): accuracy vs amortised cost")
    lines = study_header("Can ABNN carry robustness? A robust substitute pretrained once", summary)
    lines += ["**This study breaks the paper's premise on purpose**: the substitutes of the `robust` rows are "
              "adversarially trained (Fast-AT, eps 8/255), which the paper's ABNN never needs; rows marked in-domain "
              "also use a substitute trained on CIFAR-10 itself. `pgd` keeps, per sample, the first iterate that "
              "fools the model.", "",
              f"| row | substitute | clean | PGD-5 | worst case | AutoAttack (first {summary['autoattack_n']}) | "
              f"N/step | target N | target {_CLOCK_NAMES[clock]} (min) | substitute one-time (min) | "
              + " | ".join(f"amortised k={k} (min)" for k in ks) + " |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|" + "---:|" * len(ks)]
    for r in recs:
        t, s = r["target_cost"], r["substitute_cost"]
        sub = "none" if s is None else ("robust" if r["robust_substitute"] else "clean") + (
            ", in-domain" if r["in_domain"] else "")
        am = r["amortised"].get(clock, {})
        lines.append(f"| {r['label']} | {sub} | {pct(r['clean_acc'])} | {pct(r['robust_acc'].get('pgd'))} | "
                     f"**{pct(r['worst_case_acc'])}** | {_aa_cell(r['autoattack'])} | {t['N_per_step']:g} | "
                     f"{t['total_N']:,} | {_minutes(t[clock])} | {_minutes(s[clock] if s else None)} | "
                     + " | ".join(_minutes(am.get(k)) for k in ks) + " |")
    lines += ["", f"Costs: the target's counted passes (N = one network pass over a batch) and its measured training "
              f"time by {_CLOCK_NAMES[clock]}; a substitute's one-time cost is its own training (for the in-domain "
              "rows: the frontier's Fast-AT target), shared by k targets in the amortised columns. Robust "
              "substitutes' per-epoch robust validation is part of their training time where the run recorded it "
              "separately (`robust_validation_seconds`).", "",
              f"AutoAttack: the authors' code (standard version) on rows whose worst case exceeds "
              f"{100 * summary['autoattack_above']:g}%; the per-sample robust indices of both are side by side in "
              "`results.json` (`records[].autoattack`), AutoAttack's own record in `RUN/autoattack_official.json`.", ""]
    abnn = [r for r in recs if r.get("attribution_median")]
    if abnn:
        lines += ["Where the input gradient of the ABNN rows goes (exact split, medians over the evaluation images; "
                  "share = <part, full> / ||full||^2), and which path decides (path swap: the target path on "
                  "image i, the substitute on an image j of another class):", "",
                  *attribution_table(abnn), "", *path_swap_table(abnn), ""]
    subs = {r["substitute_run"]: r["substitute_cost"] for r in recs if r["substitute_cost"]}
    lines += ["Substitutes:", ""] + [
        f"- `{run}`: validation accuracy {pct(c['final_val_acc'])}"
        + (f", best per-epoch PGD-5 {pct(c['best_val_pgd_acc'])}" if c.get("best_val_pgd_acc") is not None else "")
        + f", {c['epochs']} epochs, {c['N_per_step']:g}N/step" for run, c in subs.items()]
    lines += ["", "![accuracy vs amortised cost](robust_substitute.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
