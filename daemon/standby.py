"""Warm standby: a spare worker process that has already imported the framework and waits.

With ``worker.warm_standby = true`` the daemon keeps one spare process of the worker
command's Python interpreter running ``python -m service.standby``: it imports
TensorFlow (never touching a GPU) and blocks on a FIFO in the state dir. The next
worker start *promotes* it instead of spawning a new interpreter: the daemon writes
the go message (the full per-start env — PREEMPTD_RESUME, PREEMPTD_RESTART, ... —
argv and cwd) into the FIFO and the standby runs the user's ``python -m module args``
or ``python script args`` in-process with runpy. A crash then costs the restore and
the first step, not the interpreter and framework start-up.

The standby is spawned like any worker (own process group, parent-death signal,
registered with the guard), so it never outlives the daemon. A standby is only used
when its environment equals the worker's (apart from the per-start keys): a changed
config or command falls back to a normal start. Commands that are not a plain Python
module or script always start normally.

This module imports no framework: the daemon never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import contract
from daemon.config import Config
from daemon.spawner import GroupGuard, PosixSpawner, Spawner, WorkerProcess

log = structlog.get_logger()

# ----------------------------------------------------------------- protocol
# (shared with service.standby, which imports these names)

ENV_FIFO = "PREEMPTD_STANDBY_FIFO"
# Comma-separated modules the standby imports while it waits (default below).
ENV_PRELOAD = "PREEMPTD_STANDBY_PRELOAD"
DEFAULT_PRELOAD = ("tensorflow", "keras")
STANDBY_MODULE = "service.standby"
FIFO_PATTERN = "standby-{n}.fifo"  # one per standby: a promoted one may still be reading its own
READY_SUFFIX = ".ready"  # <fifo>.ready exists once the preload is done
# Keys that change from one start to the next; everything else must match the standby's env.
PER_START_KEYS = frozenset({contract.ENV_RESUME, contract.ENV_RESTART})
_HEADER = struct.Struct("!I")
MAX_GO_BYTES = 60 * 1024  # fits a pipe buffer: the write never blocks


@dataclass(frozen=True)
class PythonTarget:
    """What `python -m module args` / `python script args` runs."""

    interpreter: str
    kind: str  # "module" or "script"
    target: str
    args: tuple[str, ...]


def python_target(argv: Sequence[str]) -> PythonTarget | None:
    """The module or script of a plain Python command line; None for anything else."""
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python"):
        return None
    if argv[1] == "-m" and len(argv) >= 3:
        return PythonTarget(argv[0], "module", argv[2], tuple(argv[3:]))
    if not argv[1].startswith("-"):
        return PythonTarget(argv[0], "script", argv[1], tuple(argv[2:]))
    return None  # interpreter options (-c, -X, -u...) would not hold in-process


def encode_go(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> bytes:
    """The go message: length-prefixed JSON {argv, env, cwd}."""
    body = json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd or ""}).encode()
    if len(body) + _HEADER.size > MAX_GO_BYTES:
        raise ValueError(f"go message of {len(body)} bytes exceeds {MAX_GO_BYTES}")
    return _HEADER.pack(len(body)) + body


def read_go(fd: int) -> dict[str, Any]:
    """Block until the whole go message has arrived on `fd`; return it parsed."""

    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("standby FIFO closed before the go message was complete")
            buf += chunk
        return buf

    (length,) = _HEADER.unpack(exactly(_HEADER.size))
    msg = json.loads(exactly(length))
    if not (isinstance(msg, dict) and isinstance(msg.get("argv"), list) and isinstance(msg.get("env"), dict)):
        raise ValueError("malformed go message")
    return msg


def _template(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_START_KEYS}


# ------------------------------------------------------------------ daemon side


class _Standby:
    """One spare process and the daemon's end of its FIFO."""

    def __init__(self, worker: WorkerProcess, fifo: Path, fd: int, argv: tuple[str, ...],
                 template: dict[str, str], cwd: str | None) -> None:
        self.worker, self.fifo, self.fd = worker, fifo, fd
        self.argv, self.template, self.cwd = argv, template, cwd

    def matches(self, argv: Sequence[str], template: Mapping[str, str], cwd: str | None) -> bool:
        return tuple(argv) == self.argv and dict(template) == self.template and cwd == self.cwd

    @property
    def ready(self) -> bool:
        return Path(str(self.fifo) + READY_SUFFIX).exists()

    def cleanup_files(self) -> None:
        for p in (self.fifo, Path(str(self.fifo) + READY_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StandbySpawner:
    """A Spawner that starts workers by promoting a warm standby when one is waiting.

    After each start a replacement standby is spawned `delay` seconds later (so it does
    not compete for CPU with the worker that is starting up). Call `close()` at the end.
    """

    def __init__(self, base: PosixSpawner, state_dir: str | os.PathLike[str], delay: float = 10.0) -> None:
        self._base = base
        self._state_dir = Path(state_dir)
        self._count = 0
        self._delay = delay
        self._lock = threading.Condition()
        self._standby: _Standby | None = None
        # The next standby to start: (monotonic due time, spawn arguments). One long-lived
        # thread starts it: the parent-death signal fires when the *thread* that forked a
        # child exits, so a short-lived timer thread would take its standby with it.
        self._due: tuple[float, tuple[tuple[str, ...], dict[str, str], str | None, str]] | None = None
        self._thread: threading.Thread | None = None
        self._promoted: dict[int, _Standby] = {}  # worker pid -> standby whose FIFO end we hold
        self._closed = False
        self._warned_unsupported = False

    # -- Spawner

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> WorkerProcess:
        """Promote the waiting standby when it fits, else start `argv` normally; then plan a new standby."""
        target = python_target(argv)
        if target is None:
            if not self._warned_unsupported:
                self._warned_unsupported = True
                log.warning("standby.unsupported", command=list(argv),
                            why="warm standby needs `python -m module ...` or `python script ...`")
            return self._base.spawn(argv, env, cwd)
        template = _template(env)
        with self._lock:
            self._due = None
            standby, self._standby = self._standby, None
        worker = self._promote(standby, argv, env, cwd, template) if standby is not None else None
        if worker is None:
            worker = self._base.spawn(argv, env, cwd)
        self._plan(tuple(argv), template, cwd, target.interpreter)
        return worker

    def forget(self, worker: WorkerProcess) -> None:
        self._base.forget(worker)
        with self._lock:
            done = self._promoted.pop(worker.pid, None)
        if done is not None:
            done.close_fd()

    # -- standby management

    def _promote(self, standby: _Standby, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
                 template: Mapping[str, str]) -> WorkerProcess | None:
        why = ""
        if standby.worker.poll() is not None:
            why = "standby exited"
        elif not standby.matches(argv, template, cwd):
            why = "command, cwd or environment changed"
        if not why:
            try:
                os.write(standby.fd, encode_go(argv, env, cwd))
            except (OSError, ValueError) as exc:
                why = f"go message not delivered: {exc}"
        if why:
            log.info("standby.discarded", pid=standby.worker.pid, why=why)
            self._kill(standby)
            return None
        log.info("standby.promoted", pid=standby.worker.pid, ready=standby.ready,
                 restart=env.get(contract.ENV_RESTART), resume=env.get(contract.ENV_RESUME))
        standby.cleanup_files()
        with self._lock:
            self._promoted[standby.worker.pid] = standby
        return standby.worker

    def _plan(self, argv: tuple[str, ...], template: dict[str, str], cwd: str | None,
              interpreter: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._due = (time.monotonic() + self._delay, (argv, template, cwd, interpreter))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="preemptd-standby", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (self._due is None or self._due[0] > time.monotonic()):
                    self._lock.wait(None if self._due is None else max(0.0, self._due[0] - time.monotonic()))
                if self._closed:
                    return
                assert self._due is not None
                args, self._due = self._due[1], None
            self._start_standby(*args)

    def _start_standby(self, argv: tuple[str, ...], template: dict[str, str], cwd: str | None,
                       interpreter: str) -> None:
        with self._lock:
            if self._closed or self._standby is not None:
                return
            self._count += 1
            fifo = self._state_dir / FIFO_PATTERN.format(n=self._count)
            with contextlib.suppress(FileNotFoundError):
                fifo.unlink()
            with contextlib.suppress(FileNotFoundError):
                Path(str(fifo) + READY_SUFFIX).unlink()
            try:
                os.mkfifo(fifo, 0o600)
                # Read-write and non-blocking: the open never waits for the standby, and the
                # pipe (with a go message in it) lives as long as we hold this end.
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("standby.failed", path=str(fifo), error=str(exc))
                return
            env = dict(template)
            env[ENV_FIFO] = str(fifo)
            try:
                worker = self._base.spawn([interpreter, "-m", STANDBY_MODULE], env, cwd)
            except Exception as exc:  # noqa: BLE001 - any spawn failure: no standby, normal starts
                os.close(fd)
                log.warning("standby.failed", error=repr(exc))
                return
            self._standby = _Standby(worker, fifo, fd, argv, template, cwd)
        log.info("standby.started", pid=worker.pid, fifo=str(fifo))

    def _kill(self, standby: _Standby) -> None:
        standby.worker.signal_group(signal.SIGKILL)
        standby.worker.send_signal(signal.SIGKILL)
        end = time.monotonic() + 2.0  # SIGKILL is quick; never hang the daemon on it
        while standby.worker.poll() is None and time.monotonic() < end:
            time.sleep(0.005)
        standby.worker.close()
        self._base.forget(standby.worker)
        standby.close_fd()
        standby.cleanup_files()

    def close(self) -> None:
        """Stop planning standbys and kill the one waiting (the running worker is not touched)."""
        with self._lock:
            self._closed = True
            self._due = None
            self._lock.notify_all()
            standby, self._standby = self._standby, None
            promoted = list(self._promoted.values())
            self._promoted.clear()
        if standby is not None:
            self._kill(standby)
        for s in promoted:
            s.close_fd()


def spawner_factory(cfg: Config) -> Callable[[GroupGuard | None], Spawner] | None:
    """For Supervisor(spawner_factory=...): a warm-standby spawner when `worker.warm_standby` is on."""
    if not cfg.worker.warm_standby:
        return None
    state_dir = cfg.daemon.state_dir

    def build(guard: GroupGuard | None) -> Spawner:
        return StandbySpawner(PosixSpawner(guard), state_dir)

    return build
