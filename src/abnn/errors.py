"""Errors that the CLI turns into one clear line (never a traceback)."""


class AbnnError(Exception):
    """A problem the user can fix: bad input, missing data, a bad checkpoint or flag.
    The message says what was expected and how to fix it."""


class DataNotFoundError(AbnnError, FileNotFoundError):
    """A dataset is neither under the data root nor downloadable."""


class CheckpointError(AbnnError):
    """A checkpoint is missing, corrupt, unsafe, or for another architecture."""
