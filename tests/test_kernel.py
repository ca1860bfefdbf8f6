"""The kernel: blockwise ΦᵀRΦ, the automatic damping rule, the Cholesky solve."""

from __future__ import annotations

import numpy as np
import pytest

from kerntrace import kernel, outputs
from kerntrace.errors import ConfigurationError, NumericalError


def _features(n: int, k: int, *, seed: int = 0, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.standard_normal((n, k))
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, k))


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_gram_blockwise_equals_dense(block_rows):
    phi = _features(50, 12).astype(np.float32)
    expected = phi.astype(np.float64).T @ phi.astype(np.float64)
    np.testing.assert_allclose(
        kernel.gram(phi, block_rows=block_rows), expected, rtol=1e-12
    )


@pytest.mark.parametrize("block_rows", [1, 7, 10_000])
def test_weighted_gram_equals_the_dense_weighted_product(block_rows):
    phi = _features(50, 12, seed=3)
    weights = np.random.default_rng(4).uniform(0, 0.25, size=50)
    expected = phi.T @ (weights[:, None] * phi)
    np.testing.assert_allclose(
        kernel.gram(phi, weights, block_rows=block_rows), expected, rtol=1e-12
    )


def test_classification_curvature_is_the_logistic_second_derivative():
    q = np.array([0.0, 0.1, 0.5, 0.9, 1.0])  # Q = 1 - p_y
    weights = outputs.curvature(outputs.ClassificationTask(), q)
    np.testing.assert_allclose(weights, [0.0, 0.09, 0.25, 0.09, 0.0])
    np.testing.assert_array_equal(
        outputs.curvature(outputs.RegressionTask(), q), np.ones(5)
    )


def test_a_user_task_without_curvature_gets_the_plain_kernel():
    class Task:
        name = "mine"

        def output(self, model, batch):
            return model(batch[0]).sum(-1)

        def out_to_loss(self, model, batch):
            return batch[1]

    np.testing.assert_array_equal(outputs.curvature(Task(), np.arange(3.0)), 1.0)


@pytest.mark.parametrize(
    "values",
    [lambda q: -q, lambda q: q[:2], lambda q: q * np.nan],
    ids=["neg", "shape", "nan"],
)
def test_a_bad_user_curvature_is_refused(values):
    class Task:
        name = "mine"
        output = out_to_loss = None

        def curvature(self, q):
            return values(q)

    with pytest.raises(ConfigurationError, match="curvature"):
        outputs.curvature(Task(), np.arange(1.0, 4.0))


@pytest.mark.parametrize("k", [64, 128, 512])
def test_damping_makes_singular_kernels_solvable_when_k_at_least_n(k):
    n = 64
    phi = _features(n, k, seed=1)
    gram = kernel.gram(phi)
    assert np.linalg.matrix_rank(gram) <= n
    damping = kernel.choose_damping(gram, n)
    assert damping.value > 0
    lower = kernel.factor(gram, damping.value, n=n)
    rhs = _features(k, 3, seed=2)
    solved = kernel.solve(lower, rhs)
    np.testing.assert_allclose(
        (gram + damping.value * np.eye(k)) @ solved, rhs, rtol=1e-8, atol=1e-8
    )


def test_damping_does_not_shrink_as_k_grows_past_n():
    # Gaussian projections of the same 64 gradients to several k: E‖φ‖² = ‖g‖²,
    # so the rule's λ stays put while tr(ΦᵀΦ)/k would fall like 1/k.
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((64, 4000))
    values = []
    for k in (32, 64, 256, 1024):
        projection = rng.standard_normal((4000, k)) / np.sqrt(k)
        gram = kernel.gram(grads @ projection)
        values.append(kernel.choose_damping(gram, 64).value)
    assert max(values) / min(values) < 1.2, values


def test_damping_scales_with_the_square_of_the_features():
    phi = _features(40, 16, seed=4)
    base = kernel.choose_damping(kernel.gram(phi), 40).value
    scaled = kernel.choose_damping(kernel.gram(10 * phi), 40).value
    assert scaled == pytest.approx(100 * base)


def test_damping_rule_is_the_documented_fraction_of_the_mean_squared_norm():
    phi = _features(30, 8, seed=5)
    damping = kernel.choose_damping(kernel.gram(phi), 30)
    expected = kernel.DAMPING_FRACTION * np.mean(np.sum(phi**2, axis=1))
    assert damping.value == pytest.approx(expected)
    assert "mean weighted squared norm" in damping.rule


def test_zero_damping_on_a_singular_kernel_is_an_error_naming_the_cause():
    phi = _features(20, 40, seed=6)
    with pytest.raises(NumericalError, match=r"k=40 ≥ n=20.*singular"):
        kernel.factor(kernel.gram(phi), 0.0, n=20)


def test_zero_damping_with_duplicates_names_them():
    phi = _features(30, 10, seed=7, rank=5)
    with pytest.raises(NumericalError, match="duplicated or linearly dependent"):
        kernel.factor(kernel.gram(phi), 0.0, n=30)


def test_non_finite_features_are_refused():
    phi = _features(10, 4)
    phi[3, 1] = np.inf
    with pytest.raises(NumericalError, match="NaN or infinity"):
        kernel.factor(kernel.gram(phi), 1.0, n=10)


def test_a_vanished_curvature_falls_back_to_the_plain_kernel_with_a_warning():
    phi = _features(30, 8, seed=5)
    with pytest.warns(kernel.IllConditionedWarning, match="curvature of the loss"):
        formed, form = kernel.form(phi, np.zeros(30))
    assert form == kernel.FALLBACK
    np.testing.assert_allclose(formed, phi.T @ phi, rtol=1e-12)
    weights = np.full(30, 1e-6)  # tiny but real curvature is kept
    formed, form = kernel.form(phi, weights)
    assert form == kernel.WEIGHTED
    np.testing.assert_allclose(formed, 1e-6 * phi.T @ phi, rtol=1e-12)
