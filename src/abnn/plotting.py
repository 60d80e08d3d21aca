"""Figures: the one place that chooses matplotlib's backend.

Reports write PNG files and never open a window, so they draw with the file-only ``Agg``
backend, unless the user chose another one with ``MPLBACKEND``.  Every report module gets
pyplot from :func:`pyplot`, never by importing it itself.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["pyplot"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, with the ``Agg`` backend unless ``MPLBACKEND`` names another."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    return plt
