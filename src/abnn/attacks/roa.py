"""Rectangular occlusion attack (ROA), the paper's physically realisable attack.

ABNN paper s. 3.2 ("physically realizable attack") evaluates against the ROA of Wu, Tong and
Vorobeychik, "Defending against physically realizable attacks on image classification",
ICLR 2020: a gray "sticker" is placed where it hurts most, then its content is optimised with
sign-gradient steps that are unbounded inside the rectangle and leave every other pixel alone.
Settings follow ``METHOD.md`` s. 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Attack, FirstFooled, InvalidInputError, check_budget, check_choice, check_count

__all__ = ["ROA"]

_SEARCHES = ("exhaustive", "gradient")
_VIDEO_POSITIONS = ("random", "search")


class ROA(Attack):
    """Rectangular occlusion attack (Wu et al., ICLR 2020), white-box, cross-entropy loss.

    Images (B, C, H, W) get one ``size`` x ``size`` rectangle each; clips (B, C, T, H, W) get one
    rectangle per frame.  Two phases:

    1. *Position.*  Candidate top-left corners are every ``stride``-th row/column from 0 up to
       ``H - size`` (resp. ``W - size``), the last one always included.  ``"exhaustive"`` fills
       the rectangle with 0.5 gray at every candidate and keeps, per sample, the one of highest
       cross-entropy; ``"gradient"`` ranks candidates by the summed squared input gradient (at
       ``x``) inside the window and evaluates only the ``top_k`` best that way.  Candidates run
       through the model in batches of ``search_batch`` images under ``torch.no_grad()``; among
       equal losses the first candidate in row-major order wins.  For clips,
       ``video_positions="random"`` draws an independent uniform candidate per frame (the
       authors' video setting) and ``"search"`` runs the image search frame by frame, greedily:
       frame ``t`` is searched with the gray rectangles already chosen for frames ``< t`` in
       place and later frames clean.
    2. *Content.*  Start from ``x`` with the rectangle(s) filled with ``fill``, then ``steps``
       sign-gradient steps of size ``alpha`` inside the mask only (no eps bound there), clamped to
       [0, 1].  Pixels outside the mask are never changed.  Per sample, the first iterate (the
       gray fill included) that fools the model is returned, else the last one.

    Args:
        model: maps [0, 1] inputs to logits (B, K); for ABNN the whole framework.
        size: rectangle side in pixels; ``None`` means :meth:`default_size` (about 10% of the
            frame: 10 on 32x32, 35 on 112x112).
        stride: step between candidate positions (the last row/column is always a candidate).
        search: ``"exhaustive"`` or ``"gradient"``.
        top_k: candidates evaluated by the gradient search.
        fill: gray level the rectangle is filled with (search and PGD start).
        alpha: sign-step size inside the rectangle.
        steps: sign steps.
        video_positions: ``"random"`` or ``"search"`` (clips only).
        seed: see :class:`~abnn.attacks.base.Attack` (used by ``video_positions="random"``).
        channels_last, amp: see :class:`~abnn.attacks.base.Attack`.
        search_batch: images per forward during the search; a clip candidate counts as T images,
            so ``max(1, search_batch // T)`` clips go through at once.  For a model whose output
            depends on the batch, the candidates' losses depend on this grouping.

    Example::

        atk = ROA(model)                      # 10x10 on CIFAR, exhaustive search, 5 steps
        x_adv = atk(x, y)
        corners = atk.locate(x, y)            # (B, 2) or (B, T, 2) top-left (row, col)
    """

    def __init__(self, model: nn.Module, *, size: int | None = None, stride: int = 1,
                 search: str = "exhaustive", top_k: int = 20, fill: float = 0.5,
                 alpha: float = 70 / 255, steps: int = 5, video_positions: str = "random",
                 seed: int | None = None, search_batch: int = 1024, channels_last: bool | None = None,
                 amp: torch.dtype | None = None) -> None:
        super().__init__(model, seed=seed, channels_last=channels_last, amp=amp)
        if size is not None:
            size = check_count("size", size, minimum=1)
        self.size = size
        self.stride = check_count("stride", stride, minimum=1)
        self.search = check_choice("search", search, _SEARCHES)
        self.top_k = check_count("top_k", top_k, minimum=1)
        self.fill = check_budget("fill", fill)
        self.alpha = check_budget("alpha", alpha, positive=True)
        self.steps = check_count("steps", steps, minimum=0)
        self.video_positions = check_choice("video_positions", video_positions, _VIDEO_POSITIONS)
        self.search_batch = check_count("search_batch", search_batch, minimum=1)

    # public helpers ---------------------------------------------------------------------------
    @staticmethod
    def default_size(height: int, width: int) -> int:
        """Side of a square covering about 10% of the frame: ``round(sqrt(0.1 * H * W))``."""
        return max(1, min(height, width, round(math.sqrt(0.1 * height * width))))

    def side(self, height: int, width: int) -> int:
        """The rectangle side used on ``height`` x ``width`` frames."""
        return self.size if self.size is not None else self.default_size(height, width)

    def candidates(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Candidate top-left rows and columns (both ends included); positions are row-major."""
        s = self.side(height, width)
        return _starts(height, s, self.stride), _starts(width, s, self.stride)

    def locate(self, x: Tensor, y: Tensor) -> Tensor:
        """Top-left corners (row, col) the attack picks: (B, 2) for images, (B, T, 2) for clips.

        Same contract as calling the attack (validation, eval mode restored, seeded randomness),
        so with a ``seed`` these are the corners ``atk(x, y)`` uses.
        """
        self._validate(x, y)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                x, y = x.detach(), y.detach()
                rows, cols = self._grid(x)
                pos = self._positions(x, y, rows, cols, self.generator(x.device))
        finally:
            self.model.train(was_training)
        corners = torch.stack((rows[pos // cols.numel()], cols[pos % cols.numel()]), dim=-1)
        return corners if x.dim() == 5 else corners[:, 0]

    # the attack -------------------------------------------------------------------------------
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        rows, cols = self._grid(x)
        pos = self._positions(x, y, rows, cols, self.generator(x.device))      # (B, F)
        s = self.side(*x.shape[-2:])
        mask = _window_mask(rows[pos // cols.numel()], cols[pos % cols.numel()], s, *x.shape[-2:])
        mask = mask.unsqueeze(1)                                                # (B, 1, F, H, W)
        if x.dim() == 4:
            mask = mask[:, :, 0]                                                # (B, 1, H, W)
        return self._fill_and_step(x, y, mask)

    def _fill_and_step(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Fill the mask with ``fill``, then sign steps inside it; images and clips alike.  Per
        sample the first iterate (the gray fill included) that fools the model, else the last."""
        outside = ~mask
        x_adv = x.masked_fill(mask, self.fill)
        track = FirstFooled(x_adv, y)
        for _ in range(self.steps):
            grad, logits = self.input_grad(x_adv, y)
            track.update(x_adv, logits)
            # outside the mask the step is exactly 0, so those pixels keep their values
            x_adv.add_(grad.sign_().masked_fill_(outside, 0), alpha=self.alpha).clamp_(0, 1)
        return track.result(x_adv)

    # position search --------------------------------------------------------------------------
    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() not in (4, 5):
            raise InvalidInputError(f"ROA needs images (B,C,H,W) or clips (B,C,T,H,W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.side(h, w)
        if s > min(h, w):
            raise InvalidInputError(f"ROA rectangle side {s} does not fit frames of {h}x{w}; pass a smaller size")
        rows, cols = self.candidates(h, w)
        return rows.to(x.device), cols.to(x.device)

    def _positions(self, x: Tensor, y: Tensor, rows: Tensor, cols: Tensor,
                   gen: torch.Generator | None) -> Tensor:
        """Chosen candidate index (row-major into ``rows`` x ``cols``) per sample and frame: (B, F)."""
        video = x.dim() == 5
        xv = x if video else x.unsqueeze(2)                                     # (B, C, F, H, W)
        b, _, frames, h, w = xv.shape
        n_pos = rows.numel() * cols.numel()
        if video and self.video_positions == "random":
            return torch.randint(n_pos, (b, frames), generator=gen, device=x.device)
        s = self.side(h, w)
        if self.search == "gradient":
            grad, _ = self.input_grad(x, y)
            energy = grad.view_as(xv).square().sum(1).reshape(b * frames, 1, h, w)
            box = F.avg_pool2d(energy, s, stride=1).view(b, frames, h - s + 1, w - s + 1)
            scores = box[:, :, rows][:, :, :, cols].flatten(2)                  # (B, F, P)
            # sorted, so ties in loss are broken in row-major order as in the exhaustive search
            cand = scores.topk(min(self.top_k, n_pos), dim=2).indices.sort(dim=2).values
        else:
            cand = torch.arange(n_pos, device=x.device).expand(b, frames, n_pos)
        pos = torch.empty(b, frames, dtype=torch.long, device=x.device)
        ctx = xv.clone() if frames > 1 else xv
        for t in range(frames):
            pos[:, t] = self._best(ctx, y, t, cand[:, t], rows, cols, s, video)
            if t < frames - 1:      # greedy: later frames are searched with this one occluded
                m = _window_mask(rows[pos[:, t] // cols.numel()], cols[pos[:, t] % cols.numel()], s, h, w)
                ctx[:, :, t].masked_fill_(m.unsqueeze(1), self.fill)
        return pos

    @torch.no_grad()
    def _best(self, ctx: Tensor, y: Tensor, frame: int, cand: Tensor, rows: Tensor, cols: Tensor,
              s: int, video: bool) -> Tensor:
        """Among candidates ``cand`` (B, k), the one whose gray rectangle in ``frame`` of ``ctx``
        (B, C, F, H, W) gives the highest loss; all (sample, candidate) pairs in chunks."""
        b, k = cand.shape
        frames, h, w = ctx.shape[2:]
        total = b * k
        chunk = max(1, self.search_batch // frames)
        sample = torch.arange(b, device=ctx.device).repeat_interleave(k)
        flat = cand.reshape(-1)
        losses = torch.empty(total, device=ctx.device)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            idx, p = sample[start:end], flat[start:end]
            imgs = ctx[idx]                                                     # a copy
            m = _window_mask(rows[p // cols.numel()], cols[p % cols.numel()], s, h, w)
            imgs[:, :, frame].masked_fill_(m.unsqueeze(1), self.fill)
            logits = self.model(imgs if video else imgs[:, :, 0])
            losses[start:end] = F.cross_entropy(logits, y[idx], reduction="none")
        best = losses.view(b, k).argmax(1)                                      # first maximum
        return cand.gather(1, best.unsqueeze(1)).squeeze(1)


def _starts(n: int, s: int, stride: int) -> Tensor:
    """Top-left offsets 0, stride, ... and always n - s (both ends included)."""
    starts = list(range(0, n - s + 1, stride))
    if starts and starts[-1] != n - s:
        starts.append(n - s)
    return torch.tensor(starts, dtype=torch.long)


def _window_mask(r: Tensor, c: Tensor, s: int, h: int, w: int) -> Tensor:
    """Boolean masks (*r.shape, H, W) of the s x s windows with top-left corners (r, c)."""
    ar_h = torch.arange(h, device=r.device)
    ar_w = torch.arange(w, device=r.device)
    in_r = (ar_h >= r.unsqueeze(-1)) & (ar_h < r.unsqueeze(-1) + s)
    in_c = (ar_w >= c.unsqueeze(-1)) & (ar_w < c.unsqueeze(-1) + s)
    return in_r.unsqueeze(-1) & in_c.unsqueeze(-2)
