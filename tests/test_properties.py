"""Property-based tests of the index and batch arguments (hypothesis).

Whatever subset of the train rows is featurized, in whatever order and
batch split, each row gets the features it gets in one in-order pass (to
float tolerance: matrix products round differently in other shapes); any
invalid ``inds`` raises ``BatchError`` before any work and leaves the store
as it was; a batch whose tensors disagree on the leading dimension names
the item that does not match. Example counts are kept small so the file
runs in a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kerntrace as kt
from kerntrace.gradients import batch_size

N = 12
PROJ_DIM = 8
FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class CountingNet(nn.Module):
    """A small MLP that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.body(x))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=generator)
    y = torch.randint(0, 3, (N,), generator=generator)
    return x, y


X, Y = _data()


def _traker(save_dir: Path, projector: str) -> tuple[kt.TRAKer, CountingNet]:
    model = CountingNet()
    traker = kt.TRAKer(
        model, "classification", N, save_dir, proj_dim=PROJ_DIM,
        projector=projector, device="cpu",
    )  # fmt: skip
    traker.load_checkpoint(model.state_dict(), model_id=0)
    return traker, model


@functools.cache
def _reference(projector: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and weights of every row, featurized in one in-order batch."""
    with tempfile.TemporaryDirectory() as folder:
        traker, _ = _traker(Path(folder), projector)
        traker.featurize((X, Y), num_samples=N)
        stored = Path(folder) / "models" / "0"
        return np.load(stored / "features.npy"), np.load(stored / "out_to_loss.npy")


def _as(kind: str, rows: list):
    """The same indices as a list, tuple, numpy array or tensor."""
    if kind == "array":
        return np.array(rows)
    if kind == "tensor":
        return torch.tensor(rows)
    if kind == "tuple":
        return tuple(rows)
    return list(rows)


@st.composite
def split_subsets(draw) -> list[list[int]]:
    """An ordered subset of the rows, cut into consecutive batches."""
    order = draw(st.permutations(range(N)))
    size = draw(st.integers(1, N))
    cuts = (
        sorted(draw(st.sets(st.integers(1, size - 1), max_size=4))) if size > 1 else []
    )
    bounds = [0, *cuts, size]
    return [list(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@FAST
@given(
    batches=split_subsets(),
    projector=st.sampled_from(["dense", "factorized"]),
    kind=st.sampled_from(["list", "tuple", "array", "tensor"]),
)
def test_any_subset_in_any_order_and_batch_split_gives_the_in_order_features(
    batches, projector, kind
):
    features, weights = _reference(projector)
    with tempfile.TemporaryDirectory() as folder:
        traker, _ = _traker(Path(folder), projector)
        for rows in batches:
            traker.featurize((X[rows], Y[rows]), inds=_as(kind, rows))
        traker.flush()
        stored = Path(folder) / "models" / "0"
        done = np.load(stored / "done.npy")
        got = np.load(stored / "features.npy")
        got_weights = np.load(stored / "out_to_loss.npy")

    chosen = sorted(r for rows in batches for r in rows)
    assert np.flatnonzero(done).tolist() == chosen
    np.testing.assert_allclose(got[chosen], features[chosen], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_weights[chosen], weights[chosen], rtol=1e-6)
    others = np.setdiff1d(np.arange(N), chosen)
    assert not got[others].any()


@st.composite
def invalid_inds(draw) -> tuple[object, int, str]:
    """``(inds, batch size, message pattern)`` for one kind of invalid inds."""
    valid = draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=6, unique=True))
    where = draw(st.integers(0, len(valid)))
    kind = draw(
        st.sampled_from(["duplicate", "negative", "too_large", "length", "float"])
    )
    if kind == "duplicate":
        inds = [*valid[:where], draw(st.sampled_from(valid)), *valid[where:]]
        return inds, len(inds), r"inds holds duplicates"
    if kind == "negative":
        inds = [*valid[:where], draw(st.integers(-(10**6), -1)), *valid[where:]]
        return inds, len(inds), rf"inds must lie in 0\.\.{N - 1}, got values from -"
    if kind == "too_large":
        inds = [*valid[:where], draw(st.integers(N, 10**6)), *valid[where:]]
        return inds, len(inds), rf"inds must lie in 0\.\.{N - 1}"
    if kind == "length":
        count = draw(st.integers(1, 8).filter(lambda c: c != len(valid)))
        return valid, count, rf"inds has {len(valid)} entries but the batch holds"
    inds = [float(v) + draw(st.sampled_from([0.0, 0.5])) for v in valid]
    return inds, len(inds), r"inds must be a 1-d sequence of integers"


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> tuple[kt.TRAKer, CountingNet, Path]:
    """A store with rows 0..3 featurized; invalid calls must not change it."""
    folder = tmp_path_factory.mktemp("started")
    traker, model = _traker(folder, "dense")
    traker.featurize((X[:4], Y[:4]), inds=range(4))
    return traker, model, folder


@FAST
@given(case=invalid_inds(), kind=st.sampled_from(["list", "array", "tensor"]))
def test_invalid_inds_always_raise_batch_error_before_any_work(started, case, kind):
    traker, model, folder = started
    inds, count, message = case
    rows = [i % N for i in range(count)]
    before, calls = _snapshot(folder), model.calls

    with pytest.raises(kt.BatchError, match=message):
        traker.featurize((X[rows], Y[rows]), inds=_as(kind, inds))

    assert model.calls == calls
    assert _snapshot(folder) == before


@FAST
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    keyed=st.booleans(),
)
def test_batch_size_is_the_shared_leading_dimension_or_names_the_odd_item(sizes, keyed):
    tensors = [torch.zeros(size, 2) for size in sizes]
    labels = [f"batch['t{i}']" if keyed else f"batch[{i}]" for i in range(len(sizes))]
    batch = {f"t{i}": t for i, t in enumerate(tensors)} if keyed else tuple(tensors)

    if len(set(sizes)) == 1:
        assert batch_size(batch) == sizes[0]
        return
    odd = next(i for i, size in enumerate(sizes) if size != sizes[0])
    expected = f"{labels[odd]} does not match {labels[0]}"
    with pytest.raises(kt.BatchError, match=re.escape(expected)):
        batch_size(batch)
