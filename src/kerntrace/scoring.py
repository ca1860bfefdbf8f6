"""Scores from train features, solved target features and loss weights.

For checkpoints m = 1..M, the score of train example i for target j is

    τ[i, j] = (1/M) Σ_m Φ_m[i] · x_m[:, j]  ×  (1/M) Σ_m Q_m[i],

where x_m = (Φ_mᵀR_mΦ_m + λ_m I)⁻¹ φ_m(targets)ᵀ has shape (k, T). This
equals DESIGN's F_m[i] · φ_m(z') with F_m = Φ_m (Φ_mᵀR_mΦ_m + λ_m I)⁻¹, but
solves on the T targets instead of the n train rows. Rows are processed in blocks, so
peak memory is one block of features plus one block of scores.

Self-influence is the score of a train example for itself as the target,

    τ(z_i, z_i) = (1/M) Σ_m φ_m(z_i)ᵀ K_m⁻¹ φ_m(z_i) × Q̄_i,
    K_m = Φ_mᵀR_mΦ_m + λ_m I,

the diagonal of the n × n score matrix, computed without forming it. It is
high for examples the model can only fit by memorizing them, such as
mislabelled ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .errors import ConfigurationError

__all__ = [
    "ensemble_scores",
    "self_scores",
    "top_k",
    "Ranking",
    "Scores",
    "TargetScores",
    "Audit",
]


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


def _check_self_inputs(
    train_features: Sequence[np.ndarray],
    lowers: Sequence[np.ndarray],
    weights: np.ndarray,
    block_rows: int,
) -> np.ndarray:
    """Validate ``self_scores``' arguments; returns the weights as float64."""
    if len(train_features) == 0 or len(train_features) != len(lowers):
        raise ConfigurationError(
            f"self_scores needs one Cholesky factor per checkpoint's features and "
            f"at least one checkpoint, got {len(train_features)} feature arrays "
            f"and {len(lowers)} factors"
        )
    n = train_features[0].shape[0]
    for m, (features, lower) in enumerate(zip(train_features, lowers, strict=True)):
        k = features.shape[1] if features.ndim == 2 else None
        if features.ndim != 2 or features.shape[0] != n or lower.shape != (k, k):
            raise ConfigurationError(
                f"checkpoint {m}: features of shape {features.shape} and factor of "
                f"shape {lower.shape} do not fit; expected (n, k) with the n={n} "
                "rows of checkpoint 0, and the (k, k) factor from kernel.factor "
                "on these features"
            )
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ConfigurationError(
            f"weights must have shape (n,) = ({n},), got {weights.shape}; pass the "
            "out-to-loss weights averaged over the checkpoints"
        )
    if isinstance(block_rows, bool) or not isinstance(block_rows, int | np.integer):
        raise ConfigurationError(f"block_rows must be an integer, got {block_rows!r}")
    if block_rows < 1:
        raise ConfigurationError(f"block_rows must be ≥ 1, got {block_rows}")
    return weights


def self_scores(
    train_features: Sequence[np.ndarray],
    lowers: Sequence[np.ndarray],
    weights: np.ndarray,
    *,
    block_rows: int = 8192,
) -> np.ndarray:
    """Self-influence τ(z_i, z_i) of every train example, blocked over rows.

    For each checkpoint m the quadratic form φᵀ(Φ_mᵀR_mΦ_m + λ_m I)⁻¹φ
    equals ‖L_m⁻¹ φ‖², so one triangular solve per block of rows gives it. Peak
    memory is one (block_rows, k) block and its solve, never n × n.

    Args:
        train_features: One (n, k) array per checkpoint, any floating dtype
            (memmaps are read block by block).
        lowers: One (k, k) float64 lower Cholesky factor of
            Φ_mᵀR_mΦ_m + λ_m I per checkpoint (``kernel.factor``), aligned with
            ``train_features``.
        weights: Shape (n,): the out-to-loss weights Q̄ averaged over the same
            checkpoints.
        block_rows: Train rows per block.

    Returns:
        Shape (n,), float64: the checkpoint-averaged quadratic form times Q̄.

    Raises:
        ConfigurationError: The arrays' shapes do not fit together, or
            ``block_rows`` is not a positive integer.
    """
    weights = _check_self_inputs(train_features, lowers, weights, block_rows)
    n = weights.shape[0]
    total = np.zeros(n, dtype=np.float64)
    for features, lower in zip(train_features, lowers, strict=True):
        lower = np.asarray(lower, dtype=np.float64)
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            block = np.asarray(features[start:stop], dtype=np.float64)
            whitened = scipy.linalg.solve_triangular(
                lower, block.T, lower=True, check_finite=False
            )
            total[start:stop] += np.einsum("kb,kb->b", whitened, whitened)
    return total / len(train_features) * weights


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

    Raises:
        ConfigurationError: ``k`` is not an integer ≥ 0.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ConfigurationError(
            f"k must be an integer ≥ 0 (how many train examples to rank), got {k!r}"
        )
    column = np.asarray(column)
    k = min(int(k), column.shape[0])
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
        """The per-target view of column ``index``.

        Raises:
            IndexError: ``index`` is not an integer in -T..T-1.
        """
        n_targets = self.values.shape[1]
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise IndexError(
                f"target must be an integer index, got {index!r} "
                f"({type(index).__name__}); there are {n_targets} targets"
            )
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


@dataclass(frozen=True)
class Audit:
    """Train examples ranked by self-influence, most suspicious first.

    A high self-influence means the model fits the example mostly through
    the example itself, as it must for a mislabelled or atypical one.

    Attributes:
        self_scores: Shape (n_train,), float64, τ(z_i, z_i) ≥ 0.
        ranking: Shape (n_train,), int64 train indices ordered by decreasing
            self-influence (ties: lower index first).
        model_ids: The checkpoints averaged.
        damping: λ used for each model id.
        save_dir: Where the store is, if anywhere.
    """

    self_scores: np.ndarray
    ranking: np.ndarray
    model_ids: tuple[int, ...] = ()
    damping: dict[int, float] = field(default_factory=dict)
    save_dir: Path | None = None

    @classmethod
    def from_self_scores(
        cls,
        values: np.ndarray,
        model_ids: Sequence[int] = (),
        damping: dict[int, float] | None = None,
        save_dir: Path | None = None,
    ) -> Audit:
        """Build an audit, ranking the examples from their self-influence.

        Args:
            values: Shape (n_train,), self-influence of each train example.
            model_ids: The checkpoints averaged.
            damping: λ of each model id.
            save_dir: The store, if any.
        """
        values = np.array(values, dtype=np.float64)
        ranking = top_k(values, values.shape[0]).indices
        return cls(values, ranking, tuple(model_ids), dict(damping or {}), save_dir)

    def __len__(self) -> int:
        return self.self_scores.shape[0]

    def top(self, k: int = 10) -> Ranking:
        """The k most suspicious train examples and their self-influence.

        Args:
            k: How many (all of them if there are fewer).

        Returns:
            ``Ranking`` with int64 ``indices`` (k,) and their ``scores`` (k,).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ConfigurationError(f"k must be an integer ≥ 0, got {k!r}")
        indices = self.ranking[:k]
        return Ranking(indices, self.self_scores[indices].astype(np.float32))
