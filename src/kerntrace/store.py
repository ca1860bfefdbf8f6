"""The save directory: every array TRAK computes, on disk, resumable.

Layout of a store (``n`` train examples, ``k`` features, ``T`` targets)::

    store.json                           settings every result depends on
    models/<id>/checkpoint.json          fingerprint of checkpoint <id>
    models/<id>/features.npy             (n, k) projected train gradients
    models/<id>/out_to_loss.npy          (n,) float32, Q of each train example
    models/<id>/done.npy                 (n,) uint8, 1 once a row is written
    models/<id>/kernel.json              damping and solve of checkpoint <id>
    models/<id>/cholesky.npy             (k, k) float64 factor of the kernel
    self_scores.npy                      (n,) float64 self-influence
    self_scores.json                     which model ids it averages
    experiments/<name>/experiment.json   number of targets
    experiments/<name>/models/<id>/...   target features and progress
    experiments/<name>/scores.npy        (n, T) float32 scores
    experiments/<name>/scores.json       which model ids the scores average

Arrays are ``.npy`` files opened as memmaps, readable with ``numpy.load``.
JSON is written to a temporary file and moved into place, so a reader sees
the old or the new version, never half of one. A row's ``done`` flag is set
only after the row itself is written, so a run killed at any moment resumes
from its finished rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigurationError, StoreCorruptError, StoreMismatchError

__all__ = [
    "Store",
    "RowArrays",
    "write_json",
    "read_json",
    "save_array",
    "open_array",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON file written by ``write_json``; ``None`` if it is absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StoreCorruptError(
            f"{path} is not valid JSON ({error}); it was not written by this "
            "version of kerntrace, or was edited by hand; delete it to redo "
            "the step that wrote it"
        ) from error


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    array.flush()
    del array
    os.replace(tmp, path)


def open_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | str, *, writable: bool
) -> np.memmap:
    """Open a ``.npy`` memmap, creating it (zeros) if writable and absent.

    Raises:
        StoreCorruptError: The file exists with another shape or dtype, or
            cannot be read as ``.npy``.
        FileNotFoundError: It is absent and ``writable`` is false.
    """
    dtype = np.dtype(dtype)
    if not path.exists():
        if not writable:
            raise FileNotFoundError(path)
        _create_array(path, shape, dtype)
    try:
        array = np.load(path, mmap_mode="r+" if writable else "r")
    except (ValueError, OSError) as error:
        raise StoreCorruptError(
            f"{path} cannot be read as a .npy array ({error}); delete it and "
            "rerun the step that wrote it"
        ) from error
    if array.shape != shape or array.dtype != dtype:
        raise StoreCorruptError(
            f"{path} holds an array of shape {array.shape} and dtype "
            f"{array.dtype}, expected {shape} and {dtype}; it belongs to another "
            "run: use a new save_dir"
        )
    return array


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

    def write(self, rows: np.ndarray, features: np.ndarray, weights=None) -> None:
        """Write rows, flush them to disk, then mark them done.

        The flags are set only once the rows they mark are on disk, so no
        crash, even of the machine, leaves a row marked done but unwritten.
        The flags are flushed when the last missing row is written; before
        that a killed process leaves them in the page cache, where the next
        reader finds them and from where the system writes them out. Only a
        crash of the machine can lose a flag, and the row is then computed
        again.
        """
        self.features[rows] = features
        if self.weights is not None:
            self.weights[rows] = weights
        for array in (self.features, self.weights):
            if isinstance(array, np.memmap):
                array.flush()
        if self._remaining is None:
            self._remaining = int(np.count_nonzero(self.done == 0))
        self._remaining -= int(np.count_nonzero(self.done[rows] == 0))
        self.done[rows] = 1
        if self._remaining <= 0 and isinstance(self.done, np.memmap):
            self.done.flush()

    def missing(self) -> np.ndarray:
        """Indices of the rows not yet written."""
        return np.flatnonzero(self.done == 0)


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

    Args:
        path: The directory; created if absent.
        settings: JSON-serializable settings every result depends on. If the
            directory already holds a store, they must match it exactly.

    Raises:
        StoreMismatchError: The directory holds results made with other
            settings; the message names each setting that differs.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = {"format_version": FORMAT_VERSION, **settings}
        self.path.mkdir(parents=True, exist_ok=True)
        self._open: dict[tuple, RowArrays] = {}
        recorded = read_json(self.path / "store.json")
        if recorded is None:
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
        """Model ids that have train features on disk, sorted."""
        root = self.path / "models"
        if not root.exists():
            return []
        ids = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
        return sorted(i for i in ids if (root / str(i) / "done.npy").exists())

    def train_rows(self, model_id: int, *, writable: bool = True) -> RowArrays:
        """The train features, weights and progress of one checkpoint."""
        key = ("train", model_id, writable)
        if key not in self._open:
            folder = self.model_dir(model_id)
            self._open[key] = RowArrays(
                features=open_array(
                    folder / "features.npy",
                    (self.n, self.k),
                    self.feature_dtype,
                    writable=writable,
                ),
                weights=open_array(
                    folder / "out_to_loss.npy", (self.n,), "float32", writable=writable
                ),
                done=open_array(
                    folder / "done.npy", (self.n,), "uint8", writable=writable
                ),
            )
        return self._open[key]

    def target_rows(
        self, exp_name: str, model_id: int, num_targets: int, *, writable: bool = True
    ) -> RowArrays:
        """The target features and progress of one experiment and checkpoint."""
        key = ("target", exp_name, model_id, num_targets, writable)
        if key not in self._open:
            folder = self.experiment_dir(exp_name) / "models" / str(int(model_id))
            self._open[key] = RowArrays(
                features=open_array(
                    folder / "features.npy",
                    (num_targets, self.k),
                    self.feature_dtype,
                    writable=writable,
                ),
                done=open_array(
                    folder / "done.npy", (num_targets,), "uint8", writable=writable
                ),
            )
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
        (self.path / relative).unlink(missing_ok=True)


def save_array(path: Path, array: np.ndarray) -> None:
    """Save a ``.npy`` file atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
