"""OUDefend, the feature-restoration baseline of ABNN's video tables (``METHOD.md`` s. 5).

Lo, Valanarasu and Patel, "Overcomplete Representations Against Adversarial Videos", ICIP 2021.
A residual block inserted after a stage of the target (``layer3``, "conv4")::

    out  = ReLU(f + conv1x1(OUCD(f)))
    OUCD = ReLU(conv1x1_{8->C}( OC(g) + UC(g) )),  g = ReLU(conv1x1_{C->8}(f))

* overcomplete branch OC (features projected to *higher* spatial resolution, as in KiU-Net):
  three 3x3(x3) convs 8->16->32->64, each followed by x2 spatial upsampling and ReLU, then three
  convs 64->32->16->8, each followed by a (1, 2, 2) (2-D: 2x2) max-pool and ReLU; after each of
  the last three, a 1x1 conv of the encoder feature of the same size and width is added (skip
  connections between matching sizes: 32 @ 4x, 16 @ 2x, 8 @ 1x);
* undercomplete branch UC: conv 8->16, max-pool, ReLU, conv 16->8, interpolation back to the
  input size, ReLU, 1x1 conv 8->8.

No normalisation and no biases.  The 3-D block up/down-samples space only (time is short in deep
video features); the 2-D analogue serves for images.  OUDefend is trained with PGD-AT.

Choices of ours where the description is silent: skips are added after the ReLU (as in KiU-Net's
decoder); upsampling is nearest-neighbour (exact inverse size of the max-pool), the undercomplete
interpolation is (bi/tri)linear to the exact input size (odd sizes round down in the pool);
``zero_init=True`` starts the block as the identity on a post-ReLU feature (useful when inserting
it into a pretrained target); the default keeps PyTorch's initialisation.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OUCD", "OUDefend", "OUDefend2d", "OUDefend3d", "with_oudefend"]


class OUCD(nn.Module):
    """Overcomplete-undercomplete convolutional block of OUDefend for ``dims`` = 2 or 3."""

    def __init__(self, channels: int, dims: int = 3, *, hidden: int = 8) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.dims = dims
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        pool = nn.MaxPool3d((1, 2, 2)) if dims == 3 else nn.MaxPool2d(2)
        self._scale = (1.0, 2.0, 2.0) if dims == 3 else (2.0, 2.0)
        self._interp = "trilinear" if dims == 3 else "bilinear"
        w = (hidden, 2 * hidden, 4 * hidden, 8 * hidden)  # 8, 16, 32, 64

        def c3(i: int, o: int) -> nn.Module:
            return conv(i, o, 3, padding=1, bias=False)

        def c1(i: int, o: int) -> nn.Module:
            return conv(i, o, 1, bias=False)

        self.pool = pool
        self.inp = c1(channels, w[0])
        # overcomplete: encoder 8->16->32->64 (each x2 up), decoder 64->32->16->8 (each /2)
        self.oc_enc = nn.ModuleList([c3(w[0], w[1]), c3(w[1], w[2]), c3(w[2], w[3])])
        self.oc_dec = nn.ModuleList([c3(w[3], w[2]), c3(w[2], w[1]), c3(w[1], w[0])])
        self.oc_skip = nn.ModuleList([c1(w[2], w[2]), c1(w[1], w[1]), c1(w[0], w[0])])
        # undercomplete: conv 8->16, pool, ReLU, conv 16->8, interpolate back, ReLU, 1x1
        self.uc_conv1 = c3(w[0], w[1])
        self.uc_conv2 = c3(w[1], w[0])
        self.uc_out = c1(w[0], w[0])
        self.out = c1(w[0], channels)

    def forward(self, f: Tensor) -> Tensor:
        g = F.relu(self.inp(f))
        # overcomplete branch
        enc = [g]
        h = g
        for conv in self.oc_enc:
            h = F.relu(F.interpolate(conv(h), scale_factor=self._scale, mode="nearest"))
            enc.append(h)
        for conv, skip, e in zip(self.oc_dec, self.oc_skip, reversed(enc[:-1])):
            h = F.relu(self.pool(conv(h))) + skip(e)
        oc = h
        # undercomplete branch
        u = F.relu(self.pool(self.uc_conv1(g)))
        u = F.interpolate(self.uc_conv2(u), size=g.shape[2:], mode=self._interp, align_corners=False)
        uc = self.uc_out(F.relu(u))
        return F.relu(self.out(oc + uc))


class OUDefend(nn.Module):
    """``ReLU(f + conv1x1(OUCD(f)))`` on ``(B, C, [T,] H, W)`` features; shape-preserving."""

    dims = 3

    def __init__(self, channels: int, *, hidden: int = 8, zero_init: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.oucd = OUCD(channels, self.dims, hidden=hidden)
        conv = nn.Conv3d if self.dims == 3 else nn.Conv2d
        self.proj = conv(channels, channels, 1, bias=False)
        if zero_init:
            nn.init.zeros_(self.proj.weight)

    def forward(self, f: Tensor) -> Tensor:
        if f.dim() != self.dims + 2 or f.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}({self.channels}) expects (B, {self.channels}, "
                             f"{'T, ' if self.dims == 3 else ''}H, W) features, got {tuple(f.shape)}")
        return F.relu(f + self.proj(self.oucd(f)))

    def extra_repr(self) -> str:
        return f"{self.channels}"


class OUDefend3d(OUDefend):
    """OUDefend for video features ``(B, C, T, H, W)`` (Lo, Valanarasu, Patel, ICIP 2021)."""

    dims = 3


class OUDefend2d(OUDefend):
    """2-D analogue of OUDefend for image features ``(B, C, H, W)``."""

    dims = 2


def _apply_block(block: nn.Module, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return block(output)


def with_oudefend(target: nn.Module, after: str = "layer3", *, channels: int | None = None,
                  dims: int | None = None, hidden: int = 8, zero_init: bool = False) -> nn.Module:
    """Insert an OUDefend block after the submodule ``after`` of ``target`` (in place; returned).

    The block becomes the submodule ``target.oudefend`` (so it is trained, saved and moved with
    the target; existing state-dict keys are unchanged) and is applied by a forward hook on the
    stage.  ``channels`` and ``dims`` default to those of the last BatchNorm inside the stage
    (its output width for ResNet-style stages).  ``copy.deepcopy`` of the result stays consistent
    (the hook is a picklable partial on the block, rebound to the copy's block).
    """
    modules = dict(target.named_modules())
    if after not in modules or after == "":
        raise ValueError(f"target has no submodule named {after!r}")
    if hasattr(target, "oudefend"):
        raise ValueError("target already has an `oudefend` block")
    stage = modules[after]
    if channels is None or dims is None:
        bns = [m for m in stage.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
        if not bns:
            raise ValueError(f"cannot infer the width of stage {after!r} (no BatchNorm inside): pass channels= and dims=")
        channels = bns[-1].num_features if channels is None else channels
        dims = (3 if isinstance(bns[-1], nn.BatchNorm3d) else 2) if dims is None else dims
    cls = OUDefend3d if dims == 3 else OUDefend2d if dims == 2 else None
    if cls is None:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    ref = next(target.parameters(), None)
    block = cls(channels, hidden=hidden, zero_init=zero_init)
    if ref is not None:
        block = block.to(device=ref.device, dtype=ref.dtype)
    target.add_module("oudefend", block)
    stage.register_forward_hook(functools.partial(_apply_block, block))
    return target
