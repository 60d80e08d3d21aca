"""One training loop for every method (paper s. 2.2 and 3.3).

A method is only "how a batch becomes a loss": ``standard`` and ``abnn`` train on clean data
(ABNN differs in the model: a target with adaptive BN and a frozen substitute), ``pgd-at``
trains on PGD examples made on the fly (Madry et al.).  The loop, progress bars, per-epoch
metrics (JSON lines), atomic checkpoints, resume and the counted cost are written once.

Scale, speed and durability (all optional, none changes what is trained):

* several processes with ``torchrun`` (see :mod:`abnn.training.distributed`);
* automatic mixed precision (``amp``: bf16 where the GPU supports it, else fp16 with a
  :class:`torch.amp.GradScaler`; PGD-AT's attack runs under the same autocast), channels-last
  memory format, ``torch.compile``; mixed precision is on by default on CUDA only;
* checkpoints every ``checkpoint_every`` steps as well as at epoch ends, holding everything a
  resume needs to continue at the exact step: model, optimizer, scheduler, GradScaler, every
  rank's RNG states (torch CPU and CUDA), the epoch, the batches done in it, the partial epoch
  metrics, the config and the package version.  The loader's order and augmentation are
  functions of (seed, epoch), so a resumed epoch replays its generator over the batches already
  done (without training on them) and continues with exactly the batches an uninterrupted run
  would see.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..attacks import PGD
from ..config import TrainConfig
from ..data import BatchLoader, load_dataset
from ..data.datasets import ImageData, load_cifar10_heldout
from ..errors import AbnnError, CheckpointError, DivergedError
from ..files import append_jsonl, atomic_write, dumps_strict, write_json_atomic
from ..models.io import check_state_dict
from ..runs import build_model_from_config, check_same_run, resolve_config, run_lock
from .checkpoint import load_checkpoint, save_atomic
from .cost import PassCounter, attach_networks
from .distributed import (DistContext, all_gather_object, all_reduce_sum, barrier, convert_sync_batchnorm,
                          frozen_substitute, init_distributed, shutdown, wrap_ddp)
from .methods import BatchLoss, batch_loss_for, get_method, clean_loss, fast_at_loss, fgsm_rs_example, pgd_at_loss  # noqa: F401


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise AbnnError(f"bad device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AbnnError(f"device {spec} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (``None``: full precision).  ``auto``: bf16 on CUDA
    devices that support it, else fp16; off on CPU (CPU autocast rarely pays off)."""
    if spec in ("off", None):
        return None
    if spec == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise AbnnError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 or auto")
        return torch.bfloat16
    if spec == "fp16":
        if device.type != "cuda":  # CPU float16 kernels are slow: about 45x the float32 step time
            raise AbnnError(f"--amp fp16 on {device.type} runs many times slower than float32 (no fast float16 "
                            "kernels there); use --amp bf16 or --amp off")
        return torch.float16
    raise AbnnError(f"--amp must be auto, off, bf16 or fp16, got {spec!r}")


class TrainStep:
    """One optimisation step of a method, shared by :func:`train` and the throughput bench.

    The batch loss (for PGD-AT: the attack too) runs under autocast when ``amp_dtype`` is set;
    fp16 scales the loss with a :class:`torch.amp.GradScaler` (``self.scaler``, disabled
    otherwise); ``channels_last`` converts the batch's memory format.  The step counts its passes
    in ``counter`` and returns the detached loss and logits: nothing here waits for the device.
    """

    def __init__(self, model: nn.Module, batch_loss: BatchLoss, optimizer: torch.optim.Optimizer,
                 scheduler=None, *, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 counter: PassCounter | None = None, device_type: str = "cpu") -> None:
        self.model = model
        self.batch_loss = batch_loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.counter = counter
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        with self.counter.active() if self.counter is not None else contextlib.nullcontext():
            with self.autocast():
                loss, logits = self.batch_loss(self.model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach(), logits.detach()


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int, device: torch.device, *,
             amp_dtype: torch.dtype | None = None) -> float:
    """Clean top-1 accuracy (model put in eval mode, previous mode restored), in float32 unless
    ``amp_dtype`` asks for autocast (training validates in float32 whatever its ``--amp``)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    ac = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ac:
        for x, y in BatchLoader(data, batch_size, device=device):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was)
    return correct.item() / len(data)


#: the per-epoch robust accuracy: the paper's evaluation attack, PGD-5 (METHOD.md s. 4)
ROBUST_VAL_ATTACK = {"alpha": 2 / 255, "steps": 5, "random_start": True}


def robust_accuracy(model: nn.Module, data, batch_size: int, device: torch.device, *, eps: float,
                    seed: int) -> float:
    """PGD-5 robust accuracy (correct clean and under attack) of ``model`` on ``data``: the
    per-epoch signal that shows catastrophic overfitting (Wong et al. 2020 s. 5)."""
    attack = PGD(model, eps=eps, seed=seed, **ROBUST_VAL_ATTACK)
    robust = torch.zeros((), dtype=torch.long, device=device)
    for x, y in BatchLoader(data, batch_size, device=device):
        x_adv = attack(x, y)  # eval mode inside, previous mode restored
        with torch.no_grad():
            was = model.training
            model.eval()
            robust += ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).sum()
            model.train(was)
    return robust.item() / len(data)


def dataset_options(cfg: TrainConfig, split: str) -> dict:
    """The ``load_dataset`` options of a run's ``split``: frames per clip, the full CIFAR-10, and
    for training the JPEG-q75 images."""
    opts: dict = {"frames": cfg.frames}
    if cfg.full_cifar10:
        opts["full"] = True
    if split == "train" and cfg.include_jpeg:
        opts["include_jpeg"] = True
    return opts


def step_budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """The run's optimiser steps (the cosine schedule's length) and the epochs they span:
    ``cfg.total_steps`` where set (the last epoch partial when it ends mid-epoch), else
    ``cfg.epochs`` whole epochs."""
    total = cfg.total_steps if cfg.total_steps is not None else cfg.epochs * steps_per_epoch
    return total, math.ceil(total / steps_per_epoch)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and its process CPU seconds."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t, time.process_time() - c


def robust_val_data(cfg: TrainConfig) -> tuple[ImageData | None, str]:
    """Images for the per-epoch robust accuracy and where they come from: for CIFAR-10 the first
    ``robust_val_size`` JPEG training images that no run without ``include_jpeg`` trains on (held-out
    training images); otherwise the LAST images of the test split, disjoint from the first
    ``val_size`` ones (and from the first-n images every evaluation uses)."""
    k = cfg.robust_val_size
    if k == 0:
        return None, ""
    if cfg.dataset == "cifar10" and not (cfg.include_jpeg or cfg.full_cifar10):
        held = load_cifar10_heldout(k, cfg.data_root)
        if held is not None and len(held) == k:
            return held, f"the first {k} JPEG-q75 CIFAR-10 training images (held out of training)"
    test = load_dataset(cfg.dataset, "test", cfg.data_root, **dataset_options(cfg, "test"))
    first = len(test) if cfg.val_size is None else cfg.val_size
    if first + k > len(test):
        raise AbnnError(f"--robust-val-size {k} overlaps the {first} validation images of the {len(test)}-image "
                        f"test split; use at most {len(test) - first} (or a smaller --val-size)")
    tail = ImageData(test.x[-k:], test.y[-k:], test.num_classes, f"{test.name}-last{k}", test.class_names)
    return tail, f"the last {k} images of the {test.name} split (disjoint from the first {first})"


def clean_val_size(cfg: TrainConfig) -> int | None:
    """``cfg.val_size``, except that "all" (``None``) leaves out the last ``robust_val_size``
    test images when the per-epoch robust accuracy takes them (:func:`robust_val_data`): the
    value a run records for "every validation image not held out for robust validation"."""
    tail = cfg.robust_val_size and not (cfg.dataset == "cifar10" and not (cfg.include_jpeg or cfg.full_cifar10))
    if cfg.val_size is not None or not tail:
        return cfg.val_size
    n = len(load_dataset(cfg.dataset, "test", cfg.data_root, **dataset_options(cfg, "test")))
    if cfg.robust_val_size >= n:
        raise AbnnError(f"--robust-val-size {cfg.robust_val_size} leaves no validation image of the {n}-image "
                        f"{cfg.dataset} validation split; use fewer")
    return n - cfg.robust_val_size


def software_versions() -> dict:
    import torchvision

    return {"abnn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


#: the files a training run writes in its folder (what ``fresh=True`` discards)
RUN_FILES = ("checkpoint.pt", "model.pt", "best.pt", "metrics.jsonl", "train_results.json", "config.json")


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool | None = None, fresh: bool = False,
          progress: bool | str = True, max_steps: int | None = None) -> dict:
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
    the end ``model.pt`` (final weights) and ``train_results.json`` (counted cost N per step,
    steps, seconds, accuracies) are written.  The per-epoch clean and robust validation is timed
    apart (wall and CPU seconds per epoch in ``metrics.jsonl``, totals in ``train_results.json``,
    see :func:`validation_totals`) and is not part of ``train_seconds``.
    ``max_steps`` stops early (tests and benchmarks; the checkpoint then allows an exact resume).
    ``progress``: True for progress bars and a line per epoch, ``"lines"`` for the lines only
    (stages that run beside each other), False for silence.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or a process group already initialised) every rank
    calls this; the global batch stays ``cfg.batch_size`` and rank 0 writes the files (see
    :mod:`abnn.training.distributed`).

    Run folders you can trust: the writing process holds the folder's lock
    (:func:`abnn.runs.run_lock`); a resume continues only a run recorded with the same defining
    settings (:func:`abnn.config.config_differences`) and never rewrites ``config.json``; a
    non-finite loss stops the run (:class:`~abnn.errors.DivergedError`) before any checkpoint
    or ``model.pt`` holds diverged weights.
    """
    cfg.validate()
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
            return _train(resolve_config(cfg), Path(run_dir), ctx, device, resume=False if fresh else resume,
                          progress=progress if ctx.is_main else False, max_steps=max_steps)
    finally:
        shutdown(ctx)


def _check_run_folder(run: Path, cfg: TrainConfig, resume: bool | None) -> bool:
    """Before any computation: whether to continue the run in ``run`` (see :func:`train`); a new
    run never overwrites a run, a continued run has the same settings."""
    ckpt = run / "checkpoint.pt"
    if resume is None:
        resume = ckpt.is_file()
        if not resume and (run / "model.pt").is_file():
            raise AbnnError(f"run folder {run} holds a run without checkpoint.pt to continue; pass --fresh to train "
                            "it again there, or choose a new --out")
    if not resume:
        if ckpt.is_file() or (run / "model.pt").is_file():
            raise AbnnError(f"run folder {run} already holds a run; leave out resume=False to continue it, pass "
                            "--fresh to start it over, or choose a new --out")
        return False
    if not ckpt.is_file():
        raise AbnnError(f"--resume: {run} holds no checkpoint.pt, so there is nothing to continue; "
                        "leave out --resume (a run continues by default when there is something to continue)")
    if not (run / "config.json").is_file():
        raise AbnnError(f"{run} holds checkpoint.pt but no config.json, so its settings cannot be checked; "
                        "pass --fresh to start the run over, or train into a new --out")
    check_same_run(run, cfg, fix="a run continues only with its recorded settings: pass those, --fresh to start "
                                 "it over, or train into a new --out")
    return True


def _first_bad_step(bad: Tensor, ctx: DistContext) -> int | None:
    """The first step whose loss was not finite (on any rank), or ``None``: one device sync, and
    under DDP one small collective, so every rank stops at the same check."""
    if ctx.enabled:
        bad = torch.where(bad < 0, torch.iinfo(torch.long).max, bad)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
    first = int(bad.item())
    return first if first >= 0 else None


def _finite_weights(model: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one sync; checked before each checkpoint)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


_CKPT_KEYS = ("model", "optimizer", "scheduler", "epoch")


def _train(cfg: TrainConfig, run: Path, ctx: DistContext, device: torch.device, *, resume: bool | None,
           progress: bool | str, max_steps: int | None) -> dict:
    ckpt_path = run / "checkpoint.pt"
    resume = _check_run_folder(run, cfg, resume)
    amp_dtype = resolve_amp(cfg.amp, device)  # before any data is read: a refused --amp fails at once
    if cfg.batch_size % ctx.world_size:
        raise AbnnError(f"batch size {cfg.batch_size} (the global batch) is not divisible by the {ctx.world_size} "
                        "processes; choose a multiple of the process count")
    per_rank_batch = cfg.batch_size // ctx.world_size
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    train_data = load_dataset(cfg.dataset, "train", cfg.data_root, **dataset_options(cfg, "train")).subset(cfg.train_size)
    val_data = (load_dataset(cfg.dataset, "test", cfg.data_root, **dataset_options(cfg, "test")).subset(cfg.val_size)
                if cfg.val_size != 0 else None)
    rob_data, rob_source = robust_val_data(cfg)

    model = build_model_from_config(cfg).to(device)
    if ctx.rank > 0:  # own random stream per rank (PGD-AT starts, dropout); rank 0 matches a single process
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    if ctx.enabled and cfg.sync_bn:
        sub = frozen_substitute(model)
        convert_sync_batchnorm(model, exclude=[sub] if sub is not None else [])
    if cfg.channels_last:  # channels_last_3d for video models (5-D convolution weights)
        video = any(p.dim() == 5 for p in model.parameters())
        model = model.to(memory_format=torch.channels_last_3d if video else torch.channels_last)
    if ctx.is_main and not resume:  # a resume keeps the recorded config (its defining settings are these)
        cfg.save(run / "config.json")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(train_data, per_rank_batch, shuffle=True, augment=cfg.augment, drop_last=True,
                         seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=device,
                         on_device=cfg.data_on_device)
    if ctx.enabled and not isinstance(train_data, ImageData):
        raise AbnnError(f"distributed training of {cfg.dataset} (a streamed dataset) is not supported; "
                        "train it with one process")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise AbnnError(f"{len(train_data)} training images give no full batch of {cfg.batch_size}"
                        f"{f' over {ctx.world_size} processes' if ctx.enabled else ''}; lower --batch-size")
    budget, n_epochs = step_budget(cfg, steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=budget)
    counter = attach_networks(PassCounter(), model)

    start_epoch, skip, train_seconds, train_cpu, partial, ck = 0, 0, 0.0, 0.0, None, None
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if not isinstance(ck, dict) or any(k not in ck for k in _CKPT_KEYS):
            raise CheckpointError(f"{ckpt_path} is not an abnn training checkpoint (needs {', '.join(_CKPT_KEYS)}); "
                                  "delete it to start the run over")
        check_state_dict(ck["model"], model, ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        counter.load_state_dict(ck.get("cost", {}))
        per_rank = ck.get("rng_per_rank")
        mine = per_rank[ctx.rank] if per_rank and len(per_rank) == ctx.world_size else (ck.get("rng") if ctx.is_main else None)
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            if device.type == "cuda" and mine.get("cuda") is not None:
                torch.cuda.set_rng_state(mine["cuda"], device)
        saved_world = int(ck.get("world_size", 1))
        train_seconds = float(ck.get("train_seconds", 0.0))
        train_cpu = float(ck.get("train_cpu_seconds", 0.0))
        if ck.get("epoch_done", True):
            start_epoch = int(ck["epoch"]) + 1
        else:
            start_epoch, skip, partial = int(ck["epoch"]), int(ck["batch_in_epoch"]), ck["epoch_partial"]
        if ctx.is_main:
            _truncate_metrics(run, start_epoch)
        if progress:
            where = f"epoch {start_epoch + 1}, batch {skip + 1}" if skip else f"epoch {start_epoch + 1}"
            tqdm.write(f"resuming {run} at step {int(ck.get('step', 0))} ({where})")
            if ck.get("version") not in (None, __version__):
                tqdm.write(f"note: checkpoint written by abnn {ck.get('version')}, resuming with {__version__}")
            if saved_world != ctx.world_size:
                tqdm.write(f"note: checkpoint written by {saved_world} processes, resuming with {ctx.world_size}: "
                           "the data order per rank differs from an uninterrupted run")

    fwd: nn.Module = torch.compile(model) if cfg.compile else model
    if ctx.enabled:
        fwd = wrap_ddp(fwd, ctx, device, raw=model, sync_bn=cfg.sync_bn)
    step_fn = TrainStep(fwd, batch_loss_for(cfg), opt, sched, amp_dtype=amp_dtype, channels_last=cfg.channels_last,
                        counter=counter, device_type=device.type)
    if ck is not None and step_fn.scaler.is_enabled() and ck.get("scaler"):
        step_fn.scaler.load_state_dict(ck["scaler"])
    step = int(ck.get("step", start_epoch * steps_per_epoch)) if ck is not None else 0
    good_ckpt_step = step if ck is not None else None
    del ck
    # first step whose loss was not finite (-1: none), kept on the device: no sync per step
    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite(*, weights: bool = False) -> None:
        """Stop on a non-finite loss (and, before a checkpoint, non-finite weights): called only
        where the loop syncs anyway (every 20 steps with the progress bar, checkpoints, epoch ends)."""
        if weights and not _finite_weights(model):
            bad_step.masked_fill_(bad_step < 0, step)
        first = _first_bad_step(bad_step, ctx)
        if first is None:
            return
        kept = (f"the last good checkpoint ({ckpt_path}, step {good_ckpt_step}) is kept" if good_ckpt_step is not None
                else "no checkpoint had been written")
        raise DivergedError(f"training diverged: the loss or the weights became non-finite at step {first} (epoch "
                            f"{(first - 1) // steps_per_epoch + 1}); stopped before saving them: {kept}, no model.pt. "
                            "Start a new run with a lower --lr (or --amp off)")

    def save_checkpoint(epoch: int, done: bool, batches: int, part: tuple | None) -> None:
        """Everything an exact resume needs; every rank calls it (collectives), rank 0 writes."""
        nonlocal good_ckpt_step
        check_finite(weights=True)
        rngs = all_gather_object(_rng_state(device), ctx)
        state = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": step_fn.scaler.state_dict(), "cost": counter.state_dict(),
            "epoch": epoch, "epoch_done": done, "batch_in_epoch": batches, "step": step,
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu, "rng": rngs[0], "rng_per_rank": rngs, "world_size": ctx.world_size,
            "config": cfg.to_dict(), "version": __version__,
        }
        if part is not None:  # a mid-epoch checkpoint: the epoch's sums so far, over all ranks
            loss_sum, correct, seen, seconds = part
            if ctx.enabled:
                tot = all_reduce_sum(torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))]), ctx)
                loss_sum, correct, seen = tot[0], tot[1].long(), int(tot[2].item())
            state["epoch_partial"] = {"loss_sum": loss_sum.detach().cpu(), "correct": correct.detach().cpu(),
                                      "seen": seen, "seconds": seconds}
        if ctx.is_main:
            save_atomic(state, ckpt_path)
        good_ckpt_step = step

    for epoch in range(start_epoch, n_epochs):
        epoch_len = min(steps_per_epoch, budget - epoch * steps_per_epoch)  # the budget's last epoch may be partial
        loader.set_epoch(epoch)
        fwd.train()
        # this rank's sums over the epoch (rank 0 also carries the global sums of a resumed partial epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen, epoch_seconds, done_in_epoch = 0, 0.0, 0
        batches = iter(loader)
        if epoch == start_epoch and skip:
            if partial is not None:
                epoch_seconds = float(partial["seconds"])
                if ctx.is_main:
                    loss_sum = partial["loss_sum"].to(device=device, dtype=torch.float64)
                    correct = partial["correct"].to(device=device, dtype=torch.long)
                    seen = int(partial["seen"])
            _skip_batches(loader, batches, skip)
            done_in_epoch = skip
        bar = tqdm(batches, desc=f"{cfg.method} epoch {epoch + 1}/{n_epochs}", disable=progress is not True,
                   leave=False, dynamic_ncols=True, total=epoch_len, initial=done_in_epoch)
        t0, c0, paused, stop = time.perf_counter(), time.process_time(), 0.0, False
        for x, y in _until_interrupt(bar, enabled=not ctx.enabled):
            if x is None:  # Ctrl-C: checkpoint at this step boundary, then stop as interrupted
                save_checkpoint(epoch, False, done_in_epoch, (loss_sum, correct, seen, epoch_seconds + (
                    time.perf_counter() - t0 - paused)))
                tqdm.write(f"interrupted: {ckpt_path} holds step {step} (epoch {epoch + 1}, batch {done_in_epoch}); "
                           "the same command continues from there")
                raise KeyboardInterrupt
            loss, logits = step_fn(x, y)
            bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(loss), step + 1)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            done_in_epoch += 1
            if (done_in_epoch - 1) % 20 == 0:
                check_finite()
                if progress is True:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            stop = max_steps is not None and step >= max_steps
            if done_in_epoch < epoch_len and (stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                tp = time.perf_counter()
                save_checkpoint(epoch, False, done_in_epoch,
                                (loss_sum, correct, seen, epoch_seconds + (tp - t0 - paused)))
                paused += time.perf_counter() - tp
            if stop or done_in_epoch == epoch_len:
                break
        check_finite()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds += time.perf_counter() - t0 - paused
        train_seconds += epoch_seconds
        train_cpu += time.process_time() - c0
        complete = done_in_epoch == epoch_len
        if ctx.enabled:
            tot = all_reduce_sum(torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))]), ctx)
            tot_loss, tot_correct, tot_seen = tot.tolist()
        else:
            tot_loss, tot_correct, tot_seen = loss_sum.item(), correct.item(), seen
        if ctx.is_main:
            record = {"epoch": epoch + 1, "step": step, "train_loss": tot_loss / max(tot_seen, 1),
                      "train_acc": tot_correct / max(tot_seen, 1), "val_acc": None, "lr": sched.get_last_lr()[0],
                      "epoch_seconds": epoch_seconds, "cost_N_per_step": counter.per_step()}
            if val_data is not None:  # float32, as every evaluation; timed apart from the training steps
                record["val_acc"], record["val_seconds"], record["val_cpu_seconds"] = _timed(
                    lambda: accuracy(model, val_data, 256, device))
            if rob_data is not None:
                record["val_pgd_acc"], record["robust_val_seconds"], record["robust_val_cpu_seconds"] = _timed(
                    lambda: robust_accuracy(model, rob_data, 256, device, eps=cfg.at_eps, seed=cfg.seed))
            val_acc = record["val_acc"]
            if not complete:
                record["partial"] = True
            append_jsonl(run / "metrics.jsonl", record)
            if cfg.keep_best and complete and _is_best_epoch(run, epoch + 1):
                save_atomic(model.state_dict(), run / "best.pt")
            if progress:
                tqdm.write(f"[{run.name}: {cfg.method}] epoch {epoch + 1}/{n_epochs} loss {record['train_loss']:.4f} "
                           f"train_acc {record['train_acc']:.4f} val_acc {val_acc if val_acc is None else round(val_acc, 4)} "
                           + (f"val_pgd_acc {record['val_pgd_acc']:.4f} " if rob_data is not None else "") +
                           f"({epoch_seconds:.1f}s, {counter.per_step():.1f}N/step)")
        if complete:  # after the metrics line: a kill between the two writes is undone by _truncate_metrics
            save_checkpoint(epoch, True, done_in_epoch, None)
        if stop:
            break

    counter.detach()
    results: dict = {}
    if ctx.is_main:
        robust = _robust_summary(run, cfg, rob_source, n_epochs) if rob_data is not None else {}
        final_state = model.state_dict()
        if cfg.keep_best and robust.get("best_robust_epoch") is not None and (run / "best.pt").is_file():
            final_state = load_checkpoint(run / "best.pt")  # Wong et al.: the best-robust epoch, not the last
        save_atomic(final_state, run / "model.pt")
        last = _last_metrics(run)
        results = {
            "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "epochs": n_epochs, "train_size": len(train_data), "batch_size": cfg.batch_size, "seed": cfg.seed,
            "final_val_acc": last.get("val_acc"), "val_size": len(val_data) if val_data is not None else 0,
            "steps": step, "planned_steps": budget, "max_steps": max_steps, "complete": step >= budget,
            "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(counter.steps, 1),
            "train_cpu_seconds": train_cpu, "total_steps": budget, "steps_per_epoch": steps_per_epoch,
            **validation_totals(run),
            "cost": counter.summary(), "cost_N_per_step": counter.per_step(),
            "device": str(device), "threads": torch.get_num_threads(), "versions": software_versions(),
            "world_size": ctx.world_size, "per_rank_batch_size": per_rank_batch,
            "cost_scope": "per rank (N = one pass over the per-rank batch)" if ctx.enabled else "single process",
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
            "channels_last": cfg.channels_last, "compile": cfg.compile,
            "sync_bn": bool(cfg.sync_bn and ctx.enabled),
            **robust,
        }
        if get_method(cfg.method).substitute:
            results["substitute"] = {"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                                     "stats": cfg.substitute_stats, "encoder": cfg.encoder}
        skipped = [*getattr(train_data, "skipped", []), *getattr(val_data, "skipped", [])]
        if hasattr(train_data, "skipped"):  # videos that could not be decoded (UCF-101): never silent
            results["skipped_videos"] = [{"video": v, "reason": r} for v, r in skipped]
            results["n_skipped_videos"] = len(skipped)
        write_json_atomic(run / "train_results.json", results)
    barrier(ctx)
    if not ctx.is_main:
        results = {"method": cfg.method, "rank": ctx.rank, "world_size": ctx.world_size,
                   "final_val_acc": None, "cost_N_per_step": counter.per_step(), "train_seconds": train_seconds}
    return results


#: a drop of the per-epoch robust accuracy by more than this from its best marks catastrophic
#: overfitting (Wong et al. 2020 stop when it falls by 0.2 between checks)
CATASTROPHIC_DROP = 0.2


def _robust_history(run: Path) -> list[tuple[int, float]]:
    return [(r["epoch"], r["val_pgd_acc"]) for r in _metric_lines(run / "metrics.jsonl")
            if r.get("val_pgd_acc") is not None and not r.get("partial")]


def _is_best_epoch(run: Path, epoch: int) -> bool:
    """Whether ``epoch`` has the highest per-epoch robust accuracy so far (the earliest on ties)."""
    hist = _robust_history(run)
    best = max(hist, key=lambda e: (e[1], -e[0]), default=None)
    return best is not None and best[0] == epoch


def _robust_summary(run: Path, cfg: TrainConfig, source: str, epochs: int) -> dict:
    """The per-epoch robust accuracies, the best epoch, and whether catastrophic overfitting
    happened (a fall of more than CATASTROPHIC_DROP below the best so far)."""
    hist = _robust_history(run)
    best = max(hist, key=lambda e: (e[1], -e[0]), default=(None, None))
    peak, drops = 0.0, []
    for ep, acc in hist:
        peak = max(peak, acc)
        if peak - acc > CATASTROPHIC_DROP:
            drops.append(ep)
    return {"robust_val": {"source": source, "n": cfg.robust_val_size, "attack": f"PGD-5, eps {cfg.at_eps * 255:g}/255",
                           "per_epoch": [acc for _, acc in hist]},
            "best_robust_epoch": best[0], "best_val_pgd_acc": best[1],
            "final_val_pgd_acc": hist[-1][1] if hist else None,
            "catastrophic_overfitting_epochs": drops, "model_pt_epoch": best[0] if cfg.keep_best else epochs}


#: train_results.json's totals of the per-epoch validation clocks in metrics.jsonl (not in the training time)
VALIDATION_CLOCKS = {"validation_seconds": "val_seconds", "validation_cpu_seconds": "val_cpu_seconds",
                     "robust_validation_seconds": "robust_val_seconds",
                     "robust_validation_cpu_seconds": "robust_val_cpu_seconds"}


def validation_totals(run: Path) -> dict[str, float]:
    """Wall and process CPU seconds of the run's per-epoch clean and robust validation, summed
    over the epochs of ``metrics.jsonl`` (a resume keeps the lines of the epochs it keeps)."""
    records = _metric_lines(run / "metrics.jsonl")
    return {total: sum(r.get(key) or 0.0 for r in records) for total, key in VALIDATION_CLOCKS.items()}


def _until_interrupt(batches, *, enabled: bool):
    """``batches``, with Ctrl-C (SIGINT) deferred to the next step boundary: there it yields
    ``(None, None)`` once, so that the loop can write a checkpoint of a whole step before it
    stops.  A second Ctrl-C interrupts at once.  Only in the main thread of a single process
    (distributed ranks would see it at different steps; their checkpoints need every rank)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield from batches
        return
    hit = []

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        it = iter(batches)
        while not hit:
            item = next(it, None)
            if item is None:
                break
            yield item
        if hit:  # also after the epoch's last step: the checkpoint then holds the whole epoch
            yield None, None
    finally:
        signal.signal(signal.SIGINT, previous)


def _skip_batches(loader: BatchLoader, batches, n: int) -> None:
    """Advance ``batches`` (an iterator over ``loader``) by ``n`` batches without training on
    them: the permutation and the augmentation generator advance exactly as in an uninterrupted
    epoch."""
    for _ in range(n):
        next(batches)


def _metric_lines(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn line (a kill or a full disk mid-append) is skipped."""
    records = []
    for ln in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rec = json.loads(ln)
            if isinstance(rec, dict) and "epoch" in rec:
                records.append(rec)
    return records


def _last_metrics(run: Path) -> dict:
    records = _metric_lines(run / "metrics.jsonl")
    return records[-1] if records else {}


def _truncate_metrics(run: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint's completed epochs (a kill between the
    two writes, or the partial line of a ``max_steps`` stop)."""
    path = run / "metrics.jsonl"
    if path.is_file():
        keep = "".join(dumps_strict(r) + "\n" for r in _metric_lines(path) if r["epoch"] <= epochs_done)
        atomic_write(path, lambda f: f.write(keep.encode()))
