"""The ABNN framework (paper s. 2, Figure 2): a target model and a frozen substitute.

One input runs through both models.  After each named stage of the target, an adaptive BN
layer (eq. 2) replaces the stage output ``z_t`` by ``AdaptiveBN(z_t, z_s)``, where ``z_s`` is the
substitute's feature at the paired tap.  The substitute is frozen (eval mode, no parameter
gradients, never updated) but stays inside the autograd graph with respect to the input, so a
white-box attacker differentiates through target, substitute and statistics alike.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import InputRangeError, ModelSpecError
from .layers import AdaptiveBatchNorm2d, AdaptiveBatchNorm3d, EncoderKind, SubstituteStats

__all__ = ["ABNN"]


class ABNN(nn.Module):
    """Adaptive Batch Normalization Network.

    Args:
        target: the model to defend; maps [0, 1] inputs to logits.  Any ``nn.Module`` whose
            stages are named submodules called once per forward (our ResNet-18, a torchvision
            ResNet with ``("maxpool", "layer1", ..., "layer4")``, ...).
        substitute: the pretrained substitute.  Either it supports
            ``substitute(x, return_taps=True) -> list[Tensor]`` (our VGG-19-BN and r3d_18
            wrappers; they stop after the last tap), or pass ``substitute_taps`` with the names
            of its submodules whose outputs are the paired features.
        target_stages: names of the target submodules after which adaptive BN goes (paper: after
            conv1..conv5 blocks).  Defaults to ``target.stages`` when the target defines it.
        substitute_taps: names of substitute submodules to tap (only for substitutes without
            ``return_taps``); pairs with ``target_stages`` in order.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``; used once to size the layers.
        substitute_stats, encoder, bn_affine, encoder_hidden, max_flatten_params: passed to every
            :class:`~abnn.layers.AdaptiveBatchNorm` (``METHOD.md`` s. 1).
        check_input: refuse input that is not finite pixels in [0, 1] (NaN, 0-255 images,
            already-normalised tensors) with an :class:`~abnn.errors.InputRangeError`; see
            :meth:`check_pixels`.  Also settable later (``model.check_input = False``).

    Example::

        model = ABNN(resnet18_cifar(), vgg19_bn_substitute(weights="sub.pt"), input_shape=(3, 32, 32))
        logits = model(x)   # x in [0, 1]
    """

    def __init__(
        self,
        target: nn.Module,
        substitute: nn.Module,
        *,
        target_stages: Sequence[str] | None = None,
        substitute_taps: Sequence[str] | None = None,
        input_shape: Sequence[int] = (3, 32, 32),
        substitute_stats: SubstituteStats = "sample",
        encoder: EncoderKind | None = None,
        bn_affine: bool = True,
        encoder_hidden: int = 256,
        max_flatten_params: int | None = None,
        check_input: bool = True,
    ) -> None:
        super().__init__()
        self.check_input = check_input
        if target_stages is None:
            target_stages = getattr(target, "stages", None)
            if target_stages is None:
                raise ValueError("target_stages is required for a target without a `stages` attribute")
        self.target = target
        self.substitute = substitute
        self.target_stages = tuple(target_stages)
        self.substitute_taps = tuple(substitute_taps) if substitute_taps is not None else None
        self.input_shape = tuple(int(s) for s in input_shape)
        self.substitute_stats = substitute_stats
        modules_t = dict(target.named_modules())
        for name in self.target_stages:
            if name not in modules_t or name == "":
                raise ModelSpecError(f"target has no submodule named {name!r}; stages must be names from "
                                     "target.named_modules()")
        if self.substitute_taps is None and "return_taps" not in inspect.signature(substitute.forward).parameters:
            raise ModelSpecError(f"{type(substitute).__name__} cannot return its features itself: name the substitute "
                                 f"modules to tap, one per target stage ({len(self.target_stages)}), with "
                                 f"substitute_taps / --substitute-taps; its modules: {_module_names(substitute)}")
        if self.substitute_taps is not None:
            bad = [n for n in self.substitute_taps if n not in dict(substitute.named_modules()) or n == ""]
            if bad:
                raise ModelSpecError(f"the substitute has no module named {', '.join(map(repr, bad))} "
                                     f"(--substitute-taps); its modules: {_module_names(substitute)}")
            if len(self.substitute_taps) != len(self.target_stages):
                raise ModelSpecError(f"{len(self.substitute_taps)} substitute taps for {len(self.target_stages)} target "
                                     f"stages ({', '.join(self.target_stages)}); name one per stage, in order, from "
                                     f"the substitute's modules: {_module_names(substitute)}")

        self.substitute.requires_grad_(False)
        self.substitute.eval()

        # Size the adaptive layers from one dry run (eval mode, no grad, modes restored).
        stage_shapes, tap_shapes = self._probe_shapes()
        if len(tap_shapes) != len(self.target_stages):
            raise ModelSpecError(
                f"{len(self.target_stages)} target stages but the substitute gives {len(tap_shapes)} taps; "
                "they are paired in order and must be as many"
            )
        video = len(self.input_shape) == 4
        layer_cls = AdaptiveBatchNorm3d if video else AdaptiveBatchNorm2d
        encoder = encoder or ("pooled" if video else "flatten")
        extra = {} if max_flatten_params is None else {"max_flatten_params": max_flatten_params}
        self.adaptive = nn.ModuleDict({
            name.replace(".", "_"): layer_cls(
                shape_t[0], shape_s, substitute_stats=substitute_stats, encoder=encoder,
                affine=bn_affine, encoder_hidden=encoder_hidden, **extra,
            )
            for name, shape_t, shape_s in zip(self.target_stages, stage_shapes, tap_shapes)
        })
        self.encoder = encoder

        self._pending: dict[str, Tensor] | None = None
        # Bound-method partials (not closures), so that copy.deepcopy(abnn) rebinds the hooks
        # to the copy instead of the original.
        for name in self.target_stages:
            modules_t[name].register_forward_hook(functools.partial(self._stage_hook, name))

    # -- the substitute -------------------------------------------------------------------------
    def substitute_features(self, x: Tensor) -> list[Tensor]:
        """The substitute's features at the taps, in stage order (with autograd w.r.t. ``x``)."""
        if self.substitute_taps is None:
            return list(self.substitute(x, return_taps=True))
        captured: dict[str, Tensor] = {}
        modules = dict(self.substitute.named_modules())
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
                   for n in self.substitute_taps]
        try:
            self.substitute(x)
        finally:
            for h in handles:
                h.remove()
        return [captured[n] for n in self.substitute_taps]

    # -- the target with adaptive layers ----------------------------------------------------------
    def _stage_hook(self, name: str, module: nn.Module, inputs, output: Tensor) -> Tensor:
        if self._pending is None:
            raise RuntimeError(
                f"stage {name!r} of an ABNN target ran without substitute features: call the ABNN "
                "module, not abnn.target directly"
            )
        try:
            z_s = self._pending.pop(name)
        except KeyError:
            raise RuntimeError(f"stage {name!r} ran twice in one forward; ABNN stages must run once") from None
        return self.adaptive[name.replace(".", "_")](output, z_s)

    def forward(self, x: Tensor) -> Tensor:
        self.check_tensor(x)
        if self.check_input and not torch.compiler.is_compiling():
            self.check_pixels(x)
        feats = self.substitute_features(x)
        self._pending = dict(zip(self.target_stages, feats))
        try:
            return self.target(x)
        finally:
            self._pending = None

    def check_tensor(self, x: Tensor) -> None:
        """Refuse, as an :class:`~abnn.errors.InputRangeError`, what the layers would fail on with a
        raw torch error: not a float32/16/bf16 tensor, or another shape than ``(B, *input_shape)``
        (the flatten encoder is sized for it; clips may have another number of frames with the
        pooled encoder)."""
        want = f"(B, {', '.join(map(str, self.input_shape))})"
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InputRangeError(f"ABNN input must be a float tensor of pixels in [0, 1] of shape {want}; got "
                                  f"{type(x).__name__} {getattr(x, 'dtype', '')} (uint8 images: x.float() / 255)")
        weights = next(self.target.parameters(), None)
        if x.dtype == torch.float64 and weights is not None and weights.dtype != torch.float64:
            raise InputRangeError(f"ABNN input is float64 and the model's weights are {weights.dtype}: pass x.float()")
        shape = tuple(x.shape[1:])
        free_frames = len(self.input_shape) == 4 and self.encoder == "pooled"
        same = shape == self.input_shape or (free_frames and len(shape) == 4
                                             and (shape[0], *shape[2:]) == (self.input_shape[0], *self.input_shape[2:]))
        if not same:
            raise InputRangeError(f"ABNN expects input of shape {want} in [0, 1]; got {tuple(x.shape)}")

    @staticmethod
    def check_pixels(x: Tensor) -> None:
        """Refuse input that is not finite pixels in [0, 1] (one min/max reduction; NaN and inf
        fail it too).  On the CPU the result is read at once.  On CUDA reading it would wait
        for the device at every forward (an attack loop would lose its pipelining), so the check
        is queued with ``torch._assert_async``: bad input then fails as a device-side assertion
        at the next synchronisation, which leaves the CUDA context unusable; check inputs
        yourself first, or set ``check_input=False``, where that matters."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        ok = (lo >= 0) & (hi <= 1)   # False for NaN
        if x.device.type == "cuda":
            torch._assert_async(ok, "ABNN input must be finite pixels in [0, 1]")
        elif not bool(ok):
            raise InputRangeError(
                f"ABNN input must be finite pixels in [0, 1] (the models normalise internally); got values in "
                f"[{lo.item():.4g}, {hi.item():.4g}]" + (" (divide 0-255 images by 255)" if hi.item() > 1.5 else ""))

    def train(self, mode: bool = True) -> "ABNN":
        """Train mode applies to the target and the adaptive layers; the substitute stays in eval."""
        super().train(mode)
        self.substitute.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by ABNN: the target's and the adaptive layers' (never the substitute's)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def _probe_shapes(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        stage_shapes: dict[str, tuple[int, ...]] = {}
        modules = dict(self.target.named_modules())
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: stage_shapes.__setitem__(n, tuple(o.shape[1:])))
                   for n in self.target_stages]
        was_training = self.target.training
        probe = torch.zeros(2, *self.input_shape, device=_device_of(self.target))
        try:
            self.target.eval()
            self.target(probe)
            taps = [tuple(f.shape[1:]) for f in self.substitute_features(probe.to(_device_of(self.substitute)))]
        finally:
            self.target.train(was_training)
            for h in handles:
                h.remove()
        missing = [n for n in self.target_stages if n not in stage_shapes]
        if missing:
            raise ValueError(f"target stages {missing} did not run in a forward pass")
        return [stage_shapes[n] for n in self.target_stages], taps

    def extra_repr(self) -> str:
        return (f"target_stages={self.target_stages}, substitute_stats={self.substitute_stats!r}, "
                f"encoder={self.encoder!r}")


def _module_names(module: nn.Module, limit: int = 40) -> str:
    """Its module names down to one dot (``layer1``, ``layer1.0``), for a one-line message."""
    names = [n for n, _ in module.named_modules() if n and n.count(".") <= 1]
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def replace_adaptive_with_bn(model: ABNN) -> nn.Module:
    """The ABNN target with its adaptive layers replaced by their ordinary BatchNorm (the
    ``bn`` inside each layer, i.e. eq. 1), as a standalone model: for transfer attacks."""
    import copy

    target = copy.deepcopy(model.target)
    target._forward_hooks.clear()
    for name in model.target_stages:
        module = target.get_submodule(name)
        module._forward_hooks.clear()
        bn = copy.deepcopy(model.adaptive[name.replace(".", "_")].bn)
        module.register_forward_hook(lambda m, i, o, bn=bn: bn(o))
        setattr(module, "_abnn_plain_bn", bn)
    return target

