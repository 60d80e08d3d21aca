"""CIFAR ResNet-18 target (METHOD.md s. 2) and the CIFAR ResNet-20 of the reference checkpoint."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize, ZeroPadShortcut, scaled

#: The stages after which ABNN puts an adaptive BN layer (paper s. 2: after conv1..conv5 blocks).
RESNET18_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2] with widths
    64/128/256/512 (times ``width``), global average pool, linear.  Input: [0, 1] pixels."""

    stages = RESNET18_STAGES

    def __init__(self, num_classes: int = 10, width: float = 1.0, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 mean=CIFAR10_MEAN, std=CIFAR10_STD) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers = []
        in_planes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            seq = []
            for j in range(n):
                seq.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10, *, width: float = 1.0) -> ResNetCIFAR:
    """CIFAR ResNet-18 (METHOD.md s. 2) with a width multiplier for CPU-scale runs."""
    return ResNetCIFAR(num_classes, width)


# --- CIFAR ResNet-20 (He et al. 2016, option-A shortcuts), the layout of the reference checkpoint ---

class _LambdaPad(ZeroPadShortcut):
    """Type-A shortcut of the reference ResNet-20: stride-2 subsample, planes/4 zero channels each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def shortcut(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _Block20(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = _LambdaPad(planes) if (stride != 1 or in_planes != planes) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 with option-A shortcuts (16/32/64 channels), ImageNet normalisation inside,
    matching ``shared/data/weights/resnet20-12fca82f.th`` (akamaster/pytorch_resnet_cifar10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for j in range(3):
                blocks.append(_Block20(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))
