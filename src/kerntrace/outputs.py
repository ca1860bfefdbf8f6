"""Tasks: what scalar of the model is attributed, and how it weighs the loss.

A task turns a batch into one scalar output per example, f(z; θ), and gives
the out-to-loss weight Q(z) = -∂L/∂f that TRAK multiplies into the scores.
From Q it also gives the curvature R(z) = ∂²L/∂f², the weight of each train
example in the kernel ΦᵀRΦ (the Gauss–Newton Hessian of the loss in the
features). A user task is any object with ``name``, ``output`` and
``out_to_loss``; ``curvature`` is optional and defaults to R = 1.

``model`` below is always a callable that runs the network on the model
inputs, so a task never sees parameters and works unchanged under
``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap

from .errors import BatchError, ConfigurationError

__all__ = [
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "LossTask",
    "get_task",
    "curvature",
    "check_per_example",
    "TASKS",
]

Batch = Sequence[Any] | Mapping[str, Any]


@runtime_checkable
class Task(Protocol):
    """What a task provides.

    Attributes:
        name: A short name, recorded in the save directory.
    """

    name: str

    def output(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the attributed output, one scalar per example, shape (B,)."""
        ...

    def out_to_loss(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the out-to-loss weight -∂L/∂f, one per example, shape (B,)."""
        ...


def curvature(task: Task, out_to_loss: np.ndarray) -> np.ndarray:
    """The curvature R = ∂²L/∂f² of each example, from its out-to-loss weight.

    A task that defines ``curvature(out_to_loss)`` gives it; any other task
    gets R = 1, which makes the kernel the plain ΦᵀΦ.

    Args:
        task: The task the store was featurized with.
        out_to_loss: Q of each example, shape (n,).

    Returns:
        Shape (n,), float64, each value ≥ 0.

    Raises:
        ConfigurationError: The task's curvature has the wrong shape or a
            negative or non-finite value.
    """
    q = np.asarray(out_to_loss, dtype=np.float64)
    method = getattr(task, "curvature", None)
    if method is None:
        return np.ones_like(q)
    weights = np.asarray(method(q), dtype=np.float64)
    if weights.shape != q.shape:
        problem = f"got shape {weights.shape}"
    elif not np.all(np.isfinite(weights)):
        problem = f"got {int(np.sum(~np.isfinite(weights)))} non-finite values"
    elif np.any(weights < 0):
        problem = f"got a negative value, {weights.min():g}"
    else:
        return weights
    raise ConfigurationError(
        f"task {task.name!r}: curvature(out_to_loss) must return {q.shape[0]} "
        f"finite values ≥ 0, {problem}; fix the task's curvature method or "
        "remove it (R = 1)"
    )


def _split_xy(batch: Batch, task: str) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping) or len(batch) != 2:
        kind = type(batch).__name__
        raise BatchError(
            f"task {task!r} expects a batch (inputs, labels) of two tensors, "
            f"got a {kind} of {len(batch)} items; pass batch=(x, y)"
        )
    return batch[0], batch[1]


def classification_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Margin log(p_y / (1 - p_y)) = logit_y - logsumexp over the other logits.

    Args:
        logits: Shape (B, C), any floating dtype.
        labels: Shape (B,), integer class indices.

    Returns:
        Shape (B,), the dtype of ``logits``.
    """
    classes = torch.arange(logits.shape[-1], device=logits.device)
    is_label = classes == labels.unsqueeze(-1)
    label_logit = (logits * is_label).sum(-1)
    others = logits.masked_fill(is_label, float("-inf"))
    return label_logit - torch.logsumexp(others, dim=-1)


def _check_labels(logits: Tensor, labels: Tensor, task: str) -> None:
    """Refuse labels that are not one class index per row of logits."""
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise BatchError(
            f"task {task!r} needs logits of shape (B, C) with C ≥ 2 classes, but "
            f"the model returned shape {tuple(logits.shape)}; for one output per "
            "example use the 'regression' task or a task of your own"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BatchError(
            f"task {task!r} needs integer class labels, got batch[1] of dtype "
            f"{labels.dtype}; pass the labels as y.long()"
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise BatchError(
            f"task {task!r}: labels of shape {tuple(labels.shape)} do not fit "
            f"logits of shape {tuple(logits.shape)}; pass one class index per "
            "example, shape (B,)"
        )


class ClassificationTask:
    """Classification with cross-entropy: f is the margin, Q = 1 - p_y.

    The batch is ``(inputs, labels)``; the model maps inputs to logits of
    shape (B, C) and the labels are integer class indices of shape (B,).
    Used for images and tabular data alike.
    """

    def __init__(self, name: str = "classification") -> None:
        self.name = name

    def output(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the margin of the true class, shape (B,).

        Raises:
            BatchError: The labels are not integers of shape (B,), or the
                logits are not (B, C) with C ≥ 2.
        """
        x, y = _split_xy(batch, self.name)
        logits = model(x)
        _check_labels(logits, y, self.name)
        return classification_margin(logits, y)

    def out_to_loss(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return 1 - p_y = sigmoid(-margin), shape (B,), values in [0, 1].

        Raises:
            BatchError: As ``output``, or a label lies outside 0..C-1.
        """
        x, y = _split_xy(batch, self.name)
        logits = model(x)
        _check_labels(logits, y, self.name)
        classes = logits.shape[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise BatchError(
                f"task {self.name!r}: labels must lie in 0..{classes - 1} for "
                f"logits with {classes} classes, got values from {int(y.min())} "
                f"to {int(y.max())}; check the labels or the model's output width"
            )
        return torch.sigmoid(-classification_margin(logits, y))

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray:
        """Return p_y(1 - p_y) = Q(1 - Q), the logistic loss's second
        derivative in the margin."""
        return out_to_loss * (1.0 - out_to_loss)


class RegressionTask:
    """Squared-error regression: f is the prediction, Q = y - f.

    The batch is ``(inputs, targets)``; the model returns shape (B,) or (B, 1).
    """

    name = "regression"

    def _prediction(self, model: Callable[..., Tensor], x: Tensor) -> Tensor:
        prediction = model(x)
        if prediction.dim() == 2 and prediction.shape[-1] == 1:
            prediction = prediction.squeeze(-1)
        if prediction.dim() != 1:
            raise BatchError(
                f"task 'regression' needs one prediction per example, got "
                f"shape {tuple(prediction.shape)}; make the model return (B,)"
            )
        return prediction

    def output(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the prediction, shape (B,)."""
        x, _ = _split_xy(batch, self.name)
        return self._prediction(model, x)

    def out_to_loss(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the residual y - f, shape (B,)."""
        x, y = _split_xy(batch, self.name)
        prediction = self._prediction(model, x)
        if y.numel() != prediction.numel():
            raise BatchError(
                f"task 'regression' needs one target per example, got batch[1] "
                f"of shape {tuple(y.shape)} for {prediction.numel()} predictions; "
                "pass targets of shape (B,)"
            )
        return y.reshape(prediction.shape).to(prediction.dtype) - prediction

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray:
        """Return 1: half the squared error has constant curvature."""
        return np.ones_like(out_to_loss)


def _one_example(example: Any) -> Any:
    """Give every tensor of one vmapped example back its batch dimension."""
    if isinstance(example, Mapping):
        return {
            k: v.unsqueeze(0) if isinstance(v, Tensor) else v
            for k, v in example.items()
        }
    return type(example)(
        v.unsqueeze(0) if isinstance(v, Tensor) else v for v in example
    )


def _values(batch: Batch) -> list[Any]:
    return list(batch.values() if isinstance(batch, Mapping) else batch)


def _example_dims(batch: Batch) -> Any:
    """``vmap`` in_dims mapping each tensor of a batch over its first dimension."""
    if isinstance(batch, Mapping):
        return {k: 0 if isinstance(v, Tensor) else None for k, v in batch.items()}
    return type(batch)(0 if isinstance(v, Tensor) else None for v in batch)


class LossTask:
    """A task made of an output and the training loss written in terms of it.

    The out-to-loss weight is Q(z_i) = -∂ℓ/∂f evaluated on example i alone
    (by ``torch.func``), so it is the same whether ``loss`` averages or sums
    over the batch, and it does not depend on the batch an example comes in.

    Args:
        output: ``output(model, batch)`` returning f, shape (B,).
        loss: ``loss(outputs, batch)`` returning the scalar loss of a batch
            given its outputs f of shape (B,); any reduction (mean or sum).
        name: Recorded in the save directory.

    Example:
        ``LossTask(lambda model, b: model(b[0]).squeeze(-1),
        lambda f, b: F.mse_loss(f, b[1]), name="mse")``
    """

    def __init__(
        self,
        output: Callable[[Callable[..., Tensor], Batch], Tensor],
        loss: Callable[[Tensor, Batch], Tensor],
        *,
        name: str = "loss",
    ) -> None:
        for label, value in (("output", output), ("loss", loss)):
            if not callable(value):
                raise ConfigurationError(
                    f"LossTask {label} must be a function, got {type(value).__name__}"
                )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"LossTask name must be a non-empty string, got {name!r}"
            )
        self._output, self._loss, self.name = output, loss, name

    def output(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the user's output f, shape (B,)."""
        return self._output(model, batch)

    def out_to_loss(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return -∂ℓ/∂f of each example's own loss, shape (B,)."""
        with torch.no_grad():
            outputs = self._output(model, batch).detach()
        rows = next(
            v.shape[0] for v in _values(batch) if isinstance(v, Tensor) and v.dim()
        )
        check_per_example(outputs, rows, self)
        outputs = outputs.reshape(rows)

        def loss_of_one(value: Tensor, example: Any) -> Tensor:
            total = self._loss(value.reshape(1), _one_example(example))
            if total.numel() != 1:
                raise ConfigurationError(
                    f"task {self.name!r}: loss(outputs, batch) must return a "
                    f"scalar, got shape {tuple(total.shape)}; reduce it with a "
                    "mean or a sum"
                )
            return total.reshape(())

        derivative = vmap(grad(loss_of_one), in_dims=(0, _example_dims(batch)))
        return -derivative(outputs, batch)


def check_per_example(
    value: Any, rows: int, task: Task, method: str = "output"
) -> None:
    """Refuse a task result that is not one number per example.

    Args:
        value: What ``task.<method>`` returned for a batch of ``rows``.
        rows: B, the number of examples.
        task: The task, named in the message.
        method: ``"output"`` or ``"out_to_loss"``.

    Raises:
        ConfigurationError: ``value`` is no tensor, or not of shape (B,) or
            (B, 1).
    """
    name = getattr(task, "name", type(task).__name__)
    if not isinstance(value, Tensor):
        raise ConfigurationError(
            f"task {name!r}: {method}(model, batch) must return a tensor of "
            f"shape ({rows},), got {type(value).__name__}"
        )
    if (
        value.numel() != rows
        or value.dim() > 2
        or (value.dim() == 2 and value.shape[1] != 1)
    ):
        raise ConfigurationError(
            f"task {name!r}: {method}(model, batch) must return one value per "
            f"example, shape ({rows},), got shape {tuple(value.shape)}; reduce "
            "the model's output to one scalar per example"
        )
    if not value.is_floating_point():
        raise ConfigurationError(
            f"task {name!r}: {method}(model, batch) must return floating values, "
            f"got dtype {value.dtype}"
        )


TASKS: dict[str, Callable[[], Task]] = {
    "image_classification": lambda: ClassificationTask("image_classification"),
    "tabular_classification": lambda: ClassificationTask("tabular_classification"),
    "classification": lambda: ClassificationTask("classification"),
    "regression": RegressionTask,
}


def get_task(task: str | Task) -> Task:
    """Return a task object from a name in ``TASKS`` or a user task.

    Raises:
        ConfigurationError: The name is unknown, or the object lacks
            ``output``, ``out_to_loss`` or a non-empty string ``name``.
    """
    if isinstance(task, str):
        if task not in TASKS:
            known = ", ".join(sorted(TASKS))
            raise ConfigurationError(
                f"unknown task {task!r}; use one of {known}, or pass an object "
                "with name, output(model, batch) and out_to_loss(model, batch)"
            )
        return TASKS[task]()
    if not isinstance(task, Task):
        raise ConfigurationError(
            f"task {task!r} is neither a task name nor an object with "
            "name, output(model, batch) and out_to_loss(model, batch)"
        )
    if not isinstance(task.name, str) or not task.name:
        raise ConfigurationError(
            f"the task's name must be a non-empty string (it is recorded in the "
            f"save directory), got {task.name!r}"
        )
    if not (callable(task.output) and callable(task.out_to_loss)):
        raise ConfigurationError(
            f"task {task.name!r}: output and out_to_loss must be methods "
            "(model, batch) -> tensor of shape (B,)"
        )
    return task
