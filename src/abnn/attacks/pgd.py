"""L-inf PGD (Madry et al. 2018), the paper's digital attack (s. 3.1, METHOD.md s. 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, FirstFooled, check_budget, check_count

#: how reports name what the registry's ``pgd`` returns (``first_fooling``, its default)
FIRST_FOOLING = "first fooling iterate kept per sample"
#: the footnote of every report that gives a number of the registry's ``pgd`` (PGD-5 among them)
FIRST_FOOLING_NOTE = ("PGD-5 (" + FIRST_FOOLING + "), as every PGD of the registry's `pgd`: for each sample the "
                      "attack returns the first iterate, the random start included, that fools the model, else its "
                      "last iterate (PGD-AT trains on the last iterate instead).")


class PGD(Attack):
    """Projected gradient descent in the L-inf ball, cross-entropy loss, white-box.

    Returns, per sample, the first iterate (the random start included) that fools the model, else
    the last iterate; ``first_fooling=False`` always returns the last iterate (adversarial
    training trains on it, Madry et al. 2018).

    Args:
        model: maps [0, 1] inputs (images or clips) to logits; for ABNN the whole framework, so
            the gradient runs through target, substitute and statistics.
        eps: L-inf radius, a fraction of the pixel range (8/255 for images; 1/255 for video).
        alpha: step size (2/255 for images; eps/4 for video); may exceed eps (Fast-AT uses
            1.25 eps with ``steps=1``).
        steps: iterations (5, the paper's evaluation).
        random_start: start from a uniform point in the eps-ball.
        restarts: number of random restarts; the per-sample worst case is kept (a sample counts
            as broken if any restart breaks it).  Restarts after the first run only on the
            samples not fooled yet, as in AutoAttack (for a model whose output depends on the
            batch, the batch it sees shrinks over restarts).
        first_fooling: keep the first fooling iterate per sample (default) or the last iterate.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.

    The step loop is this class's alone; a variant changes what it ascends and where, through two
    hooks: :meth:`~abnn.attacks.base.Attack.objective` (the loss and the logits of one forward
    pass; the statistics attack adds a term on the substitute's statistics) and :meth:`region`
    (where the input may change, per sample or per pixel; the batch-poisoning check perturbs
    only the first k samples of a batch).

    Example::

        atk = PGD(model, eps=8/255, alpha=2/255, steps=5)
        x_adv = atk(x, y)
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 5,
                 random_start: bool = True, restarts: int = 1, first_fooling: bool = True,
                 seed: int | None = None, channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = check_budget("eps", eps)
        self.alpha = check_budget("alpha", alpha, positive=True)
        self.steps = check_count("steps", steps, minimum=0)
        self.random_start = bool(random_start)
        self.restarts = check_count("restarts", restarts, minimum=1)
        self.first_fooling = bool(first_fooling)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        gen = self.generator(x.device)
        x_adv, fooled = self._run(x, y, gen)
        if self.restarts == 1:
            return x_adv
        with torch.no_grad():
            fooled = fooled | (self.model(x_adv).argmax(1) != y)
        for _ in range(1, self.restarts):
            # as in AutoAttack, a restart only attacks the samples no earlier restart has fooled:
            # the per-sample worst case is the same, at a fraction of the cost
            idx = (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa, fa = self._run(x[idx], y[idx], gen)
            with torch.no_grad():
                now = fa | (self.model(xa).argmax(1) != y[idx])
            x_adv[idx[now]] = xa[now]
            fooled[idx[now]] = True
        return x_adv

    def region(self, x: Tensor, y: Tensor) -> Tensor | None:
        """Where the attack may change the batch ``x``: ``None`` (default) for everywhere, else a
        boolean tensor broadcastable to ``x``, e.g. (B, 1, 1, 1) per sample or (1, 1, H, W) per
        pixel.  Outside it the random start and every step are exactly zero.  Asked once per run,
        of the batch that run attacks (a restart attacks the samples not fooled yet)."""
        return None

    def _run(self, x: Tensor, y: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One run: the returned point and whether an iterate before the last fooled the model."""
        region = self.region(x, y)
        lower, upper = (x - self.eps).clamp_(min=0), (x + self.eps).clamp_(max=1)
        if self.random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x_adv = torch.clamp(x + noise.mul_(2 * self.eps).sub_(self.eps), 0, 1)
        else:
            x_adv = x.clone()
        if region is not None:
            x_adv = torch.where(region, x_adv, x)
        track = FirstFooled(x_adv, y) if self.first_fooling else None
        for _ in range(self.steps):
            grad, logits = self.input_grad(x_adv, y)
            if track is not None:
                track.update(x_adv, logits)
            if region is not None:
                grad.masked_fill_(~region, 0)  # a zero step: those pixels keep the values of x
            x_adv = torch.maximum(torch.minimum(x_adv.add_(grad.sign_(), alpha=self.alpha), upper), lower)
        if track is None:
            return x_adv, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return track.result(x_adv), track.fooled
