"""Worker → daemon reports over PREEMPTD_SOCKET: one JSON datagram each, never blocking.

Without a daemon (no socket path, nobody listening, queue full) every call is a
silent no-op: training must never wait for, or fail because of, its supervisor.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import structlog

from daemon import contract
from daemon.clock import Clock, SystemClock

log = structlog.get_logger()

DEFAULT_HEARTBEAT_INTERVAL = 0.5  # seconds: at most 2 progress messages per second
# A datagram can be lost (daemon restarting, queue full); the daemon sends SIGUSR1 only
# to a worker whose hello it has seen, so the hello rides along with heartbeats now and then.
HELLO_REPEAT_SECONDS = 10.0


class Reporter:
    """Sends worker messages (hello, progress, checkpoint, checkpoint_failed, export)."""

    def __init__(
        self,
        socket_path: str | None,
        *,
        clock: Clock | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        self._path = socket_path or ""
        self._clock = clock or SystemClock()
        self._interval = heartbeat_interval
        self._last_progress: float | None = None
        self._hello_fields: dict[str, Any] | None = None
        self._last_hello = 0.0
        self._lock = threading.Lock()  # the committer thread reports too
        self._sock: socket.socket | None = None
        self._warned = False
        if self._path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, msg_type: str, **fields: Any) -> bool:
        """Send one message now; True when the kernel took it."""
        if self._sock is None:
            return False
        data = contract.encode_message(msg_type, pid=os.getpid(), **fields)
        with self._lock:
            try:
                self._sock.sendto(data, self._path)
            except OSError as exc:
                # Daemon gone, restarting, or its queue full: drop, say so once.
                if not self._warned:
                    log.debug("report.dropped", socket=self._path, error=str(exc), type=msg_type)
                    self._warned = True
                return False
        self._warned = False
        return True

    def hello(self, framework: str) -> None:
        """Announce that this worker handles SIGUSR1 (checkpoint) and SIGTERM (save and exit)."""
        self._hello_fields = {"handles": ["SIGUSR1", "SIGTERM"], "framework": framework}
        self._last_hello = self._clock.monotonic()
        self.send(contract.MSG_HELLO, **self._hello_fields)

    def progress(self, step: int, force: bool = False) -> None:
        """Heartbeat, rate-limited to one per `heartbeat_interval` seconds."""
        if self._sock is None:
            return
        now = self._clock.monotonic()
        if not force and self._last_progress is not None and now - self._last_progress < self._interval:
            return
        self._last_progress = now
        if self._hello_fields is not None and now - self._last_hello >= HELLO_REPEAT_SECONDS:
            self._last_hello = now
            self.send(contract.MSG_HELLO, **self._hello_fields)
        self.send(contract.MSG_PROGRESS, step=step)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
