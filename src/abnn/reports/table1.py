"""The Table 1 report: ``report.md`` (the paper's table layout, our numbers beside the paper's,
every setting), and PNG figures (accuracy bars, training-time bars, a Figure-3-style example
panel); the figures and ``examples.pt`` loader that the video report (Tables 2 and 3) shares."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ..attacks.pgd import FIRST_FOOLING_NOTE
from ..plotting import pyplot
from .common import generated, overrides_lines, pct, save_figure


def _precision(preset: dict) -> str:
    """The training precision and layout of a preset (``amp`` auto: bf16/fp16 on CUDA, float32 on CPU)."""
    amp = preset.get("amp", "auto")
    text = {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler",
            "auto": "auto (bf16 autocast on CUDA, float32 on CPU)"}.get(amp, amp)
    return text + (", channels-last" if preset.get("channels_last") else "") + (
        ", data on the device" if preset.get("data_on_device") else "")


def _paper(v) -> str:
    """A paper column: its value, or a dash for a method the paper does not report (Fast-AT)."""
    return "—" if v is None else str(v)


def figure_accuracy(records: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    names = [r["name"] for r in records]
    series = [("clean", [r["clean_acc"] for r in records]),
              ("PGD", [r["robust_acc"].get("pgd") for r in records]),
              ("ROA", [r["robust_acc"].get("roa") for r in records])]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    w = 0.25
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - 1) * w for j in range(len(records))]
        bars = ax.bar(xs, [100 * (v or 0) for v in vals], w, label=f"{label} (ours)")
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, 100 * (v or 0) + 1, pct(v), ha="center", fontsize=7)
    styles = {"clean": ("k--", -1), "pgd": ("k:", 0), "roa": ("k-.", 1)}
    shown = set()
    for j, r in enumerate(records):
        p = r.get("paper") or {}
        for key, (style, off) in styles.items():
            if p.get(key) is not None:
                ax.plot([j + (off - 0.5) * w, j + (off + 0.5) * w], [p[key]] * 2, style, lw=1.1)
                shown.add(key)
    for key in ("clean", "pgd", "roa"):
        if key in shown:
            ax.plot([], [], styles[key][0], lw=1.1, label=f"paper {key if key == 'clean' else key.upper()}")
    ax.set_xticks(range(len(records)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    save_figure(fig, path)


def figure_cost(records: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    names = [r["name"] for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(6.4, 2.8), dpi=100)
    n = [r["cost_N_per_step"] for r in records]
    bars = a1.bar(names, n, color="tab:gray")
    for b, v in zip(bars, n):
        a1.text(b.get_x() + b.get_width() / 2, v, f"{v:g}N", ha="center", va="bottom", fontsize=8)
    a1.set_title("counted network passes per step", fontsize=9)
    s = [1000 * r["seconds_per_step"] for r in records]
    bars = a2.bar(names, s, color="tab:blue")
    for b, v in zip(bars, s):
        a2.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} ms", ha="center", va="bottom", fontsize=8)
    a2.set_title("measured time per training step", fontsize=9)
    for a in (a1, a2):
        a.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def figure_examples(ex: dict, path: Path, magnify: float = 15.0) -> None:
    """Rows: clean, PGD perturbation x``magnify`` (around gray), PGD example, ROA example."""
    plt = pyplot()

    x, x_pgd, x_roa = ex["x"], ex["x_pgd"], ex["x_roa"]
    names = ex.get("class_names") or [str(i) for i in range(int(ex["y"].max()) + 1)]
    rows = [("clean", x, ex["pred_clean"]),
            (f"PGD perturbation x{magnify:g}", (0.5 + magnify * (x_pgd - x)).clamp(0, 1), None),
            ("PGD", x_pgd, ex["pred_pgd"]),
            ("ROA", x_roa, ex["pred_roa"])]
    n = x.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), dpi=100)
    for i, (label, imgs, pred) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if pred is not None:
                ok = int(pred[j]) == int(ex["y"][j])
                ax.set_title(names[int(pred[j])], fontsize=6, color="green" if ok else "red")
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"{ex.get('method', '')}: clean, PGD (eps 8/255) and ROA examples; titles = predictions", fontsize=8)
    save_figure(fig, path)


def write_figures(out: Path, records: list[dict], title: str, examples_path: Path | None, examples_fn) -> None:
    """accuracy.png, training_cost.png and, when examples were saved, examples.png."""
    figure_accuracy(records, out / "accuracy.png", title)
    figure_cost(records, out / "training_cost.png", title)
    if examples_path is not None and Path(examples_path).is_file():
        examples_fn(load_examples(examples_path), out / "examples.png")


def figures_lines(out: Path) -> list[str]:
    """The report's figures section: accuracy and training cost, and the examples when drawn."""
    lines = ["## Figures", "", "![accuracy](accuracy.png)", "", "![training cost](training_cost.png)", ""]
    if (out / "examples.png").is_file():
        lines += ["![examples](examples.png)", ""]
    return lines


def pass_counts(record: dict) -> str:
    """A record's counted passes per network, ``name: forward F/backward B``."""
    return ", ".join(f"{k}: {c['forward']}F/{c['backward']}B" for k, c in record["cost_counts"].items())


#: what ``examples.pt`` holds (``abnn.reproduce.table1.make_examples``): tensors of one batch
EXAMPLE_TENSORS = ("x", "y", "x_pgd", "x_roa", "pred_clean", "pred_pgd", "pred_roa")


def load_examples(path: str | os.PathLike) -> dict:
    """``examples.pt`` read safely (:func:`abnn.models.io.safe_torch_load`: no pickled code) and
    checked: the example tensors of one batch, else one :class:`~abnn.errors.CheckpointError` line."""
    from ..errors import CheckpointError
    from ..models.io import safe_torch_load

    ex = safe_torch_load(path)
    ok = isinstance(ex, dict) and all(isinstance(ex.get(k), torch.Tensor) for k in EXAMPLE_TENSORS)
    if ok:
        x, n = ex["x"], len(ex["x"])
        ok = (n > 0 and x.dim() in (4, 5) and x.shape == ex["x_pgd"].shape == ex["x_roa"].shape
              and all(ex[k].shape == (n,) for k in ("y", "pred_clean", "pred_pgd", "pred_roa")))
    if not ok:
        raise CheckpointError(f"{path} is not an examples file of `abnn reproduce` (it needs the tensors "
                              f"{', '.join(EXAMPLE_TENSORS)} of one batch); delete it and rerun to remake it")
    return ex


def table_header(title: str, preset: dict, versions: dict, machine: str = "") -> list[str]:
    """The opening of a table's report: title, versions (and ``machine``), preset, overrides."""
    return [f"# {title}", "", f"{generated(versions)}{machine}).", "",
            f"Preset: **{preset['name']}**: {preset['description']}.", "", *overrides_lines(preset)]


def write_table1_report(out: Path, results: dict, examples_path: Path | None = None) -> None:
    out = Path(out)
    records = results["records"]
    preset = results["preset"]
    title = f"Table 1 reproduction, preset {preset['name']}"
    write_figures(out, records, title, examples_path, figure_examples)

    by = {r["method"]: r for r in records}
    lines = table_header(title, preset, records[0]["versions"], f", {platform.machine()}")
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += ["## Table 1: CIFAR-10, white-box PGD and ROA (%)", "",
              "| Method | Clean (ours) | PGD (ours) | ROA (ours) | Clean (paper) | PGD (paper) | Cost counted | Cost (paper) | Train time | Time / step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        p = r["paper"]
        lines.append(f"| {r['name']} | {pct(r['clean_acc'])} | {pct(r['robust_acc'].get('pgd'))} | "
                     f"{pct(r['robust_acc'].get('roa'))} | {_paper(p['clean'])} | {_paper(p['pgd'])} | {r['cost_N_per_step']:g}N | "
                     f"{_paper(p['cost'])} | {r['train_seconds'] / 60:.1f} min | {1000 * r['seconds_per_step']:.0f} ms |")
    lines += ["", "Cost counted: network passes per training step, counted by hooks while training ran. Train time "
              "and time / step are wall-clock seconds measured as the runs went; when stages ran concurrently or on a "
              "loaded machine they are not comparable across methods (`abnn bench train-cost` times every method in "
              "one process on one batch).", "",
              "The paper reports no ROA number for CIFAR-10 (its ROA results are on UCF-101, Table 3)"
              + ("; nor any Fast-AT number (—): Fast-AT is beyond the paper (METHOD.md s. 5)." if "fast-at" in by
                 else "."),
              "Robust accuracy counts a test image only if it is classified correctly both clean and under attack.",
              FIRST_FOOLING_NOTE, ""]
    if "abnn" in by and "standard" in by:
        a, s = by["abnn"], by["standard"]
        lines += ["## Measured relations (the paper's claims, checked)", ""]
        lines.append(f"- Clean accuracy given up for robustness: ABNN {100 * (s['clean_acc'] - a['clean_acc']):+.1f} points "
                     "vs no defense" + (f", PGD-AT {100 * (s['clean_acc'] - by['pgd-at']['clean_acc']):+.1f} points"
                                        if "pgd-at" in by else "") + " (paper: 5.9 and 10.1).")
        lines.append(f"- PGD robustness gained over no defense: ABNN {100 * (a['robust_acc']['pgd'] - s['robust_acc']['pgd']):+.1f} points"
                     + (f", PGD-AT {100 * (by['pgd-at']['robust_acc']['pgd'] - s['robust_acc']['pgd']):+.1f} points"
                        if "pgd-at" in by else "") + " (paper: +31.5 and +51.6).")
        if "pgd-at" in by:
            at = by["pgd-at"]
            lines.append(f"- Training cost, counted: PGD-AT / ABNN = {at['cost_N_per_step'] / a['cost_N_per_step']:.2f} "
                         f"(paper: 12N / 3N = 4); measured seconds per step: PGD-AT / ABNN = "
                         f"{at['seconds_per_step'] / a['seconds_per_step']:.2f}, ABNN / no defense = "
                         f"{a['seconds_per_step'] / s['seconds_per_step']:.2f}.")
        lines.append("")
    sub = results.get("substitute") or {}
    if sub:
        lines += ["## Substitute", ""]
        if sub.get("source") == "pretrain":
            lines.append(f"VGG-19-BN at width {sub.get('width')}, pretrained here on {sub.get('dataset')} "
                         f"({sub.get('train_size')} images, {sub.get('epochs')} epochs, "
                         f"{sub.get('train_seconds', 0) / 60:.1f} min): validation accuracy "
                         f"**{pct(sub.get('val_acc'))}%** on {sub.get('val_size')} images (200 classes). "
                         "The paper's substitute is an ImageNet VGG-19-BN; this one is far weaker.")
        else:
            lines.append(f"VGG-19-BN with the weights `{sub.get('source')}`, trained on {sub.get('dataset')}.")
        lines.append("")
    lines += figures_lines(out)
    lines += ["## Settings", "", "| Method | width | epochs | train images | batch | eval images | counted passes per network | device, threads |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['width']} | {r['epochs']} | {r['train_size']} | {r['batch_size']} | "
                     f"{r['n_eval']} | {pass_counts(r)} | {r.get('device')}, {r.get('threads')} |")
    lines += ["", "Attacks (white-box on the entire model; for ABNN through target and substitute):", ""]
    for name, rep in records[0]["attacks"].items():
        lines.append(f"- {name}: `{rep.split('(', 1)[0]}({rep.split('(', 1)[1] if '(' in rep else ''}`")
    lines += ["", "Common training settings: SGD momentum 0.9, weight decay 5e-4, cosine decay from lr "
              f"{preset['lr']}, batch {preset['batch_size']}, standard augmentation (4-pixel padded random crop, "
              f"flip), seed {preset['seed']}. PGD-AT: PGD with eps 8/255, alpha 2/255, {preset['at_steps']} steps, "
              "random start, generated in eval mode. "
              + (f"Fast-AT: FGSM from a random start (Wong et al. 2020), the epoch of best per-epoch PGD-5 accuracy "
                 f"on {preset.get('robust_val_size')} held-out images kept. " if "fast-at" in by else "")
              + f"Training precision: {_precision(preset)}; evaluation and per-epoch validation in float32. "
              "ABNN: adaptive BN after the stem and layer1..layer4, "
              f"substitute statistics `{by.get('abnn', {}).get('substitute', {}).get('stats', 'sample')}`, encoder "
              f"`{by.get('abnn', {}).get('substitute', {}).get('encoder', 'flatten')}`.", "",
              "Full machine-readable results: `results.json`.", ""]
    (out / "report.md").write_text("\n".join(lines))
