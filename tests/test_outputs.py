"""Tasks: the classification margin, its out-to-loss weight, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kerntrace.errors import BatchError, ConfigurationError
from kerntrace.gradients import PerExampleGradients, select_parameters
from kerntrace.outputs import (
    TASKS,
    ClassificationTask,
    RegressionTask,
    classification_margin,
    get_task,
)


def _logits(rows: int, classes: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(rows, classes, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_margin_is_log_odds_of_the_label(classes):
    logits = _logits(12, classes)
    labels = torch.arange(12) % classes

    margin = classification_margin(logits, labels)

    p = torch.softmax(logits, dim=1)[torch.arange(12), labels]
    torch.testing.assert_close(margin, torch.log(p / (1 - p)), rtol=1e-10, atol=1e-10)
    assert margin.shape == (12,) and margin.dtype == torch.float64


def test_margin_of_two_classes_is_the_logit_difference():
    logits = _logits(6, 2)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])

    margin = classification_margin(logits, labels)

    other = 1 - labels
    expected = logits[torch.arange(6), labels] - logits[torch.arange(6), other]
    torch.testing.assert_close(margin, expected, rtol=0, atol=1e-12)


def test_margin_is_finite_for_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 999.0]])
    labels = torch.tensor([0, 2])

    margin = classification_margin(logits, labels)

    torch.testing.assert_close(margin, torch.tensor([1000.0, -1.0]), rtol=0, atol=1e-4)


def test_out_to_loss_is_one_minus_p_y():
    logits = _logits(9, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    task = ClassificationTask()

    weights = task.out_to_loss(lambda x: x, (logits, labels))

    p = torch.softmax(logits, dim=1)[torch.arange(9), labels]
    torch.testing.assert_close(weights, 1 - p, rtol=1e-12, atol=1e-12)
    assert bool(((weights >= 0) & (weights <= 1)).all())


def test_out_to_loss_is_minus_the_loss_derivative():
    logits = _logits(5, 3)
    labels = torch.tensor([2, 0, 1, 1, 0])
    task = ClassificationTask()
    # Cross-entropy as a function of the margin f is log(1 + exp(-f)).
    margin = task.output(lambda x: x, (logits, labels)).requires_grad_(True)
    loss = torch.nn.functional.softplus(-margin).sum()
    (derivative,) = torch.autograd.grad(loss, margin)

    weights = task.out_to_loss(lambda x: x, (logits, labels))

    torch.testing.assert_close(weights, -derivative, rtol=1e-12, atol=1e-12)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(loss.detach(), ce, rtol=1e-12, atol=1e-12)


# -- N5: dtypes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 5e-2), (torch.float64, 1e-6)]
)
def test_n5_output_and_weight_in_other_dtypes_match_float32(dtype, tol):
    torch.manual_seed(0)
    reference = nn.Linear(6, 4)
    x = torch.randn(16, 6)
    y = torch.arange(16) % 4
    other = nn.Linear(6, 4).to(dtype)
    other.load_state_dict(reference.state_dict())
    task = ClassificationTask()

    with torch.no_grad():
        out32 = task.output(reference, (x, y))
        q32 = task.out_to_loss(reference, (x, y))
        out = task.output(other, (x.to(dtype), y))
        q = task.out_to_loss(other, (x.to(dtype), y))

    assert out.dtype == dtype and q.dtype == dtype
    assert out.shape == q.shape == (16,)
    scale = max(1.0, float(out32.abs().max()))
    torch.testing.assert_close(out.float(), out32, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(q.float(), q32, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_n5_per_example_gradients_run_in_other_dtypes(dtype):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    other.load_state_dict(reference.state_dict())
    x = torch.randn(8, 6)
    y = torch.arange(8) % 4
    task = ClassificationTask()

    grads32, q32 = PerExampleGradients(
        reference, task, select_parameters(reference)
    ).compute((x, y))
    grads, q = PerExampleGradients(other, task, select_parameters(other)).compute(
        (x.to(dtype), y)
    )

    assert grads.dtype == dtype and grads.shape == grads32.shape
    tol = 1e-1 if dtype == torch.bfloat16 else 1e-5
    scale = float(grads32.abs().max())
    torch.testing.assert_close(grads.float(), grads32, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(q.float(), q32, rtol=tol, atol=tol)


# -- regression ------------------------------------------------------------


@pytest.mark.parametrize("out_features", [None, 1])
def test_regression_output_and_residual(out_features):
    torch.manual_seed(0)
    linear = nn.Linear(3, 1)

    def model(x):
        prediction = linear(x)
        return prediction if out_features else prediction.squeeze(-1)

    x = torch.randn(7, 3)
    y = torch.randn(7)
    task = RegressionTask()

    with torch.no_grad():
        output = task.output(model, (x, y))
        residual = task.out_to_loss(model, (x, y))

    expected = linear(x).squeeze(-1).detach()
    assert output.shape == residual.shape == (7,)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(residual, y - expected)
    # y given as (B, 1) is the same.
    with torch.no_grad():
        column = task.out_to_loss(model, (x, y[:, None]))
    torch.testing.assert_close(column, residual)


def test_regression_with_several_outputs_is_refused():
    task = RegressionTask()

    with pytest.raises(BatchError, match=r"one prediction per example.*\(4, 2\)"):
        task.output(lambda x: x, (torch.zeros(4, 2), torch.zeros(4)))


@pytest.mark.parametrize("task", [ClassificationTask(), RegressionTask()])
def test_batch_must_be_inputs_and_labels(task):
    with pytest.raises(BatchError, match="expects a batch"):
        task.output(lambda x: x, (torch.zeros(2, 3),))
    with pytest.raises(BatchError, match="dict"):
        task.output(lambda x: x, {"x": torch.zeros(2, 3), "y": torch.zeros(2)})


# -- get_task --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_get_task_by_name(name):
    task = get_task(name)

    assert task.name == name
    expected = RegressionTask if name == "regression" else ClassificationTask
    assert isinstance(task, expected)


def test_get_task_returns_a_user_task_unchanged():
    class Custom:
        name = "custom"

        def output(self, model, batch):
            return model(batch[0]).sum(-1)

        def out_to_loss(self, model, batch):
            return torch.ones(batch[0].shape[0])

    custom = Custom()

    assert get_task(custom) is custom


def test_get_task_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ConfigurationError, match="unknown task 'segmentation'"
    ) as error:
        get_task("segmentation")

    for name in TASKS:
        assert name in str(error.value)


def test_get_task_object_without_the_methods_is_refused():
    class Incomplete:
        name = "incomplete"

        def output(self, model, batch):
            return model(batch[0])

    with pytest.raises(ConfigurationError, match="neither a task name"):
        get_task(Incomplete())
    with pytest.raises(ConfigurationError, match="neither a task name"):
        get_task(42)
