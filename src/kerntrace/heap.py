"""Keeping freed memory in the C heap between the batches of featurization.

Every batch allocates and frees the same few dozen activation buffers, each
of a few MiB. glibc's malloc serves blocks above its mmap threshold (128 KiB
at first) from fresh pages and hands them back to the kernel when they are
freed, so the next batch faults every page in again: about 2,800 page faults
and a quarter of the time of a SmallCNN batch of 100 on this project's CPU.

While a batch is featurized (``reusing_freed_blocks``), the mmap threshold
is 32 MiB, the ceiling of glibc's own adaptive rule on 64-bit machines, so
the batch's blocks come from the heap; the trim threshold is 64 MiB, so
what the batch frees stays there for the next one. Between batches the mmap
threshold is glibc's initial 128 KiB again, so the caller's own large
blocks still go back to the kernel when freed. ``release_freed_blocks``
(called when featurization is over, by ``TRAKer.finalize_features``) puts
the trim threshold back to 128 KiB and returns the heap's free pages to the
kernel. At most one batch's working set stays in the heap in between.

Set ``KERNTRACE_KEEP_HEAP=0`` to leave malloc as it is. Other C libraries
than glibc are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["release_freed_blocks", "reusing_freed_blocks"]

logger = logging.getLogger(__name__)

# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's initial thresholds, and the ceiling of its adaptive mmap threshold
# (HEAP_MAX_SIZE / 2 on 64-bit) with the trim threshold that rule pairs it with.
DEFAULT_THRESHOLD = 128 << 10
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
OPT_OUT = "KERNTRACE_KEEP_HEAP"

_state: dict[str, Any] = {}


def _library() -> Any | None:
    """glibc, once per process; None when it is not to be touched."""
    if "libc" in _state:
        return _state["libc"]
    _state["libc"] = None
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        logger.info("%s=0: malloc's thresholds left as they are", OPT_OUT)
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    _state["libc"] = libc
    logger.info(
        "while it featurizes a batch, glibc malloc keeps freed blocks of up to "
        "32 MiB for the next one (mmap threshold 32 MiB, trim threshold 64 MiB "
        "until finalize_features), so batches do not fault their pages in "
        "again; set %s=0 to leave malloc alone",
        OPT_OUT,
    )
    return libc


@contextmanager
def reusing_freed_blocks() -> Iterator[bool]:
    """Serve and keep a batch's blocks from the heap; yields whether it does."""
    libc = _library()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        yield False
        return
    _state["kept"] = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)


def release_freed_blocks() -> None:
    """Put the trim threshold back and return the heap's free pages."""
    libc = _state.get("libc")
    if libc is None or not _state.pop("kept", False):
        return
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
    libc.malloc_trim(0)
