"""Starting the worker so that it can never outlive the daemon.

The worker runs in its own session and process group (so a Ctrl-C in the daemon's
terminal reaches only the daemon, which then runs the orderly stop path, and so the
whole group can be killed at once). Two independent mechanisms make sure nothing
survives the daemon, even a SIGKILL of it:

- the worker gets ``PR_SET_PDEATHSIG(SIGKILL)``: the kernel kills it when the
  daemon's main thread dies;
- a tiny *guard* process forked at start-up holds the read end of a pipe. The daemon
  tells it the worker's process group; when the daemon dies for any reason the pipe
  reads EOF and the guard SIGKILLs the group, grandchildren included.

Spawning is injected (`Spawner`) so the supervisor can be driven by tests and
benchmarks with the same code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger()

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

# errnos that mean "this command can never run", as opposed to a transient failure.
FATAL_EXEC_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR,
                               errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EPERM})


class CommandNotExecutable(Exception):
    """The worker command cannot be executed at all (missing, no exec bit, bad cwd...)."""


@dataclass(frozen=True)
class ExitStatus:
    """How a worker ended: exactly one of `code` and `signal` is set."""

    code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, rc: int) -> ExitStatus:
        return cls(None, -rc) if rc < 0 else cls(rc, None)

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return str(self.signal)

    @property
    def success(self) -> bool:
        return self.code == 0


class WorkerProcess(Protocol):
    """A started worker as the supervisor sees it."""

    pid: int
    pgid: int

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when the process exits (pidfd), or None."""

    def poll(self) -> ExitStatus | None:
        """Reap the process if it has exited; None while it runs."""

    def send_signal(self, sig: int) -> bool:
        """Signal the worker process itself; False when it is already gone."""

    def signal_group(self, sig: int) -> bool:
        """Signal the worker's whole process group; False when the group is empty."""

    def close(self) -> None:
        """Release descriptors (after the process has been reaped)."""


class Spawner(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> WorkerProcess:
        """Start `argv`; CommandNotExecutable when it can never run, OSError when it failed now."""

    def forget(self, worker: WorkerProcess) -> None:
        """The worker and its group are gone (reaped and cleaned)."""


def _load_prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


class PopenWorker:
    """A worker started with subprocess.Popen, watched through a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session: the worker leads its group
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # old kernel/Python: the supervisor falls back to SIGCHLD
            self._pidfd = None
        self._status: ExitStatus | None = None

    def fileno(self) -> int | None:
        return self._pidfd

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            rc = self._popen.poll()
            if rc is not None:
                self._status = ExitStatus.from_returncode(rc)
        return self._status

    def send_signal(self, sig: int) -> bool:
        if self.poll() is not None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:  # pgid reused by someone else's group: not ours to touch
            return False
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class PosixSpawner:
    """The real spawner: own session/group, parent-death signal, guard registration."""

    def __init__(self, guard: GroupGuard | None = None) -> None:
        self._guard = guard
        self._prctl = _load_prctl()
        self._parent = os.getpid()

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: only async-signal-safe-ish calls.
        if self._prctl is not None:
            self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self._parent:  # the daemon died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> PopenWorker:
        try:
            popen = subprocess.Popen(  # noqa: S603 - argv list, no shell
                list(argv),
                env=dict(env),
                cwd=cwd or None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=self._preexec,  # noqa: PLW1509 - only prctl, see _preexec
                close_fds=True,
            )
        except OSError as exc:
            if exc.errno in FATAL_EXEC_ERRNOS:
                what = exc.strerror or str(exc)
                target = exc.filename if exc.filename is not None else argv[0]
                raise CommandNotExecutable(f"cannot execute {target!r}: {what}") from None
            raise
        except subprocess.SubprocessError as exc:  # preexec_fn failed in the child
            raise OSError(f"worker start failed: {exc}") from None
        worker = PopenWorker(popen)
        if self._guard is not None:
            self._guard.watch(worker.pgid)
        return worker

    def forget(self, worker: WorkerProcess) -> None:
        """The worker's group is gone; the guard need not kill it any more."""
        if self._guard is not None:
            self._guard.unwatch(worker.pgid)


class GroupGuard:
    """A forked helper that SIGKILLs registered process groups when the daemon dies.

    Fork it before any thread starts. The protocol over the pipe is lines of
    ``+PGID`` / ``-PGID``; EOF (the daemon is gone, however it died) means kill.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self._wfd: int | None = None

    def start(self) -> None:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, verified by integration tests
            try:
                os.close(wfd)
                _guard_main(rfd)
            finally:
                os._exit(0)
        os.close(rfd)
        self.pid, self._wfd = pid, wfd

    def _send(self, line: str) -> None:
        if self._wfd is None:
            return
        try:
            os.write(self._wfd, line.encode())
        except OSError as exc:  # guard died: protection is reduced, not the supervision
            log.warning("daemon.guard_lost", error=str(exc))
            os.close(self._wfd)
            self._wfd = None

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self, timeout: float = 1.0) -> None:
        """Close the pipe (the guard kills what is still registered and exits), reap it."""
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        if self.pid is None:
            return
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid or time.monotonic() > end:
                break
            time.sleep(0.002)
        self.pid = None


def _guard_main(rfd: int) -> None:  # pragma: no cover - child process
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGQUIT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread: the ignores are a nicety, EOF is what matters
        pass
    prctl = _load_prctl()
    if prctl is not None:  # shows as "preemptd-guard" in ps -o comm / top
        prctl(PR_SET_NAME, b"preemptd-guard", 0, 0, 0)
    os.closerange(0, rfd)
    os.closerange(rfd + 1, 65536)
    groups: set[int] = set()
    buf = b""
    while True:
        try:
            chunk = os.read(rfd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if len(line) < 2:
                continue
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            if line[:1] == b"+":
                groups.add(pgid)
            else:
                groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
