"""Exception types of geneface-jax: one type per kind of problem.

Every error names the offending file (when there is one) and says what was wrong, so a
command-line entry point can print `str(err)` and exit non-zero without a traceback.
"""


class GenefaceError(Exception):
    """Base class of all errors raised on bad input by geneface-jax."""


class AudioError(GenefaceError):
    """An audio input is unusable: not audio, empty, too short, or non-finite samples."""


class DatasetError(GenefaceError):
    """A dataset directory is missing, incomplete, of the wrong kind or inconsistent."""


class ShapeError(GenefaceError, ValueError):
    """An array argument has the wrong rank, size or dtype."""


class InputError(GenefaceError, ValueError):
    """A numeric input has the right shape but invalid values: NaN or inf, a camera
    rotation that is not orthonormal."""


class CheckpointError(GenefaceError):
    """A checkpoint directory is missing, or holds a different config or stage."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files are damaged: truncated or missing array files, unreadable
    metadata. Names the checkpoint's directory; `step` is its step."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.step = step


class WorkdirError(GenefaceError):
    """A run directory cannot be used: it cannot be written, or its disk is too full to
    hold one checkpoint."""


class Preempted(GenefaceError):
    """Training stopped on SIGTERM / SIGINT (or a multi-host preemption notice) after
    saving a checkpoint at `step`: rerunning the same command resumes from there.
    Entry points exit with `PREEMPTED_EXIT_STATUS` (75, EX_TEMPFAIL: try again)."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.step = step


PREEMPTED_EXIT_STATUS = 75


class VideoError(GenefaceError):
    """A video input is unusable: unreadable, no face, no audio track, too few frames."""
