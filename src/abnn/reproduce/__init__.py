"""Reproductions of the paper's tables: presets and pipelines (substitute -> methods -> evaluation -> report)."""

from .presets import PRESETS, VIDEO_PRESETS, Table1Preset, VideoPreset, get_preset, get_video_preset, preset_names
from .table1 import run_table1
from .video import run_video_tables

__all__ = ["PRESETS", "VIDEO_PRESETS", "Table1Preset", "VideoPreset", "get_preset", "get_video_preset", "preset_names",
           "run_table1", "run_video_tables"]
