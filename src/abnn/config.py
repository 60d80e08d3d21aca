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

    method: str = "standard"                 # a name of the method registry (abnn.training.methods)
    dataset: str = field(default="cifar10", metadata=_NO_FLAG)  # cifar10 | tinyimagenet32 | clips13 | ucf101
    arch: str = "resnet18_cifar"             # resnet18_cifar | vgg19_bn | ... (abnn.models.MODELS)
    width: float = 1.0
    epochs: int = 30
    # a step budget: train exactly this many optimiser steps, the cosine schedule over them, the last
    # epoch partial where the budget ends mid-epoch (``epochs`` is then unused); None: epochs x steps per epoch
    total_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_size: int | None = None            # first n training images (None: all)
    val_size: int | None = 1000              # test/val images for the per-epoch accuracy (None: all, 0: none)
    include_jpeg: bool = False               # CIFAR-10: add the 30k JPEG-q75 training images
    full_cifar10: bool = field(default=False, metadata=_NO_FLAG)  # the full 50k set via torchvision's download
    augment: bool = field(default=True, metadata={"flag": "--no-augment"})
    frames: int | None = field(default=None, metadata=_NO_FLAG)  # frames per clip (video; None: the dataset's own)
    # ABNN (METHOD.md s. 1); substitute is recorded as written, compared as the same file or folder
    substitute: str | None = field(default=None, metadata={"same": _same_source})  # run dir, weights, IMAGENET1K_V1
    substitute_arch: str = "vgg19_bn"
    substitute_width: float = 1.0
    substitute_num_classes: int = field(default=200, metadata=_NO_FLAG)
    # substitute module names to tap (a substitute without return_taps, e.g. the reference ResNet-20)
    substitute_taps: list[str] | None = None
    # accept a substitute trained on the target's own dataset (an upper bound that breaks the premise)
    in_domain_substitute: bool = field(default=False, metadata={"flag": "--allow-in-domain-substitute"})
    substitute_stats: str = "sample"         # sample | batch
    # sigma(z_s) of eq. (2): biased sqrt(var + eps) (ours) | unbiased torch.std, no eps (the authors' code)
    substitute_std: str = "biased"
    encoder: str = "flatten"                 # flatten | pooled (pooled for video: flatten is infeasible there)
    bn_affine: bool = field(default=True, metadata={"flag": "--no-bn-affine"})
    # PGD-AT (METHOD.md s. 5)
    at_steps: int = 5
    at_eps: float = field(default=8 / 255, metadata=_NO_FLAG)
    at_alpha: float = field(default=2 / 255, metadata=_NO_FLAG)
    # Fast-AT (Wong, Rice & Kolter 2020; METHOD.md s. 5): FGSM from a random start, step fast_at_alpha
    fast_at_alpha: float = 10 / 255
    # per-epoch PGD-5 accuracy on robust_val_size held-out images (see training.validation.robust_val_data);
    # keep_best makes model.pt the epoch of best robust accuracy (Wong et al.)
    robust_val_size: int = 0
    keep_best: bool = False
    amp: str = "auto"                        # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    # execution only: where, how fast and how durably; never what is trained
    device: str = field(default="auto", metadata=EXECUTION)
    data_root: str | None = field(default=None, metadata=EXECUTION)
    num_threads: int | None = field(default=None, metadata={**EXECUTION, "flag": "--threads"})
    channels_last: bool = field(default=False, metadata=EXECUTION)   # channels-last memory format
    compile: bool = field(default=False, metadata=EXECUTION)         # torch.compile the model
    # keep the uint8 training split on the device, gather/crop/flip there (the same batches)
    data_on_device: bool = field(default=False, metadata=EXECUTION)
    sync_bn: bool = field(default=True, metadata={**EXECUTION, "flag": "--no-sync-bn"})  # distributed: SyncBN
    checkpoint_every: int | None = field(default=None, metadata=EXECUTION)  # also every N steps mid-epoch

    def validate(self) -> "TrainConfig":
        """Refuse, in one line naming the flag, any setting that cannot make a run."""
        from .data.datasets import DATASETS
        from .models import MODELS
        from .training.methods import METHODS

        _choice("method", self.method, tuple(METHODS))
        _choice("dataset", self.dataset, tuple(DATASETS))
        _choice("arch", self.arch, tuple(MODELS))
        if METHODS[self.method].substitute and not self.substitute:
            raise AbnnError(f"method {self.method} needs a pretrained substitute: --substitute RUN_DIR|WEIGHTS|"
                            "IMAGENET1K_V1 (make one with `abnn pretrain-substitute`)")
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
        _choice("substitute_stats", self.substitute_stats, ("sample", "batch"))
        _choice("substitute_std", self.substitute_std, ("biased", "unbiased"))
        _choice("encoder", self.encoder, ("flatten", "pooled"))
        _choice("amp", self.amp, AMP_MODES)
        return self

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


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise AbnnError(f"unknown {flag_of(name)} {value!r}; choose one of {', '.join(options)}")


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
