"""The ABNN framework (paper s. 2, Figure 2): a target model and a frozen substitute.

One input runs through both models.  After each named stage of the target, an adaptive BN
layer (eq. 2) replaces the stage output ``z_t`` by ``AdaptiveBN(z_t, z_s)``, where ``z_s`` is the
substitute's feature at the paired tap (:meth:`ABNN._adapt_stage`, the one place where ``z_s``
enters the target).  The substitute is frozen (eval mode, no parameter gradients, never updated)
but stays inside the autograd graph with respect to the input, so a white-box attacker
differentiates through target, substitute and statistics alike.

Weaker threat models (forensics, issue 19): :meth:`ABNN.gradient_protocol` changes what an
attacker's gradient goes through -- the substitute's features, only their moments, only the
AdaIN encoder, the type-A shortcuts, or the target's BN statistics -- without changing the
model (:data:`PROTOCOLS`, :class:`GradientProtocol`, :class:`ProtocolView`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import InputRangeError, ModelSpecError
from .layers import AdaptiveBatchNorm2d, AdaptiveBatchNorm3d, EncoderKind, SubstituteStats, SubstituteStd
from .models.common import ZeroPadShortcut

__all__ = ["ABNN", "GradientProtocol", "PROTOCOLS", "ProtocolView", "replace_adaptive_with_bn"]


@dataclass(frozen=True)
class GradientProtocol:
    """What an attacker's gradient does NOT go through (a weaker threat model than white-box).

    Forward values are unchanged by the four ``detach_*`` fields (only the backward pass is cut);
    ``clean_substitute`` and ``train_bn`` change the forward used for crafting.  Scoring always
    uses the unmodified model.

    Attributes:
        detach_substitute: ``z_s`` constant: mu_s, sigma_s, gamma_s, beta_s all detached (the
            paper's s. 3.1 remark that "the adversary focuses more on the target model").
        detach_stats: only ``(mu_s, sigma_s)`` of eq. (2) detached.
        detach_encoder: only ``(gamma_s, beta_s) = AdaIN(z_s)`` of eq. (2) detached.
        clean_substitute: the substitute sees the clean image (the attack cannot move ``z_s``).
        train_bn: the target's BatchNorm (its own and the adaptive layers' ``bn``) normalises with
            the attacked batch's statistics (train mode) without updating its running statistics.
        detach_type_a: the substitute's type-A zero-pad shortcuts are built from detached data
            (the authors' released 3D ResNet-18: ``torch.cat([out.data, zero_pads])``).
    """

    detach_substitute: bool = False
    detach_stats: bool = False
    detach_encoder: bool = False
    clean_substitute: bool = False
    train_bn: bool = False
    detach_type_a: bool = False


#: The named protocols (registry entries ``pgd-<name>``, :mod:`abnn.attacks.protocols`).
PROTOCOLS: dict[str, GradientProtocol] = {
    "target-only": GradientProtocol(detach_substitute=True),
    "no-encoder-grad": GradientProtocol(detach_encoder=True),
    "no-stats-grad": GradientProtocol(detach_stats=True),
    "clean-substitute": GradientProtocol(clean_substitute=True),
    "train-bn": GradientProtocol(train_bn=True),
    "typeA-detach": GradientProtocol(detach_type_a=True),
}


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
        substitute_stats, encoder, bn_affine, encoder_hidden, max_flatten_params, substitute_std:
            passed to every :class:`~abnn.layers.AdaptiveBatchNorm` (``METHOD.md`` s. 1;
            ``substitute_std="unbiased"`` is the authors' ``torch.std``).
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
        substitute_std: SubstituteStd = "biased",
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
                affine=bn_affine, encoder_hidden=encoder_hidden, substitute_std=substitute_std, **extra,
            )
            for name, shape_t, shape_s in zip(self.target_stages, stage_shapes, tap_shapes)
        })
        self.encoder = encoder
        self.substitute_std = substitute_std

        # the substitute's features of the current forward pass, per target stage, until the
        # stage has taken them (see _adapt_stage); None outside a forward pass
        self._z_s_by_stage: dict[str, tuple[Tensor, Tensor]] | None = None
        self._protocol: GradientProtocol | None = None
        # z_s enters the target here: after each paired stage, _adapt_stage applies eq. (2).
        # Bound-method partials (not closures), so that copy.deepcopy(abnn) rebinds the hooks
        # to the copy instead of the original.
        for name in self.target_stages:
            modules_t[name].register_forward_hook(functools.partial(self._adapt_stage, name))

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
    def _adapt_stage(self, name: str, module: nn.Module, inputs: tuple[Tensor, ...], z_t: Tensor) -> Tensor:
        """Where the substitute's features enter the target: eq. (2) at target stage ``name``.

        A forward hook on the stage (registered in ``__init__``) replaces its output ``z_t`` by

            z'_t = gamma_s [ sigma(z_s) (z_t - mu(z_t)) / sigma(z_t) + mu(z_s) ] + beta_s,

        the stage's adaptive layer ``self.adaptive[name]``, with ``mu(z_s), sigma(z_s)`` from the
        substitute feature ``z_s`` at the paired tap and ``gamma_s, beta_s`` from that layer's
        AdaIN encoder of ``z_s``.  :meth:`target_forward` hands each stage its ``z_s`` (two
        tensors: the one for the moments and the one for the encoder, which differ only under
        :meth:`gradient_protocol`) for exactly one forward pass of the target."""
        if self._z_s_by_stage is None:
            raise RuntimeError(
                f"stage {name!r} of an ABNN target ran without substitute features: call the ABNN "
                "module, not abnn.target directly"
            )
        try:
            z_s_stats, z_s_encoder = self._z_s_by_stage.pop(name)
        except KeyError:
            raise RuntimeError(f"stage {name!r} ran twice in one forward; ABNN stages must run once") from None
        return self.adaptive[name.replace(".", "_")](z_t, z_s_stats, z_s_encoder)

    def forward(self, x: Tensor, *, substitute_input: Tensor | None = None) -> Tensor:
        """Logits of eq. (2)'s framework on ``x`` (pixels in [0, 1]).

        ``substitute_input``: feed the substitute another input of the same shape (default
        ``x``): the target path runs on ``x`` and its adaptive layers take the statistics of
        the substitute's features of ``substitute_input`` (the path swap of
        :func:`abnn.evaluation.attribution.path_swap`).  Inside :meth:`gradient_protocol` the
        active protocol's detaching applies."""
        self.check_tensor(x)
        if self.check_input and not torch.compiler.is_compiling():
            self.check_pixels(x)
        xs = x
        if substitute_input is not None:
            if substitute_input.shape != x.shape:
                raise ValueError(f"substitute_input must have the shape of x {tuple(x.shape)}, "
                                 f"got {tuple(substitute_input.shape)}")
            if self.check_input and not torch.compiler.is_compiling():
                self.check_pixels(substitute_input)
            xs = substitute_input
        p = self._protocol or GradientProtocol()
        with torch.no_grad() if p.detach_substitute else contextlib.nullcontext():
            feats = self.substitute_features(xs)
        stats = [f.detach() for f in feats] if p.detach_stats else feats
        enc = [f.detach() for f in feats] if p.detach_encoder else feats
        return self.target_forward(x, stats, enc)

    def target_forward(self, x: Tensor, stats_features: Sequence[Tensor], encoder_features: Sequence[Tensor]) -> Tensor:
        """The target path on ``x`` with given substitute features per stage: ``(mu_s, sigma_s)``
        of eq. (2) from ``stats_features[k]``, ``(gamma_s, beta_s)`` from ``encoder_features[k]``.
        ``forward`` passes the substitute's features of the input as both; the gradient
        attribution passes detached leaves to separate the paths (no input checks here)."""
        if len(stats_features) != len(self.target_stages) or len(encoder_features) != len(self.target_stages):
            raise ValueError(f"need {len(self.target_stages)} substitute features per kind, got "
                             f"{len(stats_features)} and {len(encoder_features)}")
        self._z_s_by_stage = dict(zip(self.target_stages, zip(stats_features, encoder_features)))
        try:
            return self.target(x)  # each paired stage takes its z_s in _adapt_stage (eq. (2))
        finally:
            self._z_s_by_stage = None

    # -- weaker threat models -----------------------------------------------------------------------
    def type_a_shortcuts(self) -> list[ZeroPadShortcut]:
        """The substitute's type-A zero-pad shortcuts (:class:`~abnn.models.common.ZeroPadShortcut`)."""
        return [m for m in self.substitute.modules() if isinstance(m, ZeroPadShortcut)]

    @contextlib.contextmanager
    def gradient_protocol(self, protocol: str | GradientProtocol) -> Iterator[GradientProtocol]:
        """Within the block, forward passes use ``protocol`` (a name of :data:`PROTOCOLS` or a
        :class:`GradientProtocol`); on exit every flag and mode is as before.  The one mechanism
        of the weaker threat models: the ``detach_*`` fields cut the backward pass only (the
        logits are bit-identical); ``train_bn`` switches the target's BatchNorm layers to batch
        statistics without touching their running statistics; ``clean_substitute`` is honoured
        by :class:`ProtocolView`, which passes the clean image as ``substitute_input``.

        Example::

            with model.gradient_protocol("target-only"):
                loss = F.cross_entropy(model(x), y)   # d loss / dx through the target path only
        """
        p = PROTOCOLS[protocol] if isinstance(protocol, str) and protocol in PROTOCOLS else protocol
        if not isinstance(p, GradientProtocol):
            raise ValueError(f"unknown gradient protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        shortcuts = self.type_a_shortcuts() if p.detach_type_a else []
        if p.detach_type_a and not shortcuts:
            raise ValueError(f"protocol typeA-detach needs a substitute with type-A zero-pad shortcuts; "
                             f"{type(self.substitute).__name__} has none")
        bns = [m for m in (*self.target.modules(), *self.adaptive.modules())
               if isinstance(m, nn.modules.batchnorm._BatchNorm)] if p.train_bn else []
        saved = (self._protocol, [m.detach_input for m in shortcuts], [(m.training, m.track_running_stats) for m in bns])
        self._protocol = p
        try:
            for m in shortcuts:
                m.detach_input = True
            for m in bns:  # batch statistics, running statistics neither used nor updated
                m.training, m.track_running_stats = True, False
            yield p
        finally:
            self._protocol = saved[0]
            for m, d in zip(shortcuts, saved[1]):
                m.detach_input = d
            for m, (t, r) in zip(bns, saved[2]):
                m.training, m.track_running_stats = t, r

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
                f"encoder={self.encoder!r}" + ("" if self.substitute_std == "biased"
                                                 else f", substitute_std={self.substitute_std!r}"))


class ProtocolView(nn.Module):
    """``model`` seen through a gradient protocol: ``view(x)`` is ``model(x)`` inside
    ``model.gradient_protocol(protocol)`` (with ``substitute_input=view.clean`` for
    ``clean_substitute``).  An attack crafts on the view; the model itself is unchanged and is
    what scores the result (:class:`abnn.attacks.ProtocolAttack`).  The view's train/eval mode is
    the model's (it holds no parameters of its own and does not register ``model`` as a child).

    ``clean``: the clean batch for ``clean_substitute`` (set by the attack for one call); an
    input batch of another size (e.g. a restart on a subset) is refused.
    """

    def __init__(self, model: ABNN, protocol: str | GradientProtocol) -> None:
        super().__init__()
        if not isinstance(model, ABNN):
            raise TypeError(f"a gradient protocol needs an ABNN model, got {type(model).__name__}")
        with model.gradient_protocol(protocol) as p:  # validates the name and the model (type-A shortcuts)
            self.protocol = p
        self.name = protocol if isinstance(protocol, str) else repr(protocol)
        object.__setattr__(self, "model", model)   # not a child: modes and state dicts stay the model's
        self.clean: Tensor | None = None

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.model.training

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # nn.Module.__init__ sets it; the mode is the model's

    def train(self, mode: bool = True) -> "ProtocolView":
        self.model.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        sub = None
        if self.protocol.clean_substitute:
            if self.clean is None or self.clean.shape != x.shape:
                raise RuntimeError("protocol clean-substitute needs the clean batch of the same shape "
                                   "(view.clean); run it through ProtocolAttack with restarts=1")
            sub = self.clean
        with self.model.gradient_protocol(self.protocol):
            return self.model(x, substitute_input=sub)

    def extra_repr(self) -> str:
        return f"protocol={self.name!r}"


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

