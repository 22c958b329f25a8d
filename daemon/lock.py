"""One daemon per state dir: an flock on ``<state_dir>/lock`` (not a pid guess).

The lock dies with the process, so a crashed daemon never blocks the next one. The
file also holds the owner's pid so that a refused second daemon (and `preemptd
checkpoint`) can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from daemon.config import ConfigError

LOCK_NAME = "lock"


class AlreadyRunning(Exception):
    """Another daemon holds the state dir's lock; the message names it."""


class StateDirLock:
    """An exclusive, non-blocking flock held for the daemon's lifetime."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"daemon.state_dir: cannot open lock file {self.path}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.path)
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunning(
                f"{self.path.parent}: another preemptd ({who}) is already running on this state dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def fileno(self) -> int | None:
        return self._fd


def read_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid written in a lock file, None when absent or unreadable."""
    try:
        text = Path(path).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def held_by(state_dir: str | os.PathLike[str]) -> int | None:
    """Pid of the live daemon holding `state_dir`'s lock, or None when nobody holds it."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
