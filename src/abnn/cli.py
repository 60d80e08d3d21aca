"""The ``abnn`` command.  Thin: it parses flags and calls the package.

    abnn pretrain-substitute --out runs/substitute --width 0.5 --epochs 30
    abnn train --method abnn --substitute runs/substitute --out runs/abnn
    abnn evaluate runs/abnn --attack pgd --n-eval 1000

The training flags are built from :class:`~abnn.config.TrainConfig`'s fields
(:mod:`abnn.flags`); those of ``evaluate`` and ``bench`` stand beside the settings they fill
(:func:`~abnn.evaluation.command.add_evaluate_flags`, :func:`~abnn.benchmark.add_bench_flags`).
Every command continues by default (:data:`RESUME_POLICY`);
``--fresh`` starts over.  Every problem the user can fix (missing data, bad checkpoint, bad
flag value) ends in one ``abnn: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from . import __version__
from .config import TrainConfig
from .errors import AbnnError
from .flags import Parser, Renamed, add_config_flags, call_with_flags, config_from_args

#: the methods ``pretrain-substitute`` offers (the substitute is a plain classifier)
SUBSTITUTE_METHODS = ("standard", "fast-at", "pgd-at")
#: one resume word, one default, for every command
RESUME_POLICY = ("Every command continues what the same command left in its output folder when the recorded "
                 "settings match (a training run at its last checkpoint, an evaluation's finished attacks, "
                 "reproduce's finished stages); --fresh starts over.")
#: what ``add_subparsers`` returns; each ``_add_*`` function below adds one subcommand to it
Subcommands = argparse._SubParsersAction


def _add_common(p: argparse.ArgumentParser, fresh: str | None) -> None:
    if fresh:
        p.add_argument("--fresh", action="store_true", help=f"{fresh}. {RESUME_POLICY}")
    p.add_argument("--data-root", default=None, help="folder with the .npz datasets (default: $ABNN_DATA_ROOT)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--threads", dest="num_threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_training(p: argparse.ArgumentParser, defaults: TrainConfig, *, target: bool, **overrides) -> Any:
    p.add_argument("--out", default=None, help="run folder to create or continue (required)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps, resumable (smoke tests; the "
                   "schedule stays the whole run's: --total-steps makes a shorter run)")
    p.add_argument("--resume", action=Renamed, default=None, help="deprecated: continuing is the default", note=(
        "a run continues by default when its recorded settings match; --resume now only insists on a checkpoint"))
    _add_common(p, "discard the training files of a run in --out and train it again")
    g = p.add_argument_group("scale, speed and durability (execution only: a rerun may change them)")
    add_config_flags(p, defaults, target=target, groups={"execution": g}, **overrides)
    return g


def build_parser() -> argparse.ArgumentParser:
    """The ``abnn`` parser: one subcommand per ``_add_*`` function below, each with its handler."""
    parser = Parser(prog="abnn", description="Adaptive Batch Normalization Networks: train, attack, evaluate. "
                                              + RESUME_POLICY)
    parser.add_argument("--version", action="version", version=f"abnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pretrain_substitute, _add_train, _add_evaluate, _add_reproduce, _add_bench):
        add(sub)
    return parser


def _add_pretrain_substitute(sub: Subcommands) -> None:
    p = sub.add_parser("pretrain-substitute", help="pretrain the VGG-19-BN substitute on tinyimagenet32",
                       description="Pretrain the substitute on a dataset other than the target (METHOD.md s. 3) "
                                   "and report its validation accuracy.")
    _add_training(p, TrainConfig(dataset="tinyimagenet32", arch="vgg19_bn", lr=0.05, val_size=None), target=False,
                  method={"choices": SUBSTITUTE_METHODS, "help": "standard (default; the paper), or an adversarial "
                          "pretraining at eps 8/255 (fast-at, pgd-at): a robust substitute, reused by any number of "
                          "targets. It breaks the paper's 'no adversarial training' premise for the substitute"})
    p.set_defaults(func=cmd_train)


def _add_train(sub: Subcommands) -> None:
    from .training.methods import METHODS

    p = sub.add_parser("train", help=f"train a CIFAR-10 model: {', '.join(METHODS)}",
                       description="Train a target on CIFAR-10 with one method. Distributed: `torchrun --standalone "
                       "--nproc_per_node=K -m abnn.cli train ...` or `--nproc K`; the global batch stays "
                       "--batch-size (K processes x batch-size/K), rank 0 writes the run folder, the counted cost "
                       "is per rank.")
    p.add_argument("--list-methods", action="store_true", help="list the training methods and exit")
    g = _add_training(p, TrainConfig(), target=True, method={
        "help": f"a training method: {', '.join(METHODS)} (default standard; --list-methods describes them)"})
    g.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="train with K processes on this machine (torch.distributed.run; gloo on CPU, NCCL on CUDA, "
                        "one GPU per process); --batch-size must be divisible by K")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: Subcommands) -> None:
    from .evaluation.command import add_evaluate_flags

    p = sub.add_parser("evaluate", help="clean and robust accuracy of a finished run",
                       description="Evaluate a run folder on the first N test samples under white-box attacks "
                                   "(every attack of the registry: --list-attacks), or run a suite. Budgets eps and "
                                   "alpha count in 1/255 of the pixel range: 8 and 8/255 both mean 8/255.")
    add_evaluate_flags(p)
    _add_common(p, "discard the progress of an interrupted evaluation in the output folder (attack-progress.pt)")
    p.set_defaults(func=cmd_evaluate)


def _add_reproduce(sub: Subcommands) -> None:
    from .reproduce.command import TABLES
    from .reproduce.presets import preset_names

    p = sub.add_parser("reproduce", help="reproduce a table of the paper in one command",
                       description="Run a whole table: substitute, every method, evaluation, report.md, results.json, "
                                   "figures. Finished stages are reused, interrupted ones continued; --fresh redoes them.")
    p.add_argument("table", choices=TABLES, help="; ".join(f"{k}: {v}" for k, v in TABLES.items()))
    p.add_argument("--preset", dest="preset_name", default="cpu", choices=preset_names(),
                   help="smoke: minutes, tiny; cpu: about 75 min on 2 cores (table1 only); gpu: one H100/H200-class GPU, "
                        "offline, about 6 min by estimate (table1); paper: full scale, GPU + network")
    p.add_argument("--estimate", action="store_true",
                   help="table1: print the preset's counted training and evaluation FLOPs and its time at an assumed "
                        "GPU throughput, and run nothing (--out FILE.json also writes them)")
    p.add_argument("--out", default=None, help="output folder (default out/<table>-<preset>)")
    p.add_argument("--force", dest="fresh", action=Renamed, default=False, help="deprecated spelling of --fresh",
                   note="it is spelled --fresh now (redo finished stages)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a preset field (repeatable), e.g. --set epochs=2 --set amp=bf16 --set eps=1/255; "
                        "recorded in preset.json, results.json and the report")
    p.add_argument("--table1-out", default=None, metavar="DIR",
                   help="frontier / substitute-study: reuse the finished stages of this Table 1 reproduction when "
                        "their settings match (default out/table1-<preset> when it exists)")
    p.add_argument("--studies-out", default=None, metavar="DIR",
                   help="robust-substitute / forensics: reuse the finished models of this `reproduce studies` run when "
                        "their settings match (default out/studies-<preset> when it exists)")
    p.add_argument("--jobs", type=int, default=None,
                   help="independent stages run at once, each in its own process (default: as many as the "
                        "cores allow; --threads then sets the torch threads per stage, default cores / jobs)")
    _add_common(p, "redo the finished stages")
    p.set_defaults(func=cmd_reproduce)


def _add_bench(sub: Subcommands) -> None:
    from .benchmark import add_bench_flags

    p = sub.add_parser("bench", help="benchmarks (training cost, throughput)",
                       description="train-cost: time one training step per method in one process on one batch. "
                                   "throughput: training images/s per method, inference images/s, PGD steps/s "
                                   "(batch x steps / seconds), optionally against torchattacks' PGD.")
    add_bench_flags(p)
    _add_common(p, None)
    p.set_defaults(func=cmd_bench)


def _device(a: argparse.Namespace) -> str:
    from .training import resolve_device

    return str(resolve_device(a.device))


def cmd_train(a: argparse.Namespace) -> int:
    """``abnn train`` and ``abnn pretrain-substitute`` (a plain classifier on tinyimagenet32)."""
    from .training import train
    from .training.distributed import launch_from_cli
    from .training.validation import clean_val_size
    from .training.methods import describe_methods

    if getattr(a, "list_methods", False):
        print(describe_methods())
        return 0
    if a.out is None:
        raise AbnnError(f"abnn {a.command} needs --out RUN_FOLDER (the run folder to create or continue)")
    if a.fresh and a.resume:
        raise AbnnError("--fresh starts the run over and --resume insists on continuing it; pass one")
    pretrain = a.command == "pretrain-substitute"
    cfg = config_from_args(a, **(dict(dataset="tinyimagenet32", arch="vgg19_bn") if pretrain else {}))
    if pretrain:
        cfg.val_size = clean_val_size(cfg)  # --val-size -1 (all) leaves out the --robust-val-size images
    elif a.nproc is not None and launch_from_cli(a.nproc, cfg.batch_size, a.argv):
        return 0
    res = train(cfg, a.out, resume=a.resume, fresh=a.fresh, progress=a.progress, max_steps=a.max_steps)
    keys = ("val_size", "best_val_pgd_acc") if pretrain else ()
    if res.rank == 0:  # under torchrun only rank 0 reports
        print(json.dumps({"run": a.out, "method": cfg.method, "val_acc": res.final_val_acc} | {
            k: getattr(res, k) for k in keys} | {"cost_N_per_step": res.cost_N_per_step,
                                                 "train_seconds": round(res.train_seconds, 1)}))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .attacks import describe_attacks
    from .evaluation.command import EvalSettings, evaluate_command

    if a.list_attacks:
        print(describe_attacks())
        return 0
    summary, notes = evaluate_command(call_with_flags(EvalSettings, a, device=_device(a)))
    for note in notes:
        print(f"abnn: note: {note}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    import shlex

    from .reproduce.command import reproduce_command

    command = "abnn " + " ".join(shlex.quote(s) for s in sys.argv[1:]) if sys.argv[0].endswith("abnn") else ""
    print(call_with_flags(reproduce_command, a, device=_device(a), command=command, threads=a.num_threads))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .benchmark import bench_command

    print(json.dumps(call_with_flags(bench_command, a, device=_device(a)), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad flag: its one line is out; --help and --version exit 0 as usual
        if exc.code == 2:
            return 2
        raise
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc` relaunches with these
    try:
        if args.num_threads is not None:
            if args.num_threads < 1:
                raise AbnnError(f"--threads must be an integer >= 1, got {args.num_threads}")
            import torch

            torch.set_num_threads(args.num_threads)
        return args.func(args)
    except AbnnError as exc:
        print(f"abnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abnn: interrupted; the same command continues (a training run from its last checkpoint, an "
              "evaluation or reproduction with what it finished); --fresh starts over", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
