"""The ``abnn`` command.  Thin: it parses flags and calls the package.

    abnn pretrain-substitute --out runs/substitute --width 0.5 --epochs 30
    abnn train --method abnn --substitute runs/substitute --out runs/abnn
    abnn evaluate runs/abnn --attack pgd --n-eval 1000

The training flags are built from :class:`~abnn.config.TrainConfig`'s fields
(:mod:`abnn.flags`).  Every command continues by default (:data:`RESUME_POLICY`);
``--fresh`` starts over.  Every problem the user can fix (missing data, bad checkpoint, bad
flag value) ends in one ``abnn: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from . import __version__
from .config import AMP_MODES, TrainConfig
from .errors import AbnnError
from .flags import Parser, Renamed, add_config_flags, call_with_flags, config_from_args, pixel_budget_type

#: the methods ``pretrain-substitute`` offers (the substitute is a plain classifier)
SUBSTITUTE_METHODS = ("standard", "fast-at", "pgd-at")
#: one resume word, one default, for every command
RESUME_POLICY = ("Every command continues what the same command left in its output folder when the recorded "
                 "settings match (a training run at its last checkpoint, an evaluation's finished attacks, "
                 "reproduce's finished stages); --fresh starts over.")


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
    from .evaluation.command import SUITE_CHOICES, parse_source
    from .reproduce.command import TABLES
    from .reproduce.presets import preset_names
    from .training.methods import METHODS

    parser = Parser(prog="abnn", description="Adaptive Batch Normalization Networks: train, attack, evaluate. "
                                              + RESUME_POLICY)
    parser.add_argument("--version", action="version", version=f"abnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain-substitute", help="pretrain the VGG-19-BN substitute on tinyimagenet32",
                       description="Pretrain the substitute on a dataset other than the target (METHOD.md s. 3) "
                                   "and report its validation accuracy.")
    _add_training(p, TrainConfig(dataset="tinyimagenet32", arch="vgg19_bn", lr=0.05, val_size=None), target=False,
                  method={"choices": SUBSTITUTE_METHODS, "help": "standard (default; the paper), or an adversarial "
                          "pretraining at eps 8/255 (fast-at, pgd-at): a robust substitute, reused by any number of "
                          "targets. It breaks the paper's 'no adversarial training' premise for the substitute"})
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("evaluate", help="clean and robust accuracy of a finished run",
                       description="Evaluate a run folder on the first N test samples under white-box attacks "
                                   "(every attack of the registry: --list-attacks), or run a suite. Budgets eps and "
                                   "alpha count in 1/255 of the pixel range: 8 and 8/255 both mean 8/255.")
    p.add_argument("run", nargs="?", help="run folder (holds config.json and model.pt)")
    p.add_argument("--attack", dest="attacks", action="append", default=None, metavar="NAME[:key=value,...]",
                   help="attack to run, repeatable (default pgd); options override the registry's defaults, e.g. "
                        "pgd:steps=20,alpha=0.5/255 or apgd-t:n_target_classes=3; with --suite, added to the suite")
    p.add_argument("--list-attacks", action="store_true", help="list every attack with its defaults and exit")
    p.add_argument("--attribution", action="store_true",
                   help="ABNN forensics instead of attacks: split of the input gradient (target path vs substitute "
                        "statistics/encoder) and the path swap, on the first --n-eval images (JSON: --out, default "
                        "RUN/forensics.json)")
    p.add_argument("--n-eval", type=int, default=1000, help="test samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=pixel_budget_type("--eps"), default=None, metavar="K[/255]",
                   help="the evaluated L-inf radius in 1/255 of the pixel range, e.g. 8 or 8/255 (default 8/255 for "
                        "images, 1/255 for clips); every attack with an eps takes it unless its spec sets one")
    p.add_argument("--steps", type=int, default=None, help="steps of every --attack that has steps (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="run seed; every attack derives its own seed from it and its name")
    p.add_argument("--out", default=None, help="JSON output (default RUN/eval.json; --suite autoattack: "
                   "RUN/autoattack.json); with --suite full/quick a folder (default RUN/suite)")
    p.add_argument("--suite", choices=SUITE_CHOICES, default=None,
                   help="full/quick: the robustness checklist instead of --attack (all attacks, per-sample worst case, "
                        "eps/steps sanity curves, gradient-masking flags; 'quick' scales the budgets down for CPU); "
                        "autoattack: the authors' AutoAttack, standard version (pip install -e '.[autoattack]')")
    p.add_argument("--source", dest="sources", action="append", type=parse_source, default=None, metavar="[NAME=]RUN",
                   help="a finished run folder to transfer attacks from (repeatable): the suite transfers from each, "
                        "--attack transfer:source=NAME from one")
    _add_common(p, "discard the progress of an interrupted evaluation in the output folder (attack-progress.pt)")
    p.set_defaults(func=cmd_evaluate)

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
                   help="table1: independent stages run at once, each in its own process (default: as many as the "
                        "cores allow; --threads then sets the torch threads per stage, default cores / jobs)")
    _add_common(p, "redo the finished stages")
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
    _add_common(p, None)
    p.set_defaults(func=cmd_bench)
    return parser


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
