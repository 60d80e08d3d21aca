"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020).  Written from the
paper.

Score-based and gradient-free: only the logits are queried.  Random search on the margin loss
``L = z_y - max_{k != y} z_k`` (minimised; a sample is fooled when L < 0), starting from vertical
stripes of +-eps, and at iteration i proposing to set a random square window of side
``s = round(sqrt(p_i * H * W))`` to a random +-eps per channel; a proposal is kept if it lowers
the loss.  ``p_i`` starts at ``p_init`` and is halved after iterations
{10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000} (the paper's schedule, for 10 000 queries).
With ``rescale_schedule`` these iterations are scaled to the actual budget (the reference
``SquareAttack``'s default); AutoAttack runs Square with the schedule as it is, unscaled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Attack, AttackOptionError, InvalidInputError, check_budget, check_count

__all__ = ["Square", "margin_loss", "square_p"]

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(p_init: float, it: int, queries: int, *, rescale: bool = True) -> float:
    """Fraction of pixels changed at iteration ``it`` (the paper's schedule); with ``rescale``, the
    iteration is first mapped to a 10 000-query budget as ``int(it / queries * 10000)``."""
    if rescale:
        it = int(it / queries * 10000)
    return p_init / 2 ** sum(it > t for t in _HALVINGS)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin ``z_y - max_{k != y} z_k`` (negative = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], float("-inf")).amax(1)


class Square(Attack):
    """Untargeted L-inf Square Attack (Andriushchenko et al., ECCV 2020), margin loss.

    Inputs are (B, C, ..., H, W): the last two dimensions are the spatial ones in which squares
    are placed.  For clips (B, C, T, H, W) a square **spans all frames** (the same window and the
    same per-channel value in every frame), and so do the initial vertical stripes; this keeps
    the search space as small as for one image, which is what makes the attack query-efficient.

    Vectorised over the batch: each iteration makes one query (one forward pass) on the samples
    not fooled yet only, and stops when all are fooled.  A proposal that would not change the
    current point (the window already holds the drawn values) has one random channel flipped, so
    no query is wasted.  ``queries`` is the budget per sample and restart, the initial stripes
    included (plus one forward pass on the clean input, which also leaves clean-misclassified
    samples unchanged).  Returns, per sample, the fooling point if one was found, else the point
    of lowest margin over all restarts.

    Args:
        model: maps [0, 1] inputs to logits (B, K).
        eps: L-inf radius.
        queries: query budget per sample and restart.
        p_init: initial fraction of pixels covered by a square (0.8, as in AutoAttack; the paper
            tunes it per dataset).
        restarts: restarts (fresh stripes) on the samples not yet fooled.
        rescale_schedule: scale the halving iterations of ``p`` to ``queries`` (default, as the
            reference ``SquareAttack``); ``False``: the paper's iterations as they are, as inside
            AutoAttack.
        seed, channels_last, amp: see :class:`~abnn.attacks.base.Attack`.
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, queries: int = 1000, p_init: float = 0.8,
                 restarts: int = 1, rescale_schedule: bool = True, seed: int | None = None,
                 channels_last: bool | None = None, amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        self.eps = check_budget("eps", eps)
        self.queries = check_count("queries", queries, minimum=1)
        if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
            raise AttackOptionError(f"p_init must be in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        self.restarts = check_count("restarts", restarts, minimum=1)
        self.rescale_schedule = bool(rescale_schedule)

    def _margin(self, x: Tensor, y: Tensor) -> Tensor:
        return margin_loss(self.model(x), y)

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator | None, like: Tensor) -> Tensor:
        r = torch.randint(0, 2, shape, generator=gen, device=like.device)
        return (2 * r - 1).to(like.dtype) * self.eps

    @torch.no_grad()
    def _run(self, x: Tensor, y: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One restart on (x, y): returns (best point, its margin) per sample."""
        n, c = x.shape[:2]
        h, w = x.shape[-2:]
        mid = x.dim() - 4  # frame (or other) dimensions between C and (H, W)
        dev = x.device
        x_best = (x + self._signs((n, c) + (1,) * mid + (1, w), gen, x)).clamp_(0, 1)
        margin = self._margin(x_best, y)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        chans = torch.arange(c, device=dev)
        vshape = (-1, c) + (1,) * (mid + 2)
        side_max = max(min(h, w) - 1, 1)

        for i in range(self.queries - 1):
            act = (margin >= 0).nonzero().squeeze(1)
            m = act.numel()
            if m == 0:
                break
            xa, xb = x[act], x_best[act]
            s = min(max(int(round(math.sqrt(square_p(self.p_init, i, self.queries, rescale=self.rescale_schedule) * h * w))), 1), side_max)
            vh = torch.randint(0, h - s + 1, (m, 1), generator=gen, device=dev)
            vw = torch.randint(0, w - s + 1, (m, 1), generator=gen, device=dev)
            in_h = (rows >= vh) & (rows < vh + s)  # (m, H)
            in_w = (cols >= vw) & (cols < vw + s)  # (m, W)
            window = (in_h[:, :, None] & in_w[:, None, :]).view((m, 1) + (1,) * mid + (h, w))
            vals = self._signs((m, c), gen, x)
            x_new = torch.where(window, xa + vals.view(vshape), xb).clamp_(0, 1)
            # a proposal equal to the current point: flip one random channel (always changes it)
            same = (x_new - xb).abs().flatten(1).amax(1) < 1e-7
            ch = torch.randint(0, c, (m, 1), generator=gen, device=dev)
            vals = torch.where(same[:, None] & (chans == ch), -vals, vals)
            x_new = torch.where(window, xa + vals.view(vshape), xb).clamp_(0, 1)

            m_new = self._margin(x_new, y[act])
            m_old = margin[act]
            better = m_new < m_old
            x_best[act] = torch.where(better.view((-1,) + (1,) * (x.dim() - 1)), x_new, xb)
            margin[act] = torch.where(better, m_new, m_old)
        return x_best, margin

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() < 4:
            raise InvalidInputError(f"Square needs inputs (B, C, ..., H, W) with two spatial dimensions, got {tuple(x.shape)}")
        gen = self.generator(x.device)
        with torch.no_grad():
            best = margin_loss(self.model(x), y)
            x_out = x.clone()
            for _ in range(self.restarts):
                idx = (best >= 0).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                xa, ma = self._run(x[idx], y[idx], gen)
                prev = best[idx]
                take = ma < prev
                x_out[idx] = torch.where(take.view((-1,) + (1,) * (x.dim() - 1)), xa, x_out[idx])
                best[idx] = torch.where(take, ma, prev)
        return x_out
