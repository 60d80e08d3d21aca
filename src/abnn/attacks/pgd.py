"""L-inf PGD (Madry et al. 2018), the paper's digital attack (s. 3.1, METHOD.md s. 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack


class PGD(Attack):
    """Projected gradient descent in the L-inf ball, cross-entropy loss, white-box.

    Args:
        model: maps [0, 1] inputs (images or clips) to logits; for ABNN the whole framework, so
            the gradient runs through target, substitute and statistics.
        eps: L-inf radius (8/255 for images; use 1/255 for video).
        alpha: step size (2/255 for images; eps/4 for video).
        steps: iterations (5, the paper's evaluation).
        random_start: start from a uniform point in the eps-ball.
        restarts: number of random restarts; the per-sample worst case is kept (a sample counts
            as broken if any restart breaks it).  Restarts after the first run only on the
            samples not fooled yet, as in AutoAttack (for a model whose output depends on the
            batch, the batch it sees shrinks over restarts).
        seed, channels_last: see :class:`~abnn.attacks.base.Attack`.

    Example::

        atk = PGD(model, eps=8/255, alpha=2/255, steps=5)
        x_adv = atk(x, y)
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 5,
                 random_start: bool = True, restarts: int = 1, seed: int | None = None,
                 channels_last: bool | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last)
        if eps < 0 or alpha <= 0 or steps < 0 or restarts < 1:
            raise ValueError(f"need eps >= 0, alpha > 0, steps >= 0, restarts >= 1; got {eps}, {alpha}, {steps}, {restarts}")
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.restarts = restarts

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = self.generator(x.device)
        x_adv = self._run(x, y, gen)
        if self.restarts == 1:
            return x_adv
        with torch.no_grad():
            fooled = self.model(x_adv).argmax(1) != y
        for _ in range(1, self.restarts):
            # as in AutoAttack, a restart only attacks the samples no earlier restart has fooled:
            # the per-sample worst case is the same, at a fraction of the cost
            idx = (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = self._run(x[idx], y[idx], gen)
            with torch.no_grad():
                now = self.model(xa).argmax(1) != y[idx]
            x_adv[idx[now]] = xa[now]
            fooled[idx[now]] = True
        return x_adv

    def _run(self, x: Tensor, y: Tensor, gen: torch.Generator | None) -> Tensor:
        lower, upper = (x - self.eps).clamp_(min=0), (x + self.eps).clamp_(max=1)
        if self.random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x_adv = torch.clamp(x + noise.mul_(2 * self.eps).sub_(self.eps), 0, 1)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            grad, _ = self.input_grad(x_adv, y)
            x_adv = torch.maximum(torch.minimum(x_adv.add_(grad.sign_(), alpha=self.alpha), upper), lower)
        return x_adv
