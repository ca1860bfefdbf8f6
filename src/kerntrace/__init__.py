"""kerntrace: which training examples caused each prediction of a model (TRAK).

The step-by-step workflow is ``TRAKer``; ``attribute`` does it in one call,
and ``audit`` ranks the train examples by self-influence.
"""

from __future__ import annotations

from .api import TRAKer, attribute, audit
from .distributed import shard
from .errors import (
    BatchError,
    CheckpointFormatError,
    ConfigurationError,
    IllConditionedWarning,
    KerntraceError,
    ModelModeError,
    NonFiniteGradientError,
    NumericalError,
    OrderError,
    PrecisionWarning,
    StoreBusyError,
    StoreCorruptError,
    StoreMismatchError,
    StoreWriteError,
)
from .outputs import ClassificationTask, LossTask, RegressionTask, Task
from .scoring import Audit, Ranking, Scores, TargetScores

__version__ = "0.1.0"

__all__ = [
    "TRAKer",
    "attribute",
    "audit",
    "shard",
    "Scores",
    "Audit",
    "TargetScores",
    "Ranking",
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "LossTask",
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
    "IllConditionedWarning",
    "PrecisionWarning",
    "__version__",
]
