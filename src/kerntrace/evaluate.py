"""Judging attributions: the linear datamodeling score (LDS) and retraining.

LDS (Park et al. 2023, eq. 5): for random train subsets S_1..S_s and a
target z', correlate (Spearman, across subsets) the predicted output
Σ_{i∈S_j} τ(z', z_i) with the output of a model retrained on S_j; average
over targets.

Detection AUC: how well a suspicion score (such as self-influence) ranks
known mislabelled train examples ahead of the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
from tqdm.auto import tqdm

from .errors import ConfigurationError
from .store import save_array, write_json

__all__ = ["LDS", "lds", "make_subsets", "retrain", "detection_auc"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LDS:
    """A linear datamodeling score.

    Attributes:
        value: Mean over targets of the per-target Spearman correlation.
        interval: 95 % bootstrap interval over targets.
        per_target: Shape (n_targets,), NaN where a target's outputs are
            constant across subsets.
    """

    value: float
    interval: tuple[float, float]
    per_target: np.ndarray

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.3f} (95% CI {low:.3f}–{high:.3f})"


def make_subsets(
    n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Random train subsets as a boolean mask.

    Args:
        n_train: Number of train examples.
        n_subsets: Number of subsets.
        fraction: Share of the train set in each subset, in (0, 1).
        seed: Seed of the draw.

    Returns:
        Shape (n_subsets, n_train), bool; each row holds exactly
        ``round(fraction * n_train)`` True entries.
    """
    if not 0 < fraction < 1:
        raise ConfigurationError(f"fraction must lie in (0, 1), got {fraction}")
    if n_train < 2 or n_subsets < 1:
        raise ConfigurationError(
            f"need n_train ≥ 2 and n_subsets ≥ 1, got {n_train} and {n_subsets}"
        )
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return masks


def _rank_rows(values: np.ndarray) -> np.ndarray:
    return np.apply_along_axis(scipy.stats.rankdata, 0, values)


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> LDS:
    """The linear datamodeling score of attribution scores.

    Args:
        scores: Shape (n_train, n_targets).
        masks: Shape (n_subsets, n_train), bool: the subsets.
        outputs: Shape (n_subsets, n_targets): each target's output of the
            model retrained on each subset.
        n_bootstrap: Resamples of targets for the interval.
        seed: Seed of the bootstrap.

    Returns:
        The score, its interval and the per-target correlations.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or outputs.ndim != 2:
        raise ConfigurationError(
            f"scores, masks and outputs must be 2-d, got shapes {scores.shape}, "
            f"{masks.shape}, {outputs.shape}"
        )
    if masks.shape[1] != scores.shape[0] or outputs.shape != (
        masks.shape[0],
        scores.shape[1],
    ):
        raise ConfigurationError(
            f"shapes do not fit: scores {scores.shape} (n_train, n_targets), "
            f"masks {masks.shape} (n_subsets, n_train), outputs {outputs.shape} "
            "(n_subsets, n_targets)"
        )
    predicted = masks @ scores
    ranked_p, ranked_o = _rank_rows(predicted), _rank_rows(outputs)
    ranked_p -= ranked_p.mean(0)
    ranked_o -= ranked_o.mean(0)
    norm = np.sqrt((ranked_p**2).sum(0) * (ranked_o**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_target = np.where(norm > 0, (ranked_p * ranked_o).sum(0) / norm, np.nan)
    valid = per_target[np.isfinite(per_target)]
    if valid.size == 0:
        raise ConfigurationError(
            "every target's outputs or predictions are constant across subsets; "
            "the LDS is undefined"
        )
    rng = np.random.default_rng(seed)
    draws = rng.choice(valid, size=(n_bootstrap, valid.size)).mean(1)
    low, high = np.quantile(draws, [0.025, 0.975])
    return LDS(float(valid.mean()), (float(low), float(high)), per_target)


def retrain(
    train_fn: Callable[[np.ndarray, int], object],
    masks: np.ndarray,
    eval_fn: Callable[[object], np.ndarray],
    cache_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> np.ndarray:
    """Retrain on each subset and evaluate the targets, caching every result.

    Each subset's outputs are saved as soon as they are known, so an
    interrupted run resumes with the subsets still missing.

    Args:
        train_fn: ``train_fn(indices, subset_number)`` trains a model on the
            train examples ``indices`` (int64, shape (m,)) and returns it.
        masks: Shape (n_subsets, n_train), bool, from ``make_subsets``.
        eval_fn: ``eval_fn(model)`` returns the targets' outputs, shape
            (n_targets,).
        cache_dir: Folder for the cached outputs; reusing it with other
            masks is refused.
        progress: Show a progress bar.

    Returns:
        Shape (n_subsets, n_targets), float64.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    masks = np.asarray(masks, dtype=bool)
    masks_path = cache / "masks.npy"
    if masks_path.exists():
        if not np.array_equal(np.load(masks_path), masks):
            raise ConfigurationError(
                f"cache_dir {str(cache)!r} holds results for other subsets; "
                "use another cache_dir"
            )
    else:
        save_array(masks_path, masks)
    results = []
    todo = range(masks.shape[0])
    for number in tqdm(todo, desc="retrain", disable=not progress, leave=False):
        path = cache / f"subset_{number:05d}.npy"
        if path.exists():
            results.append(np.load(path))
            continue
        model = train_fn(np.flatnonzero(masks[number]).astype(np.int64), number)
        outputs = np.asarray(eval_fn(model), dtype=np.float64).reshape(-1)
        save_array(path, outputs)
        results.append(outputs)
    write_json(cache / "retrain.json", {"n_subsets": int(masks.shape[0])})
    logger.info("retrained outputs of %d subsets in %s", masks.shape[0], cache)
    return np.stack(results)


def detection_auc(suspicion: np.ndarray, is_mislabelled: np.ndarray) -> float:
    """ROC AUC of ranking the mislabelled examples first by suspicion.

    It is the Mann–Whitney U statistic divided by n_pos · n_neg: the chance
    that a random mislabelled example is more suspicious than a random clean
    one, ties counting one half (ranks of tied values are averaged).

    Args:
        suspicion: Shape (n,), real; higher means more suspicious.
        is_mislabelled: Shape (n,), bool (or 0/1 integers): the truth.

    Returns:
        The AUC in [0, 1]: 1 when every mislabelled example ranks first, 0.5
        for a random or constant suspicion, 0 when they all rank last.

    Raises:
        ConfigurationError: The shapes differ or are not 1-d, the suspicion
            is not finite, the truth is not boolean, or it holds only one
            class.
    """
    suspicion = np.asarray(suspicion)
    truth = np.asarray(is_mislabelled)
    if suspicion.ndim != 1 or truth.shape != suspicion.shape:
        raise ConfigurationError(
            f"suspicion and is_mislabelled must both have shape (n,), got "
            f"{suspicion.shape} and {truth.shape}"
        )
    if not np.issubdtype(suspicion.dtype, np.number) or not np.all(
        np.isfinite(suspicion)
    ):
        raise ConfigurationError(
            "suspicion must hold finite real numbers; it has NaN, infinity or "
            f"non-numbers (dtype {suspicion.dtype})"
        )
    if truth.dtype != np.bool_:
        if (
            not np.issubdtype(truth.dtype, np.integer)
            or not np.isin(truth, (0, 1)).all()
        ):
            raise ConfigurationError(
                f"is_mislabelled must be boolean (or 0/1), got dtype {truth.dtype}"
                f" with values {np.unique(truth)[:5]}"
            )
        truth = truth.astype(bool)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        raise ConfigurationError(
            f"the AUC needs both mislabelled and clean examples, got {positives} "
            f"mislabelled and {negatives} clean"
        )
    ranks = scipy.stats.rankdata(suspicion.astype(np.float64))
    u_statistic = ranks[truth].sum() - positives * (positives + 1) / 2
    return float(u_statistic / (positives * negatives))
