"""Presets of the Table 1 reproduction: named, frozen settings (METHOD.md s. 3-5).

Every method of a preset gets the same data, epochs, schedule and target architecture; only
"how a batch becomes a loss" and the model (ABNN's adaptive layers and substitute) differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..errors import AbnnError

#: The paper's Table 1 (CIFAR-10, PGD, %), for comparison only (METHOD.md s. 6).
PAPER_TABLE1 = {
    "standard": {"name": "No defense", "clean": 93.4, "pgd": 0.0, "cost": "2N"},
    "pgd-at": {"name": "PGD-AT", "clean": 83.3, "pgd": 51.6, "cost": "12N"},
    "abnn": {"name": "ABNN", "clean": 87.5, "pgd": 31.5, "cost": "3N"},
}

METHOD_NAMES = {"standard": "No defense", "pgd-at": "PGD-AT", "abnn": "ABNN"}


@dataclass(frozen=True)
class Table1Preset:
    name: str
    description: str
    # substitute (VGG-19-BN): pretrained here on tinyimagenet32, or torchvision's ImageNet weights
    substitute_source: str = "pretrain"          # pretrain | IMAGENET1K_V1
    substitute_width: float = 0.25
    substitute_epochs: int = 25
    substitute_lr: float = 0.02
    substitute_train_size: int | None = None
    # targets (CIFAR ResNet-18), identical for every method
    width: float = 0.25
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 128
    train_size: int | None = None
    val_size: int = 1000
    full_cifar10: bool = False                    # paper: the 50k torchvision CIFAR-10
    methods: tuple[str, ...] = ("standard", "pgd-at", "abnn")
    at_steps: int = 5
    # evaluation
    n_eval: int = 1000
    eval_batch_size: int = 250
    roa_stride: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def substitute_config(self) -> TrainConfig:
        return TrainConfig(method="standard", dataset="tinyimagenet32", arch="vgg19_bn", width=self.substitute_width,
                           epochs=self.substitute_epochs, batch_size=self.batch_size, lr=self.substitute_lr,
                           seed=self.seed, train_size=self.substitute_train_size, val_size=None)

    def method_config(self, method: str, substitute: str | None) -> TrainConfig:
        return TrainConfig(method=method, dataset="cifar10", arch="resnet18_cifar", width=self.width,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           train_size=self.train_size, val_size=self.val_size, at_steps=self.at_steps,
                           substitute=substitute if method == "abnn" else None,
                           full_cifar10=self.full_cifar10)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Table1Preset] = {
    "smoke": Table1Preset(
        name="smoke",
        description="tiny widths and a few hundred images; checks the pipeline end to end, its accuracies mean nothing",
        substitute_width=1 / 16, substitute_epochs=1, substitute_lr=0.02, substitute_train_size=256,
        width=1 / 16, epochs=1, batch_size=64, train_size=256, val_size=64, n_eval=48, eval_batch_size=48,
        roa_stride=2,
    ),
    "cpu": Table1Preset(
        name="cpu",
        description=("real data scaled to 2 CPU cores: VGG-19-BN substitute at width 1/4 pretrained 25 epochs on "
                     "tinyimagenet32 (20k images); ResNet-18 at width 1/4, 10 epochs on the 20k lossless CIFAR-10 "
                     "training images; 1,000 test images"),
    ),
    "paper": Table1Preset(
        name="paper",
        description=("the paper's setting for a GPU machine with network access: torchvision ImageNet VGG-19-BN "
                     "substitute, full-width ResNet-18, full 50k CIFAR-10, 100 epochs, the full test set"),
        substitute_source="IMAGENET1K_V1", substitute_width=1.0, width=1.0, epochs=100, full_cifar10=True,
        val_size=1000, n_eval=10_000, eval_batch_size=500,
    ),
}


def get_preset(name: str) -> Table1Preset:
    if name not in PRESETS:
        raise AbnnError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
