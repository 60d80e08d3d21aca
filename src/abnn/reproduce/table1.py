"""Table 1 in one command: substitute -> standard / PGD-AT / ABNN -> clean, PGD, ROA -> report.

Every stage is a run folder under the output folder; a rerun skips finished stages (and resumes
an interrupted training from its last checkpoint), ``force=True`` redoes them.  A finished stage
whose settings differ from the preset's is never silently reused: it is an error that says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..attacks import build_attack
from ..config import TrainConfig, write_json_atomic
from ..errors import CheckpointError
from ..files import ensure_writable
from ..runs import DOWNLOADABLE, load_run
from ..training.checkpoint import save_atomic
from ..training.loop import software_versions
from ..training.methods import get_method
from .presets import Table1Preset, paper_table1
from .schedule import Stage, plan_workers, run_stages
from .stages import TableEval, eval_data, finished_train, job_eval, job_train, log, stage_weight, with_progress


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


def table_record(method: str, cfg: TrainConfig, tr: dict, ev: dict, paper: dict) -> dict:
    """One RobustBench-like results record of a trained and evaluated method."""
    rec = {
        "method": method, "name": get_method(method).display, "dataset": cfg.dataset, "architecture": cfg.arch,
        "width": cfg.width, "epochs": cfg.epochs, "train_size": tr["train_size"], "batch_size": cfg.batch_size,
        "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"], "n_eval": ev["n_eval"],
        "attacks": ev["attacks"], "attack_seconds": ev["attack_seconds"],
        "cost_N_per_step": tr["cost_N_per_step"], "cost_counts": tr["cost"]["per_network"],
        "train_seconds": tr["train_seconds"], "seconds_per_step": tr["seconds_per_step"],
        "threads": tr.get("threads"), "device": tr.get("device"), "seed": cfg.seed,
        "versions": software_versions(), "paper": paper,
    }
    if "skipped_videos" in tr:
        rec["skipped_videos"] = tr["skipped_videos"]
    if method == "abnn":
        rec["substitute"] = {"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                             "stats": cfg.substitute_stats, "encoder": cfg.encoder}
    return rec


def run_table1(preset: Table1Preset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
               force: bool = False, progress: bool = True, command: str = "", jobs: int | None = None,
               threads: int | None = None) -> dict:
    """Run the whole Table 1 pipeline into ``out`` and write report.md, results.json, figures.

    Independent stages (the substitute, each method's training, each evaluation) run in
    ``jobs`` processes at once (default: as many as the cores allow), each with ``threads``
    torch threads (default: cores / jobs); the numbers are those of a sequential run with the
    same ``threads``."""
    from ..report import write_table1_report

    preset.check_device(device)
    out = Path(out)
    ensure_writable(out)
    note_clamped(preset, data_root)
    t_start = time.perf_counter()
    write_json_atomic(out / "preset.json", preset.to_dict())

    stages: list[Stage] = []
    substitute = None
    if "abnn" in preset.methods:
        if preset.substitute_source == "pretrain":
            sub_cfg = preset.substitute_config()
            sub_cfg.data_root = data_root
            sub_cfg.device = device
            substitute = str(out / "substitute")
            stages.append(Stage("substitute", job_train, (out / "substitute", sub_cfg, force),
                                weight=stage_weight(sub_cfg)))
        else:
            substitute = preset.substitute_source
    spec = TableEval.of(preset)
    cfgs = {}
    for method in preset.methods:
        cfg = cfgs[method] = preset.method_config(method, substitute)
        cfg.data_root = data_root
        cfg.device = device
        needs = ("substitute",) if method == "abnn" and any(s.name == "substitute" for s in stages) else ()
        stages.append(Stage(method, job_train, (out / method, cfg, force), after=needs, weight=stage_weight(cfg)))
        stages.append(Stage(f"eval:{method}", job_eval, (out / method, spec, data_root, device, force),
                            after=(method,), weight=0.5))
    finished = {} if force else {name: r for name, r in
                                 ((m, finished_train(out / m, cfgs[m])) for m in cfgs) if r is not None}
    if not force and "substitute" in [s.name for s in stages]:
        r = finished_train(out / "substitute", sub_cfg)
        if r is not None:
            finished["substitute"] = r
    finished.update({f"eval:{m}": r for m in cfgs if m in finished
                     for r in [spec.finished(out / m)] if r is not None})
    stages = [s for s in stages if s.name not in finished]
    workers, per_stage_threads = plan_workers(jobs, threads, stages)
    with_progress(stages, workers, progress)
    if workers > 1:
        log(f"{len(stages)} stages, {workers} at a time, {per_stage_threads} thread(s) each")
    done = run_stages(stages, workers=workers, threads=per_stage_threads, done=finished,
                      on_done=lambda name, _: log(f"stage {name} done") if workers > 1 else None)

    substitute_info: dict = {"source": preset.substitute_source}
    if "substitute" in done:
        sub_res = done["substitute"]
        substitute_info.update({"arch": "vgg19_bn", "width": preset.substitute_width, "dataset": "tinyimagenet32",
                                "train_size": sub_res["train_size"], "epochs": preset.substitute_epochs,
                                "val_acc": sub_res["final_val_acc"], "val_size": sub_res["val_size"],
                                "train_seconds": sub_res["train_seconds"]})
    elif substitute is not None:
        download = preset.substitute_source in DOWNLOADABLE
        substitute_info.update({"arch": "vgg19_bn", "width": preset.substitute_width,
                                "dataset": "ImageNet-1k (torchvision weights)" if download else
                                "the data of the weights file (ImageNet-1k if it is torchvision's own file)",
                                "val_acc": None, "val_acc_note": "not measured here; see torchvision's model card"
                                if download else "not measured here"})
    records = []
    for method in preset.methods:
        rec = table_record(method, cfgs[method], done[method], done[f"eval:{method}"], paper_table1(method))
        if method == "abnn":
            rec["substitute"].update({k: v for k, v in substitute_info.items() if k != "source"})
        records.append(rec)

    examples = make_examples(out, preset, data_root, device, force=force)
    results = {"preset": preset.to_dict(), "records": records, "substitute": substitute_info,
               "command": command, "pipeline_seconds_this_call": time.perf_counter() - t_start,
               "workers": workers, "threads_per_stage": per_stage_threads}
    write_json_atomic(out / "results.json", results)
    write_table1_report(out, results, examples)
    log(f"report written to {out / 'report.md'}")
    return results


def note_clamped(preset, data_root: str | None) -> None:
    """Say so when ``n_eval`` or ``n_examples`` asks for more samples than the test split has."""
    n_test = len(eval_data(preset.dataset, data_root, None, getattr(preset, "frames", None)))
    for name in ("n_eval", "n_examples"):
        if getattr(preset, name) > n_test:
            log(f"note: {name} {getattr(preset, name)} is more than the {n_test} test samples of {preset.dataset}; "
                 f"all {n_test} are used")

