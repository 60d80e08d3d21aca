"""One training loop for every method (paper s. 2.2 and 3.3): :func:`train`.

A method is only "how a batch becomes a loss" (:mod:`abnn.training.methods`): ``standard`` and
``abnn`` train on clean data (ABNN differs in the model: a target with adaptive BN and a frozen
substitute), ``pgd-at`` trains on PGD examples made on the fly (Madry et al.).  The loop
(:class:`~abnn.training.trainer.Trainer`), progress bars, per-epoch metrics (JSON lines,
:mod:`~abnn.training.metrics`) and validation (:mod:`~abnn.training.validation`), atomic
checkpoints and resume (:mod:`~abnn.training.checkpoint`), the results
(:mod:`~abnn.training.results`) and the counted cost (:mod:`~abnn.training.cost`) are written once.

Scale, speed and durability (all optional, none changes what is trained):

* several processes with ``torchrun`` (see :mod:`abnn.training.distributed`);
* automatic mixed precision (``amp``: bf16 where the GPU supports it, else fp16 with a
  :class:`torch.amp.GradScaler`; PGD-AT's attack runs under the same autocast), channels-last
  memory format, ``torch.compile`` (:mod:`abnn.training.step`); mixed precision is on by
  default on CUDA only;
* checkpoints every ``checkpoint_every`` steps as well as at epoch ends, holding everything a
  resume needs to continue at the exact step (:class:`~abnn.training.checkpoint.TrainingCheckpoint`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import TrainConfig
from ..errors import AbnnError
from ..runs import resolve_config, run_lock
from .distributed import barrier, init_distributed, shutdown
from .methods import check_config
from .results import TrainResult
from .step import TrainStep, resolve_amp, resolve_device
from .trainer import Trainer, step_budget

# kept importable from here, where callers (reproduce, tests) import them
from .methods import fast_at_loss, fgsm_rs_example, pgd_at_loss  # noqa: F401
from .results import software_versions  # noqa: F401
from .validation import VALIDATION_CLOCKS, clean_val_size, dataset_options  # noqa: F401

__all__ = ["RUN_FILES", "TrainResult", "TrainStep", "resolve_amp", "resolve_device", "step_budget", "train"]


#: the files a training run writes in its folder (what ``fresh=True`` discards)
RUN_FILES = ("checkpoint.pt", "model.pt", "best.pt", "metrics.jsonl", "train_results.json", "config.json")


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool | None = None, fresh: bool = False,
          progress: bool | str = True, max_steps: int | None = None) -> TrainResult:
    """Train the run described by ``cfg`` into ``run_dir`` and return its results.

    Each epoch writes one line of ``metrics.jsonl`` and an atomic ``checkpoint.pt`` (also every
    ``cfg.checkpoint_every`` steps within an epoch).  Resume policy (the same for every command:
    continue by default, ``fresh`` starts over): with ``resume=None`` (the default) a run in
    ``run_dir`` with a checkpoint continues at the exact step when its recorded settings match
    (else one line names each differing flag), and an empty folder starts a new run;
    ``resume=True`` insists on continuing (nothing to continue is an error), ``resume=False`` on
    a new run (a run in the folder is an error); ``fresh=True`` first discards the training
    files (:data:`RUN_FILES`) of a run in ``run_dir``, other files there are kept.  The run trains ``cfg.epochs`` epochs, or exactly
    ``cfg.total_steps`` steps where set (:func:`step_budget`; the cosine schedule spans them).  At
    the end ``model.pt`` (final weights) and ``train_results.json`` (:class:`TrainResult`: counted
    cost N per step, steps, seconds, accuracies) are written.  The per-epoch clean and robust
    validation is timed apart (wall and CPU seconds per epoch in ``metrics.jsonl``, totals in
    ``train_results.json``, see :func:`~abnn.training.validation.validation_totals`) and is not
    part of ``train_seconds``.
    ``max_steps`` stops early (tests and benchmarks; the checkpoint then allows an exact resume).
    ``progress``: True for progress bars and a line per epoch, ``"lines"`` for the lines only
    (stages that run beside each other), False for silence.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or a process group already initialised) every rank
    calls this; the global batch stays ``cfg.batch_size`` and rank 0 writes the files (see
    :mod:`abnn.training.distributed`); the other ranks return a :class:`TrainResult` with their
    ``rank`` and few entries.

    Run folders you can trust: the writing process holds the folder's lock
    (:func:`abnn.runs.run_lock`); a resume continues only a run recorded with the same defining
    settings (:func:`abnn.config.config_differences`) and never rewrites ``config.json``; a
    non-finite loss stops the run (:class:`~abnn.errors.DivergedError`) before any checkpoint
    or ``model.pt`` holds diverged weights.
    """
    check_config(cfg)
    if max_steps is not None and max_steps < 1:
        raise AbnnError(f"--max-steps must be >= 1, got {max_steps}")
    ctx, device = init_distributed(resolve_device(cfg.device))
    try:
        with run_lock(run_dir) if ctx.is_main else contextlib.nullcontext():
            if fresh:
                if ctx.is_main:
                    for name in RUN_FILES:
                        (Path(run_dir) / name).unlink(missing_ok=True)
                barrier(ctx)  # no rank checks the folder before it is empty
            trainer = Trainer(resolve_config(cfg), Path(run_dir), ctx, device, progress=progress, max_steps=max_steps)
            return trainer.fit(resume=False if fresh else resume)
    finally:
        shutdown(ctx)
