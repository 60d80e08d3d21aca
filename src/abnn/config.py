"""Settings as dataclasses, shared by the Python API and the CLI (defaults from METHOD.md).

:class:`TrainConfig` is also the run's identity: every field defines the run (a resume and
``reproduce``'s reuse of a finished stage compare it with :func:`config_differences`) unless its
field metadata marks it :data:`EXECUTION` only.  A field added later therefore defines the run
without another edit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import AbnnError
from .files import write_json_atomic

__all__ = ["TrainConfig", "SettingDifference", "config_differences", "defining_fields", "flag_of", "run_identity",
           "write_json_atomic", "AMP_MODES"]

AMP_MODES = ("auto", "off", "bf16", "fp16")


def _same_source(recorded: str | None, new: str | None) -> bool:
    """Two ``--substitute`` values name the same source: equal as written, or the same existing
    file or folder (a relative and an absolute path, a symlink)."""
    if recorded == new:
        return True
    if recorded is None or new is None:
        return False
    try:
        return os.path.samefile(os.path.expanduser(recorded), os.path.expanduser(new))
    except OSError:  # either path does not exist (here and now): compare as written
        return False


#: metadata of a setting that changes how (where, how fast, how durably) a run computes, never
#: what it computes.  Such settings may change between a run and its resume.
EXECUTION: Mapping[str, Any] = {"execution": True}
_NO_FLAG: Mapping[str, Any] = {"flag": None}
#: ``scope`` of a setting that only ``abnn train`` (a target) has, not ``pretrain-substitute``
TARGET = "target"


def _setting(default: Any, help: str, **meta: Any) -> Any:
    """A field with its command-line help (``abnn train`` builds its flags from the fields).

    Metadata: ``help``; ``flag`` (default ``--name-with-dashes``; a bool that defaults to True
    is switched off by its flag); ``choices``; ``metavar``; ``parse``: ``"pixels"`` (a budget in
    1/255 of the pixel range, :func:`abnn.attacks.parse_pixel_budget`), ``"list"`` (comma
    separated) or ``"all=-1"`` (-1 means None: all); ``scope``: :data:`TARGET`; ``same``: how a
    resume compares the setting; ``execution``: :data:`EXECUTION`."""
    return field(default=default, metadata={"help": help, **meta})



@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as the run's ``config.json``).

    Defining: every setting of the data, model, loss, optimiser, schedule and arithmetic
    precision (``amp``: bf16/fp16 change the numbers trained; ``auto`` is recorded as written
    and resolves per device).  Execution only (:data:`EXECUTION`): ``device``, ``data_root``,
    ``num_threads``, ``channels_last`` and ``compile`` (the same arithmetic in another kernel
    order: float rounding, like the thread count), ``data_on_device`` (the same batches, made on
    the device), ``sync_bn`` (distributed runs, like the
    process count, which a resume may also change) and ``checkpoint_every``.
    """

    method: str = _setting("standard", "a training method of the registry (abnn.training.methods; --list-methods)")
    dataset: str = field(default="cifar10", metadata=_NO_FLAG)  # cifar10 | tinyimagenet32 | clips13 | ucf101
    arch: str = _setting("resnet18_cifar", "target architecture (abnn.models.MODELS)", scope=TARGET)
    width: float = _setting(1.0, "channel width multiplier")
    epochs: int = _setting(30, "epochs")
    total_steps: int | None = _setting(
        None, "a step budget: train exactly N optimiser steps, the cosine schedule over them, the last epoch partial "
              "where N ends mid-epoch (--epochs is then unused; default: epochs x steps per epoch)", metavar="N")
    batch_size: int = _setting(128, "batch size (the global batch of a distributed run)")
    lr: float = _setting(0.1, "initial SGD learning rate, cosine decay")
    momentum: float = _setting(0.9, "SGD momentum")
    weight_decay: float = _setting(5e-4, "SGD weight decay")
    seed: int = _setting(0, "seed of the initialisation, data order and attacks")
    train_size: int | None = _setting(None, "use only the first N training images (default: all)", metavar="N")
    val_size: int | None = _setting(1000, "held-out images for the per-epoch accuracy (-1: all; 0: none)",
                                    parse="all=-1")
    include_jpeg: bool = _setting(False, "add the 30k JPEG-q75 CIFAR-10 training images", scope=TARGET)
    full_cifar10: bool = field(default=False, metadata=_NO_FLAG)  # the full 50k set via torchvision's download
    augment: bool = _setting(True, "no random crop / flip", flag="--no-augment")
    frames: int | None = field(default=None, metadata=_NO_FLAG)  # frames per clip (video; None: the dataset's own)
    # ABNN (METHOD.md s. 1); substitute is recorded as written, compared as the same file or folder
    substitute: str | None = _setting(
        None, "ABNN: substitute run folder, weights file (torchvision's vgg19_bn / r3d_18 format too: the offline "
              "form of the downloads), or IMAGENET1K_V1 (downloaded)", scope=TARGET, same=_same_source)
    substitute_arch: str = _setting("vgg19_bn", "architecture of a bare substitute weights file: vgg19_bn, r3d_18, "
                                                "r3d_18_authors, resnet20", scope=TARGET)
    substitute_width: float = _setting(1.0, "width of a bare substitute weights file", scope=TARGET)
    substitute_num_classes: int = field(default=200, metadata=_NO_FLAG)
    substitute_taps: list[str] | None = _setting(
        None, "tap the substitute at these module names (one per target stage; a substitute without return_taps), "
              "e.g. for resnet20: layer1.0,layer1,layer2,layer3.0,layer3", scope=TARGET, parse="list",
        metavar="NAME,NAME,...")
    in_domain_substitute: bool = _setting(
        False, "accept a substitute trained on the target's own dataset: an upper bound that breaks ABNN's premise",
        scope=TARGET, flag="--allow-in-domain-substitute")
    substitute_stats: str = _setting("sample", "statistics of the substitute's features", scope=TARGET,
                                     choices=("sample", "batch"))
    substitute_std: str = _setting(
        "biased", "sigma(z_s) of eq. (2): biased sqrt(var+eps), or unbiased torch.std without eps (the authors' code)",
        scope=TARGET, choices=("biased", "unbiased"))
    encoder: str = _setting("flatten", "statistics encoder (pooled for video: flatten is infeasible there)",
                            scope=TARGET, choices=("flatten", "pooled"))
    bn_affine: bool = _setting(True, "adaptive layers without BN's own affine", scope=TARGET, flag="--no-bn-affine")
    # PGD-AT (METHOD.md s. 5)
    at_steps: int = _setting(5, "PGD-AT attack steps t_max")
    at_eps: float = field(default=8 / 255, metadata=_NO_FLAG)
    at_alpha: float = field(default=2 / 255, metadata=_NO_FLAG)
    fast_at_alpha: float = _setting(10 / 255, "Fast-AT's FGSM step from a random start (Wong, Rice & Kolter 2020), "
                                              "in 1/255 of the pixel range: 10 or 10/255", parse="pixels",
                                    metavar="K/255")
    robust_val_size: int = _setting(
        0, "per-epoch PGD-5 accuracy on K held-out images (CIFAR-10: JPEG training images no run trains on; else "
           "the last K test images, left out of the clean validation); 0: off", metavar="K")
    keep_best: bool = _setting(False, "model.pt = the epoch of best per-epoch PGD accuracy (needs --robust-val-size; "
                                      "Wong et al.)")
    amp: str = _setting("auto", "mixed precision: auto (bf16 on CUDA where supported, else fp16 with a GradScaler; "
                                "off on CPU), off, bf16, fp16; PGD-AT's attack runs under the same autocast",
                        choices=AMP_MODES)
    # execution only: where, how fast and how durably; never what is trained
    device: str = field(default="auto", metadata=EXECUTION)
    data_root: str | None = field(default=None, metadata=EXECUTION)
    num_threads: int | None = field(default=None, metadata={**EXECUTION, "flag": "--threads"})
    channels_last: bool = _setting(False, "channels-last memory format (faster convolutions on GPUs)", **EXECUTION)
    compile: bool = _setting(False, "torch.compile the model (first steps are slow while it compiles)", **EXECUTION)
    data_on_device: bool = _setting(
        False, "keep the uint8 training images on the device and crop/flip batches there (GPUs: the loader keeps "
               "up); exactly the same batches as without", **EXECUTION)
    sync_bn: bool = _setting(
        True, "distributed runs: keep per-process BatchNorm statistics instead of synchronising the target's "
              "BatchNorm over all processes (SyncBN, the default; the frozen substitute is never synced)",
        flag="--no-sync-bn", **EXECUTION)
    checkpoint_every: int | None = _setting(
        None, "also write checkpoint.pt every N steps within an epoch (default: at epoch ends only); a rerun "
              "continues at the exact step", metavar="N", **EXECUTION)

    def validate(self) -> "TrainConfig":
        """Refuse, in one line naming the flag, any value that cannot make a run.  Which methods,
        datasets and architectures exist is the registries' to say, above this module:
        :func:`abnn.training.check_config` checks those choices, then calls this."""
        for name in ("width", "substitute_width", "lr", "at_alpha", "fast_at_alpha"):
            _need(self, name, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        for name in ("momentum", "weight_decay"):
            _need(self, name, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        _need(self, "at_eps", lambda v: math.isfinite(v) and 0 < v <= 1, "in (0, 1] (pixel units: 8/255 = 0.0314)")
        for name in ("epochs", "batch_size", "at_steps"):
            _need(self, name, lambda v: v >= 1, "an integer >= 1")
        for name in ("train_size", "total_steps", "num_threads", "checkpoint_every", "frames"):
            _need(self, name, lambda v: v is None or v >= 1, "an integer >= 1 (or unset)")
        _need(self, "val_size", lambda v: v is None or v >= 0, "an integer >= 0 (0: no per-epoch accuracy)")
        _need(self, "robust_val_size", lambda v: v >= 0, "an integer >= 0 (0: no per-epoch robust accuracy)")
        if self.keep_best and self.robust_val_size == 0:
            raise AbnnError("--keep-best needs a per-epoch robust accuracy: set --robust-val-size K (e.g. 500)")
        for name, f in _FIELDS.items():
            if "choices" in f.metadata:
                self.check_choice(name, f.metadata["choices"])
        return self

    def check_choice(self, name: str, options: tuple[str, ...]) -> None:
        """Refuse, in one line naming the flag, a setting ``name`` that is not one of ``options``."""
        value = getattr(self, name)
        if value not in options:
            raise AbnnError(f"unknown {flag_of(name)} {value!r}; choose one of {', '.join(options)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AbnnError(f"unknown config keys {unknown} (written by a newer abnn? upgrade it)")
        return cls(**d)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, AbnnError) as exc:
            raise AbnnError(f"cannot read run config {path}: {exc}") from None


def _need(cfg: TrainConfig, name: str, ok: Callable[[Any], bool], requirement: str) -> None:
    value = getattr(cfg, name)
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise AbnnError(f"{flag_of(name)} must be {requirement}, got {value!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag_of(name: str) -> str:
    """The CLI flag of a :class:`TrainConfig` field (``lr`` -> ``--lr``, ``augment`` ->
    ``--no-augment``), or the field's name for settings without a flag (``dataset``)."""
    meta = _FIELDS[name].metadata
    if "flag" in meta:
        return meta["flag"] or name
    return "--" + name.replace("_", "-")


def defining_fields() -> tuple[str, ...]:
    """Names of the settings that define a run: every field not marked :data:`EXECUTION`."""
    return tuple(n for n, f in _FIELDS.items() if not f.metadata.get("execution"))


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The run-defining settings of ``cfg`` (what an evaluation's resume compares, beside the weights)."""
    return {n: getattr(cfg, n) for n in defining_fields()}


@dataclass(frozen=True)
class SettingDifference:
    """One run-defining setting that differs between a recorded run and a new config."""

    name: str
    recorded: Any
    new: Any

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    def __str__(self) -> str:
        return f"{self.flag} recorded {self.recorded!r}, now {self.new!r}"


def config_differences(recorded: TrainConfig | Mapping[str, Any], new: TrainConfig) -> list[SettingDifference]:
    """The run-defining settings (:func:`defining_fields`) in which ``new`` differs from
    ``recorded``, in field order.  ``recorded`` may be a config dict of an older version: a
    field it lacks is compared with that field's default."""
    if not isinstance(recorded, TrainConfig):
        recorded = TrainConfig.from_dict(dict(recorded))
    diffs = []
    for name in defining_fields():
        a, b = getattr(recorded, name), getattr(new, name)
        same = _FIELDS[name].metadata.get("same", _equal)
        if not same(a, b):
            diffs.append(SettingDifference(name, a, b))
    return diffs


def _equal(a: Any, b: Any) -> bool:
    return a == b
