"""Per-example gradients equal a plain autograd loop, and leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kerntrace.errors import ConfigurationError, ModelModeError
from kerntrace.gradients import PerExampleGradients, select_parameters
from kerntrace.outputs import ClassificationTask

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32])


def _per_example(model: nn.Module, x, y, grad_wrt=None) -> torch.Tensor:
    layout = select_parameters(model, grad_wrt)
    grads, _ = PerExampleGradients(model, ClassificationTask(), layout).compute((x, y))
    return grads


def _assert_close(actual, expected, dtype) -> None:
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    tol = TOLERANCE[dtype] * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


@DTYPES
def test_mlp_gradients_equal_autograd_loop(
    dtype, make_mlp, make_classification, loop_gradients
):
    model = make_mlp(dtype=dtype)
    x, y = make_classification(9, dtype=dtype)

    expected = loop_gradients(model, x, y)
    actual = _per_example(model, x, y)

    assert actual.shape == (9, 4 * 6 + 6 + 6 * 3 + 3)
    assert float(expected.abs().max()) > 1e-3
    _assert_close(actual, expected, dtype)


@DTYPES
def test_cnn_with_batchnorm_and_dropout_equals_autograd_loop(
    dtype, make_cnn, make_classification, loop_gradients
):
    model = make_cnn(dtype=dtype)
    model.train()
    x, y = make_classification(7, shape=(1, 6, 6), dtype=dtype)

    expected = loop_gradients(model, x, y)
    actual = _per_example(model, x, y)

    _assert_close(actual, expected, dtype)
    # The BatchNorm affine parameters are differentiated too.
    layout = select_parameters(model)
    assert "norm.weight" in layout.names and "norm.bias" in layout.names


@DTYPES
def test_layer_applied_twice_equals_autograd_loop(
    dtype, make_shared_linear, make_classification, loop_gradients
):
    model = make_shared_linear(dtype=dtype)
    x, y = make_classification(6, dtype=dtype)

    expected = loop_gradients(model, x, y)
    actual = _per_example(model, x, y)

    _assert_close(actual, expected, dtype)
    # The shared layer's gradient is the sum over its two uses: compare with
    # two separate copies of the layer holding the same weights.
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    first.load_state_dict(model.shared.state_dict())
    second.load_state_dict(model.shared.state_dict())
    unshared = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), model.head)
    split = loop_gradients(unshared.to(dtype), x, y)
    summed = torch.cat([split[:, :20] + split[:, 20:40], split[:, 40:]], dim=1)
    _assert_close(actual, summed, dtype)
    assert not torch.allclose(split[:, :20], split[:, 20:40])


@DTYPES
def test_gradient_does_not_depend_on_batchmates_or_batch_size(
    dtype, make_cnn, make_classification
):
    model = make_cnn(dtype=dtype)
    x, y = make_classification(17, shape=(1, 6, 6), dtype=dtype)
    alone = _per_example(model, x[3:4], y[3:4])[0]

    in_full = _per_example(model, x, y)[3]
    reordered = torch.tensor([16, 3, 0, 9])
    in_other = _per_example(model, x[reordered], y[reordered])[1]
    scaled = x.clone()
    scaled[:3] *= 100.0
    with_outliers = _per_example(model, scaled, y)[3]

    for row in (in_full, in_other, with_outliers):
        _assert_close(row, alone, dtype)


def test_buffers_unchanged_after_computing(make_cnn, make_classification):
    model = make_cnn()
    model.train()
    x, y = make_classification(8, shape=(1, 6, 6))
    before = {n: b.clone() for n, b in model.named_buffers()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    _per_example(model, x, y)

    after = dict(model.named_buffers())
    assert set(after) == {
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert int(after["norm.num_batches_tracked"]) == 7
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), params_before[name]), name
        assert param.grad is None, name


@pytest.mark.parametrize("start_training", [True, False])
def test_training_mode_restored(start_training, make_cnn, make_classification):
    model = make_cnn()
    model.train(start_training)
    # A mixed state: one submodule in the other mode.
    model.drop.train(not start_training)
    modes = {name: m.training for name, m in model.named_modules()}
    x, y = make_classification(4, shape=(1, 6, 6))

    _per_example(model, x, y)

    assert {name: m.training for name, m in model.named_modules()} == modes


def test_select_parameters_by_module_name(make_mlp):
    model = make_mlp()

    layout = select_parameters(model, "head")

    assert layout.names == ("head.weight", "head.bias")
    assert layout.shapes == ((3, 6), (3,))
    assert layout.numel == 21


def test_select_parameters_by_parameter_name_keeps_model_order(make_mlp):
    model = make_mlp()

    layout = select_parameters(model, ["head.bias", "body.0.weight"])

    assert layout.names == ("body.0.weight", "head.bias")
    assert layout.sizes == (24, 3)


def test_select_parameters_name_prefix_is_not_a_module(make_mlp):
    model = make_mlp()
    # "hea" is a prefix of "head" but no module: it must not match.
    with pytest.raises(ConfigurationError, match="'hea'"):
        select_parameters(model, "hea")


@DTYPES
def test_grad_wrt_restricts_gradients(
    dtype, make_mlp, make_classification, loop_gradients
):
    model = make_mlp(dtype=dtype)
    x, y = make_classification(5, dtype=dtype)
    names = ["body.0.bias", "head.weight"]

    expected = loop_gradients(model, x, y, names)
    actual = _per_example(model, x, y, grad_wrt=names)

    assert actual.shape == (5, 6 + 18)
    _assert_close(actual, expected, dtype)
    by_module = _per_example(model, x, y, grad_wrt="head")
    _assert_close(
        by_module, loop_gradients(model, x, y, ["head.weight", "head.bias"]), dtype
    )


def test_frozen_parameters_excluded_by_default(
    make_mlp, make_classification, loop_gradients
):
    model = make_mlp(dtype=torch.float64)
    for param in model.body.parameters():
        param.requires_grad_(False)
    x, y = make_classification(5, dtype=torch.float64)

    layout = select_parameters(model)
    actual = _per_example(model, x, y)

    assert layout.names == ("head.weight", "head.bias")
    expected = loop_gradients(model, x, y, ["head.weight", "head.bias"])
    _assert_close(actual, expected, torch.float64)
    assert all(not p.requires_grad for p in model.body.parameters())


def test_all_frozen_is_a_configuration_error(make_mlp):
    model = make_mlp()
    model.requires_grad_(False)

    with pytest.raises(ConfigurationError, match="requires_grad=False"):
        select_parameters(model)


def test_unknown_grad_wrt_lists_valid_names(make_mlp):
    model = make_mlp()

    with pytest.raises(ConfigurationError, match="'tail'") as error:
        select_parameters(model, ["head", "tail"])

    message = str(error.value)
    for name in ("body.0.weight", "body.0.bias", "head.weight", "head.bias"):
        assert name in message


def test_batchnorm_without_running_stats_is_refused(make_classification):
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)
    )
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(2 * 4 * 4, 3))
    layout = select_parameters(model)

    with pytest.raises(ModelModeError, match="track_running_stats=False"):
        PerExampleGradients(model, ClassificationTask(), layout)


def test_weights_are_one_minus_p_y(make_mlp, make_classification):
    model = make_mlp(dtype=torch.float64)
    x, y = make_classification(6, dtype=torch.float64)
    layout = select_parameters(model)

    _, weights = PerExampleGradients(model, ClassificationTask(), layout).compute(
        (x, y)
    )

    with torch.no_grad():
        p_y = torch.softmax(model(x), dim=1)[torch.arange(6), y]
    torch.testing.assert_close(weights, 1 - p_y, rtol=0, atol=1e-12)
