"""VGG-19-BN substitute (METHOD.md s. 2) on torchvision's architecture, with the five stage taps."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from .common import IMAGENET_MEAN, IMAGENET_STD, Normalize, scaled

#: Indices in ``vgg19_bn().features`` of the last ReLU of each of the five blocks
#: (64@32x32, 128@16, 256@8, 512@4, 512@2 for a 32x32 input).
VGG19_BN_TAPS = (5, 12, 25, 38, 51)
_VGG19_CFG = tv_vgg.cfgs["E"]


class VGGSubstitute(nn.Module):
    """VGG-19-BN with torchvision's ``features`` layout (so ImageNet weights load one to one).

    ``forward(x)`` gives class logits (used to pretrain it); ``forward(x, return_taps=True)``
    gives the list of the five tap features and stops after the last tap, so ABNN never pays
    for the classifier.  The head is global average pooling + linear for small inputs
    (``head="pooled"``) or torchvision's 4096-4096 classifier (``head="torchvision"``, the one
    the ImageNet weights come with).
    """

    def __init__(self, num_classes: int = 200, *, width: float = 1.0, head: str = "pooled",
                 taps: Sequence[int] = VGG19_BN_TAPS, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        cfg = [v if v == "M" else scaled(v, width) for v in _VGG19_CFG]
        self.num_classes = num_classes
        self.width = width
        self.head_kind = head
        self.taps = tuple(int(t) for t in taps)
        self.normalize = Normalize(mean, std)
        self.features = tv_vgg.make_layers(cfg, batch_norm=True)
        last = cfg[-2]
        if head == "pooled":
            self.classifier: nn.Module = nn.Linear(last, num_classes)
        elif head == "torchvision":
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(last * 49, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, num_classes),
            )
        else:
            raise ValueError(f"head must be 'pooled' or 'torchvision', got {head!r}")
        self._init_weights()
        if max(self.taps) >= len(self.features):
            raise ValueError(f"tap index {max(self.taps)} is outside features (length {len(self.features)})")

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation (Kaiming-normal convs, unit BN, small linear)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, *, return_taps: bool = False):
        x = self.normalize(x)
        if return_taps:
            out = []
            last = self.taps[-1]
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in self.taps:
                    out.append(x)
                if i == last:
                    break
            return out
        x = self.features(x)
        if self.head_kind == "pooled":
            return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return self.classifier(self.avgpool(x).flatten(1))


def vgg19_bn_substitute(num_classes: int = 200, *, width: float = 1.0, weights: str | None = None,
                        head: str | None = None) -> VGGSubstitute:
    """The VGG-19-BN substitute.

    Args:
        num_classes: classes of the head (200 for tinyimagenet32 pretraining, 1000 for ImageNet).
        width: channel multiplier for CPU-scale runs (1.0 = torchvision's VGG-19-BN).
        weights: ``None`` (random init), a checkpoint path (a run's ``model.pt`` or a state
            dict), or ``"IMAGENET1K_V1"`` for torchvision's ImageNet weights (downloaded; needs
            network access).
        head: ``"pooled"`` (default; with IMAGENET1K_V1 only the features are loaded, which is
            all ABNN uses) or ``"torchvision"`` (the 4096-4096 classifier, loaded too).
    """
    from .io import load_state_dict_file  # local: io imports models lazily too

    if weights == "IMAGENET1K_V1":
        if width != 1.0:
            raise ValueError("IMAGENET1K_V1 weights exist only for width 1.0")
        tv = tv_vgg.vgg19_bn(weights=tv_vgg.VGG19_BN_Weights.IMAGENET1K_V1)
        model = VGGSubstitute(1000, width=1.0, head=head or "pooled")
        if model.head_kind == "torchvision":
            model.load_state_dict(tv.state_dict())
        else:
            model.features.load_state_dict(tv.features.state_dict())
        return model
    model = VGGSubstitute(num_classes, width=width, head=head or "pooled")
    if weights is not None:
        model.load_state_dict(load_state_dict_file(weights, expect=model))
    return model
