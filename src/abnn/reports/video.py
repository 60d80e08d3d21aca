"""The video report (Tables 2 and 3, UCF-101): ``report.md`` with the paper's numbers beside
ours, the accuracy and cost figures of Table 1's report, and a few frames of one clip."""

from __future__ import annotations

from pathlib import Path

import torch

from ..attacks.pgd import FIRST_FOOLING_NOTE
from ..plotting import pyplot
from .common import pct, save_figure
from .table1 import figures_lines, pass_counts, table_header, write_figures


def figure_video_examples(ex: dict, path: Path, frames: int = 4, magnify: float = 15.0) -> None:
    """A few frames of one clip: clean, PGD perturbation x``magnify``, PGD, ROA."""
    plt = pyplot()

    x, x_pgd, x_roa = ex["x"][0], ex["x_pgd"][0], ex["x_roa"][0]          # (C, T, H, W)
    t_idx = torch.linspace(0, x.shape[1] - 1, min(frames, x.shape[1])).round().long().tolist()
    rows = [("clean", x), (f"PGD pert. x{magnify:g}", (0.5 + magnify * (x_pgd - x)).clamp(0, 1)),
            ("PGD", x_pgd), ("ROA", x_roa)]
    names = ex.get("class_names") or []
    fig, axes = plt.subplots(len(rows), len(t_idx), figsize=(1.6 * len(t_idx), 1.6 * len(rows)), dpi=100)
    for i, (label, clip) in enumerate(rows):
        for j, t in enumerate(t_idx):
            ax = axes[i][j]
            ax.imshow(clip[:, t].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            if i == 0:
                ax.set_title(f"frame {t}", fontsize=7)
    pred = {k: int(ex[f"pred_{k}"][0]) for k in ("clean", "pgd", "roa")}
    label = lambda i: names[i] if i < len(names) else str(i)  # noqa: E731
    fig.suptitle(f"{ex.get('method', '')}: true {label(int(ex['y'][0]))}; predicted clean {label(pred['clean'])}, "
                 f"PGD {label(pred['pgd'])}, ROA {label(pred['roa'])}", fontsize=7)
    save_figure(fig, path)


def write_video_report(out: Path, results: dict, examples_path: Path | None = None) -> None:
    """Tables 2 (PGD) and 3 (ROA) of the paper with our numbers beside them."""
    out = Path(out)
    records = results["records"]
    preset = results["preset"]
    title = f"Tables 2 and 3 reproduction (video), preset {preset['name']}"
    write_figures(out, records, title, examples_path, figure_video_examples)
    lines = table_header(title, preset, records[0]["versions"])
    if preset["name"] == "smoke":
        lines += ["**These accuracies mean nothing**: 13 clips, trained and tested on the same clips, an untrained "
                  "substitute. The smoke preset only proves that every stage of the video pipeline runs.", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    for tab, key, attack in (("Table 2", "pgd", "PGD"), ("Table 3", "roa", "ROA")):
        lines += [f"## {tab}: {preset['dataset']}, white-box {attack} (%)", "",
                  f"| Method | Clean (ours) | {attack} (ours) | Clean (paper) | {attack} (paper) | Cost counted | Cost (paper) | Time / step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in records:
            p = r["paper"]
            lines.append(f"| {r['name']} | {pct(r['clean_acc'])} | {pct(r['robust_acc'].get(key))} | {p['clean']} | "
                         f"{p[key]} | {r['cost_N_per_step']:g}N | {p['cost']} | {1000 * r['seconds_per_step']:.0f} ms |")
        lines.append("")
    lines += ["Robust accuracy counts a clip only if it is classified correctly both clean and under attack.", "",
              FIRST_FOOLING_NOTE, ""]
    lines += figures_lines(out)
    lines += ["## Settings", "", "| Method | architecture | width | epochs | train clips | batch | eval clips | counted passes per network |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['architecture']} | {r['width']} | {r['epochs']} | {r['train_size']} | "
                     f"{r['batch_size']} | {r['n_eval']} | {pass_counts(r)} |")
    lines += ["", "Attacks:", ""] + [f"- {k}: `{a}`" for k, a in records[0]["attacks"].items()]
    sub = next((r.get("substitute") for r in records if r.get("substitute")), None)
    if sub:
        lines += ["", f"ABNN substitute: {sub['arch']} width {sub['width']}, source `{sub['source']}`, statistics "
                      f"`{sub['stats']}`, encoder `{sub['encoder']}`."]
    lines += ["", "OUDefend: the feature-restoration block after layer3, trained with PGD-AT (eps "
              f"{preset['eps'] * 255:g}/255, alpha eps/4, {preset['at_steps']} steps); its block is counted as a "
              "network of its own (the paper's 4N(t_max+1) assumes it costs as much as the target).", "",
              "Full machine-readable results: `results.json`.", ""]
    (out / "report.md").write_text("\n".join(lines))
