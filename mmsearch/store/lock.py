"""The write lock of an index folder: an ``flock`` on ``write.lock``.

The OS drops an flock when its holder dies, however it dies, so a killed run
never leaves a stale lock (the pid written in the file is for messages only).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from mmsearch.errors import IndexLockedError, StorageError

LOCK = "write.lock"


class WriteLock:
    """The one-writer lock of index folder ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` s, or raise :class:`IndexLockedError`.

        Returns False when this object held it already, True when it was taken now.
        """
        if self._fd is not None:
            return False
        fd = _open(self.root / LOCK)
        deadline = time.monotonic() + max(timeout, 0.0)
        while not _try_flock(fd, self.root / LOCK):
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            pid = _read_pid(fd)
            os.close(fd)
            who = f" (pid {pid})" if pid else ""
            raise IndexLockedError(
                f"index {self.root.name!r} is being written by another process{who}; "
                "wait for it to finish (queries keep working meanwhile)")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational; a full disk must not stop us from locking
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc


def _try_flock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        os.close(fd)
        raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc


def lock_holder(root: Path) -> int | None:
    """The pid (0 if unknown) of the process holding ``root``'s write lock, None if free."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None
