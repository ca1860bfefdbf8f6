"""Files of a store that appear whole or not at all, and write errors that help.

Every file is written under a temporary name in its own folder,
``.<name>.tmp-<host>-<pid>-<token>``, flushed to disk and then renamed into
place, so a reader (or a run resumed after a crash) sees the old file or the
new one, never part of one. Temporary files of processes that died are
removed by ``claims.remove_dead_temporaries`` when the store is next opened.

A new array's disk space is reserved when it is created: a memmap write into
a sparse file on a full disk kills the process with SIGBUS, whereas a
reservation that fails raises an error at once. Each ``OSError`` met while
writing becomes a ``StoreWriteError`` that names the path, the cause and
what to do, and leaves what the store held before as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import KerntraceError, StoreCorruptError, StoreWriteError

__all__ = [
    "HOST",
    "TEMPORARY",
    "format_bytes",
    "writing",
    "write_json",
    "read_json",
    "save_array",
    "open_array",
    "new_array",
    "unlink_quietly",
    "temp_path",
]

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
"""This host's name as it appears in temporary and claim files."""

TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
"""The name of a temporary file, with the host and pid of its writer."""

_ADVICE = {
    errno.ENOSPC: "the file system is full: free space on it or choose another "
    "save_dir",
    errno.EDQUOT: "the disk quota is used up: free space or choose another save_dir",
    errno.EFBIG: "the file would pass the file size limit (ulimit -f, or the file "
    "system's largest file): raise the limit or choose another save_dir",
    errno.EROFS: "the file system is mounted read-only: remount it read-write or "
    "choose another save_dir",
    errno.EACCES: "this user may not write there: make the directory writable "
    "(chmod, chown) or choose another save_dir",
    errno.EPERM: "this user may not write there: make the directory writable "
    "(chmod, chown) or choose another save_dir",
}


def _write_error(path: Path, error: OSError) -> StoreWriteError:
    """A ``StoreWriteError`` that names the path, the cause and what to do."""
    name = errno.errorcode.get(error.errno, "") if error.errno else ""
    cause = error.strerror or str(error)
    advice = _ADVICE.get(error.errno, "check the save_dir's file system")
    message = (
        f"cannot write {path}: {cause}{f' ({name})' if name else ''}; {advice}, "
        "then rerun: what the store already holds is kept and the run resumes "
        "from it"
    )
    failure = StoreWriteError(error.errno, message)
    failure.filename = str(path)
    return failure


def format_bytes(size: float) -> str:
    """``size`` bytes in the largest unit of B, KiB, MiB, GiB, TiB it reaches."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a ``StoreWriteError``."""
    try:
        yield
    except KerntraceError:
        raise
    except OSError as error:
        raise _write_error(path, error) from error


def temp_path(path: Path) -> Path:
    """A sibling name for ``path`` that only this process uses."""
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{token}")


def _open_new(path: Path) -> BinaryIO:
    """Create ``path`` for writing; every new file of the store starts here."""
    return open(path, "xb")


def unlink_quietly(path: Path) -> None:
    """Delete a file if present; a failure to do so is ignored."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; skipped where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write a file under a temporary name, fsync it, then move it into place."""
    tmp = temp_path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _open_new(tmp) as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            unlink_quietly(tmp)
            raise
        _fsync_dir(path.parent)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file, fsync, then ``os.replace``.

    Raises:
        StoreWriteError: The file cannot be written; the old one, if any, is
            left as it was.
    """
    text = json.dumps(payload, indent=2, sort_keys=True).encode()
    _atomic_write(path, lambda handle: handle.write(text))


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


def save_array(path: Path, array: np.ndarray) -> None:
    """Save a ``.npy`` file atomically (temporary file, then ``os.replace``).

    Raises:
        StoreWriteError: The file cannot be written; the old one, if any, is
            left as it was.
    """
    _atomic_write(path, lambda handle: _write_npy(handle, array))


def _write_npy(handle: BinaryIO, array: np.ndarray) -> None:
    """Write ``array`` in ``.npy`` format through ``handle``.

    Unlike ``numpy.save``, whose ``tofile`` can stop short without raising
    when the file system refuses a write (EFBIG, ENOSPC), every byte goes
    through Python's file object, which raises.
    """
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    header = np.lib.format.header_data_from_array_1_0(array)
    np.lib.format.write_array_header_1_0(handle, header)
    handle.write(array.reshape(-1).view(np.uint8))


def _reserve(fd: int, size: int) -> None:
    """Allocate a file's blocks now, so a full disk fails here, not in a memmap.

    Writing through a memmap into a sparse file on a full disk kills the
    process with SIGBUS; reserving the space turns that into an ``OSError``
    at creation. File systems that cannot reserve keep the sparse file.
    """
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def _empty_array_file(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Create a ``.npy`` file of zeros at ``path``, its space reserved."""
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    with _open_new(path) as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        size = handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        handle.truncate(size)
        _reserve(handle.fileno(), size)
        handle.flush()
        os.fsync(handle.fileno())


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Create an array file of zeros, unless another process made it first."""
    tmp = temp_path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _empty_array_file(tmp, shape, dtype)
            try:
                # A hard link never replaces a file that appeared meanwhile,
                # which os.replace would, losing the rows written into it.
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if not path.exists():
                    os.replace(tmp, path)
        finally:
            unlink_quietly(tmp)
        _fsync_dir(path.parent)


def _check_length(path: Path) -> None:
    """Refuse a ``.npy`` file shorter or longer than its header announces.

    A writable memmap would silently extend a cut-off file with zeros, which
    would then pass for finished rows.

    Raises:
        StoreCorruptError: The length differs from the header's shape.
    """
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            expected = handle.tell() + int(np.prod(shape)) * dtype.itemsize
    except (ValueError, EOFError):
        return  # not .npy at all: np.load reports it below
    actual = path.stat().st_size
    if actual != expected:
        raise StoreCorruptError(
            f"{path} holds {actual} bytes but its header announces an array of "
            f"shape {shape} and dtype {dtype}, {expected} bytes: the file was cut "
            f"off or damaged; delete the folder {path.parent} and rerun the "
            "step that wrote it (featurize or score)"
        )


def open_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | str, *, writable: bool
) -> np.memmap:
    """Open a ``.npy`` memmap, creating it (zeros) if writable and absent.

    Raises:
        StoreCorruptError: The file exists with another shape or dtype, or
            cannot be read as ``.npy``.
        StoreWriteError: It is absent and cannot be created.
        FileNotFoundError: It is absent and ``writable`` is false.
    """
    dtype = np.dtype(dtype)
    if not path.exists():
        if not writable:
            raise FileNotFoundError(path)
        _create_array(path, shape, dtype)
    _check_length(path)
    try:
        array = np.load(path, mmap_mode="r+" if writable else "r")
    except (OSError, ValueError) as error:
        refused = getattr(error, "errno", None) in (
            errno.EACCES,
            errno.EPERM,
            errno.EROFS,
        )
        if writable and refused:
            raise _write_error(path, error) from error
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


@contextmanager
def new_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | str
) -> Iterator[np.memmap]:
    """A writable memmap of zeros that replaces ``path`` once the block exits.

    Until then ``path`` keeps its old content; if the block raises, or the
    process dies inside it, ``path`` is left as it was.

    Raises:
        StoreWriteError: The array cannot be created or moved into place.
    """
    dtype = np.dtype(dtype)
    tmp = temp_path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _empty_array_file(tmp, shape, dtype)
        array = open_array(tmp, shape, dtype, writable=True)
        yield array
        with writing(path):
            array.flush()
            del array
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        unlink_quietly(tmp)
