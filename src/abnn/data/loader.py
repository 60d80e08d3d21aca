"""A batch loader over in-memory uint8 tensors with vectorised augmentation.

Standard CIFAR augmentation (4-pixel zero-padded random crop, horizontal flip) is applied to a
whole batch at once with tensor indexing: no per-sample Python in the training hot path.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import ImageData


def augment_crop_flip(x: Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop (after zero padding by ``pad``) and random horizontal flip, per sample,
    vectorised over the batch ``x`` (B, C, H, W) (any dtype)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (oy[:, None] + torch.arange(h))[:, :, None]                      # (B, H, 1)
    cols_base = torch.arange(w)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - cols_base), ox[:, None] + cols_base)[:, None, :]  # (B,1,W)
    bi = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows, cols]                             # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Iterate over ``data`` in batches of float [0, 1] images and int64 labels.

    Args:
        data: an :class:`ImageData` split.
        batch_size: samples per batch.
        shuffle: a new seeded permutation every epoch (``set_epoch`` selects it).
        augment: apply :func:`augment_crop_flip`.
        drop_last: drop the last incomplete batch.
        seed: base seed of the permutation and augmentation.
        rank, world_size: take this rank's shard of every permutation (distributed training).
        device: where batches are moved.
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = n // self.world_size
            idx = idx[: per * self.world_size].view(per, self.world_size)[:, self.rank]
        return idx

    def __len__(self) -> int:
        if self._streamed:
            n = len(self.data)
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        n = len(self.data) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def _streamed(self) -> bool:
        """Datasets decoded from disk (UCF-101) stream their own batches."""
        return not isinstance(self.data, ImageData)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._streamed:
            if self.world_size > 1:
                raise NotImplementedError("distributed sharding of streamed video datasets is not supported yet")
            yield from self.data.batches(self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                         drop_last=self.drop_last, device=self.device)
            return
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch * 31 + self.rank + 1)
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                break
            x = self.data.x[batch]
            if self.augment and x.dim() == 4:
                x = augment_crop_flip(x, generator=g)
            elif self.augment:  # clips: a random horizontal flip per clip
                flip = (torch.rand(len(batch), generator=g) < 0.5).view(-1, 1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield x, self.data.y[batch].to(self.device, non_blocking=True)
