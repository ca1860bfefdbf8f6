"""Random projections of per-example gradients to k dimensions.

A projector maps a gradient g in R^p to φ = Pᵀg in R^k with E‖φ‖² = ‖g‖².
P is cut into blocks of ``BLOCK_ROWS`` consecutive gradient coordinates;
block b is drawn from a generator seeded by (seed, model_id, b) alone, so
P depends on nothing but the seed, the checkpoint's model id and the
coordinates — never on batch size, on how the caller chunks the gradient,
on the device or on the number of threads.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigurationError

__all__ = [
    "Projector",
    "DenseProjector",
    "SparseProjector",
    "IdentityProjector",
    "make_projector",
    "PROJECTORS",
    "BLOCK_ROWS",
]

logger = logging.getLogger(__name__)

BLOCK_ROWS = 1024


_SPARSE_SALT = 1
SPARSE_NONZEROS = 4

# Sparse CSR products on the CPU have no half-precision kernels; such inputs
# are multiplied in float32 and the result is cast back.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sparse product runs in for inputs of ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def block_seed(seed: int, model_id: int, block: int, *, salt: int = 0) -> int:
    """A 63-bit generator seed for one block of a projection matrix."""
    entropy = [seed, model_id, block] + ([salt] if salt else [])
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def _blocks(grad_dim: int) -> int:
    return (grad_dim + BLOCK_ROWS - 1) // BLOCK_ROWS


def _check_slice(offset: int, stop: int, grad_dim: int) -> None:
    if offset < 0 or stop > grad_dim:
        raise ConfigurationError(
            f"coordinates {offset}:{stop} fall outside the gradient's {grad_dim} "
            "coordinates"
        )


class Projector(ABC):
    """Maps gradients of dimension p to features of dimension k.

    Args:
        grad_dim: p, the number of gradient coordinates.
        proj_dim: k, the number of features.
        seed: The projector seed.
        model_id: The checkpoint's id; each checkpoint gets its own matrix.
    """

    kind = "abstract"

    def __init__(self, grad_dim: int, proj_dim: int, *, seed: int, model_id: int):
        if proj_dim < 1:
            raise ConfigurationError(f"proj_dim must be at least 1, got {proj_dim}")
        self.grad_dim = grad_dim
        self.proj_dim = proj_dim
        self.seed = seed
        self.model_id = model_id

    @abstractmethod
    def project(self, grads: Tensor, *, offset: int = 0) -> Tensor:
        """Project a slice of gradient coordinates.

        Args:
            grads: Shape (B, c): coordinates ``offset`` to ``offset + c`` of B
                gradients, floating dtype.
            offset: The first coordinate of the slice.

        Returns:
            Shape (B, k) in the dtype of ``grads``: the slice's contribution,
            so summing over the slices of a gradient gives its projection.
        """


class DenseProjector(Projector):
    """A dense Gaussian or Rademacher matrix with entries of variance 1/k.

    Args:
        distribution: ``"gaussian"`` or ``"rademacher"``.
        cache_bytes: Keep the whole matrix in memory when it fits in this
            many bytes (float32); otherwise regenerate blocks on each call.
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        *,
        seed: int,
        model_id: int,
        distribution: str = "gaussian",
        cache_bytes: int = 1 << 30,
    ) -> None:
        super().__init__(grad_dim, proj_dim, seed=seed, model_id=model_id)
        if distribution not in ("gaussian", "rademacher"):
            raise ConfigurationError(
                f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}"
            )
        self.distribution = distribution
        self.kind = f"dense-{distribution}"
        self._scale = 1.0 / math.sqrt(proj_dim)
        self._cache: dict[torch.device, Tensor] = {}
        self._cacheable = grad_dim * proj_dim * 4 <= cache_bytes

    def block(self, index: int) -> Tensor:
        """Rows ``index * BLOCK_ROWS`` onward of P, float32 on the CPU."""
        start = index * BLOCK_ROWS
        rows = min(BLOCK_ROWS, self.grad_dim - start)
        generator = torch.Generator().manual_seed(
            block_seed(self.seed, self.model_id, index)
        )
        shape = (rows, self.proj_dim)
        if self.distribution == "gaussian":
            values = torch.randn(shape, generator=generator)
        else:
            values = torch.randint(0, 2, shape, generator=generator).float()
            values = values.mul_(2).sub_(1)
        return values.mul_(self._scale)

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of P, float32 on the CPU."""
        first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
        blocks = torch.cat([self.block(b) for b in range(first, last + 1)])
        offset = first * BLOCK_ROWS
        return blocks[start - offset : stop - offset]

    def matrix(self, device: torch.device | str = "cpu") -> Tensor:
        """The whole matrix P, shape (p, k), float32."""
        device = torch.device(device)
        if device in self._cache:
            return self._cache[device]
        full = self.rows(0, self.grad_dim).to(device)
        if self._cacheable:
            self._cache[device] = full
        return full

    def project(self, grads: Tensor, *, offset: int = 0) -> Tensor:
        stop = offset + grads.shape[1]
        _check_slice(offset, stop, self.grad_dim)
        if self._cacheable:
            part = self.matrix(grads.device)[offset:stop]
            return grads @ part.to(grads.dtype)
        # Too large to keep: stream the blocks, so memory holds one at a time.
        out = grads.new_zeros(grads.shape[0], self.proj_dim)
        for index in range(offset // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
            first = max(offset, index * BLOCK_ROWS)
            last = min(stop, (index + 1) * BLOCK_ROWS)
            block = self.block(index)[
                first - index * BLOCK_ROWS : last - index * BLOCK_ROWS
            ]
            out += grads[:, first - offset : last - offset] @ block.to(
                grads.device, grads.dtype
            )
        return out


class SparseProjector(Projector):
    """A sparse Johnson–Lindenstrauss projection (a CountSketch for s = 1).

    Each gradient coordinate is sent to ``nonzeros`` output coordinates,
    drawn at random, with random signs and weight 1/√s, so E‖φ‖² = ‖g‖² and
    the cost is s multiply-adds per coordinate instead of k.

    Args:
        nonzeros: s, the output coordinates each input coordinate feeds.
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        *,
        seed: int,
        model_id: int,
        nonzeros: int = 4,
    ) -> None:
        super().__init__(grad_dim, proj_dim, seed=seed, model_id=model_id)
        if not 1 <= nonzeros <= proj_dim:
            raise ConfigurationError(
                f"nonzeros must lie in 1..proj_dim={proj_dim}, got {nonzeros}"
            )
        self.nonzeros = nonzeros
        self.kind = f"sparse-{nonzeros}"
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._csr: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def block(self, index: int) -> tuple[Tensor, Tensor]:
        """Buckets (rows, s) int64 and signed weights (rows, s) float32."""
        start = index * BLOCK_ROWS
        rows = min(BLOCK_ROWS, self.grad_dim - start)
        generator = torch.Generator().manual_seed(
            block_seed(self.seed, self.model_id, index, salt=_SPARSE_SALT)
        )
        shape = (rows, self.nonzeros)
        buckets = torch.randint(0, self.proj_dim, shape, generator=generator)
        signs = torch.randint(0, 2, shape, generator=generator).float()
        weights = signs.mul_(2).sub_(1).mul_(1.0 / math.sqrt(self.nonzeros))
        return buckets, weights

    def _all(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            blocks = [self.block(b) for b in range(_blocks(self.grad_dim))]
            buckets = torch.cat([b for b, _ in blocks]).to(device)
            weights = torch.cat([w for _, w in blocks]).to(device)
            self._cache[device] = (buckets, weights)
        return self._cache[device]

    def _sparse_transpose(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Pᵀ as a (k, p) CSR matrix, cached per device and dtype."""
        key = (device, dtype)
        if key not in self._csr:
            buckets, weights = self._all(torch.device("cpu"))
            coordinates = torch.arange(self.grad_dim).repeat_interleave(self.nonzeros)
            indices = torch.stack([buckets.reshape(-1), coordinates])
            matrix = torch.sparse_coo_tensor(
                indices,
                weights.reshape(-1).to(dtype),
                (self.proj_dim, self.grad_dim),
                check_invariants=True,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*CSR.*beta")
                self._csr[key] = matrix.coalesce().to_sparse_csr().to(device)
        return self._csr[key]

    def project(self, grads: Tensor, *, offset: int = 0) -> Tensor:
        stop = offset + grads.shape[1]
        _check_slice(offset, stop, self.grad_dim)
        if offset == 0 and stop == self.grad_dim:
            work = _work_dtype(grads.dtype)
            transposed = self._sparse_transpose(grads.device, work)
            return torch.sparse.mm(transposed, grads.T.to(work)).T.to(grads.dtype)
        buckets, weights = self._all(grads.device)
        buckets = buckets[offset:stop].reshape(-1)
        weights = weights[offset:stop].to(grads.dtype)
        spread = (grads.unsqueeze(-1) * weights).reshape(grads.shape[0], -1)
        out = grads.new_zeros(grads.shape[0], self.proj_dim)
        return out.index_add_(1, buckets, spread)

    def project_columns(self, columns: Tensor) -> Tensor:
        """Project whole gradients stored one per column.

        Args:
            columns: Shape (p, B), floating dtype: column b is gradient b.
                The sparse product reads this layout several times faster
                than the transpose of (B, p) rows.

        Returns:
            Shape (B, k) in the dtype of ``columns``: the transpose of a
            contiguous (k, B) result, which ``numpy`` copies out fastest.
        """
        if columns.shape[0] != self.grad_dim:
            raise ConfigurationError(
                f"columns hold {columns.shape[0]} gradient coordinates, the "
                f"projector expects {self.grad_dim}"
            )
        work = _work_dtype(columns.dtype)
        transposed = self._sparse_transpose(columns.device, work)
        return torch.sparse.mm(transposed, columns.to(work)).T.to(columns.dtype)


class IdentityProjector(Projector):
    """No projection: the features are the gradients themselves (k = p)."""

    kind = "identity"

    def __init__(self, grad_dim: int, proj_dim: int | None = None, **_: object):
        super().__init__(grad_dim, grad_dim, seed=0, model_id=0)

    def project(self, grads: Tensor, *, offset: int = 0) -> Tensor:
        out = grads.new_zeros(grads.shape[0], self.grad_dim)
        out[:, offset : offset + grads.shape[1]] = grads
        return out


PROJECTORS = ("dense", "gaussian", "rademacher", "sparse", "identity")


def make_projector(
    kind: str, grad_dim: int, proj_dim: int, *, seed: int, model_id: int
) -> Projector:
    """Build the projector named ``kind`` (see ``PROJECTORS``).

    ``"dense"`` and ``"gaussian"`` are the dense Gaussian projector;
    ``"sparse"`` is the sparse JL projector with 4 non-zeros per coordinate.

    Raises:
        ConfigurationError: The kind is unknown.
    """
    if kind in ("dense", "gaussian"):
        return DenseProjector(grad_dim, proj_dim, seed=seed, model_id=model_id)
    if kind == "rademacher":
        return DenseProjector(
            grad_dim, proj_dim, seed=seed, model_id=model_id, distribution=kind
        )
    if kind == "sparse":
        return SparseProjector(
            grad_dim,
            proj_dim,
            seed=seed,
            model_id=model_id,
            nonzeros=min(SPARSE_NONZEROS, proj_dim),
        )
    if kind == "identity":
        return IdentityProjector(grad_dim)
    raise ConfigurationError(
        f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}"
    )
