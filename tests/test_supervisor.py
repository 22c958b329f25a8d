"""`preemptd run` end to end: real daemon subprocess, real workers, real signals and sockets."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from daemon import contract
from tests.workers.common import write_checkpoint
from tests.workers.harness import Daemon, pid_alive, wait_until, worker_cmd

FAST = ["--backoff-initial-seconds", "0.2", "--backoff-max-seconds", "0.4"]


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args, **kwargs) -> Daemon:
        d = Daemon(*args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def test_crash_restarts_with_backoff_and_env_contract(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("exit_code", "3", "0.1"), "--max-restarts", "2",
                "--backoff-initial-seconds", "0.3", "--backoff-max-seconds", "2",
                "--grace-seconds", "7")
    assert d.wait() == contract.EXIT_GAVE_UP
    started = d.events("worker.started")
    exited = d.events("worker.exited")
    assert len(started) == 3 and len(exited) == 3
    assert [e["restart"] for e in started] == [0, 1, 2]
    assert all(e["exit_code"] == 3 and e["signal"] is None for e in exited)
    restarting = d.events("worker.restarting")
    assert [r["restart"] for r in restarting] == [1, 2]
    # Exponential with jitter that only shortens: 0.3*[0.8, 1], then 0.6*[0.8, 1].
    assert 0.24 <= restarting[0]["delay_seconds"] <= 0.3
    assert 0.48 <= restarting[1]["delay_seconds"] <= 0.6
    gave_up = d.events("daemon.gave_up")[0]
    assert gave_up["max_restarts"] == 2 and gave_up["exit_code"] == 70
    # Backoff really waited: next start at least the delay after the exit.
    runs = [e for e in d.worker_log_lines() if e["event"] == "started"]
    exits = [e for e in d.worker_log_lines() if e["event"] == "exiting"]
    assert runs[1]["t"] - exits[0]["t"] >= 0.24
    assert runs[2]["t"] - exits[1]["t"] >= 0.48
    assert [r["restart"] for r in runs] == ["0", "1", "2"]
    state = d.state()
    assert state["state"] == "gave_up" and state["restarts"] == 2
    assert state["last_exit"] == {"code": 3, "signal": None}
    assert state["worker_pid"] is None


def test_worker_env_contract(tmp_path: Path, daemons) -> None:
    out = tmp_path / "env.json"
    script = (
        "import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
        f"if k.startswith(('PREEMPTD_', 'NOTIFY_', 'WATCHDOG_'))}}, open({str(out)!r}, 'w'))"
    )
    d = daemons(tmp_path, [os.sys.executable, "-c", script], "--grace-seconds", "7",
                env={"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "1000000"})
    assert d.wait() == 0
    env = json.loads(out.read_text())
    assert env["PREEMPTD_CHECKPOINT_DIR"] == str(d.checkpoint_dir)
    assert env["PREEMPTD_RESUME"] == ""
    assert env["PREEMPTD_RESTART"] == "0"
    assert env["PREEMPTD_SOCKET"] == str(d.state_dir / "worker.sock")
    assert env["PREEMPTD_GRACE_SECONDS"] == "7"
    assert env["PREEMPTD_CONTROL"] == str(d.state_dir / "control.json")
    assert env["PREEMPTD_LOG_FORMAT"] == "json"  # the harness runs --log-format json: the worker follows
    for key in ("PREEMPTD_EVERY_STEPS", "PREEMPTD_EVERY_SECONDS", "PREEMPTD_KEEP",
                "PREEMPTD_KEEP_EVERY_HOURS"):
        assert key in env
    assert "WATCHDOG_USEC" not in env and "NOTIFY_SOCKET" not in env
    # Finished training: exit 0, no restart, one daemon.stopped with reason finished.
    assert d.events("worker.restarting") == []
    assert d.events("daemon.stopped")[0]["reason"] == "finished"
    sock = d.state_dir / "worker.sock"
    assert not sock.exists()  # removed at exit


def test_resume_points_at_newest_valid_checkpoint_and_stale_temp_removed(tmp_path: Path, daemons) -> None:
    ckdir = tmp_path / "c"
    ckdir.mkdir()
    os.environ[contract.ENV_CHECKPOINT_DIR] = str(ckdir)
    try:
        good = write_checkpoint(100, "periodic")
        write_checkpoint(200, "periodic")
    finally:
        del os.environ[contract.ENV_CHECKPOINT_DIR]
    # Damage the newest one (size mismatch): the daemon must resume from step 100.
    (ckdir / contract.checkpoint_dirname(200) / "data.bin").write_bytes(b"x")
    stale = ckdir / contract.temp_dirname(300, pid=999_999_999)
    stale.mkdir()
    (stale / "junk").write_bytes(b"j")
    d = daemons(tmp_path, worker_cmd("exit_code", "0"))
    assert d.wait() == 0
    assert d.events("worker.started")[0]["resume"] == good
    assert d.events("worker.started")[0]["resume_step"] == 100
    assert d.worker_log_lines()[0]["resume"] == good
    assert not stale.exists()
    assert d.events("checkpoint.stale_removed")[0]["path"] == str(stale)
    assert (ckdir / contract.checkpoint_dirname(200)).exists()  # never deletes committed ones


def test_signal_death_is_a_crash(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("killed", "SEGV", "0.05"), "--max-restarts", "0")
    assert d.wait() == contract.EXIT_GAVE_UP
    ex = d.events("worker.exited")[0]
    assert ex["signal"] == "SIGSEGV" and ex["exit_code"] is None
    assert d.state()["last_exit"] == {"code": None, "signal": "SIGSEGV"}


def test_command_not_executable_is_config_error_without_restart_loop(tmp_path: Path, daemons) -> None:
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    for cmd, why in (([str(tmp_path / "missing")], "No such file"), ([str(script)], "Permission denied")):
        d = daemons(tmp_path, cmd)
        assert d.wait() == contract.EXIT_CONFIG
        err = d.proc.stderr.read()
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert d.events("worker.start_failed")
        assert d.events("worker.restarting") == []


def test_sigterm_stop_confirmed_final_checkpoint(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("well_behaved"), env={"SAVE_SECONDS": "0.5"})
    d.wait_for("worker.hello")
    d.wait_for("worker.started")
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    d.wait_for("daemon.stopping")
    # A repeated SIGTERM while the final checkpoint is written must not cut it short.
    time.sleep(0.1)
    d.signal(signal.SIGTERM)
    d.signal(signal.SIGINT)
    assert d.wait() == 0
    assert d.events("daemon.stop_repeated")
    stopped = d.events("daemon.stopped")[0]
    assert stopped["confirmed"] is True and stopped["confirmed_by"] == "report"
    assert stopped["reason"] == "operator" and stopped["source"] == "SIGTERM"
    committed = d.events("checkpoint.committed")[-1]
    assert committed["reason"] == "preemption"
    assert contract.verify(committed["path"]).step == committed["step"]
    assert d.events("worker.exited")[0]["exit_code"] == 0
    assert d.events("worker.restarting") == []
    state = d.state()
    assert state["state"] == "stopped" and state["exit_code"] == 0
    assert state["last_checkpoint"]["path"] == committed["path"]
    assert state["last_checkpoint"]["reason"] == "preemption"


def test_worker_ignoring_sigterm_is_killed_after_grace_exit_75(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("ignore_term"), "--grace-seconds", "1")
    d.wait_for("worker.started")
    wait_until(lambda: d.worker_log_lines() != [], 10)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait() == contract.EXIT_UNCONFIRMED
    took = time.monotonic() - t0
    assert 0.9 <= took <= 6
    assert d.events("worker.killed")[0]["signal"] == "SIGKILL"
    assert d.events("worker.exited")[0]["signal"] == "SIGKILL"
    assert d.events("daemon.stopped")[0]["confirmed"] is False
    assert not pid_alive(d.worker_log_lines()[0]["pid"])


def test_hang_detection_restarts_and_spends_budget(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("hang", "3"), "--hang-timeout-seconds", "0.5",
                "--grace-seconds", "0.5", "--max-restarts", "1", *FAST)
    assert d.wait(40) == contract.EXIT_GAVE_UP
    hung = d.events("worker.hung")
    assert len(hung) == 2
    assert hung[0]["silent_seconds"] >= 0.5 and hung[0]["step"] == 3
    # The hang worker ignores nothing: SIGTERM ends it within the grace.
    assert d.events("worker.exited")[0]["signal"] == "SIGTERM"
    assert len(d.events("worker.started")) == 2
    assert d.events("daemon.gave_up")[0]["why"] == "hung"


def test_silent_worker_is_never_declared_hung(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("exit_code", "0", "1.2"), "--hang-timeout-seconds", "0.3")
    assert d.wait() == 0
    assert d.events("worker.hung") == []


def test_garbage_on_socket_is_dropped_and_never_counts_as_progress(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("garbage"), "--grace-seconds", "2")
    wait_until(lambda: any(e["event"] == "sent" for e in d.worker_log_lines()), 10)
    d.wait_for("worker.message_dropped", count=9)
    time.sleep(0.3)
    d.signal(signal.SIGTERM)
    d.wait()
    # Only the one valid heartbeat moved the step.
    assert d.state()["step"] == 42
    assert len(d.events("checkpoint.committed")) == 0
    assert d.proc.returncode == contract.EXIT_UNCONFIRMED


def test_sigusr1_forwarded_only_to_workers_that_handle_it(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("well_behaved"))
    d.wait_for("worker.hello")
    d.signal(signal.SIGUSR1)
    committed = d.wait_for("checkpoint.committed")
    assert committed["reason"] == "requested"
    assert d.events("checkpoint.requested")[0]["delivered"] is True
    d.signal(signal.SIGTERM)
    assert d.wait() == 0

    # A worker that never said hello is not sent SIGUSR1 (it would kill it).
    d2 = daemons(tmp_path / "b", worker_cmd("exit_code", "0", "1.0"))
    d2.wait_for("worker.started")
    d2.signal(signal.SIGUSR1)
    req = d2.wait_for("checkpoint.requested")
    assert req["delivered"] is False
    assert d2.wait() == 0
    assert d2.events("worker.exited")[0]["exit_code"] == 0


def test_checkpoint_cli_and_status(tmp_path: Path, daemons, capsys) -> None:
    from daemon.cli import main

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    d = daemons(tmp_path, worker_cmd("well_behaved"))
    d.wait_for("worker.hello")
    import stat

    sock = (d.state_dir / "worker.sock").stat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    code, out, err = cli("checkpoint", "--state-dir", str(d.state_dir), "--wait", "10")
    assert code == 0, err
    assert "checkpoint committed" in out
    code, out, _ = cli("status", "--state-dir", str(d.state_dir), "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("state", "daemon_pid", "worker_pid", "step", "restarts", "last_exit", "last_checkpoint",
                "notices", "disk"):
        assert key in data
    assert data["state"] == "running" and data["daemon_pid"] == d.proc.pid
    assert data["last_checkpoint"]["reason"] == "requested"
    assert isinstance(data["last_checkpoint"]["age_seconds"], float)
    assert set(data["disk"]) >= {"percent", "free_bytes"}
    code, out, _ = cli("status", "--state-dir", str(d.state_dir))
    assert code == 0 and "running" in out and "requested" in out
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    code, out, _ = cli("status", "--state-dir", str(d.state_dir))
    assert code == 3 and "not running" in out
    code, _, err = cli("checkpoint", "--state-dir", str(d.state_dir))
    assert code == 3 and "no preemptd is running" in err


def test_second_daemon_on_same_state_dir_refuses(tmp_path: Path, daemons) -> None:
    d = daemons(tmp_path, worker_cmd("ignore_term"), "--grace-seconds", "0.5")
    d.wait_for("worker.started")
    d2 = daemons(tmp_path, worker_cmd("exit_code", "0"))
    assert d2.wait() == contract.EXIT_CONFIG
    err = d2.proc.stderr.read()
    assert "already running" in err and str(d.proc.pid) in err
    assert d2.events("worker.started") == []
    assert d.proc.poll() is None  # the first one is untouched
    d.signal(signal.SIGTERM)
    d.wait()


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "crash"])
def test_no_process_outlives_the_daemon(tmp_path: Path, daemons, how: str) -> None:
    mode = "crash" if how == "crash" else "sleep"
    d = daemons(tmp_path, worker_cmd("grandchild", mode), "--grace-seconds", "1", "--max-restarts", "0")
    assert wait_until(lambda: d.worker_log_lines() != [], 10)
    rec = d.worker_log_lines()[0]
    worker, grandchild = rec["pid"], rec["grandchild"]
    assert pid_alive(worker) and pid_alive(grandchild)
    # Own session and process group, apart from the daemon's (Ctrl-C reaches the daemon only).
    assert os.getpgid(worker) == worker == os.getsid(worker)
    assert os.getpgid(grandchild) == worker
    assert os.getpgid(d.proc.pid) != worker
    if how == "sigterm":
        d.signal(signal.SIGTERM)
    elif how == "sigkill":
        d.signal(signal.SIGKILL)
    d.wait()
    assert wait_until(lambda: not pid_alive(worker) and not pid_alive(grandchild), 5), \
        f"worker alive={pid_alive(worker)} grandchild alive={pid_alive(grandchild)}"


def test_lost_stdout_does_not_stop_supervision(tmp_path: Path) -> None:
    import subprocess

    from tests.workers.harness import PY, ROOT

    r, w = os.pipe()
    os.close(r)  # nobody will ever read the daemon's log: every write gets EPIPE
    try:
        proc = subprocess.Popen(
            [PY, "-m", "daemon", "run", "--log-format", "json", "--state-dir", str(tmp_path / "s"),
             "--checkpoint-dir", str(tmp_path / "c"), "--", *worker_cmd("exit_code", "0", "0.5")],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    assert state["state"] == "finished" and state["last_exit"]["code"] == 0


def test_silent_worker_final_checkpoint_confirmed_by_scan(tmp_path: Path, daemons) -> None:
    # A worker that never uses the socket but commits a checkpoint on SIGTERM, then exits 0.
    script = (
        "import signal, sys, time\n"
        "from tests.workers.common import write_checkpoint\n"
        "signal.signal(signal.SIGTERM, lambda s, f: (write_checkpoint(77, 'preemption'), sys.exit(0)))\n"
        "open(sys.argv[1], 'w').close()\n"
        "while True: time.sleep(1)\n"
    )
    ready = tmp_path / "ready"
    d = daemons(tmp_path, [os.sys.executable, "-c", script, str(ready)])
    assert wait_until(ready.exists, 20)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    stopped = d.events("daemon.stopped")[0]
    assert stopped["confirmed"] is True and stopped["confirmed_by"] == "scan" and stopped["step"] == 77
    committed = d.events("checkpoint.committed")
    assert committed[0]["seen_by"] == "scan" and committed[0]["step"] == 77
