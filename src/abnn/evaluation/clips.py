"""The authors' clip protocol for video evaluation (shaoyuanlo/GARD_eval): every consecutive
``stack``-frame window of a video in one batch, the logits averaged over the windows.

The windows of one video go through the model together, so any batch statistic (the substitute's
moments with ``substitute_stats="batch"``, as in the authors' ``torch.std`` of the flattened batch,
or BatchNorm in train mode) is shared by them.  Our default protocol evaluates one clip per
video (``METHOD.md`` s. 4); this wrapper is the authors' alternative, and an ``nn.Module`` like
any other: attacks run on it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attacks import check_count

__all__ = ["ClipStackEvaluator"]


class ClipStackEvaluator(nn.Module):
    """Map videos ``(B, C, T, H, W)`` to logits averaged over their ``stack``-frame windows.

    Args:
        model: maps clips ``(N, C, stack, H, W)`` in [0, 1] to logits.
        stack: frames per window (the authors: 40).
        step: frames between window starts (the authors: 1, every consecutive window).

    Each video's ``(T - stack) // step + 1`` windows form one batch; videos shorter than ``stack``
    are refused.  The wrapped model's train/eval mode is the wrapper's (it is a child module).
    """

    def __init__(self, model: nn.Module, *, stack: int = 40, step: int = 1) -> None:
        super().__init__()
        self.model = model
        self.stack = check_count("stack", stack, minimum=1)
        self.step = check_count("step", step, minimum=1)

    def windows(self, video: Tensor) -> Tensor:
        """The windows of one video ``(C, T, H, W)`` as a batch ``(N, C, stack, H, W)``."""
        if video.dim() != 4 or video.shape[1] < self.stack:
            raise ValueError(f"ClipStackEvaluator needs a video (C, T >= {self.stack}, H, W), got {tuple(video.shape)}")
        return video.unfold(1, self.stack, self.step).permute(1, 0, 4, 2, 3)  # (C, N, H, W, stack) -> (N, C, stack, H, W)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"ClipStackEvaluator expects videos (B, C, T, H, W), got {tuple(x.shape)}")
        return torch.stack([self.model(self.windows(v)).mean(0) for v in x])

    def extra_repr(self) -> str:
        return f"stack={self.stack}, step={self.step}"
