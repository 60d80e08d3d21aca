"""Flags of the ``abnn`` command (front-door level, imported by :mod:`abnn.cli` only): the
flags of :class:`~abnn.config.TrainConfig`, built from its fields, and argparse helpers.

Each field's metadata (see :func:`abnn.config._setting`) states its help, flag, choices and
parsing once; ``abnn train`` and ``abnn pretrain-substitute`` get one flag per field, and
:func:`config_from_args` reads them back by field name.  A field added to ``TrainConfig`` with
help text therefore becomes a flag without another edit.

    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig())
    cfg = config_from_args(parser.parse_args(["--lr", "0.05", "--val-size", "-1"]))   # lr 0.05, val_size None
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from typing import Any, Callable, Iterator

from .attacks.registry import pixel_budget_type
from .config import TARGET, TrainConfig, flag_of

__all__ = ["Parser", "Renamed", "add_config_flags", "call_with_flags", "config_from_args", "flag_fields"]

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def flag_fields(*, target: bool = True) -> Iterator[dataclasses.Field]:
    """The fields that have a flag (help text and no ``flag: None``); ``target=False`` leaves
    out those of :data:`~abnn.config.TARGET` scope (a pretrained substitute has none)."""
    for f in dataclasses.fields(TrainConfig):
        if "help" in f.metadata and f.metadata.get("flag", "") is not None and (
                target or f.metadata.get("scope") != TARGET):
            yield f


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _size_or_all(text: str) -> int | None:
    n = int(text)
    return None if n == -1 else n


_PARSERS: dict[str, Callable[[str], Any]] = {"list": _names, "all=-1": _size_or_all}


def _shown(value: Any, parse: str | None) -> str:
    if parse == "pixels":
        return f"{value * 255:g}/255"
    if parse == "all=-1" and value is None:
        return "-1 (all)"
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig, *, target: bool = True,
                     groups: dict[str, Any] | None = None, **overrides: dict[str, Any]) -> None:
    """Add one flag per :func:`flag_fields` field, its default taken from ``defaults`` and its
    destination the field's name; flags ``parser`` has already (``--threads``) are skipped.
    ``groups``: an argument group per metadata key (``{"execution": group}``); ``overrides``:
    ``add_argument`` keywords per field name (``method={"choices": ...}``)."""
    for f in flag_fields(target=target):
        flag, meta, default = flag_of(f.name), f.metadata, getattr(defaults, f.name)
        if flag in parser._option_string_actions:
            continue
        where = next((g for key, g in (groups or {}).items() if meta.get(key)), parser)
        if isinstance(default, bool):
            kw: dict[str, Any] = {"action": "store_false" if default else "store_true"}
        else:
            parse = (pixel_budget_type(flag, positive=True) if meta.get("parse") == "pixels" else
                     _PARSERS.get(meta.get("parse")) or _TYPES[str(f.type).split("|")[0].strip()])
            kw = {"type": parse, "choices": meta.get("choices"), "metavar": meta.get("metavar")}
        help_ = meta["help"]
        if (default is not None or meta.get("parse") == "all=-1") and not isinstance(default, bool) \
                and "default" not in help_:
            help_ += f" (default {_shown(default, meta.get('parse'))})"
        where.add_argument(flag, **{"dest": f.name, "default": default, "help": help_, **kw, **overrides.get(f.name, {})})


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (every field present in ``args`` by name, the
    rest at their defaults, ``fixed`` on top), checked (:func:`abnn.training.check_config`)."""
    from .training.methods import check_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return check_config(TrainConfig(**{**given, **fixed}))


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``abnn: error: ...`` line, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"abnn: error: {message} (`{self.prog} --help` lists the options)\n")


class Renamed(argparse.Action):
    """A deprecated flag: it still works (``dest`` = ``const``) and says its new spelling in one line."""

    def __init__(self, option_strings, dest, *, note: str, const: Any = True, **kw) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, **kw)
        self.note = note

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"abnn: note: {option_string} is deprecated: {self.note}", file=sys.stderr)
        setattr(namespace, self.dest, self.const)


def call_with_flags(fn: Callable[..., Any], args: argparse.Namespace, **fixed: Any) -> Any:
    """``fn`` called with the parsed flags named as its parameters (a function, or a dataclass
    such as :class:`~abnn.evaluation.command.EvalSettings`), ``fixed`` on top."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in vars(args).items() if k in names} | fixed)
