"""Factorized per-layer projection: features without p-dimensional gradients.

The per-example gradient of a linear layer's weight is a sum over positions
t of outer products, G = Σ_t g_t a_tᵀ, where a_t is the layer's input and
g_t the gradient of the output f with respect to the layer's output. With
a Kronecker-structured projection P = P_out ⊗ P_in the projected gradient is

    φ = vec(P_outᵀ G P_in) = Σ_t vec((P_outᵀ g_t)(P_inᵀ a_t)ᵀ),

so it needs only the inputs a and output gradients g, captured by hooks in
one batched forward and backward pass; G itself is never formed. Entries of
P_in and P_out have variance 1/k_in and 1/k_out, so E‖φ‖² = ‖G‖². A bias is
an extra input column of ones. ``nn.Linear``, ``nn.Conv2d`` (through its
input patches) and ``nn.Embedding`` (whose input is one-hot) are factorized;
any other selected parameter goes through per-example gradients and a dense
projection. A layer called several times adds up the contributions of
every call, as its gradient does.

One batched backward gives per-example output gradients because, in eval
mode, example b's output depends on example b alone: the gradient of Σ_b f_b
with respect to example b's activations is that of f_b.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .gradients import ParameterLayout, PerExampleGradients, batch_size, eval_mode
from .outputs import Task, check_per_example
from .projection import (
    DenseProjector,
    IdentityProjector,
    Projector,
    SparseProjector,
    block_seed,
)

__all__ = [
    "Capture",
    "CapturedGradients",
    "FactorizedProjector",
    "FactorLayer",
    "NormLayer",
    "agreement_tolerance",
    "capture",
    "factorizable",
    "factorized_share",
]

logger = logging.getLogger(__name__)

_FACTOR_SALT = 2
# The layers' Kronecker features total MIXING_FACTOR · k (each layer capped at
# its exact size), then a sparse JL projection mixes them down to k. A wide
# intermediate keeps each factor's distortion small, ~sqrt(2 / k_in) for
# the input side, while the mixing costs only a few operations per feature.
# 16 rather than 8: on the Fashion-MNIST MLP of benchmarks/quality.py (k =
# 2,048, one checkpoint) 8 left the LDS 0.025 below the dense projector's
# (0.388 against 0.411), 16 and 32 matched it (0.410, 0.415).
MIXING_FACTOR = 16
MIXING_NONZEROS = 2
_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def factorizable(module: nn.Module) -> bool:
    """Whether kerntrace can project this module's weight gradient factorized."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(module, nn.Embedding):
        return module.max_norm is None
    return False


@dataclass
class FactorLayer:
    """One factorized layer.

    Attributes:
        name: Module name in the model.
        module: The module.
        weight: Name of its weight parameter.
        bias: Name of its bias parameter, if selected.
        n_in: Input width (with the bias column), n_out: output width.
        k_in, k_out: Projected widths; the layer gets k_in · k_out features.
        offset: First feature of this layer.
        p_in, p_out: The factors P_in (n_in, k_in) and P_out (n_out, k_out),
            float32; ``None`` where a side is kept exact (the identity).
    """

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    n_in: int
    n_out: int
    k_in: int
    k_out: int
    offset: int = 0
    p_in: Tensor | None = None
    p_out: Tensor | None = None

    @property
    def width(self) -> int:
        """Number of features of this layer."""
        return self.k_in * self.k_out


@dataclass
class NormLayer:
    """A BatchNorm (eval) or LayerNorm whose affine gradients come from hooks.

    Per example, dγ = Σ g · x̂ and dβ = Σ g over the positions the affine
    parameters are shared across, where x̂ is the normalized input.

    Attributes:
        name: Module name.
        module: The module.
        weight, bias: Names of γ and β, where selected.
        channels: Entries of each of γ and β.
        offset: First feature of this layer in the factorized features.
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    channels: int
    offset: int = 0

    @property
    def width(self) -> int:
        """Number of selected parameters: γ and β entries."""
        return self.channels * ((self.weight is not None) + (self.bias is not None))


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def _find_norms(model: nn.Module, layout: ParameterLayout) -> list[NormLayer]:
    selected = set(layout.names)
    owners = _owners(model)
    norms = []
    for name, module in model.named_modules():
        if not isinstance(module, _NORM_TYPES) or not _own_forward(module):
            continue
        if isinstance(module, nn.LayerNorm) and not module.elementwise_affine:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (
            module.affine and module.track_running_stats
        ):
            continue
        prefix = f"{name}." if name else ""
        names = []
        for kind in ("weight", "bias"):
            param = getattr(module, kind, None)
            chosen = param is not None and prefix + kind in selected
            names.append(prefix + kind if chosen and owners[id(param)] == 1 else None)
        if names == [None, None]:
            continue
        channels = next(
            p for p in (module.weight, module.bias) if p is not None
        ).numel()
        norms.append(NormLayer(name, module, names[0], names[1], channels))
    return norms


_NORM_FORWARDS = (
    nn.modules.batchnorm._BatchNorm.forward,
    nn.SyncBatchNorm.forward,
    nn.LayerNorm.forward,
)


def _own_forward(module: nn.Module) -> bool:
    """Whether a norm computes torch's own output, so its hooks' γ, β are right.

    A subclass with a ``forward`` of its own (``super().forward(x) * 2``)
    leaves the affine step, and its parameters go through torch.func.
    """
    return type(module).forward in _NORM_FORWARDS and "forward" not in vars(module)


def _owners(model: nn.Module) -> dict[int, int]:
    """How many modules hold each parameter (tied weights are held twice)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def _norm_gradients(
    layer: NormLayer, inputs: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-example dγ and dβ, each (B, channels), of one call."""
    module = layer.module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # Channels on dimension 1, shared over the dimensions after it.
        view = [1, -1] + [1] * (inputs.dim() - 2)
        mean = module.running_mean.reshape(view)
        var = module.running_var.reshape(view)
        scale = torch.rsqrt(var + module.eps).reshape(1, -1)
        if inputs.dim() == 2:
            return grad_out * (inputs - mean) * scale, grad_out
        # Σ g (x - μ) as Σ g x - μ Σ g: no broadcast subtraction, the slowest
        # step on channels-last tensors. The cancellation costs about
        # log10(1 + |μ| / σ) digits, where σ is the spread of x; BatchNorm
        # inputs have |μ| of the order of σ. Sums run over positions in the
        # layout the tensors come in (channels-last as (B, T, C), no copy).
        x, g, axis = _positions_of_channels(inputs), _positions_of_channels(grad_out), 2
        if x.stride(1) == 1 and g.stride(1) == 1:
            x, g, axis = x.transpose(1, 2), g.transpose(1, 2), 1
        d_beta = g.sum(axis)
        d_gamma = ((g * x).sum(axis) - mean.reshape(1, -1) * d_beta) * scale
        return d_gamma, d_beta
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = inputs.mean(dim=dims, keepdim=True)
    var = inputs.var(dim=dims, unbiased=False, keepdim=True)
    normalized = (inputs - mean) / torch.sqrt(var + module.eps)
    shape = (inputs.shape[0], -1, layer.channels)
    d_gamma = (grad_out * normalized).reshape(shape).sum(1)
    d_beta = grad_out.reshape(shape).sum(1)
    return d_gamma, d_beta


def _positions_of_channels(t: Tensor) -> Tensor:
    """(B, C, ...) as (B, C, positions); a view for both memory formats."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]).transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _norm_block(layer: NormLayer, inputs: Tensor, grad_out: Tensor) -> Tensor:
    """The selected [dγ, dβ] of one call, (B, layer.width)."""
    d_gamma, d_beta = _norm_gradients(layer, inputs, grad_out)
    parts = [d_gamma] if layer.weight is not None else []
    if layer.bias is not None:
        parts.append(d_beta)
    return torch.cat(parts, dim=1)


def _widths(module: nn.Module, has_bias: bool) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features + has_bias, module.out_features
    if isinstance(module, nn.Conv2d):
        patch = module.in_channels * math.prod(module.kernel_size)
        return patch + has_bias, module.out_channels
    return module.num_embeddings, module.embedding_dim


def _split(n_in: int, n_out: int, target: float) -> tuple[int, int]:
    """k_in · k_out ≈ target with k_in / k_out ≈ n_in / n_out, within bounds."""
    if target >= n_in * n_out:
        return n_in, n_out
    k_in = max(1, min(n_in, round(math.sqrt(target * n_in / n_out))))
    k_out = max(1, min(n_out, round(target / k_in)))
    k_in = max(1, min(n_in, round(target / k_out)))
    return k_in, k_out


class FactorizedProjector:
    """Projects per-example gradients layer by layer from hooks' captures.

    Args:
        model: The network.
        layout: The selected parameters.
        proj_dim: k, the number of features. The layers share an
            intermediate width of ``MIXING_FACTOR`` · k in proportion to their
            parameter counts (a layer smaller than its share is kept exact),
            and a sparse projection mixes that down to k.
        seed: The projector seed.
        model_id: The checkpoint's id.
        exact: Use identity factors (k_in = n_in, k_out = n_out) and no
            mixing, so that the features are the exact per-example gradients
            (for tests); ``proj_dim`` is then the number of parameters.
    """

    kind = "factorized"

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        proj_dim: int,
        *,
        seed: int,
        model_id: int,
        exact: bool = False,
    ) -> None:
        self.seed, self.model_id, self.exact = seed, model_id, exact
        self.layers = self._find_layers(model, layout)
        self.norms = _find_norms(model, layout)
        covered = {
            n for la in [*self.layers, *self.norms] for n in (la.weight, la.bias) if n
        }
        rest = [n for n in layout.names if n not in covered]
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        self.rest = ParameterLayout(tuple(rest), tuple(shapes[n] for n in rest))
        total = max(1, layout.numel)
        budget = proj_dim * MIXING_FACTOR
        offset = 0
        for index, layer in enumerate(self.layers):
            size = layer.n_in * layer.n_out
            target = size if exact else budget * size / total
            layer.k_in, layer.k_out = _split(layer.n_in, layer.n_out, target)
            layer.offset = offset
            offset += layer.width
            layer.p_in, layer.p_out = self._factors(layer, index)
        for norm in self.norms:
            norm.offset = offset
            offset += norm.width
        self.rest_projector: Projector | None = None
        if self.rest.numel and exact:
            self.rest_projector = IdentityProjector(self.rest.numel)
        elif self.rest.numel:
            k_rest = max(
                1, min(self.rest.numel, round(budget * self.rest.numel / total))
            )
            self.rest_projector = DenseProjector(
                self.rest.numel, k_rest, seed=seed, model_id=model_id
            )
        if self.rest_projector is not None:
            offset += self.rest_projector.proj_dim
        self.intermediate_dim = offset
        self.mixer: SparseProjector | None = None
        if exact:
            self.proj_dim = offset
        else:
            self.proj_dim = proj_dim
            self.mixer = SparseProjector(
                offset,
                proj_dim,
                seed=seed,
                model_id=model_id,
                nonzeros=min(MIXING_NONZEROS, proj_dim),
            )
        self.grad_dim = layout.numel
        self._capture: Capture | None = None

    def mix(self, columns: Tensor, rest: Tensor | None = None) -> Tensor:
        """Map the layer features of a batch to its (B, proj_dim) features.

        Args:
            columns: (Σ widths of layers and norms, B): ``features``' output,
                one column per example.
            rest: (B, k_rest), the dense projection of the other
                parameters' gradients, if any.

        Returns:
            (B, proj_dim) in the dtype of ``columns``, the transpose of a
            contiguous (proj_dim, B) tensor.
        """
        if rest is not None:
            columns = torch.cat([columns, rest.T])
        if self.mixer is None:
            return columns.T
        return self.mixer.project_columns(columns)

    @staticmethod
    def _find_layers(model: nn.Module, layout: ParameterLayout) -> list[FactorLayer]:
        selected = set(layout.names)
        owners = _owners(model)
        layers = []
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            weight = prefix + "weight"
            if not isinstance(module, _LAYER_TYPES) or weight not in selected:
                continue
            if not factorizable(module) or owners[id(module.weight)] > 1:
                continue
            bias = prefix + "bias"
            has_bias = getattr(module, "bias", None) is not None and bias in selected
            n_in, n_out = _widths(module, has_bias)
            layers.append(
                FactorLayer(
                    name, module, weight, bias if has_bias else None, n_in, n_out, 0, 0
                )
            )
        return layers

    def _factors(
        self, layer: FactorLayer, index: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """P_in (n_in, k_in) and P_out (n_out, k_out); ``None`` when k = n.

        A side kept at full width is left exact (``None`` stands for the
        identity): a square Gaussian matrix would only distort it.
        """
        generator = torch.Generator().manual_seed(
            block_seed(self.seed, self.model_id, index, salt=_FACTOR_SALT)
        )

        def factor(n: int, k: int) -> Tensor | None:
            if k >= n:
                return None
            return torch.randn(n, k, generator=generator) / math.sqrt(k)

        return factor(layer.n_in, layer.k_in), factor(layer.n_out, layer.k_out)

    def describe(self, *, limit: int = 12) -> str:
        """One line naming each layer's k_in × k_out, at most ``limit`` of them.

        Past ``limit`` layers the rest are counted, so that the line stays
        short for models with hundreds of layers.
        """
        parts = [f"{la.name or '(root)'} {la.k_in}×{la.k_out}" for la in self.layers]
        parts += [f"{norm.name} exact ({norm.width})" for norm in self.norms]
        if len(parts) > limit:
            hidden = parts[limit:]
            parts = [*parts[:limit], f"{len(hidden)} more layers"]
        if self.rest_projector is not None:
            parts.append(f"{self.rest.numel} other parameters → dense k=")
            parts[-1] += str(self.rest_projector.proj_dim)
        if self.mixer is not None:
            parts.append(f"{self.intermediate_dim} features mixed to k={self.proj_dim}")
        return ", ".join(parts)

    def row_bytes(self, model: nn.Module, task: Task, batch: Any) -> int:
        """Bytes one example takes in ``features``, measured on ``batch``.

        Counts what the batched pass keeps per example: the tensors autograd
        saves for the backward, the recorded layer inputs and output
        gradients, a conv's input patches, and the layer features. A saved
        tensor counts its own elements, not its whole storage (a batch
        sliced or transposed from a larger tensor shares its storage), and the
        model's parameters and buffers, which do not grow with the rows, are
        left out. The batch should be small (two examples): it is run once
        more.
        """
        captured = [*self.layers, *self.norms]
        fixed = {
            t.untyped_storage().data_ptr()
            for t in [*model.parameters(), *model.buffers()]
        }
        saved: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in fixed:
                own = min(storage.nbytes(), tensor.numel() * tensor.element_size())
                key = storage.data_ptr()
                saved[key] = max(saved.get(key, 0), own)
            return tensor

        if self._capture is None or self._capture.model is not model:
            self._capture = Capture(model, task, captured)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                calls, outputs, _ = self._capture(batch)
        except RuntimeError:
            # A task that runs torch.func inside (LossTask) refuses the hooks;
            # count twice the recorded tensors for what autograd saves.
            saved.clear()
            calls, outputs, _ = self._capture(batch)
        rows = max(1, outputs.shape[0])
        recorded = sum(a.numel() + g.numel() for _, a, g in calls)
        total = sum(saved.values()) or 2 * recorded * outputs.element_size()
        for layer, inputs, grad_out in calls:
            total += (inputs.numel() + grad_out.numel()) * grad_out.element_size()
            if isinstance(layer.module, nn.Conv2d):
                positions = grad_out[0, 0].numel() * rows
                total += positions * layer.n_in * grad_out.element_size()
        width = sum(la.width for la in captured) * outputs.element_size() * rows
        return (total + width) // rows

    def features(
        self, model: nn.Module, task: Task, batch: Any
    ) -> tuple[Tensor, Tensor]:
        """Features of the factorized layers and out-to-loss weights.

        The features come one column per example, the layout the sparse
        mixing reads fastest: row ``layer.offset + o · k_in + i`` holds entry
        (o, i) of the layer's P_outᵀ G P_in.

        Args:
            model: The network with the checkpoint loaded.
            task: The task.
            batch: On the model's device and dtype, first dimension B.

        Returns:
            ``(columns, weights)``: (Σ k_in·k_out + norm parameters, B) in
            the model's dtype, and (B,). The dense part for other parameters
            is not included; ``mix`` adds it.
        """
        captured = [*self.layers, *self.norms]
        if self._capture is None or self._capture.model is not model:
            self._capture = Capture(model, task, captured)
        calls, outputs, weights = self._capture(batch)
        rows = outputs.shape[0]
        columns = outputs.new_empty(sum(la.width for la in captured), rows)
        written: set[int] = set()
        for layer, inputs, grad_out in calls:
            target = columns[layer.offset : layer.offset + layer.width]
            accumulate = id(layer) in written
            written.add(id(layer))
            if isinstance(layer, NormLayer):
                _put(target, _norm_block(layer, inputs, grad_out).T, accumulate)
                continue
            view = target.view(layer.k_out, layer.k_in, rows)
            _project_call(layer, inputs, grad_out, view, accumulate)
        for layer in captured:
            if id(layer) not in written:
                columns[layer.offset : layer.offset + layer.width].zero_()
        return columns, weights


def _put(target: Tensor, value: Tensor, accumulate: bool) -> None:
    target.add_(value) if accumulate else target.copy_(value)


def _project_call(
    layer: FactorLayer,
    inputs: Tensor,
    grad_out: Tensor,
    target: Tensor,
    accumulate: bool,
) -> None:
    """Write or add one call's P_outᵀ G P_in into ``target``, (k_out, k_in, B).

    The output gradients are projected first; the inputs are projected
    before the sum over positions, or the sum is taken over the exact inputs
    when P_in is the identity. A call with one position (a Linear layer on
    vectors) is an outer product per example, written in place.
    """
    dtype, device = grad_out.dtype, grad_out.device
    p_in = None if layer.p_in is None else layer.p_in.to(device, dtype)
    p_out = None if layer.p_out is None else layer.p_out.to(device, dtype)
    if p_in is None and _grouped_suits(layer.module, inputs):
        _grouped_conv_call(layer, inputs, grad_out, p_out, target, accumulate)
        return
    a, g = _positions(layer, inputs, grad_out)
    rows, positions = g.shape[0], g.shape[-1]
    u = g if p_out is None else _project_features(p_out, g)
    if isinstance(layer.module, nn.Embedding):
        v = _embedding_columns(layer, a, p_in, dtype)
        _put(target, torch.bmm(u, v).permute(1, 2, 0), accumulate)
        return
    columns = a.shape[1]
    if p_in is not None:
        v = _project_features(p_in[:columns], a)
        if layer.bias is not None:
            v = v + p_in[columns].unsqueeze(-1)
        a, columns = v, layer.k_in
    if positions == 1:
        left = u.reshape(rows, -1).T.contiguous()
        right = a.reshape(rows, -1).T.contiguous()
        block = target[:, :columns]
        if accumulate:
            block.addcmul_(left.unsqueeze(1), right.unsqueeze(0))
        else:
            torch.mul(left.unsqueeze(1), right.unsqueeze(0), out=block)
    else:
        # (B, n, T) @ (B, T, k_out) is the faster order for BLAS here.
        product = torch.bmm(a, u.transpose(1, 2))
        _put(target[:, :columns], product.permute(2, 1, 0), accumulate)
    if p_in is None and layer.bias is not None:
        _put(target[:, columns], u.sum(-1).T, accumulate)


# A conv whose input has this many channels gets its per-example weight
# gradients from one grouped convolution backward (oneDNN's weight-gradient
# kernel, the examples as groups) instead of patches and a batched GEMM: on
# this project's CPU 1.6-2.5x faster for 8-16 input channels (SmallCNN's
# second conv, 16 x 14 x 14 outputs), slower for 1 and for 64.
GROUPED_CHANNELS = range(4, 33)


def _grouped_suits(module: nn.Module, inputs: Tensor) -> bool:
    if not isinstance(module, nn.Conv2d) or inputs.device.type != "cpu":
        return False
    left, right, top, bottom = _conv_padding(module)
    return module.in_channels in GROUPED_CHANNELS and (left, top) == (right, bottom)


def _grouped_conv_call(
    layer: FactorLayer,
    inputs: Tensor,
    grad_out: Tensor,
    p_out: Tensor | None,
    target: Tensor,
    accumulate: bool,
) -> None:
    """``_project_call`` for a conv with exact inputs, by a grouped backward."""
    module = layer.module
    rows, channels, height, width = inputs.shape
    g = grad_out.reshape(rows, module.out_channels, -1)
    u = g if p_out is None else _project_features(p_out, g)
    k_out = u.shape[1]
    left, _, top, _ = _conv_padding(module)
    weights = torch.nn.grad.conv2d_weight(
        inputs.contiguous().view(1, rows * channels, height, width),
        (rows * k_out, channels, *module.kernel_size),
        u.contiguous().view(1, rows * k_out, *grad_out.shape[2:]),
        stride=module.stride,
        padding=(top, left),
        dilation=module.dilation,
        groups=rows,
    )
    columns = channels * math.prod(module.kernel_size)
    product = weights.view(rows, k_out, columns).permute(1, 2, 0)
    _put(target[:, :columns], product, accumulate)
    if layer.bias is not None:
        _put(target[:, columns], u.sum(-1).T, accumulate)


class Capture:
    """One batched forward and backward pass per batch, recording layer calls.

    On the CPU the outputs of ``nn.Conv2d`` layers are handed on in the
    channels-last memory format: the same values, but the BatchNorm, ReLU and
    pooling that follow run several times faster on it (the small CNN of
    ``benchmarks/speed.py`` spends about half its forward and backward time
    less). A batch on which the model's forward fails with such tensors (a
    ``view`` of a conv's output, say) but runs in the standard format is
    rerun in the standard format, which is kept from then on; so is a model
    whose outputs on the first batch differ between the two formats.

    Args:
        model: The network.
        task: The task.
        layers: The layers and norms whose calls are recorded.
    """

    def __init__(
        self, model: nn.Module, task: Task, layers: Sequence[FactorLayer | NormLayer]
    ) -> None:
        self.model, self.task, self.layers = model, task, layers
        first = next(iter(model.parameters()), None)
        on_cpu = first is None or first.device.type == "cpu"
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.channels_last = on_cpu and has_conv
        self._compared = False

    def __call__(
        self, batch: Any
    ) -> tuple[list[tuple[FactorLayer | NormLayer, Tensor, Tensor]], Tensor, Tensor]:
        """Run one batch; see ``capture`` for what comes back."""
        if not self.channels_last:
            return capture(self.model, self.task, batch, self.layers, False)
        try:
            result = capture(self.model, self.task, batch, self.layers, True)
        except Exception as error:  # noqa: BLE001 - rerun below, or raise its error
            standard = capture(self.model, self.task, batch, self.layers, False)
            self._standard(
                f"its forward failed on channels-last conv outputs ({error})"
            )
            return standard
        if not self._compared:
            self._compared = True
            with torch.no_grad(), eval_mode(self.model):
                expected = self.task.output(self.model, batch).reshape(-1)
            scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
            drift = float((result[1].to(expected.dtype) - expected).abs().max() / scale)
            if drift > agreement_tolerance(expected.dtype):
                self._standard(
                    f"its outputs change with channels-last tensors, by {drift:.1e} "
                    "of the largest"
                )
                return capture(self.model, self.task, batch, self.layers, False)
        return result

    def _standard(self, why: str) -> None:
        self.channels_last = False
        logger.info(
            "running the model in the standard memory format from now on: %s",
            why.splitlines()[0][:300],
        )


def agreement_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to the largest entry) hook and torch.func gradients
    may differ from rounding alone: 1e-4 for float32, 1e-9 for float64, and
    sixteen rounding units for float16 and bfloat16, whose gradients
    are summed in their own precision."""
    if dtype == torch.float64:
        return 1e-9
    return max(1e-4, 16 * torch.finfo(dtype).eps)


def capture(
    model: nn.Module,
    task: Task,
    batch: Any,
    layers: Sequence[FactorLayer | NormLayer],
    channels_last: bool = False,
) -> tuple[list[tuple[FactorLayer | NormLayer, Tensor, Tensor]], Tensor, Tensor]:
    """One batched forward and backward pass, recording each layer call.

    Args:
        model, task, batch: The network, task and batch.
        layers: The layers and norms whose calls are recorded.
        channels_last: Hand on the outputs of ``nn.Conv2d`` layers in the
            channels-last memory format (see ``Capture``).

    Returns:
        ``(calls, outputs, weights)``: for every call of a layer that the
        output depends on, the layer, its input and the gradient of Σ_b f_b
        with respect to its output; the outputs f (B,) and out-to-loss
        weights (B,), detached.
    """
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    records: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
    handles = [
        layer.module.register_forward_hook(_recorder(records[i]))
        for i, layer in enumerate(layers)
    ]
    norms = [m for m in model.modules() if _plain_batch_norm(m)]
    for module in norms:
        module.forward = _eval_batch_norm_forward(module)
    if channels_last:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        handles += [m.register_forward_pre_hook(_input_channels_last) for m in convs]
        handles += [
            m.register_forward_hook(_to_channels_last, prepend=True) for m in convs
        ]

    run = _ReusedForward(model, {**params, **buffers})
    try:
        with eval_mode(model), torch.enable_grad():
            outputs = task.output(run, batch)
            with torch.no_grad():
                weights = task.out_to_loss(run, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module in norms:
            del module.forward
    rows = batch_size(batch)
    check_per_example(outputs, rows, task, "output")
    check_per_example(weights, rows, task, "out_to_loss")
    outputs = outputs.reshape(rows)
    flat = [(layers[i], a, out) for i, items in enumerate(records) for a, out in items]
    grads = torch.autograd.grad(
        outputs.sum(), [out for _, _, out in flat], allow_unused=True
    )
    calls = [
        (layer, inputs, grad)
        for (layer, inputs, _), grad in zip(flat, grads, strict=True)
        if grad is not None
    ]
    return calls, outputs.detach(), weights.reshape(rows).detach()


class _ReusedForward:
    """Runs the model with given parameters; a repeated call reuses the output.

    ``task.out_to_loss`` usually runs the model on the very inputs that
    ``task.output`` just ran it on. A call whose arguments are all tensors,
    the same objects as the previous call's and unchanged since (same
    version counters), returns that call's output detached instead of
    running a second forward pass: in eval mode the model is a
    deterministic function of its inputs. The previous arguments are kept
    alive, so their identities cannot pass to new objects. An output other
    than a tensor, or one changed in place since, is never reused.
    """

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        self.model, self.tensors = model, tensors
        # (argument layout, arguments, their and the output's versions, output)
        self.last: tuple[tuple[Any, ...], list[Tensor], list[int], Tensor] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = [*args, *kwargs.values()]
        layout = (len(args), *kwargs)
        reusable = all(isinstance(v, Tensor) for v in inputs)
        if reusable and self.last is not None:
            names, previous, versions, output = self.last
            if (
                names == layout
                and len(previous) == len(inputs)
                and all(a is b for a, b in zip(previous, inputs, strict=True))
                and versions == [v._version for v in [*inputs, output]]
            ):
                return output.detach()
        output = functional_call(self.model, self.tensors, args, kwargs)
        self.last = None
        if reusable and isinstance(output, Tensor):
            versions = [v._version for v in [*inputs, output]]
            self.last = (layout, inputs, versions, output)
        return output


class CapturedGradients:
    """Exact per-example gradients from one batched pass with layer hooks.

    The weight gradients of ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``
    layers are formed from their captured inputs and output gradients
    (G = Σ_t g_t a_tᵀ per example), which costs one forward and backward
    pass plus the outer products; the other selected parameters go through
    ``PerExampleGradients`` (``torch.func``). Same interface and results as
    ``PerExampleGradients``, usually several times faster.

    Args:
        model: The network.
        task: The task.
        layout: The selected parameters.
    """

    def __init__(self, model: nn.Module, task: Task, layout: ParameterLayout):
        self.model, self.task, self.layout = model, task, layout
        self.layers = FactorizedProjector._find_layers(model, layout)
        for layer in self.layers:
            layer.k_in, layer.k_out = layer.n_in, layer.n_out
        self.norms = _find_norms(model, layout)
        offsets = dict(
            zip(layout.names, itertools.accumulate((0, *layout.sizes)), strict=False)
        )
        self.offsets = offsets
        self.sizes = dict(zip(layout.names, layout.sizes, strict=True))
        covered = {
            n for la in [*self.layers, *self.norms] for n in (la.weight, la.bias) if n
        }
        rest = [n for n in layout.names if n not in covered]
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        self.rest = ParameterLayout(tuple(rest), tuple(shapes[n] for n in rest))
        self.rest_gradients = (
            PerExampleGradients(model, task, self.rest) if rest else None
        )
        first = next(iter(model.parameters()))
        self.device, self.dtype = first.device, first.dtype
        self._capture = Capture(model, task, [*self.layers, *self.norms])

    def compute(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Per-example gradients (B, p) in layout order and weights (B,)."""
        captured = [*self.layers, *self.norms]
        calls, outputs, weights = self._capture(batch)
        rows = outputs.shape[0]
        grads = outputs.new_empty(rows, self.layout.numel)
        written: set[int] = set()
        for layer, inputs, grad_out in calls:
            accumulate = id(layer) in written
            if isinstance(layer, NormLayer):
                self._write_norm(grads, layer, inputs, grad_out, accumulate)
            else:
                self._write_layer(grads, layer, inputs, grad_out, accumulate)
            written.add(id(layer))
        for layer in captured:
            if id(layer) not in written:
                for name in (layer.weight, layer.bias):
                    if name:
                        self._columns(grads, name).zero_()
        if self.rest_gradients is not None:
            rest, _ = self.rest_gradients.compute(batch)
            start = 0
            for name, size in zip(self.rest.names, self.rest.sizes, strict=True):
                self._columns(grads, name).copy_(rest[:, start : start + size])
                start += size
        return grads, weights

    def _write_norm(
        self,
        grads: Tensor,
        layer: NormLayer,
        inputs: Tensor,
        grad_out: Tensor,
        accumulate: bool,
    ) -> None:
        d_gamma, d_beta = _norm_gradients(layer, inputs, grad_out)
        for name, value in ((layer.weight, d_gamma), (layer.bias, d_beta)):
            if name is not None:
                columns = self._columns(grads, name)
                columns.add_(value) if accumulate else columns.copy_(value)

    def _columns(self, grads: Tensor, name: str) -> Tensor:
        start = self.offsets[name]
        return grads[:, start : start + self.sizes[name]]

    def _write_layer(
        self,
        grads: Tensor,
        layer: FactorLayer,
        inputs: Tensor,
        grad_out: Tensor,
        accumulate: bool,
    ) -> None:
        rows = grads.shape[0]
        a, g = _positions(layer, inputs, grad_out)
        weight = self._columns(grads, layer.weight)
        if isinstance(layer.module, nn.Embedding):
            # Σ_t onehot(token_t) g_tᵀ: scatter the output gradients by token.
            part = grads.new_zeros(rows * layer.n_in, layer.n_out)
            tokens = a + layer.n_in * torch.arange(rows, device=a.device)[:, None]
            keep = torch.ones_like(a, dtype=torch.bool)
            if layer.module.padding_idx is not None:
                keep = a != layer.module.padding_idx
            part.index_add_(0, tokens[keep], g.transpose(1, 2)[keep])
            _put(weight, part.reshape(rows, -1), accumulate)
        else:
            view = weight.view(rows, layer.n_out, a.shape[1])
            if a.shape[-1] == 1:
                product = g * a.transpose(1, 2)
            else:
                product = torch.bmm(g, a.transpose(1, 2))
            _put(view, product, accumulate)
        if layer.bias is not None:
            _put(self._columns(grads, layer.bias), g.sum(dim=-1), accumulate)


_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plain_batch_norm(module: nn.Module) -> bool:
    """A torch BatchNorm with running statistics and its own ``forward``."""
    return (
        type(module) in _PLAIN_BATCH_NORMS
        and module.track_running_stats
        and module.running_mean is not None
        and "forward" not in vars(module)
    )


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode BatchNorm whose backward only scales the gradient.

    In eval mode the input gradient is the output gradient times γ / √(σ² + ε)
    per channel; torch's own BatchNorm backward takes 4-10x as long for it on
    the CPU (on channels-last tensors, with two threads, 4 ms of a SmallCNN
    batch's 13). The affine parameters' gradients are not given: the capture
    takes them from the norm's recorded input and output gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):  # noqa: ANN001, D102
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        ctx.save_for_backward(scale)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, D102
        (scale,) = ctx.saved_tensors
        shape = [1, -1] + [1] * (grad.dim() - 2)
        return grad * scale.reshape(shape), None, None, None, None, None


def _eval_batch_norm_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        return _EvalBatchNorm.apply(
            x,
            module.weight,
            module.bias,
            module.running_mean,
            module.running_var,
            module.eps,
        )

    return forward


def _input_channels_last(module: nn.Module, args: tuple[Any, ...]) -> Any:
    """A conv's input in channels-last; with one channel a view, not a copy.

    The conv's output then comes out channels-last directly, and oneDNN runs
    a one-channel conv faster on it.
    """
    if not args or not isinstance(args[0], Tensor) or args[0].dim() != 4:
        return None
    first = args[0]
    if first.is_contiguous(memory_format=torch.channels_last) and (
        first.shape[1] > 1 or first.stride(1) == 1
    ):
        return None
    if first.shape[1] == 1 and first.is_contiguous():
        height, width = first.shape[2:]
        view = first.as_strided(first.shape, (height * width, 1, width, 1))
    else:
        view = first.contiguous(memory_format=torch.channels_last)
    return (view, *args[1:])


def _to_channels_last(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, Tensor) and output.dim() == 4:
        return output.contiguous(memory_format=torch.channels_last)
    return output


def _recorder(store: list[tuple[Tensor, Tensor]]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if output.requires_grad:
            store.append((args[0].detach(), output))

    return hook


def _project_features(factor: Tensor, x: Tensor) -> Tensor:
    """factorᵀ x for x of shape (B, n, T): (B, k, T), one GEMM when possible."""
    if x.transpose(1, 2).is_contiguous():
        return torch.matmul(x.transpose(1, 2), factor).transpose(1, 2)
    return torch.matmul(factor.T, x)


def _positions(
    layer: FactorLayer, inputs: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor]:
    """Inputs (B, n, T) and output gradients (B, n_out, T) of one call.

    T runs over positions (pixels of a conv's output, tokens of a sequence);
    n is the input width without the bias column (a conv's patch size). An
    embedding's inputs are its token ids, (B, T).
    """
    module = layer.module
    rows = grad_out.shape[0]
    if isinstance(module, nn.Conv2d):
        return _patches(module, inputs), grad_out.reshape(rows, module.out_channels, -1)
    grad_out = grad_out.reshape(rows, -1, grad_out.shape[-1]).transpose(1, 2)
    if isinstance(module, nn.Linear):
        return inputs.reshape(rows, -1, inputs.shape[-1]).transpose(1, 2), grad_out
    return inputs.reshape(rows, -1), grad_out


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a conv's input."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        sides = []
        for size, dilation in zip(
            reversed(module.kernel_size), reversed(module.dilation), strict=True
        ):
            total = dilation * (size - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    height, width = module.padding
    return (width, width, height, height)


def _patches(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    """A conv's input patches, (B, C_in · kh · kw, T), as ``unfold`` gives them.

    Read through a strided view of the padded input and copied once, which
    is several times faster on the CPU than ``nn.functional.unfold``.
    """
    # The patches copy much faster from the standard (channels-first) layout.
    padded = nn.functional.pad(inputs.contiguous(), _conv_padding(module))
    rows, channels, height, width = padded.shape
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    b, c, h, w = padded.stride()
    windows = padded.as_strided(
        (rows, channels, kh, kw, out_h, out_w),
        (b, c, h * dh, w * dw, h * sh, w * sw),
    )
    return windows.reshape(rows, channels * kh * kw, out_h * out_w)


def _embedding_columns(
    layer: FactorLayer, tokens: Tensor, p_in: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """P_inᵀ a for one-hot inputs: the rows of P_in the tokens pick, (B, T, k_in).

    Padding tokens pick zeros; with P_in the identity the rows are one-hot.
    """
    if p_in is None:
        picked = nn.functional.one_hot(tokens, layer.n_in).to(dtype)
    else:
        picked = p_in[tokens]
    padding = layer.module.padding_idx
    if padding is not None:
        picked = picked * (tokens != padding).unsqueeze(-1).to(dtype)
    return picked


def factorized_share(model: nn.Module, layout: ParameterLayout) -> float:
    """Share of the selected parameters that the factorized path covers."""
    layers = [
        *FactorizedProjector._find_layers(model, layout),
        *_find_norms(model, layout),
    ]
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    covered = sum(sizes[n] for layer in layers for n in (layer.weight, layer.bias) if n)
    return covered / max(1, layout.numel)
