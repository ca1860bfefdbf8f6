"""End-to-end TRAK scores against the formula, invariances and numerics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
from torch import nn

import kerntrace as kt
from kerntrace.projection import DenseProjector

LAMBDA = 0.05


def _checkpoints(make_mlp, count, **shape):
    return [
        make_mlp(seed=10 + m, dtype=torch.float64, **shape).state_dict()
        for m in range(count)
    ]


def _reference_scores(
    model,
    checkpoints,
    train,
    targets,
    loop_gradients,
    *,
    projection,
    lam,
    weighted=True,
):
    """DESIGN's formula, densely: τ = [mean_m F_m φ_m(z')ᵀ] × [mean_m Q_m],
    with F_m = Φ_m (Φ_mᵀ R_m Φ_m + λI)⁻¹ (R = I when not ``weighted``)."""
    xs, ys = train
    xt, yt = targets
    mean_features = 0.0
    mean_q = 0.0
    for model_id, checkpoint in enumerate(checkpoints):
        model.load_state_dict(checkpoint)
        p_matrix = projection(model_id).numpy()
        phi = loop_gradients(model, xs, ys).numpy() @ p_matrix
        phi_targets = loop_gradients(model, xt, yt).numpy() @ p_matrix
        with torch.no_grad():
            probs = torch.softmax(model(xs), dim=1)
        q = (1 - probs[torch.arange(len(ys)), ys]).numpy().astype(np.float64)
        curvature = q * (1 - q) if weighted else np.ones_like(q)  # R = p_y (1 - p_y)
        kernel = phi.T @ (phi * curvature[:, None]) + lam * np.eye(phi.shape[1])
        train_features = np.linalg.solve(kernel, phi.T).T  # Φ (ΦᵀRΦ + λI)⁻¹
        mean_features = mean_features + train_features @ phi_targets.T
        mean_q = mean_q + q
    count = len(checkpoints)
    return (mean_features / count) * (mean_q / count)[:, None]


def _assert_scores_close(actual, expected, rtol=1e-5):
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# -- (a), (b): the formula ----------------------------------------------------


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("curvature", [True, False], ids=["weighted", "plain"])
def test_dense_scores_equal_the_formula(
    tmp_path, make_mlp, make_classification, loop_gradients, run_traker, curvature
):
    model = make_mlp(dtype=torch.float64)
    checkpoints = _checkpoints(make_mlp, 2)
    train = make_classification(40, seed=1, dtype=torch.float64)
    targets = make_classification(6, seed=2, dtype=torch.float64)
    p, k, seed = 51, 16, 3

    scores = run_traker(
        model,
        checkpoints,
        train,
        targets,
        tmp_path,
        proj_dim=k,
        projector="dense",
        projector_seed=seed,
        lambda_reg=LAMBDA,
        curvature=curvature,
        feature_dtype="float64",
    )

    def projection(model_id):
        projector = DenseProjector(p, k, seed=seed, model_id=model_id)
        return projector.matrix().double()

    expected = _reference_scores(
        model,
        checkpoints,
        train,
        targets,
        loop_gradients,
        projection=projection,
        lam=LAMBDA,
        weighted=curvature,
    )
    assert scores.shape == (40, 6)
    _assert_scores_close(scores, expected)


@pytest.mark.filterwarnings("error")
def test_identity_projector_scores_equal_the_formula(
    tmp_path, make_mlp, make_classification, loop_gradients, run_traker
):
    model = make_mlp(dtype=torch.float64)
    checkpoints = _checkpoints(make_mlp, 2)
    train = make_classification(40, seed=1, dtype=torch.float64)
    targets = make_classification(6, seed=2, dtype=torch.float64)

    scores = run_traker(
        model,
        checkpoints,
        train,
        targets,
        tmp_path,
        projector="identity",
        lambda_reg=LAMBDA,
        feature_dtype="float64",
    )

    expected = _reference_scores(
        model,
        checkpoints,
        train,
        targets,
        loop_gradients,
        projection=lambda _: torch.eye(51, dtype=torch.float64),
        lam=LAMBDA,
    )
    # float64 features are stored at float64 precision, not rounded to float32.
    stored = np.load(tmp_path / "models" / "1" / "features.npy")
    assert stored.dtype == np.float64 and stored.shape == (40, 51)
    model.load_state_dict(checkpoints[1])
    exact = loop_gradients(model, *train).numpy()
    np.testing.assert_allclose(stored, exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    _assert_scores_close(scores, expected)


# -- (c) I3: batch sizes ----------------------------------------------------------


def test_i3_scores_same_for_any_train_batch_size(
    tmp_path, make_mlp, make_classification, run_traker
):
    model = make_mlp()
    checkpoints = [make_mlp(seed=10 + m).state_dict() for m in range(2)]
    train = make_classification(43, seed=1)
    targets = make_classification(6, seed=2)

    results = {}
    for batch in (1, 5, 24, [20, 20, 3]):
        key = str(batch)
        results[key] = run_traker(
            model,
            checkpoints,
            train,
            targets,
            tmp_path / key.replace(" ", ""),
            train_batch=batch,
            target_batch=4,
            proj_dim=16,
            lambda_reg=LAMBDA,
        )

    reference = results["1"]
    assert reference.shape == (43, 6)
    for scores in results.values():
        _assert_scores_close(scores, reference, rtol=1e-5)


# -- (d) N1: rank-deficient kernel ------------------------------------------


def _n1_data(make_classification, duplicates):
    x, y = make_classification(64, shape=(10,), classes=3, seed=5)
    if duplicates:
        x[54:] = x[:10]
        y[54:] = y[:10]
    copied = [0, 7, 20, 41, 63]
    return (x, y), (x[copied].clone(), y[copied].clone()), copied


@pytest.mark.parametrize(
    ("duplicates", "proj_dim"), [(False, 128), (True, 60)], ids=["k>n", "duplicates"]
)
def test_n1_default_damping_finds_the_copied_point(
    duplicates, proj_dim, tmp_path, make_mlp, make_classification, run_traker
):
    model = make_mlp(d_in=10, hidden=16, classes=3)
    train, targets, copied = _n1_data(make_classification, duplicates)

    with warnings.catch_warnings():
        warnings.simplefilter("error", kt.IllConditionedWarning)
        scores = run_traker(
            model, [model.state_dict()], train, targets, tmp_path, proj_dim=proj_dim
        )

    assert np.isfinite(scores).all()
    assert np.abs(scores).max() > 0
    for column, row in enumerate(copied):
        top = int(np.argmax(scores[:, column]))
        twins = {row, row + 54} if duplicates and row < 10 else {row}
        twins |= {row - 54} if duplicates and row >= 54 else set()
        assert top in twins, (column, row, top)
    if duplicates:
        np.testing.assert_array_equal(scores[:10], scores[54:])


@pytest.mark.parametrize(
    ("duplicates", "proj_dim", "cause"),
    [(False, 128, "proj_dim"), (True, 60, "duplicated")],
    ids=["k>n", "duplicates"],
)
def test_n1_zero_damping_is_an_error_or_warning_naming_the_cause(
    duplicates, proj_dim, cause, tmp_path, make_mlp, make_classification
):
    model = make_mlp(d_in=10, hidden=16, classes=3)
    (x, y), _, _ = _n1_data(make_classification, duplicates)
    expect_early = pytest.warns(kt.IllConditionedWarning, match="singular")
    with expect_early if proj_dim >= 64 else warnings.catch_warnings():
        traker = kt.TRAKer(
            model,
            "classification",
            64,
            tmp_path,
            proj_dim=proj_dim,
            lambda_reg=0.0,
            device="cpu",
        )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize((x, y), num_samples=64)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            traker.finalize_features()
        except kt.NumericalError as error:
            message = str(error)
        else:
            found = [
                w for w in caught if issubclass(w.category, kt.IllConditionedWarning)
            ]
            assert found, "λ=0 on a singular kernel gave neither error nor warning"
            message = str(found[0].message)

    assert cause in message
    assert "singular" in message
    assert "lambda_reg" in message


# -- (e) N3: convex ground truth --------------------------------------------


class _LogisticTask:
    """Binary logistic regression: f = s·(wᵀx + b) with s = ±1, Q = σ(-f)."""

    name = "logistic"

    def output(self, model, batch):
        x, sign = batch
        return sign * model(x).reshape(-1)

    def out_to_loss(self, model, batch):
        return torch.sigmoid(-self.output(model, batch))


def _fit_logistic(x, sign, lam, start=None):
    """argmin Σ log(1 + exp(-s (wᵀx + b))) + λ/2 ‖(w, b)‖², to high precision."""
    design = np.hstack([x, np.ones((x.shape[0], 1))])

    def objective(theta):
        margins = sign * (design @ theta)
        value = np.logaddexp(0, -margins).sum() + 0.5 * lam * theta @ theta
        weights = -sign * scipy.special.expit(-margins)
        return value, design.T @ weights + lam * theta

    theta = np.zeros(design.shape[1]) if start is None else start
    result = scipy.optimize.minimize(
        objective,
        theta,
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-13, "ftol": 0, "maxiter": 10_000},
    )
    theta = result.x
    for _ in range(5):  # Newton polish: the objective is smooth and convex
        margins = sign * (design @ theta)
        p = scipy.special.expit(margins)
        gradient = design.T @ (-sign * (1 - p)) + lam * theta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + lam * np.eye(
            len(theta)
        )
        theta = theta - np.linalg.solve(hessian, gradient)
    assert np.abs(objective(theta)[1]).max() < 1e-10
    return theta


def test_n3_scores_rank_like_exact_leave_one_out(tmp_path):
    rng = np.random.default_rng(0)
    n, d, lam = 60, 5, 1e-2
    w_true = rng.normal(size=d)
    x_all = rng.normal(size=(n + 8, d))
    logits = x_all @ w_true + 0.3
    sign_all = np.where(rng.random(n + 8) < scipy.special.expit(logits), 1.0, -1.0)
    x, sign = x_all[:n], sign_all[:n]
    x_targets, sign_targets = x_all[n:], sign_all[n:]

    theta = _fit_logistic(x, sign, lam)

    def target_margins(theta_):
        return sign_targets * (x_targets @ theta_[:-1] + theta_[-1])

    base = target_margins(theta)
    effects = np.empty((n, len(sign_targets)))
    for i in range(n):
        keep = np.arange(n) != i
        loo = _fit_logistic(x[keep], sign[keep], lam, start=theta.copy())
        effects[i] = base - target_margins(loo)  # including i raises f by this

    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:-1]).reshape(1, d))
        model.bias.copy_(torch.from_numpy(theta[-1:]))
    as_tensor = torch.from_numpy
    train = (as_tensor(x), as_tensor(sign))
    targets = (as_tensor(x_targets), as_tensor(sign_targets))
    traker = kt.TRAKer(
        model,
        _LogisticTask(),
        n,
        tmp_path,
        projector="identity",
        lambda_reg=lam,
        feature_dtype="float64",
        device="cpu",
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(train, num_samples=n)
    traker.finalize_features()
    traker.start_scoring_checkpoint("t", model.state_dict(), 0, len(sign_targets))
    traker.score(targets, num_samples=len(sign_targets))
    scores = np.array(traker.finalize_scores("t"))

    correlations = [
        scipy.stats.spearmanr(scores[:, j], effects[:, j]).statistic
        for j in range(len(sign_targets))
    ]
    assert np.mean(correlations) > 0.9, correlations
    assert min(correlations) > 0.8, correlations
