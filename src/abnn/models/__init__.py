"""Models: CIFAR ResNet-18 target, VGG-19-BN substitute, reference ResNet-20; a small registry."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .common import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize
from .io import load_state_dict_file, safe_torch_load
from .oudefend import OUDefend2d, OUDefend3d, with_oudefend
from .r3d import R3D18_TAPS, R3D18Substitute, r3d18_substitute
from .r3d_authors import R3DAuthors, r3d18_authors_substitute
from .resnet_cifar import RESNET18_STAGES, ResNet20, ResNetCIFAR, resnet18_cifar
from .resnext3d import RESNEXT3D_STAGES, ResNeXt3D, resnext3d_101
from .vgg import VGG19_BN_TAPS, VGGSubstitute, vgg19_bn_substitute

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize",
    "RESNET18_STAGES", "ResNet20", "ResNetCIFAR", "resnet18_cifar",
    "VGG19_BN_TAPS", "VGGSubstitute", "vgg19_bn_substitute",
    "load_state_dict_file", "safe_torch_load", "resnet20_reference", "build_model", "MODELS",
    "OUDefend2d", "OUDefend3d", "with_oudefend", "R3D18_TAPS", "R3D18Substitute", "r3d18_substitute",
    "RESNEXT3D_STAGES", "ResNeXt3D", "resnext3d_101", "R3DAuthors", "r3d18_authors_substitute",
]


def resnet20_reference(path: str | None = None) -> ResNet20:
    """CIFAR-10 ResNet-20 with the reference weights of ``shared/data/weights`` (91.7% clean).
    The file is a legacy pickle of plain tensors and loads with ``weights_only=True``."""
    model = ResNet20()
    if path is not None:
        model.load_state_dict(load_state_dict_file(path, expect=model))
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": lambda num_classes=10, width=1.0: resnet18_cifar(num_classes, width=width),
    "vgg19_bn": lambda num_classes=200, width=1.0: vgg19_bn_substitute(num_classes, width=width),
    "resnet20": lambda num_classes=10, width=1.0: ResNet20(num_classes),
    "resnext3d_101": lambda num_classes=101, width=1.0: resnext3d_101(num_classes, width=width),
    "resnext3d_101_b1": lambda num_classes=101, width=1.0: resnext3d_101(num_classes, width=width, blocks=(1, 1, 1, 1)),
    "r3d_18": lambda num_classes=400, width=1.0: r3d18_substitute(num_classes, width=width),
    "r3d_18_authors": lambda num_classes=400, width=1.0: r3d18_authors_substitute(num_classes, width=width),
}


def build_model(arch: str, *, num_classes: int, width: float = 1.0) -> nn.Module:
    """Build a registered architecture by name (randomly initialised)."""
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(MODELS)}")
    return MODELS[arch](num_classes=num_classes, width=width)
