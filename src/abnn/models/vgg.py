"""VGG-19-BN substitute (METHOD.md s. 2) on torchvision's architecture, with the five stage taps."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from ..errors import CheckpointError
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


def _need_full_width(width: float, source: str) -> None:
    if width != 1.0:
        raise CheckpointError(f"{source} is torchvision's full-width vgg19_bn: use substitute width 1 "
                              f"(--substitute-width 1, --set substitute_width=1), not {width}")


def load_torchvision_vgg19_bn(model: VGGSubstitute, state: Mapping[str, Tensor], source: str) -> VGGSubstitute:
    """Load a state dict in torchvision's ``vgg19_bn`` format (``features.*``, ``classifier.{0,3,6}.*``;
    the ImageNet download or a saved file) into ``model``: the whole model with
    ``head="torchvision"``, else only ``features`` (all that ABNN taps).  ``source`` names the
    weights in errors.  The one mapping from torchvision's VGG-19-BN onto the substitute."""
    from .io import check_state_dict

    _need_full_width(model.width, source)
    if model.head_kind == "torchvision":
        check_state_dict(state, model, source)
        model.load_state_dict(state)
        return model
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    check_state_dict(features, model.features, source)
    model.features.load_state_dict(features)
    return model


def vgg19_bn_substitute(num_classes: int = 200, *, width: float = 1.0, weights: str | None = None,
                        head: str | None = None) -> VGGSubstitute:
    """The VGG-19-BN substitute.

    Args:
        num_classes: classes of the head (200 for tinyimagenet32 pretraining, 1000 for ImageNet).
        width: channel multiplier for CPU-scale runs (1.0 = torchvision's VGG-19-BN).
        weights: ``None`` (random init), a checkpoint path (a run's ``model.pt``, this model's
            state dict, or a state dict in torchvision's ``vgg19_bn`` format, recognised by its
            keys: the offline copy of the ImageNet weights), or ``"IMAGENET1K_V1"`` for
            torchvision's ImageNet weights (downloaded; offline a one-line
            :class:`~abnn.errors.CheckpointError` names the file to pass instead).
        head: ``"pooled"`` (default; with torchvision weights only the features are loaded, which
            is all ABNN uses) or ``"torchvision"`` (the 4096-4096 classifier, loaded too).
    """
    from .io import check_state_dict, load_state_dict_file  # local: io imports models lazily too
    from .torchvision_weights import download_state_dict, torchvision_arch

    if weights == "IMAGENET1K_V1":
        _need_full_width(width, weights)
        model = VGGSubstitute(1000, width=width, head=head or "pooled")
        return load_torchvision_vgg19_bn(model, download_state_dict(weights), "IMAGENET1K_V1")
    model = VGGSubstitute(num_classes, width=width, head=head or "pooled")
    if weights is not None:
        state = load_state_dict_file(weights)
        if torchvision_arch(state) == "vgg19_bn":
            return load_torchvision_vgg19_bn(model, state, str(weights))
        check_state_dict(state, model, weights)
        model.load_state_dict(state)
    return model
