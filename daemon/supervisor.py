"""The supervisor's main loop: launch, watch, restart and stop the training worker.

Event-driven: one selector waits on the worker's pidfd (exit seen within
milliseconds), the worker socket (reports), and a wake-up pipe written by signal
handlers (which only record) and by `post()` (components' threads). Each turn of the
loop first *observes* (drains reports, signals, posted events, the worker's exit)
and then *decides* in small handlers that move the lifecycle state machine.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from daemon import contract, statefile
from daemon.clock import Clock, SystemClock
from daemon.components import CheckpointFailure, CheckpointReport, Component, Notice, NoticeKind
from daemon.config import Config, ConfigError
from daemon.lifecycle import Lifecycle, State
from daemon.lock import StateDirLock
from daemon.notify import SYSTEMD_ENV, Notifier
from daemon.restart_policy import RestartPolicy
from daemon.spawner import CommandNotExecutable, ExitStatus, GroupGuard, PosixSpawner, Spawner, WorkerProcess
from daemon.worker_socket import WorkerSocket

log = structlog.get_logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A step-only change is written to the state file at most this often (fsync per heartbeat
# would cost more than the training step it reports).
STEP_WRITE_INTERVAL = 5.0
# systemd's stop timeout is extended by the grace plus this much for our own cleanup.
STOP_EXTEND_MARGIN = 10.0
MAX_NOTICES = 20
MAX_BATCHES_PER_TURN = 8
# How long a worker may survive SIGKILL (uninterruptible sleep) before the daemon moves on.
UNKILLABLE_SECONDS = 10.0

# Fields of preemption.notice that a notice's free-form details must not overwrite.
_RESERVED_LOG_KEYS = frozenset({"event", "level", "timestamp", "source", "kind", "deadline", "seconds_left"})

# Stop reasons.
REASON_OPERATOR = "operator"
REASON_PREEMPTION = "preemption"


@dataclass
class _Stop:
    reason: str
    source: str
    requested_wall: float
    newest_step_before: int | None
    final: CheckpointReport | None = None


class Supervisor:
    """Runs one worker command under the lifecycle state machine until a terminal state.

    `run()` returns the daemon's exit code (see daemon.contract EXIT_*). Construct with
    the components from daemon.assembly.build_components; tests may inject their own
    components, spawner and clock.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        components: Sequence[Component] = (),
        clock: Clock | None = None,
        spawner: Spawner | None = None,
        spawner_factory: Callable[[GroupGuard | None], Spawner] | None = None,
        policy: RestartPolicy | None = None,
        environ: Mapping[str, str] | None = None,
        install_signals: bool = True,
        guard: bool = True,
    ) -> None:
        self.cfg = cfg
        self.components = list(components)
        self.clock = clock or SystemClock()
        self.environ = dict(os.environ if environ is None else environ)
        self.policy = policy or RestartPolicy.from_config(cfg.restart)
        self.state_dir = Path(cfg.daemon.state_dir)
        self.checkpoint_dir = Path(cfg.checkpoint.dir)
        self._install_signals = install_signals and threading.current_thread() is threading.main_thread()
        self._use_guard = guard
        self._spawner = spawner
        # Builds the spawner once the guard exists (e.g. the warm-standby spawner).
        self._spawner_factory = spawner_factory
        self._guard: GroupGuard | None = None

        self.lifecycle = Lifecycle(on_change=self._on_state_change)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._post_lock = threading.Lock()
        self._closed = False
        self._signals: collections.deque[int] = collections.deque()
        self._posted: collections.deque[object] = collections.deque()
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self._lock = StateDirLock(self.state_dir)
        self._socket: WorkerSocket | None = None
        self._notifier = Notifier(self.environ)

        # Worker facts.
        self.worker: WorkerProcess | None = None
        self._worker_started = 0.0
        self._handles: set[str] = set()
        self._heartbeat_seen = False
        self._last_heartbeat = 0.0
        self.restarts = 0
        self.step: int | None = None
        self.last_exit: ExitStatus | None = None
        self.last_checkpoint: CheckpointReport | None = None
        self._last_checkpoint_wall: float | None = None
        self.notices: list[dict[str, Any]] = []
        self._stop: _Stop | None = None
        self.exit_code: int | None = None
        self.failure: str | None = None  # why the command could not run at all (exit 78)

        # Deadlines (monotonic) and bookkeeping.
        self._restart_at: float | None = None
        self._kill_at: float | None = None
        self._abandon_at: float | None = None  # give up on a worker that survives SIGKILL
        self._next_progress: float | None = None
        self._progress_mark: tuple[float, int | None] | None = None
        self._next_watchdog: float | None = None
        self._state_dirty = True
        self._step_dirty = False
        self._next_step_write = 0.0
        self._ready_sent = False
        self._started_wall = self.clock.wall()

    # ------------------------------------------------------------------ public

    def post(self, event: object) -> None:
        """Deliver `event` to the main loop (thread-safe; wakes the loop; dropped after exit)."""
        with self._post_lock:
            if self._closed:
                return
            self._posted.append(event)
            self._wake()

    def run(self) -> int:
        """Supervise until training finished, a stop completed or the budget ran out."""
        self._prepare_dirs()
        self._lock.acquire()
        try:
            return self._run_locked()
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ set-up

    def _prepare_dirs(self) -> None:
        cwd = self.cfg.worker.cwd
        if cwd and not os.path.isdir(cwd):
            raise ConfigError(f"worker.cwd: {cwd}: not a directory")
        for key, path, mode in (
            ("daemon.state_dir", self.state_dir, 0o700),
            ("checkpoint.dir", self.checkpoint_dir, 0o755),
        ):
            try:
                path.mkdir(parents=True, exist_ok=True, mode=mode)
                probe = path / f".preemptd-probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(
                    f"{key}: {path}: not a writable directory ({exc.strerror or exc})"
                ) from None

    def _run_locked(self) -> int:
        try:
            if self._use_guard:
                # Fork the guard before any thread exists (components start below).
                self._guard = GroupGuard()
                self._guard.start()
            if self._spawner is None:
                factory = self._spawner_factory or PosixSpawner
                self._spawner = factory(self._guard)
            try:
                self._socket = WorkerSocket(self.state_dir)
            except ValueError as exc:
                raise ConfigError(f"daemon.state_dir: {exc}") from None
            except OSError as exc:
                raise ConfigError(f"daemon.state_dir: cannot create the worker socket: {exc}") from None
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._selector.register(self._socket.fileno(), selectors.EVENT_READ, "socket")
            if self._install_signals:
                self._setup_signals()
            self._start_components()
            self._remove_stale_temps()
            self.lifecycle.move(
                State.STARTING,
                pid=os.getpid(),
                state_dir=str(self.state_dir),
                checkpoint_dir=str(self.checkpoint_dir),
                command=list(self.cfg.worker.command),
                components=[c.name for c in self.components],
                systemd=self._notifier.enabled,
            )
            if self._notifier.watchdog_interval:
                self._next_watchdog = self.clock.monotonic()
            self._start_worker()
            self._flush_state()
            while self.exit_code is None:
                self._turn()
            return self.exit_code
        finally:
            self._teardown()

    def _setup_signals(self) -> None:
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, signal.SIGUSR1):
            self._old_handlers[sig] = signal.signal(sig, self._record_signal)

    def _record_signal(self, signum: int, frame: object) -> None:
        # Handlers only record; the main loop acts (and the wake-up fd woke it).
        self._signals.append(signum)

    def _start_components(self) -> None:
        for comp in self.components:
            try:
                comp.start(self.post)
            except Exception as exc:  # noqa: BLE001 - a helper failing must not stop supervision
                log.error("component.failed", component=comp.name, hook="start", error=repr(exc))

    def _teardown(self) -> None:
        started = self.lifecycle.state is not State.INIT
        for comp in self.components:
            try:
                comp.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log.error("component.failed", component=comp.name, hook="stop", error=repr(exc))
        if self.worker is not None:  # only on an unexpected error: never leave a worker behind
            self.worker.signal_group(signal.SIGKILL)
            self.worker.send_signal(signal.SIGKILL)
        if self._install_signals:
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
        if started:
            self._write_state()
        if self._socket is not None:
            self._socket.close()
        close_spawner = getattr(self._spawner, "close", None)
        if callable(close_spawner):  # e.g. a warm-standby spawner kills its spare process
            close_spawner()
        if self._guard is not None:
            self._guard.close()
        self._notifier.close()
        self._selector.close()
        with self._post_lock:
            # A component thread may still post: never write into a closed (reused) fd.
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -------------------------------------------------------------- main loop

    def _turn(self) -> None:
        timeout = self._next_timeout()
        for key, _ in self._selector.select(timeout):
            if key.data == "wake":
                self._drain_wake()
        # Observe first, in an order that keeps causality: a worker's last report is read
        # before its exit; stop requests are seen before an exit so we never restart then.
        self._drain_socket()
        self._handle_requests()
        if self.worker is not None:
            status = self.worker.poll()
            if status is not None:
                # Whatever the worker sent before it died is queued by now (AF_UNIX sendto is
                # synchronous), but may have arrived after the drain above: read it first, or
                # a final checkpoint report would be missed.
                self._drain_socket()
                self._on_worker_exit(status)
        if self.exit_code is None:
            self._on_timers(self.clock.monotonic())
        self._flush_state()

    def _handle_requests(self) -> None:
        """Act on recorded signals and posted events (stop, checkpoint, notices)."""
        while self._signals:
            self._on_signal(self._signals.popleft())
        while self._posted:
            self._on_posted(self._posted.popleft())

    def _drain_socket(self) -> None:
        if self._socket is None:
            return
        # Bounded so that a worker flooding the socket cannot starve the loop.
        for _ in range(MAX_BATCHES_PER_TURN):
            for msg in self._socket.receive():
                self._on_message(msg)
            if self._socket.empty:
                return

    def _next_timeout(self) -> float | None:
        deadlines = [d for d in (self._restart_at, self._kill_at, self._abandon_at, self._next_progress,
                                 self._next_watchdog, self._hang_deadline()) if d is not None]
        if self._step_dirty:
            deadlines.append(self._next_step_write)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock.monotonic())

    def _wake(self) -> None:
        # A full pipe means the loop is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------- observing

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in STOP_SIGNALS:
            self._request_stop(REASON_OPERATOR, name)
        elif signum == signal.SIGUSR1:
            self._request_checkpoint(name)

    def _on_posted(self, event: object) -> None:
        if isinstance(event, Notice):
            self._on_notice(event)
        else:
            log.warning("daemon.unknown_event", event_type=type(event).__name__)

    def _on_message(self, msg: dict[str, Any]) -> None:
        if self.worker is None:
            log.debug("worker.message_ignored", type=msg.get("type"), why="no worker running")
            return
        kind = msg["type"]
        now = self.clock.monotonic()
        if kind == contract.MSG_HELLO:
            handles = set(msg.get("handles", []))
            if handles != self._handles:  # workers repeat their hello; log what changes
                log.info("worker.hello", pid=msg.get("pid"), handles=sorted(handles),
                         framework=msg.get("framework"))
            self._handles = handles
            return
        # Everything else proves the worker is alive and moving.
        self._heartbeat_seen = True
        self._last_heartbeat = now
        step = msg["step"]
        if self.step is None or step != self.step:
            self.step = step
            self._step_dirty = True
        if kind == contract.MSG_CHECKPOINT:
            self._on_checkpoint(CheckpointReport(
                step=step, path=msg["path"], bytes=msg["bytes"],
                seconds=float(msg["seconds"]), reason=msg["reason"],
            ))
        elif kind == contract.MSG_CHECKPOINT_FAILED:
            error = str(msg.get("error", ""))[:500]
            failure = CheckpointFailure(step=step, reason=msg["reason"], error=error)
            log.warning("checkpoint.failed", step=step, reason=failure.reason, error=failure.error,
                        restart=self.restarts)
            for comp in self.components:
                self._call(comp, "on_checkpoint_failed", failure)
        elif kind == contract.MSG_EXPORT:
            log.info("export.committed", step=step, path=msg["path"], bytes=msg["bytes"],
                     seconds=msg["seconds"])

    def _on_checkpoint(self, report: CheckpointReport, seen_by: str = "report") -> None:
        self.last_checkpoint = report
        self._last_checkpoint_wall = self.clock.wall()
        log.info("checkpoint.committed", step=report.step, path=report.path, bytes=report.bytes,
                 seconds=report.seconds, reason=report.reason, restart=self.restarts, seen_by=seen_by)
        if self._stop is not None:
            self._stop.final = report
        self._state_dirty = True
        for comp in self.components:
            self._call(comp, "on_checkpoint", report)

    def _on_notice(self, notice: Notice) -> None:
        now_wall = self.clock.wall()
        seconds_left = None
        deadline_wall = notice.deadline_wall
        if notice.deadline is not None:
            seconds_left = round(notice.deadline - self.clock.monotonic(), 1)
            if deadline_wall is None:
                deadline_wall = now_wall + seconds_left
        elif deadline_wall is not None:
            seconds_left = round(deadline_wall - now_wall, 1)
        details = {k: v for k, v in notice.details.items()
                   if isinstance(k, str) and k not in _RESERVED_LOG_KEYS}
        log.warning("preemption.notice", source=notice.source, kind=notice.kind.value,
                    deadline=_iso(deadline_wall), seconds_left=seconds_left, **details)
        self.notices.append({
            "source": notice.source, "kind": notice.kind.value, "wall": now_wall,
            "deadline_wall": deadline_wall, "seconds_left": seconds_left,
        })
        del self.notices[:-MAX_NOTICES]
        self._state_dirty = True
        if notice.kind is NoticeKind.STOP:
            self._request_stop(REASON_PREEMPTION, notice.source)
        elif notice.kind is NoticeKind.CHECKPOINT:
            self._request_checkpoint(notice.source)
        # CANCELLED: logged only. A stop already under way is not undone: the worker may
        # be half-way through its final checkpoint, and the VM may still go.

    # -------------------------------------------------------------- deciding

    def _request_checkpoint(self, source: str) -> None:
        state = self.lifecycle.state
        if self.worker is None or state is not State.RUNNING:
            log.info("checkpoint.requested", source=source, delivered=False,
                     why=f"no running worker (state {state.value})")
            return
        if "SIGUSR1" not in self._handles:
            # SIGUSR1 would kill a worker that does not handle it.
            log.info("checkpoint.requested", source=source, delivered=False,
                     why="worker has not announced that it handles SIGUSR1")
            return
        delivered = self.worker.send_signal(signal.SIGUSR1)
        log.info("checkpoint.requested", source=source, delivered=delivered, pid=self.worker.pid)

    def _request_stop(self, reason: str, source: str) -> None:
        state = self.lifecycle.state
        if self._stop is not None or state.terminal:
            # Never cut a final checkpoint short: repeated requests change nothing.
            log.info("daemon.stop_repeated", reason=reason, source=source, state=state.value)
            return
        now = self.clock.monotonic()
        newest = contract.newest_valid(self.checkpoint_dir, checksums=False)
        self._stop = _Stop(reason, source, self.clock.wall(), newest[0].step if newest else None)
        grace = self.cfg.stop.grace_seconds
        if state in (State.RUNNING, State.HUNG) and self.worker is not None:
            if state is State.RUNNING:
                self.worker.send_signal(signal.SIGTERM)
            self._kill_at = now + grace if self._kill_at is None else min(self._kill_at, now + grace)
            self._notifier.stopping(grace + STOP_EXTEND_MARGIN, f"stopping ({reason}): final checkpoint")
            self.lifecycle.move(State.STOPPING, reason=reason, source=source, grace_seconds=grace,
                                pid=self.worker.pid)
        else:
            self._restart_at = None
            self._notifier.stopping(STOP_EXTEND_MARGIN, f"stopping ({reason}): no worker running")
            self._finish_stop()

    def _on_worker_exit(self, status: ExitStatus, reaped: bool = True) -> None:
        worker = self.worker
        assert worker is not None
        prev = self.lifecycle.state
        now = self.clock.monotonic()
        uptime = now - self._worker_started
        # Grandchildren die with the worker: the group is ours to clean.
        worker.signal_group(signal.SIGKILL)
        if self._spawner is not None and reaped:
            self._spawner.forget(worker)
        fd = worker.fileno()
        if fd is not None:
            self._selector.unregister(fd)
        worker.close()
        self.worker = None
        self._kill_at = None
        self._abandon_at = None
        self.last_exit = status
        self.lifecycle.move(State.EXITED, pid=worker.pid, exit_code=status.code,
                            signal=status.signal_name, uptime_seconds=round(uptime, 3),
                            restart=self.restarts, step=self.step, **({} if reaped else {"unkillable": True}))
        if prev is State.STOPPING:
            self._finish_stop()
        elif prev is State.RUNNING and status.success:
            self.exit_code = contract.EXIT_OK
            self.lifecycle.move(State.FINISHED, reason="finished", exit_code=self.exit_code, step=self.step)
            self._notifier.stopping(STOP_EXTEND_MARGIN, "training finished")
            # The last checkpoint of a finished run is its final one: components such
            # as the remote mirror must see it through before the daemon exits.
            for comp in self.components:
                self._call(comp, "on_final_checkpoint", self.last_checkpoint)
        else:
            self._on_failure(uptime, "hung" if prev is State.HUNG else "crashed")

    def _on_failure(self, uptime: float, why: str) -> None:
        now = self.clock.monotonic()
        decision = self.policy.on_failure(now, uptime)
        if not decision.restart:
            self.exit_code = contract.EXIT_GAVE_UP
            self.lifecycle.move(State.GAVE_UP, why=why, restarts=self.restarts,
                                restarts_in_window=decision.in_window,
                                max_restarts=decision.max_restarts,
                                window_seconds=decision.window_seconds, exit_code=self.exit_code)
            return
        self._restart_at = now + decision.delay
        self.lifecycle.move(State.BACKOFF, why=why, restart=self.restarts + 1,
                            delay_seconds=round(decision.delay, 3), attempt=decision.attempt,
                            restarts_in_window=decision.in_window + 1,
                            max_restarts=decision.max_restarts)

    def _finish_stop(self) -> None:
        stop = self._stop
        assert stop is not None
        final = stop.final
        via = "report" if final is not None else None
        if final is None:
            # A worker that does not use the socket may still have committed one: a valid
            # checkpoint newer than the newest one at the stop request counts.
            newest = contract.newest_valid(self.checkpoint_dir, checksums=False)
            if newest is not None and (stop.newest_step_before is None
                                       or newest[0].step > stop.newest_step_before):
                entry, manifest = newest
                final = CheckpointReport(step=entry.step, path=str(entry.path),
                                         bytes=manifest.total_bytes, seconds=0.0,
                                         reason=manifest.reason)
                via = "scan"
                # Components (e.g. the remote mirror) get it like a reported one.
                self._on_checkpoint(final, seen_by=via)
        confirmed = final is not None
        self.exit_code = contract.EXIT_OK if confirmed else contract.EXIT_UNCONFIRMED
        self.lifecycle.move(
            State.STOPPED, reason=stop.reason, source=stop.source, confirmed=confirmed,
            confirmed_by=via, step=final.step if final else None, path=final.path if final else None,
            seconds=round(self.clock.wall() - stop.requested_wall, 3), exit_code=self.exit_code,
        )
        for comp in self.components:
            self._call(comp, "on_final_checkpoint", final)

    def _on_timers(self, now: float) -> None:
        state = self.lifecycle.state
        if self._kill_at is not None and now >= self._kill_at and self.worker is not None:
            self._kill_at = None
            self._abandon_at = now + UNKILLABLE_SECONDS
            log.warning("worker.killed", pid=self.worker.pid, signal="SIGKILL",
                        why="grace expired", grace_seconds=self.cfg.stop.grace_seconds)
            self.worker.signal_group(signal.SIGKILL)
            self.worker.send_signal(signal.SIGKILL)
        if self._abandon_at is not None and now >= self._abandon_at and self.worker is not None:
            # Still there after SIGKILL: stuck in the kernel (e.g. a wedged GPU driver).
            # Waiting longer cannot help; go on as if it died so the daemon can act.
            log.error("worker.unkillable", pid=self.worker.pid, seconds=UNKILLABLE_SECONDS)
            self._on_worker_exit(ExitStatus(None, signal.SIGKILL), reaped=False)
            return
        hang_at = self._hang_deadline()
        if hang_at is not None and now >= hang_at and self.worker is not None:
            silent = now - self._last_heartbeat
            self.worker.send_signal(signal.SIGTERM)
            self._kill_at = now + self.cfg.stop.grace_seconds
            self.lifecycle.move(State.HUNG, pid=self.worker.pid, silent_seconds=round(silent, 3),
                                step=self.step, hang_timeout_seconds=self.cfg.restart.hang_timeout_seconds)
        if state is State.BACKOFF and self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self._start_worker()
        if self._next_progress is not None and now >= self._next_progress:
            self._log_progress(now)
        if self._next_watchdog is not None and now >= self._next_watchdog:
            # Sent from the loop itself: a wedged loop stops the pings and systemd acts.
            self._notifier.watchdog()
            assert self._notifier.watchdog_interval is not None
            self._next_watchdog = now + self._notifier.watchdog_interval

    def _hang_deadline(self) -> float | None:
        timeout = self.cfg.restart.hang_timeout_seconds
        if timeout <= 0 or not self._heartbeat_seen or self.lifecycle.state is not State.RUNNING:
            return None
        return self._last_heartbeat + timeout

    def _log_progress(self, now: float) -> None:
        interval = self.cfg.daemon.progress_interval_seconds
        self._next_progress = now + interval
        if self.lifecycle.state not in (State.RUNNING, State.HUNG, State.STOPPING):
            return
        rate = None
        if self._progress_mark is not None:
            t0, s0 = self._progress_mark
            if s0 is not None and self.step is not None and now > t0:
                rate = round((self.step - s0) / (now - t0), 3)
        self._progress_mark = (now, self.step)
        log.info("worker.progress", step=self.step, steps_per_second=rate,
                 checkpoint_age_seconds=self._checkpoint_age(), restart=self.restarts,
                 pid=self.worker.pid if self.worker else None)

    # --------------------------------------------------------------- starting

    def _start_worker(self) -> None:
        for comp in self.components:
            self._call(comp, "before_worker_start", str(self.checkpoint_dir))
        # A hook may have taken long (e.g. fetching a remote checkpoint): a stop asked for
        # meanwhile wins over starting a worker only to stop it again.
        self._handle_requests()
        if self.exit_code is not None:
            return
        self._remove_stale_temps()
        newest = contract.newest_valid(self.checkpoint_dir, checksums=False)
        resume = str(newest[0].path) if newest else ""
        env = self._worker_env(resume)
        assert self._spawner is not None
        cmd = list(self.cfg.worker.command)
        try:
            worker = self._spawner.spawn(cmd, env, self.cfg.worker.cwd or None)
        except CommandNotExecutable as exc:
            self.exit_code = contract.EXIT_CONFIG
            self.failure = f"worker.command: {exc}"
            self.lifecycle.move(State.FAILED, error=f"worker.command: {exc}", command=cmd,
                                exit_code=self.exit_code)
            return
        except OSError as exc:  # transient (fork EAGAIN, ENOMEM): a failure like a crash
            self.lifecycle.move(State.EXITED, error=str(exc), command=cmd, restart=self.restarts)
            self._on_failure(0.0, "start error")
            return
        self.worker = worker
        self._worker_started = self.clock.monotonic()
        self._handles = set()
        self._heartbeat_seen = False
        fd = worker.fileno()
        if fd is not None:
            self._selector.register(fd, selectors.EVENT_READ, "worker")
        elif self._install_signals and signal.SIGCHLD not in self._old_handlers:
            # No pidfd (old kernel): SIGCHLD through the wake-up fd wakes the loop instead.
            self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._record_nothing)
        self._progress_mark = (self._worker_started, None)  # a resumed worker may restart lower
        self._next_progress = self._worker_started + self.cfg.daemon.progress_interval_seconds
        self.lifecycle.move(State.RUNNING, pid=worker.pid, restart=self.restarts, resume=resume,
                            resume_step=newest[0].step if newest else None, command=cmd)
        if not self._ready_sent:
            self._ready_sent = True
            self._notifier.ready(self._status_line())

    def _record_nothing(self, signum: int, frame: object) -> None:
        """SIGCHLD handler: the wake-up fd already woke the loop, which polls the worker."""

    def _worker_env(self, resume: str) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in SYSTEMD_ENV}
        env.update(self.cfg.worker.env)
        ck = self.cfg.checkpoint
        assert self._socket is not None
        env.update({
            contract.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
            contract.ENV_RESUME: resume,
            contract.ENV_RESTART: str(self.restarts),
            contract.ENV_SOCKET: self._socket.path,
            contract.ENV_GRACE_SECONDS: f"{self.cfg.stop.grace_seconds:g}",
            contract.ENV_EVERY_STEPS: str(ck.every_steps),
            contract.ENV_EVERY_SECONDS: f"{ck.every_seconds:g}",
            contract.ENV_KEEP: str(ck.keep),
            contract.ENV_KEEP_EVERY_HOURS: f"{ck.keep_every_hours:g}",
            contract.ENV_CONTROL: str(self.state_dir / "control.json"),
            contract.ENV_LOG_FORMAT: self.cfg.daemon.log_format,
        })
        return env

    def _remove_stale_temps(self) -> None:
        for entry in contract.stale_temp_dirs(self.checkpoint_dir):
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                log.warning("checkpoint.stale_remove_failed", path=str(entry.path), error=str(exc))
            else:
                log.info("checkpoint.stale_removed", path=str(entry.path), step=entry.step,
                         writer_pid=entry.writer_pid)

    # ------------------------------------------------------------ components

    def _call(self, comp: Component, hook: str, *args: Any) -> None:
        try:
            getattr(comp, hook)(*args)
        except Exception as exc:  # noqa: BLE001 - a helper failing must not stop supervision
            log.error("component.failed", component=comp.name, hook=hook, error=repr(exc))

    # ----------------------------------------------------------------- state

    def _on_state_change(self, prev: State, new: State) -> None:
        # Written once at the end of this turn of the loop (before it sleeps again): a
        # crash-and-restart is three moves, and each rename costs milliseconds.
        self._state_dirty = True

    def _flush_state(self) -> None:
        now = self.clock.monotonic()
        if self._step_dirty and now >= self._next_step_write:
            self._state_dirty = True
        if self._state_dirty:
            self._write_state()
            self._notifier.status(self._status_line())

    def _checkpoint_age(self) -> float | None:
        if self._last_checkpoint_wall is None:
            return None
        return round(max(0.0, self.clock.wall() - self._last_checkpoint_wall), 1)

    def _status_line(self) -> str:
        age = self._checkpoint_age()
        return (f"{self.lifecycle.state.value}; step {self.step if self.step is not None else '-'}; "
                f"checkpoint age {f'{age:.0f}s' if age is not None else '-'}; restarts {self.restarts}")

    def snapshot(self) -> dict[str, Any]:
        """The state file's content (see daemon.statefile for the contract keys)."""
        ck = self.last_checkpoint
        data: dict[str, Any] = {
            "state": self.lifecycle.state.value,
            "daemon_pid": os.getpid(),
            "worker_pid": self.worker.pid if self.worker else None,
            "step": self.step,
            "restarts": self.restarts,
            "last_exit": {
                "code": self.last_exit.code if self.last_exit else None,
                "signal": self.last_exit.signal_name if self.last_exit else None,
            },
            "last_checkpoint": {
                "path": ck.path if ck else None,
                "step": ck.step if ck else None,
                "reason": ck.reason if ck else None,
                "age_seconds": self._checkpoint_age(),
                "wall": self._last_checkpoint_wall,
                "bytes": ck.bytes if ck else None,
            },
            "notices": list(self.notices),
            "disk": self._disk(),
            "updated": self.clock.wall(),
            "started": self._started_wall,
            "state_dir": str(self.state_dir),
            "checkpoint_dir": str(self.checkpoint_dir),
            "command": list(self.cfg.worker.command),
            "exit_code": self.exit_code,
            "stop": ({"reason": self._stop.reason, "source": self._stop.source}
                     if self._stop else None),
            "restart_budget": {
                "used_in_window": self.policy.restarts_in_window(self.clock.monotonic()),
                "max_restarts": self.cfg.restart.max_restarts,
                "window_seconds": self.cfg.restart.window_seconds,
            },
            "components": [c.name for c in self.components],
        }
        for comp in self.components:
            try:
                status = comp.status()
            except Exception as exc:  # noqa: BLE001 - report it in place of the status
                log.error("component.failed", component=comp.name, hook="status", error=repr(exc))
                status = {"error": repr(exc)}
            if comp.name == "disk" and isinstance(status, dict):
                data["disk"].update(status)  # the disk guard's view refines psutil's
            elif comp.name in data:
                data[f"component.{comp.name}"] = status
            else:
                data[comp.name] = status
        return data

    def _disk(self) -> dict[str, Any]:
        try:
            usage = psutil.disk_usage(str(self.checkpoint_dir))
        except OSError:
            return {"percent": None, "free_bytes": None}
        return {"percent": usage.percent, "free_bytes": usage.free}

    def _write_state(self) -> None:
        self._state_dirty = False
        self._step_dirty = False
        self._next_step_write = self.clock.monotonic() + STEP_WRITE_INTERVAL
        try:
            statefile.write(self.state_dir, self.snapshot())
        except OSError as exc:  # a full disk must not stop supervision
            log.error("state.write_failed", path=str(statefile.path_in(self.state_dir)), error=str(exc))


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
