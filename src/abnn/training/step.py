"""One optimisation step of any method, and the device and precision it runs with."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..errors import AbnnError
from .cost import PassCounter
from .methods import BatchLoss

__all__ = ["TrainStep", "resolve_amp", "resolve_device"]


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
    """One optimisation step of a method, shared by :func:`abnn.training.train` and the throughput bench.

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
