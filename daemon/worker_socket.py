"""The datagram socket the worker reports on (heartbeats, checkpoints).

AF_UNIX SOCK_DGRAM in the state dir, owner-only. Every datagram is parsed
defensively with daemon.contract.decode_message: garbage, oversized or unknown
messages are dropped with a debug line and never count as progress.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import structlog

from daemon.contract import MAX_MESSAGE_BYTES, BadMessage, decode_message

log = structlog.get_logger()

SOCKET_NAME = "worker.sock"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Read at most this many datagrams per wake-up so a flooding worker cannot starve the loop.
MAX_BATCH = 256


class SocketPathTooLong(ValueError):
    """The state dir is too deep for an AF_UNIX socket path."""


class WorkerSocket:
    """Bound, non-blocking receiver for worker messages."""

    def __init__(self, state_dir: str | os.PathLike[str], name: str = SOCKET_NAME) -> None:
        self.path = str(Path(state_dir) / name)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise SocketPathTooLong(
                f"{self.path}: socket path is {len(os.fsencode(self.path))} bytes, "
                f"longer than the {MAX_SOCKET_PATH} AF_UNIX allows; use a shorter daemon.state_dir"
            )
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # We hold the state-dir lock, so a socket file left here is from a dead daemon.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self.dropped = 0
        self.empty = True  # the last receive() found the queue empty

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[dict[str, Any]]:
        """Every valid message waiting now (up to MAX_BATCH); bad ones are dropped."""
        out: list[dict[str, Any]] = []
        self.empty = False
        for _ in range(MAX_BATCH):
            try:
                # One byte more than allowed so an oversized datagram is recognisable.
                data = self._sock.recv(MAX_MESSAGE_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                self.empty = True
                break
            try:
                out.append(decode_message(data))
            except BadMessage as exc:
                self.dropped += 1
                log.debug("worker.message_dropped", error=str(exc), size=len(data))
        return out

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
