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


def crop_flip_params(b: int, *, pad: int = 4, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The random draws of :func:`augment_crop_flip` for a batch of ``b``: crop offsets ``oy``,
    ``ox`` in [0, 2 pad] and flip flags (CPU tensors, drawn from ``generator`` in this order)."""
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return oy, ox, flip


def apply_crop_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, *, pad: int = 4) -> Tensor:
    """Crop (after zero padding by ``pad``) at offsets ``oy``, ``ox`` and flip where ``flip``, per
    sample, vectorised over ``x`` (B, C, H, W) on ``x``'s device (any dtype; the draws are moved there)."""
    b, c, h, w = x.shape
    dev = x.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]          # (B, H, 1)
    cols_base = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - cols_base), ox[:, None] + cols_base)[:, None, :]  # (B,1,W)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows, cols]                             # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(x: Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop (after zero padding by ``pad``) and random horizontal flip, per sample,
    vectorised over the batch ``x`` (B, C, H, W) (any dtype, any device; the draws come from the
    CPU ``generator``, so a batch is the same on every device)."""
    return apply_crop_flip(x, *crop_flip_params(len(x), pad=pad, generator=generator), pad=pad)


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
        on_device: keep the whole uint8 split on ``device`` (moved once, at the first batch) and
            gather, crop, flip and convert each batch there, so that a GPU never waits for the
            host.  The random draws (permutation, offsets, flips) stay on the CPU generators of
            the host path, so both paths yield exactly the same batches for the same seed.
            Streamed datasets (UCF-101) ignore it.
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", on_device: bool = False) -> None:
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
        self.on_device = on_device
        self.epoch = 0
        self._resident: tuple[Tensor, Tensor] | None = None

    def _source(self) -> tuple[Tensor, Tensor]:
        """The uint8 images and labels batches are gathered from: the host tensors, or with
        ``on_device`` their copies on the device (made once)."""
        if not self.on_device:
            return self.data.x, self.data.y
        if self._resident is None:
            self._resident = (self.data.x.to(self.device), self.data.y.to(self.device))
        return self._resident

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
        xs, ys = self._source()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                break
            where = batch.to(xs.device, non_blocking=True)
            x = xs[where]
            if self.augment and x.dim() == 4:
                x = augment_crop_flip(x, generator=g)
            elif self.augment:  # clips: a random horizontal flip per clip
                flip = (torch.rand(len(batch), generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield x, ys[where].to(self.device, non_blocking=True)
