"""Scores from train features, solved target features and loss weights.

For checkpoints m = 1..M, the score of train example i for target j is

    τ[i, j] = (1/M) Σ_m Φ_m[i] · x_m[:, j]  ×  (1/M) Σ_m Q_m[i],

where x_m = (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_m(targets)ᵀ has shape (k, T). This equals
DESIGN's F_m[i] · φ_m(z') with F_m = Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹, but solves on
the T targets instead of the n train rows. Rows are processed in blocks, so
peak memory is one block of features plus one block of scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["ensemble_scores", "top_k", "Ranking", "Scores", "TargetScores"]


def ensemble_scores(
    train_features: Sequence[np.ndarray],
    solved_targets: Sequence[np.ndarray],
    weights: np.ndarray,
    *,
    out: np.ndarray | None = None,
    block_rows: int = 8192,
) -> np.ndarray:
    """Average the checkpoints' scores, blocked over train rows.

    Args:
        train_features: One (n, k) array per checkpoint (memmaps are fine).
        solved_targets: One (k, T) float64 array per checkpoint, aligned with
            ``train_features``.
        weights: Shape (n,): the out-to-loss weights averaged over the same
            checkpoints.
        out: Optional (n, T) float32 array (e.g. a memmap) to write into.
        block_rows: Train rows per block.

    Returns:
        Shape (n, T), float32.
    """
    n = train_features[0].shape[0]
    t = solved_targets[0].shape[1]
    if out is None:
        out = np.empty((n, t), dtype=np.float32)
    count = len(train_features)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = np.zeros((stop - start, t), dtype=np.float64)
        for features, solved in zip(train_features, solved_targets, strict=True):
            block += np.asarray(features[start:stop], dtype=np.float64) @ solved
        block *= weights[start:stop, None] / count
        out[start:stop] = block
    return out


class Ranking(NamedTuple):
    """Train examples ranked for one target.

    Attributes:
        indices: Shape (k,), int64 train indices, strongest first.
        scores: Shape (k,), float32 scores of those examples.
    """

    indices: np.ndarray
    scores: np.ndarray


def top_k(column: np.ndarray, k: int, *, largest: bool = True) -> Ranking:
    """The k largest (proponents) or smallest (opponents) entries of a column.

    Ties are broken by the lower train index, so the ranking is reproducible.
    """
    column = np.asarray(column)
    k = min(k, column.shape[0])
    keys = -column if largest else column
    order = np.lexsort((np.arange(column.shape[0]), keys))[:k]
    return Ranking(order.astype(np.int64), column[order].astype(np.float32))


@dataclass(frozen=True)
class TargetScores:
    """The scores of every train example for one target.

    Attributes:
        target: The target's index.
        values: Shape (n_train,), float32.
    """

    target: int
    values: np.ndarray

    def proponents(self, k: int = 10) -> Ranking:
        """The k train examples that push this target's output up most."""
        return top_k(self.values, k, largest=True)

    def opponents(self, k: int = 10) -> Ranking:
        """The k train examples that push this target's output down most."""
        return top_k(self.values, k, largest=False)


@dataclass(frozen=True)
class Scores:
    """Attribution scores of train examples (rows) for targets (columns).

    Attributes:
        values: Shape (n_train, n_targets), float32. Positive: the train
            example raises the target's output (a proponent).
        model_ids: The checkpoints averaged.
        damping: λ used for each model id.
        save_dir: Where the scores are stored, if anywhere.
    """

    values: np.ndarray
    model_ids: tuple[int, ...] = ()
    damping: dict[int, float] = field(default_factory=dict)
    save_dir: Path | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(n_train, n_targets)."""
        return tuple(self.values.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.values.shape[1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)

    def to_numpy(self) -> np.ndarray:
        """The scores as an in-memory array, shape (n_train, n_targets)."""
        return np.array(self.values)

    def target(self, index: int) -> TargetScores:
        """The per-target view of column ``index``."""
        n_targets = self.values.shape[1]
        if not -n_targets <= index < n_targets:
            raise IndexError(
                f"target {index} is out of range; there are {n_targets} targets"
            )
        return TargetScores(int(index) % n_targets, np.asarray(self.values[:, index]))

    def __getitem__(self, index: int) -> TargetScores:
        return self.target(index)

    def top_k(self, target: int, k: int = 10) -> tuple[Ranking, Ranking]:
        """``(proponents, opponents)`` of one target, k of each."""
        view = self.target(target)
        return view.proponents(k), view.opponents(k)
