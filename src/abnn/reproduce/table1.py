"""Table 1 in one command: substitute -> standard / PGD-AT / ABNN -> clean, PGD, ROA -> report.

Every stage is a run folder under the output folder; a rerun skips finished stages (and resumes
an interrupted training from its last checkpoint), ``force=True`` redoes them.  A finished stage
whose settings differ from the preset's is never silently reused: it is an error that says so.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attacks import AttackSpec, build_attack
from ..config import TrainConfig, write_json_atomic
from ..data import load_dataset
from ..errors import CheckpointError
from ..evaluation import run_attacks
from ..files import ensure_writable
from ..runs import DOWNLOADABLE, LOCK_NAME, check_same_run, load_run, read_json, run_lock
from ..training import train
from ..training.checkpoint import save_atomic
from ..training.loop import software_versions
from ..training.methods import get_method
from .presets import Table1Preset, paper_table1
from .schedule import Stage, plan_workers, run_stages


#: seconds a training stage waits for a run folder that another pipeline is training
STAGE_LOCK_WAIT = 12 * 3600.0


def _log(msg: str) -> None:
    tqdm.write(f"[reproduce] {msg}")


def _check_same(run: Path, cfg: TrainConfig) -> None:
    """A stage is reused or resumed only if it was recorded with the preset's defining settings."""
    check_same_run(run, cfg, fix="the preset wants the new values: rerun with --fresh to redo it, or choose another --out")


def _finished_train(run: Path, cfg: TrainConfig) -> dict | None:
    """A finished training stage's results when its settings match, else None."""
    if (run / "model.pt").is_file() and (run / "train_results.json").is_file():
        _check_same(run, cfg)
        _log(f"{run.name}: finished earlier, reused")
        return read_json(run / "train_results.json")
    return None


def _stage_train(run: Path, cfg: TrainConfig, *, force: bool, progress: bool | str) -> dict:
    """Train a stage's run folder, or reuse it when finished with the same settings.  A run that
    another process is training (another study's pipeline) is waited for, then reused."""
    if force and run.exists():
        shutil.rmtree(run)
    if (run / LOCK_NAME).is_file():
        _log(f"{run.name}: a lock is on it; if another process is training it, waiting for that to finish")
    with run_lock(run, wait=STAGE_LOCK_WAIT):
        done = _finished_train(run, cfg)
        if done is not None:
            return done
        resume = (run / "checkpoint.pt").is_file()
        if resume:
            _check_same(run, cfg)
        _log(f"{run.name}: {'resuming' if resume else 'training'} ({cfg.method}, width {cfg.width}, "
             f"{cfg.epochs} epochs)")
        return train(cfg, run, resume=resume, progress=progress).to_dict()


def _test_data(preset, data_root: str | None, n: int):
    """The first ``n`` test samples of the preset's dataset (clips with the preset's frames)."""
    return load_dataset(preset.dataset, "test", data_root, frames=getattr(preset, "frames", None)).subset(n)


def _finished_eval(run: Path, preset) -> dict | None:
    out = run / "eval_table.json"
    if out.is_file():
        res = read_json(out)
        if (res.get("n_eval") == preset.n_eval and res.get("attack_options") == preset.attack_options()
                and res.get("seed") == preset.seed):
            _log(f"{run.name}: evaluation finished earlier, reused")
            return res
    return None


def _stage_eval(run: Path, preset, data_root: str | None, device: str, *, force: bool, progress: bool) -> dict:
    """Clean and robust accuracy of a finished run under the preset's attacks (cached)."""
    out = run / "eval_table.json"
    opts = preset.attack_options()
    done = None if force else _finished_eval(run, preset)
    if done is not None:
        return done
    with run_lock(run):  # one writer per run folder
        model, _ = load_run(run, device=device)
        data = _test_data(preset, data_root, preset.n_eval)
        _log(f"{run.name}: evaluating clean, {', '.join(n.upper() for n in opts)} on {len(data)} test samples")
        ev = run_attacks(model, data, [AttackSpec(name, o, label=name) for name, o in opts.items()], device=device,
                         batch_size=preset.eval_batch_size, seed=preset.seed, progress=progress)
        res = {"n_eval": ev.n_eval, "clean_acc": ev.clean_acc,
               "robust_acc": {k: r.robust_acc for k, r in ev.attacks.items()},
               "attacks": {k: r.settings for k, r in ev.attacks.items()},
               "attack_seconds": {k: r.seconds for k, r in ev.attacks.items()},
               "seconds": ev.seconds, "attack_options": opts, "seed": preset.seed}
        write_json_atomic(out, res)
        return res


def _examples(out: Path, preset, data_root: str | None, device: str, *, force: bool = False) -> Path:
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
            _log(f"{exc}; remade")
        if isinstance(old, dict) and old.get("made_with") == made_with:
            return path
        _log("examples.pt was made from other weights or settings; remade")
    data = _test_data(preset, data_root, preset.n_examples)
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


def _record(method: str, cfg: TrainConfig, tr: dict, ev: dict, paper: dict) -> dict:
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


def _job_train(run: Path, cfg: TrainConfig, force: bool, progress: bool | str) -> dict:
    return _stage_train(run, cfg, force=force, progress=progress)


def _job_eval(run: Path, preset, data_root: str | None, device: str, force: bool, progress: bool) -> dict:
    return _stage_eval(run, preset, data_root, device, force=force, progress=progress)


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
    _note_clamped(preset, data_root)
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
            stages.append(Stage("substitute", _job_train, (out / "substitute", sub_cfg, force),
                                weight=_weight(sub_cfg)))
        else:
            substitute = preset.substitute_source
    cfgs = {}
    for method in preset.methods:
        cfg = cfgs[method] = preset.method_config(method, substitute)
        cfg.data_root = data_root
        cfg.device = device
        needs = ("substitute",) if method == "abnn" and any(s.name == "substitute" for s in stages) else ()
        stages.append(Stage(method, _job_train, (out / method, cfg, force), after=needs, weight=_weight(cfg)))
        stages.append(Stage(f"eval:{method}", _job_eval, (out / method, preset, data_root, device, force),
                            after=(method,), weight=0.5))
    finished = {} if force else {name: r for name, r in
                                 ((m, _finished_train(out / m, cfgs[m])) for m in cfgs) if r is not None}
    if not force and "substitute" in [s.name for s in stages]:
        r = _finished_train(out / "substitute", sub_cfg)
        if r is not None:
            finished["substitute"] = r
    finished.update({f"eval:{m}": r for m in cfgs if m in finished
                     for r in [_finished_eval(out / m, preset)] if r is not None})
    stages = [s for s in stages if s.name not in finished]
    workers, per_stage_threads = plan_workers(jobs, threads, stages)
    for s in stages:  # bars only when one stage runs at a time; epoch lines always
        s.args = (*s.args, progress if workers == 1 else ("lines" if progress and s.fn is _job_train else False))
    if workers > 1:
        _log(f"{len(stages)} stages, {workers} at a time, {per_stage_threads} thread(s) each")
    done = run_stages(stages, workers=workers, threads=per_stage_threads, done=finished,
                      on_done=lambda name, _: _log(f"stage {name} done") if workers > 1 else None)

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
        rec = _record(method, cfgs[method], done[method], done[f"eval:{method}"], paper_table1(method))
        if method == "abnn":
            rec["substitute"].update({k: v for k, v in substitute_info.items() if k != "source"})
        records.append(rec)

    examples = _examples(out, preset, data_root, device, force=force)
    results = {"preset": preset.to_dict(), "records": records, "substitute": substitute_info,
               "command": command, "pipeline_seconds_this_call": time.perf_counter() - t_start,
               "workers": workers, "threads_per_stage": per_stage_threads}
    write_json_atomic(out / "results.json", results)
    write_table1_report(out, results, examples)
    _log(f"report written to {out / 'report.md'}")
    return results


def _note_clamped(preset, data_root: str | None) -> None:
    """Say so when ``n_eval`` or ``n_examples`` asks for more samples than the test split has."""
    n_test = len(_test_data(preset, data_root, None))
    for name in ("n_eval", "n_examples"):
        if getattr(preset, name) > n_test:
            _log(f"note: {name} {getattr(preset, name)} is more than the {n_test} test samples of {preset.dataset}; "
                 f"all {n_test} are used")


def _weight(cfg: TrainConfig) -> float:
    """A rough size of a training stage, only to start the longest chains first."""
    per_step = {"pgd-at": 2 * (cfg.at_steps + 1), "oudefend": 4 * (cfg.at_steps + 1), "abnn": 3,
                "fast-at": 4}.get(cfg.method, 2)
    images = 50_000 if cfg.full_cifar10 else (cfg.train_size or 20_000)
    return cfg.epochs * per_step * images * cfg.width
