"""The save directory: every array TRAK computes, on disk, resumable.

Layout of a store (``n`` train examples, ``k`` features, ``T`` targets)::

    store.json                           settings every result depends on
    models/<id>/checkpoint.json          fingerprint of checkpoint <id>
    models/<id>/features.npy             (n, k) projected train gradients
    models/<id>/out_to_loss.npy          (n,) float32, Q of each train example
    models/<id>/done.npy                 (n,) uint8, 1 once a row is written
    models/<id>/shards/<a>-<b>/...       the same three for rows a..b-1, written
                                         by one of several processes
    models/<id>/claims/<a>-<b>.json      the live process writing rows a..b-1
    models/<id>/kernel.json              damping and solve of checkpoint <id>
    models/<id>/cholesky.npy             (k, k) float64 factor of the kernel
    self_scores.npy                      (n,) float64 self-influence
    self_scores.json                     which model ids it averages
    experiments/<name>/experiment.json   number of targets
    experiments/<name>/models/<id>/...   target features and progress
    experiments/<name>/scores.npy        (n, T) float32 scores
    experiments/<name>/scores.json       which model ids the scores average

Arrays are ``.npy`` files opened as memmaps, readable with ``numpy.load``.
Every file appears whole or not at all (see ``files``), and a failed write
raises ``StoreWriteError``, keeping what the store held. A row's ``done``
flag is set only after the row's features and weights are written and
flushed, so a run killed at any moment resumes from its finished rows. Train
rows are flushed at most once per ``TRAIN_FLUSH_SECONDS`` (and when a
writer's rows are complete or it is released), so a killed process loses
at most that much work.

Several processes may featurize one checkpoint, each its own rows: each
claims its rows first (see ``claims``), and an overlap with a live
process's claim is refused. A process writing all n rows writes the
checkpoint's own arrays; one writing rows a..b-1 writes a shard of its own,
which ``gather`` merges once written, so no two processes write one file.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from .claims import Claim, lock, process_start, remove_dead_temporaries
from .errors import (
    ConfigurationError,
    StoreBusyError,
    StoreCorruptError,
    StoreMismatchError,
    StoreWriteError,
)
from .files import (
    HOST,
    new_array,
    open_array,
    read_json,
    save_array,
    temp_path,
    unlink_quietly,
    write_json,
    writing,
)

__all__ = [
    "Store",
    "RowArrays",
    "TrainWriter",
    "write_json",
    "read_json",
    "save_array",
    "open_array",
    "new_array",
    "format_rows",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_MERGE_ROWS = 4096


def format_rows(rows: np.ndarray, *, limit: int = 6) -> str:
    """Row indices as sorted ranges, e.g. ``"3..9, 12, 20..31"``."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    spans = [(int(part[0]), int(part[-1])) for part in np.split(rows, breaks)]
    text = [f"{a}..{b}" if b > a else f"{a}" for a, b in spans[:limit]]
    more = f" and {len(spans) - limit} more ranges" if len(spans) > limit else ""
    return ", ".join(text) + more


# Train rows are flushed to disk at most once per this many seconds (and
# whenever the last missing row, or the writer's whole range, is written):
# each flush is an msync of the features and the weights, 1-2 ms on this
# project's machines, as much as a whole batch's per-example work on a small
# model. Rows written since the last flush are not marked done yet, so a
# process killed in between computes at most this much work again.
TRAIN_FLUSH_SECONDS = 1.0


@dataclass
class RowArrays:
    """Arrays written row by row, with a per-row progress flag.

    Attributes:
        features: Shape (rows, k).
        done: Shape (rows,), uint8; 1 where the row is final.
        weights: Shape (rows,), float32 out-to-loss weights; ``None`` for
            targets.
    """

    features: np.ndarray
    done: np.ndarray
    weights: np.ndarray | None = None
    _remaining: int | None = field(default=None, init=False, repr=False)
    _unflagged: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _flushed_at: float = field(default=-math.inf, init=False, repr=False)

    def write(
        self,
        rows: np.ndarray,
        features: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        within: float = 0.0,
    ) -> None:
        """Write rows, then flush them and mark them done, now or later.

        The flags are set only once the rows they mark are on disk, so no
        crash, even of the machine, leaves a row marked done but unwritten.
        With ``within`` > 0 the flush waits for a later ``write`` that comes
        at least ``within`` seconds after the previous flush, or for
        ``sync``; it happens at once when no row is missing any more.
        The flags are flushed when the last missing row is written; before
        that a killed process leaves them in the page cache, where the next
        reader finds them and from where the system writes them out. Only a
        crash of the machine can lose a flag, and the row is then computed
        again.

        Raises:
            StoreWriteError: The rows cannot be flushed to disk; they stay
                marked as not done.
        """
        rows = np.asarray(rows)
        self.features[rows] = features
        if self.weights is not None:
            self.weights[rows] = weights
        if self._remaining is None:
            self._remaining = int(np.count_nonzero(self.done == 0))
        self._remaining -= int(np.count_nonzero(self.done[rows] == 0))
        self._unflagged.append(rows)
        due = time.monotonic() - self._flushed_at >= within
        if due or self._remaining <= 0:
            self.sync()

    def sync(self) -> None:
        """Flush the rows written so far and mark them done.

        Raises:
            StoreWriteError: The rows cannot be flushed; they stay not done.
        """
        if not self._unflagged:
            return
        rows, self._unflagged = np.unique(np.concatenate(self._unflagged)), []
        try:
            for array in (self.features, self.weights):
                if isinstance(array, np.memmap):
                    with writing(Path(array.filename)):
                        array.flush()
        except BaseException:
            # The rows stay missing, to be written again.
            self._remaining += int(np.count_nonzero(self.done[rows] == 0))
            raise
        self._flushed_at = time.monotonic()
        self.done[rows] = 1
        if self._remaining <= 0 and isinstance(self.done, np.memmap):
            with writing(Path(self.done.filename)):
                self.done.flush()

    def missing(self) -> np.ndarray:
        """Indices of the rows not yet written (flushing pending ones first)."""
        self.sync()
        return np.flatnonzero(self.done == 0)


class TrainWriter:
    """Writes train rows ``start..stop-1`` of one checkpoint, holding a claim.

    Made by ``Store.writer``. ``pending`` leaves out rows outside the range
    and rows already written, by this or any earlier writer. The claim is
    released once every row of the range is written, or by ``release``; a
    later ``write`` claims the rows again.

    A ``write`` hands the rows to a background thread and returns: copying
    them into the memory-mapped files and flushing them then overlaps with
    the computation of the next batch. The next ``write``, ``sync`` or
    ``release`` waits for it first and raises its error, if any, naming its
    rows, which stay missing; ``write`` hands on its own rows before raising
    it.
    """

    def __init__(
        self, store: Store, model_id: int, start: int, stop: int, done: np.ndarray
    ) -> None:
        self.store, self.model_id = store, model_id
        self.start, self.stop = start, stop
        self.arrays: RowArrays | None = None
        self._done = done
        self._claim: Path | None = None
        self._inflight: tuple[np.ndarray, Future[None]] | None = None
        _LIVE_WRITERS.add(self)

    def __del__(self) -> None:
        # A writer dropped without release still marks the rows it flushes;
        # if that fails they are left not done and computed again.
        try:
            self.sync()
        except Exception:  # noqa: BLE001 - nothing can be raised from here
            pass

    def pending(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``rows`` of the rows this writer still has to write."""
        positions = np.flatnonzero((rows >= self.start) & (rows < self.stop))
        return positions[~self._done[rows[positions] - self.start]]

    def ensure_claim(self) -> None:
        """Claim the rows unless this writer holds them (see ``claim``)."""
        if self._claim is None:
            self.claim()

    def claim(self) -> None:
        """Claim the rows, and open the arrays they are written to.

        Raises:
            StoreBusyError: A live process of this or another host holds
                some of the rows; the message names it.
        """
        store, model_id, start, stop = self.store, self.model_id, self.start, self.stop
        with store.model_lock(model_id):
            clash = [
                claim
                for claim in store.claims(model_id)
                if claim.overlaps(start, stop) and not claim.mine()
            ]
            if clash:
                raise StoreBusyError(
                    f"model id {model_id} in {str(store.path)!r}: rows {start}.."
                    f"{stop - 1} cannot be featurized here, another process is "
                    f"writing {'; '.join(c.describe() for c in clash)}. Give each "
                    "process disjoint rows (kerntrace.shard, or TRAKer(rank=, "
                    "world_size=)) or wait for that process to finish; if it no "
                    "longer runs, delete its claim file"
                )
            self._done = store.done_mask(model_id, start, stop)
            if (start, stop) == (0, store.n):
                self.arrays = store.train_rows(model_id)
            else:
                folder = store.model_dir(model_id) / "shards" / f"{start}-{stop}"
                self.arrays = store.row_arrays(folder, stop - start, writable=True)
            path = store.model_dir(model_id) / "claims" / f"{start}-{stop}.json"
            write_json(
                path,
                {
                    "rows": [start, stop],
                    "pid": os.getpid(),
                    "host": HOST,
                    "process_start": process_start(os.getpid()),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
            self._claim = path

    def write(
        self, rows: np.ndarray, features: np.ndarray, weights: np.ndarray
    ) -> None:
        """Write rows that ``pending`` gave; release the claim when all are."""
        if self._claim is None:
            self.claim()
        earlier = self._collect()
        local = rows - self.start
        try:
            job = _background().submit(
                self.arrays.write, local, features, weights, within=TRAIN_FLUSH_SECONDS
            )
        except RuntimeError:  # the interpreter is shutting down: write here
            job = Future()
            job.set_result(
                self.arrays.write(local, features, weights, within=TRAIN_FLUSH_SECONDS)
            )
        self._inflight = (local, job)
        self._done[local] = True
        if earlier is not None:
            raise earlier
        if self._done.all():
            self.release()

    def wait(self) -> None:
        """Wait for the write in the background, if any.

        Raises:
            StoreWriteError: It failed; its rows are again to be written.
        """
        earlier = self._collect()
        if earlier is not None:
            raise earlier

    def _collect(self) -> StoreWriteError | None:
        """Wait for the background write; its error, its rows marked missing."""
        if self._inflight is None:
            return None
        (local, job), self._inflight = self._inflight, None
        try:
            job.result()
        except StoreWriteError as error:
            self._done[local] = False
            missing = format_rows(local + self.start)
            failure = StoreWriteError(
                error.errno,
                f"train rows {missing} of model id {self.model_id} were not written "
                f"and are missing (a later featurize or a rerun computes them): "
                f"{error.strerror}",
            )
            failure.filename = error.filename
            return failure
        except BaseException:
            self._done[local] = False
            raise
        return None

    def sync(self) -> None:
        """Flush the rows written so far and mark them done (see ``RowArrays``)."""
        self.wait()
        if self.arrays is not None:
            self.arrays.sync()

    def release(self) -> None:
        """Flush the rows written, then give up the claim.

        Other processes may then write the rows still missing.
        """
        self.sync()
        if self._claim is not None:
            claim = Claim.read(self._claim)
            if claim is not None and claim.mine():
                unlink_quietly(self._claim)
        self._claim = None
        self.arrays = None


_LIVE_WRITERS: weakref.WeakSet[TrainWriter] = weakref.WeakSet()
_BACKGROUND: ThreadPoolExecutor | None = None
_BACKGROUND_PID: int | None = None


def _background() -> ThreadPoolExecutor:
    """The one thread that copies and flushes train rows (a new one after fork)."""
    global _BACKGROUND, _BACKGROUND_PID
    if _BACKGROUND is None or _BACKGROUND_PID != os.getpid():
        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="kerntrace-rows")
        _BACKGROUND_PID = os.getpid()
    return _BACKGROUND


@atexit.register
def _sync_live_writers() -> None:
    """At interpreter exit, flush and mark the rows of writers still open."""
    for writer in list(_LIVE_WRITERS):
        try:
            writer.sync()
        except Exception as error:  # noqa: BLE001 - exiting; report, go on
            logger.warning(
                "rows of model id %d could not be flushed at exit (%s); they "
                "will be computed again",
                writer.model_id,
                error,
            )


def _difference(key: str, stored: Any, given: Any) -> str:
    if isinstance(stored, list) and isinstance(given, list):
        only_stored = [v for v in stored if v not in given][:5]
        only_given = [v for v in given if v not in stored][:5]
        return (
            f"{key}: only the store has {only_stored}, only this run has {only_given}"
        )
    return f"{key}: the store has {stored!r}, this run has {given!r}"


def check_name(name: str, what: str) -> str:
    """Refuse names that are unsafe as a directory name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{what} {name!r} is not a valid name; use 1 to 128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


class Store:
    """A save directory bound to one set of settings.

    Opening it deletes the temporary files that processes of this host left
    when they died.

    Args:
        path: The directory; created if absent.
        settings: JSON-serializable settings every result depends on. If the
            directory already holds a store, they must match it exactly.

    Raises:
        StoreMismatchError: The directory holds results made with other
            settings; the message names each setting that differs.
        StoreCorruptError: ``store.json`` is not valid JSON, or is missing
            from a directory that holds results.
        StoreWriteError: The directory is new and cannot be created or
            written.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = {"format_version": FORMAT_VERSION, **settings}
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._open: dict[tuple, RowArrays] = {}
        removed = remove_dead_temporaries(self.path)
        if removed:
            logger.info(
                "removed %d temporary file(s) of interrupted runs from %s",
                len(removed),
                self.path,
            )
        recorded = self._recorded_settings()
        if recorded is None:
            with lock(self.path / ".lock"):
                recorded = self._recorded_settings()
                if recorded is None:
                    self._refuse_orphaned_results()
                    write_json(self.path / "store.json", self.settings)
                    logger.info("created store %s", self.path)
                    return
        differ = [
            _difference(key, recorded.get(key), self.settings.get(key))
            for key in sorted(set(recorded) | set(self.settings))
            if recorded.get(key) != self.settings.get(key)
        ]
        if differ:
            raise StoreMismatchError(
                f"save_dir {str(self.path)!r} holds results made with other "
                f"settings ({'; '.join(differ)}); use a new save_dir, or the "
                "settings the store was made with"
            )
        logger.info("opened store %s", self.path)

    def _recorded_settings(self) -> dict[str, Any] | None:
        """The settings in ``store.json``; ``None`` if it is absent."""
        try:
            return read_json(self.path / "store.json")
        except StoreCorruptError as error:
            raise StoreCorruptError(
                f"{self.path / 'store.json'} is not valid JSON, so the settings "
                f"the results in {str(self.path)!r} were made with are unknown; "
                "delete the whole directory or use a new save_dir (or restore "
                "store.json from a backup)"
            ) from error

    def _refuse_orphaned_results(self) -> None:
        """Refuse a directory with results but no ``store.json``."""
        found = [
            f"{name}/"
            for name in ("models", "experiments")
            if (self.path / name).is_dir() and any((self.path / name).iterdir())
        ]
        if found:
            raise StoreCorruptError(
                f"save_dir {str(self.path)!r} holds results ({', '.join(found)}) "
                "but no store.json, so the settings they were made with are "
                "unknown and cannot be checked against these; delete the whole "
                "directory or use a new save_dir"
            )

    @property
    def n(self) -> int:
        """Number of train examples."""
        return int(self.settings["train_set_size"])

    @property
    def k(self) -> int:
        """Number of features per example."""
        return int(self.settings["proj_dim"])

    @property
    def feature_dtype(self) -> np.dtype:
        """The dtype features are stored in."""
        return np.dtype(self.settings["feature_dtype"])

    def model_dir(self, model_id: int) -> Path:
        """The directory of checkpoint ``model_id``."""
        return self.path / "models" / str(int(model_id))

    def experiment_dir(self, exp_name: str) -> Path:
        """The directory of experiment ``exp_name``."""
        return self.path / "experiments" / check_name(exp_name, "exp_name")

    def model_ids(self) -> list[int]:
        """Model ids with train features (or shards of them) on disk, sorted."""
        root = self.path / "models"
        if not root.exists():
            return []
        ids = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
        return sorted(
            i for i in ids if (root / str(i) / "done.npy").exists() or self._shards(i)
        )

    def row_arrays(self, folder: Path, rows: int, *, writable: bool) -> RowArrays:
        """The features, weights and progress of ``rows`` train rows in ``folder``."""
        # ``done`` comes last: a folder without it holds no finished row.
        features = open_array(
            folder / "features.npy",
            (rows, self.k),
            self.feature_dtype,
            writable=writable,
        )
        weights = open_array(
            folder / "out_to_loss.npy", (rows,), "float32", writable=writable
        )
        done = open_array(folder / "done.npy", (rows,), "uint8", writable=writable)
        return RowArrays(features=features, done=done, weights=weights)

    def train_rows(self, model_id: int, *, writable: bool = True) -> RowArrays:
        """The train features, weights and progress of one checkpoint."""
        key = ("train", model_id, writable)
        if key not in self._open:
            self._open[key] = self.row_arrays(
                self.model_dir(model_id), self.n, writable=writable
            )
        return self._open[key]

    def target_rows(
        self, exp_name: str, model_id: int, num_targets: int, *, writable: bool = True
    ) -> RowArrays:
        """The target features and progress of one experiment and checkpoint."""
        key = ("target", exp_name, model_id, num_targets, writable)
        if key not in self._open:
            folder = self.experiment_dir(exp_name) / "models" / str(int(model_id))
            features = open_array(
                folder / "features.npy",
                (num_targets, self.k),
                self.feature_dtype,
                writable=writable,
            )
            done = open_array(
                folder / "done.npy", (num_targets,), "uint8", writable=writable
            )
            self._open[key] = RowArrays(features=features, done=done)
        return self._open[key]

    def forget(self, *prefix: object) -> None:
        """Drop cached memmaps whose key starts with ``prefix``."""
        for key in [k for k in self._open if k[: len(prefix)] == prefix]:
            del self._open[key]

    def read(self, relative: str) -> dict[str, Any] | None:
        """Read a JSON file of the store by its path inside it."""
        return read_json(self.path / relative)

    def write(self, relative: str, payload: dict[str, Any]) -> None:
        """Write a JSON file of the store atomically."""
        write_json(self.path / relative, payload)

    def remove(self, relative: str) -> None:
        """Delete a file of the store if present."""
        path = self.path / relative
        with writing(path):
            path.unlink(missing_ok=True)

    # -- several writers --------------------------------------------------

    def model_lock(self, model_id: int) -> FileLock:
        """The lock, across processes, on the claims and shards of one checkpoint.

        It is re-entrant within a thread, and released by the kernel if its
        holder dies.
        """
        return lock(self.model_dir(model_id) / ".lock")

    def _shards(self, model_id: int) -> list[tuple[int, int, Path]]:
        root = self.model_dir(model_id) / "shards"
        if not root.is_dir():
            return []
        shards = []
        for folder in root.iterdir():
            match = _RANGE.match(folder.name)
            if match and folder.is_dir():
                shards.append((int(match[1]), int(match[2]), folder))
        return sorted(shards)

    def claims(self, model_id: int) -> list[Claim]:
        """Live claims on the rows of ``model_id``; dead writers' are deleted.

        Call it holding ``model_lock(model_id)``.
        """
        root = self.model_dir(model_id) / "claims"
        if not root.is_dir():
            return []
        live = []
        for path in sorted(root.glob("*.json")):
            if not _RANGE.match(path.stem):
                continue
            claim = Claim.read(path)
            if claim is not None and claim.alive():
                live.append(claim)
                continue
            if claim is not None:
                logger.info(
                    "model id %d: deleted the claim on rows %d..%d of pid %d, "
                    "which no longer runs",
                    model_id,
                    claim.start,
                    claim.stop - 1,
                    claim.pid,
                )
            unlink_quietly(path)
        return live

    def done_mask(self, model_id: int, start: int, stop: int) -> np.ndarray:
        """Which of rows ``start..stop-1`` are written, in a shard or not.

        Returns:
            Shape (stop - start,), bool.
        """
        mask = np.zeros(stop - start, dtype=bool)
        folder = self.model_dir(model_id)
        if (folder / "done.npy").exists():
            done = open_array(folder / "done.npy", (self.n,), "uint8", writable=False)
            mask |= done[start:stop].astype(bool)
        for a, b, shard in self._shards(model_id):
            low, high = max(a, start), min(b, stop)
            if low >= high or not (shard / "done.npy").exists():
                continue
            done = open_array(shard / "done.npy", (b - a,), "uint8", writable=False)
            mask[low - start : high - start] |= done[low - a : high - a].astype(bool)
        return mask

    def rows_done(self, model_id: int) -> int:
        """How many train rows of ``model_id`` are written."""
        return int(self.done_mask(model_id, 0, self.n).sum())

    def writer(self, model_id: int, start: int, stop: int) -> TrainWriter:
        """A writer of train rows ``start..stop-1`` of ``model_id``.

        It claims the rows unless every one is written already.

        Raises:
            StoreBusyError: A live process holds some of these rows.
        """
        with self.model_lock(model_id):
            done = self.done_mask(model_id, start, stop)
            writer = TrainWriter(self, model_id, start, stop, done)
            if not done.all():
                writer.claim()
            return writer

    def gather(self, model_id: int) -> tuple[RowArrays, list[Claim]]:
        """Merge the written shards of ``model_id`` into its own arrays.

        Shards that a live process (this one included) still writes are left
        alone, and their claims returned.

        Returns:
            The checkpoint's arrays (``train_rows``), and the claims of live
            writers that have rows left to write.
        """
        for writer in list(_LIVE_WRITERS):
            if writer.model_id == model_id and writer.store.path == self.path:
                writer.sync()
        with self.model_lock(model_id):
            claims = self.claims(model_id)
            busy = [
                c for c in claims if not self.done_mask(model_id, c.start, c.stop).all()
            ]
            for claim in claims:
                if claim not in busy:
                    unlink_quietly(claim.path)
            main = self.train_rows(model_id)
            for start, stop, folder in self._shards(model_id):
                if any(c.overlaps(start, stop) for c in busy):
                    continue
                self._merge(main, start, stop, folder)
                trash = temp_path(folder)
                with writing(folder):
                    folder.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            return main, busy

    def _merge(self, main: RowArrays, start: int, stop: int, folder: Path) -> None:
        if not (folder / "done.npy").exists():
            return
        shard = self.row_arrays(folder, stop - start, writable=False)
        fresh = np.flatnonzero((shard.done == 1) & (main.done[start:stop] == 0))
        for first in range(0, fresh.size, _MERGE_ROWS):
            local = fresh[first : first + _MERGE_ROWS]
            main.write(local + start, shard.features[local], shard.weights[local])
        if fresh.size:
            logger.info(
                "merged %d rows of shard %d..%d into %s",
                fresh.size,
                start,
                stop - 1,
                folder.parent.parent,
            )
