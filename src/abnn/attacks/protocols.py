"""Weaker threat models for ABNN (forensics, issue 19): attacks whose gradient skips part of the
framework, scored on the unmodified model.

The paper's s. 3.1 explains ABNN's PGD robustness by "the substitute model's BN statistics are
relatively unaffected even under white-box attacks, since the adversary focuses more on the
target model": an attacker whose gradient does not go (fully) through the substitute.  Each
protocol of :data:`abnn.framework.PROTOCOLS` names one such attacker; :class:`ProtocolAttack`
crafts with a registry attack (PGD by default) on a :class:`~abnn.framework.ProtocolView` of the
model, and returns ``x_adv``.  The runner scores ``x_adv`` on the model it was given, in eval
mode, with the full forward: a protocol can only make an attack weaker, never a number
optimistic for the attacker.  These are diagnostics of *where* robustness comes from, labelled
``weaker threat model``, never white-box evaluations.

    x_adv = ProtocolAttack(abnn, protocol="target-only", steps=20)(x, y)
    build_attack("pgd-target-only", abnn, steps=20)          # the same, from the registry
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..framework import ABNN, PROTOCOLS, ProtocolView
from .base import Attack, AttackOptionError, UnsupportedModelError
from .registry import PROTOCOL, build_attack, get_entry

__all__ = ["ProtocolAttack"]


class ProtocolAttack(Attack):
    """A registry attack crafted through a gradient protocol, returned for scoring on the model.

    Args:
        model: an :class:`~abnn.framework.ABNN` (images or clips); anything else is refused with
            an :class:`~abnn.attacks.UnsupportedModelError`.
        protocol: a name of :data:`abnn.framework.PROTOCOLS`: ``target-only`` (mu_s, sigma_s,
            gamma_s, beta_s detached), ``no-encoder-grad`` (gamma_s, beta_s detached),
            ``no-stats-grad`` (mu_s, sigma_s detached), ``clean-substitute`` (the substitute sees
            the clean image), ``train-bn`` (the target's BatchNorm on the attacked batch's
            statistics while crafting), ``typeA-detach`` (the substitute's type-A shortcuts
            detached, as in the authors' code; refused for a substitute without them).
        attack: the inner registry attack (default ``pgd``); its options pass through
            (``steps=20``, ``eps=...``); its defaults are those for clips when the model takes clips.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`; passed to the inner attack.

    For ``clean-substitute`` and ``train-bn`` the crafting forward differs from the model's, so
    PGD's per-sample "first fooling iterate" is chosen on the crafting forward; the returned
    point is still scored on the model.  ``clean-substitute`` needs ``restarts=1``.
    """

    def __init__(self, model: nn.Module, *, protocol: str, attack: str = "pgd", seed: int | None = None,
                 channels_last: bool | None = None, amp: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        if protocol not in PROTOCOLS:
            raise AttackOptionError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not isinstance(model, ABNN):
            raise UnsupportedModelError(f"protocol {protocol} needs an ABNN model (it cuts gradients inside the "
                                        f"framework); got {type(model).__name__}")
        if PROTOCOLS[protocol].detach_type_a and not model.type_a_shortcuts():
            raise UnsupportedModelError(f"protocol typeA-detach needs a substitute with type-A zero-pad shortcuts "
                                        f"(e.g. resnet20, r3d_18_authors); {type(model.substitute).__name__} has none")
        entry = get_entry(attack)
        if entry.inner or entry.kind == PROTOCOL:
            raise AttackOptionError(f"the inner attack of a protocol must be a plain attack, not {attack!r}")
        self.protocol = protocol
        self.attack = attack
        self.view = ProtocolView(model, protocol)
        video = len(model.input_shape) == 4
        self.inner = build_attack(attack, self.view, video=video, seed=seed, channels_last=channels_last, amp=amp,
                                  **options)
        if PROTOCOLS[protocol].clean_substitute and getattr(self.inner, "restarts", 1) != 1:
            raise AttackOptionError("protocol clean-substitute runs with restarts=1 (a restart attacks a subset "
                                    "of the batch, whose clean images the substitute must see)")

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self.view.clean = x
        try:
            return self.inner(x, y)
        finally:
            self.view.clean = None

    def settings(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "attack": self.attack, **self.inner.settings()}
