"""Small networks, and their training, for the demo, tests and benchmarks.

These are plain torch modules (no torchvision): an MLP and a small CNN,
trained full-batch so that a seed fixes the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["mlp", "SmallCNN", "train_classifier", "margins"]


def mlp(widths: Sequence[int], *, seed: int = 0) -> nn.Sequential:
    """A ReLU MLP with the given layer widths, e.g. ``(64, 64, 10)``.

    Args:
        widths: Input width, hidden widths, number of classes.
        seed: Seed of the initial weights.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    torch.random.set_rng_state(generator_state)
    return model


class SmallCNN(nn.Module):
    """Two conv blocks (conv, BatchNorm, ReLU, pool) and a linear head.

    Args:
        side: Image side (square, one channel).
        classes: Number of classes.
        channels: Channels of the two conv layers.
        seed: Seed of the initial weights.
    """

    def __init__(
        self,
        side: int = 28,
        classes: int = 10,
        *,
        channels: tuple[int, int] = (8, 16),
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.side = side
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, classes)
        torch.random.set_rng_state(generator_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, classes) from inputs (B, side²) or (B, 1, s, s)."""
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def train_classifier(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train with full-batch Adam on cross-entropy; returns the model (eval).

    Args:
        model: The network, trained in place.
        x: Inputs, shape (n, ...), float32.
        y: Labels, shape (n,), int64.
        steps: Optimizer steps.
        lr: Learning rate.
        weight_decay: L2 penalty (decoupled, AdamW).
        seed: Seed of anything random during training.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    torch.random.set_rng_state(generator_state)
    return model


@torch.no_grad()
def margins(
    model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor
) -> np.ndarray:
    """The classification margin of each example, shape (n,), float64."""
    from .outputs import classification_margin

    was_training = model.training
    model.eval()
    logits = model(torch.as_tensor(x, dtype=torch.float32))
    model.train(was_training)
    labels = torch.as_tensor(y, dtype=torch.long)
    return classification_margin(logits, labels).double().numpy()
