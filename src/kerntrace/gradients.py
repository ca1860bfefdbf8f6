"""Per-example gradients of a task's output with respect to chosen parameters.

The gradients come from ``torch.func`` (``functional_call``, ``grad`` and
``vmap``) with the model in eval mode, so each example's gradient is the one
a plain ``torch.autograd.grad`` loop over single examples would give,
whatever the batch it arrives in. Only the selected parameters are
differentiated; buffers are read, never written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .errors import BatchError, ConfigurationError, ModelModeError
from .outputs import Task, _one_example, check_per_example

__all__ = [
    "ParameterLayout",
    "select_parameters",
    "PerExampleGradients",
    "prepare_batch",
    "batch_size",
    "batch_items",
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
    if not named:
        raise ConfigurationError(
            f"the model ({type(model).__name__}) has no parameters, so there is "
            "nothing to attribute through"
        )
    if grad_wrt is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ConfigurationError(
                "every parameter of the model has requires_grad=False, so there "
                "is nothing to attribute through; unfreeze some parameters or "
                "name them with grad_wrt=[...]"
            )
    else:
        wanted = _grad_wrt_names(grad_wrt)
        chosen_set: set[str] = set()
        for name in wanted:
            hits = [n for n in named if n == name or n.startswith(name + ".")]
            if not hits:
                raise ConfigurationError(
                    f"grad_wrt names {name!r}, which is no parameter or module "
                    f"of the model; {_valid_names(model)}"
                )
            chosen_set.update(hits)
        chosen = [n for n in named if n in chosen_set]
    shapes = tuple(tuple(named[n].shape) for n in chosen)
    return ParameterLayout(tuple(chosen), shapes)


def _grad_wrt_names(grad_wrt: Any) -> list[str]:
    """``grad_wrt`` as a non-empty list of names, or a ConfigurationError."""
    if isinstance(grad_wrt, str):
        return [grad_wrt]
    if isinstance(grad_wrt, Mapping | Tensor) or not isinstance(grad_wrt, Iterable):
        raise ConfigurationError(
            f"grad_wrt must be None, a name or a list of names, got "
            f"{type(grad_wrt).__name__}; pass parameter or module names such as "
            "['head'] (see model.named_parameters())"
        )
    wanted = list(grad_wrt)
    if not wanted:
        raise ConfigurationError(
            "grad_wrt is empty, which selects no parameter; pass None to take "
            "every parameter with requires_grad=True, or name some"
        )
    bad = [w for w in wanted if not isinstance(w, str)]
    if bad:
        raise ConfigurationError(
            f"grad_wrt must hold names (strings), got {type(bad[0]).__name__} "
            f"{_short(bad[0])}; pass e.g. 'head' or 'head.weight', not the "
            "module or tensor itself"
        )
    return wanted


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _valid_names(model: nn.Module, limit: int = 30) -> str:
    """The names ``grad_wrt`` accepts, at most ``limit`` of each kind."""

    def listed(names: list[str]) -> str:
        shown = ", ".join(names[:limit]) or "(none)"
        more = len(names) - limit
        return shown + (f" and {more} more" if more > 0 else "")

    modules = [
        n for n, m in model.named_modules() if n and any(True for _ in m.parameters())
    ]
    params = [n for n, _ in model.named_parameters()]
    return (
        f"valid module names: {listed(modules)}; valid parameter names: "
        f"{listed(params)}"
    )


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


def batch_items(batch: Any) -> Iterator[tuple[str, Any]]:
    """``(label, value)`` of each batch item, labelled like ``batch[0]``.

    Raises:
        BatchError: The batch is not a tuple, list or dict.
    """
    if isinstance(batch, Mapping):
        return ((f"batch[{k!r}]", v) for k, v in batch.items())
    if isinstance(batch, tuple | list):
        return ((f"batch[{i}]", v) for i, v in enumerate(batch))
    shape = f" of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else ""
    raise BatchError(
        f"a batch must be a tuple, list or dict of tensors, got a "
        f"{type(batch).__name__}{shape}; pass e.g. batch=(x, y)"
    )


def batch_size(batch: Any) -> int:
    """The leading dimension shared by every tensor of a batch.

    Raises:
        BatchError: The batch is not a tuple, list or dict, holds no tensor,
            or its tensors disagree on the leading dimension (the message
            names each by position or key).
    """
    sizes = {}
    for label, value in batch_items(batch):
        if isinstance(value, Tensor):
            if value.dim() == 0:
                raise BatchError(
                    f"{label} is a 0-d tensor; every tensor of a batch needs a "
                    "leading dimension that runs over the examples"
                )
            sizes[label] = int(value.shape[0])
    if not sizes:
        raise BatchError(
            "the batch holds no tensor; pass a tuple, list or dict of tensors "
            "whose first dimension runs over examples"
        )
    if len(set(sizes.values())) > 1:
        first = next(iter(sizes))
        odd = [k for k, v in sizes.items() if v != sizes[first]]
        shown = ", ".join(f"{k} has {v}" for k, v in sizes.items())
        raise BatchError(
            f"batch items disagree on the number of examples ({shown}); "
            f"{odd[0]} does not match {first}: every tensor must have the same "
            "first dimension"
        )
    return next(iter(sizes.values()))


def prepare_batch(batch: Any, *, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch to ``device``; cast floating tensors to ``dtype``.

    Integer and boolean tensors (labels, token ids, masks) keep their dtype.

    Raises:
        BatchError: The batch is not a tuple, list or dict, holds a complex
            tensor, or a tensor cannot be moved to ``device``.
    """

    def move(label: str, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_complex():
            raise BatchError(
                f"{label} is a complex tensor ({value.dtype}); kerntrace "
                "attributes real-valued outputs: pass real tensors"
            )
        try:
            if value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)
        except (RuntimeError, TypeError) as error:
            raise BatchError(
                f"{label} ({value.dtype} on {value.device}) cannot be moved to "
                f"the model's device {device} and dtype {dtype} ({error}); put "
                "the model and the batch on devices this machine has"
            ) from error

    items = list(batch_items(batch))
    if isinstance(batch, Mapping):
        return {k: move(label, v) for (label, v), k in zip(items, batch, strict=True)}
    return type(batch)(move(label, v) for label, v in items)


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
            one = _one_example(example)
            value = self.task.output(self._call(params, fixed), one)
            check_per_example(value, 1, self.task, "output")
            return value.reshape(())

        with eval_mode(self.model):
            grads = vmap(grad(output_of_one), in_dims=(None, 0))(chosen, batch)
            with torch.no_grad():
                weights = self.task.out_to_loss(self._call(chosen, fixed), batch)
        rows = batch_size(batch)
        check_per_example(weights, rows, self.task, "out_to_loss")
        flat = torch.cat([grads[n].reshape(rows, -1) for n in self.layout.names], 1)
        return flat, weights.reshape(rows)
