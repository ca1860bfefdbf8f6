"""Which process writes which rows: claims, locks and what dead processes left.

A process that featurizes rows a..b-1 of a checkpoint first writes a claim,
``models/<id>/claims/<a>-<b>.json``, naming its host, pid and the time the
process started. Claims are made and checked under a lock file of the
checkpoint (``filelock``; the kernel releases it if its holder dies), so two
processes never both believe they hold the same row. A claim whose process
has ended on this host is stale: it is deleted, and the rows may be claimed
again. A process on another host cannot be checked from here, so its claim
holds until it is released or its file deleted by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import StoreCorruptError
from .files import HOST, TEMPORARY, read_json, unlink_quietly, writing

__all__ = [
    "Claim",
    "process_alive",
    "process_start",
    "lock",
    "remove_dead_temporaries",
]

logger = logging.getLogger(__name__)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not).

    With ``started`` (from ``process_start``), a later process that reuses
    the pid does not count either.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


@dataclass(frozen=True)
class Claim:
    """A writer's hold on train rows ``start..stop-1`` of one checkpoint.

    Attributes:
        path: The claim file.
        start: First row held.
        stop: One past the last row held.
        pid: The writer's process id.
        host: The writer's host name.
        process_start: When that process started (Linux clock ticks), to tell
            it from a later process that reuses the pid.
        since: When the claim was made (local time, ISO 8601).
    """

    path: Path
    start: int
    stop: int
    pid: int
    host: str
    process_start: int | None
    since: str

    @classmethod
    def read(cls, path: Path) -> Claim | None:
        """The claim in ``path``; ``None`` if it vanished or is unreadable."""
        try:
            info = read_json(path)
        except StoreCorruptError:
            info = None
        if not info:
            return None
        start, stop = info["rows"]
        return cls(
            path,
            int(start),
            int(stop),
            int(info["pid"]),
            str(info["host"]),
            info.get("process_start"),
            str(info.get("since", "?")),
        )

    def mine(self) -> bool:
        """Whether this process made the claim."""
        return self.host == HOST and self.pid == os.getpid()

    def alive(self) -> bool:
        """False once the writer is known to have ended.

        A process on another host cannot be checked from here, so its claim
        counts as alive until it is released or its file is deleted.
        """
        return self.host != HOST or process_alive(self.pid, self.process_start)

    def overlaps(self, start: int, stop: int) -> bool:
        """Whether rows ``start..stop-1`` meet the claimed ones."""
        return self.start < stop and start < self.stop

    def describe(self) -> str:
        """Who holds the rows, for error messages."""
        return (
            f"rows {self.start}..{self.stop - 1} by pid {self.pid} on host "
            f"{self.host} since {self.since} (claim file {self.path})"
        )


_LOCKS: dict[str, FileLock] = {}


def lock(path: Path) -> FileLock:
    """The process-wide (re-entrant) lock on ``path``, its file created now."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    key = str(path.resolve())
    if key not in _LOCKS:
        _LOCKS[key] = FileLock(key)
    return _LOCKS[key]


def remove_dead_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files and folders under ``root`` of dead processes.

    Only those written on this host are judged; failures (a read-only store)
    are ignored.

    Returns:
        The paths removed.
    """
    removed = []
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            match = TEMPORARY.match(name)
            if match is None or match["host"] != HOST:
                continue
            if not process_alive(int(match["pid"])):
                path = Path(folder) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    unlink_quietly(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if not TEMPORARY.match(d)]
    return removed
