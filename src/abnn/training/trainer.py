"""The :class:`Trainer`: one training run in named phases (paper s. 2.2 and 3.3).

:meth:`Trainer.fit` runs ``setup`` (data, model, optimiser, schedule, pass counter), ``restore``
(a resume: the checkpoint's states and position), ``run_epoch`` for each epoch (training steps,
``metrics.jsonl`` line, validation, checkpoint via ``save``) and ``finish`` (``model.pt`` and
``train_results.json``).  :func:`abnn.training.train` is the public entry: it takes the run
folder's lock and the distributed context and hands them to a Trainer.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..config import TrainConfig
from ..data import BatchLoader, load_dataset
from ..data.datasets import ImageData
from ..errors import AbnnError, DivergedError
from ..models.io import check_state_dict
from ..runs import build_model_from_config, check_same_run
from .checkpoint import EpochPartial, TrainingCheckpoint, load_checkpoint, rng_state, save_atomic, set_rng_state
from .cost import PassCounter, attach_networks
from .distributed import (DistContext, all_gather_object, all_reduce_sum, barrier, convert_sync_batchnorm,
                          frozen_substitute, wrap_ddp)
from .methods import batch_loss_for, get_method
from .metrics import append_metrics, last_metrics, truncate_metrics
from .results import TrainResult, software_versions
from .step import TrainStep, resolve_amp
from .validation import (clean_val_data, dataset_options, is_best_epoch, robust_summary, robust_val_data,
                         validate_epoch, validation_totals)

__all__ = ["Trainer", "step_budget"]

#: steps between the checks for a non-finite loss (each one syncs with the device)
CHECK_EVERY = 20


def step_budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """The run's optimiser steps (the cosine schedule's length) and the epochs they span:
    ``cfg.total_steps`` where set (the last epoch partial when it ends mid-epoch), else
    ``cfg.epochs`` whole epochs."""
    total = cfg.total_steps if cfg.total_steps is not None else cfg.epochs * steps_per_epoch
    return total, math.ceil(total / steps_per_epoch)


@dataclass
class _Epoch:
    """One epoch in progress: this rank's sums (rank 0 also carries the global sums of a resumed
    partial epoch), the batches done (skipped ones included) and the training clock, which stops
    while a mid-epoch checkpoint is written."""

    index: int
    length: int  # steps in this epoch: the budget's last epoch may be partial
    loss_sum: Tensor
    correct: Tensor
    seen: int = 0
    done: int = 0
    seconds: float = 0.0  # training seconds before the clock started (a resumed partial epoch's)
    t0: float = field(default=0.0, repr=False)
    c0: float = field(default=0.0, repr=False)
    paused: float = 0.0

    def start_clock(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def elapsed(self, now: float | None = None) -> float:
        return self.seconds + ((time.perf_counter() if now is None else now) - self.t0 - self.paused)

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        self.done += 1

    def totals(self, ctx: DistContext) -> tuple[Tensor, Tensor, int]:
        """The loss sum, correct predictions and samples over all ranks."""
        if not ctx.enabled:
            return self.loss_sum, self.correct, self.seen
        tot = all_reduce_sum(torch.stack([self.loss_sum, self.correct.double(),
                                          self.loss_sum.new_tensor(float(self.seen))]), ctx)
        return tot[0], tot[1].long(), int(tot[2].item())


class _DivergenceGuard:
    """Stops the run on a non-finite loss (and, before a checkpoint, non-finite weights) before
    any checkpoint or ``model.pt`` holds diverged weights.  The first bad step is kept on the
    device, so a step costs no sync; :meth:`check` syncs, only where the loop syncs anyway."""

    def __init__(self, ctx: DistContext, device: torch.device, ckpt_path: Path, steps_per_epoch: int) -> None:
        self.ctx, self.ckpt_path, self.steps_per_epoch = ctx, ckpt_path, steps_per_epoch
        self.bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none
        self.good_step: int | None = None  # the step of the last checkpoint written

    def mark(self, loss: Tensor, step: int) -> None:
        self.bad.masked_fill_((self.bad < 0) & ~torch.isfinite(loss), step)

    def check(self, step: int, weights_of: nn.Module | None = None) -> None:
        if weights_of is not None and not _finite_weights(weights_of):
            self.bad.masked_fill_(self.bad < 0, step)
        first = _first_bad_step(self.bad, self.ctx)
        if first is None:
            return
        kept = (f"the last good checkpoint ({self.ckpt_path}, step {self.good_step}) is kept"
                if self.good_step is not None else "no checkpoint had been written")
        raise DivergedError(f"training diverged: the loss or the weights became non-finite at step {first} (epoch "
                            f"{(first - 1) // self.steps_per_epoch + 1}); stopped before saving them: {kept}, no "
                            "model.pt. Start a new run with a lower --lr (or --amp off)")


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


class Trainer:
    """One training run of ``cfg`` (resolved) into the folder ``run``; see :meth:`fit`.

    :meth:`setup` sets ``train_data``, ``val_data``, ``rob_data``, ``model`` (the raw module:
    what is validated and saved), ``opt``, ``sched``, ``loader``, ``counter`` and the step budget
    (``budget`` steps over ``n_epochs`` epochs of ``steps_per_epoch``); ``fwd`` is the module the
    steps run (compiled, DDP) and ``step_fn`` the :class:`~abnn.training.step.TrainStep`.
    Every rank of a distributed run builds one; only rank 0 writes files and (with
    ``progress``) prints.  ``progress``: True for progress bars and a line per epoch,
    ``"lines"`` for the lines only, False for silence.
    """

    def __init__(self, cfg: TrainConfig, run: Path, ctx: DistContext, device: torch.device, *,
                 progress: bool | str = True, max_steps: int | None = None) -> None:
        self.cfg, self.run, self.ctx, self.device = cfg, run, ctx, device
        self.progress = progress if ctx.is_main else False
        self.max_steps = max_steps
        self.ckpt_path = run / "checkpoint.pt"
        # the position: the next epoch, the batches of it already done, the global step, the clocks
        self.start_epoch, self.skip, self.partial = 0, 0, None
        self.step, self.train_seconds, self.train_cpu = 0, 0.0, 0.0

    def fit(self, *, resume: bool | None = None) -> TrainResult:
        """Train (the rest of) the run and return its results (rank 0 has written them).
        ``resume``: see :func:`abnn.training.loop.train` (``None``: continue what is there)."""
        resume = _check_run_folder(self.run, self.cfg, resume)
        self.setup(resume=resume)
        scaler_state = self.restore() if resume else None
        self._make_step(scaler_state)
        for epoch in range(self.start_epoch, self.n_epochs):
            if self.run_epoch(epoch):
                break
        return self.finish()

    # -- setup ----------------------------------------------------------------------------------

    def setup(self, *, resume: bool) -> None:
        """Build the data, model, optimiser, schedule and pass counter (the run folder is checked)."""
        cfg, ctx = self.cfg, self.ctx
        self.amp_dtype = resolve_amp(cfg.amp, self.device)  # before any data is read: a refused --amp fails at once
        if cfg.batch_size % ctx.world_size:
            raise AbnnError(f"batch size {cfg.batch_size} (the global batch) is not divisible by the "
                            f"{ctx.world_size} processes; choose a multiple of the process count")
        self.per_rank_batch = cfg.batch_size // ctx.world_size
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.train_data = load_dataset(cfg.dataset, "train", cfg.data_root,
                                       **dataset_options(cfg, "train")).subset(cfg.train_size)
        self.val_data = clean_val_data(cfg)
        self.rob_data, self.rob_source = robust_val_data(cfg)
        self._build_model(save_config=not resume)  # a resume keeps the recorded config
        self._build_optimisation()

    def _build_model(self, *, save_config: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        model = build_model_from_config(cfg).to(self.device)
        if ctx.rank > 0:  # own random stream per rank (PGD-AT starts, dropout); rank 0 matches a single process
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
        if ctx.enabled and cfg.sync_bn:
            sub = frozen_substitute(model)
            convert_sync_batchnorm(model, exclude=[sub] if sub is not None else [])
        if cfg.channels_last:  # channels_last_3d for video models (5-D convolution weights)
            video = any(p.dim() == 5 for p in model.parameters())
            model = model.to(memory_format=torch.channels_last_3d if video else torch.channels_last)
        if ctx.is_main and save_config:
            cfg.save(self.run / "config.json")
        self.model = model

    def _build_optimisation(self) -> None:
        """SGD with momentum and a cosine schedule over the step budget (METHOD.md), the loader
        (this rank's share of each global batch) and the pass counter."""
        cfg, ctx = self.cfg, self.ctx
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.loader = BatchLoader(self.train_data, self.per_rank_batch, shuffle=True, augment=cfg.augment,
                                  drop_last=True, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                                  device=self.device, on_device=cfg.data_on_device)
        if ctx.enabled and not isinstance(self.train_data, ImageData):
            raise AbnnError(f"distributed training of {cfg.dataset} (a streamed dataset) is not supported; "
                            "train it with one process")
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise AbnnError(f"{len(self.train_data)} training images give no full batch of {cfg.batch_size}"
                            f"{f' over {ctx.world_size} processes' if ctx.enabled else ''}; lower --batch-size")
        self.budget, self.n_epochs = step_budget(cfg, self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=self.budget)
        self.counter = attach_networks(PassCounter(), self.model)
        self.guard = _DivergenceGuard(ctx, self.device, self.ckpt_path, self.steps_per_epoch)

    def _make_step(self, scaler_state: dict | None) -> None:
        """The module the steps run (compiled, wrapped in DDP) and the step itself."""
        cfg = self.cfg
        fwd: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if self.ctx.enabled:
            fwd = wrap_ddp(fwd, self.ctx, self.device, raw=self.model, sync_bn=cfg.sync_bn)
        self.fwd = fwd
        self.step_fn = TrainStep(fwd, batch_loss_for(cfg), self.opt, self.sched, amp_dtype=self.amp_dtype,
                                 channels_last=cfg.channels_last, counter=self.counter, device_type=self.device.type)
        if scaler_state and self.step_fn.scaler.is_enabled():
            self.step_fn.scaler.load_state_dict(scaler_state)

    # -- restore and save -----------------------------------------------------------------------

    def restore(self) -> dict | None:
        """Continue from ``checkpoint.pt`` at its exact step: the model, optimiser, schedule,
        counter and this rank's RNG states, the position and clocks; drop the metric lines of
        epochs it does not hold.  Returns the GradScaler's state (the step is built later)."""
        ck, ctx = TrainingCheckpoint.load(self.ckpt_path), self.ctx
        check_state_dict(ck.model, self.model, self.ckpt_path)
        self.model.load_state_dict(ck.model)
        self.opt.load_state_dict(ck.optimizer)
        self.sched.load_state_dict(ck.scheduler)
        self.counter.load_state_dict(ck.cost)
        mine = ck.rng_for(ctx.rank, ctx.world_size)
        if mine is not None:
            set_rng_state(mine, self.device)
        self.train_seconds, self.train_cpu = float(ck.train_seconds), float(ck.train_cpu_seconds)
        self.start_epoch, self.skip = ck.resume_position()
        self.partial = ck.epoch_partial
        self.step = int(ck.step) if ck.step is not None else self.start_epoch * self.steps_per_epoch
        self.guard.good_step = self.step
        if ctx.is_main:
            truncate_metrics(self.run, self.start_epoch)
        if self.progress:
            self._resume_notes(ck)
        return ck.scaler

    def _resume_notes(self, ck: TrainingCheckpoint) -> None:
        where = f"epoch {self.start_epoch + 1}, batch {self.skip + 1}" if self.skip else f"epoch {self.start_epoch + 1}"
        tqdm.write(f"resuming {self.run} at step {int(ck.step or 0)} ({where})")
        if ck.version not in (None, __version__):
            tqdm.write(f"note: checkpoint written by abnn {ck.version}, resuming with {__version__}")
        if int(ck.world_size) != self.ctx.world_size:
            tqdm.write(f"note: checkpoint written by {ck.world_size} processes, resuming with {self.ctx.world_size}: "
                       "the data order per rank differs from an uninterrupted run")

    def save(self, ep: _Epoch, *, seconds: float | None = None) -> None:
        """Write ``checkpoint.pt``: at an epoch's end (``seconds`` None), else mid-epoch with the
        epoch's sums so far and its ``seconds``.  Every rank calls it (collectives), rank 0 writes."""
        ctx = self.ctx
        self.guard.check(self.step, weights_of=self.model)
        rngs = all_gather_object(rng_state(self.device), ctx)
        partial = None
        if seconds is not None:
            loss_sum, correct, seen = ep.totals(ctx)
            partial = EpochPartial(loss_sum.detach().cpu(), correct.detach().cpu(), seen, seconds)
        ck = TrainingCheckpoint(
            model=self.model.state_dict(), optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
            scaler=self.step_fn.scaler.state_dict(), cost=self.counter.state_dict(), epoch=ep.index,
            epoch_done=partial is None, batch_in_epoch=ep.done, step=self.step, train_seconds=self.train_seconds,
            train_cpu_seconds=self.train_cpu, rng=rngs[0], rng_per_rank=rngs, world_size=ctx.world_size,
            config=self.cfg.to_dict(), version=__version__, epoch_partial=partial)
        if ctx.is_main:
            ck.save(self.ckpt_path)
        self.guard.good_step = self.step

    # -- one epoch ------------------------------------------------------------------------------

    def run_epoch(self, epoch: int) -> bool:
        """Train epoch ``epoch`` (0-based; on a resume the rest of it), write its metrics line
        and, when it is complete, its checkpoint.  True when ``max_steps`` stops the run.  Ctrl-C
        checkpoints at the next step boundary, then raises :class:`KeyboardInterrupt`."""
        ep, batches = self._begin_epoch(epoch)
        bar = tqdm(batches, desc=f"{self.cfg.method} epoch {epoch + 1}/{self.n_epochs}", leave=False,
                   disable=self.progress is not True, dynamic_ncols=True, total=ep.length, initial=ep.done)
        ep.start_clock()
        stop = False
        for x, y in _until_interrupt(bar, enabled=not self.ctx.enabled):
            if x is None:  # Ctrl-C: checkpoint at this step boundary, then stop as interrupted
                self.save(ep, seconds=ep.elapsed())
                tqdm.write(f"interrupted: {self.ckpt_path} holds step {self.step} (epoch {epoch + 1}, batch "
                           f"{ep.done}); the same command continues from there")
                raise KeyboardInterrupt
            self._train_step(ep, x, y, bar)
            stop = self.max_steps is not None and self.step >= self.max_steps
            every = self.cfg.checkpoint_every
            if ep.done < ep.length and (stop or (every and self.step % every == 0)):
                tp = time.perf_counter()
                self.save(ep, seconds=ep.elapsed(tp))
                ep.paused += time.perf_counter() - tp
            if stop or ep.done == ep.length:
                break
        self._end_epoch(ep)
        return stop

    def _begin_epoch(self, epoch: int) -> tuple[_Epoch, Iterator]:
        """The epoch's sums and its batches; on a resume, the partial epoch's sums and the
        batches already done skipped (their order and augmentation replayed, not trained on)."""
        self.loader.set_epoch(epoch)
        self.fwd.train()
        ep = _Epoch(epoch, min(self.steps_per_epoch, self.budget - epoch * self.steps_per_epoch),
                    loss_sum=torch.zeros((), dtype=torch.float64, device=self.device),
                    correct=torch.zeros((), dtype=torch.long, device=self.device))
        batches = iter(self.loader)
        if epoch == self.start_epoch and self.skip:
            if self.partial is not None:
                ep.seconds = float(self.partial.seconds)
                if self.ctx.is_main:
                    ep.loss_sum = self.partial.loss_sum.to(device=self.device, dtype=torch.float64)
                    ep.correct = self.partial.correct.to(device=self.device, dtype=torch.long)
                    ep.seen = int(self.partial.seen)
            for _ in range(self.skip):
                next(batches)
            ep.done = self.skip
        return ep, batches

    def _train_step(self, ep: _Epoch, x: Tensor, y: Tensor, bar) -> None:
        loss, logits = self.step_fn(x, y)
        self.guard.mark(loss, self.step + 1)
        ep.add(loss, logits, y)
        self.step += 1
        if (ep.done - 1) % CHECK_EVERY == 0:
            self.guard.check(self.step)
            if self.progress is True:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.sched.get_last_lr()[0]:.4f}")

    def _end_epoch(self, ep: _Epoch) -> None:
        """Stop the clocks, write the metrics line (rank 0) and, for a complete epoch, the checkpoint."""
        self.guard.check(self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ep.seconds = ep.elapsed()
        self.train_seconds += ep.seconds
        self.train_cpu += time.process_time() - ep.c0
        complete = ep.done == ep.length
        loss_sum, correct, seen = ep.totals(self.ctx)
        if self.ctx.is_main:
            self._log_epoch(ep, loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), complete)
        if complete:  # after the metrics line: a kill between the two writes is undone by truncate_metrics
            self.save(ep)

    def _log_epoch(self, ep: _Epoch, train_loss: float, train_acc: float, complete: bool) -> None:
        """The epoch's line of ``metrics.jsonl`` with its validation (timed apart from training);
        with ``keep_best`` the best robust epoch's weights in ``best.pt``."""
        cfg, epoch = self.cfg, ep.index + 1
        record = {"epoch": epoch, "step": self.step, "train_loss": train_loss, "train_acc": train_acc,
                  "val_acc": None, "lr": self.sched.get_last_lr()[0], "epoch_seconds": ep.seconds,
                  "cost_N_per_step": self.counter.per_step()}
        record.update(validate_epoch(self.model, self.val_data, self.rob_data, self.device, eps=cfg.at_eps,
                                     seed=cfg.seed))
        if not complete:
            record["partial"] = True
        append_metrics(self.run, record)
        if cfg.keep_best and complete and is_best_epoch(self.run, epoch):
            save_atomic(self.model.state_dict(), self.run / "best.pt")
        if self.progress:
            val_acc = record["val_acc"]
            tqdm.write(f"[{self.run.name}: {cfg.method}] epoch {epoch}/{self.n_epochs} loss {train_loss:.4f} "
                       f"train_acc {train_acc:.4f} val_acc {val_acc if val_acc is None else round(val_acc, 4)} "
                       + (f"val_pgd_acc {record['val_pgd_acc']:.4f} " if self.rob_data is not None else "") +
                       f"({ep.seconds:.1f}s, {self.counter.per_step():.1f}N/step)")

    # -- finish ---------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Write ``model.pt`` (with ``keep_best``: the best robust epoch's weights, as Wong et al.)
        and ``train_results.json`` (rank 0), and return the results."""
        self.counter.detach()
        if not self.ctx.is_main:
            barrier(self.ctx)
            return TrainResult(method=self.cfg.method, rank=self.ctx.rank, world_size=self.ctx.world_size,
                               cost_N_per_step=self.counter.per_step(), train_seconds=self.train_seconds)
        robust = robust_summary(self.run, self.cfg, self.rob_source, self.n_epochs) if self.rob_data is not None else {}
        final_state = self.model.state_dict()
        if self.cfg.keep_best and robust.get("best_robust_epoch") is not None and (self.run / "best.pt").is_file():
            final_state = load_checkpoint(self.run / "best.pt")
        save_atomic(final_state, self.run / "model.pt")
        result = self._result(robust)
        result.save(self.run)
        barrier(self.ctx)
        return result

    def _result(self, robust: dict) -> TrainResult:
        cfg, ctx, counter = self.cfg, self.ctx, self.counter
        skipped = getattr(self.train_data, "skipped", None)  # videos that could not be decoded: never silent
        if skipped is not None:
            skipped = [{"video": v, "reason": r} for v, r in [*skipped, *getattr(self.val_data, "skipped", [])]]
        method = get_method(cfg.method)
        return TrainResult(
            method=cfg.method, dataset=cfg.dataset, arch=cfg.arch, width=cfg.width, epochs=self.n_epochs,
            train_size=len(self.train_data), batch_size=cfg.batch_size, seed=cfg.seed,
            final_val_acc=last_metrics(self.run).get("val_acc"),
            val_size=len(self.val_data) if self.val_data is not None else 0, steps=self.step,
            planned_steps=self.budget, max_steps=self.max_steps, complete=self.step >= self.budget,
            train_seconds=self.train_seconds, seconds_per_step=self.train_seconds / max(counter.steps, 1),
            train_cpu_seconds=self.train_cpu, total_steps=self.budget, steps_per_epoch=self.steps_per_epoch,
            **validation_totals(self.run), cost=counter.summary(), cost_N_per_step=counter.per_step(),
            device=str(self.device), threads=torch.get_num_threads(), versions=software_versions(),
            world_size=ctx.world_size, per_rank_batch_size=self.per_rank_batch,
            cost_scope="per rank (N = one pass over the per-rank batch)" if ctx.enabled else "single process",
            amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "off",
            channels_last=cfg.channels_last, compile=cfg.compile, sync_bn=bool(cfg.sync_bn and ctx.enabled),
            **robust,
            substitute={"source": cfg.substitute, "arch": cfg.substitute_arch, "width": cfg.substitute_width,
                        "stats": cfg.substitute_stats, "encoder": cfg.encoder} if method.substitute else None,
            skipped_videos=skipped)


def _check_run_folder(run: Path, cfg: TrainConfig, resume: bool | None) -> bool:
    """Before any computation: whether to continue the run in ``run`` (see :func:`abnn.training.
    loop.train`); a new run never overwrites a run, a continued run has the same settings."""
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
