"""The ``abnn`` command.  Thin: it parses flags and calls the package.

    abnn pretrain-substitute --out runs/substitute --width 0.5 --epochs 30
    abnn train --method abnn --substitute runs/substitute --out runs/abnn
    abnn evaluate runs/abnn --attack pgd --n-eval 1000

Every problem the user can fix (missing data, bad checkpoint, bad flag value) ends in one
``abnn: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import AMP_MODES, TrainConfig
from .errors import AbnnError

#: the methods ``pretrain-substitute`` offers (the substitute is a plain classifier)
SUBSTITUTE_METHODS = ("standard", "fast-at", "pgd-at")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="folder with the .npz datasets (default: $ABNN_DATA_ROOT)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_opts(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--out", default=None, help="run folder to create (or to continue with --resume); required")
    p.add_argument("--width", type=float, default=d.width, help=f"channel width multiplier (default {d.width})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--total-steps", type=int, default=None, metavar="N",
                   help="a step budget: train exactly N optimiser steps, the cosine schedule over them, the last epoch "
                        "partial where N ends mid-epoch (--epochs is then unused; default: epochs x steps per epoch)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"initial SGD learning rate, cosine decay (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help=f"held-out images for the per-epoch accuracy (default {d.val_size}; -1: all; 0: none)")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps, resumable (smoke tests; the schedule stays the "
                                                                "whole run's: --total-steps makes a shorter run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its checkpoint; every run-defining flag must be "
                        "as recorded in its config.json (--device, --threads, --checkpoint-every ... may change)")
    _add_common(p)


def _add_adversarial_opts(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The options of the adversarial-training methods (pgd-at, fast-at), for targets and substitutes."""
    p.add_argument("--at-steps", type=int, default=d.at_steps, help="PGD-AT attack steps t_max (default 5)")
    p.add_argument("--fast-at-alpha", type=_pixels, default=d.fast_at_alpha, metavar="K/255",
                   help="Fast-AT's FGSM step in 1/255 of the pixel range: 10 or 10/255 (default 10/255 = 1.25 eps)")
    p.add_argument("--robust-val-size", type=int, default=d.robust_val_size, metavar="K",
                   help="per-epoch PGD-5 accuracy on K held-out images (CIFAR-10: JPEG training images no run "
                        "trains on; else the last K test images, left out of the clean validation); 0: off (default)")
    p.add_argument("--keep-best", action="store_true",
                   help="model.pt = the epoch of best per-epoch PGD accuracy (needs --robust-val-size; Wong et al.)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abnn", description="Adaptive Batch Normalization Networks: train, attack, evaluate.")
    parser.add_argument("--version", action="version", version=f"abnn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain-substitute", help="pretrain the VGG-19-BN substitute on tinyimagenet32",
                       description="Pretrain the substitute on a dataset other than the target (METHOD.md s. 3) "
                                   "and report its validation accuracy.")
    p.add_argument("--method", choices=SUBSTITUTE_METHODS, default="standard",
                   help="standard (default; the paper), or an adversarial pretraining at eps 8/255 (fast-at, pgd-at): "
                        "a robust substitute, pretrained once and reused by any number of targets. It breaks the "
                        "paper's 'no adversarial training' premise for the substitute, on purpose")
    d_sub = TrainConfig(dataset="tinyimagenet32", arch="vgg19_bn", lr=0.05, val_size=None)
    _add_adversarial_opts(p, d_sub)
    p.add_argument("--amp", choices=AMP_MODES, default=d_sub.amp, help="mixed precision (as for abnn train)")
    _add_train_opts(p, d_sub)
    p.set_defaults(func=cmd_pretrain, lr=0.05, val_size=-1)

    p = sub.add_parser("train", help="train a CIFAR-10 model: standard, abnn, pgd-at or fast-at",
                       description="Train a target on CIFAR-10 with one method.")
    d = TrainConfig()
    p.add_argument("--method", default="standard", help="a training method (--list-methods shows them)")
    p.add_argument("--list-methods", action="store_true", help="list the training methods and exit")
    p.add_argument("--arch", default=d.arch, help=f"target architecture (default {d.arch})")
    p.add_argument("--substitute", default=None, help="ABNN: substitute run folder, weights file (torchvision's vgg19_bn / r3d_18 "
                   "format too: the offline form of the downloads), or IMAGENET1K_V1 (downloaded)")
    p.add_argument("--substitute-width", type=float, default=d.substitute_width, help="width of a bare substitute weights file")
    p.add_argument("--substitute-stats", choices=("sample", "batch"), default=d.substitute_stats)
    p.add_argument("--substitute-std", choices=("biased", "unbiased"), default=d.substitute_std,
                   help="sigma(z_s): biased sqrt(var+eps) (default) or unbiased torch.std without eps (the authors' code)")
    p.add_argument("--encoder", choices=("flatten", "pooled"), default=d.encoder)
    p.add_argument("--no-bn-affine", action="store_true", help="adaptive layers without BN's own affine")
    p.add_argument("--substitute-arch", default=d.substitute_arch,
                   help="architecture of a bare substitute weights file: vgg19_bn (default), r3d_18, r3d_18_authors, resnet20")
    p.add_argument("--substitute-taps", default=None, metavar="NAME,NAME,...",
                   help="tap the substitute at these module names (one per target stage), e.g. for resnet20: "
                        "layer1.0,layer1,layer2,layer3.0,layer3")
    p.add_argument("--allow-in-domain-substitute", action="store_true",
                   help="accept a substitute trained on CIFAR-10 itself: an upper bound that breaks ABNN's premise")
    _add_adversarial_opts(p, d)
    p.add_argument("--include-jpeg", action="store_true", help="add the 30k JPEG-q75 CIFAR-10 training images")
    _add_train_opts(p, d)
    g = p.add_argument_group(
        "scale, speed and durability",
        "Distributed: `torchrun --standalone --nproc_per_node=K -m abnn.cli train ...` or `--nproc K`; the global "
        "batch stays --batch-size (K processes x batch-size/K), rank 0 writes the run folder, the counted cost is "
        "per rank. None of these options changes the method, the data order or the global batch.")
    g.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="train with K processes on this machine (launches torch.distributed.run; gloo on CPU, "
                        "NCCL on CUDA, one GPU per process); --batch-size must be divisible by K")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="distributed runs: keep per-process BatchNorm statistics instead of synchronising the target's "
                        "BatchNorm over all processes (SyncBN, the default; the frozen ABNN substitute is never synced)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also write checkpoint.pt every N steps within an epoch (default: at epoch ends only); "
                        "--resume continues at the exact step")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="mixed precision: auto (default: bf16 on CUDA where supported, else fp16 with a GradScaler; "
                        "off on CPU), off, bf16, fp16; PGD-AT's attack runs under the same autocast")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster convolutions on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (first steps are slow while it compiles)")
    g.add_argument("--data-on-device", action="store_true",
                   help="keep the uint8 training images on the device and crop/flip batches there (GPUs: the loader "
                        "keeps up); exactly the same batches as without")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clean and robust accuracy of a finished run",
                       description="Evaluate a run folder on the first N test samples under white-box attacks "
                                   "(every attack of the registry: --list-attacks), or run a suite. Budgets eps and "
                                   "alpha count in 1/255 of the pixel range: 8 and 8/255 both mean 8/255.")
    p.add_argument("run", nargs="?", help="run folder (holds config.json and model.pt)")
    p.add_argument("--attack", action="append", default=None, metavar="NAME[:key=value,...]",
                   help="attack to run, repeatable (default pgd); options override the registry's defaults, e.g. "
                        "pgd:steps=20,alpha=0.5/255 or apgd-t:n_target_classes=3; with --suite, added to the suite")
    p.add_argument("--list-attacks", action="store_true", help="list every attack with its defaults and exit")
    p.add_argument("--attribution", action="store_true",
                   help="ABNN forensics instead of attacks: split of the input gradient (target path vs substitute "
                        "statistics/encoder) and the path swap, on the first --n-eval images (JSON: --out, default "
                        "RUN/forensics.json)")
    p.add_argument("--n-eval", type=int, default=1000, help="test samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", default=None, metavar="K[/255]",
                   help="the evaluated L-inf radius in 1/255 of the pixel range, e.g. 8 or 8/255 (default 8/255 for "
                        "images, 1/255 for clips); every attack with an eps takes it unless its spec sets one")
    p.add_argument("--steps", type=int, default=None, help="steps of every --attack that has steps (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="run seed; every attack derives its own seed from it and its name")
    p.add_argument("--out", default=None,
                   help="JSON output (default RUN/eval.json; --suite autoattack: RUN/autoattack.json); with "
                        "--suite full/quick a folder (default RUN/suite)")
    p.add_argument("--suite", choices=("full", "quick", "autoattack"), default=None,
                   help="full/quick: the robustness checklist instead of --attack (all attacks, per-sample worst case, "
                        "eps/steps sanity curves, gradient-masking flags; 'quick' scales the budgets down for CPU); "
                        "autoattack: the authors' AutoAttack, standard version (pip install -e '.[autoattack]')")
    p.add_argument("--source", action="append", default=None, metavar="[NAME=]RUN",
                   help="a finished run folder to transfer attacks from (repeatable): the suite transfers from each, "
                        "--attack transfer:source=NAME from one")
    p.add_argument("--fresh", action="store_true",
                   help="discard the progress of an interrupted evaluation in the output folder (attack-progress.pt) "
                        "and start over; by default the same command continues from it")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="reproduce a table of the paper in one command",
                       description="Run a whole table: substitute, every method, evaluation, report.md, results.json, "
                                   "figures. Finished stages are reused (resumable); --force redoes them.")
    p.add_argument("table", choices=("table1", "table2", "table3", "video", "frontier", "substitute-study", "studies",
                                     "robust-substitute", "forensics"),
                   help="table1: CIFAR-10 PGD; table2/table3/video: UCF-101 PGD and ROA (one run makes both); "
                        "frontier: clean and worst-case accuracy against training cost (no defense, ABNN, Fast-AT, "
                        "PGD-AT at the preset's and at ABNN's training time); substitute-study: ABNN with "
                        "substitutes of increasing strength (both on the Table 1 preset); studies: both, in one "
                        "schedule that trains their shared models once (OUT/frontier, OUT/substitute-study); "
                        "robust-substitute: ABNN with an adversarially pretrained substitute against a probe on it "
                        "and Fast-AT / PGD-AT; forensics: ABNN under weaker attack protocols, gradient attribution "
                        "and path swap (why the paper saw robustness)")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "gpu", "paper"),
                   help="smoke: minutes, tiny; cpu: about 75 min on 2 cores (table1 only); gpu: one H100/H200-class GPU, "
                        "offline, about 6 min by estimate (table1); paper: full scale, GPU + network")
    p.add_argument("--estimate", action="store_true",
                   help="table1: print the preset's counted training and evaluation FLOPs and its time at an assumed "
                        "GPU throughput, and run nothing (--out FILE.json also writes them)")
    p.add_argument("--out", default=None, help="output folder (default out/<table>-<preset>)")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a preset field (repeatable), e.g. --set epochs=2 --set amp=bf16; recorded in "
                        "preset.json, results.json and the report")
    p.add_argument("--table1-out", default=None, metavar="DIR",
                   help="frontier / substitute-study: reuse the finished stages of this Table 1 reproduction when "
                        "their settings match (default out/table1-<preset> when it exists)")
    p.add_argument("--studies-out", default=None, metavar="DIR",
                   help="robust-substitute / forensics: reuse the finished models of this `reproduce studies` run when "
                        "their settings match (default out/studies-<preset> when it exists)")
    p.add_argument("--jobs", type=int, default=None,
                   help="table1: independent stages run at once, each in its own process (default: as many as the "
                        "cores allow; --threads then sets the torch threads per stage, default cores / jobs)")
    _add_common(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="benchmarks (training cost, throughput)",
                       description="train-cost: time one training step per method in one process on one batch. "
                                   "throughput: training images/s per method, inference images/s, PGD steps/s "
                                   "(batch x steps / seconds), optionally against torchattacks' PGD.")
    p.add_argument("what", choices=("train-cost", "throughput", "video-step"),
                   help="train-cost: ms per step per method; throughput: images/s and attack steps/s; "
                        "video-step: video ABNN step time and full-size ResNeXt-101 memory")
    p.add_argument("--width", type=float, default=None,
                   help="ResNet-18 width (default 1.0, the paper's, for train-cost; 0.25 for throughput)")
    p.add_argument("--substitute-width", type=float, default=None,
                   help="VGG-19-BN width (default 1.0 for train-cost; 0.25 for throughput)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--at-steps", type=int, default=5, help="PGD-AT attack steps inside training (default 5)")
    p.add_argument("--encoder", choices=("flatten", "pooled"), default="flatten")
    p.add_argument("--methods", default=None, help="comma-separated (default standard,abnn,pgd-at)")
    p.add_argument("--attack-steps", type=int, default=10, help="throughput: PGD steps per attack call (default 10)")
    p.add_argument("--compare-torchattacks", action="store_true",
                   help="throughput: also time torchattacks' PGD on the same model and batch, report our/their time ratio")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="throughput: mixed precision as in `abnn train --amp` (default auto: on for CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="throughput: channels-last memory format")
    p.add_argument("--compare-amp", action="store_true",
                   help="throughput: float32 and --amp bf16 side by side instead (training images/s per method, "
                        "inference images/s; wall and CPU time); --methods defaults to standard,abnn")
    p.add_argument("--out", default=None, help="JSON output file")
    _add_common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _pixels(text: str) -> float:
    """A positive pixel budget as everywhere else (:func:`abnn.attacks.parse_pixel_budget`):
    ``10`` and ``10/255`` both mean 10/255; a bare value in (0, 1) is refused as ambiguous."""
    from .attacks import parse_pixel_budget

    try:
        value = parse_pixel_budget(text, what="the budget")
    except AbnnError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive budget; write it as k/255, e.g. 10/255")
    return value


def _version() -> str:
    from . import __version__

    return __version__


def _config_from_args(a: argparse.Namespace, **fixed) -> TrainConfig:
    if a.out is None:
        raise AbnnError(f"abnn {a.command} needs --out RUN_FOLDER (the run folder to create, or to continue with --resume)")
    return TrainConfig(
        width=a.width, epochs=a.epochs, total_steps=a.total_steps, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
        weight_decay=a.weight_decay, seed=a.seed, train_size=a.train_size,
        val_size=None if a.val_size == -1 else a.val_size, augment=not a.no_augment,
        device=a.device, data_root=a.data_root, num_threads=a.threads, **fixed,
    ).validate()


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .training import train
    from .training.validation import clean_val_size

    cfg = _config_from_args(a, method=a.method, dataset="tinyimagenet32", arch="vgg19_bn", at_steps=a.at_steps,
                            fast_at_alpha=a.fast_at_alpha, robust_val_size=a.robust_val_size,
                            keep_best=a.keep_best, amp=a.amp)
    cfg.val_size = clean_val_size(cfg)  # --val-size -1 (all) leaves out the --robust-val-size images
    res = train(cfg, a.out, resume=a.resume, progress=not a.no_progress, max_steps=a.max_steps)
    print(json.dumps({"run": a.out, "method": cfg.method, "val_acc": res.final_val_acc, "val_size": res.val_size,
                      "best_val_pgd_acc": res.best_val_pgd_acc, "cost_N_per_step": res.cost_N_per_step,
                      "train_seconds": round(res.train_seconds, 1)}))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    import os

    from .training import train
    from .training.distributed import launch_torchrun, strip_nproc
    from .training.methods import describe_methods

    if a.list_methods:
        print(describe_methods())
        return 0

    cfg = _config_from_args(
        a, method=a.method, dataset="cifar10", arch=a.arch, substitute=a.substitute,
        substitute_width=a.substitute_width, substitute_stats=a.substitute_stats, encoder=a.encoder,
        substitute_std=a.substitute_std, bn_affine=not a.no_bn_affine, at_steps=a.at_steps, include_jpeg=a.include_jpeg,
        substitute_arch=a.substitute_arch, in_domain_substitute=a.allow_in_domain_substitute,
        substitute_taps=a.substitute_taps.split(",") if a.substitute_taps else None,
        fast_at_alpha=a.fast_at_alpha, robust_val_size=a.robust_val_size, keep_best=a.keep_best,
        amp=a.amp, channels_last=a.channels_last, compile=a.compile, data_on_device=a.data_on_device,
        sync_bn=not a.no_sync_bn,
        checkpoint_every=a.checkpoint_every,
    )
    if a.nproc is not None and a.nproc < 1:
        raise AbnnError(f"--nproc must be >= 1, got {a.nproc}")
    if a.nproc and a.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        if cfg.batch_size % a.nproc:
            raise AbnnError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by --nproc {a.nproc}")
        code = launch_torchrun(a.nproc, strip_nproc(getattr(a, "argv", None) or sys.argv[1:]))
        if code != 0:
            raise AbnnError(f"distributed training with {a.nproc} processes failed (exit status {code}); "
                            "see the messages above")
        return 0
    res = train(cfg, a.out, resume=a.resume, progress=not a.no_progress, max_steps=a.max_steps)
    if res.rank == 0:  # under torchrun only rank 0 reports
        print(json.dumps({"run": a.out, "method": res.method, "val_acc": res.final_val_acc,
                          "cost_N_per_step": res.cost_N_per_step, "train_seconds": round(res.train_seconds, 1)}))
    return 0


def _holding_lock(folder_of: Callable[[argparse.Namespace], Path | None]):
    """Run a command holding the lock of the folder it writes (:func:`abnn.runs.run_lock`,
    which proves it writable first), so that a second writer is refused before any computation."""
    def wrap(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(cmd)
        def run(a: argparse.Namespace) -> int:
            from .runs import run_lock

            folder = folder_of(a)
            with run_lock(folder) if folder is not None else contextlib.nullcontext():
                return cmd(a)
        return run
    return wrap


def _evaluate_output(a: argparse.Namespace) -> Path | None:
    """The folder `evaluate` writes: the suite's folder, or the folder of its JSON file (none
    when the run is missing: evaluate then says so)."""
    if a.list_attacks or a.run is None or not Path(a.run).is_dir():
        return None
    if a.suite in ("full", "quick"):
        return Path(a.out or Path(a.run) / "suite")
    return Path(a.out or Path(a.run) / "eval.json").parent


@_holding_lock(_evaluate_output)
def cmd_evaluate(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    import torch

    from .attacks import attack_defaults, describe_attacks, parse_pixel_budget, parse_spec
    from .training import resolve_device

    if a.list_attacks:
        print(describe_attacks())
        return 0
    if a.run is None:
        raise AbnnError("evaluate needs a RUN folder (or --list-attacks)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.n_eval < 1 or a.batch_size < 1:
        raise AbnnError(f"--n-eval and --batch-size must be >= 1, got {a.n_eval} and {a.batch_size}")
    if a.suite and a.steps is not None:
        raise AbnnError("--suite runs with its own budgets; leave out --steps (--attack adds attacks to a suite)")
    eps = parse_pixel_budget(a.eps, what="--eps") if a.eps is not None else None
    sources = dict(s.split("=", 1) if "=" in s else (Path(s).name, s) for s in (a.source or []))
    device = str(resolve_device(a.device))
    if a.attribution:
        from .evaluation.attribution import forensics_run

        res = forensics_run(a.run, n_eval=a.n_eval, batch_size=a.batch_size, data_root=a.data_root, device=device,
                            seed=a.seed, out=a.out)
        print(json.dumps({k: res[k] for k in ("run", "n", "path_swap")}
                         | {"share_median": {p: m["share"] for p, m in res["attribution_median"].items()}}))
        return 0
    if a.suite in ("full", "quick"):
        from .evaluation import run_suite_on_run

        res = run_suite_on_run(a.run, n_eval=a.n_eval, batch_size=a.batch_size, data_root=a.data_root, device=device,
                               seed=a.seed, eps=eps, out_dir=a.out, quick=a.suite == "quick", source_models=sources,
                               extra_attacks=[parse_spec(s) for s in a.attack or []], progress=not a.no_progress,
                               resume=not a.fresh)
        meta = res.evaluation.metadata
        _note_cut_short(meta)
        print(json.dumps({"run": meta["run"], "method": meta["method"], "n_eval": res.evaluation.n_eval,
                          "clean_acc": res.evaluation.clean_acc, "robust_acc": res.robust_acc, "verdict": res.verdict,
                          "flags": res.flags}))
        return 0
    from .evaluation import SUITES, evaluate_run

    specs = [parse_spec(s) for s in ([*SUITES[a.suite], *(a.attack or [])] if a.suite else a.attack or ["pgd"])]
    if a.steps is not None:
        specs = [s if "steps" in s.options or "steps" not in attack_defaults(s.name, attack=s.options.get("attack"))
                 else replace(s, options={**s.options, "steps": a.steps}) for s in specs]
    out = a.out or Path(a.run) / ("autoattack.json" if a.suite == "autoattack" else "eval.json")
    res = evaluate_run(a.run, attacks=specs, n_eval=a.n_eval, batch_size=a.batch_size, data_root=a.data_root,
                       device=device, seed=a.seed, eps=eps, sources=sources, progress=not a.no_progress, out=out,
                       resume=not a.fresh)
    _note_cut_short(res.metadata)
    worst = res.worst_case()
    if worst.note:
        print(f"abnn: note: {worst.note}", file=sys.stderr)
    print(json.dumps({"run": str(a.run), "method": res.metadata["method"], "n_eval": res.n_eval,
                      "clean_acc": res.clean_acc, "robust_acc": {k: r.robust_acc for k, r in res.attacks.items()},
                      "worst_case": worst.robust_acc, "eps_255": res.eps * 255}))
    return 0


def _note_cut_short(metadata: dict) -> None:
    """Say so on stderr when the evaluated run's training stopped early (--max-steps)."""
    from .runs import cut_short_note

    if metadata.get("training_cut_short"):
        print(f"abnn: note: {cut_short_note(metadata['run'], metadata['training_cut_short'])}", file=sys.stderr)


def cmd_reproduce(a: argparse.Namespace) -> int:
    import shlex

    import torch

    from .reproduce import get_preset, get_video_preset, run_table1, run_video_tables
    from .reproduce.presets import apply_overrides
    from .reproduce.sources import check_sources
    from .training import resolve_device

    if a.estimate and a.table != "table1":
        raise AbnnError(f"--estimate is for table1 only, got {a.table}; drop --estimate")
    if a.threads:
        torch.set_num_threads(a.threads)
    command = "abnn " + " ".join(shlex.quote(s) for s in sys.argv[1:]) if sys.argv[0].endswith("abnn") else ""
    if a.table1_out is not None and a.table not in ("frontier", "substitute-study"):
        raise AbnnError(f"--table1-out is for the frontier and substitute-study tables, not {a.table}; drop it")
    if a.table == "studies":
        from .reproduce.frontier import study_settings
        from .reproduce.studies import run_studies

        preset = apply_overrides(get_preset(a.preset), a.overrides)
        study_settings(preset)
        out = a.out or f"out/studies-{a.preset}"
        both = run_studies(preset, out, data_root=a.data_root, device=str(resolve_device(a.device)), force=a.force,
                           progress=not a.no_progress, command=command, jobs=a.jobs, threads=a.threads)
        print(json.dumps({"out": out, "frontier": f"{out}/frontier/report.md",
                          "substitute_study": f"{out}/substitute-study/report.md",
                          "records": len(both["frontier"]["records"]) + len(both["substitute_study"]["records"])}))
        return 0
    if a.table in ("robust-substitute", "forensics"):
        return _reproduce_on_studies(a, command)
    if a.table in ("frontier", "substitute-study"):
        from pathlib import Path

        from .reproduce.frontier import run_frontier, study_settings
        from .reproduce.substitute_study import run_substitute_study

        preset = apply_overrides(get_preset(a.preset), a.overrides)
        study_settings(preset)
        out = a.out or f"out/{a.table}-{a.preset}"
        if a.table1_out is not None and not Path(a.table1_out).is_dir():
            raise AbnnError(f"--table1-out {a.table1_out}: no such folder (a Table 1 reproduction's --out, e.g. "
                            f"out/table1-{a.preset}); fix the path, or leave the flag out to train every stage here")
        table1 = a.table1_out or (f"out/table1-{a.preset}" if Path(f"out/table1-{a.preset}").is_dir() else None)
        runner = run_frontier if a.table == "frontier" else run_substitute_study
        res = runner(preset, out, table1_dir=table1, data_root=a.data_root, device=str(resolve_device(a.device)),
                     force=a.force, progress=not a.no_progress, command=command, jobs=a.jobs, threads=a.threads)
        print(json.dumps({"out": out, "records": [{k: r[k] for k in ("clean_acc", "worst_case_acc")} | {
            "name": r.get("name") or r.get("label")} for r in res["records"]]}))
        return 0
    if a.table == "table1":
        preset = apply_overrides(get_preset(a.preset), a.overrides)
        if a.estimate:
            return _print_estimate(preset, a)
        check_sources(preset, a.data_root)
        out = a.out or f"out/table1-{a.preset}"
        res = run_table1(preset, out, data_root=a.data_root, device=str(resolve_device(a.device)), force=a.force,
                         progress=not a.no_progress, command=command, jobs=a.jobs, threads=a.threads)
        return _print_records(out, res)
    else:
        preset = apply_overrides(get_video_preset(a.preset), a.overrides)
        check_sources(preset, a.data_root)
        out = a.out or f"out/video-{a.preset}"
    res = run_video_tables(preset, out, data_root=a.data_root, device=str(resolve_device(a.device)), force=a.force,
                           progress=not a.no_progress, command=command)
    return _print_records(out, res)


def _reproduce_on_studies(a: argparse.Namespace, command: str) -> int:
    """The studies that build on `reproduce studies` (its models reused from --studies-out)."""
    from .reproduce import get_preset
    from .reproduce.frontier import study_settings
    from .reproduce.presets import apply_overrides
    from .training import resolve_device

    preset = apply_overrides(get_preset(a.preset), a.overrides)
    study_settings(preset)
    studies = a.studies_out
    if studies is not None and not Path(studies, "frontier").is_dir():
        raise AbnnError(f"--studies-out {studies}: no `reproduce studies` output there (no {studies}/frontier folder); "
                        "check the path, or leave the option out to train what is missing")
    if studies is None and Path(f"out/studies-{a.preset}/frontier").is_dir():
        studies = f"out/studies-{a.preset}"
    if a.table == "robust-substitute":
        from .reproduce.robust_substitute import run_robust_substitute as runner
    else:
        from .reproduce.forensics import run_forensics as runner
    out = a.out or f"out/{a.table}-{a.preset}"
    res = runner(preset, out, studies_dir=studies, data_root=a.data_root, device=str(resolve_device(a.device)),
                 force=a.force, progress=not a.no_progress, command=command, jobs=a.jobs, threads=a.threads)
    print(json.dumps({"out": out, "report": f"{out}/report.md", "records": [
        {k: r.get(k) for k in ("name", "clean_acc", "worst_case_acc")} for r in res["records"]]}))
    return 0


def _print_estimate(preset, a: argparse.Namespace) -> int:
    """``reproduce table1 --estimate``: counted FLOPs and time at an assumed throughput; nothing runs."""
    from .config import write_json_atomic
    from .reproduce.estimate import estimate_table1, format_estimate

    est = estimate_table1(preset, data_root=a.data_root)
    if a.out:
        write_json_atomic(Path(a.out), est)
    print(format_estimate(est))
    return 0


def _print_records(out: str, res: dict) -> int:
    print(json.dumps({"out": out, "records": [{k: r[k] for k in ("method", "clean_acc", "robust_acc", "cost_N_per_step")}
                                              for r in res["records"]]}))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import torch

    from .benchmark import bench_throughput, bench_train_cost
    from .training import resolve_device
    from .training.methods import METHODS

    if a.threads:
        torch.set_num_threads(a.threads)
    default_methods = "standard,abnn" if a.compare_amp else "standard,abnn,pgd-at"
    methods = tuple(m.strip() for m in (a.methods or default_methods).split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AbnnError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if a.batch_size < 1 or a.steps < 1 or a.attack_steps < 1:
        raise AbnnError(f"need --batch-size, --steps and --attack-steps >= 1; got {a.batch_size}, {a.steps}, {a.attack_steps}")
    default_width = 1.0 if a.what == "train-cost" else 0.25
    width = a.width if a.width is not None else default_width
    sub_width = a.substitute_width if a.substitute_width is not None else default_width
    if a.what == "video-step":
        from .benchmark import bench_video_step

        res = bench_video_step(device=str(resolve_device(a.device)), out=a.out, progress=not a.no_progress)
        print(json.dumps(res, indent=2))
        return 0
    if a.what == "throughput" and a.compare_amp:
        from .benchmark import bench_precision

        res = bench_precision(width=width, substitute_width=sub_width, batch_size=a.batch_size, iters=a.steps,
                              warmup=a.warmup, at_steps=a.at_steps, encoder=a.encoder, methods=methods,
                              device=str(resolve_device(a.device)), out=a.out, progress=not a.no_progress)
        print(json.dumps(res, indent=2))
        return 0
    if a.what == "throughput":
        res = bench_throughput(width=width, substitute_width=sub_width, batch_size=a.batch_size, iters=a.steps,
                               warmup=a.warmup, at_steps=a.at_steps, attack_steps=a.attack_steps, encoder=a.encoder,
                               methods=methods, device=str(resolve_device(a.device)), amp=a.amp,
                               channels_last=a.channels_last, compare_torchattacks=a.compare_torchattacks,
                               out=a.out, progress=not a.no_progress)
        print(json.dumps(res, indent=2))
        return 0
    res = bench_train_cost(width=width, substitute_width=sub_width, batch_size=a.batch_size,
                           steps=a.steps, warmup=a.warmup, at_steps=a.at_steps, encoder=a.encoder, methods=methods,
                           device=str(resolve_device(a.device)), out=a.out, progress=not a.no_progress)
    print(json.dumps(res, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc` relaunches with these
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise AbnnError(f"--threads must be an integer >= 1, got {args.threads}")
        return args.func(args)
    except AbnnError as exc:
        print(f"abnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abnn: interrupted; a training run continues with the same command and --resume, an evaluation with "
              "the same command (finished attacks are kept; --fresh starts over)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
