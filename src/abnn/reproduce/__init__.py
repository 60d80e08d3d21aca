"""Reproductions of the paper's tables: presets and pipelines (substitute -> methods -> evaluation -> report)."""

from .presets import PAPER_TABLE1, PRESETS, Table1Preset, get_preset
from .table1 import run_table1

__all__ = ["PAPER_TABLE1", "PRESETS", "Table1Preset", "get_preset", "run_table1"]
