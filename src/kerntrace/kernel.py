"""The kernel ΦᵀRΦ + λI of each checkpoint: formed blockwise, damped, solved.

Φ is the (n, k) matrix of a checkpoint's train features and R the diagonal
of the loss's curvature in each example's output (``outputs.curvature``):
ΦᵀRΦ is the Gauss–Newton Hessian of the training loss in feature space,
the matrix of the Newton step that TRAK's derivation for logistic
regression starts from. The kernel is accumulated in float64 from blocks
of rows, so memory is bounded by the block size and k, not by n. It is
factored by Cholesky; an explicit inverse is never formed. The linear
algebra runs in torch (float64), whose LAPACK is the same on every
platform torch ships for.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import IllConditionedWarning, NumericalError

__all__ = [
    "gram",
    "WEIGHTED",
    "PLAIN",
    "FALLBACK",
    "form",
    "Damping",
    "choose_damping",
    "DAMPING_FRACTION",
    "factor",
    "solve",
    "IllConditionedWarning",
]

logger = logging.getLogger(__name__)

WEIGHTED, PLAIN = "curvature-weighted", "plain"
FALLBACK = "plain (curvature vanished)"
"""The forms of kernel, ΦᵀRΦ and ΦᵀΦ, recorded with each factor; a stored
factor of another form than asked for is formed again."""


def gram(
    features: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    block_rows: int = 4096,
) -> np.ndarray:
    """ΦᵀRΦ accumulated over blocks of rows, in float64.

    Args:
        features: Φ, shape (n, k), any floating dtype; a memmap is read
            block by block.
        weights: The diagonal of R, shape (n,); ``None`` means R = I.
        block_rows: Rows read at a time.

    Returns:
        Shape (k, k), float64, symmetric.
    """
    n, k = features.shape
    if weights is not None and np.shape(weights) != (n,):
        raise ValueError(f"weights must have shape ({n},), got {np.shape(weights)}")
    total = torch.zeros((k, k), dtype=torch.float64)
    for start in range(0, n, block_rows):
        block = np.asarray(features[start : start + block_rows], dtype=np.float64)
        block = torch.from_numpy(block)
        if weights is None:
            weighted = block
        else:
            rows = np.asarray(weights[start : start + block_rows], dtype=np.float64)
            weighted = block * torch.from_numpy(rows)[:, None]
        total.addmm_(weighted.T, block)
    return total.numpy()


VANISHED = 1e-12
"""tr(ΦᵀRΦ) at most this fraction of tr(ΦᵀΦ) counts as a vanished curvature."""


def form(features: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The kernel of a checkpoint, ΦᵀRΦ (or ΦᵀΦ without weights), and its form.

    When the model fits every train example with certainty, each curvature
    R_i = p(1 - p) rounds to 0 and ΦᵀRΦ vanishes; the plain ΦᵀΦ is formed
    instead, with a warning, so the scores stay defined.

    Args:
        features: Φ, shape (n, k).
        weights: The diagonal of R, shape (n,), or ``None``.

    Returns:
        The (k, k) kernel and ``WEIGHTED``, ``PLAIN`` or ``FALLBACK``.
    """
    if weights is None:
        return gram(features), PLAIN
    weighted = gram(features, weights)
    plain_trace = sum(
        float(np.sum(np.square(features[start : start + 4096], dtype=np.float64)))
        for start in range(0, features.shape[0], 4096)
    )
    if np.trace(weighted) > VANISHED * plain_trace:
        return weighted, WEIGHTED
    warnings.warn(
        f"the curvature of the loss vanishes on every train example (tr(ΦᵀRΦ) = "
        f"{np.trace(weighted):.3g} against tr(ΦᵀΦ) = {plain_trace:.3g}): the model "
        "fits all of them with certainty, so the plain kernel ΦᵀΦ is used for "
        "this checkpoint; pass curvature=False to use it always",
        IllConditionedWarning,
        stacklevel=3,
    )
    return gram(features), FALLBACK


@dataclass(frozen=True)
class Damping:
    """The damping λ of one checkpoint and how it was chosen.

    Attributes:
        value: λ ≥ 0.
        rule: ``"given"`` when the user set it, else the automatic rule.
    """

    value: float
    rule: str


DAMPING_FRACTION = 0.2


def choose_damping(kernel: np.ndarray, n: int) -> Damping:
    """Choose λ as a fixed fraction of the mean weighted squared feature norm.

    The rule is λ = 0.2 · tr(ΦᵀRΦ) / n = 0.2 · mean_i R_i ‖φ(z_i)‖², the
    mean diagonal entry of the n × n matrix R^½ΦΦᵀR^½. Because a projection
    keeps squared norms in expectation, this λ does not change with k, so
    the kernel stays well conditioned when k ≥ n (where ΦᵀRΦ is singular)
    and scores settle as k grows. It scales with the features: multiplying
    the model output by c multiplies λ by c², which leaves the scores
    unchanged.

    The fraction comes from the LDS of the quality benchmark
    (``benchmarks/quality.py``: MLPs on scikit-learn digits, 1,200 train,
    and on 5,000 Fashion-MNIST images; 100 retrained half-subsets each).
    With the curvature-weighted kernel the best fraction was about 0.3 on
    digits and 0.05–0.15 on Fashion-MNIST, at every k and for 1, 5 and 10
    checkpoints; 0.2 stays within 0.01 of the best on digits and within 0.04
    on Fashion-MNIST, and above ``traker``'s best λ on both.

    Args:
        kernel: ΦᵀRΦ, shape (k, k), float64.
        n: Number of train examples behind it.

    Returns:
        The damping chosen.
    """
    value = DAMPING_FRACTION * float(np.trace(kernel)) / max(1, n)
    rule = f"{DAMPING_FRACTION:g}·mean weighted squared norm"
    return Damping(value=value, rule=rule)


def factor(kernel: np.ndarray, damping: float, *, n: int) -> np.ndarray:
    """Lower Cholesky factor of ΦᵀRΦ + λI.

    Args:
        kernel: ΦᵀRΦ, shape (k, k), float64.
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
        f"with proj_dim k={k} ≥ n={n} train examples the kernel ΦᵀRΦ has rank "
        "at most n and is singular"
        if k >= n
        else "duplicated or linearly dependent train examples make the kernel singular"
    )
    if not bool(torch.isfinite(damped).all()):
        raise NumericalError(
            "the kernel ΦᵀRΦ holds NaN or infinity: some stored features are not "
            "finite; featurize again with finite gradients (float32 storage if "
            "float16 overflowed)"
        )
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise NumericalError(
            f"the kernel ΦᵀRΦ + λI with λ={damping:g} is not positive definite "
            f"(Cholesky failed at pivot {int(info)}): {cause}; leave "
            "lambda_reg=None to choose λ automatically, or set lambda_reg > 0"
        )
    lower = lower.numpy()
    pivots = np.diag(lower) ** 2
    if pivots.min() < 1e-12 * pivots.max():
        warnings.warn(
            f"the kernel ΦᵀRΦ + λI with λ={damping:g} is nearly singular "
            f"(pivot ratio {pivots.min() / pivots.max():.1e}): {cause}, so the "
            "scores are dominated by round-off; leave lambda_reg=None or raise it",
            IllConditionedWarning,
            stacklevel=3,
        )
    return lower


def solve(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve (ΦᵀRΦ + λI) X = rhs given the Cholesky factor.

    Args:
        lower: Shape (k, k), from ``factor``.
        rhs: Shape (k, T).

    Returns:
        Shape (k, T), float64.
    """
    # A copy: torch warns on read-only arrays such as the store's memmaps.
    rhs = torch.from_numpy(np.array(rhs, dtype=np.float64))
    return torch.cholesky_solve(rhs, torch.from_numpy(lower)).numpy()
