"""structlog set-up: one JSON object per line on stdout, console rendering on a tty.

Every module does ``log = structlog.get_logger()`` and logs dotted event names; this
module only decides how lines are rendered and which levels pass.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, TextIO, cast

import structlog

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console", "auto")


def configure(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None,
              origin: str | None = None) -> None:
    """Configure structlog process-wide (call once, from the CLI).

    `origin` (e.g. "worker") is added to every line, so a worker's lines in the same
    journal are told apart from the daemon's (both log `checkpoint.committed`).
    """
    stream = sys.stdout if stream is None else stream
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream))
        timestamper = structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.dict_tracebacks if fmt == "json" else structlog.processors.format_exc_info,
            _event_first,
            *([_with_origin(origin)] if origin else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (message and newline together): PrintLogger's print() makes
        # two, and with unbuffered stdout (PYTHONUNBUFFERED, as in the unit) the worker,
        # which shares the daemon's stdout, could write its line between them.
        logger_factory=structlog.WriteLoggerFactory(cast(TextIO, _SafeStream(stream))),
        cache_logger_on_first_use=False,
    )


class _SafeStream:
    """A text stream whose write errors (EPIPE when the reader left, EIO, ENOSPC) are dropped.

    Losing a log line is bad; losing the training run because stdout went away is worse.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.dropped += 1
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1

    def isatty(self) -> bool:
        return _isatty(self._stream)


def _with_origin(origin: str) -> Any:
    def add(logger: Any, method: str, event_dict: Any) -> Any:
        event_dict.setdefault("origin", origin)
        return event_dict
    return add


def _event_first(logger: Any, method: str, event_dict: Any) -> Any:
    """Put timestamp, level and event first so a tailed line reads left to right."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
