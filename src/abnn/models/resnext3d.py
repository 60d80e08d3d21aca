"""3D ResNeXt-101, the video target of ABNN (``METHOD.md`` s. 2).

Architecture of Hara, Kataoka and Satoh, "Can spatiotemporal 3D CNNs retrace the history of 2D
CNNs and ImageNet?", CVPR 2018 (their ``3D-ResNets-PyTorch`` ``models/resnext.py``):

* stem: 7x7x7 conv, 64 channels, stride (1, 2, 2), padding 3, BN, ReLU, 3x3x3 max-pool stride 2
  padding 1 (here one ``nn.Sequential`` named ``stem``, so ABNN places an adaptive BN after it);
* four stages of ResNeXt bottlenecks, [3, 4, 23, 3] blocks, ``planes`` 128/256/512/1024,
  inner (grouped 3x3x3) width ``cardinality * planes / 32`` with cardinality 32, expansion 2,
  so block outputs 256/512/1024/2048; strides 1, 2, 2, 2 in all three dimensions (time too);
* shortcut type B: a 1x1x1 conv + BN where the shape changes, identity elsewhere;
* global average pooling and a linear classifier.

Input normalisation is part of the model: inputs are [0, 1] pixels ``(B, 3, T, H, W)``.
Default: the Kinetics-400 mean/std that torchvision's video models use (the same as the r3d_18
substitute), because the project trains this target itself and unit-scale inputs suit that.
Hara's released checkpoints expect 0..255 pixels minus the ActivityNet mean with std 1; pass
``mean=HARA_ACTIVITYNET_MEAN, std=HARA_ACTIVITYNET_STD`` (which reproduce exactly that from [0, 1]
inputs) and :func:`convert_hara_state_dict` to use them.

Deviation: global average pooling is ``AdaptiveAvgPool3d(1)`` instead of Hara's fixed-size
``AvgPool3d`` (identical for the clip size the checkpoint was made for, and valid for any T).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import Tensor, nn

from .common import Normalize, scaled

__all__ = [
    "KINETICS_MEAN", "KINETICS_STD", "HARA_ACTIVITYNET_MEAN", "HARA_ACTIVITYNET_STD",
    "RESNEXT3D_STAGES", "ResNeXtBottleneck3d", "ResNeXt3D", "resnext3d_101", "convert_hara_state_dict",
]

#: Kinetics-400 statistics of torchvision's video models (``METHOD.md`` s. 2), [0, 1] pixels.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
#: Hara et al.'s default: 0..255 pixels minus the ActivityNet mean (114.7748, 107.7354, 99.4750),
#: no std division; expressed for [0, 1] inputs: (x - m/255) / (1/255) = 255 x - m.
HARA_ACTIVITYNET_MEAN = (114.7748 / 255, 107.7354 / 255, 99.4750 / 255)
HARA_ACTIVITYNET_STD = (1 / 255, 1 / 255, 1 / 255)

RESNEXT3D_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class ResNeXtBottleneck3d(nn.Module):
    """ResNeXt bottleneck (Hara et al. 2018): 1x1x1 conv -> grouped 3x3x3 conv (stride) ->
    1x1x1 conv to ``out_planes``, each with BN, ReLU after the sum with the shortcut."""

    def __init__(self, in_planes: int, mid_planes: int, out_planes: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, mid_planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid_planes)
        self.conv2 = nn.Conv3d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=groups, bias=False)
        self.bn2 = nn.BatchNorm3d(mid_planes)
        self.conv3 = nn.Conv3d(mid_planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:  # shortcut type B
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNeXt3D(nn.Module):
    """3D ResNeXt (Hara et al. 2018) on [0, 1] clips ``(B, 3, T, H, W)``, with input normalisation.

    Args:
        num_classes: classes of the linear head (101 for UCF-101).
        blocks: bottlenecks per stage ((3, 4, 23, 3) = ResNeXt-101).
        cardinality: groups of the 3x3x3 conv (32).
        width: channel multiplier for CPU-scale runs (1.0 = the paper's model).  The stem and
            every ``planes`` are scaled; the groups become ``gcd(cardinality, inner width)``
            where the scaled inner width is no longer a multiple of the cardinality.
        mean, std: input normalisation (default Kinetics-400; see the module docstring).

    ``stages`` names the modules after which ABNN puts its adaptive BN (stem, layer1..layer4).
    """

    stages = RESNEXT3D_STAGES
    expansion = 2

    def __init__(self, num_classes: int = 101, *, blocks: Sequence[int] = (3, 4, 23, 3), cardinality: int = 32,
                 width: float = 1.0, mean: Sequence[float] = KINETICS_MEAN,
                 std: Sequence[float] = KINETICS_STD) -> None:
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive counts, got {blocks}")
        if cardinality < 1:
            raise ValueError(f"cardinality must be >= 1, got {cardinality}")
        self.num_classes = num_classes
        self.blocks = blocks
        self.cardinality = cardinality
        self.width = width
        self.normalize = Normalize(mean, std)
        stem_ch = scaled(64, width)
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem_ch, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False),
            nn.BatchNorm3d(stem_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
        )
        in_planes = stem_ch
        layers = []
        for planes, n, stride in zip((128, 256, 512, 1024), blocks, (1, 2, 2, 2)):
            mid = scaled(cardinality * planes // 32, width)
            out = scaled(planes * self.expansion, width)
            groups = math.gcd(cardinality, mid)
            stage = []
            for i in range(n):
                stage.append(ResNeXtBottleneck3d(in_planes, mid, out, groups, stride if i == 0 else 1))
                in_planes = out
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.out_features = in_planes
        self._init_weights()

    def _init_weights(self) -> None:
        """Hara et al.'s initialisation: Kaiming-normal (fan_out) convs, unit BN; default linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features (B, 2048 * width) before the classifier."""
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"ResNeXt3D expects clips (B, 3, T, H, W) in [0, 1], got {tuple(x.shape)}")
        return self.fc(self.forward_features(x))


def resnext3d_101(num_classes: int = 101, *, width: float = 1.0, blocks: Sequence[int] = (3, 4, 23, 3),
                  cardinality: int = 32, mean: Sequence[float] = KINETICS_MEAN,
                  std: Sequence[float] = KINETICS_STD) -> ResNeXt3D:
    """3D ResNeXt-101 (Hara et al. 2018), randomly initialised; about 47.7M parameters at 101
    classes (48.34M at 400, as Hara et al. report).  ``blocks=(1, 1, 1, 1), width=1/8`` gives a CPU-scale model of the same layout."""
    return ResNeXt3D(num_classes, blocks=blocks, cardinality=cardinality, width=width, mean=mean, std=std)


def convert_hara_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a Hara et al. ``resnext.py`` checkpoint (``conv1``/``bn1`` stem, optional
    DataParallel ``module.`` prefix) mapped to :class:`ResNeXt3D` (``stem.0``/``stem.1``).
    Blocks, shortcuts (``downsample.0/1``) and ``fc`` already share their names.  Use with
    ``mean=HARA_ACTIVITYNET_MEAN, std=HARA_ACTIVITYNET_STD``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("conv1."):
            key = "stem.0." + key[len("conv1."):]
        elif key.startswith("bn1."):
            key = "stem.1." + key[len("bn1."):]
        out[key] = value
    return out
