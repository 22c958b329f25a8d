"""The integration contract with components (notices, hooks, status), in-process with real workers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from daemon import contract, statefile
from daemon.clock import SystemClock
from daemon.components import CheckpointReport, Component, Notice, NoticeKind, Post
from daemon.config import Config
from daemon.lifecycle import State
from daemon.supervisor import Supervisor
from tests.workers.harness import ROOT, worker_cmd


def make_cfg(tmp: Path, command: list[str], **restart: Any) -> Config:
    cfg = Config()
    cfg = cfg.replace("worker", command=tuple(command), env={"PYTHONPATH": str(ROOT),
                                                             "WORKER_LOG": str(tmp / "worker.log")})
    cfg = cfg.replace("daemon", state_dir=str(tmp / "s"))
    cfg = cfg.replace("checkpoint", dir=str(tmp / "c"))
    cfg = cfg.replace("stop", grace_seconds=10.0)
    if restart:
        cfg = cfg.replace("restart", **restart)
    return cfg


class Scripted(Component):
    """A component whose thread runs `script(self, post)`; it records every hook call."""

    name = "scripted"

    def __init__(self, script) -> None:
        self.script = script
        self.calls: list[tuple[str, Any]] = []
        self.checkpoint_seen = threading.Event()
        self.sup: Supervisor | None = None
        self._thread: threading.Thread | None = None
        self.stopped = False

    def start(self, post: Post) -> None:
        self.calls.append(("start", None))
        self._thread = threading.Thread(target=self.script, args=(self, post), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.calls.append(("stop", None))
        self.stopped = True

    def status(self) -> dict[str, Any]:
        return {"calls": len(self.calls), "ok": True}

    def before_worker_start(self, checkpoint_dir: str) -> None:
        self.calls.append(("before_worker_start", checkpoint_dir))

    def on_checkpoint(self, report: CheckpointReport) -> None:
        self.calls.append(("on_checkpoint", report))
        self.checkpoint_seen.set()

    def on_final_checkpoint(self, report: CheckpointReport | None) -> None:
        self.calls.append(("on_final_checkpoint", report))

    def hooks(self, name: str) -> list[Any]:
        return [arg for hook, arg in self.calls if hook == name]


def wait(pred, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def run(sup: Supervisor) -> tuple[int, list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as logs:
        code = sup.run()
    return code, logs


def test_notices_checkpoint_cancelled_then_stop_preemption(tmp_path: Path) -> None:
    def script(comp: Scripted, post: Post) -> None:
        wait(lambda: comp.sup is not None and "SIGUSR1" in comp.sup._handles)
        post(Notice("aws", NoticeKind.CHECKPOINT, details={"action": "rebalance"}))
        comp.checkpoint_seen.wait(15)
        post(Notice("azure", NoticeKind.CANCELLED))
        post(Notice("gce", NoticeKind.STOP, deadline=time.monotonic() + 30, deadline_wall=time.time() + 30))

    comp = Scripted(script)
    sup = Supervisor(make_cfg(tmp_path, worker_cmd("well_behaved")), components=[comp], clock=SystemClock())
    comp.sup = sup
    code, logs = run(sup)
    assert code == contract.EXIT_OK
    events = [e["event"] for e in logs]
    notices = [e for e in logs if e["event"] == "preemption.notice"]
    assert [(n["source"], n["kind"]) for n in notices] == [("aws", "checkpoint"), ("azure", "cancelled"),
                                                            ("gce", "stop")]
    assert 25 <= notices[2]["seconds_left"] <= 30 and notices[2]["deadline"].endswith("Z")
    assert notices[0]["action"] == "rebalance"
    req = [e for e in logs if e["event"] == "checkpoint.requested"]
    assert req[0]["source"] == "aws" and req[0]["delivered"] is True
    stopping = next(e for e in logs if e["event"] == "daemon.stopping")
    assert stopping["reason"] == "preemption" and stopping["source"] == "gce"
    stopped = next(e for e in logs if e["event"] == "daemon.stopped")
    assert stopped["confirmed"] is True and stopped["reason"] == "preemption"
    assert "worker.restarting" not in events
    # Hooks: before each start, every checkpoint, the final one, stop at exit.
    assert comp.hooks("before_worker_start") == [str(tmp_path / "c")]
    reasons = [r.reason for r in comp.hooks("on_checkpoint")]
    assert reasons == ["requested", "preemption"]
    final = comp.hooks("on_final_checkpoint")
    assert len(final) == 1 and final[0].reason == "preemption"
    assert comp.stopped and comp.calls[-1][0] == "stop"
    state = statefile.read(tmp_path / "s")
    assert state["scripted"]["ok"] is True
    assert [n["kind"] for n in state["notices"]] == ["checkpoint", "cancelled", "stop"]
    assert state["stop"] == {"reason": "preemption", "source": "gce"}


def test_stop_notice_during_backoff_never_restarts(tmp_path: Path) -> None:
    def script(comp: Scripted, post: Post) -> None:
        wait(lambda: comp.sup is not None and comp.sup.lifecycle.state is State.BACKOFF)
        post(Notice("gce", NoticeKind.STOP))

    comp = Scripted(script)
    cfg = make_cfg(tmp_path, worker_cmd("exit_code", "1"), backoff_initial_seconds=30.0,
                   backoff_max_seconds=60.0)
    sup = Supervisor(cfg, components=[comp])
    comp.sup = sup
    t0 = time.monotonic()
    code, logs = run(sup)
    assert time.monotonic() - t0 < 10  # did not sit out the 30 s backoff
    assert code == contract.EXIT_UNCONFIRMED
    assert [e["event"] for e in logs].count("worker.started") == 1
    assert comp.hooks("on_final_checkpoint") == [None]


def test_worker_crash_during_preemption_stop_does_not_restart_or_spend_budget(tmp_path: Path) -> None:
    def script(comp: Scripted, post: Post) -> None:
        wait(lambda: comp.sup is not None and comp.sup.worker is not None
             and (tmp_path / "worker.log").exists())
        post(Notice("aws", NoticeKind.STOP))

    comp = Scripted(script)
    # killed.py: dies of SIGABRT shortly after the stop request reaches it (SIGTERM kills it too).
    cfg = make_cfg(tmp_path, worker_cmd("killed", "ABRT", "1.0"), max_restarts=5)
    sup = Supervisor(cfg, components=[comp])
    comp.sup = sup
    code, logs = run(sup)
    assert code == contract.EXIT_UNCONFIRMED
    assert "worker.restarting" not in [e["event"] for e in logs]
    assert sup.policy.restarts_in_window(time.monotonic()) == 0
    assert sup.restarts == 0


class Broken(Component):
    """Every hook raises: supervision must go on and the failures must be logged."""

    name = "broken"

    def start(self, post: Post) -> None:
        raise RuntimeError("boom start")

    def status(self) -> dict[str, Any]:
        raise RuntimeError("boom status")

    def before_worker_start(self, checkpoint_dir: str) -> None:
        raise RuntimeError("boom before")

    def stop(self) -> None:
        raise RuntimeError("boom stop")


def test_failing_component_is_logged_and_supervision_goes_on(tmp_path: Path) -> None:
    sup = Supervisor(make_cfg(tmp_path, worker_cmd("exit_code", "0")), components=[Broken()])
    code, logs = run(sup)
    assert code == 0
    failed = {e["hook"] for e in logs if e["event"] == "component.failed"}
    assert failed >= {"start", "status", "before_worker_start", "stop"}
    assert statefile.read(tmp_path / "s")["broken"] == {"error": "RuntimeError('boom status')"}


def test_unknown_posted_event_is_logged(tmp_path: Path) -> None:
    def script(comp: Scripted, post: Post) -> None:
        post("not a notice")

    comp = Scripted(script)
    sup = Supervisor(make_cfg(tmp_path, worker_cmd("exit_code", "0", "0.5")), components=[comp])
    comp.sup = sup
    code, logs = run(sup)
    assert code == 0
    assert any(e["event"] == "daemon.unknown_event" and e["event_type"] == "str" for e in logs)


def test_progress_is_logged_periodically(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, worker_cmd("well_behaved"))
    cfg = cfg.replace("daemon", progress_interval_seconds=0.3)
    cfg = cfg.replace("worker", env={**cfg.worker.env, "TOTAL_STEPS": "100", "STEP_SECONDS": "0.02"})
    sup = Supervisor(cfg)
    code, logs = run(sup)
    assert code == 0
    progress = [e for e in logs if e["event"] == "worker.progress"]
    assert len(progress) >= 2
    rated = [p for p in progress if p["steps_per_second"] is not None]
    assert rated and all(0 < p["steps_per_second"] < 200 for p in rated)
    assert os.path.isdir(tmp_path / "c" / contract.checkpoint_dirname(100))


def test_checkpoint_failed_reaches_components(tmp_path: Path) -> None:
    script = ("from tests.workers.common import send; "
              "send('checkpoint_failed', step=9, reason='periodic', "
              "error='[Errno 28] No space left on device')")
    comp = Scripted(lambda c, post: None)
    seen: list[Any] = []
    comp.on_checkpoint_failed = seen.append  # type: ignore[method-assign]
    sup = Supervisor(make_cfg(tmp_path, [os.sys.executable, "-c", script]), components=[comp])
    code, logs = run(sup)
    assert code == 0
    failed = [e for e in logs if e["event"] == "checkpoint.failed"]
    assert failed and failed[0]["step"] == 9 and "No space" in failed[0]["error"]
    assert len(seen) == 1 and seen[0].step == 9 and seen[0].reason == "periodic"


class StuckProcess:
    """A worker stuck in the kernel: signals are recorded, it never exits (not reproducible for real)."""

    def __init__(self) -> None:
        self.pid = 2**22 + 1  # beyond pid_max defaults; never signalled for real
        self.pgid = self.pid
        self.signals: list[int] = []

    def fileno(self) -> int | None:
        return None

    def poll(self):
        return None

    def send_signal(self, sig: int) -> bool:
        self.signals.append(sig)
        return True

    def signal_group(self, sig: int) -> bool:
        self.signals.append(-sig)
        return True

    def close(self) -> None:
        pass


class StuckSpawner:
    def __init__(self) -> None:
        self.started: list[StuckProcess] = []
        self.forgotten: list[StuckProcess] = []

    def spawn(self, argv, env, cwd) -> StuckProcess:
        proc = StuckProcess()
        self.started.append(proc)
        return proc

    def forget(self, worker) -> None:
        self.forgotten.append(worker)


def test_worker_that_survives_sigkill_is_abandoned(tmp_path: Path, monkeypatch) -> None:
    import signal

    import daemon.supervisor as supmod

    monkeypatch.setattr(supmod, "UNKILLABLE_SECONDS", 0.3)

    def script(comp: Scripted, post: Post) -> None:
        wait(lambda: comp.sup is not None and comp.sup.lifecycle.state is State.RUNNING)
        post(Notice("gce", NoticeKind.STOP))

    comp = Scripted(script)
    cfg = make_cfg(tmp_path, ["unused"]).replace("stop", grace_seconds=0.2)
    spawner = StuckSpawner()
    sup = Supervisor(cfg, components=[comp], spawner=spawner, guard=False)
    comp.sup = sup
    t0 = time.monotonic()
    code, logs = run(sup)
    assert time.monotonic() - t0 < 5
    assert code == contract.EXIT_UNCONFIRMED
    proc = spawner.started[0]
    assert proc.signals[0] == signal.SIGTERM and -signal.SIGKILL in proc.signals
    events = [e["event"] for e in logs]
    assert events.index("worker.killed") < events.index("worker.unkillable") < events.index("daemon.stopped")
    assert spawner.forgotten == []  # the guard keeps watching it


class LastWordsProcess(StuckProcess):
    """Reports its final checkpoint and dies in the instant between the loop's socket drain
    and its exit check (the race a busy machine produces)."""

    def __init__(self, socket_path: str, ckpt_dir: str) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.ckpt_dir = ckpt_dir
        self.dead = False

    def poll(self):
        import signal as _signal
        import socket as _socket

        from daemon.spawner import ExitStatus

        if _signal.SIGTERM in self.signals and not self.dead:
            self.dead = True
            with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
                s.sendto(contract.encode_message(
                    "checkpoint", pid=self.pid, step=5, path=f"{self.ckpt_dir}/ckpt-000000000005",
                    bytes=1, seconds=0.1, reason="preemption"), self.socket_path)
        return ExitStatus(0, None) if self.dead else None


def test_report_sent_just_before_death_is_not_missed(tmp_path: Path) -> None:
    class Spawner(StuckSpawner):
        def spawn(self, argv, env, cwd):
            proc = LastWordsProcess(env[contract.ENV_SOCKET], env[contract.ENV_CHECKPOINT_DIR])
            self.started.append(proc)
            return proc

    def script(comp: Scripted, post: Post) -> None:
        wait(lambda: comp.sup is not None and comp.sup.lifecycle.state is State.RUNNING)
        post(Notice("gce", NoticeKind.STOP))

    comp = Scripted(script)
    sup = Supervisor(make_cfg(tmp_path, ["unused"]), components=[comp], spawner=Spawner(), guard=False)
    comp.sup = sup
    code, logs = run(sup)
    stopped = next(e for e in logs if e["event"] == "daemon.stopped")
    assert stopped["confirmed"] is True and stopped["confirmed_by"] == "report", stopped
    assert code == contract.EXIT_OK
    assert [r.step for r in comp.hooks("on_final_checkpoint")] == [5]


def test_stop_during_slow_before_worker_start_starts_no_worker(tmp_path: Path) -> None:
    class SlowFetch(Scripted):
        def before_worker_start(self, checkpoint_dir: str) -> None:
            super().before_worker_start(checkpoint_dir)
            assert self.sup is not None
            self.sup.post(Notice("aws", NoticeKind.STOP))  # arrives while the "fetch" runs
            time.sleep(0.2)

    comp = SlowFetch(lambda c, post: None)
    spawner = StuckSpawner()
    sup = Supervisor(make_cfg(tmp_path, ["unused"]), components=[comp], spawner=spawner, guard=False)
    comp.sup = sup
    code, logs = run(sup)
    assert code == contract.EXIT_UNCONFIRMED
    assert spawner.started == []
    assert "worker.started" not in [e["event"] for e in logs]


def test_finished_run_hands_its_last_checkpoint_to_components(tmp_path: Path) -> None:
    # The remote mirror relies on this to upload the final checkpoint of a run that ends.
    cfg = make_cfg(tmp_path, worker_cmd("well_behaved"))
    cfg = cfg.replace("worker", env={**cfg.worker.env, "TOTAL_STEPS": "20", "STEP_SECONDS": "0.01"})
    comp = Scripted(lambda c, post: None)
    finals: list[Any] = []
    comp.on_final_checkpoint = finals.append  # type: ignore[method-assign]
    code, _logs = run(Supervisor(cfg, components=[comp]))
    assert code == 0
    assert len(finals) == 1 and finals[0] is not None and finals[0].step == 20
