"""The attack registry: every attack by name, with its defaults stated once.

    from abnn.attacks import build_attack, parse_spec
    atk = build_attack("pgd", model)                         # eps 8/255, alpha 2/255, 5 steps, random start
    atk = build_attack("apgd-t", model, steps=20, video=True)  # clips: eps 1/255
    spec = parse_spec("pgd:eps=8/255,steps=20")               # the syntax of `abnn evaluate --attack`

An attack's defaults are the keyword defaults of its class, so ``PGD(model)`` and
``build_attack("pgd", model)`` are the same attack; an entry states only what differs from them:
the video defaults of METHOD.md s. 4 (eps 1/255, alpha eps/4) and, for transfer attacks, where
the source comes from.  :func:`register` adds an attack; it then appears in
``abnn evaluate --attack`` and ``--list-attacks``, in the runner and in the suites.  This module
is the mechanism only and imports no attack; the built-in entries are in
:mod:`abnn.attacks.builtin`, registered when :mod:`abnn.attacks` is imported.

Units: in the API, ``eps`` and ``alpha`` are fractions of the pixel range (``eps=8/255``).  In
spec strings and on the command line they count in 1/255 of the pixel range: ``eps=8`` and
``eps=8/255`` both mean 8/255 (``8/255`` is parsed exactly), and a bare value below 1
(``eps=0.03``) is refused as ambiguous, with the two ways to write what was meant.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import Attack, AttackOptionError, _fmt

__all__ = ["AttackEntry", "AttackSpec", "EpsRatio", "REGISTRY", "BLACK_BOX", "ENSEMBLE", "PROTOCOL", "TRANSFER",
           "WHITE_BOX",
           "attack_defaults", "build_attack", "default_eps", "describe_attacks", "get_entry", "parse_pixel_budget",
           "parse_bool", "parse_spec", "register", "resolve_options", "unregister"]

WHITE_BOX, BLACK_BOX, TRANSFER, ENSEMBLE = "white-box", "black-box", "transfer", "ensemble"
#: a white-box attack whose gradient skips part of the model (:mod:`abnn.attacks.protocols`)
PROTOCOL = "weaker threat model"
#: options that are pixel budgets: 1/255 units in spec strings and on the command line
PIXEL_BUDGETS = ("eps", "alpha")
#: options every attack takes (see :class:`~abnn.attacks.base.Attack`); not listed as defaults
COMMON = ("seed", "channels_last", "amp")


@dataclass(frozen=True)
class EpsRatio:
    """A default relative to the resolved eps: ``eps / divisor`` (METHOD.md s. 4: alpha = eps/4 for video)."""

    divisor: float

    def __repr__(self) -> str:
        return f"eps/{self.divisor:g}"


@dataclass(frozen=True)
class AttackEntry:
    """One registered attack.

    Attributes:
        name: the registry name (``abnn evaluate --attack NAME``).
        cls: the attack class; its keyword defaults are the entry's defaults.
        summary: one line for ``--list-attacks`` (cite the source paper).
        kind: white-box, black-box, transfer, ensemble, or weaker threat model (a protocol of
            :mod:`abnn.attacks.protocols`; the masking checks compare kinds).
        norm: ``"linf"`` for an attack in the L-inf eps-ball; ``None`` for another threat model
            (ROA's sticker), which the worst case over the eps-ball leaves out.
        fixed: options the entry fixes (e.g. APGD's loss for ``apgd-ce``); not user options.
        defaults: defaults that differ from the class signature.
        video: defaults for clips (B, C, T, H, W), on top of ``defaults``.
        builder: ``builder(model, video=..., **options) -> Attack``; default ``cls(model, **options)``.
        inner: the options are those of an inner attack named by option ``attack`` (transfer,
            protocols).
        requires: what the attack needs, shown by ``--list-attacks``.
        images_only: refuses clips.
    """

    name: str
    cls: type[Attack]
    summary: str
    kind: str = WHITE_BOX
    norm: str | None = "linf"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    video: Mapping[str, Any] = field(default_factory=lambda: {"eps": 1 / 255})
    builder: Callable[..., Attack] | None = None
    inner: bool = False
    requires: str = ""
    images_only: bool = False

    def build(self, model: nn.Module, options: Mapping[str, Any], *, video: bool) -> Attack:
        if self.images_only and video:
            raise AttackOptionError(f"attack {self.name!r} runs on images only, not on clips")
        if self.builder is not None:
            return self.builder(model, video=video, **options)
        return self.cls(model, **self.fixed, **options)


REGISTRY: dict[str, AttackEntry] = {}


def register(entry: AttackEntry, *, replace: bool = False) -> AttackEntry:
    """Add ``entry`` to the registry (``replace`` an entry of the same name explicitly)."""
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"attack {entry.name!r} is registered already; pass replace=True to replace it")
    if not entry.name or any(c in entry.name for c in ":,= "):
        raise ValueError(f"attack names cannot be empty or contain ':', ',', '=' or spaces; got {entry.name!r}")
    REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get_entry(name: str) -> AttackEntry:
    if name not in REGISTRY:
        raise AttackOptionError(f"unknown attack {name!r}; choose from {', '.join(REGISTRY)} "
                                "(`abnn evaluate --list-attacks` shows their options)")
    return REGISTRY[name]


# ------------------------------------------------------------------------------------ defaults


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, model
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in COMMON}


def attack_defaults(name: str, *, video: bool = False, attack: str | None = None) -> dict[str, Any]:
    """The defaults of attack ``name`` (for clips when ``video``); relative values stay
    :class:`EpsRatio`.  For transfer entries, those of the inner ``attack`` (default pgd)."""
    entry = get_entry(name)
    if entry.inner:
        inner = attack or entry.defaults.get("attack", "pgd")
        if get_entry(inner).inner:
            raise AttackOptionError(f"{name}: the inner attack cannot itself be a transfer attack ({inner!r})")
        return {"attack": inner, **attack_defaults(inner, video=video)}
    out = {k: v for k, v in _signature_defaults(entry.cls).items() if k not in entry.fixed}
    out.update(entry.defaults)
    if video:
        out.update(entry.video)
    return out


def default_eps(*, video: bool) -> float:
    """The evaluated eps: 8/255 for images, 1/255 for clips (METHOD.md s. 4)."""
    return attack_defaults("pgd", video=video)["eps"]


def resolve_options(name: str, overrides: Mapping[str, Any] | None = None, *, video: bool = False) -> dict[str, Any]:
    """Defaults of ``name`` with ``overrides`` on top: string values parsed as in spec strings,
    unknown option names refused, :class:`EpsRatio` values resolved against eps."""
    entry = get_entry(name)
    given = {k: parse_value(k, v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}
    base = attack_defaults(name, video=video, attack=given.get("attack"))
    known = set(base) | set(COMMON) | ({"source"} if entry.inner else set())
    unknown = [k for k in given if k not in known]
    if unknown:
        raise AttackOptionError(f"attack {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                                f"{', '.join(sorted(known))}")
    for k, v in given.items():  # a boolean option (one whose default is a bool) takes booleans only
        if isinstance(base.get(k), bool) and not isinstance(v, bool):
            given[k] = parse_bool(str(v), what=f"{name}: {k}")
    opts = {**base, **given}
    for k, v in opts.items():
        if isinstance(v, EpsRatio):
            opts[k] = opts["eps"] / v.divisor
    return opts


def build_attack(name: str, model: nn.Module, *, video: bool = False, **overrides: Any) -> Attack:
    """The registered attack ``name`` on ``model``, with its defaults (for clips when ``video``)
    and ``overrides`` (fractions of the pixel range for eps and alpha; strings are parsed as in
    spec strings, so ``eps="8/255"`` works too)."""
    entry = get_entry(name)
    return entry.build(model, resolve_options(name, overrides, video=video), video=video)


# -------------------------------------------------------------------------------- spec strings


@dataclass(frozen=True)
class AttackSpec:
    """An attack to run: a registry ``name`` with ``options`` (API units: eps as a fraction).

    ``label`` names the result (default: the canonical spec text, e.g. ``"pgd:steps=20"``);
    ``group`` sorts results in reports (``"attack"``, or a suite's sweep); ``seed_key`` is the
    name the per-attack seed is derived from (default: the label), so that, e.g., the points of
    a steps sweep share their random start."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None
    group: str = "attack"
    seed_key: str | None = None

    @property
    def text(self) -> str:
        """The spec in the ``NAME:key=value,...`` syntax (budgets in k/255)."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_spec_value(k, v)}" for k, v in self.options.items())

    @property
    def key(self) -> str:
        return self.label or self.text


def _spec_value(key: str, value: Any) -> str:
    if key in PIXEL_BUDGETS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value * 255:.6g}/255"
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)


def parse_spec(spec: str | AttackSpec) -> AttackSpec:
    """``"NAME"`` or ``"NAME:key=value,key=value"`` -> :class:`AttackSpec` (values parsed:
    budgets in k/255, then bools, None, integers, numbers, fractions, else strings)."""
    if isinstance(spec, AttackSpec):
        get_entry(spec.name)
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise AttackOptionError(f"an attack is a name or NAME:key=value,... (e.g. pgd:eps=8/255,steps=20); got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    get_entry(name)
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise AttackOptionError(f"bad attack option {item!r} in {spec!r}; write NAME:key=value,key=value "
                                    "(e.g. pgd:eps=8/255,steps=20)")
        options[key] = parse_value(key, value)
    return AttackSpec(name, options)


#: the spellings of a boolean in spec strings and ``--set`` (any case)
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_bool(text: str, *, what: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case) -> bool; anything else is refused."""
    try:
        return BOOL_WORDS[str(text).strip().lower()]
    except KeyError:
        raise AttackOptionError(f"{what} must be a boolean (true/false, 1/0, yes/no, on/off), got {text!r}") from None


def parse_value(key: str, text: str) -> Any:
    """A spec-string value: budgets in k/255, then bools (true/false, yes/no, on/off), None,
    integers, numbers, fractions, else the string.  ``1``/``0`` stay integers here;
    :func:`resolve_options` reads them as booleans for a boolean option."""
    if key in PIXEL_BUDGETS:
        return parse_pixel_budget(text, what=key)
    low = text.lower()
    if low in BOOL_WORDS and not low.isdigit():
        return BOOL_WORDS[low]
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    num, slash, den = text.partition("/")
    if slash:
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    return text


def parse_pixel_budget(text: str | float, *, what: str = "eps") -> float:
    """A budget written in 1/255 of the pixel range: ``"8"`` or ``"8/255"`` -> 8/255 (exactly).

    Refused, with how to write it: non-numbers, NaN and infinities, negatives, more than the whole
    pixel range (k > 255), and bare values in (0, 1) (``0.03`` is more likely a fraction of the
    pixel range than 0.03/255)."""
    raw = str(text).strip()
    num, slash, den = raw.partition("/")
    try:
        k = float(num)
        if slash and float(den) != 255:
            raise ValueError
    except ValueError:
        raise AttackOptionError(f"{what} {raw!r} is not a budget; write it in 1/255 of the pixel range, "
                                f"e.g. {what} 8 or {what} 8/255") from None
    if not math.isfinite(k) or k < 0:
        raise AttackOptionError(f"{what} must be a finite number >= 0 in 1/255 of the pixel range "
                                f"(e.g. {what} 8/255), got {raw!r}")
    if k > 255:
        raise AttackOptionError(f"{what} {raw} is more than the whole pixel range (255/255); {what} counts in 1/255 "
                                f"of the pixel range, e.g. {what} 8/255 (for a fraction f of the range write f*255)")
    if not slash and 0 < k < 1:
        raise AttackOptionError(f"{what} {raw} is ambiguous: {what} counts in 1/255 of the pixel range ({what} 8 means "
                                f"8/255); for {raw} of the pixel range write {what} {k * 255:.6g}, for {raw}/255 write "
                                f"{what} {raw}/255")
    return k / 255


def pixel_budget_type(what: str, *, positive: bool = False) -> Callable[[str], float]:
    """:func:`parse_pixel_budget` as an argparse ``type`` (a flag's error is argparse's one line):
    ``10`` and ``10/255`` both mean 10/255; a bare value in (0, 1) is refused as ambiguous;
    ``positive`` also refuses 0."""
    def parse(text: str) -> float:
        try:
            value = parse_pixel_budget(text, what=what)
        except AttackOptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if positive and value == 0:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a positive budget; write it as k/255, e.g. 10/255")
        return value
    return parse


# ------------------------------------------------------------------------------ --list-attacks


def _show(key: str, value: Any) -> str:
    if key in PIXEL_BUDGETS and isinstance(value, float):
        return _fmt(value) if value > 0 else "0"
    return repr(value) if isinstance(value, str) else str(value)


def describe_attacks() -> str:
    """The text of ``abnn evaluate --list-attacks``: every attack with its defaults."""
    lines = ["Attacks (abnn evaluate --attack NAME or NAME:key=value,...; eps and alpha in 1/255 of the pixel",
             "range: eps=8 or eps=8/255). Defaults for images; 'clips' lists what differs for video.", ""]
    for name, entry in REGISTRY.items():
        lines.append(f"{name}  [{entry.kind}{'' if entry.norm else ', not an eps-ball attack'}]  {entry.summary}")
        img = attack_defaults(name)
        lines.append("    " + ", ".join(f"{k}={_show(k, v)}" for k, v in img.items()))
        if not entry.images_only:
            vid = {k: v for k, v in attack_defaults(name, video=True).items() if img.get(k) != v}
            if vid:
                lines.append("    clips: " + ", ".join(f"{k}={_show(k, v)}" for k, v in vid.items()))
        if entry.requires:
            lines.append(f"    needs {entry.requires}")
    return "\n".join(lines)
