"""AutoAttack-style ensemble, L-inf (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020).

The attacks run one after the other; each later attack only runs on the samples that are still
correctly classified, and the returned point of a sample is the one of the first attack that
fooled it (sample-wise worst case over the ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Attack, AttackOptionError, check_budget, check_choice, check_count
from .registry import build_attack

__all__ = ["AutoAttack"]

#: the component attacks, by their registry names
ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "square")
MIN_CLASSES = {"apgd-ce": 2, "apgd-t": 4, "apgd-dlr": 3, "square": 2}


class AutoAttack(Attack):
    """Sequential ensemble of APGD-CE, APGD-T, APGD-DLR and Square (Croce & Hein, ICML 2020).

    **Substitution:** the original standard ensemble is APGD-CE, APGD-T, FAB-T and Square.
    FAB-T (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast
    adaptive boundary attack") is *not* implemented; its slot is taken by untargeted APGD with the
    DLR loss (``"apgd-dlr"``), a second scale-invariant, white-box attack.  FAB-T rarely changes
    the standard AutoAttack number, but results are therefore "AutoAttack-style", not identical
    to the reference implementation.

    Versions:
        ``"standard"``: APGD-CE (1 restart), APGD-T (9 target classes, 1 restart), APGD-DLR
        (1 restart, in FAB-T's place), Square (``queries`` = 5000, 1 restart, p_init 0.8, the
        paper's schedule of p without rescaling, as the reference AutoAttack);
        ``"plus"``: APGD-CE (5 restarts), APGD-DLR (5 restarts), Square (5 restarts), APGD-T
        (all K - 1 target classes, 1 restart).
    APGD runs ``steps`` = 100 iterations.  ``attacks`` picks a subset/order of
    ``("apgd-ce", "apgd-t", "apgd-dlr", "square")``.  An attack whose loss needs more classes
    than the model has (APGD-T: 4, APGD-DLR: 3) is skipped and listed in ``last_report``.

    After a call, ``last_report`` holds (fractions of the batch)::

        {"clean": clean accuracy,
         "apgd-ce": robust accuracy after APGD-CE, ... (cumulative, in running order),
         "final": accuracy on the returned batch in one forward pass,
         "n": batch size, "skipped": [names]}

    The per-attack numbers come from forward passes on the sub-batch each attack ran on; "final"
    re-evaluates the whole returned batch, which only differs for batch-dependent models (e.g.
    batch statistics at test time) — report "final" for those, and also evaluate at batch size 1.
    ``last_robust_after`` holds the same per sample: component name -> (B,) bool, robust after
    that component and every one before it (the runner makes rows of them).

    Args:
        model: maps [0, 1] inputs (images or clips) to logits (B, K).
        eps: L-inf radius.
        version: ``"standard"`` or ``"plus"``.
        steps: APGD iterations.
        queries: Square's query budget.
        attacks: override of the attack list (names above), in running order.
        n_target_classes: APGD-T's target classes (default: 9 for ``standard``, all K - 1 for
            ``plus``).
        seed, channels_last, amp: passed to every component (see :class:`~abnn.attacks.base.Attack`).

    The official implementation (with FAB-T) is :class:`~abnn.attacks.OfficialAutoAttack`.

    Example::

        aa = AutoAttack(model, eps=8/255)
        x_adv = aa(x, y); print(aa.last_report)
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, version: str = "standard", steps: int = 100,
                 queries: int = 5000, attacks: Sequence[str] | None = None, n_target_classes: int | None = None,
                 seed: int | None = None, channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = check_budget("eps", eps)
        self.version = check_choice("version", version, ("standard", "plus"))
        self.steps = check_count("steps", steps, minimum=1)
        self.queries = check_count("queries", queries, minimum=1)
        default = ATTACKS if version == "standard" else ("apgd-ce", "apgd-dlr", "square", "apgd-t")
        names = tuple(default if attacks is None else attacks)
        bad = [a for a in names if a not in ATTACKS]
        if bad or not names or len(set(names)) != len(names):
            raise AttackOptionError(f"attacks must be distinct names from {ATTACKS}, got {list(names)}")
        self.attacks = names
        if n_target_classes is not None:
            n_target_classes = check_count("n_target_classes", n_target_classes, minimum=1)
        self.n_target_classes = n_target_classes
        self.last_report: dict[str, Any] = {}
        self.last_robust_after: dict[str, Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in super().settings().items() if k not in ("last_report", "last_robust_after")}

    def component_options(self, name: str) -> dict[str, Any]:
        """The options of component ``name`` in this ensemble (the suite runs the same settings)."""
        plus = self.version == "plus"
        restarts = 5 if plus else 1
        if name in ("apgd-ce", "apgd-dlr"):
            return {"eps": self.eps, "steps": self.steps, "restarts": restarts}
        if name == "apgd-t":
            targets = self.n_target_classes if self.n_target_classes is not None else (None if plus else 9)
            return {"eps": self.eps, "steps": self.steps, "n_target_classes": targets, "restarts": 1}
        if name == "square":
            return {"eps": self.eps, "queries": self.queries, "p_init": 0.8, "restarts": restarts,
                    "rescale_schedule": False}
        raise AttackOptionError(f"unknown attack {name!r}; choose from {ATTACKS}")

    def component(self, name: str) -> Attack:
        """The configured component attack ``name`` (one of ``ATTACKS``), built by the registry."""
        return build_attack(name, self.model, **self.component_options(name), seed=self.seed,
                                channels_last=self.channels_last, amp=self.amp)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        with torch.no_grad():
            logits = self.model(x)
        k = logits.shape[1]
        robust = logits.argmax(1) == y
        x_out = x.clone()
        report: dict[str, Any] = {"clean": robust.float().mean().item()}
        skipped: list[str] = []
        robust_after: dict[str, Tensor] = {}
        for name in self.attacks:
            if k < MIN_CLASSES[name]:
                skipped.append(name)
                continue
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                xa = self.component(name)(x[idx], y[idx])
                with torch.no_grad():
                    fooled = self.model(xa).argmax(1) != y[idx]
                x_out[idx] = torch.where(fooled.view((-1,) + (1,) * (x.dim() - 1)), xa, x_out[idx])
                robust[idx] = ~fooled
            report[name] = robust.float().mean().item()
            robust_after[name] = robust.clone()
        with torch.no_grad():
            report["final"] = (self.model(x_out).argmax(1) == y).float().mean().item()
        report["n"] = b
        report["skipped"] = skipped
        self.last_report, self.last_robust_after = report, robust_after
        return x_out
