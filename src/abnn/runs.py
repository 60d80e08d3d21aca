"""A run folder is the unit of work: ``config.json``, ``checkpoint.pt``, ``metrics.jsonl``,
``model.pt`` (final weights), ``train_results.json``, ``eval*.json``, and ``abnn.lock`` while a
process writes it.  This module builds the model a config describes, loads a finished run back,
compares a run's recorded settings with new ones, and holds a folder's lock."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import SettingDifference, TrainConfig, config_differences
from .data.datasets import DATASETS, input_shape
from .errors import AbnnError, RunLockedError, SettingsMismatchError
from .files import ensure_writable
from .framework import ABNN
from .models import (MODELS, build_model, r3d18_authors_substitute, r3d18_substitute, resnet20_reference,
                     vgg19_bn_substitute, with_oudefend)
from .models.io import check_state_dict, load_state_dict_file
from .models.torchvision_weights import torchvision_file_arch
from .probe import Probe

#: pretrained substitute weights that torchvision downloads (the paper's substitutes)
DOWNLOADABLE = {"IMAGENET1K_V1": {"arch": "vgg19_bn", "width": 1.0, "num_classes": 1000},
                "KINETICS400_V1": {"arch": "r3d_18", "width": 1.0, "num_classes": 400}}


def resolve_substitute(spec: str, *, in_domain: bool = False) -> tuple[str | None, dict]:
    """Resolve ``--substitute``: a run folder (reads its config and ``model.pt``), a weights
    file (one in torchvision's ``vgg19_bn`` / ``r3d_18`` format, recognised by its keys, gets the
    architecture, width and class count of those weights), ``IMAGENET1K_V1`` / ``KINETICS400_V1``
    (torchvision downloads), or ``random`` (an untrained substitute: the control of the substitute
    study, and smoke runs).  A run trained on
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
        arch = torchvision_file_arch(p)  # torchvision's own format: the offline copy of a download
        meta = next((dict(m) for m in DOWNLOADABLE.values() if m["arch"] == arch), {})
        return str(p), meta
    raise AbnnError(f"substitute {spec!r} is neither a run folder, a weights file, IMAGENET1K_V1, KINETICS400_V1 "
                    "nor random; offline, pass a PATH to torchvision's weights file instead of IMAGENET1K_V1 / "
                    "KINETICS400_V1")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with the substitute's architecture, width and class count taken from
    its source (a substitute run folder or torchvision weights), as a run records them.  A bare
    weights file keeps the config's values.  Reads no weights."""
    from .training.methods import get_method

    if not get_method(cfg.method).substitute or not cfg.substitute:
        return dataclasses.replace(cfg)
    _, meta = resolve_substitute(cfg.substitute, in_domain=cfg.in_domain_substitute)
    return dataclasses.replace(cfg, substitute_arch=meta.get("arch", cfg.substitute_arch),
                               substitute_width=meta.get("width", cfg.substitute_width),
                               substitute_num_classes=meta.get("num_classes", cfg.substitute_num_classes))


def build_substitute(cfg: TrainConfig, *, load_weights: bool = True) -> nn.Module:
    """The frozen substitute of an ABNN run (VGG-19-BN for images, R3D-18 for video), as
    ``cfg`` describes it (see :func:`resolve_config`); with ``load_weights`` its weights too."""
    weights = resolve_substitute(cfg.substitute, in_domain=cfg.in_domain_substitute)[0] if load_weights else None
    arch, width, ncls = cfg.substitute_arch, cfg.substitute_width, cfg.substitute_num_classes
    if arch == "vgg19_bn":
        return vgg19_bn_substitute(ncls, width=width, weights=weights)
    if arch == "r3d_18":
        return r3d18_substitute(ncls, width=width, weights=weights)
    if arch == "r3d_18_authors":  # the authors' 3D ResNet-18 (type-A shortcuts), models/r3d_authors.py
        return r3d18_authors_substitute(ncls, width=width, weights=weights)
    if arch == "resnet20":  # the reference CIFAR-10 ResNet-20, tapped by module name (substitute_taps)
        return resnet20_reference(weights)
    if arch in MODELS and cfg.substitute_taps:  # e.g. a CIFAR ResNet-18 run (Fast-AT), tapped by stage names
        model = build_model(arch, num_classes=ncls, width=width)
        if weights is not None:
            model.load_state_dict(load_state_dict_file(weights, expect=model))
        return model
    raise AbnnError(f"unknown substitute architecture {arch!r}; use vgg19_bn (images), r3d_18 or r3d_18_authors "
                    "(video), resnet20 (the reference CIFAR-10 model) or another model of abnn.models with "
                    "--substitute-taps")


def build_model_from_config(cfg: TrainConfig, *, load_substitute: bool = True) -> nn.Module:
    """The model of a run, by its method's model kind: the plain architecture, with an OUDefend
    block (``oudefend``), ABNN(target, frozen substitute), or a :class:`~abnn.probe.Probe` on the
    frozen substitute.  ``cfg`` as resolved by :func:`resolve_config` (a recorded
    config is)."""
    from .training.methods import get_method

    kind = get_method(cfg.method).model
    ncls = DATASETS[cfg.dataset]["num_classes"]
    if kind == "probe":  # no target: a head on the frozen substitute
        return Probe(build_substitute(cfg, load_weights=load_substitute), ncls, taps=cfg.substitute_taps,
                     input_shape=input_shape(cfg.dataset, frames=cfg.frames))
    target = build_model(cfg.arch, num_classes=ncls, width=cfg.width)
    if kind == "oudefend":
        return with_oudefend(target, after="layer3")
    if kind != "abnn":
        return target
    substitute = build_substitute(cfg, load_weights=load_substitute)
    return ABNN(target, substitute, input_shape=input_shape(cfg.dataset, frames=cfg.frames), substitute_taps=cfg.substitute_taps,
                substitute_stats=cfg.substitute_stats, encoder=cfg.encoder, bn_affine=cfg.bn_affine,
                substitute_std=cfg.substitute_std)


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
        raise AbnnError(f"{run} has no model.pt: training has not finished (the same `abnn train` command continues it)")
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


def training_cut_short(run: str | os.PathLike) -> dict | None:
    """``{"steps", "planned_steps", "max_steps"}`` when the run's training stopped before its
    planned steps (``--max-steps``), as its ``train_results.json`` records; else ``None``."""
    path = Path(run) / "train_results.json"
    res = read_json(path) if path.is_file() else {}
    if res.get("complete", True):
        return None
    return {k: res.get(k) for k in ("steps", "planned_steps", "max_steps")}


def cut_short_note(run: str | os.PathLike, short: dict) -> str:
    """One line that says an evaluated model's training was cut short."""
    return (f"the training of {run} was cut short by --max-steps {short['max_steps']}: {short['steps']} of its "
            f"{short['planned_steps']} planned steps; these numbers are of an unfinished model")


# -- one run identity --------------------------------------------------------------------------

def recorded_differences(run: str | os.PathLike, cfg: TrainConfig) -> list[SettingDifference]:
    """The run-defining settings in which ``cfg`` (resolved as a run records it) differs from
    the run's recorded ``config.json``."""
    return config_differences(TrainConfig.load(Path(run) / "config.json"), resolve_config(cfg))


def check_same_run(run: str | os.PathLike, cfg: TrainConfig, *, fix: str) -> None:
    """Raise one :class:`SettingsMismatchError` line naming each differing flag, its recorded
    and its new value, and ``fix``; return quietly when the run was made with ``cfg``."""
    diffs = recorded_differences(run, cfg)
    if diffs:
        raise SettingsMismatchError(f"{run} was recorded with other settings: {'; '.join(map(str, diffs))}; {fix}",
                                    diffs)


# -- the lock of a run folder ------------------------------------------------------------------

LOCK_NAME = "abnn.lock"
_HELD: dict[tuple[int, Path], int] = {}   # (pid, folder) this process holds -> nesting depth (a forked child holds none)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, *, wait: float = 0.0) -> Iterator[Path]:
    """Hold ``folder``'s lock (``abnn.lock``: PID, host, process start time, command) for the
    duration of the ``with`` block; create the folder and prove it writable first.

    A second writer gets one :class:`RunLockedError` line naming the holder's PID.  A lock whose
    process is gone (no such PID on this host, or a PID reused by a newer process) is stale and
    taken over.  Released on exit, exceptions and ``KeyboardInterrupt`` included; a SIGKILL
    leaves a stale lock that the next writer takes over.  Re-entrant within one process.  A
    lock from another host cannot be checked and counts as held.

    ``wait``: seconds to keep trying while another live process holds the lock (the analysis
    stages of two studies that read the same run folder take turns); 0 refuses at once."""
    created = not Path(folder).exists()
    folder = ensure_writable(folder).resolve()
    key = (os.getpid(), folder)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    lock = folder / LOCK_NAME
    mine = _lock_record()
    deadline = time.monotonic() + wait
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a holder that created the folder removes it if empty
            _acquire(lock, mine)
            break
        except RunLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    _HELD[key] = 1
    try:
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            if _read_lock(lock) == mine:
                lock.unlink()
            if created:
                folder.rmdir()   # only if nothing was written into the folder this call created


def _acquire(lock: Path, mine: dict) -> None:
    tmp = lock.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(mine))
    try:
        for _ in range(3):  # a stale lock is removed, then the link is tried again
            try:
                os.link(tmp, lock)    # atomic: creates the lock with its content, or fails if it exists
                return
            except FileExistsError:
                pass
            except OSError:           # no hard links on this file system: create it exclusively
                with contextlib.suppress(FileExistsError):
                    with open(lock, "x") as f:
                        f.write(json.dumps(mine))
                    return
            holder = _read_lock(lock)
            if holder is not None and _alive(holder):
                raise RunLockedError(
                    f"{lock.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
                    f"(`{holder.get('command', '?')}`, since {holder.get('since', '?')}); wait for it to end, "
                    f"or delete {lock} if that process is gone")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()   # stale: its process is gone
        raise RunLockedError(f"could not take the lock {lock} (other processes keep taking it); try again")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; ``None`` if absent; an unreadable lock counts as held by an unknown process."""
    try:
        rec = json.loads(lock.read_text())
        return rec if isinstance(rec, dict) else {"pid": "?", "host": "?"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs (always assumed for another host or a bad record)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    start = holder.get("start")
    return start is None or _start_time(pid) in (None, start)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
