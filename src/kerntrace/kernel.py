"""The kernel ΦᵀΦ + λI of each checkpoint: formed blockwise, damped, solved.

Φ is the (n, k) matrix of a checkpoint's train features. The kernel is
accumulated in float64 from blocks of rows, so memory is bounded by the
block size and k, not by n. It is factored by Cholesky; an explicit inverse
is never formed. The linear algebra runs in torch (float64), whose LAPACK is
the same on every platform torch ships for.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import NumericalError

__all__ = [
    "gram",
    "Damping",
    "choose_damping",
    "factor",
    "solve",
    "IllConditionedWarning",
]

logger = logging.getLogger(__name__)


class IllConditionedWarning(UserWarning):
    """The damped kernel is so ill-conditioned that scores are unreliable."""


def gram(features: np.ndarray, *, block_rows: int = 4096) -> np.ndarray:
    """ΦᵀΦ accumulated over blocks of rows, in float64.

    Args:
        features: Shape (n, k), any floating dtype; a memmap is read block by
            block.
        block_rows: Rows read at a time.

    Returns:
        Shape (k, k), float64, symmetric.
    """
    k = features.shape[1]
    total = torch.zeros((k, k), dtype=torch.float64)
    for start in range(0, features.shape[0], block_rows):
        block = np.asarray(features[start : start + block_rows], dtype=np.float64)
        block = torch.from_numpy(block)
        total.addmm_(block.T, block)
    return total.numpy()


@dataclass(frozen=True)
class Damping:
    """The damping λ of one checkpoint and how it was chosen.

    Attributes:
        value: λ ≥ 0.
        rule: ``"given"`` when the user set it, else the automatic rule.
    """

    value: float
    rule: str


def choose_damping(kernel: np.ndarray, n: int) -> Damping:
    """Choose λ from the spectrum scale of an undamped kernel.

    The rule is λ = tr(ΦᵀΦ) / min(n, k): the mean of the kernel's non-zero
    eigenvalues. It scales with the features (multiplying the outputs by c
    multiplies λ by c²), does not shrink as k grows past n, and keeps the
    kernel well conditioned when k ≥ n, where ΦᵀΦ is singular.

    Args:
        kernel: ΦᵀΦ, shape (k, k), float64.
        n: Number of train examples behind it.

    Returns:
        The damping chosen.
    """
    k = kernel.shape[0]
    rank_bound = max(1, min(n, k))
    value = float(np.trace(kernel)) / rank_bound
    return Damping(value=value, rule="mean-eigenvalue")


def factor(kernel: np.ndarray, damping: float, *, n: int) -> np.ndarray:
    """Lower Cholesky factor of ΦᵀΦ + λI.

    Args:
        kernel: ΦᵀΦ, shape (k, k), float64.
        damping: λ ≥ 0.
        n: Number of train examples, used to explain failures.

    Returns:
        Shape (k, k), float64, lower triangular.

    Raises:
        NumericalError: The damped kernel is not positive definite.
    """
    k = kernel.shape[0]
    damped = torch.from_numpy(np.asarray(kernel, dtype=np.float64)).clone()
    damped.diagonal().add_(damping)
    cause = (
        f"with proj_dim k={k} ≥ n={n} train examples the kernel ΦᵀΦ has rank "
        "at most n and is singular"
        if k >= n
        else "duplicated or linearly dependent train examples make the kernel singular"
    )
    if not bool(torch.isfinite(damped).all()):
        raise NumericalError(
            "the kernel ΦᵀΦ holds NaN or infinity: some stored features are not "
            "finite; featurize again with finite gradients (float32 storage if "
            "float16 overflowed)"
        )
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise NumericalError(
            f"the kernel ΦᵀΦ + λI with λ={damping:g} is not positive definite "
            f"(Cholesky failed at pivot {int(info)}): {cause}; leave "
            "lambda_reg=None to choose λ automatically, or set lambda_reg > 0"
        )
    lower = lower.numpy()
    pivots = np.diag(lower) ** 2
    if pivots.min() < 1e-12 * pivots.max():
        warnings.warn(
            f"the kernel ΦᵀΦ + λI with λ={damping:g} is nearly singular "
            f"(pivot ratio {pivots.min() / pivots.max():.1e}): {cause}, so the "
            "scores are dominated by round-off; leave lambda_reg=None or raise it",
            IllConditionedWarning,
            stacklevel=3,
        )
    return lower


def solve(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve (ΦᵀΦ + λI) X = rhs given the Cholesky factor.

    Args:
        lower: Shape (k, k), from ``factor``.
        rhs: Shape (k, T).

    Returns:
        Shape (k, T), float64.
    """
    # A copy: torch warns on read-only arrays such as the store's memmaps.
    rhs = torch.from_numpy(np.array(rhs, dtype=np.float64))
    return torch.cholesky_solve(rhs, torch.from_numpy(lower)).numpy()
