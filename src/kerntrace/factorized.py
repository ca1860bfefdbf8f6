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

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .gradients import ParameterLayout, eval_mode
from .outputs import Task
from .projection import DenseProjector, block_seed

__all__ = ["FactorizedProjector", "FactorLayer", "factorizable", "factorized_share"]

logger = logging.getLogger(__name__)

_FACTOR_SALT = 2
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
        proj_dim: The total number of features wanted; the layers share it in
            proportion to their parameter counts, and the actual total
            ``proj_dim`` attribute may differ from it by rounding.
        seed: The projector seed.
        model_id: The checkpoint's id.
        exact: Use identity factors (k_in = n_in, k_out = n_out), so that the
            features are the exact per-example gradients (for tests).
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
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias)}
        rest = [n for n in layout.names if n not in covered]
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        self.rest = ParameterLayout(tuple(rest), tuple(shapes[n] for n in rest))
        total = max(1, layout.numel)
        offset = 0
        for index, layer in enumerate(self.layers):
            size = layer.n_in * layer.n_out
            target = size if exact else proj_dim * size / total
            layer.k_in, layer.k_out = _split(layer.n_in, layer.n_out, target)
            layer.offset = offset
            offset += layer.width
            layer.p_in, layer.p_out = self._factors(layer, index)
        self.rest_projector: DenseProjector | None = None
        if self.rest.numel:
            k_rest = (
                self.rest.numel
                if exact
                else max(1, round(proj_dim * self.rest.numel / total))
            )
            self.rest_projector = DenseProjector(
                self.rest.numel, k_rest, seed=seed, model_id=model_id
            )
            offset += k_rest
        self.proj_dim = offset
        self.grad_dim = layout.numel

    @staticmethod
    def _find_layers(model: nn.Module, layout: ParameterLayout) -> list[FactorLayer]:
        selected = set(layout.names)
        owners: dict[int, int] = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owners[id(param)] = owners.get(id(param), 0) + 1
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

    def _factors(self, layer: FactorLayer, index: int) -> tuple[Tensor, Tensor]:
        if self.exact:
            return torch.eye(layer.n_in), torch.eye(layer.n_out)
        generator = torch.Generator().manual_seed(
            block_seed(self.seed, self.model_id, index, salt=_FACTOR_SALT)
        )
        p_in = torch.randn(layer.n_in, layer.k_in, generator=generator)
        p_out = torch.randn(layer.n_out, layer.k_out, generator=generator)
        return p_in / math.sqrt(layer.k_in), p_out / math.sqrt(layer.k_out)

    def describe(self) -> str:
        """One line naming each layer's k_in × k_out."""
        parts = [f"{la.name or '(root)'} {la.k_in}×{la.k_out}" for la in self.layers]
        if self.rest_projector is not None:
            parts.append(f"{self.rest.numel} other parameters → dense k=")
            parts[-1] += str(self.rest_projector.proj_dim)
        return ", ".join(parts)

    def features(
        self, model: nn.Module, task: Task, batch: Any
    ) -> tuple[Tensor, Tensor]:
        """Features of the factorized layers and out-to-loss weights.

        Args:
            model: The network with the checkpoint loaded.
            task: The task.
            batch: On the model's device and dtype, first dimension B.

        Returns:
            ``(features, weights)``: (B, Σ k_in·k_out) in the model's dtype,
            and (B,). The dense part for other parameters is not included.
        """
        params = {
            n: p.detach().requires_grad_(True) for n, p in model.named_parameters()
        }
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        captures: dict[int, list[tuple[Tensor, Tensor]]] = {
            i: [] for i in range(len(self.layers))
        }
        handles = [
            layer.module.register_forward_hook(_recorder(captures[i]))
            for i, layer in enumerate(self.layers)
        ]

        def run(*args: Any, **kwargs: Any) -> Tensor:
            return functional_call(model, {**params, **buffers}, args, kwargs)

        try:
            with eval_mode(model), torch.enable_grad():
                outputs = task.output(run, batch)
                with torch.no_grad():
                    weights = task.out_to_loss(run, batch)
        finally:
            for handle in handles:
                handle.remove()
        calls = [(i, a, out) for i, items in captures.items() for a, out in items]
        grads = torch.autograd.grad(
            outputs.sum(), [out for _, _, out in calls], allow_unused=True
        )
        rows = outputs.shape[0]
        dtype = outputs.dtype
        result = outputs.new_zeros(rows, sum(la.width for la in self.layers))
        for (index, inputs, _), grad_out in zip(calls, grads, strict=True):
            if grad_out is None:
                continue
            layer = self.layers[index]
            a, g = _positions(layer, inputs, grad_out)
            projected_out = g @ layer.p_out.to(g.device, dtype)
            if isinstance(layer.module, nn.Embedding):
                projected_in = _embedding_rows(layer, inputs, dtype)
            else:
                projected_in = a @ layer.p_in.to(a.device, dtype)
            block = torch.einsum("bto,bti->boi", projected_out, projected_in)
            stop = layer.offset + layer.width
            result[:, layer.offset : stop] += block.reshape(rows, -1)
        return result.detach(), weights.reshape(rows).detach()


def _recorder(store: list[tuple[Tensor, Tensor]]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if output.requires_grad:
            store.append((args[0].detach(), output))

    return hook


def _positions(layer: FactorLayer, inputs: Tensor, grad_out: Tensor):
    """Inputs (B, T, n_in) and output gradients (B, T, n_out) of one call."""
    module = layer.module
    rows = grad_out.shape[0]
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        ).transpose(1, 2)
        grad_out = grad_out.reshape(rows, module.out_channels, -1).transpose(1, 2)
        inputs = patches
    elif isinstance(module, nn.Linear):
        inputs = inputs.reshape(rows, -1, inputs.shape[-1])
        grad_out = grad_out.reshape(rows, -1, grad_out.shape[-1])
    else:
        grad_out = grad_out.reshape(rows, -1, grad_out.shape[-1])
        return inputs.reshape(rows, -1), grad_out
    if layer.bias is not None:
        ones = inputs.new_ones(*inputs.shape[:-1], 1)
        inputs = torch.cat([inputs, ones], dim=-1)
    return inputs, grad_out


def _embedding_rows(layer: FactorLayer, tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """P_inᵀ a for one-hot inputs: the rows of P_in the tokens pick, (B, T, k_in)."""
    rows = tokens.shape[0]
    tokens = tokens.reshape(rows, -1)
    picked = layer.p_in.to(tokens.device, dtype)[tokens]
    padding = layer.module.padding_idx
    if padding is not None:
        picked = picked * (tokens != padding).unsqueeze(-1).to(dtype)
    return picked


def factorized_share(model: nn.Module, layout: ParameterLayout) -> float:
    """Share of the selected parameters that the factorized path covers."""
    layers = FactorizedProjector._find_layers(model, layout)
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    covered = sum(sizes[n] for layer in layers for n in (layer.weight, layer.bias) if n)
    return covered / max(1, layout.numel)
