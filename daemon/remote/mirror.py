"""The remote mirror `Component`: uploads committed checkpoints, fetches one at start.

All uploads run on the mirror's own thread; the supervisor's hooks only queue work
(`on_checkpoint`), read a snapshot (`status`) or, on the stop path, wait a bounded time
for the final checkpoint's upload (`on_final_checkpoint`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from daemon import contract
from daemon.clock import Clock, SystemClock
from daemon.components import CheckpointReport, Component, Post
from daemon.config import RemoteConfig
from daemon.remote.fetch import FetchResult, fetch_newest
from daemon.remote.journal import JOURNAL_NAME, Journal
from daemon.remote.limiter import MB, from_mbps
from daemon.remote.prune import prune_remote
from daemon.remote.queue import URGENT, Job, UploadQueue, backoff_delay, priority_of
from daemon.remote.store import RemoteStore, open_store
from daemon.remote.upload import (
    BLOCK_BYTES,
    CHUNK_BYTES,
    Aborted,
    Permanent,
    Transfer,
    UploadResult,
    upload_checkpoint,
)

log = structlog.get_logger()

UPLOADER_NICE = 10  # added to the daemon's niceness: the uploader yields the CPU to training
_MAX_REMEMBERED = 64  # committed steps remembered for the stop path's question


class RemoteMirror(Component):
    """Mirror of the checkpoint dir on object storage (any fsspec URL)."""

    name = "remote"

    def __init__(
        self,
        cfg: RemoteConfig,
        *,
        checkpoint_dir: str,
        state_dir: str | None,
        grace_seconds: float,
        store: RemoteStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Opens the store (no request yet): ConfigError when the URL or its package is wrong."""
        self._cfg = cfg
        self._store = store if store is not None else open_store(cfg)
        self._clock = clock or SystemClock()
        self._checkpoint_dir = Path(checkpoint_dir)
        self._final_wait = cfg.final_wait_seconds or grace_seconds
        journal_path = Path(state_dir) / JOURNAL_NAME if state_dir else None
        self._journal = Journal(journal_path, self._store.display_url)
        self._limiter = from_mbps(cfg.bandwidth_mbps, self._clock, BLOCK_BYTES + CHUNK_BYTES)
        self._queue = UploadQueue(cfg.keep)
        self._cond = threading.Condition()
        self._interrupt = threading.Event()  # cuts a throttle pause short
        self._stop_event = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._journal_ops: list[Callable[[], None]] = []  # done on the uploader thread
        self._current: Job | None = None
        self._done_bytes = 0
        # For the stop path's question "did the checkpoint reported at T reach the remote?":
        self._reported: dict[int, float] = {}  # step -> monotonic time of its latest report
        self._committed: dict[int, tuple[float, float]] = {}  # step -> (commit time, job start time)
        self._bytes_uploaded = 0
        self._uploads = 0
        self._failures = 0
        self._last_commit: dict[str, Any] | None = None
        self._last_error: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None
        self._fetched: dict[str, Any] | None = None
        self._local_checked = False

    # ------------------------------------------------------------------ hooks

    def start(self, post: Post) -> None:
        """Start the uploader thread (it first re-queues what the journal says is unfinished)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="preemptd-remote", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop uploading within about a second; unfinished uploads stay in the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop_event.set()
        self._interrupt.set()
        if self._thread is not None:
            # An SDK call in flight cannot be cut; the thread is a daemon thread.
            self._thread.join(timeout=1.0)

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """Queue the upload of a committed checkpoint; returns at once."""
        now = self._clock.monotonic()
        path = report.path
        if not os.path.isabs(path):
            path = str(self._checkpoint_dir / Path(path).name)
        urgent = priority_of(report.reason) == URGENT
        job = Job(step=report.step, path=path, reason=report.reason, enqueued=now,
                  deadline=now + self._final_wait if urgent else None, total_bytes=report.bytes)
        with self._cond:
            self._reported[report.step] = now
            _trim(self._reported)
            self._push(job)
            current = self._current
            if current is not None and job.priority < current.priority:
                self._interrupt.set()
            self._cond.notify_all()

    def on_final_checkpoint(self, report: CheckpointReport | None) -> None:
        """Wait (bounded) for the final checkpoint to reach the remote; log and record whether it did.

        The bound is `remote.final_wait_seconds` (default: the stop grace) from the
        checkpoint's report. With no confirmed final checkpoint, waits for the newest
        upload still pending, if any.
        """
        started = self._clock.monotonic()
        with self._cond:
            unseen = report is not None and report.step not in self._reported
        if unseen and report is not None:
            self.on_checkpoint(report)  # the supervisor may report the final one only here
        with self._cond:
            if report is not None:
                step: int | None = report.step
            else:
                live = [j.step for j in self._queue.jobs()]
                if self._current is not None:
                    live.append(self._current.step)
                step = max(live) if live else None
            if step is None:
                self._final = {"step": None, "reached_remote": None, "pending": 0}
                final = dict(self._final)
            else:
                final = self._wait_for_step(step, started)
        if final.get("reached_remote") is False:
            log.warning("remote.final", **final)
        else:
            log.info("remote.final", **final)

    def _wait_for_step(self, step: int, started: float) -> dict[str, Any]:
        """Block (lock held) until `step` as last reported is on the remote, or the deadline."""
        job = self._live_job(step)
        reported_at = self._reported.get(step, job.enqueued if job is not None else started)
        deadline = reported_at + self._final_wait
        if job is not None and job.deadline is not None:
            deadline = job.deadline
        while not self._reached(step, reported_at) and self._live_job(step) is not None:
            now = self._clock.monotonic()
            if now >= deadline:
                break
            self._cond.wait(min(deadline - now, 1.0))
        reached = self._reached(step, reported_at)
        seconds = self._committed[step][0] - reported_at if reached else None
        self._final = {
            "step": step,
            "reached_remote": reached,
            "seconds": None if seconds is None else round(seconds, 3),
            "deadline_seconds": self._final_wait,
            "waited_seconds": round(self._clock.monotonic() - started, 3),
        }
        return dict(self._final)

    def _reached(self, step: int, reported_at: float) -> bool:
        # Only an upload that started after the report read what the report announced.
        done = self._committed.get(step)
        return done is not None and done[1] >= reported_at

    def before_worker_start(self, checkpoint_dir: str) -> None:
        """With no valid local checkpoint, fetch the newest valid remote one (retrying)."""
        # Full checksums once per daemon run; later starts only check sizes (cheap).
        checksums = not self._local_checked
        self._local_checked = True
        if contract.newest_valid(checkpoint_dir, checksums=checksums) is not None:
            return
        attempt = 0
        while not self._stop_event.is_set():
            try:
                result = fetch_newest(self._store, Path(checkpoint_dir))
            except Exception as exc:  # noqa: BLE001 - any SDK/network error: logged, retried, bounded
                attempt += 1
                error = self._store.scrub(f"{type(exc).__name__}: {exc}")
                if attempt > self._cfg.retries:
                    log.error("remote.fetch_failed", url=self._store.display_url, attempt=attempt,
                              error=error, retry=False)
                    return
                delay = backoff_delay(attempt, self._cfg.backoff_initial_seconds,
                                      self._cfg.backoff_max_seconds)
                log.warning("remote.fetch_failed", url=self._store.display_url, attempt=attempt,
                            error=error, retry_in_seconds=delay)
                self._stop_event.wait(delay)
                continue
            if result is None:
                log.info("remote.fetch_empty", url=self._store.display_url)
            else:
                self._record_fetch(result)
            return

    def status(self) -> dict[str, Any]:
        """Queue, progress of the upload in flight, bytes uploaded, last remote commit."""
        with self._cond:
            now = self._clock.monotonic()
            current = self._current
            uploading = None
            if current is not None:
                total = current.total_bytes
                uploading = {
                    "step": current.step,
                    "reason": current.reason,
                    "bytes_done": self._done_bytes,
                    "bytes_total": total,
                    "percent": round(100.0 * self._done_bytes / total, 1) if total else None,
                }
            return {
                "url": self._store.display_url,
                "queue": [
                    {"step": j.step, "reason": j.reason, "attempts": j.attempts,
                     "retry_in_seconds": round(max(0.0, j.not_before - now), 1)}
                    for j in self._queue.jobs()
                ],
                "uploading": uploading,
                "bytes_uploaded": self._bytes_uploaded,
                "uploads": self._uploads,
                "failures": self._failures,
                "bandwidth_mbps": self._cfg.bandwidth_mbps,
                "last_commit": self._last_commit,
                "last_error": self._last_error,
                "final": self._final,
                "fetched": self._fetched,
                "summary": self._summary(now, uploading),
            }

    def _summary(self, now: float, uploading: dict[str, Any] | None) -> str:
        """One line for people (lock held)."""
        parts = [self._store.display_url]
        if self._last_commit is not None:
            age = max(0.0, self._clock.wall() - self._last_commit["at"])
            parts.append(f"last step {self._last_commit['step']} ({age:.0f} s ago)")
        else:
            parts.append("nothing uploaded yet")
        if uploading is not None:
            pct = uploading["percent"]
            parts.append(f"uploading step {uploading['step']}" + (f" {pct:.0f}%" if pct is not None else ""))
        if len(self._queue):
            parts.append(f"{len(self._queue)} queued")
        if self._last_error is not None and (self._last_commit is None
                                             or self._last_error["at"] > self._last_commit["at"]):
            parts.append(f"last error: {self._last_error['error'][:120]}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ queue helpers (lock held)

    def _push(self, job: Job) -> None:
        """Queue `job` unless the same step is already queued as urgently (lock held).

        A job in flight for the same step does not count: it may have read an older
        folder of that step, so the new one is checked again (cheap when unchanged).
        """
        existing = self._queue.get(job.step)
        if existing is not None and existing.key <= job.key:
            if job.deadline is not None:  # the stop path waits on this one now
                existing.deadline = job.deadline if existing.deadline is None else min(
                    existing.deadline, job.deadline)
            return
        for dropped in self._queue.push(job):
            log.info("remote.upload_skipped", step=dropped.step, reason=dropped.reason,
                     why="superseded: newer checkpoints queued beyond remote.keep")
            self._journal_ops.append(functools.partial(self._journal.remove, dropped.step))
        if job.step in self._queue:
            self._journal_ops.append(functools.partial(self._journal.add, job.step, job.path, job.reason))

    def _live_job(self, step: int) -> Job | None:
        """The job that will upload `step` last: a queued one, else the one in flight."""
        queued = self._queue.get(step)
        if queued is not None:
            return queued
        if self._current is not None and self._current.step == step:
            return self._current
        return None

    # ------------------------------------------------------------------ uploader thread

    def _run(self) -> None:
        _lower_priority()
        resumed = False
        while True:
            try:
                if not resumed:
                    resumed = True
                    self._resume()
                self._loop()
                return
            except Exception as exc:  # noqa: BLE001 - a mirror bug must not end uploads for good
                log.error("remote.uploader_failed", error=repr(exc))
                with self._cond:
                    self._current = None
                    self._last_error = {"step": None, "error": repr(exc), "at": self._clock.wall()}
                if self._stop_event.wait(5.0):
                    return

    def _loop(self) -> None:
        while True:
            with self._cond:
                ops, self._journal_ops = self._journal_ops, []
            for op in ops:
                op()
            with self._cond:
                if self._stopping:
                    return
                if self._journal_ops:
                    continue
                now = self._clock.monotonic()
                job = self._queue.pop_ready(now)
                if job is None:
                    nxt = self._queue.next_ready_at()
                    self._cond.wait(None if nxt is None else max(0.01, nxt - now))
                    continue
                self._current = job
                job.started = now
                self._done_bytes = 0
                self._interrupt.clear()
            try:
                self._attempt(job)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _resume(self) -> None:
        """Re-queue unfinished uploads from the journal, and the newest local checkpoint."""
        now = self._clock.monotonic()
        resumed = []
        for entry in self._journal.load():
            if not Path(entry["path"]).is_dir():
                self._journal.remove(entry["step"])
                continue
            job = Job(step=entry["step"], path=entry["path"], reason=entry["reason"], enqueued=now,
                      resumed=True)
            with self._cond:
                self._push(job)
            resumed.append(entry["step"])
        if resumed:
            log.info("remote.resumed", steps=sorted(resumed), url=self._store.display_url)
        # A checkpoint committed while no daemon ran (or before the journal saw it).
        newest = contract.newest_valid(self._checkpoint_dir, checksums=False)
        if newest is not None:
            local, manifest = newest
            with self._cond:
                if self._live_job(local.step) is None:
                    self._push(Job(step=local.step, path=str(local.path), reason=manifest.reason,
                                   enqueued=now, resumed=True))

    def _should_abort(self, job: Job) -> bool:
        with self._cond:
            return self._stopping or self._queue.has_more_urgent(job, self._clock.monotonic())

    def _on_progress(self, done: int, total: int) -> None:
        with self._cond:
            self._done_bytes = done
            if self._current is not None and total:
                self._current.total_bytes = total

    def _attempt(self, job: Job) -> None:
        urgent = job.priority == URGENT
        transfer = Transfer(
            # The bound protects training; a preemption upload races the VM's end instead.
            limiter=None if urgent else self._limiter,
            wait=self._interrupt.wait,
            should_abort=lambda: self._should_abort(job),
            on_progress=self._on_progress,
        )
        try:
            result = upload_checkpoint(self._store, job, self._journal, transfer)
        except Aborted:
            with self._cond:
                if not self._stopping:
                    self._push(job)
            log.debug("remote.upload_paused", step=job.step, reason=job.reason)
            return
        except Permanent as exc:
            self._journal.remove(job.step)
            with self._cond:
                self._cond.notify_all()
            if exc.gone:
                log.info("remote.upload_skipped", step=job.step, reason=job.reason, why=str(exc))
            else:
                self._note_error(job, str(exc))
                log.error("remote.upload_failed", step=job.step, reason=job.reason, error=str(exc),
                          retry=False)
            return
        except Exception as exc:  # noqa: BLE001 - any SDK/network error: logged, retried with backoff
            self._retry(job, self._store.scrub(f"{type(exc).__name__}: {exc}"))
            return
        self._succeeded(job, result)

    def _retry(self, job: Job, error: str) -> None:
        job.attempts += 1
        self._note_error(job, error)
        if job.attempts > self._cfg.retries:
            self._journal.remove(job.step)
            with self._cond:
                self._cond.notify_all()
            log.error("remote.upload_failed", step=job.step, reason=job.reason, attempt=job.attempts,
                      error=error, retry=False)
            return
        delay = backoff_delay(job.attempts, self._cfg.backoff_initial_seconds,
                              self._cfg.backoff_max_seconds)
        job.not_before = self._clock.monotonic() + delay
        log.warning("remote.upload_failed", step=job.step, reason=job.reason, attempt=job.attempts,
                    error=error, retry=True, retry_in_seconds=delay)
        with self._cond:
            if self._stopping:
                return
            queued = self._queue.get(job.step)
            if queued is not None and queued is not job:
                # The same step was reported again while this try was in flight (e.g. the
                # start-up scan and the worker's report): one job, one retry count.
                queued.attempts = max(queued.attempts, job.attempts)
                queued.not_before = max(queued.not_before, job.not_before)
            else:
                self._push(job)

    def _note_error(self, job: Job, error: str) -> None:
        with self._cond:
            self._failures += 1
            self._last_error = {"step": job.step, "error": error, "at": self._clock.wall()}

    def _succeeded(self, job: Job, result: UploadResult) -> None:
        now = self._clock.monotonic()
        lag = now - job.enqueued
        before_deadline = None if job.deadline is None else now <= job.deadline
        self._journal.remove(job.step)
        with self._cond:
            self._committed[job.step] = (now, job.started)
            _trim(self._committed)
            self._bytes_uploaded += result.bytes_sent
            self._uploads += 0 if result.already_committed else 1
            self._last_commit = {
                "step": job.step,
                "reason": job.reason,
                "path": self._store.where(result.name),
                "bytes": result.total_bytes,
                "at": self._clock.wall(),
                "lag_seconds": round(lag, 3),
            }
            self._cond.notify_all()
        mbps = result.bytes_sent / result.seconds / MB if result.seconds > 0 else None
        log.info(
            "remote.uploaded",
            step=job.step,
            reason=job.reason,
            path=self._store.where(result.name),
            bytes=result.total_bytes,
            sent_bytes=result.bytes_sent,
            files=result.files_sent,
            skipped_files=result.files_skipped,
            already=result.already_committed,
            seconds=round(result.seconds, 3),
            lag_seconds=round(lag, 3),
            mbps=None if mbps is None else round(mbps, 2),
            before_deadline=before_deadline,
            resumed=job.resumed,
        )
        self._prune()

    def _prune(self) -> None:
        with self._cond:
            protected = {j.step for j in self._queue.jobs()}
        try:
            prune_remote(self._store, self._cfg.keep, protected)
        except Exception as exc:  # noqa: BLE001 - any SDK/network error: logged, tried after the next upload
            log.warning("remote.prune_failed", url=self._store.display_url,
                        error=self._store.scrub(f"{type(exc).__name__}: {exc}"))

    def _record_fetch(self, result: FetchResult) -> None:
        with self._cond:
            self._fetched = {
                "step": result.step,
                "path": result.path,
                "source": result.source,
                "bytes": result.bytes,
                "seconds": round(result.seconds, 3),
            }
        log.info("remote.fetched", step=result.step, path=result.path, source=result.source,
                 bytes=result.bytes, seconds=round(result.seconds, 3), reason=result.reason)


def _trim(d: dict[int, Any]) -> None:
    """Keep the newest steps only (the stop path asks about recent ones)."""
    while len(d) > _MAX_REMEMBERED:
        del d[min(d)]


def _lower_priority() -> None:
    """Nice the calling thread (Linux: per thread) so uploads yield the CPU to training.

    Relative to the daemon's own niceness, so it never raises a priority.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + UPLOADER_NICE))
    except (AttributeError, OSError) as exc:
        log.debug("remote.nice_failed", error=str(exc))
