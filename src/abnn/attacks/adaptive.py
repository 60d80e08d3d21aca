"""Attacks aimed at ABNN itself (adaptive attacks), and transfer attacks.

A defense that adds networks at test time must be attacked where it is special, not only with
off-the-shelf losses (Croce et al., ICML 2022, "Evaluating the adversarial robustness of adaptive
test-time defenses"; Athalye, Carlini & Wagner, ICML 2018, "Obfuscated gradients give a false
sense of security"; Carlini et al. 2019, "On evaluating adversarial robustness"):

* :class:`StatisticsAttack`: PGD on cross-entropy **plus** a term that drives the frozen
  substitute's statistics (its moments ``mu(z_s)``, ``sigma(z_s)`` and the AdaIN encoder outputs
  ``gamma_s``, ``beta_s``) away from their clean values, so the adaptive layers re-normalise the
  target with statistics of the attacker's choosing.
* :class:`Transfer`: crafts the example on another model (an undefended network, or the ABNN
  target with its adaptive layers replaced by plain BatchNorm, :func:`abnn.framework.replace_adaptive_with_bn`)
  and hands it to the model under evaluation.  A transfer attack that beats the white-box attacks
  is a symptom of gradient masking (Athalye et al. 2018, s. 3; Carlini et al. 2019, s. 4).

Both follow the :class:`~abnn.attacks.base.Attack` contract (inputs in [0, 1], never mutated,
eval mode during the attack, seeded randomness) and are shape-agnostic (images or clips).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import Attack, AttackOptionError, UnsupportedModelError
from .pgd import PGD
from .registry import build_attack

__all__ = ["StatisticsAttack", "Transfer"]


def _check_abnn(model: nn.Module) -> None:
    for attr in ("substitute_features", "adaptive", "target_stages", "substitute_stats"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(f"StatisticsAttack needs an ABNN model (with .{attr}); got "
                                        f"{type(model).__name__}. For a model without adaptive layers use PGD")


class StatisticsAttack(PGD):
    """L-inf PGD on ``CE + weight * D``, where ``D`` measures how far the substitute's statistics
    at the adversarial input are from their clean values (an adaptive attack in the sense of
    Croce et al., ICML 2022 and Athalye et al., ICML 2018)::

        D(x') = sum over taps l of  ||mu_l(x') - mu_l(x)||^2 + ||sigma_l(x') - sigma_l(x)||^2
                                  + ||gamma_l(x') - gamma_l(x)||^2 + ||beta_l(x') - beta_l(x)||^2

    ``mu, sigma`` are :func:`abnn.layers.substitute_moments` of the substitute feature ``z_s`` at
    tap ``l`` with the model's ``substitute_stats`` (and the layer's eps); ``gamma, beta`` are the
    outputs of that tap's AdaIN encoder, ``model.adaptive[name].encoder(z_s)``.  Squared
    differences are summed over the batch (like the cross-entropy of the contract), so per-sample
    gradients are not scaled by the batch size.  The clean values are computed once, without
    gradient.  The adversarial values are read from the very forward pass that gives the logits
    (forward hooks on the encoders capture ``z_s`` and ``(gamma, beta)``), so one step costs one
    forward and one backward pass of the framework; the gradient flows through target, substitute
    and statistics alike.

    It is :class:`~abnn.attacks.PGD` (one restart, first fooling iterate) with this objective
    (:meth:`objective`): ``weight = 0`` is plain PGD; a large weight makes it a pure statistics
    attack.  Returns, per sample, the first iterate that was misclassified (the combined loss need
    not keep a sample misclassified), else the last iterate.

    Args:
        model: an :class:`~abnn.framework.ABNN`.
        eps: L-inf radius (8/255 for images, 1/255 for video).
        alpha: step size.
        steps: iterations.
        weight: weight of the statistics term ``D``.
        random_start: start from a uniform point in the eps-ball.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.

    Example::

        x_adv = StatisticsAttack(abnn, eps=8/255, steps=50, weight=1.0)(x, y)
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 50,
                 weight: float = 1.0, random_start: bool = True, seed: int | None = None,
                 channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        _check_abnn(model)
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed,
                         channels_last=channels_last, amp=amp)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise AttackOptionError(f"weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self._clean: list[list[Tensor]] | None = None  # the clean statistics of the batch under attack

    # the statistics ---------------------------------------------------------------------------
    def _layers(self) -> list[nn.Module]:
        return [self.model.adaptive[name.replace(".", "_")] for name in self.model.target_stages]

    def _stats(self, layer: nn.Module, z_s: Tensor, gamma: Tensor, beta: Tensor) -> list[Tensor]:
        mu, sigma = layer.moments(z_s)
        return [mu, sigma, gamma, beta]

    def clean_statistics(self, x: Tensor) -> list[list[Tensor]]:
        """Per tap: ``[mu, sigma, gamma, beta]`` of the clean input (detached)."""
        with torch.no_grad():
            feats = self.model.substitute_features(x)
            out = []
            for layer, z_s in zip(self._layers(), feats):
                gamma, beta = layer.encoder(z_s)
                out.append([t.detach() for t in self._stats(layer, z_s, gamma, beta)])
        return out

    def statistics_distance(self, adv: list[list[Tensor]], clean: list[list[Tensor]]) -> Tensor:
        """``D``: the summed squared differences over taps and statistics."""
        return sum(((a - c) ** 2).sum() for ta, tc in zip(adv, clean) for a, c in zip(ta, tc))

    def _forward_with_stats(self, x: Tensor) -> tuple[Tensor, list[list[Tensor]]]:
        layers = self._layers()
        captured: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

        def hook(i: int) -> Callable[..., None]:
            def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
                captured[i] = (inputs[0], output[0], output[1])
            return fn

        handles = [layer.encoder.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(layers):
            raise RuntimeError(f"only {len(captured)} of {len(layers)} adaptive encoders ran in the forward pass")
        stats = [self._stats(layer, *captured[i]) for i, layer in enumerate(layers)]
        return logits, stats

    # the attack: PGD on this objective --------------------------------------------------------
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self._clean = self.clean_statistics(x) if self.weight > 0 else None
        try:
            return super().perturb(x, y)
        finally:
            self._clean = None

    def objective(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``CE + weight * D`` at ``x`` and the logits, from one forward pass of the framework."""
        if self._clean is None:
            return super().objective(x, y)
        logits, stats = self._forward_with_stats(x)
        return self.loss(logits, y) + self.weight * self.statistics_distance(stats, self._clean), logits


class Transfer(Attack):
    """Transfer attack: craft the adversarial example on ``source`` and evaluate it on ``model``.

    ``source`` is any model on [0, 1] inputs with the same classes, e.g. an undefended network
    trained on the same data, or ``abnn.framework.replace_adaptive_with_bn(abnn)`` (the ABNN target
    without its adaptive layers).  Transfer attacks are a check on the white-box evaluation: if
    one is stronger than every white-box attack, the white-box gradients are obfuscated
    (Athalye et al., ICML 2018; Carlini et al. 2019, s. 4; Croce et al., ICML 2022).

    Args:
        model: the model under evaluation (only put in eval mode; never queried while crafting).
        source: the model whose gradients craft the example.
        attack: the name of a registered attack (default ``"pgd"``, with the registry's defaults:
            ``abnn evaluate --list-attacks``), or a callable ``factory(source) -> Attack``.
        **attack_kwargs: options of the named attack (``eps``, ``steps``, ``alpha``, ...), built on
            ``source`` by :func:`abnn.attacks.build_attack`.

    Example::

        atk = Transfer(abnn, source=replace_adaptive_with_bn(abnn), eps=8/255, steps=100)
        x_adv = atk(x, y)
    """

    def __init__(self, model: nn.Module, *, source: nn.Module, attack: str | Callable[[nn.Module], Attack] = "pgd",
                 seed: int | None = None, **attack_kwargs: Any) -> None:
        super().__init__(model, seed=seed)
        if not isinstance(source, nn.Module):
            raise UnsupportedModelError(f"source must be an nn.Module, got {type(source).__name__}")
        if callable(attack) and not isinstance(attack, str):
            if attack_kwargs:
                raise AttackOptionError("attack options go into the factory when attack is a callable")
            self.inner = attack(source)
        else:
            self.inner = build_attack(attack, source, seed=seed, **attack_kwargs)
        if not isinstance(self.inner, Attack):
            raise UnsupportedModelError(f"the attack factory must return an abnn Attack, got {type(self.inner).__name__}")
        self.source = source
        self.attack = attack if isinstance(attack, str) else getattr(attack, "__name__", "custom")

    def settings(self) -> dict[str, Any]:
        return {"source": type(self.source).__name__, "attack": self.attack, "inner": repr(self.inner)}

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return self.inner(x, y)

