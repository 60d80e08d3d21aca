"""Reports of the two studies: the cost-matched frontier (``frontier.png``, ``fast_at_epochs.png``)
and the substitute-strength study (``substitute_study.png``), each with ``report.md``."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot
from .common import pct, save_figure, study_header


def every_attack_table(recs: list[dict], attacks: list[str], column: str, label: str) -> list[str]:
    """Each record's robust accuracy under every attack of the evaluation (%), one row each."""
    lines = ["## Every attack (%)", "", f"| {column} | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
    return lines + [f"| {r[label]} | " + " | ".join(pct(v) for v in r["robust_acc"].values()) + " |" for r in recs]


def figure_frontier(records: list[dict], path: Path, title: str, clock: str = "train_seconds") -> None:
    """Clean and worst-case robust accuracy against measured training time (by ``clock``, the
    one the cost matching used) and against the total counted cost, one labelled point per method."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    time_label = "training time (min, process CPU time)" if clock == "train_cpu_seconds" else "training time (min, wall)"
    for ax, key, label in ((axes[0], clock, time_label),
                           (axes[1], "total_cost_N", "total counted cost (thousands of N; N = one pass over a batch)")):
        scale = 1 / 60 if key != "total_cost_N" else 1e-3
        for i, r in enumerate(records):
            x = r[key] * scale
            color = f"C{i}"
            ax.scatter([x], [100 * r["clean_acc"]], marker="o", facecolors="none", edgecolors=color, s=50)
            ax.scatter([x], [100 * r["worst_case_acc"]], marker="s", color=color, s=50)
            ax.plot([x, x], [100 * r["worst_case_acc"], 100 * r["clean_acc"]], color=color, lw=0.8, alpha=0.5)
            ax.annotate(r["name"], (x, 100 * r["worst_case_acc"]), textcoords="offset points", xytext=(5, -10),
                        fontsize=7, color=color)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 100)
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], marker="o", facecolors="none", edgecolors="k", label="clean")
    axes[0].scatter([], [], marker="s", color="k", label="worst-case robust (white-box)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def figure_robust_epochs(records: list[dict], path: Path, title: str) -> None:
    """The per-epoch PGD-5 accuracy on held-out images of every run that recorded one."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for r in records:
        per = (r.get("robust_val") or {}).get("per_epoch")
        if per:
            ax.plot(range(1, len(per) + 1), [100 * a for a in per], "o-", label=r["name"])
            if r.get("best_robust_epoch"):
                ax.axvline(r["best_robust_epoch"], ls=":", color="gray", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("PGD-5 accuracy, held-out images (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def _minutes(wall: float | None, cpu: float | None) -> str:
    """``wall`` seconds as minutes, with the CPU minutes in brackets where recorded."""
    if wall is None:
        return "not recorded"
    return f"{wall / 60:.1f} min" + (f" ({cpu / 60:.1f} CPU)" if cpu else "")


def _validation_minutes(r: dict) -> str:
    """A record's per-epoch clean plus robust validation time (runs before abnn timed it: not recorded)."""
    if r.get("validation_seconds") is None:
        return "not recorded"
    return _minutes(r["validation_seconds"] + r["robust_validation_seconds"],
                    r["validation_cpu_seconds"] + r["robust_validation_cpu_seconds"])


def _epochs(r: dict) -> str:
    """Epochs trained, fractional where a step budget ended mid-epoch."""
    spe = r.get("steps_per_epoch")
    return f"{round(r['steps'] / spe, 2):g}" if spe else str(r["epochs"])


def _frontier_table(recs: list[dict]) -> list[str]:
    lines = ["## Results (%)", "",
             "| Method | Epochs | Counted N / step | Steps | Total counted cost (N) | Training time | "
             "Per-epoch validation | Clean | PGD-5 | Worst case |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        lines.append(f"| {r['name']} | {_epochs(r)} | {r['cost_N_per_step']:g} | {r['steps']} | "
                     f"{r['total_cost_N']:,} | {_minutes(r['train_seconds'], r.get('train_cpu_seconds'))} | "
                     f"{_validation_minutes(r)} | {pct(r['clean_acc'])} | {pct(r['robust_acc'].get('pgd'))} | "
                     f"**{pct(r['worst_case_acc'])}** |")
    return lines


def _matching_line(m: dict) -> str:
    """How the cost-matched PGD-AT's budget was set, and how close its measured seconds came to
    ABNN's (results written before the step budget matched whole epochs: said as such)."""
    head = (f"Cost-matched PGD-AT, measured in {m['clock']}: ABNN trained in {m['abnn_seconds'] / 60:.1f} min "
            f"and PGD-AT in {m['pgd_at_seconds'] / 60:.1f} min for {m['pgd_at_epochs']} epochs")
    if "matched_steps" in m:
        how = (f" ({m['pgd_at_steps']} steps, {m['pgd_at_seconds_per_step']:.3f} s per step), so the matched PGD-AT "
               f"gets a budget of round({m['abnn_seconds']:.0f} / {m['pgd_at_seconds_per_step']:.3f}) = "
               f"**{m['matched_steps']} steps** ({m['matched_epochs']} epochs, the last partial; cosine schedule over "
               f"the budget, predicted {m['predicted_seconds'] / 60:.1f} min); it trained {m['steps_trained']} steps")
    else:
        how = (f", so the matched PGD-AT ran round({m['pgd_at_epochs']} x {m['abnn_seconds']:.0f} / "
               f"{m['pgd_at_seconds']:.0f}) = **{m['epochs_trained']} epochs** (matched at whole epochs, before "
               "abnn matched at step granularity; cosine schedule over its own epochs)")
    ratio, tolerance = m["matched_seconds"] / m["abnn_seconds"], m.get("tolerance", 0.05)  # older results: 5%
    off = abs(ratio - 1) > tolerance
    return (head + how + f" and took {m['matched_seconds'] / 60:.1f} min by the same clock: **{ratio:.2f}x ABNN's "
            f"seconds** ({'outside' if off else 'within'} the {100 * tolerance:g}% the matching aims at).")


def _fast_at_cost_line(fa: dict, clock: str) -> str:
    """Fast-AT's cost with its per-epoch robust validation (which picks the model it keeps), by
    the matching's clock: a second number beside its training time."""
    val = fa.get({"train_seconds": "robust_validation_seconds",
                  "train_cpu_seconds": "robust_validation_cpu_seconds"}[clock])
    if val is None:
        return ("Its per-epoch robust validation is not part of its training time and was not timed in this run "
                "(runs before abnn timed it).")
    return (f"Its per-epoch robust validation (which picks the model kept) is not part of its training time: "
            f"{val / 60:.1f} min more by the matching's clock, so Fast-AT with its robust validation costs "
            f"**{(fa[clock] + val) / 60:.1f} min** against {fa[clock] / 60:.1f} min of training alone.")


def write_frontier_report(out: Path, summary: dict) -> None:
    out = Path(out)
    recs = summary["records"]
    title = f"Robustness against training cost, preset {summary['preset']['name']}"
    figure_frontier(recs, out / "frontier.png", title, summary["matched"]["clock_key"])
    figure_robust_epochs(recs, out / "fast_at_epochs.png", "Fast-AT: per-epoch PGD-5 accuracy (catastrophic overfitting)")
    lines = study_header(title, summary)
    lines += _frontier_table(recs)
    m = summary["matched"]
    sub = summary["substitute"]
    lines += ["", "Counted N / step: network passes per training step, counted by hooks while the run trained "
              "(never from the formula); total counted cost = counted passes over the whole run. Training time: "
              "wall-clock minutes of the training steps (evaluation excluded), with the process CPU minutes in "
              "brackets where recorded (on a shared machine, the CPU minutes of a one-thread run are what it costs "
              "on one core), "
              f"{recs[0].get('threads')} torch thread(s) per run, precision `{recs[0].get('amp')}`. Per-epoch "
              "validation: the minutes (CPU minutes) of the clean and robust accuracy measured after each epoch, "
              "not part of the training time.", "",
              _matching_line(m), "",
              f"ABNN's cost above excludes its substitute, pretrained once and reusable for any target: "
              f"{sub.get('arch')} width {sub.get('width')} on {sub.get('dataset')}, {sub.get('epochs')} epochs, "
              f"{(sub.get('train_seconds') or 0) / 60:.1f} min, validation accuracy {pct(sub.get('val_acc'))}%.", ""]
    fa = next((r for r in recs if r["method"] == "fast-at"), None)
    if fa is not None and fa.get("robust_val"):
        rv = fa["robust_val"]
        co = fa.get("catastrophic_overfitting_epochs") or []
        lines += ["## Fast-AT", "",
                  f"FGSM with a random start (Wong, Rice & Kolter 2020), counted {fa['cost_N_per_step']:g}N per step; "
                  "BN in train mode during the attack step, as in the authors' code. Per-epoch PGD-5 accuracy on "
                  f"{rv['n']} held-out images ({rv['source']}): "
                  + ", ".join(pct(a) for a in rv["per_epoch"]) + f". Best epoch {fa.get('best_robust_epoch')}; the "
                  f"evaluated model is epoch {fa.get('model_pt_epoch')} (the best-robust checkpoint, as Wong et al. "
                  "keep). "
                  + (f"**Catastrophic overfitting** at epoch(s) {', '.join(map(str, co))} (a fall of more than 20 "
                     "points below the best)." if co else "No catastrophic overfitting (no fall of more than 20 "
                                                          "points below the best epoch)."), "",
                  _fast_at_cost_line(fa, summary["matched"]["clock_key"]), "",
                  "![Fast-AT per-epoch robust accuracy](fast_at_epochs.png)", ""]
    lines += ["## Figure", "", "![frontier](frontier.png)", "",
              "Each method is one point: hollow circle = clean accuracy, filled square = worst-case robust accuracy.", ""]
    lines += every_attack_table(recs, summary["evaluation"]["attacks"], "Method", "name")
    lines += ["", "Run folders: " + ", ".join(f"{r['name']}: `{r['run']}`" for r in recs) + ".", "",
              "Machine-readable: `results.json`.", ""]
    (out / "report.md").write_text("\n".join(lines))


def figure_substitute_study(records: list[dict], path: Path, title: str) -> None:
    """ABNN's PGD-5 and worst-case robust accuracy (and, for scale, its clean accuracy) against
    its substitute's own accuracy, on the full 0-100% scale."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=100)
    for i, r in enumerate(records):
        x = 100 * r["substitute_val_acc"]
        marker = "^" if r["in_domain"] else "o"
        ax.scatter([x], [100 * r["clean_acc"]], marker="x", color=f"C{i}", s=40)
        ax.scatter([x], [100 * r["robust_acc"].get("pgd", 0)], marker=marker, facecolors="none", edgecolors=f"C{i}", s=60)
        ax.scatter([x], [100 * r["worst_case_acc"]], marker=marker, color=f"C{i}", s=60, label=r["label"])
    ax.set_xlabel("substitute's own validation accuracy (%)\n(in-domain: CIFAR-10 test; others: tinyimagenet32 val)")
    ax.set_ylabel("ABNN accuracy (%)")
    ax.set_ylim(-2, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left",
              title="x: clean; hollow: PGD-5; filled: worst case; triangle: in-domain", title_fontsize=6)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


#: what the substitute study's "target" shift measures, named as what it is
TARGET_MOMENTS = "the target's per-sample feature moments mu, sigma (not used in eval mode)"


def write_substitute_study_report(out: Path, summary: dict) -> None:
    out = Path(out)
    recs = summary["records"]
    title = f"ABNN and the strength of its substitute, preset {summary['preset']['name']}"
    figure_substitute_study(recs, out / "substitute_study.png", title)
    lines = study_header(title, summary)
    lines += ["## Results (%)", "",
              "| Substitute | Its own accuracy | ABNN clean | PGD-5 | Worst case | Shift of mu(z_s) | Shift of sigma(z_s) | "
              f"Shift of {TARGET_MOMENTS} |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        sh = r["statistics_shift"]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        lines.append(f"| {r['label']} | {pct(r['substitute_val_acc'])} ({r['substitute_val_dataset']}) | "
                     f"{pct(r['clean_acc'])} | {pct(r['robust_acc'].get('pgd'))} | **{pct(r['worst_case_acc'])}** | "
                     f"{mean(sh['substitute']['mu']):.3f} | {mean(sh['substitute']['sigma']):.3f} | "
                     f"{mean(sh['target']['mu']):.3f}, {mean(sh['target']['sigma']):.3f} |")
    lines += ["", "In-domain substitutes (trained on CIFAR-10, the target's own dataset) break the paper's premise on "
              "purpose: they bound what any substitute could give. Their accuracy is on the CIFAR-10 test set (10 "
              "classes), the others' on the tinyimagenet32 validation set (200 classes): the two are not on one scale.",
              "", "Shift: the mean over test images and stages of |m(x_adv) - m(x)| / |m(x)|, for m the per-sample mean "
              "(mu) or standard deviation (sigma) over all of a stage's activations, x_adv the paper's PGD-5 example "
              "against the whole ABNN model. The paper claims the substitute's statistics stay \"relatively "
              "unaffected\". The last column is the same measure on the target's stage outputs z_t before adaptive "
              "BN: an eval-mode ABNN does not use these moments (it normalises z_t with its BN's running statistics, "
              "fixed at test time), so they only show how far the attack moves a feature's per-sample moments, "
              "not a statistic the defense depends on.", "",
              "## Per stage", ""]
    for r in recs:
        sh = r["statistics_shift"]
        lines.append(f"- {r['label']}: substitute mu " + ", ".join(f"{v:.3f}" for v in sh["substitute"]["mu"])
                     + "; sigma " + ", ".join(f"{v:.3f}" for v in sh["substitute"]["sigma"])
                     + "; target (moments not used in eval mode) mu " + ", ".join(f"{v:.3f}" for v in sh["target"]["mu"])
                     + "; sigma " + ", ".join(f"{v:.3f}" for v in sh["target"]["sigma"]) + f" (stages {', '.join(sh['stages'])})")
    lines += ["", "## Figure", "", "![substitute study](substitute_study.png)", ""]
    lines += every_attack_table(recs, summary["evaluation"]["attacks"], "Substitute", "label")
    lines += ["", "Run folders: " + ", ".join(f"{r['substitute']}: `{r['run']}`" for r in recs) + ".", "",
              "Machine-readable: `results.json`.", ""]
    (out / "report.md").write_text("\n".join(lines))
