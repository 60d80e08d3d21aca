"""The 3D ResNet-18 substitute of the authors' released video code (a reading of
shaoyuanlo/GARD_eval ``models/resnext_onthefly.py``, itself Hara et al.'s 3D-ResNets-PyTorch,
CVPR 2018), as an alternative to torchvision's R3D-18 (:mod:`abnn.models.r3d`).

Differences from torchvision's ``r3d_18``: a 7x7x7 stem convolution (stride (1, 2, 2)) followed by
a 3x3x3 max-pool of stride 2; parameter-free type-A shortcuts (stride-s subsampling, zero channels
appended) where the width changes, instead of 1x1x1 convolutions.  The taps are those of the
authors' ``forward``: after the max-pool and after layer1..layer4.  Module names follow the
authors' (``conv1``, ``bn1``, ``layerN.i.conv1`` ...), so their state dict loads once its
``module.resnet.`` prefix is stripped.  The authors' shortcut is built from ``out.data``, which
cuts its gradient; here that is ``detach_shortcut=True`` (default off: the exact gradient), the
same switch as the ``typeA-detach`` gradient protocol.  Input: [0, 1] clips, normalised inside
with the Kinetics statistics of torchvision's video models (the authors normalise outside).
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import Tensor, nn

from .common import Normalize, ZeroPadShortcut, scaled
from .r3d import R3D18_MEAN, R3D18_STD

__all__ = ["R3DAuthors", "TypeAShortcut3d", "r3d18_authors_substitute"]


class TypeAShortcut3d(ZeroPadShortcut):
    """The authors' ``downsample_basic_block``: ``avg_pool3d(kernel 1, stride)`` (a subsampling),
    then ``planes - C`` zero channels appended."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride

    def shortcut(self, x: Tensor) -> Tensor:
        s = self.stride
        out = x[:, :, ::s, ::s, ::s]
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.planes - out.shape[1]))

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}, detach_input={self.detach_input}"


class _Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample: nn.Module = (TypeAShortcut3d(planes, stride) if stride != 1 or in_planes != planes
                                      else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class R3DAuthors(nn.Module):
    """3D ResNet-18 with type-A shortcuts (BasicBlocks [2, 2, 2, 2], widths 64..512 times ``width``).

    ``forward(x)`` gives logits; ``forward(x, return_taps=True)`` the five features after the
    max-pool and layer1..layer4 (without computing the head).
    """

    TAPS = ("maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 400, *, width: float = 1.0, detach_shortcut: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.normalize = Normalize(R3D18_MEAN, R3D18_STD)
        self.conv1 = nn.Conv3d(3, widths[0], kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_planes, layers = widths[0], []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(_Block(in_planes, w, stride), _Block(w, w)))
            in_planes = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        for m in self.modules():
            if isinstance(m, ZeroPadShortcut):
                m.detach_input = bool(detach_shortcut)

    def forward(self, x: Tensor, *, return_taps: bool = False) -> Tensor | list[Tensor]:
        if x.dim() != 5:
            raise ValueError(f"R3DAuthors expects clips (B, 3, T, H, W) in [0, 1], got {tuple(x.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        taps = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            taps.append(x)
        if return_taps:
            return taps
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


def r3d18_authors_substitute(num_classes: int = 400, *, weights: str | os.PathLike | None = None,
                             width: float = 1.0, detach_shortcut: bool = False) -> R3DAuthors:
    """Build the authors' 3D ResNet-18 substitute; ``weights``: a state dict file of this model
    (or the authors' with ``module.resnet.`` stripped from its keys)."""
    from .io import check_state_dict, load_state_dict_file

    model = R3DAuthors(num_classes, width=width, detach_shortcut=detach_shortcut)
    if weights is not None:
        state = load_state_dict_file(weights)
        check_state_dict(state, model, weights)
        model.load_state_dict(state)
    return model
