"""Cases N7 and S6 of CASES.md: a bad gradient names its example and loses
nothing; a scoring pass never modifies the train side of the store."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kerntrace as kt


class DividesByFeature(nn.Module):
    """Divides by input feature 0: an example whose feature 0 is 0 gives inf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / x[:, :1])


def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=generator) + 0.5
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


@pytest.mark.parametrize("projector", ["dense", "factorized"])
def test_n7_non_finite_gradient_names_the_example_and_keeps_finished_rows(
    tmp_path, projector
):
    torch.manual_seed(0)
    model = DividesByFeature()
    x, y = _data()
    x[7, 0] = 0.0
    traker = kt.TRAKer(
        model,
        "classification",
        12,
        tmp_path,
        proj_dim=8,
        projector=projector,
        device="cpu",
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize((x[:4], y[:4]), inds=range(4))
    traker.flush()
    before = np.load(tmp_path / "models/0/features.npy")[:4].copy()

    with pytest.raises(kt.NonFiniteGradientError, match="example 7"):
        traker.featurize((x[4:], y[4:]), inds=range(4, 12))

    done = np.load(tmp_path / "models/0/done.npy")
    assert done[:4].all() and not done[4:].any()
    np.testing.assert_array_equal(
        np.load(tmp_path / "models/0/features.npy")[:4], before
    )


def _digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_s6_scoring_pass_leaves_the_train_side_untouched(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = _data(20)
    traker = kt.TRAKer(model, "classification", 20, tmp_path, proj_dim=16, device="cpu")
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize((x, y), num_samples=20)
    traker.finalize_features()
    train_side = _digest(tmp_path / "models") | {
        "store.json": _digest(tmp_path)["store.json"]
    }

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer = kt.TRAKer(
            model, "classification", 20, tmp_path, proj_dim=16, device="cpu"
        )
        scorer.start_scoring_checkpoint("t", model.state_dict(), 0, 5)
        scorer.score((x[:5], y[:5]), num_samples=5)
        scores = scorer.finalize_scores("t")

    assert np.isfinite(scores).all()
    after = _digest(tmp_path / "models") | {
        "store.json": _digest(tmp_path)["store.json"]
    }
    assert after == train_side
