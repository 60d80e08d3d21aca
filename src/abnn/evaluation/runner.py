"""The runner: the one place that runs attacks over a dataset.

    from abnn.evaluation import run_attacks
    res = run_attacks(model, data, ["pgd", "apgd-ce:steps=20"], batch_size=250, seed=0)
    res.clean_acc, res.attacks["pgd"].robust_acc, res.attacks["pgd"].robust_mask, res.worst_case().robust_acc

Attacks come from the registry (:mod:`abnn.attacks.registry`) and are all built before the first
one runs, so a bad option or a missing package fails at once.  Each attack is crafted and
evaluated batch by batch (the batch the model sees is the one it is attacked in, which matters
for batch statistics) and gives a per-sample robust mask: correct on the clean input and on the
adversarial one (RobustBench convention).  Each attack draws its randomness from its own seed,
derived from the run seed and the attack's label, so adding an attack never changes another's
numbers.  Forward passes run in float32 (autocast off), as the attacks do.

An ensemble that runs its components one after the other (:class:`~abnn.attacks.AutoAttack`:
each component attacks only the samples still robust after the ones before it) is one attack
here, one row with the ensemble's number; its ``last_robust_after`` masks also become a row per
component, labelled ``ENSEMBLE/COMPONENT`` (``part_of`` the ensemble): robust accuracy after that
component and those before it, so the masking checks still see what Square alone broke.

With ``progress_dir`` the runner is resumable: each finished attack is saved at once into
``progress_dir/attack-progress.pt`` with the fingerprint of the model weights, data, batch size
and sources; a later call with the same fingerprint takes every finished attack whose settings
(its repr, seed included) are unchanged from there, so an interrupted evaluation loses at most
the attack it was in and gives the numbers of an uninterrupted one.  The file is removed when
the call completes.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks import Attack, AttackSpec, attack_defaults, default_eps, parse_spec, resolve_options
from ..attacks.registry import AttackEntry, get_entry
from ..data import ImageData
from ..errors import AbnnError, CheckpointError
from ..files import ensure_writable
from ..models.io import safe_torch_load, save_atomic
from .results import AttackResult, EvalResult, same_eps

__all__ = ["PROGRESS_FILE", "as_tensors", "derive_seed", "predict", "run_attacks"]

#: the file in ``progress_dir`` that keeps the finished attacks of an interrupted call
PROGRESS_FILE = "attack-progress.pt"
_FORMAT = 2


def derive_seed(seed: int, key: str) -> int:
    """The seed of the attack labelled ``key`` in a run with ``seed`` (63 bits of SHA-256)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") >> 1


# ------------------------------------------------------------------------------------------ data


def as_tensors(data: Any, n_eval: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` on the CPU: x uint8 (converted per batch) or float in [0, 1]; first ``n_eval``.

    ``data``: an :class:`~abnn.data.ImageData` (images or clips), a pair ``(x, y)``, or a
    map-style dataset with ``__len__`` and ``__getitem__ -> (sample, label) | None`` (e.g. the
    on-disk UCF-101 clips; its ``subset(n_eval)`` is used when it has one, samples that return
    ``None`` are left out).  The samples are held in memory."""
    if isinstance(data, ImageData):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if n_eval is not None and hasattr(data, "subset"):
            data = data.subset(n_eval)
        count = len(data) if n_eval is None else min(n_eval, len(data))
        items = [it for it in (data[i] for i in range(count)) if it is not None]
        if not items:
            raise AbnnError(f"no usable sample in {getattr(data, 'name', type(data).__name__)}")
        x = torch.stack([torch.as_tensor(c) for c, _ in items])
        y = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    else:
        raise AbnnError(f"data must be an ImageData, a pair (x, y) of tensors or a dataset of (sample, label); "
                        f"got {type(data).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or len(x) != len(y) or x.dim() < 3:
        raise AbnnError("data must hold x (N, C, ...) and labels y (N,) of the same length")
    if n_eval is not None:
        if n_eval < 1:
            raise AbnnError(f"n_eval must be >= 1, got {n_eval}")
        x, y = x[:n_eval], y[:n_eval]
    return x, y.long()


def to_float(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def batches(x: Tensor, y: Tensor, bs: int, device: torch.device) -> Iterator[tuple[slice, Tensor, Tensor]]:
    for i in range(0, len(x), bs):
        s = slice(i, min(i + bs, len(x)))
        yield s, to_float(x[s], device), y[s].to(device)


def predict(model: nn.Module, x: Tensor, bs: int, device: torch.device) -> Tensor:
    """Predictions (CPU) in batches of ``bs`` (the batch composition matters for batch statistics)."""
    out = []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for i in range(0, len(x), bs):
            out.append(model(to_float(x[i:i + bs], device)).argmax(1).cpu())
    return torch.cat(out)


def digest(*objs: nn.Module | Tensor) -> str:
    """SHA-256 of tensors' values (a module: its state dict, in order), to recognise a resumed run."""
    h = hashlib.sha256()
    for obj in objs:
        tensors = obj.state_dict().items() if isinstance(obj, nn.Module) else [("", obj)]
        for k, t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- the plan


@dataclass
class _Planned:
    spec: AttackSpec
    entry: AttackEntry
    options: dict[str, Any]
    attack: Attack

    @property
    def label(self) -> str:
        return self.spec.key

    @property
    def eps(self) -> float | None:
        return self.options.get("eps") if self.entry.norm == "linf" else None


def _plan(model: nn.Module, specs: Sequence[str | AttackSpec], *, eps: float | None, seed: int, video: bool,
          sources: Mapping[str, nn.Module]) -> list[_Planned]:
    """Parse, resolve and build every attack (before any runs: bad options fail at once)."""
    plan: list[_Planned] = []
    for raw in specs:
        spec = parse_spec(raw)
        entry = get_entry(spec.name)
        given = dict(spec.options)
        if eps is not None and "eps" not in given and "eps" in attack_defaults(spec.name, video=video,
                                                                               attack=given.get("attack")):
            given["eps"] = eps
        given.setdefault("seed", derive_seed(seed, spec.seed_key or spec.key))
        options = resolve_options(spec.name, given, video=video)
        build_opts = dict(options)
        if entry.inner and (spec.name == "transfer" or "source" in options):
            src = build_opts["source"] = _source(options.get("source"), sources)
            options["source"] = next((k for k, v in sources.items() if v is src), type(src).__name__)
        plan.append(_Planned(spec, entry, options, entry.build(model, build_opts, video=video)))
    labels = [p.label for p in plan]
    dup = sorted({k for k in labels if labels.count(k) > 1})
    if dup:
        raise AbnnError(f"attack labels must be unique; repeated: {', '.join(dup)}")
    return plan


def _source(name: Any, sources: Mapping[str, nn.Module]) -> nn.Module:
    if isinstance(name, nn.Module):
        return name
    if name is None and len(sources) == 1:
        return next(iter(sources.values()))
    if name not in sources:
        have = ", ".join(sources) or "none given"
        raise AbnnError(f"the transfer attack needs source=NAME, one of the sources ({have}); "
                        "on the command line add --source NAME=RUN")
    return sources[name]


# ------------------------------------------------------------------------------- progress file


class _Progress:
    """The finished attacks of an interrupted call (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike | None, fingerprint: dict, *, refuse_changed: bool = False) -> None:
        self.path = Path(folder) / PROGRESS_FILE if folder is not None else None
        self.fingerprint = fingerprint
        self.refuse_changed = refuse_changed
        self.done: dict[str, dict[str, Any]] = {}
        self.x_worst: Tensor | None = None
        self.seconds = 0.0
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            state = safe_torch_load(self.path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; the evaluation starts afresh", stacklevel=4)
            return
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            if self.refuse_changed and isinstance(state, dict) and isinstance(state.get("fingerprint"), dict):
                self._refuse(state)
            warnings.warn(f"{self.path} was written for other settings, weights or data; the evaluation starts "
                          "afresh (the file is replaced)", stacklevel=4)
            return
        self.done, self.x_worst, self.seconds = state["done"], state["x_worst"], float(state["seconds"])

    #: what each part of the fingerprint is, for the user
    _PARTS = {"n": "number of samples (--n-eval)", "batch_size": "--batch-size", "model": "model weights",
              "data": "test data", "sources": "transfer sources (--source)", "run": "run settings (config.json)",
              "format": "file format"}

    def _refuse(self, state: dict) -> None:
        old = state["fingerprint"]
        changed = [self._PARTS.get(k, k) for k in self.fingerprint if old.get(k) != self.fingerprint[k]]
        was = f" ({old['n']} then, {self.fingerprint['n']} now)" if old.get("n") != self.fingerprint["n"] else ""
        raise AbnnError(f"{self.path} holds {len(state.get('done', {}))} finished attacks of this evaluation with "
                        f"another {', '.join(changed)}{was}; rerun with the earlier settings to continue it, or add "
                        "--fresh to start over")

    def reusable(self, plan: list[_Planned], keep_worst: bool) -> set[str]:
        """Labels whose finished run matches the plan; all or nothing for the worst-case inputs."""
        ok = {p.label for p in plan if p.label in self.done and self.done[p.label]["settings"] == repr(p.attack)}
        if keep_worst and (self.x_worst is None or not {k for k, d in self.done.items() if d["worst"]} <= ok):
            ok = set()  # the saved worst-case inputs hold attacks this call does not run
        return ok

    def save(self, x_worst: Tensor | None, seconds: float) -> None:
        if self.path is not None:
            save_atomic({"fingerprint": self.fingerprint, "done": self.done, "x_worst": x_worst,
                         "seconds": seconds}, self.path)

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- the runner


def run_attacks(model: nn.Module, data: Any, specs: Sequence[str | AttackSpec], *, eps: float | None = None,
                n_eval: int | None = None, batch_size: int = 250, device: torch.device | str = "cpu", seed: int = 0,
                sources: Mapping[str, nn.Module] | None = None, progress: bool = True,
                progress_dir: str | os.PathLike | None = None, keep_progress: bool = False,
                keep_worst_inputs: bool = False, identity: Mapping[str, Any] | None = None,
                refuse_changed: bool = False) -> EvalResult:
    """Clean accuracy and every attack of ``specs`` over ``data``, per sample.

    Args:
        model: maps [0, 1] inputs to logits; moved to ``device``, its train/eval mode restored.
        data: an :class:`~abnn.data.ImageData`, a pair ``(x, y)`` (x float in [0, 1] or uint8,
            images or clips) or a dataset of ``(sample, label)``; see :func:`as_tensors`.
        specs: registry names, ``"NAME:key=value,..."`` strings or :class:`~abnn.attacks.AttackSpec`.
        eps: the evaluated L-inf radius (a fraction of the pixel range), given to every attack
            with an eps option that its spec does not set; default 8/255 for images, 1/255 for
            clips.  The worst case is taken at this eps.
        n_eval: first ``n_eval`` samples (``None``: all).
        batch_size: attack and evaluation batch.
        device: where the model runs.
        seed: the run seed; attack ``label`` gets ``derive_seed(seed, label)`` unless its spec sets one.
        sources: transfer sources by name (``transfer:source=NAME``).
        progress: tqdm bars.
        progress_dir: where finished attacks are kept while the call runs (resumable); ``None``: nowhere.
        keep_progress: leave the progress file when the call completes (a caller with more work
            after the attacks, such as the suite, removes it when its own work is done).
        keep_worst_inputs: keep, per sample, the adversarial input of the first attack at eps that
            broke it (``EvalResult.x_worst``, on the CPU; the clean input where none did).
        identity: the run-defining settings of the evaluated run (:func:`abnn.config.run_identity`):
            a resume also checks them, beside the weights.
        refuse_changed: a progress file of other settings, weights or data is an error that says
            what changed (the CLI: rerun as before, or ``--fresh``); default: a warning, and it is replaced.

    Returns:
        an :class:`~abnn.evaluation.results.EvalResult`.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    x, y = as_tensors(data, n_eval)
    video = x.dim() == 5
    run_eps = default_eps(video=video) if eps is None else eps
    sources = dict(sources or {})
    was_training = model.training
    model.to(device).eval()
    for src in sources.values():
        src.to(device).eval()
    try:
        _check_sources(model, sources, x[:1], device)
        plan = _plan(model, specs, eps=eps, seed=seed, video=video, sources=sources)
        fingerprint = {"format": _FORMAT, "n": len(x), "batch_size": batch_size, "model": digest(model),
                       "data": digest(x, y), "sources": {k: digest(v) for k, v in sorted(sources.items())},
                       "run": dict(identity or {})}
        state = _Progress(progress_dir, fingerprint, refuse_changed=refuse_changed)
        reuse = state.reusable(plan, keep_worst_inputs)
        clean = predict(model, x, batch_size, device) == y
        x_worst = None
        if keep_worst_inputs:
            x_worst = state.x_worst if reuse else to_float(x, torch.device("cpu")).clone()
        robust_all = clean.clone()
        state.done = {k: d for k, d in state.done.items() if k in reuse}
        rows: dict[str, AttackResult] = {}
        for p in tqdm(plan, desc="attacks", disable=not progress, dynamic_ncols=True):
            in_worst = p.entry.norm == "linf" and same_eps(p.eps, run_eps)
            if p.label in reuse:
                done = state.done[p.label]
                mask, parts, seconds = done["robust"], done.get("parts", {}), done["seconds"]
            else:
                t0 = time.perf_counter()
                mask, parts = _attack_dataset(model, p, x, y, clean, batch_size, device, progress,
                                              x_worst if in_worst else None, robust_all)
                seconds = time.perf_counter() - t0
                state.done[p.label] = {"settings": repr(p.attack), "robust": mask, "parts": parts, "seconds": seconds,
                                       "worst": in_worst and x_worst is not None}
                state.save(x_worst, state.seconds + time.perf_counter() - t_start)
            if in_worst:
                robust_all &= mask
            rows[p.label] = _row(p, mask, seconds)
            rows.update((row.label, row) for row in _part_rows(p, parts))
    finally:
        model.train(was_training)
    result = EvalResult(n_eval=len(x), clean_acc=clean.float().mean().item(), clean_mask=clean, eps=run_eps,
                        attacks=rows, seed=seed, batch_size=batch_size, device=str(device),
                        threads=torch.get_num_threads(), seconds=state.seconds + time.perf_counter() - t_start,
                        resumed=[p.label for p in plan if p.label in reuse], x_worst=x_worst)
    if not keep_progress:
        state.finish()
    return result


def _check_sources(model: nn.Module, sources: Mapping[str, nn.Module], x: Tensor, device: torch.device) -> None:
    """Refuse a transfer source whose outputs are other classes than the model's (one forward
    pass each on one sample): its adversarial examples would be aimed at labels of another task."""
    if not sources:
        return
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        xb = to_float(x, device)
        want = model(xb).shape[1]
        for name, src in sources.items():
            got = src(xb).shape[1]
            if got != want:
                raise AbnnError(f"transfer source {name!r} outputs {got} classes and the evaluated model {want}: a "
                                "source must be trained on the same classes (e.g. a CIFAR-10 run for a CIFAR-10 "
                                "target, not a tinyimagenet32 substitute)")


def _attack_dataset(model: nn.Module, p: _Planned, x: Tensor, y: Tensor, clean: Tensor, bs: int,
                    device: torch.device, progress: bool, x_worst: Tensor | None,
                    robust_all: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The robust mask of one attack over the dataset, and for an ensemble the masks after each
    component (see the module docstring); updates ``x_worst`` for newly broken samples."""
    robust = torch.zeros(len(x), dtype=torch.bool)
    parts: dict[str, Tensor] = {}
    for s, xb, yb in tqdm(batches(x, y, bs, device), desc=p.label, total=-(-len(x) // bs), disable=not progress,
                          leave=False, dynamic_ncols=True):
        x_adv = p.attack(xb, yb)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ok = (model(x_adv).argmax(1) == yb).cpu() & clean[s]
        robust[s] = ok
        for name, after in getattr(p.attack, "last_robust_after", {}).items():
            parts.setdefault(name, torch.zeros(len(x), dtype=torch.bool))[s] = after.cpu() & clean[s]
        if x_worst is not None:
            new = robust_all[s] & ~ok
            x_worst[s] = torch.where(new.view((-1,) + (1,) * (xb.dim() - 1)), x_adv.cpu(), x_worst[s])
            robust_all[s] &= ok
    return robust, parts


def _json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)  # JSON-ready (amp: a dtype)
            for k, v in options.items() if k not in ("channels_last", "amp") or v is not None}


def _row(p: _Planned, mask: Tensor, seconds: float) -> AttackResult:
    return AttackResult(label=p.label, attack=p.spec.name, kind=p.entry.kind, norm=p.entry.norm, eps=p.eps,
                        options=_json_options(p.options), settings=repr(p.attack), seed=getattr(p.attack, "seed", None),
                        robust_acc=mask.float().mean().item(), seconds=seconds, robust_mask=mask, group=p.spec.group)


def _part_rows(p: _Planned, parts: Mapping[str, Tensor]) -> list[AttackResult]:
    """The rows of an ensemble's components (robust after each, in running order; no seconds of
    their own: the ensemble's row holds them)."""
    rows = []
    for name, mask in parts.items():
        component = p.attack.component(name)
        rows.append(AttackResult(label=f"{p.label}/{name}", attack=name, kind=get_entry(name).kind, norm=p.entry.norm,
                                 eps=p.eps, options=_json_options(p.attack.component_options(name)),
                                 settings=repr(component), seed=component.seed, robust_acc=mask.float().mean().item(),
                                 seconds=0.0, robust_mask=mask, group=p.spec.group, part_of=p.label))
    return rows


# ----------------------------------------------------------------------------------- run folders


def evaluate_run(run_dir: str | os.PathLike, *, attacks: Sequence[str | AttackSpec] = ("pgd",), n_eval: int = 1000,
                 batch_size: int = 256, data_root: str | None = None, device: str = "cpu", seed: int = 0,
                 eps: float | None = None, sources: Mapping[str, nn.Module | str | os.PathLike] | None = None,
                 progress: bool = True, out: str | os.PathLike | None = None, resume: bool = True) -> EvalResult:
    """:func:`run_attacks` on a finished run (loaded with :func:`abnn.runs.load_run`) and the first
    ``n_eval`` test samples of its dataset; writes the :class:`EvalResult` as JSON to ``out``
    (default ``run_dir/eval.json``).  ``sources`` values may be modules or run folders.  Resumable
    through ``attack-progress.pt`` beside ``out`` (``resume=False`` discards it first); one of
    other settings, weights or data is refused."""
    from ..config import run_identity
    from ..files import write_json_atomic
    from ..data import load_dataset
    from ..runs import load_run, training_cut_short

    out = Path(out) if out is not None else Path(run_dir) / "eval.json"
    model, cfg = load_run(run_dir, device=device)
    ensure_writable(out.parent)
    data = load_dataset(cfg.dataset, "test", data_root or cfg.data_root, frames=cfg.frames).subset(n_eval)
    srcs = {k: v if isinstance(v, nn.Module) else load_run(v, device=device)[0] for k, v in (sources or {}).items()}
    if not resume:
        (out.parent / PROGRESS_FILE).unlink(missing_ok=True)
    res = run_attacks(model, data, attacks, eps=eps, n_eval=n_eval, batch_size=batch_size, device=device, seed=seed,
                      sources=srcs, progress=progress, progress_dir=out.parent, identity=run_identity(cfg),
                      refuse_changed=True)
    res.metadata.update({"run": str(run_dir), "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch,
                         "width": cfg.width, **({"sources": {k: str(v) for k, v in sources.items()}} if sources else {})})
    short = training_cut_short(run_dir)
    if short is not None:
        res.metadata["training_cut_short"] = short
    write_json_atomic(out, res.to_dict())
    return res
