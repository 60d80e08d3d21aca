"""What a preset needs from outside this machine, and whether it is here already (issue 14).

The paper presets use torchvision's pretrained substitutes (ImageNet VGG-19-BN for Table 1,
Kinetics-400 R3D-18 for Tables 2 and 3; paper s. 4) and the full CIFAR-10; all of them are
downloads, and each can instead be given locally: a weights file in torchvision's format
(``--set substitute_source=PATH`` / ``--set substitute=PATH``, or the file in torchvision's own
cache), the extracted ``cifar-10-batches-py`` folder in the data root.  UCF-101 is never
downloaded: it must be on disk in its official layout.  :func:`check_sources` asks the network
only for what is not on disk, and fails at once, in one line, saying what is missing and how to
provide it offline.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..data import resolve_ucf101_root
from ..data.datasets import cifar10_python_candidates, find_cifar10_python
from ..errors import AbnnError
from ..models.torchvision_weights import TORCHVISION_WEIGHTS, cache_path, offline_hint
from .presets import Table1Preset, VideoPreset

__all__ = ["Source", "preset_sources", "check_sources"]

_WEIGHTS_WHAT = {"IMAGENET1K_V1": "torchvision's ImageNet VGG-19-BN weights (IMAGENET1K_V1)",
                 "KINETICS400_V1": "torchvision's Kinetics-400 R3D-18 weights (KINETICS400_V1)"}
_NOT_FILES = ("pretrain", "random")


@dataclass(frozen=True)
class Source:
    """One download a preset needs: what it is, whether it is on disk, how to provide it offline."""

    what: str
    local: bool
    offline: str


def _substitute_source(spec: str) -> list[Source]:
    """A substitute named by a download (local when torchvision's cache holds it), or a path
    (must exist: refused here, before any stage runs)."""
    if spec in TORCHVISION_WEIGHTS:
        return [Source(_WEIGHTS_WHAT[spec], cache_path(spec).is_file(), offline_hint(spec))]
    if spec not in _NOT_FILES and not Path(spec).expanduser().exists():
        raise AbnnError(f"substitute {spec!r}: no such file or folder; give a weights file (torchvision's format "
                        "works), a substitute run folder, or IMAGENET1K_V1 / KINETICS400_V1 with network access")
    return []


def preset_sources(preset: Table1Preset | VideoPreset, data_root: str | os.PathLike | None) -> list[Source]:
    """Every download ``preset`` needs, each marked local or not.  UCF-101 (never downloaded)
    must be on disk: its absence is one :class:`~abnn.errors.DataNotFoundError` line here."""
    if isinstance(preset, VideoPreset):
        if preset.dataset == "ucf101":
            resolve_ucf101_root(None, data_root)
        return _substitute_source(preset.substitute) if "abnn" in preset.methods else []
    sources = _substitute_source(preset.substitute_source) if "abnn" in preset.methods else []
    if preset.full_cifar10:
        folder = cifar10_python_candidates(data_root)[0]
        sources.append(Source("the full CIFAR-10", find_cifar10_python(data_root) is not None,
                              f"extract cifar-10-python.tar.gz so that {folder} holds data_batch_1..5, test_batch "
                              "and batches.meta"))
    return sources


def _network_error(host: str = "download.pytorch.org") -> str | None:
    """``None`` when ``host`` answers on port 443, else the reason."""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_sources(preset: Table1Preset | VideoPreset, data_root: str | os.PathLike | None) -> list[Source]:
    """Fail at once, in one :class:`~abnn.errors.AbnnError` line, when ``preset`` needs a
    download that is not on disk and the network is out of reach; the line names each missing
    thing and how to provide it offline.  The network is asked only when something is missing.
    Returns the sources (all local, or downloadable)."""
    sources = preset_sources(preset, data_root)
    missing = [s for s in sources if not s.local]
    if not missing:
        return sources
    reason = _network_error()
    if reason is not None:
        raise AbnnError(
            f"preset {preset.name!r} needs {' and '.join(s.what for s in missing)}, not found on this machine, and "
            f"network access to download them ({reason}); offline: " + "; ".join(s.offline for s in missing)
            + "; or use --preset smoke/cpu")
    return sources
