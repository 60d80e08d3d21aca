"""Cross-check of our PGD against an independent implementation (torchattacks).

An attack implementation that is silently weaker than the reference inflates every robustness
number built on it (Carlini et al. 2019, "On evaluating adversarial robustness", s. 3: use
existing, well-tested implementations as a check).  Without random start both implementations
are deterministic and should give nearly identical adversarial accuracy on the same images; they
can differ in float details only: ours sums the cross-entropy over the batch, torchattacks
averages it (the same sign, except where the mean's 1/B scaling rounds a tiny gradient entry to
zero).

``torchattacks`` is optional: ``pip install --no-deps torchattacks`` (its pins on older packages
are not needed; it imports scipy and requests at import time).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import build_attack

__all__ = ["crosscheck_torchattacks"]


def _import_torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # the package or one of its import-time dependencies (scipy, requests)
        raise ImportError(
            f"crosscheck_torchattacks needs the optional package torchattacks, which cannot be imported "
            f"({type(exc).__name__}: {exc}). Install it with `pip install --no-deps torchattacks` (plus scipy and "
            "requests if they are missing)"
        ) from exc
    return torchattacks


def crosscheck_torchattacks(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, alpha: float = 2 / 255,
                            steps: int = 10, batch_size: int = 250, device: torch.device | str | None = None) -> dict:
    """Our :class:`~abnn.attacks.PGD` (``random_start=False``, the last iterate as torchattacks
    returns it: ``first_fooling=False``) vs ``torchattacks.PGD(random_start=False)`` with the same
    eps, alpha and steps on the same images, in the same batches.

    Args:
        model: maps [0, 1] inputs to logits (put in eval mode; its mode is restored).
        x, y: images in [0, 1] (float or uint8) and labels.
        eps, alpha, steps: PGD settings shared by both.
        batch_size: both attacks see the same batches (torchattacks averages its loss per batch).
        device: where to run (default: the model's device).

    Returns:
        ``{"ours_acc", "torchattacks_acc", "difference" (ours - torchattacks, accuracy fraction),
        "clean_acc", "prediction_agreement" (fraction of samples with the same adversarial
        prediction), "max_abs_input_diff", "n", settings, runtimes, "torchattacks_version"}``;
        accuracies are plain accuracies on the adversarial images.

    Raises:
        ImportError: torchattacks cannot be imported (with how to install it).
    """
    ta = _import_torchattacks()
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    ours = build_attack("pgd", model, eps=eps, alpha=alpha, steps=steps, random_start=False, first_fooling=False)
    theirs = ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    if hasattr(theirs, "set_device"):
        theirs.set_device(device)
    n = len(x)
    clean = ok_ours = ok_theirs = agree = 0
    max_diff = 0.0
    t_ours = t_theirs = 0.0
    try:
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device)
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
            yb = y[i:i + batch_size].to(device).long()
            t0 = time.perf_counter()
            xa = ours(xb, yb)
            t1 = time.perf_counter()
            xt = theirs(xb, yb).to(device)
            t2 = time.perf_counter()
            t_ours += t1 - t0
            t_theirs += t2 - t1
            model.eval()
            with torch.no_grad():
                p_clean = model(xb).argmax(1)
                p_ours = model(xa).argmax(1)
                p_theirs = model(xt).argmax(1)
            clean += int((p_clean == yb).sum())
            ok_ours += int((p_ours == yb).sum())
            ok_theirs += int((p_theirs == yb).sum())
            agree += int((p_ours == p_theirs).sum())
            max_diff = max(max_diff, (xa - xt).abs().max().item())
    finally:
        model.train(was_training)
    return {
        "n": n,
        "clean_acc": clean / n,
        "ours_acc": ok_ours / n,
        "torchattacks_acc": ok_theirs / n,
        "difference": (ok_ours - ok_theirs) / n,
        "prediction_agreement": agree / n,
        "max_abs_input_diff": max_diff,
        "eps": eps, "alpha": alpha, "steps": steps, "random_start": False, "batch_size": batch_size,
        "seconds_ours": t_ours, "seconds_torchattacks": t_theirs,
        "torchattacks_version": getattr(ta, "__version__", "unknown"),
    }
