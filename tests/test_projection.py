"""Random projections: JL sanity, batch and chunk invariance, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import kerntrace as kt
from kerntrace.errors import ConfigurationError
from kerntrace.projection import (
    BLOCK_ROWS,
    DenseProjector,
    IdentityProjector,
    SparseProjector,
    make_projector,
)

DISTRIBUTIONS = pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])


def _gradients(rows: int, width: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator, dtype=torch.float64)


# -- N2: projection sanity ---------------------------------------------------


@DISTRIBUTIONS
def test_n2_norms_preserved_within_30_percent(distribution):
    projector = DenseProjector(
        10_000, 512, seed=0, model_id=0, distribution=distribution
    )
    # Varied scales and a shared direction so the inputs are not all alike.
    g = _gradients(24, 10_000, seed=1)
    g[12:] = g[12:] * 0.2 + 3.0 * g[0]
    g *= torch.logspace(-3, 3, 24, dtype=torch.float64)[:, None]

    phi = projector.project(g)

    assert phi.shape == (24, 512) and phi.dtype == torch.float64
    ratio = phi.pow(2).sum(1) / g.pow(2).sum(1)
    assert float((ratio - 1).abs().max()) < 0.3


@DISTRIBUTIONS
def test_n2_inner_products_within_jl_bound(distribution):
    k, eps = 512, 0.3
    projector = DenseProjector(10_000, k, seed=3, model_id=0, distribution=distribution)
    g = _gradients(20, 10_000, seed=2)
    g[10:] = g[10:] + 2.0 * g[:10]  # correlated pairs: inner products far from 0
    g = g / g.norm(dim=1, keepdim=True)

    phi = projector.project(g)

    exact = g @ g.T
    projected = phi @ phi.T
    # JL: norms of u ± v kept within 1 ± eps give |⟨Pu, Pv⟩ - ⟨u, v⟩| ≤ eps for
    # unit vectors.
    off = ~torch.eye(20, dtype=torch.bool)
    error = (projected - exact)[off].abs()
    assert float(error.max()) < eps
    assert float(exact[off].abs().max()) > 0.5


@DISTRIBUTIONS
@pytest.mark.parametrize("coordinate", [0, 9_999])
def test_n2_single_coordinate_projects_to_nonzero(distribution, coordinate):
    projector = DenseProjector(
        10_000, 512, seed=0, model_id=0, distribution=distribution
    )
    one_hot = torch.zeros(1, 10_000, dtype=torch.float64)
    one_hot[0, coordinate] = 1.0

    phi = projector.project(one_hot)

    assert int((phi != 0).sum()) == 512
    assert abs(float(phi.pow(2).sum()) - 1.0) < 0.3


# -- I1: batch invariance ---------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_i1_rows_in_batches_equal_each_row_alone(cache_bytes):
    projector = DenseProjector(2100, 32, seed=5, model_id=2, cache_bytes=cache_bytes)
    g = _gradients(58, 2100, seed=4)
    alone = torch.cat([projector.project(g[i : i + 1]) for i in range(58)])

    start = 0
    for size in (1, 7, 8, 9, 33):
        batched = projector.project(g[start : start + size])
        torch.testing.assert_close(
            batched, alone[start : start + size], rtol=1e-12, atol=1e-12
        )
        start += size
    assert start == 58


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_i1_traker_features_same_for_any_batch_and_chunk_size(
    chunk_rows, tmp_path, make_mlp, make_classification
):
    model = make_mlp(d_in=4, hidden=6, classes=3)
    x, y = make_classification(58)
    p = 4 * 6 + 6 + 6 * 3 + 3
    budget = chunk_rows * 3 * p * 4

    def features(save_dir, sizes, memory_bytes):
        traker = kt.TRAKer(
            model,
            "classification",
            58,
            save_dir,
            proj_dim=16,
            device="cpu",
            memory_bytes=memory_bytes,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        start = 0
        for size in sizes:
            traker.featurize(
                (x[start : start + size], y[start : start + size]), None, size
            )
            start += size
        return np.load(save_dir / "models" / "0" / "features.npy")

    alone = features(tmp_path / "alone", [1] * 58, 256 << 20)
    batched = features(tmp_path / "batched", [1, 7, 8, 9, 33], budget)

    assert alone.shape == (58, 16)
    assert np.abs(alone).min(axis=1).max() > 0
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)


# -- I2: chunk invariance -----------------------------------------------------


@pytest.mark.parametrize(
    "chunks", [[3000, 3000, 4000], [3000, 3000, 3000, 1000], [1, 1023, 8976]]
)
@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_i2_chunked_projection_equals_unchunked(chunks, cache_bytes):
    projector = DenseProjector(10_000, 32, seed=1, model_id=0, cache_bytes=cache_bytes)
    g = _gradients(5, 10_000, seed=6)
    whole = projector.project(g)

    total = torch.zeros_like(whole)
    offset = 0
    for size in chunks:
        total += projector.project(g[:, offset : offset + size], offset=offset)
        offset += size

    assert offset == 10_000
    torch.testing.assert_close(total, whole, rtol=1e-10, atol=1e-10)


def test_i2_chunk_outside_the_gradient_is_refused():
    projector = DenseProjector(100, 8, seed=0, model_id=0)

    with pytest.raises(ConfigurationError, match="outside"):
        projector.project(torch.zeros(2, 30), offset=80)


# -- block structure ---------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (0, 1),
        (BLOCK_ROWS - 1, BLOCK_ROWS + 1),
        (1000, 3100),
        (2 * BLOCK_ROWS, 3 * BLOCK_ROWS),
        (0, 3100),
    ],
)
def test_matrix_rows_across_block_boundaries(start, stop):
    projector = DenseProjector(3100, 16, seed=9, model_id=1)
    full = projector.matrix()

    assert full.shape == (3100, 16)
    assert torch.equal(projector.rows(start, stop), full[start:stop])


def test_cached_and_regenerated_matrices_are_identical():
    cached = DenseProjector(5000, 24, seed=2, model_id=3)
    regenerated = DenseProjector(5000, 24, seed=2, model_id=3, cache_bytes=0)
    g = _gradients(3, 5000, seed=0).float()

    assert torch.equal(cached.matrix(), regenerated.matrix())
    # The streamed product sums block by block: same matrix, other rounding.
    torch.testing.assert_close(
        cached.project(g), regenerated.project(g), rtol=1e-5, atol=1e-5
    )


def test_blocks_are_distinct():
    projector = DenseProjector(3 * BLOCK_ROWS, 8, seed=0, model_id=0)
    blocks = [projector.block(b) for b in range(3)]

    for a, b in itertools.combinations(blocks, 2):
        assert not torch.allclose(a, b)


# -- I4: determinism ---------------------------------------------------------


def _traker_features(model, x, y, save_dir, *, seed, model_id=0):
    traker = kt.TRAKer(
        model,
        "classification",
        x.shape[0],
        save_dir,
        proj_dim=12,
        projector_seed=seed,
        device="cpu",
    )
    traker.load_checkpoint(model.state_dict(), model_id=model_id)
    traker.featurize((x, y), num_samples=x.shape[0])
    return np.load(save_dir / "models" / str(model_id) / "features.npy")


def test_i4_same_seed_gives_bit_identical_features(
    tmp_path, make_mlp, make_classification
):
    model = make_mlp()
    x, y = make_classification(10)

    first = _traker_features(model, x, y, tmp_path / "a", seed=7)
    second = _traker_features(model, x, y, tmp_path / "b", seed=7)
    other = _traker_features(model, x, y, tmp_path / "c", seed=8)

    assert first.tobytes() == second.tobytes()
    assert not np.allclose(first, other)


def test_i4_checkpoints_get_different_matrices(tmp_path, make_mlp, make_classification):
    model = make_mlp()
    x, y = make_classification(10)

    zero = _traker_features(model, x, y, tmp_path / "a", seed=7, model_id=0)
    one = _traker_features(model, x, y, tmp_path / "b", seed=7, model_id=1)

    assert not np.allclose(zero, one)
    matrices = [DenseProjector(51, 12, seed=7, model_id=m).matrix() for m in (0, 1)]
    assert not torch.allclose(*matrices)
    again = DenseProjector(51, 12, seed=7, model_id=1).matrix()
    assert torch.equal(matrices[1], again)


# -- scaling -----------------------------------------------------------------


@DISTRIBUTIONS
def test_expected_squared_norm_is_preserved(distribution):
    g = _gradients(1, 64, seed=11)
    ratios = []
    for seed in range(300):
        projector = DenseProjector(
            64, 32, seed=seed, model_id=0, distribution=distribution
        )
        ratios.append(float(projector.project(g).pow(2).sum() / g.pow(2).sum()))

    # Each ratio has variance ≤ 2/k; the mean of 300 is within ±0.05 at 4σ.
    assert abs(np.mean(ratios) - 1.0) < 0.05
    assert np.std(ratios) > 0.01


@DISTRIBUTIONS
def test_entries_have_variance_one_over_k(distribution):
    matrix = DenseProjector(
        4000, 50, seed=0, model_id=0, distribution=distribution
    ).matrix()

    second_moment = float(matrix.double().pow(2).mean()) * 50
    assert abs(second_moment - 1.0) < 0.02
    assert abs(float(matrix.double().mean())) < 0.01 / np.sqrt(50)
    if distribution == "rademacher":
        assert torch.equal(matrix.abs(), torch.full_like(matrix, 50**-0.5))


# -- identity ----------------------------------------------------------------


def test_identity_projector_is_the_identity():
    projector = IdentityProjector(37)
    g = _gradients(4, 37, seed=3)

    assert projector.proj_dim == 37
    assert torch.equal(projector.project(g), g)
    chunked = projector.project(g[:, :10]) + projector.project(g[:, 10:], offset=10)
    assert torch.equal(chunked, g)


def test_make_projector_kinds():
    assert make_projector("identity", 5, 99, seed=0, model_id=0).proj_dim == 5
    assert make_projector("dense", 5, 3, seed=0, model_id=0).kind == "dense-gaussian"
    assert make_projector("rademacher", 5, 3, seed=0, model_id=0).kind == (
        "dense-rademacher"
    )
    assert make_projector("sparse", 5, 3, seed=0, model_id=0).kind == "sparse-3"
    with pytest.raises(ConfigurationError, match="unknown projector 'sketchy'"):
        make_projector("sketchy", 5, 3, seed=0, model_id=0)
    with pytest.raises(ConfigurationError, match="proj_dim must be at least 1"):
        DenseProjector(5, 0, seed=0, model_id=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_projection_of_half_precision_matches_float32(dtype):
    projector = SparseProjector(3000, 32, seed=0, model_id=0)
    grads = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    low = grads.to(dtype)

    rows = projector.project(low)
    columns = projector.project_columns(low.T.contiguous())

    expected = projector.project(low.float())
    assert rows.dtype == columns.dtype == dtype
    torch.testing.assert_close(rows.float(), expected, rtol=0.02, atol=0.05)
    torch.testing.assert_close(columns.float(), expected, rtol=0.02, atol=0.05)
