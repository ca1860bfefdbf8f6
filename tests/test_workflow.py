"""The TRAKer workflow: call order, resume, reopening, ensembling, checkpoints.

Each test runs a 6-8-3 MLP on 40 synthetic train examples and 5 targets, so
a whole featurize → finalize → score pass takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kerntrace as kt
import kerntrace.api
import kerntrace.files
from kerntrace.featurize import Featurizer

N_TRAIN = 40
N_TARGETS = 5
PROJ_DIM = 16
TASK = "image_classification"


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in make_model(seed).state_dict().items()}


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, 6)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, size=n), dtype=torch.long)
    return x, y


@pytest.fixture(scope="module")
def train() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(N_TRAIN, seed=10)


@pytest.fixture(scope="module")
def targets() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(N_TARGETS, seed=11)


@pytest.fixture(scope="module")
def checkpoints() -> list[dict[str, torch.Tensor]]:
    return [make_checkpoint(seed) for seed in (1, 2, 3)]


def rows(data: tuple[torch.Tensor, ...], start: int, stop: int) -> tuple:
    return tuple(t[start:stop] for t in data)


def batches(data: tuple[torch.Tensor, ...], size: int) -> list[tuple]:
    n = len(data[0])
    return [rows(data, i, min(n, i + size)) for i in range(0, n, size)]


def new_traker(save_dir: Path, **options) -> kt.TRAKer:
    settings = {"proj_dim": PROJ_DIM, "device": "cpu", **options}
    task = settings.pop("task", TASK)
    n = settings.pop("train_set_size", N_TRAIN)
    return kt.TRAKer(make_model(0), task, n, save_dir, **settings)


def featurize_all(traker, checkpoints, train, *, size: int = 10) -> None:
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for batch in batches(train, size):
            traker.featurize(batch, num_samples=len(batch[0]))


def score_ids(traker, checkpoints, targets, ids, *, exp: str = "val") -> None:
    for model_id in ids:
        traker.start_scoring_checkpoint(exp, checkpoints[model_id], model_id, N_TARGETS)
        for batch in batches(targets, 2):
            traker.score(batch, num_samples=len(batch[0]))


def assert_second_checkpoint_completes(
    traker, checkpoints, train, targets, clean_scores
) -> None:
    """Featurize checkpoint 1 whole, finish, and match the uninterrupted scores."""
    traker.load_checkpoint(checkpoints[1], model_id=1)
    traker.featurize(train, num_samples=N_TRAIN)
    traker.finalize_features()
    score_ids(traker, checkpoints, targets, [0, 1])
    scores = np.array(traker.finalize_scores("val"))
    np.testing.assert_allclose(scores, clean_scores, rtol=1e-5, atol=1e-8)


def run_pipeline(save_dir, checkpoints, train, targets, **options) -> np.ndarray:
    traker = new_traker(save_dir, **options)
    featurize_all(traker, checkpoints, train)
    traker.finalize_features()
    score_ids(traker, checkpoints, targets, range(len(checkpoints)))
    return np.array(traker.finalize_scores("val"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def clean_scores(tmp_path_factory, checkpoints, train, targets) -> np.ndarray:
    """Scores of an uninterrupted run with two checkpoints."""
    folder = tmp_path_factory.mktemp("clean")
    return run_pipeline(folder, checkpoints[:2], train, targets)


# -- S1: calls out of order ----------------------------------------------------


def test_out_of_order_calls_name_the_missing_step_then_right_order_works(
    tmp_path, checkpoints, train, targets, clean_scores
):
    traker = new_traker(tmp_path)
    target_batch = rows(targets, 0, 2)
    first = rows(train, 0, 10)

    with pytest.raises(kt.OrderError, match=r"call start_scoring_checkpoint\("):
        traker.score(target_batch, num_samples=2)
    with pytest.raises(
        kt.OrderError, match=r"no scored targets.*start_scoring_checkpoint\(\)"
    ):
        traker.finalize_scores("val")
    with pytest.raises(kt.OrderError, match=r"call load_checkpoint\("):
        traker.featurize(first, num_samples=10)
    with pytest.raises(kt.OrderError, match=r"found no features.*featurize\(\)"):
        traker.finalize_features()
    with pytest.raises(kt.OrderError, match=r"call finalize_features\(\)"):
        traker.start_scoring_checkpoint("val", checkpoints[0], 0, N_TARGETS)
    with pytest.raises(kt.OrderError, match=r"call start_scoring_checkpoint\("):
        traker.score(target_batch, num_samples=2)

    for model_id in (0, 1):
        traker.load_checkpoint(checkpoints[model_id], model_id=model_id)
        for batch in batches(rows(train, 0, 20), 10):
            traker.featurize(batch, num_samples=10)
        with pytest.raises(kt.OrderError, match=r"call finalize_features\(\)"):
            traker.start_scoring_checkpoint("val", checkpoints[0], 0, N_TARGETS)
        with pytest.raises(
            kt.OrderError,
            match=rf"model id {model_id} has 20 of 40 train rows not featurized "
            r"\(first missing: 20\); featurize them before finalize_features",
        ):
            traker.finalize_features(model_ids=[model_id])
        for batch in batches(rows(train, 20, 40), 10):
            traker.featurize(batch, num_samples=10)
    traker.finalize_features()

    traker.start_scoring_checkpoint("val", checkpoints[0], 0, N_TARGETS)
    with pytest.raises(
        kt.OrderError, match=r"unscored targets for model id\(s\) 0.*score\(\)"
    ):
        traker.finalize_scores("val")
    score_ids(traker, checkpoints, targets, [0, 1])
    scores = np.array(traker.finalize_scores("val"))

    assert scores.shape == (N_TRAIN, N_TARGETS)
    np.testing.assert_allclose(scores, clean_scores, rtol=1e-6, atol=1e-9)


# -- S3: scoring again, in this and another process ----------------------------


def target_feature_bytes(save_dir: Path, ids, exp: str = "val") -> dict[int, bytes]:
    folder = save_dir / "experiments" / exp / "models"
    return {i: (folder / str(i) / "features.npy").read_bytes() for i in ids}


_RESCORE_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch
    from torch import nn

    import kerntrace as kt

    save_dir, targets_path, out, *paths = sys.argv[1:]
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.load(targets_path)
    traker = kt.TRAKer(model, "image_classification", 40, save_dir, proj_dim=16,
                       device="cpu")
    for model_id, path in enumerate(paths):
        traker.start_scoring_checkpoint("val", path, model_id, len(x))
        for start in range(0, len(x), 2):
            batch = (x[start : start + 2], y[start : start + 2])
            traker.score(batch, num_samples=len(batch[0]))
    np.save(out, np.array(traker.finalize_scores("val")))
    """
)


def test_rescoring_and_a_new_process_give_identical_features_and_scores(
    tmp_path, checkpoints, train, targets
):
    paths = []
    for model_id, checkpoint in enumerate(checkpoints[:2]):
        paths.append(tmp_path / f"model_{model_id}.pt")
        torch.save(checkpoint, paths[-1])
    targets_path = tmp_path / "targets.pt"
    torch.save(targets, targets_path)
    store = tmp_path / "store"

    traker = new_traker(store)
    featurize_all(traker, paths, train)
    traker.finalize_features()
    score_ids(traker, paths, targets, [0, 1])
    first = np.array(traker.finalize_scores("val"))
    first_features = target_feature_bytes(store, [0, 1])

    score_ids(traker, paths, targets, [0, 1])
    second = np.array(traker.finalize_scores("val"))
    assert target_feature_bytes(store, [0, 1]) == first_features
    np.testing.assert_array_equal(second, first)

    out = tmp_path / "third.npy"
    script = tmp_path / "rescore.py"
    script.write_text(_RESCORE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(script), str(store), str(targets_path), str(out)]
    done = subprocess.run(
        command + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert target_feature_bytes(store, [0, 1]) == first_features
    np.testing.assert_array_equal(np.load(out), first)
    np.testing.assert_array_equal(
        np.load(store / "experiments" / "val" / "scores.npy"), first
    )


def test_finalize_features_twice_is_harmless(tmp_path, checkpoints, train, targets):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:2], train)
    traker.finalize_features()
    score_ids(traker, checkpoints, targets, [0, 1])
    before = np.array(traker.finalize_scores("val"))
    cholesky = tmp_path / "models" / "0" / "cholesky.npy"
    stamp = cholesky.stat().st_mtime_ns
    files = snapshot(tmp_path / "models")

    traker.finalize_features()
    new_traker(tmp_path).finalize_features()

    assert cholesky.stat().st_mtime_ns == stamp
    assert snapshot(tmp_path / "models") == files
    np.testing.assert_array_equal(np.array(traker.finalize_scores("val")), before)


# -- damaged store files ---------------------------------------------------------


def test_truncated_features_are_refused_and_never_extended(
    tmp_path, checkpoints, train
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    path = tmp_path / "models" / "0" / "features.npy"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    reopened = new_traker(tmp_path)
    featurize_all(reopened, checkpoints[:1], train)  # every row is marked done
    with pytest.raises(
        kt.StoreCorruptError,
        match=r"features\.npy holds \d+ bytes but its header announces .*delete "
        r"the folder",
    ):
        reopened.finalize_features()

    assert path.stat().st_size == len(content) // 2


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_kernel_factor_is_refused_then_refactored_by_finalize(
    tmp_path, checkpoints, train, targets, damage
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    traker.finalize_features()
    score_ids(traker, checkpoints, targets, [0])
    before = np.array(traker.finalize_scores("val"))
    cholesky = tmp_path / "models" / "0" / "cholesky.npy"
    content = cholesky.read_bytes()
    if damage == "missing":
        cholesky.unlink()
    else:
        cholesky.write_bytes(content[: len(content) // 2])

    reopened = new_traker(tmp_path)
    with pytest.raises(
        kt.StoreCorruptError, match=r"cholesky\.npy.*call finalize_features\(\)"
    ):
        reopened.finalize_scores("val")
    reopened.finalize_features()

    assert cholesky.read_bytes() == content
    np.testing.assert_allclose(np.array(reopened.finalize_scores("val")), before)


# -- sizes checked up front ------------------------------------------------------


def test_a_kernel_beyond_half_the_memory_is_refused_before_the_store(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(kerntrace.api, "_physical_memory", lambda: 64 * 2**20)
    save_dir = tmp_path / "store"

    with pytest.raises(
        kt.ConfigurationError,
        match=r"proj_dim=4096 is too large: the \(k, k\) float64 kernel would "
        r"need 128\.0 MiB, more than half the physical memory \(32\.0 MiB\); use "
        r"proj_dim=2048 or smaller",
    ):
        new_traker(save_dir, proj_dim=4096, projector="sparse")

    assert not save_dir.exists()
    new_traker(save_dir, proj_dim=2048, projector="sparse")


def test_train_features_beyond_the_free_disk_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(kerntrace.api, "_free_disk", lambda path: 1000)

    with pytest.raises(
        kt.ConfigurationError,
        match=rf"proj_dim=16 is too large: the \({N_TRAIN}, k\) train features .* "
        r"would need 2\.5 KiB, more than the free disk space .*use proj_dim=4 or "
        r"smaller",
    ):
        new_traker(tmp_path)

    assert not (tmp_path / "store.json").exists()


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1000, "1000 B"), (3 * 2**10, "3.0 KiB"), (5 * 2**29, "2.5 GiB")],
)
def test_byte_counts_are_printed_in_a_readable_unit(size, text):
    assert kerntrace.files.format_bytes(size) == text


# -- S4: reopening with other settings ------------------------------------------


@pytest.mark.parametrize(
    ("setting", "options"),
    [
        ("projector_seed", {"projector_seed": 1}),
        ("proj_dim", {"proj_dim": 8}),
        ("parameters", {"grad_wrt": ["2"]}),
        ("task", {"task": "tabular_classification"}),
        ("train_set_size", {"train_set_size": N_TRAIN - 1}),
    ],
)
def test_reopening_with_other_settings_names_the_setting(tmp_path, setting, options):
    new_traker(tmp_path)
    recorded = (tmp_path / "store.json").read_bytes()

    with pytest.raises(
        kt.StoreMismatchError,
        match=rf"other settings \(.*\b{setting}: (the|only the) store has",
    ):
        new_traker(tmp_path, **options)

    assert (tmp_path / "store.json").read_bytes() == recorded


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_results_without_a_readable_store_json_are_refused(
    tmp_path, checkpoints, train, damage
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    settings = tmp_path / "store.json"
    if damage == "missing":
        settings.unlink()
    else:
        settings.write_text("{not json")
    files = snapshot(tmp_path / "models")

    with pytest.raises(
        kt.StoreCorruptError,
        match=r"settings .*made with are unknown.*delete the whole directory or "
        r"use a new save_dir",
    ):
        new_traker(tmp_path, projector_seed=5)

    assert snapshot(tmp_path / "models") == files
    assert settings.exists() == (damage == "garbage")


def test_an_empty_directory_without_store_json_is_a_new_store(tmp_path):
    (tmp_path / "models").mkdir()

    new_traker(tmp_path)

    assert (tmp_path / "store.json").exists()


def test_reopening_with_the_same_settings_is_accepted(tmp_path):
    new_traker(tmp_path)
    new_traker(tmp_path)
    new_traker(tmp_path, grad_wrt=["0", "2"])


# -- S5: overlapping featurize batches -------------------------------------------


def count_featurized(monkeypatch) -> list[list[int]]:
    """The rows of every batch the featurizer computes from now on."""
    seen: list[list[int]] = []
    original = Featurizer.__call__

    def counting(self, batch, rows=None):
        seen.append([int(r) for r in rows])
        return original(self, batch, rows)

    monkeypatch.setattr(Featurizer, "__call__", counting)
    return seen


def test_overlapping_batch_after_a_crash_computes_only_new_rows(
    tmp_path, monkeypatch, checkpoints, train, targets, clean_scores
):
    seen = count_featurized(monkeypatch)
    folder = tmp_path / "models" / "0"

    crashed = new_traker(tmp_path)
    crashed.load_checkpoint(checkpoints[0], model_id=0)
    crashed.featurize(rows(train, 0, 20), inds=np.arange(0, 20))
    assert seen == [list(range(0, 20))]
    del crashed  # its writer flushes the rows it was handed
    assert np.load(folder / "done.npy").tolist() == [1] * 20 + [0] * 20
    features = np.load(folder / "features.npy")[:20].tobytes()
    weights = np.load(folder / "out_to_loss.npy")[:20].tobytes()

    seen.clear()
    resumed = new_traker(tmp_path)
    resumed.load_checkpoint(checkpoints[0], model_id=0)
    resumed.featurize(rows(train, 10, 40), inds=torch.arange(10, 40))
    assert seen == [list(range(20, 40))]
    resumed.featurize(rows(train, 0, 40), num_samples=N_TRAIN)
    assert seen == [list(range(20, 40))], "a batch of finished rows was recomputed"
    assert np.load(folder / "features.npy")[:20].tobytes() == features
    assert np.load(folder / "out_to_loss.npy")[:20].tobytes() == weights
    assert np.load(folder / "done.npy").all()

    assert_second_checkpoint_completes(
        resumed, checkpoints, train, targets, clean_scores
    )


# -- S2: ensembling with a checkpoint skipped -------------------------------------


def expected_scores(save_dir: Path, ids, exp: str = "val") -> np.ndarray:
    """The DESIGN.md formula, from the stored arrays, in float64."""
    total, weights = 0.0, 0.0
    for model_id in ids:
        folder = save_dir / "models" / str(model_id)
        phi = np.load(folder / "features.npy").astype(np.float64)
        damping = json.loads((folder / "kernel.json").read_text())["damping"]
        target_file = save_dir / "experiments" / exp / "models" / str(model_id)
        target = np.load(target_file / "features.npy").astype(np.float64)
        q = np.load(folder / "out_to_loss.npy").astype(np.float64)
        curvature = q * (1 - q)  # R = p_y (1 - p_y) of the classification task
        kernel = phi.T @ (phi * curvature[:, None]) + damping * np.eye(phi.shape[1])
        total = total + phi @ np.linalg.solve(kernel, target.T)
        weights = weights + q
    return (total / len(ids)) * (weights / len(ids))[:, None]


def test_allow_skip_averages_exactly_over_the_scored_checkpoints(
    tmp_path, checkpoints, train, targets
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints, train)
    traker.finalize_features()
    score_ids(traker, checkpoints, targets, [0, 2])

    with pytest.raises(
        kt.OrderError, match=r"unscored targets for model id\(s\) 1;.*allow_skip=True"
    ):
        traker.finalize_scores("val")
    with pytest.warns(UserWarning, match=r"skips model id\(s\) \[1\].*over \[0, 2\]"):
        skipped = np.array(traker.finalize_scores("val", allow_skip=True))
    recorded = json.loads((tmp_path / "experiments/val/scores.json").read_text())
    assert recorded["model_ids"] == [0, 2]
    assert sorted(recorded["damping"]) == ["0", "2"]

    chosen = np.array(traker.finalize_scores("val", model_ids=[0, 2]))
    single = {i: np.array(traker.finalize_scores("val", model_ids=[i])) for i in (0, 2)}
    weights = {
        i: np.load(tmp_path / "models" / str(i) / "out_to_loss.npy").astype(float)
        for i in (0, 2)
    }
    assert min(w.min() for w in weights.values()) > 0
    from_single = (
        (single[0] / weights[0][:, None] + single[2] / weights[2][:, None])
        / 2
        * ((weights[0] + weights[2]) / 2)[:, None]
    )

    np.testing.assert_array_equal(skipped, chosen)
    np.testing.assert_allclose(
        skipped, expected_scores(tmp_path, [0, 2]), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(skipped, from_single, rtol=1e-4, atol=1e-7)
    assert not np.allclose(skipped, (single[0] + single[2]) / 2, rtol=1e-3)


# -- inds / num_samples validation ---------------------------------------------------


BAD_BATCHES = [
    ({"inds": [0, 1, 2]}, r"inds has 3 entries but the batch holds 4"),
    ({"inds": [-1, 0, 1, 2]}, r"inds must lie in 0\.\.\d+, got values from -1"),
    ({"inds": [1, 2, 3, 99]}, r"inds must lie in 0\.\.\d+, got values .* to 99"),
    ({"inds": [0, 1, 1, 2]}, r"inds holds duplicates"),
    ({"inds": [[0, 1], [2, 3]]}, r"inds must be a 1-d sequence of integers"),
    ({"inds": [0.0, 1.0, 2.0, 3.0]}, r"inds must be a 1-d sequence of integers"),
    ({"num_samples": 5}, r"num_samples=5 but the batch holds 4 examples"),
    ({}, r"pass exactly one of inds= .* or num_samples="),
    ({"inds": [0, 1, 2, 3], "num_samples": 4}, r"pass exactly one of inds="),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_BATCHES)
def test_malformed_train_batch_is_refused_and_nothing_written(
    tmp_path, checkpoints, train, arguments, message
):
    traker = new_traker(tmp_path)
    traker.load_checkpoint(checkpoints[0], model_id=0)
    before = snapshot(tmp_path)

    with pytest.raises(kt.BatchError, match=message):
        traker.featurize(rows(train, 0, 4), **arguments)

    assert snapshot(tmp_path) == before
    traker.featurize(rows(train, 0, 4), num_samples=4)
    traker.flush()
    done = np.load(tmp_path / "models" / "0" / "done.npy")
    assert done.tolist() == [1] * 4 + [0] * (N_TRAIN - 4)


@pytest.mark.parametrize(("arguments", "message"), BAD_BATCHES)
def test_malformed_target_batch_is_refused_and_nothing_written(
    tmp_path, checkpoints, train, targets, arguments, message
):
    many = make_data(8, seed=12)
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    traker.finalize_features()
    traker.start_scoring_checkpoint("val", checkpoints[0], 0, 8)
    before = snapshot(tmp_path)

    with pytest.raises(kt.BatchError, match=message):
        traker.score(rows(many, 0, 4), **arguments)

    assert snapshot(tmp_path) == before


def test_more_rows_than_declared_is_refused(tmp_path, checkpoints, train):
    traker = new_traker(tmp_path)
    traker.load_checkpoint(checkpoints[0], model_id=0)
    traker.featurize(train, num_samples=N_TRAIN)
    before = snapshot(tmp_path)

    with pytest.raises(kt.BatchError, match=r"rows 40\.\.43 go past the 40 examples"):
        traker.featurize(rows(train, 0, 4), num_samples=4)

    assert snapshot(tmp_path) == before


# -- checkpoints and model ids ------------------------------------------------------


def test_other_checkpoint_under_a_featurized_model_id_is_refused(
    tmp_path, checkpoints, train
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    before = snapshot(tmp_path)

    with pytest.raises(
        kt.StoreMismatchError,
        match=r"model id 0 .* was featurized with another checkpoint",
    ):
        traker.load_checkpoint(checkpoints[1], model_id=0)
    with pytest.raises(
        kt.StoreMismatchError,
        match=r"model id 0 .* was featurized with another checkpoint",
    ):
        new_traker(tmp_path).load_checkpoint(checkpoints[1], model_id=0)

    assert snapshot(tmp_path) == before
    traker.load_checkpoint(checkpoints[0], model_id=0)


def test_scoring_with_another_checkpoint_than_featurized_is_refused(
    tmp_path, checkpoints, train
):
    traker = new_traker(tmp_path)
    featurize_all(traker, checkpoints[:1], train)
    traker.finalize_features()
    before = snapshot(tmp_path)

    with pytest.raises(
        kt.StoreMismatchError,
        match=r"checkpoint given for model id 0 differs from the one its train "
        r"features were computed with",
    ):
        traker.start_scoring_checkpoint("val", checkpoints[1], 0, N_TARGETS)
    with pytest.raises(kt.OrderError, match=r"call start_scoring_checkpoint\("):
        traker.score(rows(train, 0, 2), num_samples=2)
    assert snapshot(tmp_path) == before


# -- M1: checkpoint formats -------------------------------------------------------


def test_state_dict_pt_and_safetensors_checkpoints_load_identically(
    tmp_path, checkpoints, train, targets
):
    pt = [tmp_path / f"model_{i}.pt" for i in range(2)]
    st = [tmp_path / f"model_{i}.safetensors" for i in range(2)]
    for checkpoint, pt_path, st_path in zip(checkpoints, pt, st, strict=False):
        torch.save(checkpoint, pt_path)
        save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(st_path))

    results = {
        name: run_pipeline(tmp_path / name, given, train, targets)
        for name, given in [("dict", checkpoints[:2]), ("pt", pt), ("st", st)]
    }

    np.testing.assert_array_equal(results["pt"], results["dict"])
    np.testing.assert_array_equal(results["st"], results["dict"])
    model_file = "models/0/checkpoint.json"
    stamps = {(tmp_path / name / model_file).read_text() for name in results}
    assert len(stamps) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "weights.txt", r"suffix '\.txt'; accepted are"),
        (lambda tmp: 7, r"checkpoint of type int is not accepted; accepted are"),
        (lambda tmp: {"w": [1.0]}, r"non-tensor values under \['w'\]; accepted"),
    ],
)
def test_other_checkpoint_formats_are_refused_listing_accepted_ones(
    tmp_path, make, message
):
    (tmp_path / "weights.txt").write_text("not a checkpoint")
    traker = new_traker(tmp_path / "store")

    with pytest.raises(kt.CheckpointFormatError, match=message) as caught:
        traker.load_checkpoint(make(tmp_path), model_id=0)

    for accepted in ("state dict", "'.pt'", "'.safetensors'"):
        assert accepted in str(caught.value)
    assert not (tmp_path / "store" / "models").exists()


# -- the one-call API and the Scores object ---------------------------------------


def test_attribute_equals_the_step_by_step_result(
    tmp_path, checkpoints, train, targets, clean_scores
):
    scores = kt.attribute(
        make_model(0),
        checkpoints[:2],
        batches(train, 10),
        batches(targets, 2),
        task=TASK,
        exp_name="val",
        progress=False,
        proj_dim=PROJ_DIM,
        device="cpu",
    )
    stored = kt.attribute(
        make_model(0),
        checkpoints[:2],
        batches(train, 10),
        batches(targets, 2),
        task=TASK,
        save_dir=tmp_path,
        progress=False,
        proj_dim=PROJ_DIM,
        device="cpu",
    )

    assert isinstance(scores, kt.Scores)
    assert scores.values.shape == (N_TRAIN, N_TARGETS) == scores.shape
    assert len(scores) == N_TARGETS
    assert scores.model_ids == (0, 1)
    assert sorted(scores.damping) == [0, 1]
    np.testing.assert_allclose(scores.values, clean_scores, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(stored.values, scores.values)
    assert stored.save_dir == tmp_path
    assert type(stored.to_numpy()) is np.ndarray
    assert type(scores.to_numpy()) is np.ndarray
    np.testing.assert_array_equal(stored.to_numpy(), clean_scores)


def test_scores_views_and_top_k_match_numpy(clean_scores):
    scores = kt.Scores(clean_scores, (0, 1))

    for target in range(N_TARGETS):
        column = clean_scores[:, target]
        proponents, opponents = scores.top_k(target, 4)

        assert isinstance(proponents, kt.Ranking)
        assert proponents.indices.tolist() == np.argsort(-column)[:4].tolist()
        assert opponents.indices.tolist() == np.argsort(column)[:4].tolist()
        np.testing.assert_array_equal(proponents.scores, column[proponents.indices])
        assert np.all(np.diff(proponents.scores) <= 0)
        assert np.all(np.diff(opponents.scores) >= 0)
        assert proponents.scores[0] == column.max()
        assert opponents.scores[0] == column.min()
        view = scores[target]
        assert isinstance(view, kt.TargetScores)
        np.testing.assert_array_equal(view.values, column)
    np.testing.assert_array_equal(scores[-1].values, clean_scores[:, -1])
    assert len(scores.top_k(0, 10 * N_TRAIN)[0].indices) == N_TRAIN
    with pytest.raises(IndexError, match=r"target 5 is out of range; there are 5"):
        scores[N_TARGETS]


# -- Deferred flushes: a row's done flag waits for its flush -------------------


def test_rows_are_marked_done_only_after_their_flush_at_most_a_second_later(
    tmp_path, monkeypatch, checkpoints, train, targets, clean_scores
):
    monkeypatch.setattr(kerntrace.store, "TRAIN_FLUSH_SECONDS", 3600.0)
    flushed: list[str] = []
    original = np.memmap.flush

    def recording(self):
        flushed.append(Path(self.filename).name)
        return original(self)

    monkeypatch.setattr(np.memmap, "flush", recording)
    done = tmp_path / "models" / "0" / "done.npy"
    traker = new_traker(tmp_path)
    traker.load_checkpoint(checkpoints[0], model_id=0)
    for batch in batches(rows(train, 0, 30), 10):
        traker.featurize(batch, num_samples=10)
    # The first batch is flushed at once; the next two wait for the interval.
    assert np.load(done).tolist() == [1] * 10 + [0] * 30
    assert flushed == ["features.npy", "out_to_loss.npy"]
    # Another process sees rows 10..29 as missing and would compute them again.
    assert kerntrace.store.Store(tmp_path, traker.store.settings).rows_done(0) == 10

    # The last missing row flushes everything at once, before any flag is set.
    traker.featurize(rows(train, 30, 40), num_samples=10)
    assert flushed[2:] == ["features.npy", "out_to_loss.npy", "done.npy"]
    assert np.load(done).all()

    # Switching checkpoints flushes what was written of the previous one.
    traker.load_checkpoint(checkpoints[1], model_id=1)
    traker.featurize(rows(train, 0, 10), num_samples=10)
    traker.featurize(rows(train, 10, 20), num_samples=10)
    traker.load_checkpoint(checkpoints[2], model_id=2)
    assert np.load(tmp_path / "models" / "1" / "done.npy").sum() == 20

    # The remaining rows come out exactly as without deferral.
    traker.load_checkpoint(checkpoints[1], model_id=1)
    for start in (20, 30):
        traker.featurize(rows(train, start, start + 10), inds=range(start, start + 10))
    traker.load_checkpoint(checkpoints[0], model_id=0)
    traker.finalize_features(model_ids=[0, 1])
    score_ids(traker, checkpoints, targets, [0, 1])
    scores = np.array(traker.finalize_scores("val"))
    np.testing.assert_allclose(scores, clean_scores, rtol=1e-5, atol=1e-8)


def test_rows_awaiting_their_flush_are_marked_done_when_the_process_exits(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import kerntrace.store
        import test_workflow as w
        kerntrace.store.TRAIN_FLUSH_SECONDS = 3600.0
        train = w.make_data(w.N_TRAIN, seed=10)
        traker = w.new_traker({str(tmp_path)!r})
        traker.load_checkpoint(w.make_checkpoint(1), model_id=0)
        for start in (0, 10, 20):
            traker.featurize(w.rows(train, start, start + 10), num_samples=10)
        import numpy as np
        done = np.load({str(tmp_path / "models" / "0" / "done.npy")!r})
        print("before exit", int(done.sum()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "before exit 10" in result.stdout
    done = np.load(tmp_path / "models" / "0" / "done.npy")
    assert done.tolist() == [1] * 30 + [0] * 10


def test_a_failed_background_write_is_raised_by_the_next_call_and_its_rows_redone(
    tmp_path, monkeypatch, checkpoints, train, targets, clean_scores
):
    original = np.memmap.flush
    failures = [OSError(28, "No space left on device")]

    def failing(self):
        if failures and Path(self.filename).name == "features.npy":
            raise failures.pop()
        return original(self)

    monkeypatch.setattr(np.memmap, "flush", failing)
    traker = new_traker(tmp_path)
    traker.load_checkpoint(checkpoints[0], model_id=0)
    traker.featurize(rows(train, 0, 10), num_samples=10)  # fails in the background
    with pytest.raises(kt.StoreWriteError, match=r"rows 0\.\.9 of model id 0") as error:
        traker.featurize(rows(train, 10, 20), num_samples=10)
    assert error.value.errno == 28 and error.value.filename.endswith("features.npy")
    # A loop that catches the error and goes on keeps its rows in place:
    # the batch that raised was written, only rows 0..9 are missing.
    for start in (20, 30):
        traker.featurize(rows(train, start, start + 10), num_samples=10)
    with pytest.raises(kt.OrderError, match=r"rows 0\.\.9"):
        traker.finalize_features()
    assert np.load(tmp_path / "models/0/done.npy").tolist() == [0] * 10 + [1] * 30

    seen = count_featurized(monkeypatch)
    traker.load_checkpoint(checkpoints[0], model_id=0)
    for batch in batches(train, 10):
        traker.featurize(batch, num_samples=10)
    assert seen == [list(range(10))], "only the failed rows are computed again"
    assert_second_checkpoint_completes(
        traker, checkpoints, train, targets, clean_scores
    )


def test_two_trakers_of_one_process_share_a_store_and_either_finalizes(
    tmp_path, checkpoints, train, targets, clean_scores
):
    first, second = new_traker(tmp_path), new_traker(tmp_path)
    for model_id in (0, 1):
        first.load_checkpoint(checkpoints[model_id], model_id=model_id)
        second.load_checkpoint(checkpoints[model_id], model_id=model_id)
        for index, start in enumerate(range(0, N_TRAIN, 5)):
            writer = first if index % 2 == 0 else second
            writer.featurize(
                rows(train, start, start + 5), inds=range(start, start + 5)
            )
    # first's last rows still wait for their flush; finalizing flushes them.
    second.finalize_features()
    score_ids(second, checkpoints, targets, [0, 1])
    scores = np.array(second.finalize_scores("val"))
    np.testing.assert_allclose(scores, clean_scores, rtol=1e-5, atol=1e-8)


def test_featurizing_in_a_thread_that_outlives_the_main_thread_writes_every_row(
    tmp_path,
):
    script = textwrap.dedent(
        f"""
        import sys, threading
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_workflow as w
        train = w.make_data(w.N_TRAIN, seed=10)
        traker = w.new_traker({str(tmp_path)!r})

        def work():
            import time
            time.sleep(0.5)  # the main thread has ended by now
            for model_id in (0, 1):
                traker.load_checkpoint(w.make_checkpoint(model_id + 1), model_id)
                for start in range(0, w.N_TRAIN, 10):
                    batch = w.rows(train, start, start + 10)
                    traker.featurize(batch, num_samples=10)

        threading.Thread(target=work).start()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for model_id in (0, 1):
        assert np.load(tmp_path / "models" / str(model_id) / "done.npy").all()
