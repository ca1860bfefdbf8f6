"""Keeping freed memory in the C heap between the batches of featurization.

Every batch allocates and frees the same few dozen activation buffers, each
of a few MiB. glibc's malloc serves blocks above its mmap threshold (128 KiB
at first) from fresh pages and hands them back to the kernel when they are
freed, so the next batch faults every page in again: about 2,800 page faults
and a quarter of the time of a SmallCNN batch of 100 on this project's CPU.
``keep_freed_blocks`` raises the thresholds, once per process, to the
values glibc's own adaptive rule ends at (an mmap threshold of 32 MiB on
64-bit machines and a trim threshold twice that), so freed blocks stay in
the heap and are reused. It changes nothing but where malloc takes memory
from; peak memory stays what the batch needs.

Set ``KERNTRACE_KEEP_HEAP=0`` to leave malloc as it is. Other C libraries
than glibc are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["keep_freed_blocks"]

logger = logging.getLogger(__name__)

# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's ceiling for the adaptive mmap threshold (HEAP_MAX_SIZE / 2 on
# 64-bit), and the trim threshold that rule pairs with it.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
OPT_OUT = "KERNTRACE_KEEP_HEAP"

_state: dict[str, bool] = {}


def keep_freed_blocks() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB for reuse; once per process.

    Returns:
        Whether malloc now keeps them: False when ``KERNTRACE_KEEP_HEAP=0``,
        when the C library is not glibc, or when glibc refused a value.
    """
    if "kept" in _state:
        return _state["kept"]
    _state["kept"] = False
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        logger.info("%s=0: malloc's thresholds left as they are", OPT_OUT)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return False
    _state["kept"] = True
    logger.info(
        "glibc malloc keeps freed blocks of up to 32 MiB for the next batch "
        "(mmap threshold 32 MiB, trim threshold 64 MiB, the values of its own "
        "adaptive rule), so batches do not fault their pages in again; "
        "set %s=0 to leave malloc alone",
        OPT_OUT,
    )
    return True
