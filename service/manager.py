"""CheckpointManager: durable periodic, requested, preemption and final saves; exact restore.

    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, data=iterator, rng=generator)
    manager = service.CheckpointManager(ckpt)      # dir and policy from PREEMPTD_* env or keywords
    start = manager.restore_or_initialize()         # step to resume from; 0 when fresh
    for step in range(start, total_steps):
        train_step()
        manager.step_done(step + 1)
    manager.close()                                 # final save, waits for background commits

Periodic and requested saves copy the state on the training thread and write,
fsync, commit and prune on one background thread (at most one save in flight).
A stop request (SIGTERM) waits for that, saves synchronously and durably, reports
and raises SystemExit(0) from step_done.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
import tensorflow as tf

from daemon import contract
from daemon.clock import Clock, SystemClock
from service import commit as commit_mod
from service.errors import CheckpointError, CheckpointMismatch
from service.fastexit import FastExit
from service.policy import CopyPolicy, PeriodicPolicy, StepTimer
from service.priority import DEFAULT_BACKGROUND_NICE, lower_thread_priority
from service.reporter import DEFAULT_HEARTBEAT_INTERVAL, Reporter
from service.restore import FILE_PREFIX, Restored, Unreadable, restore_newest
from service.settings import Settings
from service.signals import SignalRequests
from service.snapshot import Snapshotter, SnapshotUnsupported

log = structlog.get_logger()

Reason = contract.Reason


def framework_versions() -> dict[str, str]:
    """Versions recorded in every manifest."""
    versions = {"tensorflow": tf.__version__}
    try:
        import keras

        versions["keras"] = keras.__version__
    except ImportError:
        pass
    return versions


class CheckpointManager:
    """Durable, non-blocking checkpoints of a `tf.train.Checkpoint` for a training loop."""

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        directory: str | os.PathLike[str] | None = None,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep: int | None = None,
        keep_every_hours: float | None = None,
        checksums: bool = True,
        async_save: bool = True,
        handle_signals: bool = True,
        strict: bool = True,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        background_nice: int = DEFAULT_BACKGROUND_NICE,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Keywords override the daemon's PREEMPTD_* env, which overrides the defaults.

        checksums: verify crc32 of every file on restore (sizes are always checked).
        async_save: periodic/requested saves off the training thread (False: synchronous).
        handle_signals: SIGUSR1 = checkpoint now, SIGTERM = checkpoint and exit 0.
        strict: a restore that leaves an existing object unmatched is a CheckpointMismatch.
        background_nice: added to the nice value of the thread that writes periodic and
            requested saves (0 = same priority as training); emergency saves run on the
            training thread at its priority.
        """
        self.settings = Settings.resolve(
            environ,
            directory=directory,
            every_steps=every_steps,
            every_seconds=every_seconds,
            keep=keep,
            keep_every_hours=keep_every_hours,
        )
        self.directory = self.settings.directory
        commit_mod.prepare_directory(self.directory)
        self._checkpoint = checkpoint
        self._checksums = checksums
        self._strict = strict
        self._clock = clock or SystemClock()
        self._versions = framework_versions()
        self._policy = PeriodicPolicy(self.settings.every_steps, self.settings.every_seconds)
        self._policy.reset(0, self._clock.monotonic())
        self._steps = StepTimer()
        self._copy_policy = CopyPolicy()
        self._reporter = Reporter(
            self.settings.socket_path, clock=self._clock, heartbeat_interval=heartbeat_interval
        )
        self._signals = SignalRequests()
        self._fast_exit = FastExit()
        if handle_signals and self._signals.install():
            self._fast_exit.install()
            self._reporter.hello(f"tensorflow {tf.__version__}")
        self._snapshotter: Snapshotter | None = None
        self._async = async_save
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="preemptd-commit",
            initializer=lower_thread_priority, initargs=(background_nice,),
        )
        self._inflight: Future[commit_mod.Committed] | None = None
        self._inflight_step: int | None = None
        self._lock = threading.Lock()
        self._last_committed: commit_mod.Committed | None = None
        self._last_step: int | None = None  # step of the newest committed/restored checkpoint
        self._step = 0
        self._extra: dict[str, Any] = {}
        self._closed = False
        self.restored: Restored | None = None

    # ------------------------------------------------------------------ restore

    def restore_or_initialize(self) -> int:
        """Restore the newest valid checkpoint (falling back past damaged ones); return its step.

        Returns 0 and leaves the objects as they are when there is no checkpoint.
        Removes `.tmp-` folders left by dead writers first.
        """
        commit_mod.remove_stale_temp(self.directory)
        restored = restore_newest(
            self.directory, self._read, resume_hint=self.settings.resume, checksums=self._checksums
        )
        now = self._clock.monotonic()
        if restored is None:
            log.info("checkpoint.initialized", dir=str(self.directory), step=0)
            self._policy.reset(0, now)
            return 0
        step = restored.manifest.step
        self.restored = restored
        self._step = self._last_step = step
        self._extra = dict(restored.manifest.extra)
        self._policy.reset(step, now)
        log.info(
            "checkpoint.restored",
            path=str(restored.path),
            step=step,
            reason=restored.manifest.reason,
            seconds=round(restored.seconds, 3),
            bytes=restored.manifest.total_bytes,
            restart=self.settings.restart,
        )
        self._reporter.progress(step, force=True)
        return step

    @property
    def restored_extra(self) -> dict[str, Any]:
        """The `extra` mapping saved with the restored checkpoint ({} when fresh)."""
        return dict(self.restored.manifest.extra) if self.restored else {}

    def _read(self, file_prefix: str) -> None:
        try:
            status = self._checkpoint.read(file_prefix)
            if self._strict:
                status.assert_existing_objects_matched()
            else:
                status.expect_partial()
        except ValueError as exc:  # TF: "Received incompatible tensor with shape ..."
            raise CheckpointMismatch(str(exc)) from None
        except AssertionError as exc:  # unmatched objects: a different model structure
            raise CheckpointMismatch(str(exc).split("\n")[0]) from None
        except (tf.errors.OpError, OSError) as exc:
            raise Unreadable(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}") from None

    # ------------------------------------------------------------ training loop

    @property
    def step(self) -> int:
        """The last step passed to step_done (or restored)."""
        return self._step

    @property
    def stop_requested(self) -> bool:
        return self._signals.stop_requested

    def request_checkpoint(self) -> None:
        """Save at the next step boundary, as SIGUSR1 does."""
        self._signals.request_checkpoint()

    def request_stop(self) -> None:
        """Save durably and exit at the next step boundary, as SIGTERM does."""
        self._signals.request_stop()

    def step_done(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        """Call after every training step with the number of steps done.

        Sends a heartbeat; starts a periodic or requested save when due; on a stop
        request saves synchronously and raises SystemExit(0). Raises CheckpointError
        when a background save failed since the last call. `extra` (JSON-able) is
        stored in the manifest of the next checkpoint (e.g. epoch and batch).
        """
        self._step = step
        now = self._clock.monotonic()
        self._steps.tick(now)
        if extra is not None:
            self._extra = dict(extra)
        self._collect(block=False)
        self._reporter.progress(step)
        if self._signals.stop_requested:
            self._stop(step)
        if self._inflight is not None:
            return  # at most one save in flight: due saves wait for the next boundary
        if self._signals.checkpoint_requested:
            self._signals.clear_checkpoint()
            log.info("checkpoint.requested", step=step, source="signal")
            self._save(step, Reason.REQUESTED, blocking=not self._async)
            return
        if self._policy.due(step, now):
            control = contract.read_control(self.settings.control_path)
            if control.get("skip_periodic"):
                log.warning("checkpoint.skipped", step=step, reason=Reason.PERIODIC.value,
                            why=str(control.get("reason") or "daemon asked to skip periodic saves"))
                self._policy.reset(step, now)
                return
            self._save(step, Reason.PERIODIC, blocking=not self._async)

    def save(
        self, step: int | None = None, reason: Reason | str = Reason.REQUESTED, wait: bool = True
    ) -> Path:
        """Save now (outside the policy); returns the committed path (when wait) or the pending one."""
        step = self._step if step is None else step
        reason = Reason(reason)
        self._collect(block=True)
        committed = self._save(step, reason, blocking=wait)
        if committed is not None:
            return committed.path
        return self.directory / contract.checkpoint_dirname(step)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its failure."""
        self._collect(block=True)

    def close(self, step: int | None = None, final: bool = True) -> None:
        """Wait for background saves, write a final checkpoint (unless `final` is False), release."""
        if self._closed:
            return
        try:
            pending: CheckpointError | None = None
            try:
                self._collect(block=True)
            except CheckpointError as exc:
                pending = exc
            if final:
                final_step = self._step if step is None else step
                self._save(final_step, Reason.FINAL, blocking=True)
            if pending is not None:
                raise pending
        finally:
            self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A loop that failed (or exited via a stop request, already saved) gets no final save.
        self.close(final=exc_type is None)

    def _release(self) -> None:
        self._closed = True
        self._signals.uninstall()
        self._executor.shutdown(wait=True)
        if self._snapshotter is not None:
            self._snapshotter.close()
        self._reporter.close()

    # ------------------------------------------------------------------- saving

    def _stop(self, step: int) -> None:
        log.info("checkpoint.requested", step=step, source="SIGTERM", reason=Reason.PREEMPTION.value)
        try:
            self._collect(block=True)
        except CheckpointError as exc:
            # The emergency save below is what matters; the failure is already logged.
            log.warning("checkpoint.previous_failed", step=step, error=str(exc))
        self._save(step, Reason.PREEMPTION, blocking=True)
        self._release()
        log.info("worker.stopping", step=step, reason="stop requested")
        self._fast_exit.arm()
        raise SystemExit(0)

    def _save(self, step: int, reason: Reason, blocking: bool) -> commit_mod.Committed | None:
        """Start (or, when blocking, finish) the save of `step`; None when it runs in background."""
        started = time.monotonic()
        if self._last_step == step and self._already_committed(step):
            # Nothing new since the last checkpoint: confirm it instead of writing it again.
            self._report_existing(step, reason)
            return self._last_committed
        temp = self.directory / contract.temp_dirname(step)
        shutil.rmtree(temp, ignore_errors=True)
        try:
            temp.mkdir()
        except OSError as exc:
            self._failed(step, reason, exc, temp)
        self._policy.reset(step, self._clock.monotonic())
        extra = dict(self._extra)
        if not blocking and self._async:
            snapshotter = self._snapshot()
            if snapshotter is not None:
                collisions = snapshotter.take_collisions()
                if collisions:
                    self._copy_policy.collided(collisions)
                    # Training updated them first: TF copied them on the training thread.
                    log.info("checkpoint.copy_raced", variables=collisions,
                             defer_factor=self._copy_policy.factor)
                defer = self._copy_policy.defer(self._steps.median(), snapshotter.copy_seconds)
                try:
                    snapshotter.take(defer=defer)
                except SnapshotUnsupported as exc:
                    log.warning("checkpoint.async_unsupported", why=str(exc))
                    self._async = False
                    snapshotter = None
            if snapshotter is not None:
                # The pause of this save is not part of a training step.
                self._steps.restart(self._clock.monotonic())
                self._inflight_step = step
                self._inflight = self._executor.submit(
                    self._write_and_commit, snapshotter.write, temp, step, reason, started, extra
                )
                return None
        return self._write_and_commit(self._checkpoint.write, temp, step, reason, started, extra)

    def _snapshot(self) -> Snapshotter | None:
        if self._snapshotter is None:
            try:
                self._snapshotter = Snapshotter(self._checkpoint)
            except SnapshotUnsupported as exc:
                log.warning("checkpoint.async_unsupported", why=str(exc))
                self._async = False
                return None
        return self._snapshotter

    def _already_committed(self, step: int) -> bool:
        path = self.directory / contract.checkpoint_dirname(step)
        try:
            contract.verify(path, checksums=False)
        except contract.InvalidCheckpoint:
            return False
        return True

    def _write_and_commit(
        self,
        write: Callable[[str], Any],
        temp: Path,
        step: int,
        reason: Reason,
        started: float,
        extra: dict[str, Any],
    ) -> commit_mod.Committed:
        try:
            with commit_mod.EarlyFlusher(temp):
                write(str(temp / FILE_PREFIX))
            committed = commit_mod.commit(
                temp, step, reason.value, started=started, versions=self._versions, extra=extra
            )
        except Exception as exc:  # noqa: BLE001 - logged, reported, re-raised as CheckpointError
            self._failed(step, reason, exc, temp)
        with self._lock:
            self._last_committed = committed
            self._last_step = step
        log.info(
            "checkpoint.committed",
            step=step,
            path=str(committed.path),
            reason=reason.value,
            bytes=committed.bytes,
            seconds=round(committed.seconds, 3),
        )
        self._reporter.send(
            contract.MSG_CHECKPOINT,
            step=step,
            path=str(committed.path),
            bytes=committed.bytes,
            seconds=round(committed.seconds, 3),
            reason=reason.value,
        )
        commit_mod.apply_retention(self.directory, self.settings.keep, self.settings.keep_every_hours)
        return committed

    def _failed(self, step: int, reason: Reason, exc: BaseException, temp: Path) -> None:
        shutil.rmtree(temp, ignore_errors=True)
        error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        log.error("checkpoint.failed", step=step, reason=reason.value, error=error, dir=str(self.directory))
        self._reporter.send(
            contract.MSG_CHECKPOINT_FAILED, step=step, reason=reason.value, error=error[:1000]
        )
        raise CheckpointError(
            f"{reason.value} checkpoint of step {step} in {self.directory} failed: {error}"
            " (the previous checkpoint is intact)"
        ) from exc

    def _report_existing(self, step: int, reason: Reason) -> None:
        path = self.directory / contract.checkpoint_dirname(step)
        manifest = contract.read_manifest(path)
        log.info("checkpoint.committed", step=step, path=str(path), reason=reason.value,
                 bytes=manifest.total_bytes, seconds=0.0, unchanged=True)
        self._reporter.send(contract.MSG_CHECKPOINT, step=step, path=str(path),
                            bytes=manifest.total_bytes, seconds=0.0, reason=reason.value)

    def _collect(self, block: bool) -> None:
        """Reap the save in flight; raise CheckpointError if it failed."""
        fut = self._inflight
        if fut is None or (not block and not fut.done()):
            return
        self._inflight = None
        self._inflight_step = None
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, CheckpointError):
                raise exc
            raise CheckpointError(str(exc)) from exc
