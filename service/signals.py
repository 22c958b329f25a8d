"""SIGUSR1 / SIGTERM as requests: the handlers only record, the training loop acts."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger()

_Handler = Any  # what signal.signal returns: a callable, SIG_DFL, SIG_IGN or None


class SignalRequests:
    """Records checkpoint (SIGUSR1) and stop (SIGTERM) requests until the loop takes them."""

    def __init__(self) -> None:
        self._checkpoint = threading.Event()
        self._stop = threading.Event()
        self._previous: dict[int, _Handler] = {}

    def install(self) -> bool:
        """Install the handlers; False (and nothing changed) when not on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("signals.not_installed", why="not the main thread; no SIGUSR1/SIGTERM saves")
            return False
        for signum, handler in ((signal.SIGUSR1, self._on_checkpoint), (signal.SIGTERM, self._on_stop)):
            self._previous[signum] = signal.signal(signum, handler)
        return True

    def uninstall(self) -> None:
        """Put back the handlers that were there before."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_checkpoint(self, signum: int, frame: FrameType | None) -> None:
        self._checkpoint.set()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at the next step boundary (same as SIGUSR1)."""
        self._checkpoint.set()

    def request_stop(self) -> None:
        """Ask for a durable save and exit at the next step boundary (same as SIGTERM)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def checkpoint_requested(self) -> bool:
        return self._checkpoint.is_set()

    def clear_checkpoint(self) -> None:
        self._checkpoint.clear()
