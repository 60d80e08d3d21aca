"""A run folder is the unit of work: ``config.json``, ``checkpoint.pt``, ``metrics.jsonl``,
``model.pt`` (final weights), ``train_results.json``, ``eval*.json``.  This module builds the
model a config describes and loads a finished run back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .data.datasets import DATASETS, INPUT_SHAPES
from .errors import AbnnError
from .framework import ABNN
from .models import build_model, r3d18_substitute, resnet20_reference, vgg19_bn_substitute, with_oudefend
from .models.io import check_state_dict, load_state_dict_file

#: pretrained substitute weights that torchvision downloads (the paper's substitutes)
DOWNLOADABLE = {"IMAGENET1K_V1": {"arch": "vgg19_bn", "width": 1.0, "num_classes": 1000},
                "KINETICS400_V1": {"arch": "r3d_18", "width": 1.0, "num_classes": 400}}


def resolve_substitute(spec: str, *, in_domain: bool = False) -> tuple[str | None, dict]:
    """Resolve ``--substitute``: a run folder (reads its config and ``model.pt``), a weights
    file, ``IMAGENET1K_V1`` / ``KINETICS400_V1`` (torchvision downloads), or ``random`` (an
    untrained substitute: the control of the substitute study, and smoke runs).  A run trained on
    CIFAR-10 is refused unless ``in_domain`` (an in-domain upper bound that breaks the paper's
    premise on purpose).  Returns (weights, {arch, width, num_classes} or {})."""
    if spec in DOWNLOADABLE:
        return spec, dict(DOWNLOADABLE[spec])
    if spec == "random":
        return None, {}
    p = Path(spec)
    if p.is_dir():
        cfg = TrainConfig.load(p / "config.json") if (p / "config.json").is_file() else None
        weights = p / "model.pt"
        if cfg is None or not weights.is_file():
            raise AbnnError(f"{p} is not a finished substitute run (needs config.json and model.pt)")
        if cfg.dataset == "cifar10" and not in_domain:
            raise AbnnError(f"substitute run {p} was trained on CIFAR-10, the target dataset; that breaks "
                            "ABNN's premise (METHOD.md s. 3). Pretrain it on tinyimagenet32 (or pass "
                            "--allow-in-domain-substitute for an in-domain upper bound)")
        return str(weights), {"arch": cfg.arch, "width": cfg.width, "num_classes": DATASETS[cfg.dataset]["num_classes"]}
    if p.is_file():
        return str(p), {}
    raise AbnnError(f"substitute {spec!r} is neither a run folder, a weights file, IMAGENET1K_V1, KINETICS400_V1 "
                    "nor random")


def build_substitute(cfg: TrainConfig, *, load_weights: bool = True) -> nn.Module:
    """The frozen substitute of an ABNN run (VGG-19-BN for images, R3D-18 for video)."""
    weights, meta = resolve_substitute(cfg.substitute, in_domain=cfg.in_domain_substitute) if load_weights else (None, {})
    arch = meta.get("arch", cfg.substitute_arch)
    width = meta.get("width", cfg.substitute_width)
    ncls = meta.get("num_classes", cfg.substitute_num_classes)
    cfg.substitute_arch, cfg.substitute_width, cfg.substitute_num_classes = arch, width, ncls
    if arch == "vgg19_bn":
        return vgg19_bn_substitute(ncls, width=width, weights=weights)
    if arch == "r3d_18":
        return r3d18_substitute(ncls, width=width, weights=weights)
    if arch == "resnet20":  # the reference CIFAR-10 ResNet-20, tapped by module name (substitute_taps)
        return resnet20_reference(weights)
    raise AbnnError(f"unknown substitute architecture {arch!r}; use vgg19_bn (images), r3d_18 (video) or "
                    "resnet20 (the reference CIFAR-10 model, with --substitute-taps)")


def build_model_from_config(cfg: TrainConfig, *, load_substitute: bool = True) -> nn.Module:
    """The model of a run: the plain architecture, with an OUDefend block (``oudefend``), or
    ABNN(target, frozen substitute)."""
    ncls = DATASETS[cfg.dataset]["num_classes"]
    target = build_model(cfg.arch, num_classes=ncls, width=cfg.width)
    if cfg.method == "oudefend":
        return with_oudefend(target, after="layer3")
    if cfg.method != "abnn":
        return target
    substitute = build_substitute(cfg, load_weights=load_substitute)
    return ABNN(target, substitute, input_shape=INPUT_SHAPES[cfg.dataset], substitute_taps=cfg.substitute_taps,
                substitute_stats=cfg.substitute_stats, encoder=cfg.encoder, bn_affine=cfg.bn_affine)


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild a finished run's model (eval mode) from ``config.json`` and ``model.pt``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise AbnnError(f"run folder not found: {run}")
    if not (run / "config.json").is_file():
        raise AbnnError(f"{run} is not a run folder (no config.json)")
    cfg = TrainConfig.load(run / "config.json")
    weights = run / "model.pt"
    if not weights.is_file():
        raise AbnnError(f"{run} has no model.pt: training has not finished (resume it with `abnn train ... --resume`)")
    model = build_model_from_config(cfg, load_substitute=False)
    state = load_state_dict_file(weights)
    check_state_dict(state, model, weights)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AbnnError(f"cannot read {path}: {exc}") from None

