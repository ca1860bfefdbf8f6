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

from .errors import BatchError, ConfigurationError

__all__ = [
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "get_task",
    "curvature",
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


class ClassificationTask:
    """Classification with cross-entropy: f is the margin, Q = 1 - p_y.

    The batch is ``(inputs, labels)``; the model maps inputs to logits of
    shape (B, C). Used for images and tabular data alike.
    """

    def __init__(self, name: str = "classification") -> None:
        self.name = name

    def output(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return the margin of the true class, shape (B,)."""
        x, y = _split_xy(batch, self.name)
        return classification_margin(model(x), y)

    def out_to_loss(self, model: Callable[..., Tensor], batch: Batch) -> Tensor:
        """Return 1 - p_y = sigmoid(-margin), shape (B,), values in [0, 1]."""
        return torch.sigmoid(-self.output(model, batch))

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
        return y.reshape(prediction.shape).to(prediction.dtype) - prediction

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray:
        """Return 1: half the squared error has constant curvature."""
        return np.ones_like(out_to_loss)


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
            ``output``, ``out_to_loss`` or ``name``.
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
    return task
