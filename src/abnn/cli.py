"""The ``abnn`` command.  Thin: it parses flags and calls the package.

    abnn pretrain-substitute --out runs/substitute --width 0.5 --epochs 30
    abnn train --method abnn --substitute runs/substitute --out runs/abnn
    abnn evaluate runs/abnn --attack pgd --n-eval 1000

Every problem the user can fix (missing data, bad checkpoint, bad flag value) ends in one
``abnn: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import METHODS, TrainConfig
from .errors import AbnnError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="folder with the .npz datasets (default: $ABNN_DATA_ROOT)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_opts(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--width", type=float, default=d.width, help=f"channel width multiplier (default {d.width})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"initial SGD learning rate, cosine decay (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help=f"held-out images for the per-epoch accuracy (default {d.val_size}; -1: all; 0: none)")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abnn", description="Adaptive Batch Normalization Networks: train, attack, evaluate.")
    parser.add_argument("--version", action="version", version=f"abnn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain-substitute", help="pretrain the VGG-19-BN substitute on tinyimagenet32",
                       description="Pretrain the substitute on a dataset other than the target (METHOD.md s. 3) "
                                   "and report its validation accuracy.")
    _add_train_opts(p, TrainConfig(dataset="tinyimagenet32", arch="vgg19_bn", lr=0.05, val_size=None))
    p.set_defaults(func=cmd_pretrain, lr=0.05, val_size=-1)

    p = sub.add_parser("train", help="train a CIFAR-10 model: standard, abnn or pgd-at",
                       description="Train a target on CIFAR-10 with one method.")
    d = TrainConfig()
    p.add_argument("--method", choices=METHODS, default="standard")
    p.add_argument("--arch", default=d.arch, help=f"target architecture (default {d.arch})")
    p.add_argument("--substitute", default=None, help="ABNN: substitute run folder, weights file, or IMAGENET1K_V1")
    p.add_argument("--substitute-width", type=float, default=d.substitute_width, help="width of a bare substitute weights file")
    p.add_argument("--substitute-stats", choices=("sample", "batch"), default=d.substitute_stats)
    p.add_argument("--encoder", choices=("flatten", "pooled"), default=d.encoder)
    p.add_argument("--no-bn-affine", action="store_true", help="adaptive layers without BN's own affine")
    p.add_argument("--at-steps", type=int, default=d.at_steps, help="PGD-AT attack steps t_max (default 5)")
    p.add_argument("--include-jpeg", action="store_true", help="add the 30k JPEG-q75 CIFAR-10 training images")
    _add_train_opts(p, d)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clean and robust accuracy of a finished run",
                       description="Evaluate a run folder on the first N test images under white-box attacks.")
    p.add_argument("run", help="run folder (holds config.json and model.pt)")
    p.add_argument("--attack", action="append", default=None, help="attack to run (repeatable; default pgd)")
    p.add_argument("--n-eval", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=float, default=None, help="PGD eps in /255 units (default 8)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default RUN/eval.json)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="reproduce a table of the paper in one command",
                       description="Run a whole table: substitute, every method, evaluation, report.md, results.json, "
                                   "figures. Finished stages are reused (resumable); --force redoes them.")
    p.add_argument("table", choices=("table1",), help="which table")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"),
                   help="smoke: minutes, tiny; cpu: about 2 h on 2 cores; paper: full scale, GPU + network")
    p.add_argument("--out", default=None, help="output folder (default out/<table>-<preset>)")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    _add_common(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="benchmarks (training cost)",
                       description="Time one training step per method in one process on one batch.")
    p.add_argument("what", choices=("train-cost",))
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width (default 1.0, the paper's)")
    p.add_argument("--substitute-width", type=float, default=1.0, help="VGG-19-BN width (default 1.0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--at-steps", type=int, default=5)
    p.add_argument("--encoder", choices=("flatten", "pooled"), default="flatten")
    p.add_argument("--methods", default="standard,abnn,pgd-at")
    p.add_argument("--out", default=None, help="JSON output file")
    _add_common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _config_from_args(a: argparse.Namespace, **fixed) -> TrainConfig:
    return TrainConfig(
        width=a.width, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
        weight_decay=a.weight_decay, seed=a.seed, train_size=a.train_size,
        val_size=None if a.val_size == -1 else a.val_size, augment=not a.no_augment,
        device=a.device, data_root=a.data_root, num_threads=a.threads, **fixed,
    ).validate()


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .training import train

    cfg = _config_from_args(a, method="standard", dataset="tinyimagenet32", arch="vgg19_bn")
    res = train(cfg, a.out, resume=a.resume, progress=not a.no_progress, max_steps=a.max_steps)
    print(json.dumps({"run": a.out, "val_acc": res["final_val_acc"], "val_size": res["val_size"],
                      "train_seconds": round(res["train_seconds"], 1)}))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .training import train

    cfg = _config_from_args(
        a, method=a.method, dataset="cifar10", arch=a.arch, substitute=a.substitute,
        substitute_width=a.substitute_width, substitute_stats=a.substitute_stats, encoder=a.encoder,
        bn_affine=not a.no_bn_affine, at_steps=a.at_steps, include_jpeg=a.include_jpeg,
    )
    res = train(cfg, a.out, resume=a.resume, progress=not a.no_progress, max_steps=a.max_steps)
    print(json.dumps({"run": a.out, "method": res["method"], "val_acc": res["final_val_acc"],
                      "cost_N_per_step": res["cost_N_per_step"], "train_seconds": round(res["train_seconds"], 1)}))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from .evaluation import evaluate_run
    from .training import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.n_eval < 1:
        raise AbnnError(f"--n-eval must be >= 1, got {a.n_eval}")
    opts: dict = {}
    if a.eps is not None:
        opts["eps"] = a.eps / 255
    if a.steps is not None:
        opts["steps"] = a.steps
    attacks = a.attack or ["pgd"]
    res = evaluate_run(a.run, attacks=attacks, n_eval=a.n_eval, batch_size=a.batch_size, data_root=a.data_root,
                       device=str(resolve_device(a.device)), seed=a.seed, progress=not a.no_progress, out=a.out,
                       attack_options={"pgd": opts} if opts else None)
    print(json.dumps({k: res[k] for k in ("run", "method", "n_eval", "clean_acc", "robust_acc")}))
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    import shlex

    import torch

    from .reproduce import get_preset, run_table1
    from .training import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    preset = get_preset(a.preset)
    if preset.substitute_source != "pretrain" or preset.full_cifar10:
        _check_network_for(preset)
    out = a.out or f"out/{a.table}-{a.preset}"
    command = "abnn " + " ".join(shlex.quote(s) for s in sys.argv[1:]) if sys.argv[0].endswith("abnn") else ""
    res = run_table1(preset, out, data_root=a.data_root, device=str(resolve_device(a.device)), force=a.force,
                     progress=not a.no_progress, command=command)
    print(json.dumps({"out": out, "records": [{k: r[k] for k in ("method", "clean_acc", "robust_acc", "cost_N_per_step")}
                                              for r in res["records"]]}))
    return 0


def _check_network_for(preset) -> None:
    """The paper preset needs torchvision downloads; fail at once and clearly without them."""
    import socket

    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=5).close()
    except OSError as exc:
        raise AbnnError(
            f"preset {preset.name!r} needs network access to download torchvision's ImageNet VGG-19-BN weights and the "
            f"full CIFAR-10 ({type(exc).__name__}: {exc}); run it on a machine with internet (a GPU is advised), "
            "or use --preset cpu"
        ) from None


def cmd_bench(a: argparse.Namespace) -> int:
    import torch

    from .benchmark import bench_train_cost
    from .training import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AbnnError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    res = bench_train_cost(width=a.width, substitute_width=a.substitute_width, batch_size=a.batch_size,
                           steps=a.steps, warmup=a.warmup, at_steps=a.at_steps, encoder=a.encoder, methods=methods,
                           device=str(resolve_device(a.device)), out=a.out, progress=not a.no_progress)
    print(json.dumps(res, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AbnnError as exc:
        print(f"abnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abnn: interrupted; a training run continues with the same command and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
