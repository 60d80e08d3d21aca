"""Table 1 in one command: substitute -> standard / PGD-AT / ABNN -> clean, PGD, ROA -> report.

Every stage is a run folder under the output folder; a rerun skips finished stages (and resumes
an interrupted training from its last checkpoint), ``force=True`` redoes them.  A finished stage
whose settings differ from the preset's is never silently reused: it is an error that says so.
The stages are the :class:`~abnn.reproduce.stages.TrainPoint` of :func:`table1_points` and their
:class:`~abnn.reproduce.stages.TableEval` evaluations, built and scheduled as every study's are.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..attacks import build_attack
from ..config import TrainConfig, write_json_atomic
from ..errors import CheckpointError
from ..evaluation.results import EvalResult
from ..files import ensure_writable
from ..runs import DOWNLOADABLE, load_run
from ..training.checkpoint import save_atomic
from ..training.loop import software_versions
from ..training.methods import get_method, paper_row
from .presets import Table1Preset
from .stages import TableEval, TrainPoint, eval_data, log, schedule, train_and_eval_stages


def make_examples(out: Path, preset, data_root: str | None, device: str, *, force: bool = False) -> Path:
    """Clean inputs with their PGD and ROA adversarial examples on the ABNN model (Figure 3).

    ``examples.pt`` records the digest of the model's weights and the settings it was made with;
    it is reused only when both are unchanged (never under ``force``), so the figure always shows
    the model of the report."""
    from ..evaluation.runner import digest
    from ..models.io import safe_torch_load

    path = out / "examples.pt"
    method = "abnn" if "abnn" in preset.methods else preset.methods[0]
    model, _ = load_run(out / method, device=device)
    made_with = {"model_digest": digest(model), "n_examples": preset.n_examples, "seed": preset.seed,
                 "attack_options": preset.attack_options()}
    if path.is_file() and not force:
        try:
            old = safe_torch_load(path)
        except CheckpointError as exc:
            old = None
            log(f"{exc}; remade")
        if isinstance(old, dict) and old.get("made_with") == made_with:
            return path
        log("examples.pt was made from other weights or settings; remade")
    data = eval_data(preset.dataset, data_root, preset.n_examples, getattr(preset, "frames", None))
    x, y = data.float_batch(slice(None)) if hasattr(data, "float_batch") else next(iter(data.batches(preset.n_examples)))
    x, y = x.to(device), y.to(device)
    opts = preset.attack_options()
    video = x.dim() == 5
    x_pgd = build_attack("pgd", model, video=video, seed=preset.seed, **opts["pgd"])(x, y)
    x_roa = build_attack("roa", model, video=video, seed=preset.seed, **opts["roa"])(x, y)
    with torch.no_grad():
        preds = {k: model(v).argmax(1).cpu() for k, v in (("clean", x), ("pgd", x_pgd), ("roa", x_roa))}
    names = getattr(data, "class_names", ()) or getattr(data, "classes", ())
    save_atomic({"method": method, "x": x.cpu(), "y": y.cpu(), "x_pgd": x_pgd.cpu(), "x_roa": x_roa.cpu(),
                 "pred_clean": preds["clean"], "pred_pgd": preds["pgd"], "pred_roa": preds["roa"],
                 "class_names": list(names), "made_with": made_with}, path)
    return path


def paper_columns(method: str, table: str) -> dict:
    """The paper's columns of ``method`` in ``table`` ("table1", "video") as a record holds them:
    its name, clean, PGD (and ROA where the table has it) and cost; empty columns (None) for a
    method the paper does not report (Fast-AT)."""
    row = paper_row(method, table)
    if row is None:
        return {"name": get_method(method).display, "clean": None, "pgd": None, "cost": None}
    roa = {"roa": row.roa} if row.roa is not None else {}
    return {"name": get_method(method).display, "clean": row.clean, "pgd": row.pgd, **roa, "cost": row.cost}


def table_record(method: str, cfg: TrainConfig, tr: dict, ev: EvalResult, table: str) -> dict:
    """One RobustBench-like results record of a trained and evaluated method, with its row in
    the paper's ``table`` (:func:`paper_columns`)."""
    rec = {
        "method": method, "name": get_method(method).display, "dataset": cfg.dataset, "architecture": cfg.arch,
        "width": cfg.width, "epochs": cfg.epochs, "train_size": tr["train_size"], "batch_size": cfg.batch_size,
        "clean_acc": ev.clean_acc, "robust_acc": ev.robust_acc, "n_eval": ev.n_eval,
        "attacks": {k: r.settings for k, r in ev.attacks.items()},
        "attack_seconds": {k: r.seconds for k, r in ev.attacks.items()},
        "cost_N_per_step": tr["cost_N_per_step"], "cost_counts": tr["cost"]["per_network"],
        "train_seconds": tr["train_seconds"], "seconds_per_step": tr["seconds_per_step"],
        "threads": tr.get("threads"), "device": tr.get("device"), "seed": cfg.seed,
        "versions": software_versions(), "paper": paper_columns(method, table),
    }
    if "skipped_videos" in tr:
        rec["skipped_videos"] = tr["skipped_videos"]
    if method == "abnn":
        rec["substitute"] = {"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                             "stats": cfg.substitute_stats, "encoder": cfg.encoder}
    return rec


def table1_points(preset: Table1Preset, out: Path, data_root: str | None, device: str) -> list[TrainPoint]:
    """The training stages: the substitute (when ABNN is a method and its substitute is
    pretrained here), then one run folder ``out / METHOD`` per method of the preset."""
    points = []
    substitute = preset.substitute_source if "abnn" in preset.methods else None
    if substitute == "pretrain":
        sub_cfg = preset.substitute_config()
        sub_cfg.data_root, sub_cfg.device = data_root, device
        points.append(TrainPoint("substitute", out / "substitute", sub_cfg))
        substitute = str(out / "substitute")
    for method in preset.methods:
        cfg = preset.method_config(method, substitute)
        cfg.data_root, cfg.device = data_root, device
        after = ("substitute",) if method == "abnn" and points and points[0].name == "substitute" else ()
        points.append(TrainPoint(method, out / method, cfg, after))
    return points


def substitute_info(preset: Table1Preset, results: dict) -> dict:
    """What results.json says of the substitute: the one pretrained here, or a weights file's."""
    info: dict = {"source": preset.substitute_source}
    if "substitute" in results:
        sub_res = results["substitute"]
        info.update({"arch": "vgg19_bn", "width": preset.substitute_width, "dataset": "tinyimagenet32",
                     "train_size": sub_res["train_size"], "epochs": preset.substitute_epochs,
                     "val_acc": sub_res["final_val_acc"], "val_size": sub_res["val_size"],
                     "train_seconds": sub_res["train_seconds"]})
    elif "abnn" in preset.methods:
        download = preset.substitute_source in DOWNLOADABLE
        info.update({"arch": "vgg19_bn", "width": preset.substitute_width,
                     "dataset": "ImageNet-1k (torchvision weights)" if download else
                     "the data of the weights file (ImageNet-1k if it is torchvision's own file)",
                     "val_acc": None, "val_acc_note": "not measured here; see torchvision's model card"
                     if download else "not measured here"})
    return info


def run_table1(preset: Table1Preset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
               force: bool = False, progress: bool = True, command: str = "", jobs: int | None = None,
               threads: int | None = None) -> dict:
    """Run the whole Table 1 pipeline into ``out`` and write report.md, results.json, figures.

    Independent stages (the substitute, each method's training, each evaluation) run in
    ``jobs`` processes at once (default: as many as the cores allow), each with ``threads``
    torch threads (default: cores / jobs); the numbers are those of a sequential run with the
    same ``threads``."""
    from ..reports.table1 import write_table1_report

    preset.check_device(device)
    out = Path(out)
    ensure_writable(out)
    note_clamped(preset, data_root)
    t_start = time.perf_counter()
    write_json_atomic(out / "preset.json", preset.to_dict())
    points = table1_points(preset, out, data_root, device)
    models = [p for p in points if p.name != "substitute"]
    stages, done = train_and_eval_stages(points, models, TableEval.of(preset), data_root, device, force=force)
    results, workers, per_stage = schedule("table1", stages, done, jobs=jobs, threads=threads, progress=progress)

    sub = substitute_info(preset, results)
    records = []
    for p in models:
        rec = table_record(p.name, p.cfg, results[p.name], results[f"eval:{p.name}"], "table1")
        if p.name == "abnn":
            rec["substitute"].update({k: v for k, v in sub.items() if k != "source"})
        records.append(rec)
    examples = make_examples(out, preset, data_root, device, force=force)
    summary = {"preset": preset.to_dict(), "records": records, "substitute": sub,
               "command": command, "pipeline_seconds_this_call": time.perf_counter() - t_start,
               "workers": workers, "threads_per_stage": per_stage}
    write_json_atomic(out / "results.json", summary)
    write_table1_report(out, summary, examples)
    log(f"report written to {out / 'report.md'}")
    return summary


def note_clamped(preset, data_root: str | None) -> None:
    """Say so when ``n_eval`` or ``n_examples`` asks for more samples than the test split has."""
    n_test = len(eval_data(preset.dataset, data_root, None, getattr(preset, "frames", None)))
    for name in ("n_eval", "n_examples"):
        if getattr(preset, name) > n_test:
            log(f"note: {name} {getattr(preset, name)} is more than the {n_test} test samples of {preset.dataset}; "
                 f"all {n_test} are used")

