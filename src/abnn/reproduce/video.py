"""Tables 2 and 3 (UCF-101) in one command: no defense, OUDefend, ABNN; clean, PGD, ROA.

The same stages as Table 1 (run folders, resumable, ``force`` redoes) with 5-D clips: PGD at
eps 1/255 (alpha eps/4, 5 steps), ROA with a 35x35 rectangle per frame (about 10% of 112x112)
at independent random positions (METHOD.md s. 4).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import write_json_atomic
from ..data import load_dataset
from ..evaluation import build_attack
from ..runs import load_run
from ..training.checkpoint import save_atomic
from ..training.loop import software_versions
from .presets import METHOD_NAMES, PAPER_VIDEO, VideoPreset
from .table1 import _log, _stage_eval, _stage_train


def _examples(out: Path, preset: VideoPreset, data_root: str | None, device: str) -> Path:
    path = out / "examples.pt"
    if path.is_file():
        return path
    method = "abnn" if "abnn" in preset.methods else preset.methods[0]
    model, _ = load_run(out / method, device=device)
    data = load_dataset(preset.dataset, "test", data_root).subset(2)
    if hasattr(data, "float_batch"):
        x, y = data.float_batch(slice(None))
    else:
        x, y = next(iter(data.batches(2)))
    x, y = x.to(device), y.to(device)
    opts = preset.attack_options()
    x_pgd = build_attack("pgd", model, seed=preset.seed, **opts["pgd"])(x, y)
    x_roa = build_attack("roa", model, seed=preset.seed, **opts["roa"])(x, y)
    with torch.no_grad():
        preds = {k: model(v).argmax(1).cpu() for k, v in (("clean", x), ("pgd", x_pgd), ("roa", x_roa))}
    save_atomic({"method": method, "x": x.cpu(), "y": y.cpu(), "x_pgd": x_pgd.cpu(), "x_roa": x_roa.cpu(),
                 "pred_clean": preds["clean"], "pred_pgd": preds["pgd"], "pred_roa": preds["roa"],
                 "class_names": list(getattr(data, "class_names", ()) or getattr(data, "classes", ()))}, path)
    return path


def run_video_tables(preset: VideoPreset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
                     force: bool = False, progress: bool = True, command: str = "") -> dict:
    """Train and evaluate every method of ``preset``; write report.md, results.json, figures."""
    from ..report import write_video_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    write_json_atomic(out / "preset.json", preset.to_dict())
    opts = preset.attack_options()
    records = []
    for method in preset.methods:
        cfg = preset.method_config(method)
        cfg.data_root = data_root
        cfg.device = device
        tr = _stage_train(out / method, cfg, force=force, progress=progress)
        ev = _stage_eval(out / method, preset, data_root, device, force=force, progress=progress, opts=opts,
                         dataset=preset.dataset)
        rec = {
            "method": method, "name": METHOD_NAMES[method], "dataset": preset.dataset, "architecture": cfg.arch,
            "width": cfg.width, "epochs": cfg.epochs, "train_size": tr["train_size"], "batch_size": cfg.batch_size,
            "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"], "n_eval": ev["n_eval"],
            "attacks": ev["attacks"], "attack_seconds": ev["attack_seconds"],
            "cost_N_per_step": tr["cost_N_per_step"], "cost_counts": tr["cost"]["per_network"],
            "train_seconds": tr["train_seconds"], "seconds_per_step": tr["seconds_per_step"],
            "threads": tr.get("threads"), "device": tr.get("device"), "seed": cfg.seed,
            "skipped_videos": tr.get("skipped_videos", []),
            "versions": software_versions(), "paper": PAPER_VIDEO[method],
        }
        if method == "abnn":
            rec["substitute"] = {"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                                 "stats": cfg.substitute_stats, "encoder": cfg.encoder}
        records.append(rec)
    examples = _examples(out, preset, data_root, device)
    results = {"preset": preset.to_dict(), "records": records, "command": command,
               "pipeline_seconds_this_call": time.perf_counter() - t_start}
    write_json_atomic(out / "results.json", results)
    write_video_report(out, results, examples)
    _log(f"report written to {out / 'report.md'}")
    return results
