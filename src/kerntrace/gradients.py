"""Per-example gradients of a task's output with respect to chosen parameters.

The gradients come from ``torch.func`` (``functional_call``, ``grad`` and
``vmap``) with the model in eval mode, so each example's gradient is the one
a plain ``torch.autograd.grad`` loop over single examples would give,
whatever the batch it arrives in. Only the selected parameters are
differentiated; buffers are read, never written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .errors import BatchError, ConfigurationError, ModelModeError
from .outputs import Task

__all__ = [
    "ParameterLayout",
    "select_parameters",
    "PerExampleGradients",
    "prepare_batch",
    "batch_size",
    "eval_mode",
    "check_independent_examples",
]


@dataclass(frozen=True)
class ParameterLayout:
    """The selected parameters, in the order their gradients are flattened.

    Attributes:
        names: Parameter names as in ``model.named_parameters()``.
        shapes: The shape of each parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Total number of gradient coordinates p."""
        return sum(self.sizes)

    def fingerprint(self) -> str:
        """A short hash of names and shapes, recorded in the store."""
        text = ";".join(
            f"{n}:{list(s)}" for n, s in zip(self.names, self.shapes, strict=True)
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def select_parameters(
    model: nn.Module, grad_wrt: Sequence[str] | str | None = None
) -> ParameterLayout:
    """Choose the parameters whose gradients are attributed.

    Args:
        model: The network.
        grad_wrt: Parameter names, or module names standing for all their
            parameters (``"head"`` selects ``head.weight`` and ``head.bias``).
            ``None`` selects every parameter with ``requires_grad=True``.

    Returns:
        The layout of the selection, in ``named_parameters`` order.

    Raises:
        ConfigurationError: A name matches no parameter, or nothing is left
            to differentiate.
    """
    named = dict(model.named_parameters())
    if grad_wrt is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ConfigurationError(
                "every parameter of the model has requires_grad=False, so there "
                "is nothing to attribute through; unfreeze some parameters or "
                "name them with grad_wrt=[...]"
            )
    else:
        wanted = [grad_wrt] if isinstance(grad_wrt, str) else list(grad_wrt)
        chosen_set: set[str] = set()
        for name in wanted:
            hits = [n for n in named if n == name or n.startswith(name + ".")]
            if not hits:
                valid = ", ".join(named) or "(none)"
                raise ConfigurationError(
                    f"grad_wrt names {name!r}, which is no parameter or module "
                    f"of the model; valid parameter names: {valid}"
                )
            chosen_set.update(hits)
        chosen = [n for n in named if n in chosen_set]
    shapes = tuple(tuple(named[n].shape) for n in chosen)
    return ParameterLayout(tuple(chosen), shapes)


def check_independent_examples(model: nn.Module) -> None:
    """Refuse models whose eval-mode output for one example uses the others.

    Raises:
        ModelModeError: A BatchNorm normalizes with batch statistics.
    """
    for name, module in model.named_modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_norm and not module.track_running_stats:
            raise ModelModeError(
                f"module {name!r} is a BatchNorm with track_running_stats=False, "
                "which normalizes with the statistics of the batch even in eval "
                "mode, so one example's output depends on the others; use "
                "running statistics or another normalization (LayerNorm, "
                "GroupNorm)"
            )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block and restore each module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def batch_size(batch: Any) -> int:
    """The leading dimension shared by every tensor of a batch.

    Raises:
        BatchError: The batch holds no tensor, or tensors disagree on it.
    """
    sizes = {}
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    for key, value in items:
        if isinstance(value, Tensor):
            if value.dim() == 0:
                raise BatchError(
                    f"batch item {key!r} is a 0-d tensor; every item needs a "
                    "leading batch dimension"
                )
            sizes[key] = value.shape[0]
    if not sizes:
        raise BatchError(
            "the batch holds no tensor; pass a tuple, list or dict of tensors "
            "whose first dimension runs over examples"
        )
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k!r}: {v}" for k, v in sizes.items())
        raise BatchError(
            f"batch items disagree on the number of examples ({shown}); every "
            "tensor must have the same first dimension"
        )
    return next(iter(sizes.values()))


def prepare_batch(batch: Any, *, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch to ``device``; cast floating tensors to ``dtype``.

    Integer tensors (labels, token ids, masks) keep their dtype.
    """

    def move(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)

    if isinstance(batch, Mapping):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(move(v) for v in batch)
    raise BatchError(
        f"a batch must be a tuple, list or dict of tensors, got {type(batch).__name__}"
    )


def slice_batch(batch: Any, rows: Tensor | slice) -> Any:
    """Select rows of every tensor of a batch."""
    if isinstance(batch, Mapping):
        return {k: v[rows] if isinstance(v, Tensor) else v for k, v in batch.items()}
    return type(batch)(v[rows] if isinstance(v, Tensor) else v for v in batch)


class PerExampleGradients:
    """Computes per-example gradients and out-to-loss weights of a task.

    Args:
        model: The network; its parameters are read at each call, so loading
            a new checkpoint into it is enough.
        task: The task that defines the output.
        layout: Which parameters to differentiate.
    """

    def __init__(self, model: nn.Module, task: Task, layout: ParameterLayout):
        check_independent_examples(model)
        self.model = model
        self.task = task
        self.layout = layout
        first = next(iter(model.parameters()))
        self.device = first.device
        self.dtype = first.dtype

    def _split_parameters(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        selected = set(self.layout.names)
        chosen, fixed = {}, {}
        for name, param in self.model.named_parameters():
            (chosen if name in selected else fixed)[name] = param.detach()
        fixed.update({n: b.detach() for n, b in self.model.named_buffers()})
        return chosen, fixed

    def _call(self, params: dict[str, Tensor], fixed: dict[str, Tensor]):
        def run(*args: Any, **kwargs: Any) -> Tensor:
            return functional_call(self.model, {**params, **fixed}, args, kwargs)

        return run

    def compute(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Per-example gradients and out-to-loss weights of one batch.

        Args:
            batch: A tuple, list or dict of tensors with a shared first
                dimension B, already on the model's device and dtype.

        Returns:
            ``(gradients, weights)``: gradients of shape (B, p) in the model's
            floating dtype, flattened in layout order; weights of shape (B,).
        """
        chosen, fixed = self._split_parameters()

        def output_of_one(params: dict[str, Tensor], example: Any) -> Tensor:
            one = _unsqueeze(example)
            return self.task.output(self._call(params, fixed), one).reshape(())

        with eval_mode(self.model):
            grads = vmap(grad(output_of_one), in_dims=(None, 0))(chosen, batch)
            with torch.no_grad():
                weights = self.task.out_to_loss(self._call(chosen, fixed), batch)
        rows = batch_size(batch)
        flat = torch.cat([grads[n].reshape(rows, -1) for n in self.layout.names], 1)
        return flat, weights.reshape(rows)


def _unsqueeze(example: Any) -> Any:
    if isinstance(example, Mapping):
        return {
            k: v.unsqueeze(0) if isinstance(v, Tensor) else v
            for k, v in example.items()
        }
    return type(example)(
        v.unsqueeze(0) if isinstance(v, Tensor) else v for v in example
    )
