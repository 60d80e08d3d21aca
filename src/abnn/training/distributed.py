"""Data-parallel training over several processes (``torchrun``), for every method.

Launch::

    torchrun --standalone --nproc_per_node=K -m abnn.cli train ...      # or:
    abnn train --nproc K ...                                             # launches the line above

Design (and why):

* **Process group from the environment** that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA (rank ``r`` uses
  ``cuda:LOCAL_RANK``), gloo on CPU.  A group that already exists (a caller initialised it) is
  used and left alone; one created here is destroyed when training ends.
* **Global batch = ``batch_size``.**  Each rank trains on ``batch_size // world_size`` images of
  its shard (:class:`~abnn.data.BatchLoader` with ``rank``/``world_size``: rank ``r`` takes
  positions ``r, r+W, r+2W, ...`` of the epoch's seeded permutation), so the union of the ranks'
  batches at step ``k`` is exactly the single-process batch ``k``.  The per-rank loss is the mean
  over the rank's batch and DDP averages gradients, which gives the gradient of the global mean.
  ``batch_size`` must be divisible by the world size.
* **DDP wraps the model, and the frozen substitute of ABNN is put on DDP's ignore list**
  (:func:`wrap_ddp`).  Its parameters have ``requires_grad=False`` (so the reducer never sees
  them anyway); ignoring its parameters *and buffers* also keeps DDP from broadcasting them at
  construction and from touching its BatchNorm buffers in the per-forward buffer broadcast.  The
  substitute is thus replicated, never synchronised: every rank builds it from the same weights
  file, it always runs in eval mode, and its buffers never change.  (The alternative, a wrapper
  module that holds the target and adaptive layers but not the substitute, would need a second
  forward path through :class:`~abnn.ABNN`; the ignore list keeps one model and one forward.)
* **SyncBatchNorm (default on, ``sync_bn``).**  Without it every rank normalises with the
  statistics of its own ``batch_size / W`` images, so training differs from a single-process run.
  :func:`convert_sync_batchnorm` converts the BatchNorm layers of the *trainable* part (the
  target, and for ABNN the BN inside every adaptive layer) in place by swapping their class to a
  synchronised subclass: identities, forward hooks (ABNN's stage hooks) and state-dict keys are
  kept, so checkpoints and ``model.pt`` are interchangeable with single-process runs.  On CUDA the
  training-mode forward is :class:`torch.nn.SyncBatchNorm`'s; on CPU (where PyTorch's SyncBN
  refuses to run) it is :func:`cpu_sync_batch_norm`, a differentiable all-reduce of per-channel
  sums.  In eval mode both are plain BatchNorm (no communication).  The substitute is never
  converted.  With SyncBN the running statistics are computed from the global batch and are
  identical on every rank, so the per-forward buffer broadcast is switched off; without SyncBN
  DDP's default applies (rank 0's running statistics are broadcast at every forward).
  ABNN's ``substitute_stats="batch"`` takes the substitute's moments over the rank's batch (a
  per-rank quantity by design of that option); the default ``"sample"`` is per-sample and exact.
* **Rank 0 writes** metrics, checkpoints, ``model.pt`` and ``train_results.json``; every rank
  keeps its own random state (saved per rank in the checkpoint) and its own cost counter, which
  counts passes *per rank*: the N per step stays 2N / 3N / 12N, with N a pass over the per-rank
  batch.
* **PGD-AT** makes its adversarial examples with the module inside DDP (``ddp.module``), in eval
  mode: attack iterations are local, need no communication and do not disturb DDP's reducer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import AbnnError

__all__ = ["DistContext", "init_distributed", "shutdown", "convert_sync_batchnorm", "cpu_sync_batch_norm",
           "wrap_ddp", "unwrap", "all_reduce_sum", "all_gather_object", "barrier", "launch_torchrun",
           "strip_nproc"]


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise AbnnError(f"environment variable {name}={os.environ.get(name)!r} is not an integer") from None


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join (or create from the ``torchrun`` environment) the default process group.

    ``device`` is the resolved single-process device; on CUDA each rank gets
    ``cuda:LOCAL_RANK``.  Returns ``(DistContext(), device)`` unchanged when not distributed."""
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), owns_group=False)
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext(), device
        if not dist.is_available():
            raise AbnnError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        ctx = DistContext(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), owns_group=True)
    if ctx.world_size > 1 and device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise AbnnError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                            "lower --nproc_per_node")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if ctx.owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            kwargs["device_id"] = device
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch: no device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return ctx, device


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``t`` over ranks (a no-op when not distributed); returns a new tensor."""
    t = t.clone()
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# -- SyncBatchNorm by class swap ------------------------------------------------------------------

def _sync_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with autograd: the gradient of a sum over ranks is the sum of the ranks'
    gradients (what ``torch.distributed.nn.functional.all_reduce`` does; that one is deprecated)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def cpu_sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Training-mode BatchNorm over the union of all ranks' batches, for CPU tensors (gloo).

    One differentiable all-reduce (whose backward all-reduces the gradient) of per-channel sums, sums of squares and the count, so the gradient
    is exact; running statistics are updated with the global mean and unbiased variance exactly
    as :func:`torch.nn.functional.batch_norm` does."""
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() // max(c, 1))])
    total = _AllReduceSum.apply(local)
    n = total[2 * c:]
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
            else:
                factor = bn.momentum
            unbiased = var * n / (n - 1).clamp_min(1)
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _SyncMixin:
    """Training-mode forward synchronised over the default process group (see the module doc)."""

    process_group = None  # read by nn.SyncBatchNorm.forward: None means the default group
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if self.training and _sync_active():
            if input.device.type == "cpu":
                self._check_input_dim(input)
                return cpu_sync_batch_norm(self, input)
            return nn.SyncBatchNorm.forward(self, input)
        return super().forward(input)


class SyncBatchNorm1d(_SyncMixin, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` synchronised across ranks in training mode."""


class SyncBatchNorm2d(_SyncMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` synchronised across ranks in training mode."""


class SyncBatchNorm3d(_SyncMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` synchronised across ranks in training mode."""


_SYNC_CLASSES = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_batchnorm(module: nn.Module, *, exclude: Sequence[nn.Module] = ()) -> int:
    """Make every plain ``BatchNorm1d/2d/3d`` in ``module`` (outside the ``exclude`` subtrees)
    synchronised across ranks, in place, by swapping its class (objects, hooks and state-dict
    keys unchanged).  Returns how many layers were converted."""
    skip = {id(m) for ex in exclude for m in ex.modules()}
    n = 0
    for m in module.modules():
        cls = _SYNC_CLASSES.get(type(m))
        if cls is not None and id(m) not in skip:
            m.__class__ = cls
            n += 1
    return n


def frozen_substitute(model: nn.Module) -> nn.Module | None:
    """The frozen substitute of an ABNN model or a probe (``None`` for other models)."""
    from ..framework import ABNN
    from ..probe import Probe

    return model.substitute if isinstance(model, (ABNN, Probe)) else None


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device, *, raw: nn.Module | None = None,
             sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel(model)`` with the frozen substitute on DDP's ignore list.

    ``model`` may be the raw model or a compiled wrapper of it (``raw`` then names the raw model,
    whose ABNN substitute is looked up).  Buffers are broadcast at every forward only without
    SyncBN (see the module doc)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sub = frozen_substitute(raw if raw is not None else model)
    if sub is not None:
        sub_ids = {id(t) for t in (*sub.parameters(), *sub.buffers())}
        ignore = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in sub_ids]
        setter = getattr(DDP, "_set_params_and_buffers_to_ignore_for_model", None)
        if setter is not None:
            setter(model, ignore)
        else:  # the attribute DDP reads
            model._ddp_params_and_buffers_to_ignore = ignore
    kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}
    import inspect

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = not sync_bn
    else:
        kwargs["broadcast_buffers"] = not sync_bn
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return DDP(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (used by PGD-AT's attack), else ``model``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


# -- the --nproc launcher -------------------------------------------------------------------------

def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc K`` / ``--nproc=K``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch_torchrun(nproc: int, cli_args: Sequence[str]) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=K -m abnn.cli ARGS``
    and return its exit status (``ARGS`` must not contain ``--nproc``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "abnn.cli", *cli_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def launch_from_cli(nproc: int, batch_size: int, argv: Sequence[str]) -> bool:
    """``abnn train --nproc K``: relaunch the same command (``argv``, without ``--nproc``) as K
    processes and return True once they finished; False when this process trains itself (K = 1,
    or already one of K processes under torchrun)."""
    if nproc < 1:
        raise AbnnError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1 or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return False
    if batch_size % nproc:
        raise AbnnError(f"--batch-size {batch_size} (the global batch) is not divisible by --nproc {nproc}")
    code = launch_torchrun(nproc, strip_nproc(argv))
    if code != 0:
        raise AbnnError(f"distributed training with {nproc} processes failed (exit status {code}); "
                        "see the messages above")
    return True
