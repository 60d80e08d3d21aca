"""The paper's pretrained substitutes from torchvision (METHOD.md s. 2-3): the ImageNet VGG-19-BN
(Table 1) and the Kinetics-400 R3D-18 (Tables 2 and 3).

Either downloaded by torchvision (``IMAGENET1K_V1``, ``KINETICS400_V1``) or, offline, read from
a state-dict file in torchvision's own format (the file torchvision downloads, or
``torchvision.models.vgg19_bn(...).state_dict()`` saved with ``torch.save``).  The format is
recognised by its key names (:func:`torchvision_arch`); :mod:`abnn.models.vgg` and
:mod:`abnn.models.r3d` map such a state dict onto the tapped substitutes, the same way for a
download and for a file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping

import torch
from torchvision.models import VGG19_BN_Weights
from torchvision.models.video import R3D_18_Weights

from ..errors import CheckpointError

__all__ = ["TORCHVISION_WEIGHTS", "torchvision_arch", "torchvision_file_arch", "download_state_dict",
           "cache_path", "offline_hint"]

#: torchvision's weights of the paper's substitutes: name -> (architecture, torchvision enum).
TORCHVISION_WEIGHTS = {"IMAGENET1K_V1": ("vgg19_bn", VGG19_BN_Weights.IMAGENET1K_V1),
                       "KINETICS400_V1": ("r3d_18", R3D_18_Weights.KINETICS400_V1)}


def torchvision_arch(keys) -> str | None:
    """``"vgg19_bn"`` or ``"r3d_18"`` when ``keys`` (a state dict or its key names) are
    torchvision's own state-dict keys of that model (``features.49`` is VGG-19's last conv,
    ``classifier.6`` its last linear; R3D-18 has ``stem.0`` and ``layer4.1.conv2.0`` with no
    ``model.`` prefix), else ``None``.  Shapes are checked when the weights are loaded."""
    keys = set(keys)
    if {"features.0.weight", "features.49.weight", "classifier.6.weight"} <= keys:
        return "vgg19_bn"
    if {"stem.0.weight", "layer4.1.conv2.0.weight", "fc.weight"} <= keys:
        return "r3d_18"
    return None


@functools.lru_cache(maxsize=16)
def _file_arch(path: str, mtime_ns: int, size: int) -> str | None:  # noqa: ARG001 - cache key
    from .io import extract_state_dict, safe_torch_load

    try:
        return torchvision_arch(extract_state_dict(safe_torch_load(path, mmap=True), path))
    except CheckpointError:
        return None


def torchvision_file_arch(path: str | os.PathLike) -> str | None:
    """:func:`torchvision_arch` of a weights file (memory-mapped, so cheap even for the 550 MB
    VGG-19-BN file; cached per file version); ``None`` for other or unreadable files."""
    st = Path(path).stat()
    return _file_arch(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def cache_path(name: str) -> Path:
    """Where torchvision keeps the downloaded file of ``name`` (``<torch hub>/checkpoints/<file>``,
    by default ``~/.cache/torch/hub/checkpoints/``)."""
    url = TORCHVISION_WEIGHTS[name][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def offline_hint(name: str) -> str:
    """How to use torchvision's ``name`` weights without network access."""
    url = TORCHVISION_WEIGHTS[name][1].url
    return (f"pass --substitute PATH (preset: --set {'substitute_source' if name == 'IMAGENET1K_V1' else 'substitute'}"
            f"=PATH) to a state dict in torchvision's format, e.g. {url.rsplit('/', 1)[-1]} from {url}, or put that "
            f"file where torchvision caches it: {cache_path(name)}")


def download_state_dict(name: str) -> Mapping[str, torch.Tensor]:
    """torchvision's ``name`` weights (downloaded once, then read from torchvision's cache).
    Without network access: one :class:`~abnn.errors.CheckpointError` line naming the offline way."""
    if name not in TORCHVISION_WEIGHTS:
        raise CheckpointError(f"unknown torchvision weights {name!r}; choose one of {', '.join(TORCHVISION_WEIGHTS)}")
    enum = TORCHVISION_WEIGHTS[name][1]
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hash: one clear message
        msg = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"cannot download torchvision's {type(enum).__name__}.{name} weights "
                              f"({type(exc).__name__}: {msg}); offline: " + offline_hint(name)) from None
