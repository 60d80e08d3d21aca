"""The evaluation suite: robustness numbers a reviewer can trust.

One call runs the checklist of Carlini et al. (2019, "On evaluating adversarial robustness"),
Athalye, Carlini & Wagner (ICML 2018, "Obfuscated gradients give a false sense of security") and
Croce et al. (ICML 2022, "Evaluating the adversarial robustness of adaptive test-time defenses")
on a model and a test set:

* attacks: the paper's PGD-5; PGD with many steps and restarts; APGD-CE, APGD-DLR and targeted
  APGD-T (Croce & Hein 2020); the gradient-free Square attack; the AutoAttack-style ensemble; for
  ABNN models the adaptive :class:`~abnn.attacks.adaptive.StatisticsAttack` and transfer attacks
  from the ABNN target with plain BatchNorm (``replace_adaptive_with_bn``) and from any given
  source models; and the **per-sample worst case** over all of them;
* for ABNN with ``substitute_stats == "batch"`` (predictions depend on the batch): evaluation at
  batch size 1, with fully adversarial batches, and mixed batches (k adversarial samples among
  clean ones: how many clean predictions flip);
* sanity checks, each violation a flag ``"possible gradient masking: ..."`` with the numbers:
  robust accuracy vs eps must fall to about 0% at a large eps (64/255); it must not rise with eps
  or with PGD steps; the best white-box gradient attack must not be weaker than Square
  (gradient-free) or than a transfer attack; input gradients must not be exactly zero.

Writes ``suite.json``, ``suite.md`` (checklist table, worst case, flags, PASS/SUSPECT verdict)
and ``eps_curve.png`` / ``steps_curve.png``.  Works for images (B, C, H, W) and clips
(B, C, T, H, W): every attack is shape-agnostic.

Robust accuracy counts a sample only if it is classified correctly both clean and under the
attack (RobustBench convention), so no attack row can exceed clean accuracy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks import APGD, APGDT, PGD, Attack, Square
from ..attacks.adaptive import StatisticsAttack, Transfer
from ..config import write_json_atomic
from ..data import ImageData, load_dataset
from ..errors import AbnnError, CheckpointError
from ..framework import ABNN, replace_adaptive_with_bn
from ..layers import AdaptiveBatchNorm
from ..models.io import safe_torch_load, save_atomic
from ..runs import load_run

os.environ.setdefault("MPLBACKEND", "Agg")

__all__ = ["BUDGETS", "PROGRESS_FILE", "run_suite", "run_suite_on_run", "per_sample_statistics", "pgd_alpha"]

#: name of the file in the output folder that keeps a running suite's finished attacks
PROGRESS_FILE = "suite-progress.pt"

#: Attack budgets.  ``full`` follows the literature (PGD-100 x 5 restarts, APGD 100 steps, Square
#: 5000 queries); ``quick`` scales everything down so that CPU runs finish.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        "pgd_steps": 100, "pgd_restarts": 5, "apgd_steps": 100, "apgd_targets": 9, "square_queries": 5000,
        "stats_steps": 100, "stats_weights": (0.01, 0.1, 1.0, 10.0), "transfer_steps": 100,
        "sweep_steps": 50, "steps_grid": (5, 10, 20, 50, 100), "eps_grid_255": (0, 2, 4, 8, 16, 32, 64),
        "mixed_k": (1, 4, 16), "mixed_steps": 50, "bs1_steps": 100,
    },
    "quick": {
        "pgd_steps": 20, "pgd_restarts": 2, "apgd_steps": 20, "apgd_targets": 3, "square_queries": 300,
        "stats_steps": 20, "stats_weights": (0.1, 1.0), "transfer_steps": 20,
        "sweep_steps": 10, "steps_grid": (5, 10, 20), "eps_grid_255": (0, 2, 4, 8, 16, 32, 64),
        "mixed_k": (1, 4), "mixed_steps": 10, "bs1_steps": 20,
    },
}

#: a robust accuracy above this at the largest eps of the sweep is flagged (should be ~0%)
ZERO_TOL = 0.01
#: a sample whose whole input gradient is exactly zero; above this fraction of the correctly
#: classified samples, flagged (Athalye et al. 2018: shattered / vanishing gradients)
ZERO_GRAD_TOL = 0.10

WHITE_BOX, BLACK_BOX, TRANSFER, ENSEMBLE = "white-box", "black-box", "transfer", "ensemble"


def pgd_alpha(eps: float, steps: int) -> float:
    """Step size for PGD with ``steps`` iterations: ``2.5 * eps / steps`` (Madry et al. 2018),
    at least ``eps / 10`` and at most ``eps / 4`` (the paper's 2/255 at 8/255)."""
    return min(eps / 4, max(eps / 10, 2.5 * eps / max(steps, 1)))


def _tol(n: int) -> float:
    """Noise tolerance of a comparison of two accuracies on ``n`` samples: one sample, at least
    half a point."""
    return max(0.005, 1.0 / max(n, 1)) + 1e-9


# ------------------------------------------------------------------------------------------ data


def _as_tensors(data: Any, n_eval: int | None) -> tuple[Tensor, Tensor]:
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


def _to_float(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _batches(x: Tensor, y: Tensor, bs: int, device: torch.device) -> Iterator[tuple[slice, Tensor, Tensor]]:
    for i in range(0, len(x), bs):
        s = slice(i, min(i + bs, len(x)))
        yield s, _to_float(x[s], device), y[s].to(device)


def _predict(model: nn.Module, x: Tensor, bs: int, device: torch.device) -> Tensor:
    """Predictions in batches of ``bs`` (the batch composition matters for batch statistics)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            out.append(model(_to_float(x[i:i + bs], device)).argmax(1).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def per_sample_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, an ABNN with ``substitute_stats="batch"`` behaves exactly as at batch
    size 1: in eval mode the only batch-dependent quantity is the substitute's batch moment, and
    over a batch of one it *is* the per-sample moment.  So evaluating (and attacking) in
    ``"sample"`` mode is evaluation at batch size 1, vectorised.  (The suite checks the
    equivalence on a few samples with a real batch-size-1 loop.)"""
    layers = [m for m in model.modules() if isinstance(m, AdaptiveBatchNorm)]
    old = [m.substitute_stats for m in layers]
    old_model = getattr(model, "substitute_stats", None)
    try:
        for m in layers:
            m.substitute_stats = "sample"
        if old_model is not None:
            model.substitute_stats = "sample"
        yield model
    finally:
        for m, s in zip(layers, old):
            m.substitute_stats = s
        if old_model is not None:
            model.substitute_stats = old_model


# --------------------------------------------------------------------------------- attack runner


class _Runner:
    """Runs attacks batch by batch and keeps per-sample outcomes and the worst-case inputs.

    With a ``progress_file``, every finished attack is saved there at once (atomically), and a
    later run with the same fingerprint (settings, model weights, data) takes the finished
    attacks from it instead of running them again: an interrupted suite loses at most the attack
    it was in.  Every attack draws its randomness from its own seeded generator, so a resumed
    suite gives the same numbers as an uninterrupted one."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, bs: int, device: torch.device, progress: bool,
                 progress_file: str | os.PathLike | None = None, fingerprint: dict | None = None) -> None:
        self.model, self.x, self.y, self.bs, self.device, self.progress = model, x, y, bs, device, progress
        self.n = len(x)
        self.clean_pred = _predict(model, x, bs, device)
        self.clean_ok = self.clean_pred == y
        self.x_worst = _to_float(x, torch.device("cpu")).clone()
        self.robust_all = self.clean_ok.clone()
        self.rows: dict[str, dict[str, Any]] = {}
        self.robust: dict[str, Tensor] = {}
        self.progress_file = Path(progress_file) if progress_file is not None else None
        self.fingerprint = fingerprint
        self.done: dict[str, dict[str, Any]] = {}   # name -> {"robust", "row"}: finished attacks
        self.seconds_before = 0.0                  # runtime of the interrupted runs resumed here
        self.resumed: list[str] = []
        if self.progress_file is not None and self.progress_file.is_file():
            self._load()

    def _load(self) -> None:
        path = self.progress_file
        try:
            state = safe_torch_load(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; the suite starts afresh", stacklevel=3)
            return
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            warnings.warn(f"{path} was written for other settings, weights or data; the suite starts afresh "
                          "(the file is replaced)", stacklevel=3)
            return
        self.done = state["done"]
        self.x_worst, self.robust_all = state["x_worst"], state["robust_all"]
        self.seconds_before = float(state["seconds"])

    def _save(self, seconds: float) -> None:
        if self.progress_file is not None:
            save_atomic({"fingerprint": self.fingerprint, "done": self.done, "x_worst": self.x_worst,
                         "robust_all": self.robust_all, "seconds": seconds}, self.progress_file)

    def finish(self) -> None:
        """The suite is complete: its progress file is no longer needed."""
        if self.progress_file is not None:
            self.progress_file.unlink(missing_ok=True)

    def run(self, name: str, attack: Attack, kind: str, *, keep: bool = True, desc: str | None = None,
            elapsed: Callable[[], float] | None = None) -> Tensor:
        """Robust mask of ``attack`` (crafted and evaluated on the suite's batches)."""
        if name in self.done:  # finished before an interruption: its x_worst share is already saved
            entry = self.done[name]
            self.resumed.append(name)
            if keep:
                self.robust[name] = entry["robust"]
                self.rows[name] = dict(entry["row"])
            return entry["robust"]
        robust = torch.zeros(self.n, dtype=torch.bool)
        t0 = time.perf_counter()
        for s, xb, yb in tqdm(_batches(self.x, self.y, self.bs, self.device), desc=desc or name,
                              total=-(-self.n // self.bs), disable=not self.progress, leave=False, dynamic_ncols=True):
            x_adv = attack(xb, yb)
            with torch.no_grad():
                ok = (self.model(x_adv).argmax(1) == yb).cpu() & self.clean_ok[s]
            robust[s] = ok
            if keep:
                fooled_new = self.robust_all[s] & ~ok
                self.x_worst[s] = torch.where(fooled_new.view((-1,) + (1,) * (xb.dim() - 1)), x_adv.cpu(), self.x_worst[s])
                self.robust_all[s] &= ok
        seconds = time.perf_counter() - t0
        row = {"kind": kind, "settings": repr(attack), "robust_acc": robust.float().mean().item(), "seconds": seconds}
        if keep:
            self.robust[name] = robust
            self.rows[name] = row
        self.done[name] = {"robust": robust, "row": row}
        self._save(self.seconds_before + (elapsed() if elapsed is not None else 0.0))
        return robust

    def broken_only_by(self) -> dict[str, int]:
        """Per attack (ensembles excluded): how many samples it alone breaks."""
        names = [k for k in self.robust if self.rows[k]["kind"] != ENSEMBLE]
        if len(names) < 2:
            return {}
        stack = torch.stack([self.robust[k] for k in names])  # (attacks, n)
        fooled = self.clean_ok & ~stack
        only = fooled & (fooled.sum(0) == 1)
        return {k: int(only[i].sum()) for i, k in enumerate(names)}

    def derived(self, name: str, parts: list[str], settings: str) -> None:
        have = [p for p in parts if p in self.robust]
        if not have:
            return
        robust = torch.stack([self.robust[p] for p in have]).all(0)
        self.robust[name] = robust
        self.rows[name] = {"kind": ENSEMBLE, "settings": settings + f" = per-sample worst case of {', '.join(have)}",
                           "robust_acc": robust.float().mean().item(),
                           "seconds": sum(self.rows[p]["seconds"] for p in have)}


def _zero_grad_fraction(model: nn.Module, x: Tensor, y: Tensor, ok: Tensor, bs: int, device: torch.device) -> dict:
    """Fraction of correctly classified samples whose cross-entropy input gradient is exactly zero
    everywhere, and whether any gradient is non-finite."""
    zero = torch.zeros(len(x), dtype=torch.bool)
    nonfinite = False
    with torch.enable_grad():
        for s, xb, yb in _batches(x, y, bs, device):
            xb.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), yb, reduction="sum"), xb)
            flat = g.flatten(1)
            nonfinite |= bool((~torch.isfinite(flat)).any())
            zero[s] = (flat == 0).all(1).cpu()
    n_ok = int(ok.sum())
    return {"zero_grad_frac": (zero & ok).sum().item() / n_ok if n_ok else 0.0, "nonfinite_grad": nonfinite}


# -------------------------------------------------------------------------------- batch checks


def _poison_batch(model: nn.Module, xb: Tensor, k: int, ref_pred: Tensor, eps: float, alpha: float, steps: int,
                  gen: torch.Generator | None) -> Tensor:
    """PGD on the first ``k`` samples of the batch only, maximising the cross-entropy of the other
    samples' clean predictions (an attacker who controls k samples of a batch-statistics batch)."""
    view = (-1,) + (1,) * (xb.dim() - 1)
    slot = (torch.arange(len(xb), device=xb.device) < k).view(view)
    lower, upper = (xb - eps).clamp(min=0), (xb + eps).clamp(max=1)
    noise = torch.rand(xb.shape, generator=gen, device=xb.device, dtype=xb.dtype)
    x_adv = torch.where(slot, (xb + (2 * noise - 1) * eps).clamp(0, 1), xb)
    with torch.enable_grad():
        for _ in range(steps):
            xg = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xg)[k:], ref_pred[k:], reduction="sum")
            (g,) = torch.autograd.grad(loss, xg)
            step = torch.maximum(torch.minimum(x_adv + alpha * g.sign(), upper), lower)
            x_adv = torch.where(slot, step, xb)
    return x_adv.detach()


def _batch_checks(model: nn.Module, runner: _Runner, eps: float, cfg: dict, seed: int, progress: bool) -> dict:
    """Batch-size-1, fully adversarial and mixed-batch evaluation of a batch-statistics model."""
    x, y, bs, device, n = runner.x, runner.y, runner.bs, runner.device, runner.n
    out: dict[str, Any] = {"batch_size": bs}
    t0 = time.perf_counter()
    # the batch-size-1 equivalence, checked on a few samples with a real loop (not the hot path)
    m = min(4, n)
    xs = _to_float(x[:m], device)
    with torch.no_grad():
        loop = torch.cat([model(xs[i:i + 1]) for i in range(m)])
        with per_sample_statistics(model):
            vec = model(xs)
    if not torch.allclose(loop, vec, rtol=1e-4, atol=1e-4):
        raise AbnnError("batch-size-1 evaluation and per-sample statistics disagree; the model has another "
                        "batch dependence than the substitute moments")
    with per_sample_statistics(model):
        bs1_pred = _predict(model, x, bs, device)
    bs1_ok = bs1_pred == y
    out["clean_acc_batch"] = runner.clean_ok.float().mean().item()
    out["clean_acc_bs1"] = bs1_ok.float().mean().item()

    # 1. the batch-crafted worst case, evaluated at batch size 1 and in fully adversarial batches
    with per_sample_statistics(model):
        worst_bs1 = _predict(model, runner.x_worst, bs, device) == y
    worst_batch = _predict(model, runner.x_worst, bs, device) == y
    out["worst_inputs_in_adversarial_batches"] = (runner.clean_ok & worst_batch).float().mean().item()
    out["worst_inputs_at_bs1"] = (bs1_ok & worst_bs1).float().mean().item()

    # 2. attacks crafted at batch size 1 (vectorised through per-sample statistics)
    steps = cfg["bs1_steps"]
    robust_bs1 = bs1_ok.clone()
    robust_bs1_in_batch = runner.clean_ok.clone()
    x_bs1 = _to_float(x, torch.device("cpu")).clone()
    atks = {"pgd": PGD(model, eps=eps, alpha=pgd_alpha(eps, steps), steps=steps, seed=seed),
            "apgd-ce": APGD(model, eps=eps, steps=steps, loss="ce", seed=seed)}
    with per_sample_statistics(model):
        for name, atk in atks.items():
            for s, xb, yb in tqdm(_batches(x, y, bs, device), desc=f"bs1 {name}", total=-(-n // bs),
                                  disable=not progress, leave=False, dynamic_ncols=True):
                x_adv = atk(xb, yb)
                with torch.no_grad():
                    ok = (model(x_adv).argmax(1) == yb).cpu()
                new = robust_bs1[s] & ~ok
                x_bs1[s] = torch.where(new.view((-1,) + (1,) * (xb.dim() - 1)), x_adv.cpu(), x_bs1[s])
                robust_bs1[s] &= ok
    robust_bs1_in_batch &= _predict(model, x_bs1, bs, device) == y
    out["bs1_attacks"] = {k: repr(a) for k, a in atks.items()}
    out["bs1_robust_acc"] = robust_bs1.float().mean().item()
    out["bs1_crafted_in_adversarial_batches"] = robust_bs1_in_batch.float().mean().item()
    worst = runner.robust_all & (bs1_ok & worst_bs1) & robust_bs1 & robust_bs1_in_batch
    out["worst_over_protocols"] = worst.float().mean().item()

    # 3. mixed batches: k adversarial samples among clean ones; flips of the clean predictions
    gen = torch.Generator(device=device).manual_seed(seed)
    mixed = []
    alpha = pgd_alpha(eps, cfg["mixed_steps"])
    for k in cfg["mixed_k"]:
        if k >= min(bs, n):
            continue
        counts = {"transferred": [0, 0], "poison": [0, 0]}  # flips, correct->wrong
        n_clean = 0
        for s, xb, yb in _batches(x, y, bs, device):
            if len(xb) <= k:
                continue
            ref = runner.clean_pred[s].to(device)
            ok_ref = (ref == yb)[k:]
            n_clean += len(xb) - k
            x_tr = torch.cat([runner.x_worst[s][:k].to(device), xb[k:]])
            x_po = _poison_batch(model, xb, k, ref, eps, alpha, cfg["mixed_steps"], gen)
            with torch.no_grad():
                for key, xm in (("transferred", x_tr), ("poison", x_po)):
                    p = model(xm).argmax(1)[k:]
                    counts[key][0] += int((p != ref[k:]).sum())
                    counts[key][1] += int((ok_ref & (p != yb[k:])).sum())
        if n_clean:
            mixed.append({"k": k, "n_clean": n_clean,
                          **{f"{key}_flip_rate": c[0] / n_clean for key, c in counts.items()},
                          **{f"{key}_broken_rate": c[1] / n_clean for key, c in counts.items()}})
    out["mixed"] = mixed
    out["mixed_settings"] = (f"first k samples of each batch of {bs} replaced by (transferred) their worst-case "
                             f"adversarial example, or (poison) PGD-{cfg['mixed_steps']} (alpha {alpha * 255:.2g}/255) "
                             "on those k maximising the cross-entropy of the other samples' clean predictions")
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------- the flags


def _rises(values: list[float], tol: float) -> list[tuple[int, int]]:
    """(i, j) pairs, j > i, where values[j] exceeds the minimum of values[:j] (at i) by > tol."""
    out = []
    for j in range(1, len(values)):
        i = min(range(j), key=lambda t: values[t])
        if values[j] > values[i] + tol:
            out.append((i, j))
    return out


def _flags(res: dict) -> list[str]:
    n, flags = res["n_eval"], []
    tol = _tol(n)
    rows = res["attacks"]
    ec = res["eps_curve"]
    if ec["robust_acc"]:
        acc_max, e_max = ec["robust_acc"][-1], ec["eps_255"][-1]
        if acc_max > ZERO_TOL:
            flags.append(f"possible gradient masking: robust accuracy is {100 * acc_max:.1f}% at eps {e_max:g}/255 "
                         f"with PGD-{ec['steps']} (an attack this large must reach ~0%)")
        for i, j in _rises(ec["robust_acc"], tol):
            flags.append(f"possible gradient masking: robust accuracy rises with eps, {100 * ec['robust_acc'][i]:.1f}% "
                         f"at {ec['eps_255'][i]:g}/255 -> {100 * ec['robust_acc'][j]:.1f}% at {ec['eps_255'][j]:g}/255")
    sc = res["steps_curve"]
    for i, j in _rises(sc["robust_acc"], tol):
        flags.append(f"possible gradient masking: robust accuracy rises with PGD steps, {100 * sc['robust_acc'][i]:.1f}% "
                     f"at {sc['steps'][i]} steps -> {100 * sc['robust_acc'][j]:.1f}% at {sc['steps'][j]} steps")
    white = {k: r["robust_acc"] for k, r in rows.items() if r["kind"] == WHITE_BOX}
    if white:
        best_name = min(white, key=white.get)
        best = white[best_name]
        for k, r in rows.items():
            if r["kind"] in (BLACK_BOX, TRANSFER) and r["robust_acc"] < best - tol:
                what = "gradient-free" if r["kind"] == BLACK_BOX else "transfer attack"
                flags.append(f"possible gradient masking: {what} {k} ({100 * r['robust_acc']:.1f}%) is stronger than the "
                             f"best white-box gradient attack {best_name} ({100 * best:.1f}%)")
    g = res["gradients"]
    if g["zero_grad_frac"] > ZERO_GRAD_TOL:
        flags.append(f"possible gradient masking: the input gradient of the loss is exactly zero for "
                     f"{100 * g['zero_grad_frac']:.1f}% of the correctly classified samples")
    if g["nonfinite_grad"]:
        flags.append("possible gradient masking: the input gradient of the loss has NaN or inf entries")
    b = res.get("batch_checks")
    if b:
        main = res["worst_case"]["robust_acc"]
        if b["worst_over_protocols"] < main - tol:
            flags.append(f"batch dependence: the worst case over evaluation protocols (batch size 1, fully adversarial "
                         f"batches) is {100 * b['worst_over_protocols']:.1f}%, below the {100 * main:.1f}% of the "
                         f"batched evaluation (batch size 1: {100 * b['bs1_robust_acc']:.1f}%)")
        for m in b["mixed"]:
            for key in ("poison", "transferred"):
                if m[f"{key}_flip_rate"] > tol:
                    flags.append(f"batch dependence: {m['k']} adversarial samples ({key}) in a batch of {b['batch_size']} "
                                 f"flip {100 * m[f'{key}_flip_rate']:.1f}% of the clean predictions "
                                 f"({100 * m[f'{key}_broken_rate']:.1f}% become wrong)")
    return flags


# ---------------------------------------------------------------------------------- the suite


def _resolve_budget(budget: str | Mapping[str, Any] | None, quick: bool) -> tuple[str, dict[str, Any]]:
    if budget is None:
        budget = "quick" if quick else "full"
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise AbnnError(f"unknown budget {budget!r}; choose from {sorted(BUDGETS)} or pass a dict of overrides")
        return budget, dict(BUDGETS[budget])
    base = "quick" if quick else "full"
    bad = set(budget) - set(BUDGETS[base])
    if bad:
        raise AbnnError(f"unknown budget keys {sorted(bad)}; known: {sorted(BUDGETS[base])}")
    return f"{base}+custom", {**BUDGETS[base], **budget}


def run_suite(model: nn.Module, data: ImageData | tuple[Tensor, Tensor] | Any, *, eps: float = 8 / 255,
              n_eval: int | None = None, batch_size: int = 128, device: torch.device | str = "cpu", seed: int = 0,
              out_dir: str | os.PathLike | None = None, quick: bool = False,
              budget: str | Mapping[str, Any] | None = None,
              source_models: Mapping[str, nn.Module] | None = None, progress: bool = True,
              progress_file: str | os.PathLike | None = None, metadata: Mapping[str, Any] | None = None) -> dict:
    """Run the robustness checklist on ``model`` and return (and write) the results.

    Follows Carlini et al. 2019 ("On evaluating adversarial robustness"), Athalye et al. 2018
    (obfuscated gradients) and Croce et al., ICML 2022 (adaptive test-time defenses); see the
    module docstring for the list of attacks and checks.

    Args:
        model: maps [0, 1] inputs (images or clips) to logits; an :class:`~abnn.framework.ABNN`
            also gets the statistics attack, the transfer attack from its target with plain
            BatchNorm and, with ``substitute_stats="batch"``, the batch checks.  Moved to
            ``device``; its train/eval mode is restored at the end.
        data: an :class:`~abnn.data.ImageData` or a pair ``(x, y)`` (x float in [0, 1] or uint8,
            images or clips), or a dataset of ``(sample, label)`` such as the UCF-101 clips.
        eps: L-inf radius of the checklist attacks (8/255 images, 1/255 video).
        n_eval: first ``n_eval`` samples (``None``: all).
        batch_size: attack and evaluation batch (for batch statistics, the batch whose
            composition matters).
        device: where the model runs.
        seed: seed of every attack (results are reproducible).
        out_dir: where ``suite.json``, ``suite.md``, ``eps_curve.png``, ``steps_curve.png`` go
            (``None``: nothing written).
        quick: the ``quick`` budget (CPU-sized) instead of ``full``.
        budget: ``"full"``, ``"quick"``, or a dict overriding keys of :data:`BUDGETS` (on top of
            ``quick`` when ``quick`` else ``full``).
        source_models: extra transfer sources, name -> model (e.g. an undefended network).
        progress: tqdm bars.
        progress_file: where finished attacks are saved as the suite goes (``None``: nowhere);
            when the file exists and was written for the same settings, model weights and data,
            its finished attacks are taken from it instead of being run again (a resumed suite
            gives the same numbers as an uninterrupted one).  Removed when the suite completes.
        metadata: extra fields for the results and the report (e.g. the run folder).

    Returns:
        a dict with ``clean_acc``, ``attacks`` {name: {kind, settings, robust_acc, seconds}},
        ``worst_case``, ``robust_acc`` (the headline: worst case, over protocols for batch
        statistics), ``eps_curve``, ``steps_curve``, ``gradients``, ``batch_checks`` (or None),
        ``flags``, ``verdict`` (``"PASS"`` or ``"SUSPECT"``) and the settings.
    """
    t_start = time.perf_counter()
    budget_name, cfg = _resolve_budget(budget, quick)
    device = torch.device(device)
    x, y = _as_tensors(data, n_eval)
    n = len(x)
    was_training = model.training
    model.to(device).eval()
    is_abnn = isinstance(model, ABNN)
    batch_stats = is_abnn and getattr(model, "substitute_stats", None) == "batch"
    sources = dict(source_models or {})
    fingerprint = {
        "format": 1, "n": n, "eps": eps, "seed": seed, "batch_size": batch_size, "budget": budget_name,
        "budget_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "model": _digest(model), "data": _digest(x, y),
        "sources": {k: _digest(v) for k, v in sorted(sources.items())},
    } if progress_file is not None else None

    def elapsed() -> float:
        return time.perf_counter() - t_start

    try:
        runner = _Runner(model, x, y, batch_size, device, progress, progress_file, fingerprint)
        with torch.no_grad():
            num_classes = model(_to_float(x[:1], device)).shape[1]

        # ---- the attacks
        S, R = cfg["pgd_steps"], cfg["pgd_restarts"]
        plan: list[tuple[str, Callable[[], Attack], str]] = [
            ("pgd-5", lambda: PGD(model, eps=eps, alpha=eps / 4, steps=5, seed=seed), WHITE_BOX),
            (f"pgd-{S}x{R}", lambda: PGD(model, eps=eps, alpha=pgd_alpha(eps, S), steps=S, restarts=R, seed=seed), WHITE_BOX),
            ("apgd-ce", lambda: APGD(model, eps=eps, steps=cfg["apgd_steps"], loss="ce", seed=seed), WHITE_BOX),
        ]
        if num_classes >= 3:
            plan.append(("apgd-dlr", lambda: APGD(model, eps=eps, steps=cfg["apgd_steps"], loss="dlr", seed=seed), WHITE_BOX))
        if num_classes >= 4:
            plan.append(("apgd-t", lambda: APGDT(model, eps=eps, steps=cfg["apgd_steps"],
                                                 n_target_classes=min(cfg["apgd_targets"], num_classes - 1), seed=seed), WHITE_BOX))
        plan.append(("square", lambda: Square(model, eps=eps, queries=cfg["square_queries"], p_init=0.8, seed=seed), BLACK_BOX))
        if is_abnn:
            T = cfg["stats_steps"]
            for w in cfg["stats_weights"]:
                plan.append((f"stats-w{w:g}", lambda w=w: StatisticsAttack(model, eps=eps, alpha=pgd_alpha(eps, T), steps=T,
                                                                          weight=w, seed=seed), WHITE_BOX))
            sources = {"abnn-target-bn": replace_adaptive_with_bn(model), **sources}
        Tt = cfg["transfer_steps"]
        for name, src in sources.items():
            src.to(device).eval()
            plan.append((f"transfer-{name}", lambda src=src: Transfer(model, source=src, attack="pgd", eps=eps,
                                                                      alpha=pgd_alpha(eps, Tt), steps=Tt, seed=seed), TRANSFER))
        for name, make, kind in tqdm(plan, desc="suite attacks", disable=not progress, dynamic_ncols=True):
            runner.run(name, make(), kind, elapsed=elapsed)
        runner.derived("autoattack", ["apgd-ce", "apgd-t", "apgd-dlr", "square"],
                       f"AutoAttack-style (APGD {cfg['apgd_steps']} steps, Square {cfg['square_queries']} queries)")

        recheck = (runner.clean_ok & (_predict(model, runner.x_worst, batch_size, device) == y)).float().mean().item()
        worst = {"robust_acc": runner.robust_all.float().mean().item(), "recheck_acc": recheck,
                 "broken_only_by": runner.broken_only_by()}

        # ---- sanity curves
        e_grid = sorted(set(cfg["eps_grid_255"]) | {round(eps * 255, 6)})
        e_grid = [int(e) if float(e).is_integer() else e for e in e_grid]
        Ss = cfg["sweep_steps"]
        eps_acc = []
        for e in tqdm(e_grid, desc="eps sweep", disable=not progress, leave=False, dynamic_ncols=True):
            if e == 0:
                eps_acc.append(runner.clean_ok.float().mean().item())
                continue
            ee = e / 255
            r = runner.run(f"eps-{e:g}", PGD(model, eps=ee, alpha=pgd_alpha(ee, Ss), steps=Ss, seed=seed), WHITE_BOX,
                           keep=False, elapsed=elapsed)
            eps_acc.append(r.float().mean().item())
        steps_acc = []
        for s_ in tqdm(cfg["steps_grid"], desc="steps sweep", disable=not progress, leave=False, dynamic_ncols=True):
            if s_ == 5:
                steps_acc.append(runner.rows["pgd-5"]["robust_acc"])  # same attack, same seed
                continue
            r = runner.run(f"steps-{s_}", PGD(model, eps=eps, alpha=eps / 4, steps=s_, seed=seed), WHITE_BOX,
                           keep=False, elapsed=elapsed)
            steps_acc.append(r.float().mean().item())

        gradients = _zero_grad_fraction(model, x, y, runner.clean_ok, batch_size, device)
        batch = _batch_checks(model, runner, eps, cfg, seed, progress) if batch_stats else None
    finally:
        model.train(was_training)

    res: dict[str, Any] = {
        "model": type(model).__name__,
        "is_abnn": is_abnn,
        "substitute_stats": getattr(model, "substitute_stats", None) if is_abnn else None,
        "n_eval": n,
        "input_shape": list(x.shape[1:]),
        "num_classes": num_classes,
        "eps": eps,
        "eps_255": eps * 255,
        "budget": budget_name,
        "budget_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "batch_size": batch_size,
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clean_acc": runner.clean_ok.float().mean().item(),
        "attacks": runner.rows,
        "worst_case": worst,
        "eps_curve": {"eps_255": list(e_grid), "robust_acc": eps_acc, "steps": Ss,
                      "alpha": "min(eps/4, max(eps/10, 2.5 eps/steps))", "attack": "PGD, random start"},
        "steps_curve": {"steps": list(cfg["steps_grid"]), "robust_acc": steps_acc, "eps_255": eps * 255,
                        "alpha_255": eps / 4 * 255, "attack": "PGD, random start, same seed"},
        "gradients": gradients,
        "batch_checks": batch,
    }
    res["robust_acc"] = min(worst["robust_acc"], batch["worst_over_protocols"]) if batch else worst["robust_acc"]
    res["flags"] = _flags(res)
    res["verdict"] = "SUSPECT" if res["flags"] else "PASS"
    res["seconds"] = runner.seconds_before + elapsed()
    res["resumed_attacks"] = runner.resumed
    res.update(metadata or {})
    res["generated"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if out_dir is not None:
        write_suite_report(res, out_dir)
    runner.finish()
    return res


def _digest(*objs: nn.Module | Tensor) -> str:
    """SHA-256 of tensors' values (a module: its state dict, in order), to recognise a resumed suite."""
    h = hashlib.sha256()
    for obj in objs:
        tensors = obj.state_dict().items() if isinstance(obj, nn.Module) else [("", obj)]
        for k, t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- reporting


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _curve_png(xs: list[float], ys: list[float], path: Path, xlabel: str, title: str, *,
               mark: float | None = None) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    pos = list(range(len(xs)))  # evenly spaced points, labelled with the values (eps and steps grow ~x2)
    ax.plot(pos, [100 * v for v in ys], "o-", color="tab:red")
    for a, b in zip(pos, ys):
        ax.annotate(_pct(b), (a, 100 * b), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    if mark is not None and mark in xs:
        ax.axvline(xs.index(mark), color="gray", ls=":", lw=1, label="evaluated eps")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(pos, [f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-3, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_suite_report(res: dict, out_dir: str | os.PathLike) -> None:
    """Write ``suite.json``, ``suite.md``, ``eps_curve.png`` and ``steps_curve.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "suite.json", res)
    ec, sc = res["eps_curve"], res["steps_curve"]
    _curve_png(ec["eps_255"], ec["robust_acc"], out / "eps_curve.png", "eps (/255)",
               f"PGD-{ec['steps']} robust accuracy vs eps (n={res['n_eval']})", mark=round(res["eps_255"], 6))
    _curve_png(sc["steps"], sc["robust_acc"], out / "steps_curve.png", "PGD steps",
               f"PGD robust accuracy vs steps, eps {res['eps_255']:g}/255 (n={res['n_eval']})")

    lines = [f"# Robustness checklist: {res.get('run') or res['model']}", "",
             f"Generated {res['generated']}; {res['n_eval']} samples of shape {tuple(res['input_shape'])}, "
             f"L-inf eps {res['eps_255']:g}/255, budget `{res['budget']}`, batch size {res['batch_size']}, seed "
             f"{res['seed']}, device {res['device']} ({res['threads']} threads), {res['seconds'] / 60:.1f} min.", ""]
    if res.get("is_abnn"):
        lines += [f"ABNN with substitute statistics `{res['substitute_stats']}`: white-box attacks differentiate "
                  "through target, substitute and statistics.", ""]
    lines += [f"## Verdict: **{res['verdict']}**", "",
              f"Clean accuracy **{_pct(res['clean_acc'])}%**; robust accuracy, per-sample worst case over all attacks"
              f"{' and evaluation protocols' if res.get('batch_checks') else ''}: **{_pct(res['robust_acc'])}%** "
              f"(measured with the paper's attack, PGD-5: {_pct(res['attacks']['pgd-5']['robust_acc'])}%).", ""]
    if res["flags"]:
        lines += ["Flags:", ""] + [f"- {f}" for f in res["flags"]] + [""]
    else:
        lines += ["No flag: the eps sweep reaches ~0%, robust accuracy never rises with eps or steps, no "
                  "gradient-free or transfer attack beats the white-box attacks, gradients are non-zero.", ""]
    lines += ["## Attacks", "", "| Attack | Kind | Settings | Robust accuracy (%) | Runtime |", "|---|---|---|---:|---:|"]
    for name, r in res["attacks"].items():
        lines.append(f"| {name} | {r['kind']} | `{r['settings']}` | {_pct(r['robust_acc'])} | {r['seconds']:.1f} s |")
    w = res["worst_case"]
    lines.append(f"| **worst case** | per sample | over every row above | **{_pct(w['robust_acc'])}** | |")
    lines += ["", f"Worst-case inputs re-evaluated in one pass (fully adversarial batches): {_pct(w['recheck_acc'])}%.",
              "Samples broken by one attack only: " + (", ".join(f"{k}: {v}" for k, v in w["broken_only_by"].items() if v)
                                                       or "none") + ".", ""]
    lines += ["## Sanity curves", "", "| eps (/255) | " + " | ".join(f"{e:g}" for e in ec["eps_255"]) + " |",
              "|---|" + "---:|" * len(ec["eps_255"]),
              f"| PGD-{ec['steps']} robust acc (%) | " + " | ".join(_pct(v) for v in ec["robust_acc"]) + " |", "",
              "| PGD steps | " + " | ".join(str(s) for s in sc["steps"]) + " |", "|---|" + "---:|" * len(sc["steps"]),
              f"| robust acc (%) at {res['eps_255']:g}/255 | " + " | ".join(_pct(v) for v in sc["robust_acc"]) + " |", "",
              "![eps curve](eps_curve.png) ![steps curve](steps_curve.png)", "",
              f"Input gradients exactly zero for {_pct(res['gradients']['zero_grad_frac'])}% of the correctly classified "
              f"samples; non-finite gradients: {'yes' if res['gradients']['nonfinite_grad'] else 'no'}.", ""]
    b = res.get("batch_checks")
    if b:
        lines += ["## Batch statistics (predictions depend on the batch)", "",
                  "| Protocol | Accuracy (%) |", "|---|---:|",
                  f"| clean, batches of {b['batch_size']} | {_pct(b['clean_acc_batch'])} |",
                  f"| clean, batch size 1 | {_pct(b['clean_acc_bs1'])} |",
                  f"| worst-case inputs, fully adversarial batches | {_pct(b['worst_inputs_in_adversarial_batches'])} |",
                  f"| worst-case inputs, batch size 1 | {_pct(b['worst_inputs_at_bs1'])} |",
                  f"| PGD + APGD-CE crafted and evaluated at batch size 1 | {_pct(b['bs1_robust_acc'])} |",
                  f"| crafted at batch size 1, evaluated in adversarial batches | {_pct(b['bs1_crafted_in_adversarial_batches'])} |",
                  f"| **worst case over protocols** | **{_pct(b['worst_over_protocols'])}** |", ""]
        if b["mixed"]:
            lines += [f"Mixed batches: {b['mixed_settings']}.", "",
                      "| k | clean samples | flips (transferred) | wrong (transferred) | flips (poison) | wrong (poison) |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for m in b["mixed"]:
                lines.append(f"| {m['k']} | {m['n_clean']} | {_pct(m['transferred_flip_rate'])}% | "
                             f"{_pct(m['transferred_broken_rate'])}% | {_pct(m['poison_flip_rate'])}% | "
                             f"{_pct(m['poison_broken_rate'])}% |")
            lines.append("")
    lines += ["## How to read this", "",
              "Robust accuracy counts a sample only if it is classified correctly clean and under attack. The "
              "checklist follows Carlini et al. 2019 (\"On evaluating adversarial robustness\"), Athalye et al. 2018 "
              "(obfuscated gradients) and Croce et al., ICML 2022 (\"Evaluating the adversarial robustness of adaptive "
              "test-time defenses\"): an honest evaluation reaches ~0% at a large eps, does not get weaker with more "
              "steps, and its white-box attacks are at least as strong as gradient-free and transfer attacks. A flag "
              "means the number above may overstate robustness; it makes the verdict SUSPECT. The AutoAttack row is "
              "derived (per-sample worst case of the standalone APGD-CE, APGD-T, APGD-DLR and Square runs, APGD-DLR "
              "standing in for FAB-T).", "", "Full machine-readable results: `suite.json`.", ""]
    (out / "suite.md").write_text("\n".join(lines))


def run_suite_on_run(run_dir: str | os.PathLike, *, n_eval: int = 1000, batch_size: int = 256,
                     data_root: str | None = None, device: str = "cpu", seed: int = 0, eps: float | None = None,
                     out_dir: str | os.PathLike | None = None, quick: bool = False,
                     budget: str | Mapping[str, Any] | None = None,
                     source_models: Mapping[str, nn.Module | str | os.PathLike] | None = None,
                     progress: bool = True, resume: bool = True) -> dict:
    """:func:`run_suite` on a finished run: loads it with :func:`abnn.runs.load_run`, evaluates
    the first ``n_eval`` test images of its dataset and writes into ``run_dir/suite/`` (or
    ``out_dir``).  ``eps`` defaults to 8/255 for images and 1/255 for clips (``METHOD.md`` s. 4).
    ``source_models`` values may be modules or run folders (loaded the same way).  With ``resume``
    (default), finished attacks are kept in ``<out>/suite-progress.pt`` as the suite goes, and an
    interrupted suite continues from there when run again with the same settings."""
    model, cfg = load_run(run_dir, device=device)
    data = _as_tensors(load_dataset(cfg.dataset, "test", data_root or cfg.data_root).subset(n_eval), n_eval)
    if eps is None:
        eps = 1 / 255 if data[0].dim() == 5 else 8 / 255
    sources: dict[str, nn.Module] = {}
    for name, src in (source_models or {}).items():
        sources[name] = src if isinstance(src, nn.Module) else load_run(src, device=device)[0]
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "suite"
    if not resume:
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    meta = {"run": str(run_dir), "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width,
            "sources": {k: (type(v).__name__ if isinstance(v, nn.Module) else str(v))
                        for k, v in (source_models or {}).items()}}
    return run_suite(model, data, eps=eps, n_eval=n_eval, batch_size=batch_size, device=device, seed=seed,
                     out_dir=out, quick=quick, budget=budget, source_models=sources, progress=progress,
                     progress_file=out / PROGRESS_FILE if resume else None, metadata=meta)
