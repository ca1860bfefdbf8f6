"""From a batch of examples to their features: gradient, then projection.

A batch is cut into chunks of rows so that the per-example gradients of one
chunk, (rows, p) numbers, or the activations of the factorized projector's
batched pass, stay within a memory budget; peak memory then grows with the
chunk and k, never with the number of train examples.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigurationError, NonFiniteGradientError
from .factorized import (
    CapturedGradients,
    FactorizedProjector,
    agreement_tolerance,
    factorized_share,
)
from .files import format_bytes
from .gradients import (
    ParameterLayout,
    PerExampleGradients,
    batch_size,
    check_independent_examples,
    eval_mode,
    prepare_batch,
    slice_batch,
)
from .heap import reusing_freed_blocks
from .outputs import Task
from .projection import Projector

__all__ = ["Featurizer"]


def _gradient_engine(
    model: nn.Module, task: Task, layout: ParameterLayout
) -> PerExampleGradients | CapturedGradients:
    """Hooks for Linear/Conv2d/Embedding layers when there are any, else vmap."""
    if factorized_share(model, layout) > 0:
        return CapturedGradients(model, task, layout)
    return PerExampleGradients(model, task, layout)


logger = logging.getLogger(__name__)


class Featurizer:
    """Computes projected per-example gradients of one checkpoint.

    Args:
        model: The network, with the checkpoint loaded.
        task: What output is attributed.
        layout: The selected parameters.
        projector: Maps gradients to k features: a projector of gradient
            vectors, or a ``FactorizedProjector`` that works from per-layer
            captures (and projects any other parameters' gradients densely).
        memory_bytes: Budget for one chunk: its per-example gradients and,
            for a ``FactorizedProjector``, the batched pass's activations.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layout: ParameterLayout,
        projector: Projector | FactorizedProjector,
        *,
        memory_bytes: int = 256 << 20,
    ) -> None:
        check_independent_examples(model)
        self.model = model
        self.task = task
        self.layout = layout
        self.projector = projector
        first = next(iter(model.parameters()))
        self.device, self.dtype = first.device, first.dtype
        if isinstance(projector, FactorizedProjector):
            self.factorized: FactorizedProjector | None = projector
            self.dense: Projector | None = projector.rest_projector
            gradient_layout = projector.rest
        else:
            self.factorized, self.dense = None, projector
            gradient_layout = layout
        self.gradients = (
            _gradient_engine(model, task, gradient_layout)
            if gradient_layout.numel
            else None
        )
        self._verified = False
        itemsize = torch.finfo(self.dtype).bits // 8
        # vmap keeps about three gradient-sized buffers alive per row; the
        # factorized path keeps a few feature-sized ones, and its batched
        # pass the activations, measured on the first batch (``_measure``).
        width = getattr(projector, "intermediate_dim", projector.proj_dim)
        self.memory_bytes = memory_bytes
        self.row_bytes = (3 * gradient_layout.numel + 4 * width) * itemsize
        self.chunk_rows = max(1, int(memory_bytes // max(1, self.row_bytes)))
        self._measured = self.factorized is None
        self._cut_noted = False

    def _verify(self, part: Any) -> None:
        """Check the hooks' gradients against torch.func on two examples.

        Hooks see only calls of a layer's ``forward``; a model that also uses
        a layer's weight directly (``F.linear(x, self.fc.weight)``) would get
        wrong gradients from them, so such a model falls back to torch.func.
        """
        few = slice_batch(part, slice(0, 2))
        if self.factorized is not None:
            self._verify_factorized(few)
            return
        self._verified = True
        if not isinstance(self.gradients, CapturedGradients):
            return
        captured, _ = self.gradients.compute(few)
        exact, _ = PerExampleGradients(
            self.model, self.task, self.gradients.layout
        ).compute(few)
        if not _agree(captured, exact):
            warnings.warn(
                "per-layer hooks disagree with torch.func on this model (a "
                "layer's weight is used outside its forward?); using torch.func "
                "gradients, which are slower",
                RuntimeWarning,
                stacklevel=4,
            )
            self.gradients = PerExampleGradients(
                self.model, self.task, self.gradients.layout
            )

    def _verify_factorized(self, few: Any) -> None:
        """Refuse a model whose gradients the factorized projector cannot see.

        Raises:
            ConfigurationError: The hooks' exact gradients of two examples
                differ from plain autograd's; no features were computed.
        """
        try:
            captured, _ = CapturedGradients(self.model, self.task, self.layout).compute(
                few
            )
        except Exception:  # noqa: BLE001 - the batch itself raises, naming its shapes
            return
        exact = _row_gradients(self.model, self.task, self.layout, few)
        self._verified = True
        if not _agree(captured, exact):
            raise ConfigurationError(
                "the factorized projector cannot see this model's gradients: its "
                "per-layer hooks disagree with plain autograd (is a layer's weight "
                "used outside that layer's forward, e.g. F.linear(x, "
                "self.fc.weight)?); no features were computed. Create the TRAKer "
                "with projector='sparse' or 'dense' and a new save_dir (this one "
                "records projector='factorized')"
            )

    def _measure(self, batch: Any) -> None:
        """Fit ``chunk_rows`` to the factorized pass's measured bytes per row."""
        few = slice_batch(batch, slice(0, 2))
        try:
            activations = self.factorized.row_bytes(self.model, self.task, few)
        except Exception:  # noqa: BLE001 - the batch itself raises, naming its shapes
            return
        self._measured = True
        self.row_bytes += activations
        self.chunk_rows = max(1, int(self.memory_bytes // max(1, self.row_bytes)))

    def _note_cut(self, rows: int) -> None:
        """Log, once, that a batch is cut into chunks."""
        if self._cut_noted or rows <= self.chunk_rows:
            return
        self._cut_noted = True
        logger.info(
            "featurizing in chunks of %d rows (a batch of %d is cut): a row "
            "takes about %s, the memory budget is %s (memory_bytes)",
            self.chunk_rows,
            rows,
            format_bytes(self.row_bytes),
            format_bytes(self.memory_bytes),
        )

    def _chunk(self, part: Any) -> tuple[Tensor, Tensor]:
        if not self._verified:
            self._verify(part)
        rest, weights = None, None
        if self.gradients is not None and self.dense is not None:
            grads, weights = self.gradients.compute(part)
            rest = self.dense.project(grads)
        if self.factorized is None:
            return rest, weights
        columns, weights = self.factorized.features(self.model, self.task, part)
        return self.factorized.mix(columns, rest), weights

    def __call__(
        self, batch: Any, rows: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Features and out-to-loss weights of a batch.

        Args:
            batch: Tuple, list or dict of tensors with first dimension B.
            rows: The examples' indices, used to name one whose gradient is
                not finite.

        Returns:
            ``(features, weights)``: shapes (B, k) and (B,) on the CPU;
            features float64 for a float64 model, else float32; weights
            float32.

        Raises:
            NonFiniteGradientError: Some example's gradient or weight is NaN
                or infinite; the message names it.
        """
        if self.device.type != "cpu":
            return self._features(batch, rows)
        with reusing_freed_blocks():
            return self._features(batch, rows)

    def _features(
        self, batch: Any, rows: Sequence[int] | None
    ) -> tuple[Tensor, Tensor]:
        batch = prepare_batch(batch, device=self.device, dtype=self.dtype)
        total = batch_size(batch)
        if not self._measured:
            self._measure(batch)
        self._note_cut(total)
        features, weights = [], []
        for start in range(0, total, self.chunk_rows):
            part = slice_batch(batch, slice(start, start + self.chunk_rows))
            projected, weight = self._chunk(part)
            bad = _first_non_finite(projected, weight)
            if bad is not None:
                bad += start
                name = rows[bad] if rows is not None else bad
                raise NonFiniteGradientError(
                    f"the gradient or out-to-loss weight of example {name} is "
                    "NaN or infinite; check that example's input and the model "
                    "(e.g. a division by a zero feature); nothing of this batch "
                    "was written"
                )
            wide = projected.dtype == torch.float64
            features.append(
                projected.to(torch.float64 if wide else torch.float32).cpu()
            )
            weights.append(weight.float().cpu())
        if len(features) == 1:
            return features[0], weights[0]
        return torch.cat(features), torch.cat(weights)


def _row_gradients(
    model: nn.Module, task: Task, layout: ParameterLayout, batch: Any
) -> Tensor:
    """Per-example gradients (B, p): one backward pass per output of one forward.

    Slow, but it needs neither hooks nor torch.func (whose first call in a
    process costs about a second), and it runs the model on the batch as it
    is, so a forward that needs more than one row still runs: the reference
    for a check on two rows. Exact when the examples do not interact (eval
    mode, which ``check_independent_examples`` and ``eval_mode`` ensure).
    """
    chosen = set(layout.names)
    params = {
        n: p.detach().requires_grad_(n in chosen) for n, p in model.named_parameters()
    }
    tensors = {**params, **{n: b.detach() for n, b in model.named_buffers()}}

    def run(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, tensors, args, kwargs)

    wanted = [params[n] for n in layout.names]
    rows = []
    with eval_mode(model), torch.enable_grad():
        outputs = task.output(run, batch).reshape(-1)
        for index in range(outputs.shape[0]):
            grads = torch.autograd.grad(
                outputs[index], wanted, retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, wanted, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def _agree(captured: Tensor, exact: Tensor) -> bool:
    """Whether two computations of per-example gradients agree to rounding."""
    scale = exact.abs().max().clamp_min(torch.finfo(exact.dtype).tiny)
    tolerance = agreement_tolerance(exact.dtype)
    return float((captured - exact).abs().max() / scale) <= tolerance


def _first_non_finite(features: Tensor, weights: Tensor) -> int | None:
    """The first row whose features or weight hold a NaN or an infinity.

    A row's sum is finite when all its entries are, so the rows are summed
    first and only a batch with a non-finite sum is searched entry by entry
    (a sum can also overflow with finite entries: that batch is searched
    and passes).
    """
    if bool(torch.isfinite(features.sum(dim=1) + weights).all()):
        return None
    finite = torch.isfinite(features).all(dim=1) & torch.isfinite(weights)
    rows = torch.nonzero(~finite)
    return int(rows[0, 0]) if rows.numel() else None
