"""systemd's notify protocol (sd_notify) over a real AF_UNIX datagram socket.

Path and abstract (``@name``) forms of NOTIFY_SOCKET are supported. Without
NOTIFY_SOCKET every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger()

# What the worker must not inherit: it is not the service's main process.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends state lines to systemd; silent when not run under Type=notify."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr:
            if addr.startswith("@"):
                self._addr = b"\0" + addr[1:].encode()
            elif addr.startswith("/"):
                self._addr = addr
            else:
                log.warning("systemd.notify_socket_unsupported", address=addr)
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of newline-separated assignments; False if not delivered."""
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as exc:
            # systemd gone or socket full: not fatal for supervision, but worth a line.
            log.warning("systemd.notify_failed", error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        self._last_status = status
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        """Send STATUS= when it changed."""
        status = _one_line(status)
        if status == self._last_status:
            return False
        self._last_status = status
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, extend_seconds: float, status: str) -> bool:
        self._last_status = _one_line(status)
        return self.send(
            "STOPPING=1",
            f"EXTEND_TIMEOUT_USEC={int(extend_seconds * 1_000_000)}",
            f"STATUS={self._last_status}",
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("systemd.watchdog_usec_invalid", value=usec)
        return None
    return value / 2_000_000 if value > 0 else None
