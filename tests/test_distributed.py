"""Case E2 and issue 5: several processes featurizing one store.

Two gloo ranks (torch.distributed on localhost) featurizing disjoint halves
of the train set give byte for byte the store, and exactly the scores, of
one process fed the same batches. Two writers of the same rows at the same
time are refused; a writer that finished or died does not block the next.
The processes are children of the fork server of ``store_worker``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import kerntrace as kt
import store_worker as worker
from kerntrace.claims import process_start
from kerntrace.files import HOST, write_json
from store_worker import N_TRAIN, PROJ_DIM, assert_close, files, temporaries


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The store and scores of one process fed batches of 4 train rows."""
    store = tmp_path_factory.mktemp("one") / "store"
    outcome = worker.call(worker.run, store, batch=4)
    assert outcome.exitcode == 0, outcome.error
    return store, outcome.value


def traker(store, **options) -> kt.TRAKer:
    model, _, _, _ = worker.problem()
    return kt.TRAKer(
        model,
        "classification",
        N_TRAIN,
        store,
        proj_dim=PROJ_DIM,
        device="cpu",
        **options,
    )


@pytest.mark.parametrize(("n", "world_size"), [(24, 2), (10, 3), (7, 7), (3, 5)])
def test_shards_are_contiguous_disjoint_and_cover_every_row(n, world_size):
    parts = [kt.shard(n, rank, world_size) for rank in range(world_size)]

    assert [i for part in parts for i in part] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert kt.shard(n) == range(n)


@pytest.mark.parametrize(
    ("rank", "world_size", "match"),
    [
        (2, 2, r"0 ≤ rank < world_size, got rank=2 and world_size=2"),
        (0, 0, r"world_size ≥ 1"),
        (1, None, r"pass both rank and world_size or neither, got rank=1"),
        (0.5, 2, r"rank must be an integer, got 0.5"),
    ],
)
def test_bad_rank_or_world_size_is_refused(tmp_path, rank, world_size, match):
    with pytest.raises(kt.ConfigurationError, match=match):
        kt.shard(10, rank, world_size)
    with pytest.raises(kt.ConfigurationError, match=match):
        traker(tmp_path, rank=rank, world_size=world_size)


def test_e2_two_gloo_ranks_give_exactly_the_store_and_scores_of_one_process(
    tmp_path, one_process
):
    store, init = tmp_path / "store", f"file://{tmp_path / 'rendezvous'}"
    ranks = [worker.start(worker.distributed_run, store, r, 2, init) for r in (0, 1)]
    first, second = (worker.finish(*rank) for rank in ranks)

    assert first.exitcode == second.exitcode == 0, (first.error, second.error)
    np.testing.assert_array_equal(first.value, one_process[1])
    assert files(store) == files(one_process[0])
    assert not list(store.glob("models/*/shards/*"))
    assert not list(store.glob("models/*/claims/*"))
    assert not temporaries(store)


def test_collective_finalize_with_rows_missing_fails_on_every_rank(tmp_path):
    store, init = tmp_path / "store", f"file://{tmp_path / 'rendezvous'}"
    ranks = [
        worker.start(worker.distributed_run, store, r, 2, init, drop_last=True)
        for r in (0, 1)
    ]
    outcomes = [worker.finish(*rank) for rank in ranks]

    for rank, outcome in enumerate(outcomes):
        assert outcome.exitcode == 0 and outcome.error is not None, outcome
        assert "OrderError" in outcome.error["types"]
        assert (
            f"model id {rank} has 4 of 24 train rows not featurized"
            in outcome.error["message"]
        )
        assert "rows 20..23 are missing" in outcome.error["message"]


def test_two_writers_of_the_same_rows_are_refused_and_a_dead_ones_claim_recovered(
    tmp_path,
):
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.mkdir()
    _, checkpoints, _, _ = worker.problem()
    reference = worker.call(worker.run, tmp_path / "reference").value
    holder = worker.start(worker.featurize_shard, store, 0, 2, hold=hold, hold_after=1)
    worker.wait_for(hold / "ready")
    pid = holder[0].pid

    for options, rows in [({"rank": 0, "world_size": 3}, "0..7"), ({}, "0..23")]:
        with pytest.raises(
            kt.StoreBusyError,
            match=rf"rows {rows} cannot be featurized here, another process is "
            rf"writing rows 0\.\.11 by pid {pid} on host .* since .*claim file",
        ):
            traker(store, **options).load_checkpoint(checkpoints[0], model_id=0)
    other_half = worker.call(worker.featurize_shard, store, 1, 2)
    assert other_half.exitcode == 0 and other_half.error is None, other_half
    with pytest.raises(
        kt.OrderError,
        match=rf"model id 0 has 8 of 24 train rows not featurized .* rows 4\.\.11 "
        rf"are missing; another process is still writing rows 0\.\.11 by pid {pid}",
    ):
        traker(store).finalize_features()

    os.kill(pid, signal.SIGKILL)
    assert worker.finish(*holder).exitcode == -signal.SIGKILL
    rest = worker.call(worker.run, store)

    assert rest.exitcode == 0, rest.error
    # Rows were computed in batches of other sizes than the reference's, so
    # they agree to float tolerance, not bit for bit.
    assert_close(rest.value, reference)
    assert not list(store.glob("models/*/shards/*"))
    assert not list(store.glob("models/*/claims/*"))


def test_a_writer_that_finished_its_rows_does_not_block_the_next(tmp_path):
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.mkdir()
    _, checkpoints, _, _ = worker.problem()
    holder = worker.start(worker.featurize_shard, store, 0, 2, hold=hold)
    worker.wait_for(hold / "ready")

    try:
        for options in ({"rank": 0, "world_size": 3}, {}):
            traker(store, **options).load_checkpoint(checkpoints[1], model_id=1)
    finally:
        (hold / "release").touch()
        assert worker.finish(*holder).exitcode == 0


def test_finalize_killed_while_merging_shards_resumes_to_the_one_process_store(
    tmp_path, one_process
):
    store = tmp_path / "store"
    writers = [worker.start(worker.featurize_shard, store, r, 2) for r in (0, 1)]
    for writer in writers:
        outcome = worker.finish(*writer)
        assert outcome.exitcode == 0 and outcome.error is None, outcome

    killed = worker.call(worker.run, store, batch=4, kill="flush@models/0/done.npy:1")
    assert killed.exitcode == -signal.SIGKILL
    resumed = worker.call(worker.run, store, batch=4)

    assert resumed.exitcode == 0, resumed.error
    np.testing.assert_array_equal(resumed.value, one_process[1])
    assert files(store) == files(one_process[0])


@pytest.mark.parametrize("module", ["claims", "distributed", "files"])
def test_the_store_helper_modules_export_what_they_list(module):
    loaded = importlib.import_module(f"kerntrace.{module}")

    assert [name for name in loaded.__all__ if not hasattr(loaded, name)] == []


def fake_claim(store, **fields) -> None:
    """A claim on every row of model id 0, as another process would write it."""
    claim = {"rows": [0, N_TRAIN], "since": "2026-01-01T00:00:00", **fields}
    write_json(store / "models" / "0" / "claims" / f"0-{N_TRAIN}.json", claim)


def test_a_claim_from_another_host_holds_and_says_how_to_release_it(tmp_path):
    store = tmp_path / "store"
    traker(store)
    fake_claim(store, pid=1, host="elsewhere", process_start=None)
    _, checkpoints, _, _ = worker.problem()

    with pytest.raises(
        kt.StoreBusyError,
        match=r"pid 1 on host elsewhere .*claim file .*0-24\.json\)\. Give each "
        r"process disjoint rows .*if it no longer runs, delete its claim file",
    ):
        traker(store).load_checkpoint(checkpoints[0], model_id=0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_claim_of_a_zombie_or_of_a_reused_pid_is_stale(tmp_path):
    store = tmp_path / "store"
    traker(store)
    _, checkpoints, _, _ = worker.problem()
    zombie = subprocess.Popen(["true"])
    try:
        while (
            Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] != "Z"
        ):
            time.sleep(0.01)
        fake_claim(store, pid=zombie.pid, host=HOST, process_start=None)
        traker(store).load_checkpoint(checkpoints[0], model_id=0)
    finally:
        zombie.wait()
    parent = os.getppid()
    fake_claim(store, pid=parent, host=HOST, process_start=process_start(parent) + 1)

    traker(store).load_checkpoint(checkpoints[0], model_id=0)
