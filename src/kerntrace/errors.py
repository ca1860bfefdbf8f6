"""The exceptions kerntrace raises, and its own warnings.

Each exception subclasses the built-in exception a caller would already
catch, so ``except ValueError`` keeps working, and each message says what
was wrong, the value seen and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "KerntraceError",
    "ConfigurationError",
    "OrderError",
    "StoreMismatchError",
    "StoreCorruptError",
    "StoreWriteError",
    "StoreBusyError",
    "CheckpointFormatError",
    "BatchError",
    "NonFiniteGradientError",
    "NumericalError",
    "ModelModeError",
    "PrecisionWarning",
    "IllConditionedWarning",
]


class KerntraceError(Exception):
    """Base class of every error kerntrace raises on purpose."""


class ConfigurationError(KerntraceError, ValueError):
    """An argument has a value kerntrace cannot work with."""


class OrderError(KerntraceError, RuntimeError):
    """A method was called before the step it depends on."""


class StoreMismatchError(KerntraceError, ValueError):
    """A save directory holds results made with different settings."""


class StoreCorruptError(KerntraceError, OSError):
    """A file in the save directory is missing, truncated or unreadable."""


class StoreWriteError(KerntraceError, OSError):
    """The save directory cannot be written: full, read-only or not permitted.

    ``errno`` is the cause's error number and ``filename`` the path that
    could not be written. What the store already held is left as it was.
    """


class StoreBusyError(KerntraceError, RuntimeError):
    """Another live process holds the rows this one would write."""


class CheckpointFormatError(KerntraceError, TypeError):
    """A checkpoint is not in one of the accepted formats."""


class BatchError(KerntraceError, ValueError):
    """A batch, or the indices given with it, is malformed."""


class NonFiniteGradientError(KerntraceError, FloatingPointError):
    """A per-example gradient or output contains NaN or infinity."""


class NumericalError(KerntraceError, ArithmeticError):
    """A linear-algebra step failed, for example a singular kernel."""


class ModelModeError(KerntraceError, RuntimeError):
    """The model computes per-batch statistics, which couple the examples."""


class PrecisionWarning(UserWarning):
    """Stored features lost precision, e.g. to float16's limited range."""


class IllConditionedWarning(UserWarning):
    """The damped kernel is so ill-conditioned that scores are unreliable."""
