"""Attacks on [0, 1] inputs, torchattacks style: ``x_adv = PGD(model, eps=8/255)(x, y)``.

Every attack is also registered by name with its defaults (:mod:`abnn.attacks.registry`):
``build_attack("apgd-ce", model, steps=20)``; ``abnn evaluate --list-attacks`` lists them.
"""

from .base import (Attack, AttackOptionError, FirstFooled, InvalidInputError, UnsupportedModelError, check_budget,
                   check_count)
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .official import MissingPackageError, OfficialAutoAttack
from .pgd import PGD
from .roa import ROA
from .square import Square
from .adaptive import StatisticsAttack, Transfer
from .protocols import ProtocolAttack
from .registry import (BLACK_BOX, ENSEMBLE, PROTOCOL, REGISTRY, TRANSFER, WHITE_BOX, AttackEntry, AttackSpec, EpsRatio,
                       attack_defaults, build_attack, default_eps, describe_attacks, parse_bool, parse_pixel_budget,
                       parse_spec, pixel_budget_type, register, resolve_options, unregister)
from . import builtin  # noqa: F401  (registers the built-in attacks)

__all__ = ["Attack", "AttackOptionError", "FirstFooled", "InvalidInputError", "UnsupportedModelError", "check_budget",
           "check_count", "MissingPackageError"]
__all__ += ["PGD", "ROA", "APGD", "APGDT", "Square", "AutoAttack", "OfficialAutoAttack"]
__all__ += ["StatisticsAttack", "Transfer", "ProtocolAttack"]
__all__ += ["REGISTRY", "AttackEntry", "AttackSpec", "EpsRatio", "WHITE_BOX", "BLACK_BOX", "TRANSFER", "ENSEMBLE",
            "PROTOCOL",
            "attack_defaults", "build_attack", "default_eps", "describe_attacks", "parse_bool", "parse_pixel_budget",
            "parse_spec", "pixel_budget_type", "register", "resolve_options", "unregister"]
