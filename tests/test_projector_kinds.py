"""Every projector kind keeps the guarantees of a random projection.

N2 (norms and inner products), I1 (batch invariance), I2 (chunk invariance)
and I4 (seeded determinism) from CASES.md, for each kind make_projector
builds; the dense projector has further tests in test_projection.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kerntrace.projection import make_projector

KINDS = ["dense", "rademacher", "sparse"]


def _rows(count: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, width, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_n2_squared_norms_within_30_percent(kind):
    projector = make_projector(kind, 10_000, 512, seed=1, model_id=0)
    grads = _rows(20, 10_000)
    ratio = projector.project(grads).norm(dim=1) ** 2 / grads.norm(dim=1) ** 2
    assert torch.all((ratio > 0.7) & (ratio < 1.3)), ratio


@pytest.mark.parametrize("kind", KINDS)
def test_n2_inner_products_within_jl_bound(kind):
    k = 512
    projector = make_projector(kind, 10_000, k, seed=2, model_id=0)
    grads = _rows(12, 10_000, seed=3)
    grads = grads / grads.norm(dim=1, keepdim=True)
    projected = projector.project(grads)
    error = (projected @ projected.T - grads @ grads.T).abs()
    # For unit vectors |<Pu, Pv> - <u, v>| ≤ ε with ε ~ 4 sqrt(log(m) / k).
    bound = 4 * np.sqrt(np.log(12) / k)
    assert error.max() < bound, (error.max(), bound)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coordinate", [0, 9_999])
def test_n2_single_coordinate_projects_to_nonzero(kind, coordinate):
    projector = make_projector(kind, 10_000, 512, seed=4, model_id=0)
    one_hot = torch.zeros(1, 10_000, dtype=torch.float64)
    one_hot[0, coordinate] = 1.0
    assert projector.project(one_hot).abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_i1_rows_in_batches_equal_each_row_alone(kind):
    projector = make_projector(kind, 2100, 64, seed=5, model_id=1)
    grads = _rows(58, 2100, seed=6)
    alone = torch.cat([projector.project(grads[i : i + 1]) for i in range(58)])
    start = 0
    for size in (1, 7, 8, 9, 33):
        part = projector.project(grads[start : start + size])
        torch.testing.assert_close(
            part, alone[start : start + size], rtol=1e-12, atol=1e-12
        )
        start += size


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [[3000, 3000, 4000], [4000, 4000, 2000]])
def test_i2_chunked_projection_equals_unchunked(kind, chunks):
    projector = make_projector(kind, 10_000, 32, seed=7, model_id=0)
    grads = _rows(5, 10_000, seed=8)
    whole = projector.project(grads)
    total, offset = torch.zeros_like(whole), 0
    for size in chunks:
        total += projector.project(grads[:, offset : offset + size], offset=offset)
        offset += size
    torch.testing.assert_close(total, whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_i4_seeded_and_distinct_per_checkpoint(kind):
    grads = _rows(3, 3000, seed=9)

    def features(seed: int, model_id: int) -> torch.Tensor:
        projector = make_projector(kind, 3000, 64, seed=seed, model_id=model_id)
        return projector.project(grads)

    assert torch.equal(features(0, 0), features(0, 0))
    assert not torch.allclose(features(0, 0), features(1, 0))
    assert not torch.allclose(features(0, 0), features(0, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_expected_squared_norm_is_the_gradient_norm(kind):
    grad = _rows(1, 500, seed=10)
    norms = [
        make_projector(kind, 500, 16, seed=s, model_id=0).project(grad).norm() ** 2
        for s in range(300)
    ]
    assert float(torch.stack(norms).mean() / grad.norm() ** 2) == pytest.approx(
        1.0, abs=0.08
    )


def test_sparse_projector_rejects_more_nonzeros_than_features():
    from kerntrace.errors import ConfigurationError
    from kerntrace.projection import SparseProjector

    with pytest.raises(ConfigurationError, match="nonzeros must lie in 1..proj_dim"):
        SparseProjector(100, 4, seed=0, model_id=0, nonzeros=5)


def test_sparse_projection_of_columns_equals_projection_of_rows():
    from kerntrace.projection import SparseProjector

    projector = SparseProjector(3000, 64, seed=7, model_id=2, nonzeros=2)
    grads = _rows(9, 3000, seed=8)
    columns = projector.project_columns(grads.T.contiguous())
    torch.testing.assert_close(columns, projector.project(grads))


def test_sparse_projection_of_columns_refuses_another_width():
    from kerntrace.errors import ConfigurationError
    from kerntrace.projection import SparseProjector

    projector = SparseProjector(100, 8, seed=0, model_id=0)
    with pytest.raises(ConfigurationError, match="columns hold 99 gradient"):
        projector.project_columns(torch.zeros(99, 3))
