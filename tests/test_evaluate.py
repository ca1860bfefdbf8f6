"""Tests of kerntrace.evaluate: the LDS, random subsets and the retraining cache."""

from __future__ import annotations

import numpy as np
import pytest

from kerntrace.errors import ConfigurationError
from kerntrace.evaluate import LDS, lds, make_subsets, retrain

N_TRAIN = 60
N_TARGETS = 20


@pytest.fixture
def linear_world() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True weights (n_train, n_targets), 30 half-subsets, exactly linear outputs."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(N_TRAIN, N_TARGETS))
    masks = make_subsets(N_TRAIN, 30, seed=3)
    bias = rng.normal(size=N_TARGETS)
    outputs = masks.astype(np.float64) @ weights + bias
    return weights, masks, outputs


# -- E1: LDS self-check --------------------------------------------------------


def test_lds_of_the_true_linear_weights_is_near_one(linear_world):
    weights, masks, outputs = linear_world

    result = lds(weights, masks, outputs)

    assert isinstance(result, LDS)
    assert result.value > 0.99
    assert float(result) == result.value
    assert result.per_target.shape == (N_TARGETS,)
    assert np.all(result.per_target > 0.99)
    low, high = result.interval
    assert low <= result.value <= high


def test_lds_of_shuffled_scores_is_near_zero(linear_world):
    weights, masks, outputs = linear_world
    shuffled = weights[np.random.default_rng(1).permutation(N_TRAIN)]

    result = lds(shuffled, masks, outputs)

    assert abs(result.value) < 0.2
    assert result.interval[0] < result.interval[1]


def test_lds_is_invariant_to_monotone_rescaling_and_flips_with_sign(linear_world):
    weights, masks, outputs = linear_world

    scaled = lds(3.0 * weights, masks, np.exp(outputs / 10)).value
    flipped = lds(-weights, masks, outputs).value

    assert scaled == pytest.approx(lds(weights, masks, outputs).value)
    assert flipped < -0.99


def test_lds_marks_constant_targets_nan_and_averages_the_rest(linear_world):
    weights, masks, outputs = linear_world
    outputs = outputs.copy()
    outputs[:, 0] = 1.0

    result = lds(weights, masks, outputs)

    assert np.isnan(result.per_target[0])
    assert np.isfinite(result.per_target[1:]).all()
    assert result.value == pytest.approx(np.mean(result.per_target[1:]))


@pytest.mark.parametrize(
    ("scores", "masks", "outputs", "message"),
    [
        (np.zeros(10), np.zeros((4, 10)), np.zeros((4, 3)), r"must be 2-d"),
        (np.zeros((10, 3)), np.zeros(10), np.zeros((4, 3)), r"must be 2-d"),
        (np.zeros((10, 3)), np.zeros((4, 9)), np.zeros((4, 3)), r"do not fit"),
        (np.zeros((10, 3)), np.zeros((4, 10)), np.zeros((5, 3)), r"do not fit"),
        (np.zeros((10, 3)), np.zeros((4, 10)), np.zeros((4, 2)), r"do not fit"),
    ],
)
def test_lds_refuses_shapes_that_do_not_fit(scores, masks, outputs, message):
    with pytest.raises(ConfigurationError, match=message):
        lds(scores, masks, outputs)


def test_lds_refuses_when_every_target_is_constant():
    masks = make_subsets(10, 5)

    with pytest.raises(ConfigurationError, match=r"the LDS is undefined"):
        lds(np.ones((10, 2)), masks, np.ones((5, 2)))


# -- make_subsets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_train", "fraction", "size"), [(60, 0.5, 30), (20, 0.3, 6), (7, 0.5, 4)]
)
def test_make_subsets_shape_dtype_and_exact_size(n_train, fraction, size):
    masks = make_subsets(n_train, 9, fraction=fraction, seed=5)

    assert masks.shape == (9, n_train)
    assert masks.dtype == np.bool_
    assert masks.sum(axis=1).tolist() == [size] * 9


def test_make_subsets_draws_different_subsets():
    masks = make_subsets(60, 20, seed=5)

    assert len({row.tobytes() for row in masks}) == 20
    assert masks.any(axis=0).all()


def test_make_subsets_is_deterministic_in_its_seed():
    first = make_subsets(50, 12, seed=4)

    np.testing.assert_array_equal(make_subsets(50, 12, seed=4), first)
    assert not np.array_equal(make_subsets(50, 12, seed=5), first)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_train": 10, "n_subsets": 3, "fraction": 0.0}, r"fraction must lie in"),
        ({"n_train": 10, "n_subsets": 3, "fraction": 1.0}, r"fraction must lie in"),
        ({"n_train": 1, "n_subsets": 3}, r"need n_train ≥ 2 and n_subsets ≥ 1"),
        ({"n_train": 10, "n_subsets": 0}, r"need n_train ≥ 2 and n_subsets ≥ 1"),
    ],
)
def test_make_subsets_refuses_bad_arguments(arguments, message):
    with pytest.raises(ConfigurationError, match=message):
        make_subsets(**arguments)


# -- retrain ---------------------------------------------------------------------------


class LinearTrainer:
    """A "training run" whose target outputs are the sum of the chosen weights."""

    def __init__(self, weights: np.ndarray, fail_at: int | None = None) -> None:
        self.weights = weights
        self.fail_at = fail_at
        self.calls: list[int] = []

    def train(self, indices: np.ndarray, number: int) -> np.ndarray:
        assert indices.dtype == np.int64
        if number == self.fail_at:
            raise RuntimeError(f"training run {number} crashed")
        self.calls.append(number)
        return self.weights[indices].sum(axis=0)

    @staticmethod
    def evaluate(model: np.ndarray) -> np.ndarray:
        return model


def test_retrain_returns_outputs_and_caches_them(tmp_path, linear_world):
    weights, masks, outputs = linear_world
    trainer = LinearTrainer(weights)

    first = retrain(trainer.train, masks, trainer.evaluate, tmp_path, progress=False)
    assert trainer.calls == list(range(30))
    assert first.shape == (30, N_TARGETS)
    assert first.dtype == np.float64
    np.testing.assert_allclose(first, masks @ weights)

    second = retrain(trainer.train, masks, trainer.evaluate, tmp_path, progress=False)
    assert trainer.calls == list(range(30)), "cached subsets were retrained"
    np.testing.assert_array_equal(second, first)


def test_retrain_resumes_after_a_crash_mid_way(tmp_path, linear_world):
    weights, masks, _ = linear_world
    crashing = LinearTrainer(weights, fail_at=12)

    with pytest.raises(RuntimeError, match=r"training run 12 crashed"):
        retrain(crashing.train, masks, crashing.evaluate, tmp_path, progress=False)
    assert crashing.calls == list(range(12))
    assert len(list(tmp_path.glob("subset_*.npy"))) == 12

    resumed = LinearTrainer(weights)
    outputs = retrain(resumed.train, masks, resumed.evaluate, tmp_path, progress=False)
    assert resumed.calls == list(range(12, 30))
    clean = retrain(
        LinearTrainer(weights).train,
        masks,
        LinearTrainer.evaluate,
        tmp_path / "clean",
        progress=False,
    )
    np.testing.assert_array_equal(outputs, clean)


def test_retrain_refuses_a_cache_made_with_other_masks(tmp_path, linear_world):
    weights, masks, _ = linear_world
    trainer = LinearTrainer(weights)
    retrain(trainer.train, masks[:5], trainer.evaluate, tmp_path, progress=False)
    other = make_subsets(N_TRAIN, 5, seed=99)

    with pytest.raises(ConfigurationError, match=r"holds results for other subsets"):
        retrain(trainer.train, other, trainer.evaluate, tmp_path, progress=False)
    with pytest.raises(ConfigurationError, match=r"holds results for other subsets"):
        retrain(trainer.train, masks[:6], trainer.evaluate, tmp_path, progress=False)
    assert trainer.calls == list(range(5))
