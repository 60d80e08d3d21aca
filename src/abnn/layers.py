"""The adaptive batch-normalisation layer of ABNN (paper section 2.1, eq. 2).

    z'_t = gamma_s * ( sigma(z_s) * (z_t - mu(z_t)) / sigma(z_t) + mu(z_s) ) + beta_s
    (gamma_s, beta_s) = AdaIN(z_s)

``z_t`` is the target model's feature at a stage, ``z_s`` the frozen substitute's feature at the
paired stage.  The two differ in channels and spatial size, so the substitute's moments are
scalars per sample (``substitute_stats="sample"``) or per batch (``"batch"``), never per target
channel; the per-target-channel modulation comes from the AdaIN encoder (``../METHOD.md`` s. 1).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AdaptiveBatchNorm",
    "AdaptiveBatchNorm2d",
    "AdaptiveBatchNorm3d",
    "FlattenEncoder",
    "PooledEncoder",
    "SUBSTITUTE_STD",
    "substitute_moments",
]

SubstituteStats = Literal["sample", "batch"]
#: how ``sigma(z_s)`` is taken: ``"biased"`` = ``sqrt(var + eps)`` (BatchNorm's, our default);
#: ``"unbiased"`` = ``torch.std`` (correction 1, no eps), as the authors' released code does
SubstituteStd = Literal["biased", "unbiased"]
SUBSTITUTE_STD = ("biased", "unbiased")
EncoderKind = Literal["flatten", "pooled"]

#: Refuse a ``flatten`` encoder above this many parameters per layer (the video model of the
#: authors carries about 1.1e9 parameters in these layers; see :class:`FlattenEncoder`).
DEFAULT_MAX_FLATTEN_PARAMS = 50_000_000


def substitute_moments(z_s: Tensor, mode: SubstituteStats, eps: float = 1e-5, *,
                       std: SubstituteStd = "biased") -> tuple[Tensor, Tensor]:
    """``mu(z_s)`` and ``sigma(z_s)`` of eq. (2), shaped to broadcast against ``z_t``.

    ``sample``: one mean/std per sample over all its C*H*W(*T) activations, shape (B, 1, 1, ...).
    ``batch``: one scalar pair over the whole batch tensor, shape (1, 1, 1, ...).
    ``std="biased"`` (default): ``sqrt(var + eps)`` with the biased variance, as in BatchNorm.
    ``std="unbiased"``: ``torch.std`` with Bessel's correction and no eps, as the authors' released
    video code (``torch.std(prior)`` of the flattened batch: ``mode="batch"``) does.
    Computed with autograd on: an attacker gets the exact gradient through the statistics.
    """
    if mode == "sample":
        dims: tuple[int, ...] = tuple(range(1, z_s.dim()))
    elif mode == "batch":
        dims = tuple(range(z_s.dim()))
    else:
        raise ValueError(f"substitute_stats must be 'sample' or 'batch', got {mode!r}")
    if std == "biased":
        var, mean = torch.var_mean(z_s, dim=dims, keepdim=True, correction=0)
        return mean, torch.sqrt(var + eps)
    if std == "unbiased":
        sigma, mean = torch.std_mean(z_s, dim=dims, keepdim=True, correction=1)
        return mean, sigma
    raise ValueError(f"substitute_std must be 'biased' or 'unbiased', got {std!r}")


class FlattenEncoder(nn.Module):
    """AdaIN encoder of the authors' code: flatten ``z_s``, one equalized linear layer to 2*C_t.

    Weights are drawn N(0, 1) and scaled at run time by sqrt(2 / fan_in) (StyleGAN's
    equalized learning rate); the bias starts at 1 for gamma and 0 for beta.  The layer has
    ``C_s*H_s*W_s*2*C_t`` weights: fine for CIFAR, infeasible for 3-D video features, where the
    constructor refuses anything above ``max_params`` (use :class:`PooledEncoder` there).
    """

    def __init__(self, in_features: int, num_features: int, *, max_params: int = DEFAULT_MAX_FLATTEN_PARAMS) -> None:
        super().__init__()
        n_params = in_features * 2 * num_features
        if n_params > max_params:
            raise ValueError(
                f"flatten encoder would need {n_params:,} parameters ({in_features:,} substitute "
                f"activations x {2 * num_features} outputs), above the budget of {max_params:,}; "
                "use encoder='pooled' (or raise max_flatten_params if you really want this)"
            )
        self.in_features = in_features
        self.num_features = num_features
        self.weight = nn.Parameter(torch.randn(2 * num_features, in_features))
        self.bias = nn.Parameter(torch.cat([torch.ones(num_features), torch.zeros(num_features)]))
        self.scale = math.sqrt(2.0 / in_features)

    def forward(self, z_s: Tensor) -> tuple[Tensor, Tensor]:
        out = F.linear(z_s.flatten(1), self.weight * self.scale, self.bias)
        gamma, beta = out.chunk(2, dim=1)
        return gamma, beta

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_features={self.num_features}, equalized"


class PooledEncoder(nn.Module):
    """AdaIN encoder on pooled statistics: per-channel mean and std of ``z_s`` (2*C_s numbers, the
    AdaIN idea itself), then a two-layer MLP to 2*C_t.  Output bias starts at 1 (gamma) / 0 (beta).
    Its size does not depend on the spatial (or temporal) extent, so it scales to video.
    """

    def __init__(self, substitute_channels: int, num_features: int, *, hidden: int = 256, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.num_features = num_features
        self.mlp = nn.Sequential(
            nn.Linear(2 * substitute_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * num_features),
        )
        with torch.no_grad():
            out = self.mlp[2]
            out.bias.copy_(torch.cat([torch.ones(num_features), torch.zeros(num_features)]))

    def forward(self, z_s: Tensor) -> tuple[Tensor, Tensor]:
        dims = tuple(range(2, z_s.dim()))
        var, mean = torch.var_mean(z_s, dim=dims, correction=0)
        stats = torch.cat([mean, torch.sqrt(var + self.eps)], dim=1)
        gamma, beta = self.mlp(stats).chunk(2, dim=1)
        return gamma, beta


class AdaptiveBatchNorm(nn.Module):
    """Adaptive BN of eq. (2) for ``(B, C, *spatial)`` features; use the 2d / 3d subclasses.

    Args:
        num_features: channels ``C_t`` of the target feature ``z_t``.
        substitute_shape: shape of one sample of the substitute feature ``z_s`` without the batch
            dimension, e.g. ``(64, 32, 32)``.
        substitute_stats: ``"sample"`` (default) or ``"batch"``, how ``mu(z_s)``, ``sigma(z_s)``
            are taken (``METHOD.md`` s. 1).  With ``"sample"`` a prediction never depends on the
            rest of its batch in eval mode.
        substitute_std: ``"biased"`` (default, ``sqrt(var + eps)``) or ``"unbiased"`` (the
            authors' ``torch.std``); see :func:`substitute_moments`.
        encoder: ``"flatten"`` (authors' code, default for images) or ``"pooled"``.
        affine: keep BatchNorm's own affine (gamma, beta) on the normalised ``z_t`` (default on,
            as in the authors' code).
        momentum, eps: of the target-side BatchNorm (running statistics for eval mode).
        encoder_hidden: hidden width of the ``pooled`` encoder.
        max_flatten_params: parameter budget above which the ``flatten`` encoder is refused.
    """

    _bn_cls: type[nn.Module] = nn.BatchNorm2d
    _feature_dim: int = 4

    def __init__(
        self,
        num_features: int,
        substitute_shape: Sequence[int],
        *,
        substitute_stats: SubstituteStats = "sample",
        encoder: EncoderKind = "flatten",
        affine: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        encoder_hidden: int = 256,
        max_flatten_params: int = DEFAULT_MAX_FLATTEN_PARAMS,
        substitute_std: SubstituteStd = "biased",
    ) -> None:
        super().__init__()
        if substitute_stats not in ("sample", "batch"):
            raise ValueError(f"substitute_stats must be 'sample' or 'batch', got {substitute_stats!r}")
        if substitute_std not in SUBSTITUTE_STD:
            raise ValueError(f"substitute_std must be 'biased' or 'unbiased', got {substitute_std!r}")
        self.substitute_std = substitute_std
        substitute_shape = tuple(int(s) for s in substitute_shape)
        if len(substitute_shape) != self._feature_dim - 1:
            raise ValueError(
                f"{type(self).__name__} expects a substitute feature of shape "
                f"(C, {'H, W' if self._feature_dim == 4 else 'T, H, W'}) per sample, got {substitute_shape}"
            )
        self.num_features = num_features
        self.substitute_shape = substitute_shape
        self.substitute_stats = substitute_stats
        self.encoder_kind = encoder
        self.eps = eps
        self.bn = self._bn_cls(num_features, eps=eps, momentum=momentum, affine=affine)
        if encoder == "flatten":
            self.encoder: nn.Module = FlattenEncoder(
                math.prod(substitute_shape), num_features, max_params=max_flatten_params
            )
        elif encoder == "pooled":
            self.encoder = PooledEncoder(substitute_shape[0], num_features, hidden=encoder_hidden, eps=eps)
        else:
            raise ValueError(f"encoder must be 'flatten' or 'pooled', got {encoder!r}")

    def moments(self, z_s: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu_s, sigma_s)`` of eq. (2) with this layer's settings."""
        return substitute_moments(z_s, self.substitute_stats, self.eps, std=self.substitute_std)

    def forward(self, z_t: Tensor, z_s: Tensor, z_s_encoder: Tensor | None = None) -> Tensor:
        """Eq. (2).  ``z_s_encoder``, when given, feeds the AdaIN encoder (``gamma_s, beta_s``)
        while ``z_s`` gives the moments (``mu_s, sigma_s``): the same values with a different
        autograd graph lets :meth:`abnn.framework.ABNN.gradient_protocol` and the gradient
        attribution cut or isolate either branch.  Default: ``z_s`` feeds both."""
        if z_t.dim() != self._feature_dim or z_t.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got a target feature of shape "
                f"{tuple(z_t.shape)}; expected (B, {self.num_features}, ...) with {self._feature_dim} dims"
            )
        if tuple(z_s.shape[1:]) != self.substitute_shape or z_s.shape[0] != z_t.shape[0]:
            raise ValueError(
                f"{type(self).__name__} got a substitute feature of shape {tuple(z_s.shape)}; "
                f"expected ({z_t.shape[0]}, {', '.join(map(str, self.substitute_shape))})"
            )
        mu_s, sigma_s = self.moments(z_s)
        gamma_s, beta_s = self.encoder(z_s if z_s_encoder is None else z_s_encoder)
        view = (z_t.shape[0], self.num_features) + (1,) * (self._feature_dim - 2)
        z = torch.addcmul(mu_s, self.bn(z_t), sigma_s)  # moments keep z_s's dims: they broadcast
        return torch.addcmul(beta_s.view(view), gamma_s.view(view), z)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, substitute_shape={self.substitute_shape}, "
            f"substitute_stats={self.substitute_stats!r}, encoder={self.encoder_kind!r}"
            + ("" if self.substitute_std == "biased" else f", substitute_std={self.substitute_std!r}")
        )


class AdaptiveBatchNorm2d(AdaptiveBatchNorm):
    """Adaptive BN (eq. 2) for image features ``(B, C, H, W)``."""

    _bn_cls = nn.BatchNorm2d
    _feature_dim = 4


class AdaptiveBatchNorm3d(AdaptiveBatchNorm):
    """Adaptive BN (eq. 2) for video features ``(B, C, T, H, W)``.  The ``flatten`` encoder is
    infeasible at video sizes (billions of parameters) and is refused above the parameter
    budget; ``pooled`` is the default here."""

    _bn_cls = nn.BatchNorm3d
    _feature_dim = 5

    def __init__(self, num_features: int, substitute_shape: Sequence[int], *, encoder: EncoderKind = "pooled", **kwargs) -> None:
        super().__init__(num_features, substitute_shape, encoder=encoder, **kwargs)
