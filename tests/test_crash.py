"""Issue 5: a run killed at any point resumes to the uninterrupted result, and
a full, size-limited or unwritable save directory fails clearly, losing
nothing.

Every run happens in a child process (``store_worker``): a fork server that
imported torch once forks a fresh process per run, so a kill ends a real
process with its memmaps and open files, and the rerun starts from nothing
but the directory. The deterministic kills wrap a real function of the
store or the workflow and send SIGKILL at its N-th call; the timed ones kill
a running process from outside after a random pause, one of them a fresh
``python`` interpreter.

After a deterministic kill the resumed store is compared byte for byte with
the uninterrupted one and the scores must be bit-identical: the resumed run
recomputes exactly the batches whose rows were not marked done, with the
same rows in each batch, one thread and the same code, so every float is
computed the same way. A timed kill could in principle land inside the
assignment of a batch's done flags; then part of that batch is recomputed
in a smaller batch, where BLAS may round differently, so those runs are
compared to within 1e-6 of each score plus 1e-6 of the largest one
(``assert_close``); float32 features recomputed in other batches differ in
their last bits, which the kernel solve magnifies to about 1e-5 relative in
the smallest scores, 1e-7 of the largest.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import store_worker as worker
from kerntrace.store import save_array
from store_worker import assert_close, assert_readable, files, temporaries

# Kill points read paths from /proc/self/fd; the limits and users are POSIX.
pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the crash harness needs Linux"
)

WORKER = Path(__file__).with_name("store_worker.py")
KILLED = -signal.SIGKILL

# Each round kills the workflow once or more at these points, then reruns it
# to completion. Phases: featurizing (gradients, rows, weights, done flags,
# array creation, the claim), metadata (store.json, checkpoint.json,
# kernel.json, experiment.json, scores.json), finalize_features (ΦᵀΦ,
# Cholesky, the saved factor) and finalize_scores (solve, the score matrix).
ROUNDS: list[tuple[str, ...]] = [
    ("replace@store.json:1",),
    ("fsync@.store.json:1",),
    ("replace@checkpoint.json:1",),
    ("replace@0-24.json:2",),
    ("featurize:1",),
    ("link@done.npy:1",),
    ("flush@out_to_loss.npy:3",),
    ("flush@done.npy:4",),
    ("link@features.npy:2",),
    ("featurize:8", "flush@features.npy:2"),
    ("gram:2",),
    ("factor:1",),
    ("replace@cholesky.npy:2",),
    ("replace@kernel.json:1",),
    ("fsync@.kernel.json:2", "factor:1"),
    ("replace@experiment.json:1",),
    ("featurize:12",),
    ("solve:2",),
    ("ensemble:1",),
    ("flush@.scores.npy:1", "replace@scores.npy:1"),
    ("replace@scores.json:1",),
    ("timing",),
    ("timing", "timing"),
    ("featurize:3", "timing"),
]


@dataclass
class Reference:
    """The uninterrupted run: its store, scores, calls and duration."""

    store: Path
    scores: np.ndarray
    calls: list[tuple[str, str]]
    seconds: float


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    folder = tmp_path_factory.mktemp("reference")
    worker.call(worker.run, folder / "warm-up")  # start the fork server
    began = time.perf_counter()
    outcome = worker.call(worker.run, folder / "store", record=folder / "calls.json")
    seconds = time.perf_counter() - began
    assert outcome.exitcode == 0, outcome.error
    calls = [tuple(c) for c in json.loads((folder / "calls.json").read_text())]
    return Reference(folder / "store", outcome.value, calls, seconds)


def kill_after_pause(folder: Path, pause: float) -> int:
    """Start the workflow, SIGKILL it after ``pause`` seconds; its exit code."""
    process, receiver = worker.start(worker.run, folder)
    time.sleep(pause)
    try:
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had ended already
    return worker.finish(process, receiver).exitcode


def test_points_of_the_rounds_are_reached_in_an_uninterrupted_run(reference):
    for spec in {s for kills in ROUNDS for s in kills if s != "timing"}:
        point, text, count = worker.parse(spec)
        calls = [c for c in reference.calls if c[0] == point and text in c[1]]
        assert len(calls) >= count, f"{spec}: only {len(calls)} such calls"


def test_killed_runs_resume_to_the_uninterrupted_store_and_scores(reference, tmp_path):
    rng = random.Random(5)
    expected = files(reference.store)
    timed_kills = 0
    for number, kills in enumerate(ROUNDS):
        folder = tmp_path / f"round-{number}"
        for spec in kills:
            if spec == "timing":
                pause = rng.uniform(0.0, 0.6 * reference.seconds)
                # The machine may be faster now than for the reference run:
                # a run that ended before its kill is redone with less time.
                for _ in range(6):
                    code = kill_after_pause(folder, pause)
                    if code == KILLED:
                        break
                    shutil.rmtree(folder)
                    pause /= 2
                timed_kills += code == KILLED
            else:
                code = worker.call(worker.run, folder, kill=spec).exitcode
                assert code == KILLED, f"round {number} {kills}: {spec} not reached"
            assert_readable(folder)

        outcome = worker.call(worker.run, folder)

        assert outcome.exitcode == 0, f"round {number} {kills}: {outcome.error}"
        assert not temporaries(folder), f"round {number} {kills}"
        assert not list(folder.glob("models/*/claims/*")), f"round {number} {kills}"
        if "timing" in kills:
            assert_close(outcome.value, reference.scores)
        else:
            np.testing.assert_array_equal(outcome.value, reference.scores)
            assert files(folder) == expected, f"round {number} {kills}"
    assert timed_kills >= 1, "the timed kills all came after the run had ended"


def test_a_fresh_interpreter_killed_midway_and_by_the_environment_hook_resumes(
    reference, tmp_path
):
    folder, out = tmp_path / "store", tmp_path / "scores.npy"
    command = [sys.executable, str(WORKER), str(folder), str(out)]
    env = {k: v for k, v in os.environ.items() if k != worker.KILL_ENV}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if line.startswith("featurized 1 5"):
            break
    time.sleep(random.Random(7).uniform(0.0, 0.005))
    process.kill()
    process.communicate()
    assert process.returncode == KILLED
    assert_readable(folder)

    env[worker.KILL_ENV] = "solve:1"
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == KILLED, second.stderr
    assert not out.exists()

    outcome = worker.call(worker.run, folder)

    assert outcome.exitcode == 0, outcome.error
    assert_close(outcome.value, reference.scores)
    assert not temporaries(folder)


def test_refinalizing_with_another_damping_killed_midway_keeps_factor_and_record_paired(
    reference, tmp_path
):
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)

    killed = worker.call(
        worker.run, store, lambda_reg=0.5, kill="replace@kernel.json:1"
    )

    assert killed.exitcode == KILLED
    assert not (store / "models/0/kernel.json").exists()  # not the old damping's
    resumed = worker.call(worker.run, store, lambda_reg=0.5)
    assert resumed.exitcode == 0, resumed.error
    for model_id in (0, 1):
        kernel = json.loads((store / f"models/{model_id}/kernel.json").read_text())
        assert kernel["lambda_reg"] == kernel["damping"] == 0.5
    fresh = worker.call(worker.run, tmp_path / "fresh", lambda_reg=0.5)
    np.testing.assert_array_equal(resumed.value, fresh.value)


# -- full, size-limited and unwritable save directories --------------------------


def assert_write_error(outcome: worker.Outcome, code: int, culprit: str, words: str):
    error = outcome.error
    assert outcome.exitcode == 0 and error is not None, outcome
    assert {"StoreWriteError", "OSError"} <= set(error["types"]), error
    assert error["errno"] == code, error
    assert error["filename"].endswith(culprit), error
    assert culprit in error["message"] and words in error["message"], error
    assert "rerun" in error["message"], error


def assert_kept(store: Path, reference: Reference, *relative: str) -> None:
    for name in relative:
        assert (store / name).read_bytes() == (reference.store / name).read_bytes()


def rerun_matches(store: Path, reference: Reference, tmp_path: Path) -> list:
    """Rerun the workflow; it must end with the reference store and scores."""
    record = tmp_path / "rerun-calls.json"
    outcome = worker.call(worker.run, store, record=record)
    assert outcome.exitcode == 0, outcome.error
    np.testing.assert_array_equal(outcome.value, reference.scores)
    assert files(store) == files(reference.store)
    return [c for c in json.loads(record.read_text()) if c[0] == "featurize"]


TRAIN_ARRAYS = [
    f"models/{i}/{name}.npy" for i in (0, 1) for name in ("features", "done")
]


@pytest.mark.parametrize(
    ("limit", "culprit", "kept"),
    [
        (1000, "models/0/features.npy", ["store.json"]),
        (2000, "models/0/cholesky.npy", TRAIN_ARRAYS),
    ],
)
def test_file_size_limit_fails_clearly_and_a_rerun_completes(
    reference, tmp_path, limit, culprit, kept
):
    # Real: RLIMIT_FSIZE makes the kernel refuse writes past `limit` bytes with
    # EFBIG, as for root as for any user. The features (1664 bytes) pass 1000;
    # the Cholesky factor (2176 bytes) passes 2000 after every row is written.
    store = tmp_path / "store"

    outcome = worker.call(worker.limited, limit, worker.run, store)

    assert_write_error(outcome, errno.EFBIG, culprit, "file size limit")
    assert_readable(store)
    assert not temporaries(store)
    assert_kept(store, reference, *kept)
    featurized = rerun_matches(store, reference, tmp_path)
    if culprit.endswith("cholesky.npy"):
        assert len(featurized) == 4  # only the target batches: no train row redone


@pytest.mark.parametrize(
    ("point", "code", "culprit", "words", "kept"),
    [
        (
            "fallocate@1/.features.npy:1",
            errno.ENOSPC,
            "models/1/features.npy",
            "file system is full",
            TRAIN_ARRAYS[:2],
        ),
        (
            "fsync@.kernel.json:1",
            errno.ENOSPC,
            "models/0/kernel.json",
            "file system is full",
            [*TRAIN_ARRAYS, "models/0/cholesky.npy"],
        ),
        (
            "open@.scores.npy:1",
            errno.EROFS,
            "experiments/val/scores.npy",
            "read-only",
            [*TRAIN_ARRAYS, "models/1/cholesky.npy", "models/1/kernel.json"],
        ),
    ],
)
def test_simulated_full_or_read_only_file_system_fails_clearly_and_a_rerun_completes(
    reference, tmp_path, point, code, culprit, words, kept
):
    # Simulated: no real full or read-only file system can be had for a test
    # without mounting one, so the named call raises the OSError the kernel
    # gives there: ENOSPC when space for a new array is reserved or when a
    # JSON file is flushed, EROFS when a new file is created.
    store = tmp_path / "store"

    outcome = worker.call(worker.run, store, kill=point, fault=code)

    assert_write_error(outcome, code, culprit, words)
    assert_readable(store)
    assert not temporaries(store)
    assert_kept(store, reference, *kept)
    rerun_matches(store, reference, tmp_path)


def test_unwritable_store_stays_readable_and_refuses_writes_clearly(
    reference, tmp_path
):
    # Real: the directory is made read-only with chmod, and the child gives up
    # root (to user nobody) first, since root writes regardless of the mode
    # bits. A normal user is refused by the mode bits alone. The folder is
    # outside pytest's tmp_path, whose parents nobody may not enter.
    root = Path(tempfile.mkdtemp(prefix="kerntrace-readonly-"))
    store = root / "store"
    try:
        shutil.copytree(reference.store, store)
        for path in [root, *store.rglob("*"), store]:
            path.chmod(0o555 if path.is_dir() else 0o444)

        read = worker.call(worker.unprivileged, worker.read_scores, store)
        if read.error and "NotImplementedError" in read.error["types"]:
            pytest.skip(read.error["message"])
        rerun = worker.call(worker.unprivileged, worker.run, store)
        fresh = worker.call(worker.unprivileged, worker.run, root / "new")

        assert read.exitcode == 0, read.error
        np.testing.assert_array_equal(read.value, reference.scores)
        assert_write_error(rerun, errno.EACCES, "models/0/.lock", "may not write")
        assert_write_error(fresh, errno.EACCES, "new", "may not write")
        assert files(store) == files(reference.store)

        for path in [root, *store.rglob("*"), store]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        rerun_matches(store, reference, tmp_path)
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12.0).reshape(3, 4),
        np.array([True, False]),
        np.zeros((0, 3), np.float32),
        np.asfortranarray(np.arange(6).reshape(2, 3)),
        np.arange(10)[::2],
        np.array(3.5),
        np.arange(5, dtype=np.float16),
    ],
    ids=["2-d", "bool", "empty", "fortran", "strided", "0-d", "float16"],
)
def test_saved_arrays_load_back_equal(tmp_path, array):
    # save_array writes .npy itself (numpy.save can stop short silently).
    save_array(tmp_path / "a.npy", array)

    loaded = np.load(tmp_path / "a.npy")

    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)
