"""Cases N4, N6, S7, M2, M3, M4 and M5 of CASES.md, the train-mode decision,
and the error every public call raises on bad input.

Each case is a small model on synthetic data; together they take a few
seconds. The boundary tests at the end check one bad argument each: the
error class, a message naming the value, and that nothing was written.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import kerntrace as kt
from kerntrace import kernel

N_TRAIN = 24
N_TARGETS = 5


def make_mlp(seed: int = 0, *, bias: bool = True, classes: int = 3) -> nn.Sequential:
    """``body`` (Linear 6→8, Tanh) and ``head`` (Linear 8→classes)."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh()))
    model.add_module("head", nn.Linear(8, classes, bias=bias))
    return model


def make_data(n: int, seed: int, *, classes: int = 3) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes ({} if absent)."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def featurized(save_dir: Path, model: nn.Module, train, **options) -> kt.TRAKer:
    """A TRAKer with checkpoint 0 (the model itself) loaded and featurized."""
    options = {"proj_dim": 16, "device": "cpu", **options}
    task = options.pop("task", "classification")
    traker = kt.TRAKer(model, task, len(train[0]), save_dir, **options)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(train, num_samples=len(train[0]))
    return traker


def scored(traker: kt.TRAKer, model: nn.Module, targets, exp: str = "t") -> np.ndarray:
    """Finalize, score ``targets`` with checkpoint 0 and return the scores."""
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp, model.state_dict(), 0, len(targets[0]))
    traker.score(targets, num_samples=len(targets[0]))
    return np.array(traker.finalize_scores(exp))


# -- N4: half precision ---------------------------------------------------------


def homogeneous_mlp(scale: float) -> nn.Sequential:
    """A bias-free ReLU MLP with every weight times ``scale``.

    Its per-example gradients scale like ``scale`` (the margin's derivative
    in the logits stays bounded), so × 1e3 gives huge and × 1e-4 tiny ones.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)
    )
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(scale)
    return model


@pytest.mark.parametrize("projector", ["dense", "factorized"])
@pytest.mark.parametrize("scale", [1e3, 1e-4])
def test_n4_huge_and_tiny_gradients_in_half_precision_rank_like_float32(
    tmp_path, run_traker, scale, projector
):
    model = homogeneous_mlp(scale)
    train, targets = make_data(60, seed=1), make_data(8, seed=2)
    options = {"proj_dim": 64, "projector": projector}

    with warnings.catch_warnings():
        warnings.simplefilter("error", kt.PrecisionWarning)
        half = run_traker(
            model, [model.state_dict()], train, targets, tmp_path / "half",
            feature_dtype="float16", **options,
        )  # fmt: skip
    full = run_traker(
        model, [model.state_dict()], train, targets, tmp_path / "full", **options
    )

    settings = json.loads((tmp_path / "half" / "store.json").read_text())
    assert settings["feature_dtype"] == "float16"
    stored = np.load(tmp_path / "half" / "models" / "0" / "features.npy")
    assert stored.dtype == np.float16
    magnitude = float(np.abs(stored.astype(np.float64)).max())
    assert magnitude > 100 if scale > 1 else magnitude < 1e-2  # the case is real
    for path in (tmp_path / "half").rglob("*.npy"):
        assert np.isfinite(np.load(path).astype(np.float64)).all(), path
    assert np.isfinite(half).all()
    rho = scipy.stats.spearmanr(half.ravel(), full.ravel()).statistic
    assert rho > 0.99, rho


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_with_the_auto_projector_score_like_float32(
    tmp_path, run_traker, dtype
):
    full_model = make_mlp(0)
    model = make_mlp(0).to(dtype)
    train, targets = make_data(40, seed=1), make_data(6, seed=2)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in train)
    low_targets = tuple(t.to(dtype) if t.is_floating_point() else t for t in targets)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        half = run_traker(
            model, [model.state_dict()], low, low_targets, tmp_path / "half",
            proj_dim=32, projector="auto",
        )  # fmt: skip
    full = run_traker(
        full_model, [full_model.state_dict()], train, targets, tmp_path / "full",
        proj_dim=32, projector="auto",
    )  # fmt: skip

    assert np.isfinite(half).all()
    rho = scipy.stats.spearmanr(half.ravel(), full.ravel()).statistic
    assert rho > 0.95, rho


def test_n4_features_beyond_float16_range_are_refused_before_anything_is_written(
    tmp_path,
):
    model = homogeneous_mlp(1e5)  # features ~1e7, beyond float16's 65504
    train = make_data(12, seed=1)
    traker = kt.TRAKer(
        model, "classification", 12, tmp_path, proj_dim=16,
        use_half_precision=True, device="cpu",
    )  # fmt: skip
    traker.load_checkpoint(model.state_dict(), model_id=0)

    with pytest.raises(kt.NumericalError, match=r"float16's largest value 65504"):
        traker.featurize(train, num_samples=12)

    folder = tmp_path / "models" / "0"
    assert not np.load(folder / "done.npy").any()
    assert not np.load(folder / "features.npy").any()


def test_n4_features_below_float16_range_warn_naming_the_cause(tmp_path):
    model = homogeneous_mlp(1e-7)  # features ~1e-7, float16 subnormals
    train = make_data(12, seed=1)

    with pytest.warns(kt.PrecisionWarning, match=r"below float16's normal range"):
        traker = featurized(tmp_path, model, train, feature_dtype="float16")

    assert np.isfinite(np.load(tmp_path / "models/0/features.npy")).all()
    traker.finalize_features()  # usable, if imprecise: no error
    assert (tmp_path / "models" / "0" / "kernel.json").exists()


def test_n4_a_component_shared_by_every_example_warns_in_float16(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 1)  # the bias gradient 1 dwarfs the tiny inputs'
    x = 1e-6 * torch.randn(12, 6)
    y = torch.randn(12)

    with pytest.warns(kt.PrecisionWarning, match="differ between examples"):
        featurized(
            tmp_path,
            model,
            (x, y),
            task="regression",
            feature_dtype="float16",
            projector="dense",
        )


# -- N6: scaling laws -------------------------------------------------------------


class ScaledRegressor(nn.Module):
    """A regressor whose output is multiplied by ``scale`` (not a parameter)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x).squeeze(-1)


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randn(n, generator=generator)


def test_n6_target_output_times_10_gives_exactly_10_times_the_scores(tmp_path):
    # τ(z', z_i) is linear in the target's features φ(z') = ∇f(z'): attributing
    # 10·f(z') instead of f(z') must give 10 × the scores, with λ held fixed.
    model = ScaledRegressor()
    train, targets = regression_data(N_TRAIN, 1), regression_data(N_TARGETS, 2)
    traker = featurized(tmp_path, model, train, task="regression", lambda_reg=0.1)
    plain = scored(traker, model, targets, exp="plain")

    model.scale = 10.0
    traker.start_scoring_checkpoint("times10", model.state_dict(), 0, N_TARGETS)
    traker.score(targets, num_samples=N_TARGETS)
    times10 = np.array(traker.finalize_scores("times10"))

    assert np.abs(plain).max() > 0
    np.testing.assert_allclose(times10, 10 * plain, rtol=1e-5, atol=1e-6)


class UnitWeightTask:
    """Output: the prediction; out-to-loss weight: 1 for every example."""

    name = "unit_weight"

    def output(self, model, batch):
        return model(batch[0])

    def out_to_loss(self, model, batch):
        return torch.ones(batch[0].shape[0])


def test_n6_output_of_train_and_targets_times_10_leaves_scores_unchanged(tmp_path):
    # Scaling f everywhere by c multiplies Φ by c; the automatic λ is re-chosen
    # as c² λ, so (ΦᵀΦ + λI)⁻¹ absorbs both c's and, with a weight Q that does
    # not depend on f, the scores are unchanged.
    train, targets = regression_data(N_TRAIN, 1), regression_data(N_TARGETS, 2)
    results = {}
    for scale in (1.0, 10.0):
        model = ScaledRegressor()
        model.scale = scale
        traker = featurized(tmp_path / str(scale), model, train, task=UnitWeightTask())
        results[scale] = (scored(traker, model, targets), traker.damping[0])

    (plain, damping), (times10, damping10) = results[1.0], results[10.0]
    np.testing.assert_allclose(damping10, 100 * damping, rtol=1e-5)
    np.testing.assert_allclose(times10, plain, rtol=1e-4, atol=1e-6)


def mse_task(reduction: str) -> kt.LossTask:
    return kt.LossTask(
        lambda model, batch: model(batch[0]),
        lambda f, batch: F.mse_loss(f, batch[1], reduction=reduction),
        name="mse",
    )


def test_n6_scores_do_not_depend_on_the_loss_reduction_or_the_batch_size(
    tmp_path, run_traker
):
    # A task's Q(z_i) = -∂ℓ_i/∂f_i is per example. Derived by hand from a
    # batch loss with reduction="mean", it would carry a 1/B that changes
    # with the batch; LossTask evaluates the loss on each example alone.
    model = ScaledRegressor()
    train, targets = regression_data(N_TRAIN, 1), regression_data(N_TARGETS, 2)
    checkpoints = [model.state_dict()]
    common = {"proj_dim": 16, "lambda_reg": 0.1}

    mean = run_traker(
        model, checkpoints, train, targets, tmp_path / "mean",
        task=mse_task("mean"), train_batch=8, **common,
    )  # fmt: skip
    total = run_traker(
        model, checkpoints, train, targets, tmp_path / "sum",
        task=mse_task("sum"), train_batch=[5, 13, 6], **common,
    )  # fmt: skip
    squared_error = run_traker(
        model, checkpoints, train, targets, tmp_path / "regression",
        task="regression", **common,
    )  # fmt: skip

    assert np.abs(mean).max() > 0
    np.testing.assert_allclose(total, mean, rtol=1e-5, atol=1e-7)
    # mse = (f - y)², so Q = 2 (y - f): twice the built-in regression's y - f.
    np.testing.assert_allclose(mean, 2 * squared_error, rtol=1e-5, atol=1e-7)


def test_loss_task_refuses_a_loss_that_is_not_a_scalar(tmp_path):
    task = kt.LossTask(
        lambda model, batch: model(batch[0]),
        lambda f, batch: torch.stack([f.sum(), f.sum()]),
    )
    model = ScaledRegressor()

    with pytest.raises(kt.ConfigurationError, match="must return a scalar"):
        featurized(tmp_path, model, regression_data(4, 1), task=task)
    with pytest.raises(kt.ConfigurationError, match="must be a function"):
        kt.LossTask("f", lambda f, b: f.sum())
    with pytest.raises(kt.ConfigurationError, match="non-empty string"):
        kt.LossTask(lambda m, b: m(b[0]), lambda f, b: f.sum(), name="")


# -- S7: memory and log size -------------------------------------------------------


def test_s7_finalizing_20000_rows_at_k256_peaks_within_three_blocks(tmp_path):
    n, k = 20_000, 256
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(n, 16), torch.randint(0, 4, (n,))
    traker = kt.TRAKer(model, "classification", n, tmp_path, proj_dim=k, device="cpu")
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, n, 5000):
        batch = (x[start : start + 5000], y[start : start + 5000])
        traker.featurize(batch, num_samples=5000)
    block_rows = inspect.signature(kernel.gram).parameters["block_rows"].default
    block = block_rows * k * 8  # one float64 block of rows
    whole = n * k * 8  # what reading every row at once would take

    tracemalloc.start()
    try:
        traker.finalize_features()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert whole > 4 * block  # the bound below is far from the whole array
    assert peak < 3 * block, (peak, block)
    assert (tmp_path / "models" / "0" / "cholesky.npy").exists()


class DeepNet(nn.Module):
    """60 blocks of two long-named Linear layers, with Dropout: 120 layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.residual_blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "input_projection": nn.Linear(4, 4),
                    "output_projection": nn.Linear(4, 4),
                    "dropout": nn.Dropout(0.1),
                }
            )
            for _ in range(60)
        )
        self.classifier_head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.residual_blocks:
            inner = torch.tanh(block["input_projection"](x))
            x = x + 0.1 * block["dropout"](block["output_projection"](inner))
        return self.classifier_head(x)


def test_s7_no_log_message_of_a_full_run_is_longer_than_2kb(tmp_path, caplog):
    model = DeepNet().train()
    generator = torch.Generator().manual_seed(0)
    train = (torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,)))
    targets = (torch.randn(4, 4, generator=generator), torch.randint(0, 3, (4,)))
    caplog.set_level(logging.DEBUG, logger="kerntrace")

    traker = featurized(tmp_path, model, train, proj_dim=32)
    scored(traker, model, targets)
    traker.self_scores()
    kt.TRAKer(model, "classification", 16, tmp_path, proj_dim=32, device="cpu")

    messages = [record.getMessage() for record in caplog.records]
    assert any("factorized projection" in m for m in messages)
    assert any("train mode" in m for m in messages)
    longest = max(messages, key=len)
    assert len(longest) <= 2048, longest[:300]


# -- M2: grad_wrt and frozen parameters ---------------------------------------------


@pytest.mark.parametrize("projector", ["dense", "factorized", "identity"])
def test_m2_grad_wrt_head_equals_a_head_only_model_fed_the_backbone_activations(
    tmp_path, projector
):
    model = make_mlp(0)
    train, targets = make_data(N_TRAIN, 1), make_data(N_TARGETS, 2)
    head = copy.deepcopy(model.head)
    with torch.no_grad():
        activations = model.body(train[0]), model.body(targets[0])
    options = {"projector": projector, "lambda_reg": 0.1}

    whole = featurized(tmp_path / "whole", model, train, grad_wrt="head", **options)
    alone = featurized(tmp_path / "head", head, (activations[0], train[1]), **options)

    settings = json.loads((tmp_path / "whole" / "store.json").read_text())
    assert settings["parameters"] == ["head.weight", "head.bias"]
    for name in ("features.npy", "out_to_loss.npy"):
        np.testing.assert_allclose(
            np.load(tmp_path / "whole" / "models" / "0" / name),
            np.load(tmp_path / "head" / "models" / "0" / name),
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_allclose(
        scored(whole, model, targets),
        scored(alone, head, (activations[1], targets[1])),
        rtol=1e-4,
        atol=1e-6,
    )


def test_m2_frozen_parameters_are_left_out_by_default(tmp_path):
    frozen = make_mlp(0)
    frozen.body.requires_grad_(False)
    train = make_data(N_TRAIN, 1)

    featurized(tmp_path / "frozen", frozen, train, projector="dense")
    featurized(
        tmp_path / "named", make_mlp(0), train, projector="dense", grad_wrt="head"
    )

    settings = json.loads((tmp_path / "frozen" / "store.json").read_text())
    assert settings["parameters"] == ["head.weight", "head.bias"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "frozen" / "models" / "0" / "features.npy"),
        np.load(tmp_path / "named" / "models" / "0" / "features.npy"),
    )
    assert not any(p.requires_grad for p in frozen.body.parameters())


def test_m2_an_all_frozen_model_is_a_clear_error_and_creates_nothing(tmp_path):
    model = make_mlp(0).requires_grad_(False)

    with pytest.raises(kt.ConfigurationError, match=r"requires_grad=False.*grad_wrt"):
        kt.TRAKer(model, "classification", 10, tmp_path / "store", device="cpu")

    assert not (tmp_path / "store").exists()


# -- M3: dtype and device of the batch ----------------------------------------------


class StrictNet(nn.Module):
    """Asserts that its input has its first parameter's device and dtype."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = next(self.parameters())
        assert x.device == first.device and x.dtype == first.dtype, (
            f"expected input of dtype {first.dtype} on device {first.device}, "
            f"got {x.dtype} on {x.device}"
        )
        return self.fc(torch.tanh(x))


@pytest.mark.parametrize(
    ("model_dtype", "batch_dtype"),
    [
        (torch.float64, torch.float32),
        (torch.float64, torch.float16),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("projector", ["dense", "factorized"])
def test_m3_the_batch_is_cast_to_the_model_dtype_and_moved_to_its_device(
    tmp_path, model_dtype, batch_dtype, projector
):
    model = StrictNet().to(model_dtype)
    x, y = make_data(N_TRAIN, 1)
    x = x.to(batch_dtype)
    xt, yt = make_data(N_TARGETS, 2)
    options = {"projector": projector, "feature_dtype": "float64"}

    given = featurized(tmp_path / "given", model, (x, y), **options)
    featurized(tmp_path / "cast", model, (x.to(model_dtype), y), **options)

    np.testing.assert_array_equal(
        np.load(tmp_path / "given" / "models" / "0" / "features.npy"),
        np.load(tmp_path / "cast" / "models" / "0" / "features.npy"),
    )
    scores = scored(given, model, (xt.to(batch_dtype), yt))
    assert np.isfinite(scores).all() and scores.shape == (N_TRAIN, N_TARGETS)


@pytest.mark.parametrize(
    "make", [StrictNet, lambda: nn.Linear(6, 3)], ids=["asserting", "plain"]
)
def test_m3_inputs_the_model_cannot_take_raise_an_error_naming_device_and_dtype(
    tmp_path, make
):
    model = make()
    traker = kt.TRAKer(model, "classification", 8, tmp_path, proj_dim=8, device="cpu")
    traker.load_checkpoint(model.state_dict(), model_id=0)
    x, y = make_data(8, seed=1)
    traker.featurize((x[:4], y[:4]), inds=range(4))
    traker.flush()
    images = torch.randint(0, 255, (4, 6), dtype=torch.uint8)  # not cast: integer
    before = snapshot(tmp_path)

    with pytest.raises(kt.BatchError, match="dtype or device") as error:
        traker.featurize((images, y[4:]), inds=range(4, 8))

    message = str(error.value)
    for part in ("(cpu)", "(torch.float32)", "batch[0] torch.uint8 on cpu", "float()"):
        assert part in message
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_m3_a_cuda_device_the_machine_lacks_is_a_configuration_error(tmp_path):
    with pytest.raises(kt.ConfigurationError, match=r"device 'cuda:1'.*device='cpu'"):
        kt.TRAKer(make_mlp(), "classification", 8, tmp_path, device="cuda:1")


# -- M4: a user-defined task against the closed form ---------------------------------


class SquaredErrorTask:
    """The user's regression: f is the prediction, Q = y - f (loss ½(y - f)²)."""

    name = "my_squared_error"

    def output(self, model, batch):
        return model(batch[0]).squeeze(-1)

    def out_to_loss(self, model, batch):
        return batch[1] - model(batch[0]).squeeze(-1)


def test_m4_user_regression_task_matches_the_closed_form_ridge_influence(tmp_path):
    rng = np.random.default_rng(0)
    n, d, alpha = 40, 5, 1.0
    x, x_targets = rng.normal(size=(n, d)), rng.normal(size=(10, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    design = np.hstack([x, np.ones((n, 1))])  # the bias is a column of ones
    design_targets = np.hstack([x_targets, np.ones((10, 1))])
    inverse = np.linalg.inv(design.T @ design + alpha * np.eye(d + 1))
    weights = inverse @ design.T @ y  # ridge fit, penalty ½ α ‖w‖²
    residuals = y - design @ weights
    leverage = np.einsum("ij,jk,ik->i", design, inverse, design)
    # Exact leave-one-out: f(z') minus f(z') refitted without example i.
    influence = (design @ inverse @ design_targets.T) * (residuals / (1 - leverage))[
        :, None
    ]
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weights[:d]).reshape(1, d))
        model.bias.copy_(torch.from_numpy(weights[d:]))

    scores = kt.attribute(
        model,
        [model.state_dict()],
        [(torch.from_numpy(x), torch.from_numpy(y))],
        [(torch.from_numpy(x_targets), torch.zeros(10, dtype=torch.float64))],
        task=SquaredErrorTask(),
        save_dir=tmp_path,
        progress=False,
        proj_dim=64,
        lambda_reg=alpha,
        device="cpu",
    )

    assert scores.shape == (n, 10)
    assert json.loads((tmp_path / "store.json").read_text())["task"] == (
        "my_squared_error"
    )
    correlation = np.corrcoef(scores.to_numpy().ravel(), influence.ravel())[0, 1]
    assert correlation > 0.95, correlation


# -- M5: a clean process, CPU only ---------------------------------------------------

CLEAN_RUN = """
import importlib.abc, logging, sys, warnings

# Compiled accelerators the TRAK ecosystem uses: make sure none is needed.
BLOCKED = {"fast_jl", "trak", "cupy", "triton"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

import torch
from torch import nn
import kerntrace as kt

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    traker = kt.TRAKer(model, "classification", 20, sys.argv[1], proj_dim=16)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize((x, y), num_samples=20)
    traker.finalize_features()
    traker.start_scoring_checkpoint("t", model.state_dict(), 0, 4)
    traker.score((x[:4], y[:4]), num_samples=4)
    scores = traker.finalize_scores("t")
assert scores.shape == (20, 4), scores.shape
assert not caught, [str(w.message) for w in caught]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("loaded-blocked:", loaded)
print("device:", traker.device)
"""


def test_m5_a_clean_cpu_process_runs_featurize_finalize_score_and_logs_the_projector(
    tmp_path,
):
    # kerntrace has no optional accelerator path (every projector is plain
    # torch), so there is no fallback to test: the process must run with
    # the usual compiled accelerators made unimportable, on CPU only, warn
    # about nothing, and its log must name the projector it used.
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")
    }
    env.update({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    script = tmp_path / "clean_run.py"
    script.write_text(textwrap.dedent(CLEAN_RUN))

    done = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded-blocked: []" in done.stdout
    assert "device: cpu" in done.stdout
    assert "projector 'auto' chose 'factorized'" in done.stderr
    assert "projector factorized with k=16" in done.stderr


# -- train mode ------------------------------------------------------------------


def test_a_model_in_train_mode_runs_in_eval_mode_is_logged_once_and_restored(
    tmp_path, caplog, make_cnn, make_classification
):
    # Decision: a train-mode model is accepted rather than refused; TRAK
    # attributes the deterministic eval-mode function, so BatchNorm uses its
    # running statistics and Dropout is off, and every module's mode is put
    # back. Refusing would only make every user call model.eval() first.
    x, y = make_classification(12, shape=(1, 6, 6))
    training = make_cnn().train()
    training.head.eval()  # a mix of modes, each to be restored as it was
    modes = {name: m.training for name, m in training.named_modules()}
    buffers = {k: v.clone() for k, v in training.state_dict().items()}
    caplog.set_level(logging.INFO, logger="kerntrace")

    traker = featurized(tmp_path / "train", training, (x, y))
    traker.load_checkpoint(training.state_dict(), model_id=1)
    featurized(tmp_path / "eval", make_cnn().eval(), (x, y))

    notes = [r for r in caplog.records if "train mode" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "norm, drop" in notes[0].getMessage()
    assert {name: m.training for name, m in training.named_modules()} == modes
    for key, value in training.state_dict().items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0)
    np.testing.assert_allclose(
        np.load(tmp_path / "train" / "models" / "0" / "features.npy"),
        np.load(tmp_path / "eval" / "models" / "0" / "features.npy"),
        rtol=1e-6,
        atol=1e-7,
    )


# -- the boundary: one bad argument each -------------------------------------------


class CountingNet(nn.Module):
    """An MLP that counts its forward calls, to show no work was done."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


BAD_INDS = [
    ([0, 1, 1, 2], r"inds holds duplicates \(\[1\]\)"),
    ([-1, 0, 1, 2], r"inds must lie in 0\.\.23, got values from -1"),
    ([0, 1, 2, 24], r"inds must lie in 0\.\.23, got values from 0 to 24"),
    ([0, 1, 2], r"inds has 3 entries but the batch holds 4"),
    ([0, 1, 2, 3, 4], r"inds has 5 entries but the batch holds 4"),
    ([0.0, 1.0, 2.0, 3.0], r"inds must be a 1-d sequence of integers"),
    ([True, False, True, False], r"inds must be a 1-d sequence of integers"),
    ([[0, 1], [2, 3]], r"inds must be a 1-d sequence of integers"),
    ([[0, 1], [2]], r"inds must be a 1-d sequence of integers"),
    ({0, 1, 2, 3}, r"ordered sequence .* got a set"),
    (np.array([0, 1, 2, 2**63], dtype=np.uint64), r"inds must lie in 0\.\.23"),
]


@pytest.mark.parametrize(("inds", "message"), BAD_INDS)
def test_bad_inds_are_refused_before_any_work_and_nothing_is_written(
    tmp_path, inds, message
):
    model = CountingNet()
    traker = kt.TRAKer(model, "classification", N_TRAIN, tmp_path, device="cpu")
    traker.load_checkpoint(model.state_dict(), model_id=0)
    x, y = make_data(4, seed=1)
    before, calls = snapshot(tmp_path), model.calls

    with pytest.raises(kt.BatchError, match=message):
        traker.featurize((x, y), inds=inds)

    assert model.calls == calls
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "inds",
    [[3, 0, 2, 1], range(4), np.array([3, 0, 2, 1]), torch.tensor([3, 0, 2, 1])],
    ids=["list", "range", "array", "tensor"],
)
def test_inds_as_a_list_range_array_or_tensor_are_accepted(tmp_path, inds):
    traker = kt.TRAKer(make_mlp(), "classification", N_TRAIN, tmp_path, device="cpu")
    traker.load_checkpoint(make_mlp().state_dict(), model_id=0)

    traker.featurize(make_data(4, seed=1), inds=inds)
    traker.flush()

    done = np.load(tmp_path / "models" / "0" / "done.npy")
    assert np.flatnonzero(done).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("num_samples", "message"),
    [(4.0, r"num_samples must be a non-negative integer, got 4\.0"), (True, "True")],
)
def test_num_samples_must_be_an_integer(tmp_path, num_samples, message):
    traker = kt.TRAKer(make_mlp(), "classification", N_TRAIN, tmp_path, device="cpu")
    traker.load_checkpoint(make_mlp().state_dict(), model_id=0)

    with pytest.raises(kt.BatchError, match=message):
        traker.featurize(make_data(4, seed=1), num_samples=num_samples)


x4, y4 = make_data(4, seed=1)
BAD_BATCHES = [
    (x4, r"got a Tensor of shape \(4, 6\); pass e\.g\. batch=\(x, y\)"),
    ("images", r"got a str"),
    ((x4, y4[:3]), r"batch\[0\] has 4, batch\[1\] has 3.*batch\[1\] does not match"),
    ({"x": x4, "y": y4[:2]}, r"batch\['y'\] does not match batch\['x'\]"),
    ((x4, torch.tensor(1)), r"batch\[1\] is a 0-d tensor"),
    ((["a", "b"], [1, 2]), r"the batch holds no tensor"),
    ((x4.to(torch.complex64), y4), r"batch\[0\] is a complex tensor"),
    ((x4, y4.float()), r"needs integer class labels, got batch\[1\] of dtype"),
    ((x4, y4[:, None]), r"labels of shape \(4, 1\) do not fit logits of shape"),
    ((x4, y4 + 3), r"labels must lie in 0\.\.2 for logits with 3 classes"),
    ((x4,), r"expects a batch \(inputs, labels\) of two tensors"),
]


@pytest.mark.parametrize(("batch", "message"), BAD_BATCHES)
@pytest.mark.parametrize("step", ["featurize", "score"])
def test_malformed_batches_are_refused_naming_the_item_and_nothing_is_written(
    tmp_path, batch, message, step
):
    model = make_mlp()
    traker = featurized(tmp_path, model, make_data(N_TRAIN, seed=1))
    if step == "score":
        traker.finalize_features()
        traker.start_scoring_checkpoint("t", model.state_dict(), 0, 8)
    else:
        traker.load_checkpoint(model.state_dict(), model_id=1)
        traker.featurize(make_data(4, seed=2), inds=[4, 5, 6, 7])
        traker.flush()
    before = snapshot(tmp_path)

    with pytest.raises(kt.BatchError, match=message):
        getattr(traker, step)(batch, inds=[0, 1, 2, 3])

    assert snapshot(tmp_path) == before


class WrongShapeTask:
    """A user task whose output or weight is not one float per example."""

    def __init__(self, where: str) -> None:
        self.name = f"wrong_{where}"
        self.where = where

    def output(self, model, batch):
        out = model(batch[0])
        return out if self.where == "output" else out[:, 0]

    def out_to_loss(self, model, batch):
        rows = batch[0].shape[0]
        if self.where == "weights":
            return torch.ones(rows, 2)
        if self.where == "integer_weights":
            return torch.ones(rows, dtype=torch.long)
        if self.where == "list_weights":
            return [1.0] * rows
        return torch.ones(rows)


@pytest.mark.parametrize("projector", ["dense", "factorized"])
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("output", r"'wrong_output': output\(model, batch\) must return one value"),
        ("weights", r"out_to_loss\(model, batch\) must return one value .*, 2\)"),
        ("integer_weights", r"must return floating values, got dtype torch\.int64"),
        ("list_weights", r"must return a tensor of shape \(\d,\), got list"),
    ],
)
def test_a_user_task_with_the_wrong_result_shape_is_named(
    tmp_path, projector, where, message
):
    with pytest.raises(kt.ConfigurationError, match=message):
        featurized(
            tmp_path, make_mlp(), make_data(4, 1), task=WrongShapeTask(where),
            projector=projector,
        )  # fmt: skip


def test_the_regression_task_needs_one_target_per_example(tmp_path):
    with pytest.raises(kt.BatchError, match=r"one target per example.*\(4, 2\)"):
        featurized(
            tmp_path, ScaledRegressor(), (torch.randn(4, 6), torch.randn(4, 2)),
            task="regression",
        )  # fmt: skip


def test_classification_needs_at_least_two_classes(tmp_path):
    with pytest.raises(kt.BatchError, match=r"C ≥ 2 classes.*shape \(\d, 1\)"):
        featurized(tmp_path, make_mlp(classes=1), make_data(4, 1, classes=1))


class Nameless:
    name = ""

    def output(self, model, batch):
        return model(batch[0])[:, 0]

    def out_to_loss(self, model, batch):
        return torch.ones(batch[0].shape[0])


BAD_OPTIONS = [
    ({"train_set_size": 0}, "train_set_size must be a positive integer, got 0"),
    ({"train_set_size": 2.5}, r"train_set_size must be a positive integer, got 2\.5"),
    ({"train_set_size": True}, r"train_set_size must be .* got True"),
    ({"proj_dim": -3}, "proj_dim must be a positive integer, got -3"),
    ({"lambda_reg": -1.0}, r"lambda_reg must be None .* ≥ 0, got -1\.0"),
    ({"lambda_reg": float("nan")}, r"finite number ≥ 0, got nan"),
    ({"lambda_reg": float("inf")}, r"finite number ≥ 0, got inf"),
    ({"lambda_reg": "0.1"}, r"lambda_reg must be None .* got '0\.1' \(str\)"),
    ({"projector_seed": -1}, "projector_seed must be an integer ≥ 0, got -1"),
    ({"projector_seed": 1.5}, r"projector_seed must be an integer ≥ 0, got 1\.5"),
    ({"use_half_precision": "yes"}, "use_half_precision must be True or False"),
    ({"feature_dtype": "int8"}, r"feature_dtype must be one of .* got 'int8'"),
    ({"feature_dtype": np.float16}, r"feature_dtype must be a name"),
    ({"memory_bytes": 0}, "memory_bytes must be a positive integer, got 0"),
    ({"projector": "fast_jl"}, r"unknown projector 'fast_jl'; use one of"),
    ({"device": "gpu"}, r"device 'gpu' is not a torch device"),
    ({"task": "segmentation"}, r"unknown task 'segmentation'; use one of"),
    ({"task": Nameless()}, r"task's name must be a non-empty string"),
    ({"task": object()}, r"neither a task name nor an object"),
    ({"grad_wrt": []}, r"grad_wrt is empty"),
    ({"grad_wrt": "tail"}, r"'tail'.*valid module names: body, body\.0, head"),
    ({"grad_wrt": [torch.zeros(2)]}, r"grad_wrt must hold names .* got Tensor"),
    ({"grad_wrt": 3}, r"grad_wrt must be None, a name or a list of names"),
    ({"save_dir": 3}, r"save_dir must be a path .* got int"),
    ({"model": "resnet"}, r"model must be a torch\.nn\.Module, got str"),
]


@pytest.mark.parametrize(("change", "message"), BAD_OPTIONS)
def test_bad_traker_arguments_are_configuration_errors_naming_the_value(
    tmp_path, change, message
):
    arguments = {
        "model": make_mlp(),
        "task": "classification",
        "train_set_size": N_TRAIN,
        "save_dir": tmp_path / "store",
        "device": "cpu",
        **change,
    }

    with pytest.raises(kt.ConfigurationError, match=message):
        kt.TRAKer(**arguments)

    assert not (tmp_path / "store").exists()


def test_a_model_without_parameters_is_a_configuration_error(tmp_path):
    with pytest.raises(kt.ConfigurationError, match=r"\(Tanh\) has no parameters"):
        kt.TRAKer(nn.Tanh(), "classification", 4, tmp_path, device="cpu")


def test_grad_wrt_names_a_capped_list_of_valid_names_for_a_big_model(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(100)])

    with pytest.raises(kt.ConfigurationError, match="'head'") as error:
        kt.TRAKer(model, "classification", 4, tmp_path, grad_wrt="head")

    message = str(error.value)
    assert "0.weight" in message and "and 70 more" in message
    assert len(message) < 2048


@pytest.fixture
def finalized(tmp_path) -> kt.TRAKer:
    traker = featurized(tmp_path, make_mlp(), make_data(N_TRAIN, seed=1))
    traker.finalize_features()
    return traker


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda t: t.start_scoring_checkpoint("t", make_mlp().state_dict(), 0, 0),
            kt.ConfigurationError,
            "num_targets must be a positive integer, got 0",
        ),
        (
            lambda t: t.start_scoring_checkpoint("t", make_mlp().state_dict(), "0", 3),
            kt.ConfigurationError,
            r"model_id must be a non-negative integer, got '0'",
        ),
        (
            lambda t: t.start_scoring_checkpoint("../t", make_mlp().state_dict(), 0, 3),
            kt.ConfigurationError,
            r"exp_name '\.\./t' is not a valid name",
        ),
        (
            lambda t: t.load_checkpoint(make_mlp().state_dict(), model_id=-1),
            kt.ConfigurationError,
            "model_id must be ≥ 0, got -1",
        ),
        (
            lambda t: t.finalize_features(model_ids="0"),
            kt.ConfigurationError,
            r"model_ids must be None or a list of model ids, got '0'",
        ),
        (
            lambda t: t.finalize_features(model_ids=[0, 0]),
            kt.ConfigurationError,
            r"model_ids holds duplicates \(\[0, 0\]\)",
        ),
        (
            lambda t: t.finalize_features(model_ids=[]),
            kt.ConfigurationError,
            "model_ids is empty",
        ),
        (
            lambda t: t.self_scores(model_ids=[1.0]),
            kt.ConfigurationError,
            r"model_id must be a non-negative integer, got 1\.0",
        ),
        (
            lambda t: t.finalize_scores("../../etc"),
            kt.ConfigurationError,
            r"exp_name '\.\./\.\./etc' is not a valid name",
        ),
        (
            lambda t: t.finalize_scores("t", allow_skip="yes"),
            kt.ConfigurationError,
            "allow_skip must be True or False, got 'yes'",
        ),
    ],
)
def test_bad_arguments_of_the_workflow_steps_are_named(finalized, call, error, message):
    before = snapshot(finalized.save_dir)

    with pytest.raises(error, match=message):
        call(finalized)

    assert snapshot(finalized.save_dir) == before


def test_corrupt_and_misplaced_checkpoint_files_are_checkpoint_format_errors(
    tmp_path,
):
    model = make_mlp()
    traker = kt.TRAKer(model, "classification", N_TRAIN, tmp_path / "s", device="cpu")
    truncated = tmp_path / "model.pt"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    whole_model = tmp_path / "whole.pt"
    torch.save(model, whole_model)
    broken = tmp_path / "model.safetensors"
    save_file(dict(model.state_dict()), broken)
    broken.write_bytes(broken.read_bytes()[:50])
    other = {k: torch.zeros(2) for k in model.state_dict()}

    for checkpoint, message in [
        (truncated, r"cannot be loaded with torch\.load.*save model\.state_dict"),
        (whole_model, r"cannot be loaded with torch\.load.*rather than the whole"),
        (broken, r"cannot be read as safetensors"),
        (tmp_path, r"is a directory; accepted are"),
        (other, r"(?s)does not fit the model .* names and shapes"),
    ]:
        with pytest.raises(kt.CheckpointFormatError, match=message):
            traker.load_checkpoint(checkpoint, model_id=0)


def test_attribute_refuses_a_single_checkpoint_and_one_shot_iterators(tmp_path):
    model = make_mlp()
    batches = [make_data(8, seed=1)]

    with pytest.raises(kt.ConfigurationError, match=r"got one dict.*\[checkpoint\]"):
        kt.attribute(model, dict(model.state_dict()), batches, batches)
    with pytest.raises(kt.ConfigurationError, match=r"train is an iterator"):
        kt.attribute(model, [model.state_dict()], iter(batches), batches)
    with pytest.raises(kt.ConfigurationError, match=r"targets must be re-iterable"):
        kt.attribute(model, [model.state_dict()], batches, make_data(8, seed=1)[0])


def test_scores_views_refuse_a_bad_k_or_target():
    scores = kt.Scores(np.arange(12, dtype=np.float32).reshape(4, 3))

    with pytest.raises(kt.ConfigurationError, match=r"k must be an integer ≥ 0.*-1"):
        scores.top_k(target=0, k=-1)
    with pytest.raises(kt.ConfigurationError, match=r"got 2\.5"):
        scores[0].proponents(2.5)
    with pytest.raises(IndexError, match=r"target must be an integer index, got 1\.0"):
        scores.target(1.0)
    with pytest.raises(IndexError, match="target 3 is out of range; there are 3"):
        scores[3]


def test_a_shuffling_data_loader_is_refused_before_any_work(tmp_path):
    model = nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(
        torch.randn(12, 4), torch.randint(0, 3, (12,))
    )
    shuffled = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    ordered = torch.utils.data.DataLoader(data, batch_size=4)
    with pytest.raises(kt.ConfigurationError, match="shuffle=True"):
        kt.attribute(model, [model.state_dict()], shuffled, ordered, save_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_non_finite_stored_features_stop_finalize_scores_naming_them(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    train, targets = make_data(20, seed=1), make_data(4, seed=2)
    traker = featurized(tmp_path, model, train)
    good = scored(traker, model, targets)
    assert np.isfinite(good).all()
    features = np.load(tmp_path / "models" / "0" / "features.npy", mmap_mode="r+")
    features[3, 0] = np.nan  # damaged on disk after finalization
    features.flush()
    del features
    before = (tmp_path / "experiments" / "t" / "scores.npy").read_bytes()

    with pytest.raises(kt.NumericalError, match="train features of model id 0"):
        traker.finalize_scores("t")
    after = (tmp_path / "experiments" / "t" / "scores.npy").read_bytes()
    assert after == before  # the earlier scores are kept
