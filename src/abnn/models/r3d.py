"""3D ResNet-18 substitute for video ABNN (``METHOD.md`` s. 2), on torchvision's ``r3d_18``.

Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition", CVPR 2018
(the R3D-18 architecture); Kinetics-400 weights are torchvision's ``R3D_18_Weights.KINETICS400_V1``.
The wrapper holds the torchvision model as ``self.model`` (state-dict keys are torchvision's
under the ``model.`` prefix), normalises [0, 1] clips with the Kinetics statistics the weights
were trained with, and, with ``return_taps=True``, returns the features after the stem and
layer1..layer4 without computing the head.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from torch import Tensor, nn
from torchvision.models.video import resnet as tv_video

from ..errors import CheckpointError
from .common import Normalize, scaled

__all__ = ["R3D18_MEAN", "R3D18_STD", "R3D18_TAPS", "R3D18Substitute", "r3d18_substitute"]

#: Input statistics of torchvision's Kinetics-400 video models ([0, 1] pixels).
R3D18_MEAN = (0.43216, 0.394666, 0.37645)
R3D18_STD = (0.22803, 0.22145, 0.216989)
#: Submodules of ``R3D18Substitute.model`` whose outputs are the five taps.
R3D18_TAPS = ("stem", "layer1", "layer2", "layer3", "layer4")


class _ScaledVideoResNet(tv_video.VideoResNet):
    """torchvision's R3D-18 (``VideoResNet(BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], BasicStem)``)
    with every channel count multiplied by ``width``: a CPU-scale substitute with the same layout
    and module names.  torchvision's class hard-codes 64..512 channels, hence this subclass."""

    def __init__(self, width: float, num_classes: int = 400) -> None:
        nn.Module.__init__(self)
        stem = scaled(64, width)
        self.inplanes = stem
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(stem),
            nn.ReLU(inplace=True),
        )
        block, conv = tv_video.BasicBlock, tv_video.Conv3DSimple
        self.layer1 = self._make_layer(block, conv, scaled(64, width), 2, stride=1)
        self.layer2 = self._make_layer(block, conv, scaled(128, width), 2, stride=2)
        self.layer3 = self._make_layer(block, conv, scaled(256, width), 2, stride=2)
        self.layer4 = self._make_layer(block, conv, scaled(512, width), 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():  # torchvision's VideoResNet initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


class R3D18Substitute(nn.Module):
    """The frozen-substitute side of video ABNN: torchvision's R3D-18 plus its input normalisation.

    ``forward(x)`` gives logits (for pretraining or checking the substitute's accuracy);
    ``forward(x, return_taps=True)`` gives the five features after ``stem``, ``layer1`` ..
    ``layer4`` (64, 64, 128, 256, 512 channels at width 1) and stops after ``layer4``.
    """

    def __init__(self, model: tv_video.VideoResNet, *, mean: Sequence[float] = R3D18_MEAN,
                 std: Sequence[float] = R3D18_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.num_classes = model.fc.out_features

    def forward(self, x: Tensor, *, return_taps: bool = False) -> Tensor | list[Tensor]:
        if x.dim() != 5:
            raise ValueError(f"R3D18Substitute expects clips (B, 3, T, H, W) in [0, 1], got {tuple(x.shape)}")
        x = self.normalize(x)
        m = self.model
        if return_taps:
            taps = []
            for name in R3D18_TAPS:
                x = getattr(m, name)(x)
                taps.append(x)
            return taps
        return m(x)


def load_torchvision_r3d18(model: R3D18Substitute, state: Mapping[str, Tensor], source: str) -> R3D18Substitute:
    """Load a state dict in torchvision's ``r3d_18`` format (``stem.*``, ``layer1.*`` .. ``fc.*``;
    the Kinetics-400 download or a saved file) into the wrapper (its keys are torchvision's under
    ``model.``).  ``source`` names the weights in errors.  The one mapping from torchvision's
    R3D-18 onto the substitute."""
    from .io import check_state_dict

    state = {"model." + k: v for k, v in state.items()}
    check_state_dict(state, model, source)
    model.load_state_dict(state)
    return model


def r3d18_substitute(num_classes: int = 400, *, weights: str | os.PathLike | None = None,
                     width: float = 1.0) -> R3D18Substitute:
    """Build the R3D-18 substitute.

    Args:
        num_classes: classes of the head (400 for Kinetics; unused by ABNN, which taps the body).
        weights: ``None`` (random init), a checkpoint path (this wrapper's state dict, or a bare
            torchvision ``r3d_18`` state dict without the ``model.`` prefix), or
            ``"KINETICS400_V1"`` for torchvision's Kinetics-400 weights (downloaded once; without
            network access a :class:`~abnn.errors.CheckpointError` names the fix: a path to the
            same weights in torchvision's format, which the bare-state-dict case reads).
        width: channel multiplier for a CPU-scale substitute (1.0 = torchvision's r3d_18);
            the Kinetics weights exist only at width 1.
    """
    from .io import check_state_dict, load_state_dict_file
    from .torchvision_weights import download_state_dict, torchvision_arch

    if weights == "KINETICS400_V1":
        if width != 1.0:
            raise CheckpointError("KINETICS400_V1 weights exist only for width 1.0")
        model = R3D18Substitute(tv_video.r3d_18(num_classes=400))
        return load_torchvision_r3d18(model, download_state_dict(weights), weights)
    body = tv_video.r3d_18(num_classes=num_classes) if width == 1.0 else _ScaledVideoResNet(width, num_classes)
    model = R3D18Substitute(body)
    if weights is not None:
        state = load_state_dict_file(weights)
        if torchvision_arch(state) == "r3d_18" or not any(k.startswith("model.") for k in state):
            return load_torchvision_r3d18(model, state, str(weights))
        check_state_dict(state, model, weights)
        model.load_state_dict(state)
    return model
