"""The authors' AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020), behind the Attack contract.

The ``standard`` version runs APGD-CE, APGD-T, FAB-T and Square, each on the samples the earlier
ones left, with the authors' code: the number reviewers expect, not a re-implementation of it.
The code comes from the optional package ``pyautoattack`` (``pip install -e '.[autoattack]'``;
import name ``pyautoattack``), or from the authors' repository installed as ``autoattack``
(``pip install git+https://github.com/fra31/auto-attack``); both are found.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import torch
from torch import Tensor, nn

from ..errors import AbnnError
from .base import Attack, InvalidInputError, check_budget, check_choice

__all__ = ["MissingPackageError", "OfficialAutoAttack", "import_official_autoattack"]

INSTALL = "pip install -e '.[autoattack]' (the pyautoattack package; add --no-deps if its pins conflict)"


class MissingPackageError(AbnnError, ImportError):
    """An optional package needed by the requested feature is not installed."""


def import_official_autoattack() -> ModuleType:
    """The module that holds the authors' ``AutoAttack`` class (``pyautoattack`` or ``autoattack``)."""
    errors = []
    for name in ("pyautoattack", "autoattack"):
        try:
            module = __import__(name)
        except ImportError as exc:  # the package, or one of its imports
            errors.append(f"{name}: {exc}")
            continue
        if hasattr(module, "AutoAttack"):
            return module
        errors.append(f"{name}: has no AutoAttack")
    raise MissingPackageError(f"the official AutoAttack is not installed ({'; '.join(errors)}); install it with {INSTALL}")


class OfficialAutoAttack(Attack):
    """The reference AutoAttack, L-inf, as one attack: images (B, C, H, W) only.

    Each call runs the authors' ``run_standard_evaluation`` on the batch (its own checks and
    warnings, which it logs to the ``auto-attack`` logger).  The authors' attacks
    seed the global torch RNG with ``seed`` (``None``: the time, as in their code).

    Args:
        model: maps [0, 1] images to logits (B, K).
        eps: L-inf radius, a fraction of the pixel range.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"plus"``.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, version: str = "standard",
                 seed: int | None = None, channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = check_budget("eps", eps)
        self.version = check_choice("version", version, ("standard", "plus"))
        module = import_official_autoattack()
        self.package = f"{module.__name__} {getattr(module, '__version__', '')}".strip()
        self._module = module

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() != 4:
            raise InvalidInputError(f"the official AutoAttack takes images (B, C, H, W), got {tuple(x.shape)}")
        cls = self._module.AutoAttack
        quiet = {"verbose": False} if "verbose" in inspect.signature(cls).parameters else {}
        aa = cls(self.model, norm="Linf", eps=self.eps, version=self.version, seed=self.seed, device=x.device, **quiet)
        aa.verbose = False
        params = inspect.signature(aa.run_standard_evaluation).parameters
        size = {"batch_size": len(x)} if "batch_size" in params else {"bs": len(x)}
        # the authors' code reshapes gradients with .view: it needs the default layout, not the
        # channels-last one our attacks use on the CPU (the result goes back to x's layout)
        out = aa.run_standard_evaluation(x.contiguous(), y, **size)
        return (out[0] if isinstance(out, tuple) else out).to(x.dtype)
