"""Self-influence, the mislabel audit and the detection AUC.

The ``audit`` and ``lds`` commands are tested in test_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import kerntrace as kt
from kerntrace import evaluate, kernel, models
from kerntrace.demo import flip_labels
from kerntrace.scoring import Audit, self_scores

LAMBDA = 0.05


def _checkpoints(make_mlp, count):
    return [
        make_mlp(seed=10 + m, dtype=torch.float64).state_dict() for m in range(count)
    ]


def _featurized(tmp_path, model, checkpoints, train, **options):
    traker = kt.TRAKer(model, "classification", len(train[0]), tmp_path, **options)
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for start in range(0, len(train[0]), 8):
            batch = (train[0][start : start + 8], train[1][start : start + 8])
            traker.featurize(batch, num_samples=len(batch[0]))
    return traker


def _random_problem(n=37, k=6, count=3, seed=0):
    rng = np.random.default_rng(seed)
    features = [rng.standard_normal((n, k)) for _ in range(count)]
    lowers = [
        kernel.factor(kernel.gram(f), 0.1 * (m + 1), n=n)
        for m, f in enumerate(features)
    ]
    weights = rng.uniform(0, 1, n)
    return features, lowers, weights


# -- self-influence against the formula ------------------------------------------


@pytest.mark.filterwarnings("error")
def test_self_scores_equal_the_diagonal_of_the_dense_formula(
    tmp_path, make_mlp, make_classification, loop_gradients
):
    model = make_mlp(dtype=torch.float64)
    checkpoints = _checkpoints(make_mlp, 2)
    xs, ys = make_classification(40, seed=1, dtype=torch.float64)
    traker = _featurized(
        tmp_path,
        model,
        checkpoints,
        (xs, ys),
        projector="identity",
        lambda_reg=LAMBDA,
        feature_dtype="float64",
        device="cpu",
    )
    traker.finalize_features()

    values = traker.self_scores()

    quadratic, weight = 0.0, 0.0
    for checkpoint in checkpoints:
        model.load_state_dict(checkpoint)
        phi = loop_gradients(model, xs, ys).numpy()
        with torch.no_grad():
            probs = torch.softmax(model(xs), dim=1)
        q = (1 - probs[torch.arange(len(ys)), ys]).numpy().astype(np.float64)
        curvature = q * (1 - q)  # R = p_y (1 - p_y)
        kernel = phi.T @ (phi * curvature[:, None]) + LAMBDA * np.eye(phi.shape[1])
        quadratic = quadratic + np.diag(phi @ np.linalg.inv(kernel) @ phi.T)
        weight = weight + q
    expected = (quadratic / 2) * (weight / 2)
    assert values.shape == (40,)
    assert values.dtype == np.float64
    assert (values >= 0).all() and values.max() > 0
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-9 * expected.max())


def test_self_scores_are_the_diagonal_of_scores_with_the_train_set_as_targets(
    tmp_path, make_mlp, make_classification, run_traker
):
    model = make_mlp(dtype=torch.float64)
    checkpoints = _checkpoints(make_mlp, 3)
    train = make_classification(30, seed=4, dtype=torch.float64)
    options = dict(proj_dim=16, projector_seed=2, feature_dtype="float64")

    full = run_traker(model, checkpoints, train, train, tmp_path, **options)
    traker = kt.TRAKer(model, "classification", 30, tmp_path, device="cpu", **options)
    values = traker.self_scores()

    np.testing.assert_allclose(values, np.diag(full), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("block_rows", [1, 2, 5, 36, 37, 1000])
def test_blockwise_self_scores_equal_unblocked(block_rows):
    features, lowers, weights = _random_problem()

    blocked = self_scores(features, lowers, weights, block_rows=block_rows)
    whole = self_scores(features, lowers, weights, block_rows=37)

    np.testing.assert_allclose(blocked, whole, rtol=1e-12)


def test_self_scores_read_memmaps_in_any_float_dtype(tmp_path):
    features, lowers, weights = _random_problem(count=1)
    path = tmp_path / "features.npy"
    np.save(path, features[0].astype(np.float32))

    from_disk = self_scores([np.load(path, mmap_mode="r")], lowers, weights)
    in_memory = self_scores([features[0].astype(np.float32)], lowers, weights)

    np.testing.assert_allclose(from_disk, in_memory, rtol=1e-12)


def test_self_scores_of_one_checkpoint_equal_the_explicit_inverse():
    features, lowers, weights = _random_problem(count=1)
    lower = lowers[0]
    inverse = np.linalg.inv(lower @ lower.T)

    values = self_scores(features, lowers, weights, block_rows=4)

    expected = np.einsum("ik,kl,il->i", features[0], inverse, features[0]) * weights
    np.testing.assert_allclose(values, expected, rtol=1e-10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, low, w: (f, low[:1], w), "one Cholesky factor per checkpoint"),
        (lambda f, low, w: ([], [], w), "at least one checkpoint"),
        (
            lambda f, low, w: ([f[0], f[1][:5], f[2]], low, w),
            r"checkpoint 1: features of shape \(5, 6\)",
        ),
        (lambda f, low, w: (f, [low[0][:3, :3], *low[1:]], w), r"shape \(3, 3\)"),
        (
            lambda f, low, w: (f, low, w[:4]),
            r"weights must have shape \(n,\) = \(37,\)",
        ),
    ],
)
def test_self_scores_refuse_arrays_that_do_not_fit(change, message):
    features, lowers, weights = change(*_random_problem())

    with pytest.raises(kt.ConfigurationError, match=message):
        self_scores(features, lowers, weights)


@pytest.mark.parametrize("block_rows", [0, -3, 2.5, True])
def test_self_scores_refuse_bad_block_rows(block_rows):
    with pytest.raises(kt.ConfigurationError, match="block_rows"):
        self_scores(*_random_problem(), block_rows=block_rows)


# -- TRAKer.self_scores ------------------------------------------------------------


def test_traker_self_scores_before_finalize_raises_order_error(
    tmp_path, make_mlp, make_classification
):
    model = make_mlp()
    train = make_classification(16, seed=1)
    traker = _featurized(tmp_path, model, [model.state_dict()], train, proj_dim=8)

    with pytest.raises(kt.OrderError, match="finalize_features"):
        traker.self_scores()
    assert not (tmp_path / "self_scores.npy").exists()


def test_traker_self_scores_on_an_empty_store_raises_order_error(tmp_path, make_mlp):
    traker = kt.TRAKer(make_mlp(), "classification", 10, tmp_path, proj_dim=8)

    with pytest.raises(kt.OrderError, match="finalize_features"):
        traker.self_scores()


def test_traker_self_scores_refuse_an_unfinalized_model_id(
    tmp_path, make_mlp, make_classification
):
    model = make_mlp()
    train = make_classification(16, seed=1)
    traker = _featurized(tmp_path, model, [model.state_dict()], train, proj_dim=8)
    traker.finalize_features()

    with pytest.raises(kt.OrderError, match=r"model id\(s\) \[3\].*finalized: \[0\]"):
        traker.self_scores(model_ids=[0, 3])


def test_traker_self_scores_are_saved_and_average_the_model_ids_asked_for(
    tmp_path, make_mlp, make_classification
):
    model = make_mlp()
    checkpoints = [make_mlp(seed=s).state_dict() for s in (1, 2)]
    train = make_classification(24, seed=3)
    traker = _featurized(tmp_path, model, checkpoints, train, proj_dim=8)
    traker.finalize_features()

    both = traker.self_scores()
    saved = np.load(tmp_path / "self_scores.npy")
    first = traker.self_scores(model_ids=[0])

    np.testing.assert_array_equal(saved, both)
    assert not np.allclose(first, both)
    np.testing.assert_array_equal(np.load(tmp_path / "self_scores.npy"), first)
    assert set(traker.damping) == {0}


# -- detection AUC -----------------------------------------------------------------


def test_detection_auc_is_one_for_a_perfect_ranking():
    truth = np.array([False, True, False, True, False])
    suspicion = np.array([0.1, 0.9, 0.2, 0.8, 0.3])

    assert evaluate.detection_auc(suspicion, truth) == 1.0


def test_detection_auc_is_zero_for_a_reversed_ranking():
    truth = np.array([False, True, False, True, False])
    suspicion = -np.array([0.1, 0.9, 0.2, 0.8, 0.3])

    assert evaluate.detection_auc(suspicion, truth) == 0.0


def test_detection_auc_is_one_half_when_every_suspicion_ties():
    truth = np.array([1, 0, 0, 1, 0, 0])

    assert evaluate.detection_auc(np.full(6, 3.0), truth) == 0.5


def test_detection_auc_counts_ties_as_one_half():
    truth = np.array([True, False, False])
    # The positive beats one negative and ties the other: (1 + 0.5) / 2.
    assert evaluate.detection_auc(np.array([2.0, 2.0, 1.0]), truth) == 0.75


def test_detection_auc_matches_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=200) < 0.2
    suspicion = np.round(rng.normal(size=200) + truth, 1)  # with ties

    auc = evaluate.detection_auc(suspicion, truth)

    u_statistic = scipy.stats.mannwhitneyu(suspicion[truth], suspicion[~truth])[0]
    assert auc == pytest.approx(u_statistic / (truth.sum() * (~truth).sum()))
    assert 0.6 < auc < 0.95


@pytest.mark.parametrize(
    ("suspicion", "truth", "message"),
    [
        (np.zeros(4), np.zeros(3, bool), r"shape \(n,\), got \(4,\) and \(3,\)"),
        (np.zeros((2, 2)), np.zeros((2, 2), bool), "shape"),
        (np.array([0.0, np.nan]), np.array([True, False]), "finite"),
        (np.array([0.0, np.inf]), np.array([True, False]), "finite"),
        (np.zeros(3), np.array([0, 2, 1]), "boolean"),
        (np.zeros(3), np.array([0.0, 1.0, 0.0]), "boolean"),
        (np.arange(3.0), np.zeros(3, bool), "0 mislabelled and 3 clean"),
        (np.arange(3.0), np.ones(3, bool), "3 mislabelled and 0 clean"),
    ],
)
def test_detection_auc_refuses_bad_input(suspicion, truth, message):
    with pytest.raises(kt.ConfigurationError, match=message):
        evaluate.detection_auc(suspicion, truth)


# -- flipping labels ---------------------------------------------------------------


def test_flip_labels_flips_the_share_asked_for_each_to_another_class():
    labels = np.arange(200) % 10

    noisy, flipped = flip_labels(labels, 0.1, classes=10, seed=3)

    assert flipped.dtype == np.bool_ and flipped.sum() == 20
    assert (noisy[flipped] != labels[flipped]).all()
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, same = flip_labels(labels, 0.1, classes=10, seed=3)
    np.testing.assert_array_equal(again, noisy)
    np.testing.assert_array_equal(same, flipped)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_flip_labels_refuses_a_fraction_that_flips_none_or_all(fraction):
    with pytest.raises(kt.ConfigurationError, match="fraction"):
        flip_labels(np.arange(100) % 10, fraction, classes=10)


# -- kt.audit ----------------------------------------------------------------------


def _noisy_clusters(n=90, classes=3, flips=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(classes, 4))
    labels = np.arange(n) % classes
    x = centres[labels] + rng.normal(size=(n, 4))
    noisy, flipped = flip_labels(labels, flips / n, classes=classes, seed=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(noisy), flipped


def _trained(x, y, count):
    return [
        models.train_classifier(
            models.mlp((4, 16, 3), seed=s), x, y, steps=150, lr=1e-2, seed=s
        ).state_dict()
        for s in range(count)
    ]


def test_audit_ranks_flipped_labels_first(tmp_path):
    x, y, flipped = _noisy_clusters()
    checkpoints = _trained(x, y, 2)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]

    result = kt.audit(
        models.mlp((4, 16, 3)),
        checkpoints,
        batches,
        task="image_classification",
        save_dir=tmp_path,
        progress=False,
        proj_dim=64,
        device="cpu",
    )

    assert isinstance(result, kt.Audit)
    assert result.self_scores.shape == (90,) and result.self_scores.dtype == np.float64
    assert result.ranking.dtype == np.int64
    np.testing.assert_array_equal(np.sort(result.ranking), np.arange(90))
    assert (np.diff(result.self_scores[result.ranking]) <= 0).all()
    assert evaluate.detection_auc(result.self_scores, flipped) > 0.9
    assert flipped[result.top(6).indices].sum() >= 4
    np.testing.assert_array_equal(
        np.load(tmp_path / "self_scores.npy"), result.self_scores
    )
    assert result.model_ids == (0, 1) and set(result.damping) == {0, 1}


def test_audit_without_save_dir_matches_a_stored_run(tmp_path):
    x, y, _ = _noisy_clusters(n=30, flips=3)
    checkpoints = _trained(x, y, 1)
    batches = [(x, y)]
    options = dict(progress=False, proj_dim=16, device="cpu")

    stored = kt.audit(
        models.mlp((4, 16, 3)), checkpoints, batches, save_dir=tmp_path, **options
    )
    temporary = kt.audit(models.mlp((4, 16, 3)), checkpoints, batches, **options)

    assert temporary.save_dir is None
    np.testing.assert_allclose(temporary.self_scores, stored.self_scores, rtol=1e-6)
    np.testing.assert_array_equal(temporary.ranking, stored.ranking)


def test_audit_refuses_no_checkpoints():
    with pytest.raises(kt.ConfigurationError, match="checkpoints is empty"):
        kt.audit(models.mlp((4, 3)), [], [(torch.zeros(2, 4), torch.zeros(2).long())])


def test_audit_top_returns_the_most_suspicious_with_their_scores():
    result = Audit.from_self_scores(np.array([0.2, 0.9, 0.1, 0.9, 0.5]))

    top = result.top(3)

    np.testing.assert_array_equal(result.ranking, [1, 3, 4, 0, 2])
    np.testing.assert_array_equal(top.indices, [1, 3, 4])
    np.testing.assert_allclose(top.scores, [0.9, 0.9, 0.5])
    assert len(result.top(50).indices) == 5 and len(result) == 5
    with pytest.raises(kt.ConfigurationError, match="k must be an integer ≥ 0"):
        result.top(-1)
