"""Attacks on [0, 1] inputs, torchattacks style: ``x_adv = PGD(model, eps=8/255)(x, y)``."""

from .base import Attack, InvalidInputError
from .pgd import PGD
from .roa import ROA

__all__ = ["Attack", "InvalidInputError", "PGD", "ROA"]
