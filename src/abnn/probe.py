"""A probe on a frozen substitute: the cheapest way to use a (robust) feature extractor.

The control of the robust-substitute study (``abnn reproduce robust-substitute``): if ABNN with
a robust substitute is no more robust than a small head trained on that substitute's own
features, the target network adds nothing.  The substitute is frozen exactly as in ABNN (eval
mode, no parameter gradients, inside the autograd graph with respect to the input, so a
white-box attacker differentiates through it).  The head sees the global average of the
substitute's last tapped feature (the deepest feature ABNN pairs with a target stage) through one
hidden layer::

    logits = W2 relu(W1 avgpool(z_s^last) + b1) + b2
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Probe"]


class Probe(nn.Module):
    """A frozen ``substitute`` and a trained head on its pooled last tap.

    Args:
        substitute: the frozen feature extractor; either it supports
            ``substitute(x, return_taps=True) -> list[Tensor]`` (our VGG-19-BN) or ``taps`` names
            its submodules (the last one is used).
        num_classes: classes of the head.
        taps: submodule names of a substitute without ``return_taps`` (e.g. a CIFAR ResNet-18's
            stages); only the last is read.
        input_shape: one input sample's shape, used once to size the head.
        hidden: width of the hidden layer (0: a linear probe).
    """

    def __init__(self, substitute: nn.Module, num_classes: int, *, taps: Sequence[str] | None = None,
                 input_shape: Sequence[int] = (3, 32, 32), hidden: int = 256) -> None:
        super().__init__()
        self.substitute = substitute
        self.tap = taps[-1] if taps else None
        if self.tap is not None and self.tap not in dict(substitute.named_modules()):
            raise ValueError(f"substitute has no submodule named {self.tap!r}")
        self.substitute.requires_grad_(False)
        self.substitute.eval()
        with torch.no_grad():
            channels = self.features(torch.zeros(2, *input_shape)).shape[1]
        self.head = (nn.Linear(channels, num_classes) if hidden == 0 else
                     nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)))

    def features(self, x: Tensor) -> Tensor:
        """The pooled last tap of the substitute, (B, C), with autograd w.r.t. ``x``."""
        if self.tap is None:
            z = self.substitute(x, return_taps=True)[-1]
        else:
            captured: list[Tensor] = []
            handle = self.substitute.get_submodule(self.tap).register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                self.substitute(x)
            finally:
                handle.remove()
            z = captured[0]
        return z.flatten(2).mean(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "Probe":
        """Train mode applies to the head only; the substitute stays in eval mode."""
        super().train(mode)
        self.substitute.eval()
        return self
