"""Disk guard: watches the checkpoint volume and prunes before it fills.

A watchdog observer on the checkpoint dir (inotify, or polling for network
filesystems) wakes the guard's own thread on every change; a slow timer
(`disk.interval_seconds`) wakes it too. Each wake-up observes the volume
(injected `disk_usage`, the checkpoint folders and their sizes), asks the pure
policy (daemon/disk_policy.py) what to do, and carries it out in this thread:

* deletes committed checkpoints in `retention.prune_order` (`disk.pruned`), never
  the newest valid one (checked with checksums before anything is deleted) and
  never an hourly anchor;
* removes `.tmp-` folders whose writer is gone (`disk.stale_temp_removed`), never
  one whose writer is alive;
* leaves everything that does not follow the layout alone (`disk.foreign_entry`,
  logged once per name);
* logs `disk.pressure` once per upward crossing of warn/prune_percent;
* tells the worker to skip periodic saves while there is no room for the next
  checkpoint by writing `<state_dir>/control.json` (removed when space returns).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon import contract, disk_policy
from daemon.clock import Clock
from daemon.components import CheckpointFailure, CheckpointReport, Component, Post
from daemon.config import Config, DiskConfig
from daemon.disk_policy import Decision, DiskState, Usage
from daemon.disk_scan import CheckpointDirView, disk_bytes, newest_mtime

log = structlog.get_logger()

CONTROL_NAME = "control.json"
# Coalesce bursts of events (a save writes many chunks) into at most this rate.
MIN_EVAL_SPACING_SECONDS = 0.05
# A dead writer's `.tmp-` folder must also be this old before it goes: a writer in
# another pid namespace (container) looks dead to us but keeps touching its files.
STALE_TEMP_GRACE_SECONDS = 5.0
POLLING_OBSERVER_SECONDS = 1.0
# Bound on delete/re-measure rounds per wake-up (each round deletes at least one).
MAX_PRUNE_ROUNDS = 8
# Only these events can change usage; opens/reads (ours included) must not wake us.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,
    FileClosedEvent,
]
# Not TF's ResourceExhaustedError as such: that is also how GPU out-of-memory reads.
_ENOSPC_MARKERS = ("no space left", "enospc", "disk quota exceeded", "edquot")

UsageFn = Callable[[str], Any]  # returns an object with total, used, free (psutil.disk_usage)


class _WakeHandler(FileSystemEventHandler):
    """Filesystem events only wake the guard's thread; all work happens there."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._wake()


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def is_space_error(error: str) -> bool:
    """Whether a worker's save error text says the disk (or quota) was full."""
    text = error.lower()
    return any(marker in text for marker in _ENOSPC_MARKERS) or f"errno {errno.ENOSPC}" in text


class DiskGuard(Component):
    """Keeps the checkpoint volume from filling up (see the module docstring)."""

    name = "disk"

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        cfg: DiskConfig,
        clock: Clock,
        disk_usage: UsageFn = psutil.disk_usage,
        keep_every_hours: float = 0.0,
        stale_grace_seconds: float = STALE_TEMP_GRACE_SECONDS,
        background_checks: bool = True,
    ) -> None:
        """`disk_usage(path)` returns total/used/free like psutil.disk_usage (injected in
        tests); `background_checks=False` reads checksums inline (single-threaded tests)."""
        self._dir = Path(checkpoint_dir)
        self._control = Path(state_dir) / CONTROL_NAME
        self._cfg = cfg
        self._clock = clock
        self._disk_usage = disk_usage
        self._keep_every_hours = keep_every_hours
        self._stale_grace = stale_grace_seconds

        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._watched_ino: int | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._eval_lock = threading.Lock()  # one evaluation at a time (thread or tests)
        self._status_lock = threading.Lock()

        # Facts handed over by the supervisor's hooks (main loop -> guard thread).
        self._hook_lock = threading.Lock()
        self._reported_bytes = 0
        self._space_failure = False

        # Guard-thread state.
        self._latch = disk_policy.PressureLatch()
        self._view = CheckpointDirView(self._dir, on_checked=self._wake.set,
                                       background=background_checks)
        self._doomed: set[Path] = set()  # folders we renamed to delete and have not finished
        self._skip_written: bool | None = None  # None: control file not yet synced
        self._exhausted_logged = False
        self._errors: dict[str, str] = {}  # event -> the failure last logged (logged once)
        self._recheck_at: float | None = None  # monotonic; a stale temp folder comes of age
        self._last_eval_end = -math.inf

        self._status: dict[str, Any] = {
            "percent": None,
            "free_bytes": None,
            "total_bytes": None,
            "state": DiskState.OK.value,
            "pruned_count": 0,
            "pruned_bytes": 0,
            "need_bytes": 0,
            "skip_periodic": False,
            "observer": "",
        }

    @classmethod
    def from_config(cls, cfg: Config, clock: Clock, disk_usage: UsageFn = psutil.disk_usage) -> DiskGuard:
        """The guard for a daemon config (checkpoint dir, state dir, [disk], keep_every_hours)."""
        return cls(
            cfg.checkpoint.dir,
            cfg.daemon.state_dir,
            cfg.disk,
            clock,
            disk_usage=disk_usage,
            keep_every_hours=cfg.checkpoint.keep_every_hours,
        )

    @property
    def control_path(self) -> Path:
        """Where the skip-periodic instruction is written (the worker's PREEMPTD_CONTROL)."""
        return self._control

    # ------------------------------------------------------------- lifecycle

    def start(self, post: Post) -> None:
        """Start watching and the guard thread; the first check runs at once.

        Nothing is posted: the supervisor reads status() whenever it writes the state file.
        """
        self._stopping.clear()
        for folder in (self._dir, self._control.parent):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.error("disk.dir_failed", path=str(folder), error=str(exc))
        self._start_observer()
        self._thread = threading.Thread(target=self._run, name="preemptd-diskguard", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """Stop the observer and the guard thread (a deletion in progress finishes on its own)."""
        self._stopping.set()
        self._wake.set()
        self._stop_observer()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        self._view.close()

    def status(self) -> dict[str, Any]:
        """percent, free_bytes, total_bytes, state, pruned_count, pruned_bytes (+ need_bytes, ...)."""
        with self._status_lock:
            return dict(self._status)

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """A commit tells the size of the next one and ends any 'save failed' alarm."""
        with self._hook_lock:
            self._reported_bytes = report.bytes
            self._space_failure = False
        self._wake.set()

    def on_checkpoint_failed(self, failure: CheckpointFailure) -> None:
        """A save that failed for lack of space makes the guard free all it may, once."""
        if is_space_error(failure.error):
            with self._hook_lock:
                self._space_failure = True
            self._wake.set()

    def before_worker_start(self, checkpoint_dir: str) -> None:
        """A worker died or is about to start: sweep its leftovers now (non-blocking)."""
        self._wake.set()

    def wake(self) -> None:
        """Ask for a check now (the thread coalesces bursts)."""
        self._wake.set()

    # ------------------------------------------------------------- watching

    def _start_observer(self) -> None:
        kinds = [self._cfg.observer] + (["polling"] if self._cfg.observer != "polling" else [])
        for kind in kinds:
            try:
                observer = self._make_observer(kind)
                observer.schedule(
                    _WakeHandler(self._wake.set), os.fspath(self._dir),
                    recursive=True, event_filter=WATCHED_EVENTS,
                )
                observer.start()
            except OSError as exc:  # inotify limits, a filesystem without inotify, missing dir
                self._error_once(f"disk.watch_failed.{kind}", observer=kind, path=str(self._dir),
                                 error=str(exc))
                continue
            self._errors.pop(f"disk.watch_failed.{kind}", None)
            self._errors.pop("disk.watch_failed", None)
            self._observer = observer
            with contextlib.suppress(OSError):
                self._watched_ino = os.stat(self._dir).st_ino
            with self._status_lock:
                self._status["observer"] = kind
            return
        self._error_once("disk.watch_failed", path=str(self._dir), fallback="timer only",
                         seconds=self._cfg.interval_seconds)

    @staticmethod
    def _make_observer(kind: str) -> BaseObserver:
        if kind == "polling":
            return PollingObserver(timeout=POLLING_OBSERVER_SECONDS)
        from watchdog.observers.inotify import InotifyObserver  # Linux only

        return InotifyObserver()

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=1.0)

    def _rewatch_if_replaced(self) -> None:
        """The checkpoint dir was deleted and made again: its old watch sees nothing."""
        try:
            ino = os.stat(self._dir).st_ino
        except OSError:
            return
        if self._observer is None or ino != self._watched_ino:
            self._stop_observer()
            self._start_observer()

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = self._clock.monotonic()
            due = now + self._cfg.interval_seconds
            if self._recheck_at is not None:
                due = min(due, self._recheck_at)
            self._wake.wait(timeout=max(0.0, due - now))
            if self._stopping.is_set():
                break
            self._wake.clear()
            spacing = MIN_EVAL_SPACING_SECONDS - (self._clock.monotonic() - self._last_eval_end)
            if spacing > 0 and self._stopping.wait(spacing):
                break
            self._rewatch_if_replaced()
            try:
                self.evaluate()
            except Exception as exc:  # noqa: BLE001 - a bug must not silently end the guard
                log.exception("disk.check_failed", error=repr(exc))
            self._last_eval_end = self._clock.monotonic()

    # ------------------------------------------------------------- one check

    def evaluate(self) -> Decision | None:
        """Observe, decide, act once (the guard thread calls this; tests may too).

        Returns the final decision, or None when the volume could not be measured.
        """
        with self._eval_lock:
            return self._evaluate()

    def _evaluate(self) -> Decision | None:
        usage = self._read_usage()
        if usage is None:
            return None
        observed = usage  # before any deletion: the pressure that was seen
        entries = self._view.scan()
        for path in self._view.new_foreign_entries():
            log.info("disk.foreign_entry", path=str(path), action="left untouched")
        if self._remove_stale_temps(entries):
            usage = self._read_usage() or usage
            entries = self._view.scan()
        last = self._view.last_bytes(entries)
        if last is None:
            with self._hook_lock:
                last = self._reported_bytes
        need = disk_policy.need_bytes(last, self._view.largest_partial(entries, self._doomed),
                                      self._cfg.margin)
        with self._hook_lock:
            space_failure = self._space_failure  # cleared below once all that may go is gone
        newest = self._view.newest_committed(entries)
        if newest is not None and usage.percent >= self._cfg.warn_percent:
            self._view.checksums_ok(newest)  # read early: pruning may be near

        decision = self._decide(usage, entries, need, space_failure)
        for _ in range(MAX_PRUNE_ROUNDS):
            if not decision.prune or self._stopping.is_set():
                break
            reason = "save_failed" if space_failure else (
                "pressure" if usage.percent >= self._cfg.prune_percent else "room_for_next_save")
            self._prune(decision.prune, entries, reason, usage)
            before, usage = usage, self._read_usage() or usage
            entries = self._view.scan()
            decision = self._decide(usage, entries, need, space_failure)
            if usage.free <= before.free:
                # Nothing measurable came back (space still held by an open file, or a
                # filesystem that reports late): wait for the next check, not delete more.
                break

        if space_failure and not self._view.held_back:
            # Done freeing what may go (no folder held back for a pending checksum read;
            # when one was, the read's end wakes us to finish).
            with self._hook_lock:
                self._space_failure = False
        self._report(observed, usage, decision)
        return decision

    def _decide(
        self, usage: Usage, entries: list[contract.Entry], need: int, space_failure: bool
    ) -> Decision:
        """Candidates (with sizes and checks) are gathered only when pruning may be needed."""
        wanted = space_failure or disk_policy.over_limits(usage, need, self._cfg)
        cands = self._view.candidates(entries) if wanted else []
        return disk_policy.decide(usage, cands, need, self._cfg, self._keep_every_hours, space_failure)

    # ------------------------------------------------------------- observing

    def _read_usage(self) -> Usage | None:
        try:
            du = self._disk_usage(os.fspath(self._dir))
        except OSError as exc:
            self._error_once("disk.usage_failed", path=str(self._dir), error=str(exc))
            return None
        self._errors.pop("disk.usage_failed", None)
        return Usage(total=int(du.total), used=int(du.used), free=int(du.free))

    def _error_once(self, key: str, **fields: Any) -> None:
        """Log a failure that repeats on every check only when it first happens or changes.

        `key` is the dotted event name, optionally with a suffix that separates cases.
        """
        value = repr(sorted(fields.items()))
        if self._errors.get(key) != value:
            event = ".".join(key.split(".")[:2])
            log.error(event, **fields)
            self._errors[key] = value

    # ------------------------------------------------------------- acting

    def _remove_stale_temps(self, entries: list[contract.Entry]) -> bool:
        """Remove `.tmp-` folders whose writer is gone; True when any went."""
        removed = False
        self._recheck_at = None
        for entry in entries:
            if entry.writer_pid is None:
                continue
            if entry.path not in self._doomed:  # ours: a deletion cut short, always ours to finish
                if contract.pid_alive(entry.writer_pid):
                    continue
                age = self._clock.wall() - newest_mtime(entry.path)
                if age < self._stale_grace:
                    when = self._clock.monotonic() + self._stale_grace - age + 0.1
                    self._recheck_at = when if self._recheck_at is None else min(self._recheck_at, when)
                    continue
            size = disk_bytes(entry.path)
            if self._rmtree(entry.path):
                removed = True
                if entry.path in self._doomed:
                    self._doomed.discard(entry.path)
                else:
                    log.info("disk.stale_temp_removed", path=str(entry.path), step=entry.step,
                             writer_pid=entry.writer_pid, bytes=size)
        return removed

    def _prune(
        self, steps: tuple[int, ...], entries: list[contract.Entry], reason: str, usage: Usage
    ) -> None:
        paths = {e.step: e.path for e in entries if not e.is_temp}
        for step in steps:
            if self._stopping.is_set():
                return
            path = paths.get(step)
            if path is None:
                continue
            size = disk_bytes(path)
            # Rename first, to a `.tmp-` name (never read, "being written" by us): no reader
            # ever sees a half-deleted committed folder, and if we die halfway the leftover
            # is a stale temp folder that the next daemon removes.
            doomed = path.with_name(contract.temp_dirname(step, os.getpid()))
            if os.path.lexists(doomed):
                log.error("disk.prune_failed", path=str(path), step=step,
                          error=f"{doomed.name} already exists")
                continue
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                continue  # the worker's own retention removed it meanwhile
            except OSError as exc:
                log.error("disk.prune_failed", path=str(path), step=step, error=str(exc))
                continue
            self._doomed.add(doomed)
            if self._rmtree(doomed):
                self._doomed.discard(doomed)
            with self._status_lock:
                self._status["pruned_count"] += 1
                self._status["pruned_bytes"] += size
            log.info("disk.pruned", path=str(path), step=step, bytes=size, reason=reason,
                     percent_before=round(usage.percent, 1))

    @staticmethod
    def _rmtree(path: Path) -> bool:
        """Remove a folder tree; failures (other than racing removals) are logged. True when gone."""

        def onexc(func: Callable[..., Any], failed: str, exc: BaseException) -> None:
            if not isinstance(exc, FileNotFoundError):
                log.error("disk.remove_failed", path=failed, error=str(exc))

        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=onexc)
        else:
            shutil.rmtree(path, onerror=lambda f, p, info: onexc(f, p, info[1]))
        return not path.exists()

    def _report(self, observed: Usage, usage: Usage, decision: Decision) -> None:
        """Log transitions, sync the control file, publish status (`usage`: after pruning)."""
        crossed = self._latch.crossings(observed.percent, self._cfg)
        crossed += self._latch.crossings(usage.percent, self._cfg)  # re-arms after pruning
        for level in crossed:
            threshold = self._cfg.warn_percent if level == "warn" else self._cfg.prune_percent
            log.warning("disk.pressure", level=level, percent=round(observed.percent, 1),
                        threshold=threshold, free_bytes=observed.free, path=str(self._dir))
        if decision.exhausted and not self._exhausted_logged:
            log.warning("disk.prune_exhausted", percent=round(usage.percent, 1), free_bytes=usage.free,
                        need_bytes=decision.need_bytes,
                        detail="only the newest valid checkpoint, hourly anchors, folders being "
                               "written and foreign files remain")
        self._exhausted_logged = decision.exhausted

        state = disk_policy.classify(usage, decision.need_bytes, self._cfg)
        self._sync_control(state is DiskState.LOW_SPACE, usage, decision.need_bytes)
        with self._status_lock:
            changed = self._status["state"] != state.value
            self._status.update(
                percent=round(usage.percent, 2),
                free_bytes=usage.free,
                total_bytes=usage.total,
                state=state.value,
                need_bytes=decision.need_bytes,
                skip_periodic=bool(self._skip_written),
            )
        if changed:
            log.info("disk.state", state=state.value, percent=round(usage.percent, 1), free_bytes=usage.free)

    def _sync_control(self, skip: bool, usage: Usage, need: int) -> None:
        """Write or remove `<state_dir>/control.json` when the instruction changes."""
        if skip == self._skip_written:
            return
        try:
            if skip:
                reason = (f"{_mib(usage.free)} free on {self._dir}, the next checkpoint needs "
                          f"{_mib(need)}; periodic saves resume when space returns")
                contract.write_json_atomic(self._control, {"skip_periodic": True, "reason": reason})
                log.warning("disk.skip_periodic", free_bytes=usage.free, need_bytes=need,
                            control=str(self._control))
            else:
                try:
                    os.unlink(self._control)
                except FileNotFoundError:
                    pass
                else:
                    contract.fsync_dir(self._control.parent)
                if self._skip_written:
                    log.info("disk.space_returned", free_bytes=usage.free, need_bytes=need)
        except OSError as exc:  # e.g. the state dir is on the full volume; retried next check
            self._error_once("disk.control_failed", path=str(self._control), error=str(exc))
            return
        self._errors.pop("disk.control_failed", None)
        self._skip_written = skip
