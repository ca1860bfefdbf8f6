"""Test-only: child processes for the crash, disk-full and multi-process tests.

``run`` does the whole TRAK workflow (featurize two checkpoints, finalize,
score, finalize the scores) on a tiny MLP in a save directory. It can arm a
kill point first: ``"POINT[@TEXT]:N"`` sends SIGKILL to this process at the
N-th call of POINT whose path contains TEXT, before that call does anything.
The points wrap real functions the store and the workflow call:

    featurize  Featurizer.__call__ (the gradients of a batch)
    flush      numpy.memmap.flush (rows, weights or done flags to disk)
    replace    os.replace (a JSON or .npy file moved into place)
    fsync      os.fsync (a temporary file's content to disk)
    link       os.link (a new array file put in place)
    fallocate  os.posix_fallocate (disk space of a new array reserved)
    open       the store's creation of any new file
    gram, factor, solve   kerntrace.kernel's ΦᵀΦ, Cholesky and solve
    ensemble   the blocked score matrix of finalize_scores

With ``fault=errno`` that call raises ``OSError(errno)`` instead, the way a
full or read-only file system fails it. ``record=path`` writes every
(point, path) call, in order, as JSON.

The tests start these functions in children of a fork server that has
imported torch and kerntrace once (``call``, ``start``); as a script,
``python store_worker.py SAVE_DIR OUT.npy`` runs the workflow in a fresh
interpreter, armed from the environment variable ``KERNTRACE_TEST_KILL``,
and prints one line per featurized batch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kerntrace as kt
import kerntrace.api
import kerntrace.featurize
import kerntrace.files
import kerntrace.kernel

N_TRAIN, N_TARGETS, PROJ_DIM, BATCH, TARGET_BATCH, N_CHECKPOINTS = 24, 6, 16, 5, 4, 2
KILL_ENV = "KERNTRACE_TEST_KILL"


def problem() -> tuple[nn.Module, list[dict], tuple, tuple]:
    """The model, its checkpoints, train (x, y) and targets (x, y); all seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    checkpoints = []
    for seed in range(N_CHECKPOINTS):
        torch.manual_seed(100 + seed)
        checkpoints.append(
            {k: torch.randn_like(v) * 0.5 for k, v in model.state_dict().items()}
        )
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TARGETS, 6, generator=generator)
    y = torch.randint(0, 3, (N_TRAIN + N_TARGETS,), generator=generator)
    return model, checkpoints, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


# -- kill points -------------------------------------------------------------


def _fd_path(fd: int, *_: Any) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


POINTS: dict[str, tuple[Any, str, Callable[..., str]]] = {
    "featurize": (kerntrace.featurize.Featurizer, "__call__", lambda *a, **k: ""),
    "flush": (np.memmap, "flush", lambda self, *a, **k: str(self.filename)),
    "replace": (os, "replace", lambda src, dst, *a, **k: str(dst)),
    "fsync": (os, "fsync", _fd_path),
    "link": (os, "link", lambda src, dst, *a, **k: str(dst)),
    "fallocate": (os, "posix_fallocate", _fd_path),
    "open": (kerntrace.files, "_open_new", lambda path, *a, **k: str(path)),
    "gram": (kerntrace.kernel, "gram", lambda *a, **k: ""),
    "factor": (kerntrace.kernel, "factor", lambda *a, **k: ""),
    "solve": (kerntrace.kernel, "solve", lambda *a, **k: ""),
    "ensemble": (kerntrace.api, "ensemble_scores", lambda *a, **k: ""),
}


def parse(spec: str) -> tuple[str, str, int]:
    """``"flush@done.npy:3"`` → ``("flush", "done.npy", 3)``."""
    target, count = spec.rsplit(":", 1)
    point, _, text = target.partition("@")
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}; known: {sorted(POINTS)}")
    return point, text, int(count)


def arm(spec: str | None = None, fault: int | None = None) -> list[tuple[str, str]]:
    """Wrap every point to kill at the call ``spec`` names.

    Args:
        spec: ``"POINT[@TEXT]:N"``, or ``None`` to only record the calls.
        fault: Instead of the kill, make that call raise ``OSError(fault)``
            (an errno such as ENOSPC), as the operating system would.

    Returns:
        The list to which each call's (point, path) is appended, in order.
    """
    chosen = parse(spec) if spec else None
    calls: list[tuple[str, str]] = []
    seen = {"n": 0}

    def wrap(point: str, real: Callable, where: Callable[..., str]) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            path = where(*args, **kwargs)
            calls.append((point, path))
            if chosen and chosen[0] == point and chosen[1] in path:
                seen["n"] += 1
                if seen["n"] == chosen[2] and fault is not None:
                    raise OSError(fault, os.strerror(fault), path)
                if seen["n"] == chosen[2]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return wrapper

    for point, (owner, name, where) in POINTS.items():
        setattr(owner, name, wrap(point, getattr(owner, name), where))
    return calls


# -- the workflow --------------------------------------------------------------


def _traker(save_dir: str | os.PathLike[str], **options: Any) -> kt.TRAKer:
    torch.set_num_threads(1)
    model, _, _, _ = problem()
    return kt.TRAKer(
        model,
        "classification",
        N_TRAIN,
        save_dir,
        proj_dim=PROJ_DIM,
        device="cpu",
        **options,
    )


def _batches(x: torch.Tensor, y: torch.Tensor, rows: Any, size: int):
    """(rows, batch) pairs over ``rows`` of (x, y) in batches of ``size``."""
    rows = list(rows)
    for first in range(0, len(rows), size):
        part = torch.tensor(rows[first : first + size], dtype=torch.long)
        yield part, (x[part], y[part])


def _score(traker: kt.TRAKer) -> np.ndarray:
    _, checkpoints, _, (x, y) = problem()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.start_scoring_checkpoint("val", checkpoint, model_id, N_TARGETS)
        for _, batch in _batches(x, y, range(N_TARGETS), TARGET_BATCH):
            traker.score(batch, num_samples=len(batch[0]))
    return np.array(traker.finalize_scores("val"))


def run(
    save_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    batch: int = BATCH,
    kill: str | None = None,
    fault: int | None = None,
    record: str | None = None,
    progress: bool = False,
    lambda_reg: float | None = None,
) -> np.ndarray:
    """The whole workflow in ``save_dir``; returns (and saves to ``out``) the scores.

    Train batches of ``batch`` rows are fed in order with ``num_samples=``.
    ``kill`` names a kill point (see ``arm``), ``fault`` turns it into an
    ``OSError`` with that errno, and ``record`` is a JSON file to list the
    calls of every point in; ``lambda_reg`` is passed to ``TRAKer``.
    """
    calls = arm(kill, fault) if kill or record else []
    traker = _traker(save_dir, lambda_reg=lambda_reg)
    _, checkpoints, (x, y), _ = problem()
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for rows, part in _batches(x, y, range(N_TRAIN), batch):
            traker.featurize(part, num_samples=len(rows))
            if progress:
                print(f"featurized {model_id} {int(rows[0])}", flush=True)
    traker.finalize_features()
    scores = _score(traker)
    if record is not None:
        Path(record).write_text(json.dumps(calls))
    if out is not None:
        np.save(out, scores)
    return scores


def wait_for(path: Path, timeout: float = 60.0) -> None:
    """Wait until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def featurize_shard(
    save_dir: str | os.PathLike[str],
    rank: int,
    world_size: int,
    *,
    batch: int = 4,
    hold: Path | None = None,
    hold_after: int | None = None,
) -> None:
    """Featurize the rows ``kt.shard`` gives this rank (with ``inds=``).

    With ``hold``, after ``hold_after`` batches (every batch if ``None``)
    create ``hold/ready`` and wait for ``hold/release`` before going on.
    """
    traker = _traker(save_dir, rank=rank, world_size=world_size)
    _, checkpoints, (x, y), _ = problem()
    fed = 0
    for model_id, checkpoint in enumerate(checkpoints):
        traker.load_checkpoint(checkpoint, model_id=model_id)
        for rows, part in _batches(x, y, kt.shard(N_TRAIN, rank, world_size), batch):
            traker.featurize(part, inds=rows)
            fed += 1
            if hold is not None and fed == hold_after:
                _hold(hold)
    if hold is not None and hold_after is None:
        _hold(hold)


def _hold(folder: Path) -> None:
    (Path(folder) / "ready").touch()
    wait_for(Path(folder) / "release")


def distributed_run(
    save_dir: str | os.PathLike[str],
    rank: int,
    world_size: int,
    init_method: str,
    *,
    batch: int = 4,
    drop_last: bool = False,
) -> np.ndarray | None:
    """One rank of a torch.distributed (gloo) run; rank 0 returns the scores.

    Rank 0 feeds every train batch with ``num_samples=`` (its TRAKer skips
    the rows of other ranks), the others only their own rows with ``inds=``.
    With ``drop_last`` the last rank leaves out its last batch.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size
    )
    try:
        traker = _traker(save_dir)
        _, checkpoints, (x, y), _ = problem()
        rows = list(kt.shard(N_TRAIN))
        if drop_last and rank == world_size - 1:
            rows = rows[:-batch]
        for model_id, checkpoint in enumerate(checkpoints):
            traker.load_checkpoint(checkpoint, model_id=model_id)
            if rank == 0:
                for part_rows, part in _batches(x, y, range(N_TRAIN), batch):
                    traker.featurize(part, num_samples=len(part_rows))
            else:
                for part_rows, part in _batches(x, y, rows, batch):
                    traker.featurize(part, inds=part_rows)
        traker.finalize_features()
        scores = _score(traker) if rank == 0 else None
        dist.barrier()
        return scores
    finally:
        dist.destroy_process_group()


def read_scores(save_dir: str | os.PathLike[str]) -> np.ndarray:
    """Open a finished store as the workflow does and read its scores."""
    _traker(save_dir)
    return np.load(Path(save_dir) / "experiments" / "val" / "scores.npy")


def limited(limit_bytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` with files limited to ``limit_bytes`` (RLIMIT_FSIZE).

    SIGXFSZ is ignored, so a write past the limit fails with EFBIG, as on a
    full disk, instead of the signal ending the process.
    """
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return fn(*args)


def unprivileged(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` as user and group ``nobody`` when this process is root.

    Raises:
        NotImplementedError: Root cannot give up its user id here.
    """
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except PermissionError as error:
            raise NotImplementedError(f"cannot become user nobody: {error}") from error
    return fn(*args)


# -- what a store holds -------------------------------------------------------


def files(store: Path) -> dict[str, bytes]:
    """Every regular file of a store but its (empty) lock files, by path."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(Path(store).rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def temporaries(store: Path) -> list[str]:
    """Temporary files and folders left in a store."""
    return [str(p) for p in Path(store).rglob("*") if ".tmp-" in p.name]


def assert_readable(store: Path) -> None:
    """Every JSON and .npy file of a store (temporaries aside) is whole."""
    for path in Path(store).rglob("*"):
        if ".tmp-" in str(path) or not path.is_file():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npy":
            np.load(path)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 1e-6 of each value and of the largest one (float32 rounding)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * scale)


# -- child processes -----------------------------------------------------------


@dataclass
class Outcome:
    """How a child ended: its exit code, and what it returned or raised."""

    exitcode: int | None
    value: Any = None
    error: dict | None = None


def context() -> multiprocessing.context.ForkServerContext:
    """A fork server that imported torch and kerntrace once, shared by the tests."""
    ctx = multiprocessing.get_context("forkserver")
    # Python 3.11 does not pass sys.path to the server, so name installed modules.
    ctx.set_forkserver_preload(["torch", "numpy", "kerntrace", "store_worker"])
    return ctx


def _child(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        message: tuple = ("value", fn(*args, **kwargs))
    except BaseException as error:  # reported to the parent, which asserts on it
        message = (
            "error",
            {
                "types": [cls.__name__ for cls in type(error).__mro__],
                "message": str(error),
                "errno": getattr(error, "errno", None),
                "filename": getattr(error, "filename", None),
            },
        )
    conn.send(message)
    conn.close()


def start(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Start ``fn(*args, **kwargs)`` in a child; returns (process, connection)."""
    ctx = context()
    receiver, sender = ctx.Pipe(duplex=False)
    # A daemon: if a test fails while a child waits, pytest ends it on exit.
    process = ctx.Process(target=_child, args=(sender, fn, args, kwargs), daemon=True)
    process.start()
    sender.close()
    return process, receiver


def finish(process: Any, receiver: Any, timeout: float = 120.0) -> Outcome:
    """Wait for a child from ``start`` and collect its outcome."""
    message = None
    try:
        if receiver.poll(timeout):
            message = receiver.recv()
    except EOFError:
        message = None
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"child {process.pid} did not end within {timeout} s")
    if message is None:
        return Outcome(process.exitcode)
    kind, payload = message
    if kind == "value":
        return Outcome(process.exitcode, value=payload)
    return Outcome(process.exitcode, error=payload)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """Run ``fn(*args, **kwargs)`` in a child process and wait for it."""
    return finish(*start(fn, *args, **kwargs))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], kill=os.environ.get(KILL_ENV), progress=True)
