"""Attacks on [0, 1] inputs, torchattacks style: ``x_adv = PGD(model, eps=8/255)(x, y)``."""

from .base import Attack, InvalidInputError
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .pgd import PGD
from .roa import ROA
from .square import Square
from .adaptive import StatisticsAttack, Transfer, TransferAttack

__all__ = ["Attack", "InvalidInputError", "PGD", "ROA"]
__all__ += ["APGD", "APGDT", "Square", "AutoAttack"]
__all__ += ["StatisticsAttack", "Transfer", "TransferAttack"]
