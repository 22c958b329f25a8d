"""Collects what a component posts, for tests: `source.start(collector.post)`."""

from __future__ import annotations

import threading
import time
from typing import Any

from daemon.components import Notice, NoticeKind


class NoticeCollector:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.posted: list[Any] = []

    def post(self, event: object) -> None:
        with self._cond:
            self.posted.append((time.monotonic(), event))
            self._cond.notify_all()

    @property
    def notices(self) -> list[Notice]:
        with self._cond:
            return [e for _, e in self.posted if isinstance(e, Notice)]

    def wait(self, kind: NoticeKind | None = None, timeout: float = 10.0, count: int = 1) -> list[Notice]:
        """Block until `count` notices (of `kind`) were posted; AssertionError on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for _, e in self.posted
                         if isinstance(e, Notice) and (kind is None or e.kind is kind)]
                if len(found) >= count:
                    return found
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} {kind} notice(s) within {timeout} s; got {self.posted}")
                self._cond.wait(left)

    def posted_at(self, notice: Notice) -> float:
        with self._cond:
            return next(t for t, e in self.posted if e is notice)
