"""What every cloud notice source shares: its threads, backoff, quiet error logging,
deadline awareness and status.

A provider module supplies *watchers*: functions that do one observation (one HTTP
exchange and its interpretation) and return how long to wait before the next. The
loop here runs each watcher in its own daemon thread, turns MetadataError into one
log line per kind of trouble plus exponential backoff, and never lets a failure
become a notice: only a provider's positive, well-formed answer does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from daemon import contract
from daemon.clock import Clock
from daemon.components import CheckpointReport, Component, Notice, NoticeKind, Post
from daemon.notices.deadline import WINDOW_SECONDS, SaveBudget
from daemon.notices.http import HttpClient, MetadataError

log = structlog.get_logger()

Watcher = Callable[[], float]  # one observation; returns seconds until the next one

JOIN_SECONDS = 1.0  # Component.stop() must return within about a second


class Backoff:
    """Exponential backoff after consecutive failures: initial, 2x, 4x ... capped."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.factor = factor

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1-based)."""
        if failures <= 0:
            return self.initial
        return min(self.maximum, self.initial * self.factor ** min(failures - 1, 32))


class TroubleLog:
    """One warning per kind of failure during an outage, one info line when it ends.

    A metadata server that is down answers every poll with the same error; the log
    should say so once, not every second.
    """

    def __init__(self, source: str, watcher: str) -> None:
        self.source = source
        self.watcher = watcher
        self.failures = 0  # in a row
        self.total = 0
        self.last_error: str | None = None
        self._kinds_seen: set[str] = set()

    def failed(self, error: MetadataError, retry_seconds: float) -> None:
        self.failures += 1
        self.total += 1
        self.last_error = f"{error.kind}: {error}"
        if error.kind not in self._kinds_seen:
            self._kinds_seen.add(error.kind)
            log.warning(
                "preemption.source_error",
                source=self.source,
                watcher=self.watcher,
                kind=error.kind,
                error=str(error),
                retry_seconds=round(retry_seconds, 3),
                note="no notice is assumed from a failed request; further errors of this kind are not logged",
            )

    def ok(self) -> None:
        if self.failures:
            log.info(
                "preemption.source_recovered",
                source=self.source,
                watcher=self.watcher,
                failures=self.failures,
            )
        self.failures = 0
        self._kinds_seen.clear()


class NoticeSource(Component):
    """Base of the GCE, AWS and Azure sources (see module docstring)."""

    provider = ""

    def __init__(
        self,
        clock: Clock,
        *,
        detect_seconds: float,
        backoff_initial: float,
        backoff_max: float,
        grace_seconds: float | None = None,
    ) -> None:
        self.name = f"notices.{self.provider}"
        self._clock = clock
        self._grace_seconds = grace_seconds
        self._stopping = threading.Event()
        self._wake = threading.Event()  # cuts a poll wait short (stop, work to do)
        self._threads: list[threading.Thread] = []
        self._post: Post | None = None
        self._lock = threading.Lock()
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._trouble: dict[str, TroubleLog] = {}
        self._budget = SaveBudget(WINDOW_SECONDS[self.provider], detect_seconds)
        self._fit_warned = False
        self._polls = 0
        self._last_ok_wall: float | None = None
        self._posted: deque[dict[str, Any]] = deque(maxlen=10)
        self._looked_for_save_time = False

    # ------------------------------------------------------------ for providers

    def watchers(self) -> dict[str, Watcher]:
        """Name -> one-observation function, each run in its own thread."""
        raise NotImplementedError

    def clients(self) -> list[HttpClient]:
        """HTTP clients to abort on stop (so a long poll does not hold stop())."""
        return []

    def emit(self, kind: NoticeKind, deadline_wall: float | None, details: dict[str, Any]) -> Notice:
        """Post a notice to the main loop; `deadline_wall` (epoch) is converted to monotonic."""
        now_mono, now_wall = self._clock.monotonic(), self._clock.wall()
        deadline = None if deadline_wall is None else now_mono + (deadline_wall - now_wall)
        details = dict(details)
        if deadline_wall is not None:
            # (seconds left is computed and logged by the supervisor from `deadline`)
            seconds_left = round(deadline_wall - now_wall, 3)
            last_save = self._budget.last_save_seconds
            details["last_save_seconds"] = last_save
            if kind is NoticeKind.STOP and last_save is not None and last_save > seconds_left:
                log.warning(
                    "preemption.deadline_at_risk",
                    source=self.provider,
                    seconds_left=seconds_left,
                    last_save_seconds=last_save,
                    note="the last checkpoint took longer than the time left; this save may not finish",
                )
        notice = Notice(self.provider, kind, deadline, deadline_wall, details)
        with self._lock:
            self._posted.append({**details, "kind": kind.value, "at": now_wall,
                                 "deadline_wall": deadline_wall})
        if self._post is not None:
            self._post(notice)
        return notice

    # ------------------------------------------------------------ Component

    def start(self, post: Post) -> None:
        """Start one thread per watcher and say what is watched and whether saves fit."""
        self._post = post
        fit = self._budget.assess()
        log.info("preemption.watching", source=self.provider, watchers=sorted(self.watchers()),
                 **fit.to_json())
        if self._grace_seconds is not None and self._grace_seconds > fit.window_seconds:
            log.warning(
                "preemption.deadline_at_risk",
                source=self.provider,
                grace_seconds=self._grace_seconds,
                window_seconds=fit.window_seconds,
                note="stop.grace_seconds is longer than this provider's warning window",
            )
        self._warn_if_unfit()
        for wname, step in self.watchers().items():
            self._trouble[wname] = TroubleLog(self.provider, wname)
            t = threading.Thread(
                target=self._loop, args=(wname, step), name=f"preemptd-{self.provider}-{wname}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Stop polling; cuts in-flight requests; returns within about a second."""
        self._stopping.set()
        self._wake.set()
        for client in self.clients():
            client.abort()
        deadline = self._clock.monotonic() + JOIN_SECONDS
        for t in self._threads:
            t.join(max(0.0, deadline - self._clock.monotonic()))

    def status(self) -> dict[str, Any]:
        """Source state, error counts, recent notices and the deadline verdict."""
        with self._lock:
            posted = list(self._posted)
        troubles = {n: t for n, t in self._trouble.items()}
        failing = [n for n, t in troubles.items() if t.failures]
        if self._stopping.is_set():
            state = "stopped"
        elif failing:
            state = "degraded"
        else:
            state = "watching"
        return {
            "source": self.provider,
            "state": state,
            "polls": self._polls,
            "last_ok": self._last_ok_wall,
            "errors": {n: t.total for n, t in troubles.items() if t.total},
            "last_error": {n: t.last_error for n, t in troubles.items() if t.failures} or None,
            "notices": posted,
            **self._budget.assess().to_json(),
        }

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """Remember how long saves take; warn when one would no longer fit the window."""
        self._budget.record(report.seconds)
        self._warn_if_unfit()

    def before_worker_start(self, checkpoint_dir: str) -> None:
        """Before the first start, learn the save time of the newest checkpoint, if recorded."""
        if self._looked_for_save_time or self._budget.last_save_seconds is not None:
            return
        self._looked_for_save_time = True
        seconds = _recorded_save_seconds(checkpoint_dir)
        if seconds is not None:
            self._budget.record(seconds)
            self._warn_if_unfit()

    # ------------------------------------------------------------ internals

    def _warn_if_unfit(self) -> None:
        fit = self._budget.assess()
        if fit.fits is False and not self._fit_warned:
            self._fit_warned = True
            log.warning(
                "preemption.deadline_at_risk",
                source=self.provider,
                **fit.to_json(),
                note="the last checkpoint took longer than a preemption notice allows; "
                "save less state or use faster storage",
            )
        elif fit.fits and self._fit_warned:
            self._fit_warned = False
            log.info("preemption.deadline_ok", source=self.provider, **fit.to_json())

    def _loop(self, wname: str, step: Watcher) -> None:
        trouble = self._trouble[wname]
        while not self._stopping.is_set():
            try:
                wait = step()
            except MetadataError as exc:
                if self._stopping.is_set():
                    return
                wait = self._backoff.delay(trouble.failures + 1)
                trouble.failed(exc, wait)
            except Exception as exc:  # noqa: BLE001 - a bug in one poll must not end the watch
                wait = self._backoff.delay(trouble.failures + 1)
                log.error("preemption.source_crashed", source=self.provider, watcher=wname,
                          error=f"{type(exc).__name__}: {exc}", retry_seconds=wait, exc_info=True)
                trouble.failures += 1
                trouble.total += 1
                trouble.last_error = f"bug: {type(exc).__name__}: {exc}"
            else:
                trouble.ok()
                self._polls += 1
                self._last_ok_wall = self._clock.wall()
            if wait > 0:
                self._wake.wait(wait)
                if not self._stopping.is_set():
                    self._wake.clear()


def _recorded_save_seconds(checkpoint_dir: str) -> float | None:
    """The save duration the newest checkpoint's manifest records (`seconds`), if any."""
    for entry in reversed(contract.committed(checkpoint_dir)):
        try:
            manifest = contract.read_manifest(entry.path)
        except contract.InvalidCheckpoint:
            continue
        seconds = manifest.seconds if manifest.seconds is not None else manifest.extra.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return float(seconds)
        return None
    return None
