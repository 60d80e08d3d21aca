"""Settings as dataclasses, shared by the Python API and the CLI (defaults from METHOD.md)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AbnnError

METHODS = ("standard", "abnn", "pgd-at", "fast-at", "oudefend")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as the run's ``config.json``)."""

    method: str = "standard"                 # standard | abnn | pgd-at | fast-at | oudefend
    dataset: str = "cifar10"                 # cifar10 | tinyimagenet32 | clips13 | ucf101
    arch: str = "resnet18_cifar"             # resnet18_cifar | vgg19_bn
    width: float = 1.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_size: int | None = None            # first n training images (None: all)
    val_size: int | None = 1000              # test/val images for the per-epoch accuracy (None: all, 0: none)
    include_jpeg: bool = False               # CIFAR-10: add the 30k JPEG-q75 training images
    full_cifar10: bool = False               # CIFAR-10: the full 50k set via torchvision's download
    augment: bool = True
    # ABNN (METHOD.md s. 1)
    substitute: str | None = None            # substitute run dir, weights file, or IMAGENET1K_V1
    substitute_arch: str = "vgg19_bn"
    substitute_width: float = 1.0
    substitute_num_classes: int = 200
    substitute_taps: list[str] | None = None  # substitute module names to tap (a substitute without return_taps)
    in_domain_substitute: bool = False       # allow a substitute trained on the target's dataset (breaks the premise)
    substitute_stats: str = "sample"         # sample | batch
    encoder: str = "flatten"                 # flatten | pooled (pooled for video: flatten is infeasible there)
    bn_affine: bool = True
    # PGD-AT (METHOD.md s. 5)
    at_steps: int = 5
    at_eps: float = 8 / 255
    at_alpha: float = 2 / 255
    # Fast-AT (Wong, Rice & Kolter 2020; METHOD.md s. 5): FGSM from a random start, step fast_at_alpha
    fast_at_alpha: float = 10 / 255
    # per-epoch PGD-5 accuracy on the last robust_val_size test images (disjoint from the first
    # val_size / evaluation images); keep_best makes model.pt the epoch of best robust accuracy
    robust_val_size: int = 0
    keep_best: bool = False
    # execution
    device: str = "auto"
    data_root: str | None = None
    num_threads: int | None = None
    # speed and durability (none of these changes what is trained, only how fast / how safely)
    amp: str = "auto"                        # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    channels_last: bool = False              # channels-last memory format for model and batches
    compile: bool = False                    # torch.compile the model
    sync_bn: bool = True                     # distributed runs: synchronise the target's BatchNorm across ranks
    checkpoint_every: int | None = None      # also checkpoint every N steps mid-epoch (None: epoch ends only)

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise AbnnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "abnn" and not self.substitute:
            raise AbnnError("method abnn needs a pretrained substitute: --substitute RUN_DIR|WEIGHTS|IMAGENET1K_V1 "
                            "(make one with `abnn pretrain-substitute`)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise AbnnError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.substitute_stats not in ("sample", "batch"):
            raise AbnnError(f"substitute_stats must be sample or batch, got {self.substitute_stats!r}")
        if self.encoder not in ("flatten", "pooled"):
            raise AbnnError(f"encoder must be flatten or pooled, got {self.encoder!r}")
        if self.amp not in AMP_MODES:
            raise AbnnError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.robust_val_size < 0:
            raise AbnnError(f"robust_val_size must be >= 0, got {self.robust_val_size}")
        if self.keep_best and self.robust_val_size == 0:
            raise AbnnError("keep_best needs a per-epoch robust accuracy: set --robust-val-size K (e.g. 500)")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise AbnnError(f"checkpoint_every must be >= 1 (or None for epoch ends only), got {self.checkpoint_every}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AbnnError(f"unknown config keys {unknown}")
        return cls(**d)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise AbnnError(f"cannot read run config {path}: {exc}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

