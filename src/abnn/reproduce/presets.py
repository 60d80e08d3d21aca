"""Presets of the Table 1 reproduction: named, frozen settings (METHOD.md s. 3-5).

Every method of a preset gets the same data, epochs, schedule and target architecture; only
"how a batch becomes a loss" and the model (ABNN's adaptive layers and substitute) differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import AbnnError
from ..training.methods import check_config, get_method


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
    include_jpeg: bool = False                    # add the 30k JPEG-q75 CIFAR-10 training images (lossy)
    methods: tuple[str, ...] = ("standard", "pgd-at", "abnn")
    at_steps: int = 5
    robust_val_size: int = 500                    # Fast-AT: per-epoch PGD-5 on held-out images, best-robust epoch kept
    # evaluation
    n_eval: int = 1000
    eval_batch_size: int = 250
    roa_stride: int = 1
    seed: int = 0
    n_examples: int = 6
    dataset: str = "cifar10"
    amp: str = "auto"                             # training precision of every stage (evaluation stays float32)
    channels_last: bool = False                   # training memory format (execution only: same arithmetic)
    data_on_device: bool = False                  # training data resident on the device (execution only)
    needs_cuda: bool = False                      # refuse to run without a CUDA device (--set needs_cuda=false: dry run)
    overrides: tuple[str, ...] = ()               # the --set KEY=VALUE that made this preset from the named one

    def validate(self) -> "Table1Preset":
        """Refuse, in one line naming the ``--set`` key, any value the pipeline cannot run, before
        any stage starts: the training settings through :func:`~abnn.training.check_config`, the
        evaluation settings here.  Its pipeline trains and evaluates CIFAR-10 only."""
        if self.dataset != "cifar10":
            raise AbnnError(f"--set dataset={self.dataset}: the Table 1 pipeline trains and evaluates CIFAR-10 only "
                            "(its stages are CIFAR-10 runs); leave dataset at cifar10")
        _check_methods(self.methods, ("standard", "pgd-at", "abnn", "fast-at"))
        _check_counts(self, ("n_eval", "eval_batch_size", "roa_stride", "n_examples"))
        if self.substitute_source == "pretrain":
            check_config(self.substitute_config())
        for method in self.methods:
            check_config(self.method_config(method, "random"))
        return self

    def substitute_config(self) -> TrainConfig:
        return TrainConfig(method="standard", dataset="tinyimagenet32", arch="vgg19_bn", width=self.substitute_width,
                           epochs=self.substitute_epochs, batch_size=self.batch_size, lr=self.substitute_lr,
                           seed=self.seed, train_size=self.substitute_train_size, val_size=None, amp=self.amp,
                           **self._execution())

    def method_config(self, method: str, substitute: str | None) -> TrainConfig:
        fast_at = method == "fast-at"  # Wong et al.: watch per-epoch PGD accuracy, keep the best-robust epoch
        return TrainConfig(method=method, dataset="cifar10", arch="resnet18_cifar", width=self.width,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           train_size=self.train_size, val_size=self.val_size, at_steps=self.at_steps,
                           substitute=substitute if get_method(method).substitute else None,
                           substitute_width=self.substitute_width, full_cifar10=self.full_cifar10,
                           include_jpeg=self.include_jpeg, amp=self.amp,
                           robust_val_size=self.robust_val_size if fast_at else 0, keep_best=fast_at,
                           **self._execution())

    def _execution(self) -> dict:
        """The preset's execution-only training settings (how fast, never what is trained)."""
        return {"channels_last": self.channels_last, "data_on_device": self.data_on_device}

    def check_device(self, device: str) -> None:
        """A preset made for CUDA refuses any other device before anything runs."""
        if self.needs_cuda and not str(device).startswith("cuda"):
            raise AbnnError(f"preset {self.name!r} needs a CUDA GPU and the device is {device}; run it on a GPU "
                            "machine (--device cuda), or add --set needs_cuda=false for a dry run")

    def attack_options(self) -> dict:
        """The paper's evaluation attacks for images (METHOD.md s. 4)."""
        return {
            "pgd": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 5, "random_start": True},
            "roa": {"search": "exhaustive", "stride": self.roa_stride, "alpha": 70 / 255, "steps": 5, "fill": 0.5},
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Table1Preset] = {
    "smoke": Table1Preset(
        name="smoke",
        description="tiny widths and a few hundred images; checks the pipeline end to end, its accuracies mean nothing",
        substitute_width=1 / 16, substitute_epochs=1, substitute_lr=0.02, substitute_train_size=256,
        width=1 / 16, epochs=1, batch_size=64, train_size=256, val_size=64, n_eval=48, eval_batch_size=48,
        roa_stride=2, robust_val_size=32,
    ),
    "cpu": Table1Preset(
        name="cpu",
        description=("real data scaled to 2 CPU cores: VGG-19-BN substitute at width 1/4 pretrained 25 epochs on "
                     "tinyimagenet32 (20k images); ResNet-18 at width 1/4, 10 epochs on the 20k lossless CIFAR-10 "
                     "training images; 1,000 test images; the ROA position search is exhaustive over a stride-2 grid "
                     "(144 positions, last row and column included) instead of stride 1 (529), to fit the CPU budget"),
        roa_stride=2,
    ),
    "gpu": Table1Preset(
        name="gpu",
        description=("one H100/H200-class GPU, offline from shared/data, about 6 minutes by estimate "
                     "(`--estimate`): full-width VGG-19-BN substitute pretrained here 40 epochs (lr 0.05) on "
                     "tinyimagenet32 (20k images); full-width ResNet-18, 35 epochs on the 20k lossless CIFAR-10 "
                     "training images (include_jpeg adds the 30k JPEG ones); no defense, PGD-AT, ABNN and Fast-AT; "
                     "bf16 autocast and channels-last training with the data on the GPU, float32 evaluation of "
                     "clean, PGD-5 and ROA (exhaustive, stride 1) on 2,000 test images"),
        substitute_width=1.0, substitute_epochs=40, substitute_lr=0.05, width=1.0, epochs=35, lr=0.1,
        methods=("standard", "pgd-at", "abnn", "fast-at"), n_eval=2000, eval_batch_size=500, roa_stride=1,
        amp="bf16", channels_last=True, data_on_device=True, needs_cuda=True,
    ),
    "paper": Table1Preset(
        name="paper",
        description=("the paper's setting for a GPU machine: torchvision's ImageNet VGG-19-BN substitute (downloaded, "
                     "or offline a weights file: --set substitute_source=PATH), full-width ResNet-18, full 50k "
                     "CIFAR-10, 100 epochs, the full test set"),
        substitute_source="IMAGENET1K_V1", substitute_width=1.0, width=1.0, epochs=100, full_cifar10=True,
        val_size=1000, n_eval=10_000, eval_batch_size=500,
    ),
}


def get_preset(name: str) -> Table1Preset:
    if name not in PRESETS:
        raise AbnnError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class VideoPreset:
    """Tables 2 and 3 (UCF-101): no defense, OUDefend (PGD-AT + feature restoration), ABNN."""

    name: str
    description: str
    dataset: str = "clips13"                      # clips13 (smoke) | ucf101
    arch: str = "resnext3d_101_b1"                # resnext3d_101 (paper) | resnext3d_101_b1 (reduced depth)
    width: float = 0.125
    substitute: str = "random"                    # KINETICS400_V1 | run folder | weights file | random (smoke)
    substitute_width: float = 0.125
    epochs: int = 2
    lr: float = 0.01
    batch_size: int = 4
    train_size: int | None = None
    val_size: int = 0
    methods: tuple[str, ...] = ("standard", "oudefend", "abnn")
    at_steps: int = 5
    eps: float = 1 / 255
    n_eval: int = 13
    eval_batch_size: int = 13
    roa_positions: str = "random"
    seed: int = 0
    n_examples: int = 2
    frames: int | None = None                     # frames per clip (None: the dataset's own, 40 for UCF-101)
    overrides: tuple[str, ...] = ()               # the --set KEY=VALUE that made this preset from the named one

    def validate(self) -> "VideoPreset":
        """Refuse, in one line naming the ``--set`` key, any value the pipeline cannot run."""
        _check_methods(self.methods, ("standard", "oudefend", "abnn"))
        _check_counts(self, ("n_eval", "eval_batch_size", "n_examples"))
        for method in self.methods:
            check_config(self.method_config(method))
        return self

    def method_config(self, method: str) -> TrainConfig:
        return TrainConfig(method=method, dataset=self.dataset, arch=self.arch, width=self.width, epochs=self.epochs,
                           frames=self.frames,
                           batch_size=self.batch_size, lr=self.lr, seed=self.seed, train_size=self.train_size,
                           val_size=self.val_size, at_steps=self.at_steps, at_eps=self.eps, at_alpha=self.eps / 4,
                           substitute=self.substitute if method == "abnn" else None, substitute_arch="r3d_18",
                           substitute_width=self.substitute_width, substitute_num_classes=400, encoder="pooled")

    def attack_options(self) -> dict:
        return {"pgd": {"eps": self.eps, "alpha": self.eps / 4, "steps": 5, "random_start": True},
                "roa": {"video_positions": self.roa_positions, "alpha": 70 / 255, "steps": 5, "fill": 0.5}}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VIDEO_PRESETS: dict[str, VideoPreset] = {
    "smoke": VideoPreset(
        name="smoke",
        description=("the 13 real clips of shared/data (8 frames each, 112x112), trained and evaluated on the SAME "
                     "13 clips with a reduced-depth ResNeXt-3D at width 1/8 and an UNTRAINED width-1/8 R3D-18 "
                     "substitute: it checks the video pipeline end to end; its accuracies mean nothing"),
    ),
    "paper": VideoPreset(
        name="paper",
        description=("the paper's setting for a GPU machine: UCF-101 split 1 (40 frames, 112x112), full 3D "
                     "ResNeXt-101, torchvision's Kinetics-400 R3D-18 substitute (downloaded, or offline a weights "
                     "file: --set substitute=PATH), the full test list"),
        dataset="ucf101", arch="resnext3d_101", width=1.0, substitute="KINETICS400_V1", substitute_width=1.0,
        epochs=60, lr=0.01, batch_size=16, val_size=0, n_eval=3783, eval_batch_size=8,
    ),
}


#: preset fields that are pixel budgets: ``--set eps=1`` and ``eps=1/255`` both mean 1/255
PIXEL_FIELDS = ("eps",)


def _check_methods(methods: tuple[str, ...], known: tuple[str, ...]) -> None:
    bad = [m for m in methods if m not in known]
    if not methods or bad:
        raise AbnnError(f"--set methods={','.join(methods)}: give one or more of {', '.join(known)}, comma-separated")


def _check_counts(preset, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(preset, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AbnnError(f"--set {name}={value}: expected an integer >= 1")


def _parse(key: str, text: str, annotation: str):
    """A --set value as the preset field's type (types are strings: ``from __future__ import
    annotations``).  Pixel budgets as everywhere (:func:`abnn.attacks.parse_pixel_budget`);
    other floats accept fractions such as ``1/3``; ``none`` clears an optional field."""
    from ..attacks import parse_bool, parse_pixel_budget

    if "None" in annotation and text.lower() == "none":
        return None
    kind = annotation.split("|")[0].strip()
    if key in PIXEL_FIELDS:
        return parse_pixel_budget(text, what=f"--set {key}")
    if kind == "bool":
        return parse_bool(text, what=f"--set {key}")
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            num, _, den = text.partition("/")
            return float(num) / float(den) if den else float(num)
        if kind.startswith("tuple"):
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if kind == "str":
            return text
    except (ValueError, ZeroDivisionError):
        raise AbnnError(f"--set {key}={text}: expected {annotation}") from None
    raise AbnnError(f"--set {key}: this field ({annotation}) cannot be set from the command line")


def settable_keys(preset) -> list[str]:
    """The fields ``--set KEY=VALUE`` can change."""
    return [f.name for f in dataclasses.fields(preset) if f.name not in ("name", "description", "overrides")]


def apply_overrides(preset, pairs: list[str] | tuple[str, ...]):
    """The preset with ``--set KEY=VALUE`` overrides applied and recorded in its ``overrides``
    field (and so in preset.json, results.json and the report), validated before anything runs."""
    if not pairs:
        return preset.validate()
    fields = {f.name: f for f in dataclasses.fields(preset) if f.name in settable_keys(preset)}
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise AbnnError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        changes[key] = _parse(key, text.strip(), str(fields[key].type))
    return dataclasses.replace(preset, **changes, overrides=tuple(preset.overrides) + tuple(pairs)).validate()


def get_video_preset(name: str) -> VideoPreset:
    if name not in VIDEO_PRESETS:
        raise AbnnError(f"unknown video preset {name!r}; choose one of {', '.join(VIDEO_PRESETS)}")
    return VIDEO_PRESETS[name]


def preset_names(table: str | None = None) -> tuple[str, ...]:
    """The names ``--preset`` accepts: the video presets for ``table="video"``, the Table 1
    presets for any other table (the studies run on those), and every name of both tables, in
    table order, for ``None`` (the choices of ``abnn reproduce --preset``)."""
    if table == "video":
        return tuple(VIDEO_PRESETS)
    if table is not None:
        return tuple(PRESETS)
    return tuple(dict.fromkeys([*PRESETS, *VIDEO_PRESETS]))

