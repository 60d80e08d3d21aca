"""Errors that the CLI turns into one clear line (never a traceback)."""


class AbnnError(Exception):
    """A problem the user can fix: bad input, missing data, a bad checkpoint or flag.
    The message says what was expected and how to fix it."""


class DataNotFoundError(AbnnError, FileNotFoundError):
    """A dataset is neither under the data root nor downloadable."""


class CheckpointError(AbnnError):
    """A checkpoint is missing, corrupt, unsafe, or for another architecture."""


class WriteError(AbnnError):
    """An output file or folder cannot be written (read-only, a file in the way, full disk)."""


class RunLockedError(AbnnError):
    """Another live process holds the run folder's lock (see :func:`abnn.runs.run_lock`)."""


class SettingsMismatchError(AbnnError):
    """A run folder was recorded with other run-defining settings than the ones given.
    ``differences`` lists them (:class:`abnn.config.SettingDifference`)."""

    def __init__(self, message: str, differences: list) -> None:
        super().__init__(message)
        self.differences = differences


class DivergedError(AbnnError):
    """Training produced a non-finite loss; the run stopped before saving diverged weights."""


class InputRangeError(AbnnError, ValueError):
    """A model input that is not finite pixels in [0, 1] (the models normalise internally)."""


class ModelSpecError(AbnnError, ValueError):
    """A model that cannot be assembled as asked: ABNN target stages or substitute taps that
    are not module names, or that do not pair up."""
