"""The Attack contract shared by every attack (torchattacks style).

``atk = PGD(model, eps=8/255, alpha=2/255, steps=5); x_adv = atk(x, y)``

On every call the base class: validates the input (a float tensor (B, C, ...) in [0, 1], finite,
labels (B,)), puts the model in eval mode and restores its previous mode afterwards, never
mutates ``x``, seeds its own generator when ``seed`` is set, and runs the attack in float32 even
inside an autocast region (``amp`` asks for mixed precision explicitly).  Attacks differentiate
with ``torch.autograd.grad`` w.r.t. the input only, so parameter ``.grad`` fields are never
touched.  On the CPU, image attacks run in the channels-last memory format (``channels_last``):
the same attack, about 1.2-1.3x faster.  Subclasses implement :meth:`perturb` alone, and check
their budgets with :func:`check_budget` and :func:`check_count` (one-line errors).
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AbnnError, InputRangeError

__all__ = ["Attack", "AttackOptionError", "FirstFooled", "InvalidInputError", "UnsupportedModelError",
           "check_budget", "check_choice", "check_count"]


class InvalidInputError(InputRangeError):
    """Input that no attack accepts (shape, range, NaN, labels); the attacks' case of the
    package's :class:`~abnn.errors.InputRangeError`."""


class AttackOptionError(AbnnError, ValueError):
    """An attack option out of range: a budget that is not finite, negative, above the pixel range,
    a count below its minimum, an unknown choice or option name."""


class UnsupportedModelError(AbnnError, TypeError):
    """An attack that needs a kind of model it was not given (e.g. the statistics attack on a
    model without adaptive layers)."""


def check_budget(name: str, value: Any, *, positive: bool = False) -> float:
    """A pixel budget (eps, alpha): a finite number in [0, 1] (``(0, 1]`` when ``positive``), a
    fraction of the pixel range; 8/255 = 0.0314."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AttackOptionError(f"{name} must be a number (a fraction of the pixel range, e.g. {name}=8/255), "
                                f"got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise AttackOptionError(f"{name} must be a finite number {'> 0' if positive else '>= 0'} (a fraction of the "
                                f"pixel range, e.g. {name}=8/255), got {value!r}")
    if v > 1:
        hint = f"; for {v:g}/255 pass {name}={v:g}/255" if v <= 255 else ""
        raise AttackOptionError(f"{name} must be at most 1 (inputs are pixels in [0, 1]), got {value!r}{hint}")
    return v


def check_count(name: str, value: Any, *, minimum: int) -> int:
    """An integer option (steps, restarts, queries) of at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise AttackOptionError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise AttackOptionError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise AttackOptionError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


class Attack:
    """Base class.  Keyword-only options, defaults from ``METHOD.md`` s. 4.

    Args:
        model: any ``nn.Module`` mapping [0, 1] inputs of shape (B, C, ...) to logits (B, K).
        seed: when set, every call draws its randomness from a generator seeded with it, so the
            same input gives the same adversarial example; ``None`` uses the global RNG.
        channels_last: run the attack on a channels-last copy of the input (``channels_last_3d``
            for clips).  ``None`` (default): on for image batches (B, C, H, W) on the CPU, where
            oneDNN's convolutions (forward and input-gradient) are about 1.2-1.3x faster in that
            layout (``abnn bench throughput``), off otherwise.  Only the memory layout changes,
            not the values: the result is returned in the input's layout, and gradients agree
            with the default layout up to float rounding (the summation order of the kernels).
        amp: ``None`` (default): the attack runs in float32, with any autocast region of the
            caller switched off (a bf16 gradient is a weaker attack).  A dtype (``torch.bfloat16``,
            ``torch.float16``): the attack runs under autocast with it, e.g. PGD adversarial
            training that keeps the cost of its mixed-precision training step.
    """

    def __init__(self, model: nn.Module, *, seed: int | None = None, channels_last: bool | None = None,
                 amp: torch.dtype | None = None) -> None:
        if amp is not None and not (isinstance(amp, torch.dtype) and amp.is_floating_point):
            raise AttackOptionError(f"amp must be None or a floating dtype such as torch.bfloat16, got {amp!r}")
        self.model = model
        self.seed = seed
        self.channels_last = channels_last
        self.amp = amp

    # subclasses implement this ---------------------------------------------------------------
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # the contract -----------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self._validate(x, y)
        fmt = self.memory_format(x)
        x_in = x.detach() if fmt is None else x.detach().contiguous(memory_format=fmt)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad(), self.precision(x.device):
                x_adv = self.perturb(x_in, y.detach())
        except IndexError as exc:  # cross-entropy's "Target 12 is out of bounds": a label the model lacks
            if "out of bounds" not in str(exc):
                raise
            raise InvalidInputError(f"y holds label {int(y.max())}, more than the model's classes: labels must be "
                                    "0 .. num_classes - 1 of the model's outputs") from None
        finally:
            self.model.train(was_training)
        x_adv = x_adv.detach()
        if fmt is not None and x.is_contiguous():
            x_adv = x_adv.contiguous()
        return x_adv


    def precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """float32 (autocast off) unless ``amp`` asks for a mixed-precision dtype."""
        if self.amp is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.amp)

    def memory_format(self, x: Tensor) -> torch.memory_format | None:
        """The layout the attack runs in for input ``x`` (``None``: as given); see ``channels_last``."""
        use = self.channels_last
        if use is None:
            use = x.dim() == 4 and x.device.type == "cpu"
        if not use or x.dim() not in (4, 5):
            return None
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` (or ``None`` for the global RNG)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy summed over the batch (the sum keeps per-sample gradients unscaled)."""
        return F.cross_entropy(logits, y, reduction="sum")

    def objective(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The loss the attack ascends at ``x`` and the logits of the same forward pass: by default
        :meth:`loss` of ``model(x)``.  An attack that ascends something else (a term on the
        model's internals, a loss on part of the batch) overrides this, not its step loop."""
        logits = self.model(x)
        return self.loss(logits, y), logits

    def input_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient of :meth:`objective` w.r.t. ``x`` (a leaf copy is made) and the logits."""
        x = x.detach().requires_grad_(True)
        loss, logits = self.objective(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        return grad, logits.detach()

    @staticmethod
    def _validate(x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InvalidInputError(f"x must be a float tensor of pixels in [0, 1], got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.dim() < 3:
            raise InvalidInputError(f"x must have shape (B, C, ...) (images (B,C,H,W) or clips (B,C,T,H,W)), got {tuple(x.shape)}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise InvalidInputError(f"y must be integer labels of shape ({x.shape[0]},), got {getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
        if y.numel() and int(y.min()) < 0:
            raise InvalidInputError(f"y must be labels 0 .. num_classes - 1, got {int(y.min())}")
        if not torch.isfinite(x).all():
            raise InvalidInputError("x contains NaN or inf; attacks need finite pixels in [0, 1]")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > 1:
            raise InvalidInputError(f"x must be pixels in [0, 1] (normalisation belongs inside the model); got range [{lo:.3g}, {hi:.3g}]")

    def settings(self) -> dict[str, Any]:
        """The attack's settings (for reports): its public attributes but the model."""
        return {k: v for k, v in vars(self).items()
                if k != "model" and not k.startswith("_") and not (k in ("channels_last", "amp") and v is None)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={_fmt(v) if k in ('eps', 'alpha') else repr(v)}" for k, v in self.settings().items())
        return f"{type(self).__name__}({opts})"


class FirstFooled:
    """Per sample, the first iterate that fools the model, else the last one (as APGD keeps a
    fooling iterate, Croce & Hein 2020): a later iterate can leave the decision region again, and
    the attack must not give back a success it found.

    ``update(x_k, logits_k)`` after each forward pass of iterate ``x_k`` (no extra pass: the logits
    are those of the gradient computation); ``result(x_last)`` at the end.  Element-wise work only,
    no device synchronisation."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.y = y
        self.fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.first = x
        self._view = (-1,) + (1,) * (x.dim() - 1)

    def update(self, x_k: Tensor, logits: Tensor) -> None:
        new = (logits.argmax(1) != self.y) & ~self.fooled
        self.first = torch.where(new.view(self._view), x_k, self.first)
        self.fooled |= new

    def result(self, x_last: Tensor) -> Tensor:
        return torch.where(self.fooled.view(self._view), self.first, x_last)


def _fmt(v: Any) -> str:
    """Pixel budgets read best as k/255 (k with up to three decimals, e.g. 0.8/255)."""
    if isinstance(v, float) and 0 < v < 1:
        k = v * 255
        if abs(k * 1000 - round(k * 1000)) < 1e-6:
            return f"{round(k, 3):g}/255"
    return repr(v)
