"""Shared fixtures: tiny models, synthetic data, reference gradients, TRAK runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import kerntrace as kt
from kerntrace.outputs import classification_margin

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class SmallCNN(nn.Module):
    """A 1-channel 6×6 image classifier with BatchNorm2d and Dropout."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3)
        self.norm = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.norm(self.conv(x))))
        return self.head(h.flatten(1))


class SharedLinear(nn.Module):
    """Applies the same square Linear layer twice, then a head."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))
        return self.head(h)


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """Factory of a seeded MLP ``body`` (Linear, Tanh) + ``head`` (Linear)."""

    def make(
        d_in: int = 4,
        hidden: int = 6,
        classes: int = 3,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        torch.manual_seed(seed)
        body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        model = nn.Sequential()
        model.add_module("body", body)
        model.add_module("head", nn.Linear(hidden, classes))
        return model.to(dtype)

    return make


@pytest.fixture
def make_cnn() -> Callable[..., nn.Module]:
    """Factory of ``SmallCNN`` with non-trivial BatchNorm running statistics."""

    def make(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        model = SmallCNN()
        with torch.no_grad():
            model.norm.running_mean.copy_(torch.tensor([0.3, -0.2, 0.5]))
            model.norm.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
            model.norm.weight.copy_(torch.tensor([1.2, 0.7, -0.9]))
            model.norm.bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
            model.norm.num_batches_tracked.fill_(7)
        return model.to(dtype)

    return make


@pytest.fixture
def make_shared_linear() -> Callable[..., nn.Module]:
    """Factory of ``SharedLinear``, a model that reuses one layer."""

    def make(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        return SharedLinear().to(dtype)

    return make


@pytest.fixture
def make_classification() -> Callable[..., tuple[Tensor, Tensor]]:
    """Factory of seeded synthetic inputs and integer labels."""

    def make(
        n: int,
        shape: Sequence[int] = (4,),
        classes: int = 3,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
        y = torch.randint(0, classes, (n,), generator=generator)
        return x.to(dtype), y

    return make


def _loop_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Sequence[str] | None = None,
) -> Tensor:
    """Per-example margin gradients by a plain ``torch.autograd.grad`` loop.

    The model is put in eval mode for the loop and its mode restored. Returns
    shape (B, p) in the model's dtype, parameters flattened in ``names`` order
    (default: every parameter with ``requires_grad``, in model order).
    """
    named = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    rows = []
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(x.shape[0]):
            out = classification_margin(model(x[i : i + 1]), y[i : i + 1]).sum()
            grads = torch.autograd.grad(out, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training
    return torch.stack(rows).detach()


@pytest.fixture
def loop_gradients() -> Callable[..., Tensor]:
    """The reference per-example gradients (see ``_loop_gradients``)."""
    return _loop_gradients


@pytest.fixture
def run_traker() -> Callable[..., np.ndarray]:
    """Run the whole TRAKer workflow and return the scores as an array.

    Arguments: model, list of checkpoints (state dicts), train (x, y), targets
    (x, y), save_dir, then keyword options: ``train_batch`` (an int, or a
    list of batch sizes), ``target_batch``, ``task`` and anything ``TRAKer``
    accepts.
    """

    def run(
        model: nn.Module,
        checkpoints: Sequence[dict[str, Tensor]],
        train: tuple[Tensor, Tensor],
        targets: tuple[Tensor, Tensor],
        save_dir: os.PathLike[str] | str,
        *,
        train_batch: int | Sequence[int] = 8,
        target_batch: int = 4,
        task: str | kt.Task = "classification",
        **options: object,
    ) -> np.ndarray:
        n = train[0].shape[0]
        traker = kt.TRAKer(model, task, n, save_dir, device="cpu", **options)
        for model_id, checkpoint in enumerate(checkpoints):
            traker.load_checkpoint(checkpoint, model_id=model_id)
            for start, stop in _spans(n, train_batch):
                traker.featurize(
                    (train[0][start:stop], train[1][start:stop]),
                    num_samples=stop - start,
                )
        traker.finalize_features()
        t = targets[0].shape[0]
        for model_id, checkpoint in enumerate(checkpoints):
            traker.start_scoring_checkpoint("targets", checkpoint, model_id, t)
            for start, stop in _spans(t, target_batch):
                traker.score(
                    (targets[0][start:stop], targets[1][start:stop]),
                    num_samples=stop - start,
                )
        return np.array(traker.finalize_scores("targets"))

    return run


def _spans(n: int, sizes: int | Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive (start, stop) batches of ``n`` rows: a fixed size or a list."""
    if isinstance(sizes, int):
        return [(s, min(n, s + sizes)) for s in range(0, n, sizes)]
    bounds = np.cumsum([0, *sizes])
    if bounds[-1] != n:
        raise ValueError(f"batch sizes {list(sizes)} do not add up to {n}")
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
