"""The checks of the robustness checklist: signs of gradient masking and of batch dependence.

Carlini et al. 2019 ("On evaluating adversarial robustness"), Athalye, Carlini & Wagner
(ICML 2018, "Obfuscated gradients give a false sense of security") and Croce et al. (ICML 2022,
"Evaluating the adversarial robustness of adaptive test-time defenses"):

* robust accuracy vs eps must fall to about 0% at a large eps (64/255) and must not rise with
  eps or with PGD steps;
* per sample, no gradient-free or transfer attack may break a sample that every white-box
  attack leaves robust (AutoAttack flags the same for Square, ``checks.check_square_sr``);
* input gradients must not be exactly zero or non-finite;
* for ABNN with batch statistics: evaluation at batch size 1, in fully adversarial batches and
  in mixed batches (k adversarial samples among clean ones).

Each violation is a flag; any flag makes the verdict SUSPECT.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import BLACK_BOX, PGD, TRANSFER, WHITE_BOX, AttackSpec
from ..errors import AbnnError
from ..layers import AdaptiveBatchNorm
from .results import Curve, EvalResult, same_eps
from .runner import batches, derive_seed, predict, run_attacks, to_float

__all__ = ["PoisonPGD", "ZERO_GRAD_TOL", "ZERO_TOL", "batch_checks", "gradient_check", "masking_counts", "flags",
           "per_sample_statistics", "tolerance"]

#: a robust accuracy above this at the largest eps of the sweep is flagged (should be ~0%)
ZERO_TOL = 0.01
#: a sample whose whole input gradient is exactly zero; above this fraction of the correctly
#: classified samples, flagged (Athalye et al. 2018: shattered / vanishing gradients)
ZERO_GRAD_TOL = 0.10


def tolerance(n: int) -> float:
    """Noise tolerance of a comparison of two accuracies on ``n`` samples: one sample, at least
    half a point."""
    return max(0.005, 1.0 / max(n, 1)) + 1e-9


# ------------------------------------------------------------------------------- gradient masking


def masking_counts(ev: EvalResult, eps: float | None = None) -> dict[str, int]:
    """Per gradient-free or transfer attack at ``eps``: the samples it breaks that every white-box
    attack at ``eps`` leaves robust (0 for an honest evaluation)."""
    eps = ev.eps if eps is None else eps
    rows = [r for r in ev.attacks.values() if r.norm == "linf" and same_eps(r.eps, eps) and not r.derived_from]
    white = ev.clean_mask.clone()
    for r in rows:
        if r.kind == WHITE_BOX:
            white &= r.robust_mask
    return {r.label: int((white & ~r.robust_mask).sum()) for r in rows if r.kind in (BLACK_BOX, TRANSFER)}


def gradient_check(model: nn.Module, x: Tensor, y: Tensor, ok: Tensor, bs: int, device: torch.device) -> dict[str, Any]:
    """Fraction of correctly classified samples whose cross-entropy input gradient is exactly zero
    everywhere, and whether any gradient is non-finite."""
    zero = torch.zeros(len(x), dtype=torch.bool)
    nonfinite = False
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for s, xb, yb in batches(x, y, bs, device):
            xb.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), yb, reduction="sum"), xb)
            flat = g.flatten(1)
            nonfinite |= bool((~torch.isfinite(flat)).any())
            zero[s] = (flat == 0).all(1).cpu()
    n_ok = int(ok.sum())
    return {"zero_grad_frac": (zero & ok).sum().item() / n_ok if n_ok else 0.0, "nonfinite_grad": nonfinite}


def _rises(values: list[float], tol: float) -> list[tuple[int, int]]:
    """(i, j) pairs, j > i, where values[j] exceeds the minimum of values[:j] (at i) by > tol."""
    out = []
    for j in range(1, len(values)):
        i = min(range(j), key=lambda t: values[t])
        if values[j] > values[i] + tol:
            out.append((i, j))
    return out


def flags(*, n: int, eps_curve: Curve, steps_curve: Curve, masking: dict[str, int], kinds: dict[str, str],
          gradients: dict[str, Any], batch: dict[str, Any] | None, worst_acc: float) -> list[str]:
    """Every check that fails, as one line each (see the module docstring)."""
    out, tol = [], tolerance(n)
    ec, sc = eps_curve, steps_curve
    if ec.robust_acc:
        acc_max, e_max = ec.robust_acc[-1], ec.xs[-1]
        if acc_max > ZERO_TOL:
            out.append(f"possible gradient masking: robust accuracy is {100 * acc_max:.1f}% at eps {e_max:g}/255 "
                       f"with PGD-{ec.settings['steps']} (an attack this large must reach ~0%)")
        for i, j in _rises(ec.robust_acc, tol):
            out.append(f"possible gradient masking: robust accuracy rises with eps, {100 * ec.robust_acc[i]:.1f}% "
                       f"at {ec.xs[i]:g}/255 -> {100 * ec.robust_acc[j]:.1f}% at {ec.xs[j]:g}/255")
    for i, j in _rises(sc.robust_acc, tol):
        out.append(f"possible gradient masking: robust accuracy rises with PGD steps, {100 * sc.robust_acc[i]:.1f}% "
                   f"at {sc.xs[i]} steps -> {100 * sc.robust_acc[j]:.1f}% at {sc.xs[j]} steps")
    for label, count in masking.items():
        if count:
            what = "gradient-free" if kinds[label] == BLACK_BOX else "transfer attack"
            out.append(f"possible gradient masking: {what} {label} breaks {count} of {n} samples "
                       f"({100 * count / n:.1f}%) that every white-box gradient attack leaves robust")
    if gradients["zero_grad_frac"] > ZERO_GRAD_TOL:
        out.append(f"possible gradient masking: the input gradient of the loss is exactly zero for "
                   f"{100 * gradients['zero_grad_frac']:.1f}% of the correctly classified samples")
    if gradients["nonfinite_grad"]:
        out.append("possible gradient masking: the input gradient of the loss has NaN or inf entries")
    if batch:
        if batch["worst_over_protocols"] < worst_acc - tol:
            out.append(f"batch dependence: the worst case over evaluation protocols (batch size 1, fully adversarial "
                       f"batches) is {100 * batch['worst_over_protocols']:.1f}%, below the {100 * worst_acc:.1f}% of "
                       f"the batched evaluation (batch size 1: {100 * batch['bs1_robust_acc']:.1f}%)")
        for m in batch["mixed"]:
            for key in ("poison", "transferred"):
                if m[f"{key}_flip_rate"] > tol:
                    out.append(f"batch dependence: {m['k']} adversarial samples ({key}) in a batch of "
                               f"{batch['batch_size']} flip {100 * m[f'{key}_flip_rate']:.1f}% of the clean "
                               f"predictions ({100 * m[f'{key}_broken_rate']:.1f}% become wrong)")
    return out


# ---------------------------------------------------------------------------------- batch checks


@contextlib.contextmanager
def per_sample_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, an ABNN with ``substitute_stats="batch"`` behaves exactly as at batch
    size 1: in eval mode the only batch-dependent quantity is the substitute's batch moment, and
    over a batch of one it *is* the per-sample moment.  So evaluating (and attacking) in
    ``"sample"`` mode is evaluation at batch size 1, vectorised.  (:func:`batch_checks` checks
    the equivalence on a few samples with a real batch-size-1 loop.)"""
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


class PoisonPGD(PGD):
    """PGD on the first ``k`` samples of a batch only (:meth:`region`), ascending the
    cross-entropy of the other samples' labels (:meth:`objective`; the check passes their clean
    predictions): an attacker who controls k samples of a batch-statistics batch.  Returns the
    last iterate."""

    def __init__(self, model: nn.Module, *, k: int, **options: Any) -> None:
        super().__init__(model, first_fooling=False, **options)
        self.k = k

    def region(self, x: Tensor, y: Tensor) -> Tensor:
        return (torch.arange(len(x), device=x.device) < self.k).view((-1,) + (1,) * (x.dim() - 1))

    def objective(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return self.loss(logits[self.k:], y[self.k:]), logits


def batch_checks(model: nn.Module, x: Tensor, y: Tensor, ev: EvalResult, *, eps: float, budget: dict[str, Any],
                 alphas: dict[str, float], seed: int, device: torch.device, progress: bool) -> dict[str, Any]:
    """Batch-size-1, fully adversarial and mixed-batch evaluation of a batch-statistics model
    (``ev``: the batched evaluation, with its worst-case inputs; ``alphas``: PGD step sizes of the
    batch-size-1 attack, ``"bs1"``, and of the poisoning attack, ``"mixed"``)."""
    bs = ev.batch_size
    out: dict[str, Any] = {"batch_size": bs}
    t0 = time.perf_counter()
    _check_bs1_equivalence(model, x, device)
    with per_sample_statistics(model):
        bs1_ok = predict(model, x, bs, device) == y
    clean_ok = ev.clean_mask
    out["clean_acc_batch"] = clean_ok.float().mean().item()
    out["clean_acc_bs1"] = bs1_ok.float().mean().item()

    # 1. the batch-crafted worst case, evaluated at batch size 1 and in fully adversarial batches
    with per_sample_statistics(model):
        worst_bs1 = predict(model, ev.x_worst, bs, device) == y
    worst_batch = predict(model, ev.x_worst, bs, device) == y
    out["worst_inputs_in_adversarial_batches"] = (clean_ok & worst_batch).float().mean().item()
    out["worst_inputs_at_bs1"] = (bs1_ok & worst_bs1).float().mean().item()

    # 2. attacks crafted at batch size 1 (vectorised through per-sample statistics), by the runner
    steps = budget["bs1_steps"]
    specs = [AttackSpec("pgd", {"eps": eps, "alpha": alphas["bs1"], "steps": steps}, label="bs1-pgd"),
             AttackSpec("apgd-ce", {"eps": eps, "steps": steps}, label="bs1-apgd-ce")]
    with per_sample_statistics(model):
        bs1 = run_attacks(model, (x, y), specs, eps=eps, batch_size=bs, device=device, seed=seed, progress=progress,
                          keep_worst_inputs=True)
    robust_bs1 = bs1.worst_case().robust_mask
    robust_bs1_in_batch = clean_ok & (predict(model, bs1.x_worst, bs, device) == y)
    out["bs1_attacks"] = {k: r.settings for k, r in bs1.attacks.items()}
    out["bs1_robust_acc"] = robust_bs1.float().mean().item()
    out["bs1_crafted_in_adversarial_batches"] = robust_bs1_in_batch.float().mean().item()
    worst = ev.worst_case().robust_mask & (bs1_ok & worst_bs1) & robust_bs1 & robust_bs1_in_batch
    out["worst_over_protocols"] = worst.float().mean().item()
    out["mixed"], out["mixed_settings"] = _mixed_batches(model, x, y, ev, eps=eps, alpha=alphas["mixed"],
                                                         budget=budget, seed=seed, device=device)
    out["seconds"] = time.perf_counter() - t0
    return out


def _check_bs1_equivalence(model: nn.Module, x: Tensor, device: torch.device) -> None:
    """The batch-size-1 equivalence of :func:`per_sample_statistics`, on a few samples with a real loop."""
    xs = to_float(x[:min(4, len(x))], device)
    with torch.no_grad():
        loop = torch.cat([model(xs[i:i + 1]) for i in range(len(xs))])
        with per_sample_statistics(model):
            vec = model(xs)
    if not torch.allclose(loop, vec, rtol=1e-4, atol=1e-4):
        raise AbnnError("batch-size-1 evaluation and per-sample statistics disagree; the model has another "
                        "batch dependence than the substitute moments")


def _mixed_batches(model: nn.Module, x: Tensor, y: Tensor, ev: EvalResult, *, eps: float, alpha: float,
                   budget: dict[str, Any], seed: int, device: torch.device) -> tuple[list[dict[str, Any]], str]:
    """k adversarial samples among clean ones: how many clean predictions flip."""
    bs, n = ev.batch_size, len(x)
    clean_pred = predict(model, x, bs, device)
    steps = budget["mixed_steps"]
    mixed = []
    for k in budget["mixed_k"]:
        if k >= min(bs, n):
            continue
        counts = {"transferred": [0, 0], "poison": [0, 0]}  # flips, correct->wrong
        n_clean = 0
        for s, xb, yb in batches(x, y, bs, device):
            if len(xb) <= k:
                continue
            ref = clean_pred[s].to(device)
            ok_ref = (ref == yb)[k:]
            n_clean += len(xb) - k
            x_tr = torch.cat([ev.x_worst[s][:k].to(device), xb[k:]])
            poison = PoisonPGD(model, k=k, eps=eps, alpha=alpha, steps=steps,
                               seed=derive_seed(seed, f"mixed-batches/k={k}/from={s.start}"))
            x_po = poison(xb, ref)
            with torch.no_grad():
                for key, xm in (("transferred", x_tr), ("poison", x_po)):
                    p = model(xm).argmax(1)[k:]
                    counts[key][0] += int((p != ref[k:]).sum())
                    counts[key][1] += int((ok_ref & (p != yb[k:])).sum())
        if n_clean:
            mixed.append({"k": k, "n_clean": n_clean,
                          **{f"{key}_flip_rate": c[0] / n_clean for key, c in counts.items()},
                          **{f"{key}_broken_rate": c[1] / n_clean for key, c in counts.items()}})
    settings = (f"first k samples of each batch of {bs} replaced by (transferred) their worst-case adversarial "
                f"example, or (poison) PGD-{steps} (alpha {alpha * 255:.2g}/255) on those k maximising the "
                "cross-entropy of the other samples' clean predictions")
    return mixed, settings
