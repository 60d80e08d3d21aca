"""Pieces shared by the model definitions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so that everything outside it (data,
    attacks, eps) works on [0, 1] pixels.  Works for (B, C, H, W) and (B, C, T, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected input of shape (B, {self.mean.shape[1]}, ...) with pixels in [0, 1], got {tuple(x.shape)}"
            )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"


def scaled(channels: int, width: float) -> int:
    """Channel count after a width multiplier (at least 1)."""
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, int(round(channels * width)))


class ZeroPadShortcut(nn.Module):
    """A type-A residual shortcut (He et al., CVPR 2016, option A): parameter-free, subsample
    then zero-pad the channels.  Subclasses implement :meth:`shortcut`.

    ``detach_input``: build the shortcut from detached data, as the authors' released 3D ResNet
    does (``torch.cat([out.data, zero_pads])``): the forward values are unchanged, the gradient
    through the shortcut branch is cut.  Off by default (the exact gradient);
    :meth:`abnn.framework.ABNN.gradient_protocol` turns it on for the ``typeA-detach`` protocol.
    """

    def __init__(self) -> None:
        super().__init__()
        self.detach_input = False

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x.detach() if self.detach_input else x)

    def shortcut(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
