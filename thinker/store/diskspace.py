"""The data disk filling up: telling a full disk from other failures, and space set aside
so that deletes and request bookkeeping still work when it is full.

A full disk shows up as many different exceptions: OSError ENOSPC/EDQUOT from plain writes,
sqlite3's "database or disk is full" (SQLITE_FULL), safetensors' "No space left on device
(os error 28)", and torch.save's "[enforce fail at inline_container.cc] ... unexpected pos",
whose message never mentions the disk. ``is_disk_full`` knows them all, so callers turn
each into the one InsufficientStorageError (507) whose message says what to do.

The reserve: SQLite in WAL mode needs a little new space even to delete a row, so a disk
filled to its last byte could not be freed through the API at all. ``DiskReserve`` keeps a
file of DISK_RESERVE_BYTES in the data dir; the first database write that finds the disk
full deletes it and tries again (database.py), so deletes, futures and the adapter registry
keep working. The disk counts as full while the reserve is given up or less than its size
is free beyond it; saves are then refused with 507, and the space that deletes free goes
to putting the reserve back first (``ensure``).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("thinker.disk")

RESERVE_NAME = "disk-reserve.bin"  # delete it by hand to free DISK_RESERVE_BYTES in an emergency
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "database or disk is full", "os error 28")
HOW_TO_FREE = (
    "to free space, delete checkpoints (DELETE /api/v1/training_runs/<run_id>/checkpoints/<kind>/<name>, "
    "or the SDK's delete_checkpoint)"
)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the disk had no room."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        text = str(exc).lower()
        if any(marker in text for marker in _FULL_TEXT):
            return True
        # torch.save's writer reports a short write as a position mismatch or "file write failed"
        if "inline_container" in text and ("unexpected pos" in text or "write failed" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def human(n: float) -> str:
    """A byte count as people read it: "512 bytes", "6.1 MiB"."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


class DiskReserve:
    def __init__(self, data_dir: str | Path, size_bytes: int) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.path = self.data_dir / RESERVE_NAME
        self.size_bytes = size_bytes
        self._lock = threading.Lock()
        self._said_full = False

    def free_bytes(self) -> int:
        return free_bytes(self.data_dir)

    def in_place(self) -> bool:
        if self.size_bytes == 0:
            return True
        try:
            return self.path.stat().st_size >= self.size_bytes
        except FileNotFoundError:
            return False

    @property
    def full(self) -> bool:
        """The reserve is given up, or less than its size is free beyond it."""
        return not self.in_place() or self.free_bytes() < self.size_bytes

    def ensure(self) -> bool:
        """Put the reserve in place unless it is (this needs DISK_RESERVE_BYTES free); whether it is."""
        with self._lock:
            if not self.in_place():
                try:
                    if self.free_bytes() < self.size_bytes:
                        raise OSError(errno.ENOSPC, "no room for the reserve")
                    _allocate(self.path, self.size_bytes)
                except OSError as exc:
                    self.path.unlink(missing_ok=True)
                    if not is_disk_full(exc):
                        log.warning("could not set aside DISK_RESERVE_BYTES in %s: %s", self.path, exc)
            self._tell()
            return self.in_place()

    def release(self) -> bool:
        """Give the reserve back to the (full) disk; whether that freed anything."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            self._tell()
        return True

    def _tell(self) -> None:
        """Log when the disk becomes full, and when it has room again: once each (under the lock)."""
        full = self.full
        if full and not self._said_full:
            log.warning(
                "the data disk is full (%s free in %s): saves answer 507 until there is room again; %s. Training, "
                "sampling and deletes keep working", human(self.free_bytes()), self.data_dir, HOW_TO_FREE,
            )
        elif self._said_full and not full:
            log.info("the data disk has room again (%s free in %s): saves are accepted", human(self.free_bytes()),
                     self.data_dir)
        self._said_full = full

    def full_message(self, doing: str, needed: int = 0) -> str:
        """Why ``doing`` (which needs about ``needed`` bytes) was refused: a 507's message."""
        free = max(0, self.free_bytes() - (0 if self.in_place() else self.size_bytes))
        needs = f", this needs about {human(needed)}" if needed else ""
        return (
            f"{doing}: the data disk is full ({human(free)} free in THINKER_DATA_DIR beyond its reserve{needs}); "
            f"{HOW_TO_FREE} or give the disk more room. Nothing was kept of it; training, sampling and "
            "deletes keep working"
        )


def _allocate(path: Path, size: int) -> None:
    """A file of ``size`` bytes whose blocks are really taken (not a sparse file)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            chunk = b"\0" * (1 << 20)  # a file system without fallocate: write the bytes
            for offset in range(0, size, len(chunk)):
                os.write(fd, chunk[: size - offset])
        os.fsync(fd)
    finally:
        os.close(fd)
