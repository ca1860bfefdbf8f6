"""Several processes featurizing one store: which train rows each one writes.

Under ``torchrun`` (or any launch that initialises ``torch.distributed``)
every rank runs the same script. Rank r of W featurizes the contiguous block
``shard(n, r, W)`` of the train rows into its own shard files of the store;
``TRAKer.finalize_features`` then waits for every rank, merges the shards
and factors the checkpoints' kernels, one checkpoint per rank at a time.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch.distributed as dist

from .errors import ConfigurationError

__all__ = ["shard", "resolve", "barrier", "first_error"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigurationError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        )
    return int(value)


def resolve(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """This process's rank and the number of processes writing the store.

    Args:
        rank: 0..world_size-1, or ``None`` to take it from torch.distributed.
        world_size: The number of processes, or ``None`` likewise.

    Returns:
        ``(rank, world_size, collective)``: ``collective`` is true when the
        values are those of the initialised default torch.distributed group,
        whose ranks then finalize together. Without torch.distributed and
        without arguments, ``(0, 1, False)``.

    Raises:
        ConfigurationError: Only one of the two is given, or they do not fit.
    """
    if (rank is None) != (world_size is None):
        raise ConfigurationError(
            f"pass both rank and world_size or neither, got rank={rank!r} and "
            f"world_size={world_size!r}"
        )
    if rank is None:
        if not _initialized():
            return 0, 1, False
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank = _index(rank, "rank")
    world_size = _index(world_size, "world_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigurationError(
            f"need world_size ≥ 1 and 0 ≤ rank < world_size, got rank={rank} and "
            f"world_size={world_size}"
        )
    collective = (
        _initialized()
        and world_size > 1
        and (rank, world_size) == (dist.get_rank(), dist.get_world_size())
    )
    return rank, world_size, collective


def shard(
    n_train: int, rank: int | None = None, world_size: int | None = None
) -> range:
    """The train rows that process ``rank`` of ``world_size`` featurizes.

    The rows are split into ``world_size`` contiguous blocks whose sizes
    differ by at most one; together they cover 0..n_train-1 once.

    Args:
        n_train: The number of train examples.
        rank: This process's rank; ``None`` takes it from torch.distributed
            (0 when it is not initialised).
        world_size: The number of processes; ``None`` likewise (1).

    Returns:
        ``range(start, stop)`` of train indices, possibly empty.

    Raises:
        ConfigurationError: The arguments do not fit.
    """
    n_train = _index(n_train, "n_train")
    if n_train < 1:
        raise ConfigurationError(f"n_train must be ≥ 1, got {n_train}")
    rank, world_size, _ = resolve(rank, world_size)
    return range(n_train * rank // world_size, n_train * (rank + 1) // world_size)


def barrier() -> None:
    """Wait for every rank of the default torch.distributed group."""
    dist.barrier()


def first_error(error: BaseException | None) -> BaseException | None:
    """Share each rank's failure, so that every rank raises and none waits forever.

    Collective: every rank of the default group must call it.

    Args:
        error: What this rank raised, or ``None``.

    Returns:
        This rank's error if it had one, else a copy of the first failing
        rank's (the same class and message), else ``None``.
    """
    gathered: list[BaseException | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if error is None else _portable(error))
    if error is not None:
        return error
    return next((e for e in gathered if e is not None), None)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else its description."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
