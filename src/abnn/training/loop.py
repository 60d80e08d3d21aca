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
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..attacks import PGD
from ..config import TrainConfig, write_json_atomic
from ..data import BatchLoader, load_dataset
from ..data.datasets import ImageData
from ..errors import AbnnError, CheckpointError
from ..models.io import check_state_dict
from ..runs import build_model_from_config
from .checkpoint import load_checkpoint, save_atomic
from .cost import PassCounter, attach_networks
from .distributed import (DistContext, all_gather_object, all_reduce_sum, barrier, convert_sync_batchnorm,
                          frozen_substitute, init_distributed, shutdown, unwrap, wrap_ddp)

BatchLoss = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Standard and ABNN training: cross-entropy on clean inputs."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def pgd_at_loss(eps: float, alpha: float, steps: int) -> BatchLoss:
    """PGD-AT: cross-entropy on L-inf PGD examples (random start) generated each step.  The
    attack runs with the model in eval mode (BN running statistics untouched by attack
    iterations, as in torchattacks); the training pass runs in train mode.  Under DDP the attack
    uses the module inside the wrapper (local, no communication); it runs with the autocast dtype
    the caller set (the training step's, passed on explicitly: attacks otherwise run in float32),
    in the batch's memory layout (the training step's ``channels_last``, not the attack's own CPU
    default), so that every method trains in the same layout and their costs stay comparable, and
    trains on the last iterate (Madry et al.), not on the first that fools the model."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        x_adv = PGD(unwrap(model), eps=eps, alpha=alpha, steps=steps, random_start=True, first_fooling=False,
                    channels_last=False, amp=amp)(x, y)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits

    return loss


def batch_loss_for(cfg: TrainConfig) -> BatchLoss:
    """``pgd-at`` and ``oudefend`` (PGD-AT of a model with a feature-restoration block) train on
    PGD examples; ``standard`` and ``abnn`` on clean data."""
    if cfg.method in ("pgd-at", "oudefend"):
        return pgd_at_loss(cfg.at_eps, cfg.at_alpha, cfg.at_steps)
    return clean_loss


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
    """Clean top-1 accuracy (model put in eval mode, previous mode restored)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    ac = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ac:
        for x, y in BatchLoader(data, batch_size, device=device):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was)
    return correct.item() / len(data)


def software_versions() -> dict:
    import torchvision

    return {"abnn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool | str = True,
          max_steps: int | None = None) -> dict:
    """Train the run described by ``cfg`` into ``run_dir`` and return its results.

    Each epoch writes one line of ``metrics.jsonl`` and an atomic ``checkpoint.pt`` (also every
    ``cfg.checkpoint_every`` steps within an epoch); with ``resume`` an interrupted run continues
    from its last checkpoint at the exact step.  At the end ``model.pt`` (final weights) and
    ``train_results.json`` (counted cost N per step, seconds, accuracies) are written.
    ``max_steps`` stops early (tests and benchmarks; the checkpoint then allows an exact resume).
    ``progress``: True for progress bars and a line per epoch, ``"lines"`` for the lines only
    (stages that run beside each other), False for silence.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or a process group already initialised) every rank
    calls this; the global batch stays ``cfg.batch_size`` and rank 0 writes the files (see
    :mod:`abnn.training.distributed`).
    """
    cfg.validate()
    ctx, device = init_distributed(resolve_device(cfg.device))
    try:
        return _train(cfg, Path(run_dir), ctx, device, resume=resume, progress=progress if ctx.is_main else False,
                      max_steps=max_steps)
    finally:
        shutdown(ctx)


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


_CKPT_KEYS = ("model", "optimizer", "scheduler", "epoch")


def _train(cfg: TrainConfig, run: Path, ctx: DistContext, device: torch.device, *, resume: bool,
           progress: bool | str, max_steps: int | None) -> dict:
    ckpt_path = run / "checkpoint.pt"
    if run.exists() and (run / "config.json").is_file() and not resume:
        if (run / "model.pt").is_file() or ckpt_path.is_file():
            raise AbnnError(f"run folder {run} already holds a run; pass --resume to continue it or choose a new --out")
    if resume and (run / "config.json").is_file():
        saved = TrainConfig.load(run / "config.json")
        for key in ("method", "dataset", "arch", "width", "epochs", "batch_size", "seed", "train_size"):
            if getattr(saved, key) != getattr(cfg, key):
                raise AbnnError(f"--resume: {key}={getattr(cfg, key)!r} differs from the run's {getattr(saved, key)!r}")
    if cfg.batch_size % ctx.world_size:
        raise AbnnError(f"batch size {cfg.batch_size} (the global batch) is not divisible by the {ctx.world_size} "
                        "processes; choose a multiple of the process count")
    per_rank_batch = cfg.batch_size // ctx.world_size
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    opts = {k: True for k, on in (("include_jpeg", cfg.include_jpeg), ("full", cfg.full_cifar10)) if on}
    train_data = load_dataset(cfg.dataset, "train", cfg.data_root, **opts).subset(cfg.train_size)
    val_opts = {"full": True} if cfg.full_cifar10 else {}
    val_data = load_dataset(cfg.dataset, "test", cfg.data_root, **val_opts).subset(cfg.val_size) if cfg.val_size != 0 else None

    model = build_model_from_config(cfg).to(device)
    if ctx.rank > 0:  # own random stream per rank (PGD-AT starts, dropout); rank 0 matches a single process
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    if ctx.enabled and cfg.sync_bn:
        sub = frozen_substitute(model)
        convert_sync_batchnorm(model, exclude=[sub] if sub is not None else [])
    if cfg.channels_last:  # channels_last_3d for video models (5-D convolution weights)
        video = any(p.dim() == 5 for p in model.parameters())
        model = model.to(memory_format=torch.channels_last_3d if video else torch.channels_last)
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        cfg.save(run / "config.json")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(train_data, per_rank_batch, shuffle=True, augment=cfg.augment, drop_last=True,
                         seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=device)
    if ctx.enabled and not isinstance(train_data, ImageData):
        raise AbnnError(f"distributed training of {cfg.dataset} (a streamed dataset) is not supported; "
                        "train it with one process")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise AbnnError(f"{len(train_data)} training images give no full batch of {cfg.batch_size}"
                        f"{f' over {ctx.world_size} processes' if ctx.enabled else ''}; lower --batch-size")
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    counter = attach_networks(PassCounter(), model)
    amp_dtype = resolve_amp(cfg.amp, device)

    start_epoch, skip, train_seconds, partial, ck = 0, 0, 0.0, None, None
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
    del ck

    def save_checkpoint(epoch: int, done: bool, batches: int, part: tuple | None) -> None:
        """Everything an exact resume needs; every rank calls it (collectives), rank 0 writes."""
        rngs = all_gather_object(_rng_state(device), ctx)
        state = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": step_fn.scaler.state_dict(), "cost": counter.state_dict(),
            "epoch": epoch, "epoch_done": done, "batch_in_epoch": batches, "step": step,
            "train_seconds": train_seconds, "rng": rngs[0], "rng_per_rank": rngs, "world_size": ctx.world_size,
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

    for epoch in range(start_epoch, cfg.epochs):
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
        bar = tqdm(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=progress is not True,
                   leave=False, dynamic_ncols=True, total=steps_per_epoch, initial=done_in_epoch)
        t0, paused, stop = time.perf_counter(), 0.0, False
        for x, y in bar:
            loss, logits = step_fn(x, y)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            done_in_epoch += 1
            if progress is True and (done_in_epoch - 1) % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            stop = max_steps is not None and step >= max_steps
            if done_in_epoch < steps_per_epoch and (stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                tp = time.perf_counter()
                save_checkpoint(epoch, False, done_in_epoch,
                                (loss_sum, correct, seen, epoch_seconds + (tp - t0 - paused)))
                paused += time.perf_counter() - tp
            if stop:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds += time.perf_counter() - t0 - paused
        train_seconds += epoch_seconds
        complete = done_in_epoch == steps_per_epoch
        if ctx.enabled:
            tot = all_reduce_sum(torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))]), ctx)
            tot_loss, tot_correct, tot_seen = tot.tolist()
        else:
            tot_loss, tot_correct, tot_seen = loss_sum.item(), correct.item(), seen
        if ctx.is_main:
            val_acc = accuracy(model, val_data, 256, device, amp_dtype=amp_dtype) if val_data is not None else None
            record = {"epoch": epoch + 1, "step": step, "train_loss": tot_loss / max(tot_seen, 1),
                      "train_acc": tot_correct / max(tot_seen, 1), "val_acc": val_acc, "lr": sched.get_last_lr()[0],
                      "epoch_seconds": epoch_seconds, "cost_N_per_step": counter.per_step()}
            if not complete:
                record["partial"] = True
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                tqdm.write(f"[{run.name}: {cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                           f"train_acc {record['train_acc']:.4f} val_acc {val_acc if val_acc is None else round(val_acc, 4)} "
                           f"({epoch_seconds:.1f}s, {counter.per_step():.1f}N/step)")
        if complete:  # after the metrics line: a kill between the two writes is undone by _truncate_metrics
            save_checkpoint(epoch, True, done_in_epoch, None)
        if stop:
            break

    counter.detach()
    results: dict = {}
    if ctx.is_main:
        save_atomic(model.state_dict(), run / "model.pt")
        last = _last_metrics(run)
        results = {
            "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "epochs": cfg.epochs, "train_size": len(train_data), "batch_size": cfg.batch_size, "seed": cfg.seed,
            "final_val_acc": last.get("val_acc"), "val_size": len(val_data) if val_data is not None else 0,
            "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(counter.steps, 1),
            "cost": counter.summary(), "cost_N_per_step": counter.per_step(),
            "device": str(device), "threads": torch.get_num_threads(), "versions": software_versions(),
            "world_size": ctx.world_size, "per_rank_batch_size": per_rank_batch,
            "cost_scope": "per rank (N = one pass over the per-rank batch)" if ctx.enabled else "single process",
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
            "channels_last": cfg.channels_last, "compile": cfg.compile,
            "sync_bn": bool(cfg.sync_bn and ctx.enabled),
        }
        if cfg.method == "abnn":
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


def _skip_batches(loader: BatchLoader, batches, n: int) -> None:
    """Advance ``batches`` (an iterator over ``loader``) by ``n`` batches without training on
    them: the permutation and the augmentation generator advance exactly as in an uninterrupted
    epoch."""
    for _ in range(n):
        next(batches)


def _last_metrics(run: Path) -> dict:
    try:
        lines = (run / "metrics.jsonl").read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except OSError:
        return {}


def _truncate_metrics(run: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint's completed epochs (a kill between the
    two writes, or the partial line of a ``max_steps`` stop)."""
    path = run / "metrics.jsonl"
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in keep))
