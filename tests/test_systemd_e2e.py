"""The real unit under a real systemd: boot it in `systemd-nspawn --volatile=yes`.

The container's root is a tmpfs with the host's /usr bound read-only, so a second
systemd never touches the host's root (on the host it would wipe /tmp). The project
tree, its venv and the venv's base Python are bound in read-only. Inside, the test
installs deploy/systemd/preemptd.service unchanged plus one drop-in that only points
ExecStart at the project's venv (the production path is /opt/preemptd/venv) and
shortens WatchdogSec so a missed ping shows within the test. Then:

  systemctl start -> READY=1 -> the TF example trains -> SIGKILL of the worker ->
  preemptd restarts it (systemd does not) -> the watchdog kept the unit alive ->
  systemctl stop -> a `preemption` checkpoint committed before the unit went inactive,
  and the journal holds the lifecycle events.

Needs root and systemd-nspawn (Debian: apt-get install systemd-container); skips
with the reason otherwise. About 40-70 s on 2 cores (TensorFlow imports twice).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon import contract

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "preemptd.service"
SYSUSERS = ROOT / "deploy" / "sysusers.d" / "preemptd.conf"
SYSTEMD = Path("/usr/lib/systemd/systemd")
WATCHDOG_SEC = 6  # drop-in value: the daemon pings every 3 s; a stall kills the unit
BOOT_TIMEOUT = 90.0
STATE = "/var/lib/preemptd"

pytestmark = [pytest.mark.root, pytest.mark.tf, pytest.mark.timeout(420)]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn boots a container"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn not installed (Debian: apt-get install systemd-container)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} missing: no systemd to boot in the container"
    return None


@dataclass
class Container:
    """A booted `systemd-nspawn --volatile=yes` container, driven through nsenter."""

    name: str
    proc: subprocess.Popen[bytes]
    leader: int
    log: Path
    journal_cursor: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (its mount, pid, net, ipc, uts namespaces)."""
        full = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *cmd]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def path(self, inside: str) -> Path:
        """A path of the container's (tmpfs) root, seen from the host."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "preemptd.service", "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> list[dict[str, Any]]:
        """The unit's journal entries (systemd's own lines and the daemon's stdout)."""
        out = self.run("journalctl", "-u", "preemptd.service", "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's JSON log lines, each with the journal's timestamp (usec) added."""
    found = []
    for e in entries:
        msg = e.get("MESSAGE")
        if not isinstance(msg, str) or not msg.startswith("{"):
            continue
        try:
            ev = json.loads(msg)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            ev["_usec"] = int(e["__REALTIME_TIMESTAMP"])
            found.append(ev)
    return found


def wait_for(what: str, pred: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _find_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1 as the host sees it: nspawn's child running systemd."""
    try:
        kids = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for kid in kids:
        try:
            if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                return int(kid)
        except OSError:
            continue
    return None


def _host_paths() -> list[str]:
    """Host paths the container needs: the tree, its venv, the venv's base Python.

    /usr is in the container already (--volatile=yes binds it), so paths under it
    are left out.
    """
    paths = {str(ROOT), sys.prefix, sys.base_prefix}
    return sorted(p for p in paths if p != "/usr" and not p.startswith("/usr/"))


def _stage(stage: Path) -> None:
    """Files bound into the container at /e2e: the unit, a drop-in, the config."""
    stage.mkdir(mode=0o755)
    venv_py = Path(sys.prefix) / "bin" / "python"
    shutil.copy(UNIT, stage / "preemptd.service")
    shutil.copy(SYSUSERS, stage / "preemptd.sysusers")
    # Only what differs from production: where the code lives and a short watchdog.
    ro_paths = _host_paths()
    homes = any(p == "/root" or p.startswith(("/root/", "/home/")) for p in ro_paths)
    dropin = [
        "[Service]",
        "ExecStart=",
        f"ExecStart={venv_py} -m daemon run --config /e2e/config.toml",
        f"Environment=PYTHONPATH={ROOT} PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2",
        f"WatchdogSec={WATCHDOG_SEC}s",
    ]
    if homes:  # the venv's base Python lives under a home dir: show only that part
        dropin += ["ProtectHome=tmpfs", "BindReadOnlyPaths=" + " ".join(ro_paths)]
    (stage / "e2e.conf").write_text("\n".join(dropin) + "\n")
    (stage / "config.toml").write_text(
        "[worker]\n"
        f'command = ["{venv_py}", "-m", "service.examples.custom_loop", "--steps", "1000000"]\n'
        'env = { EXAMPLE_STEP_DELAY = "0.02", EXAMPLE_LOG_EVERY = "1000" }\n'
        "[checkpoint]\n"
        f'dir = "{STATE}/checkpoints"\n'
        "every_steps = 50\n"
        "every_seconds = 0\n"
        "[restart]\n"
        "backoff_initial_seconds = 0.2\n"
        "backoff_max_seconds = 1\n"
        "[stop]\n"
        "grace_seconds = 25\n"
        "[preemption]\n"
        "sources = []\n"  # no metadata server in the container; SIGTERM is the notice
        "[daemon]\n"
        f'state_dir = "{STATE}"\n'
        'log_format = "json"\n'
        "progress_interval_seconds = 2\n"
    )
    # A config error the daemon must report (exit 78) and systemd must not retry.
    (stage / "bad.toml").write_text("[restart]\nmax_restarts = -1\n")
    (stage / "bad.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={venv_py} -m daemon run --config /e2e/bad.toml\n")
    for f in stage.iterdir():
        f.chmod(0o644)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("nspawn")
    base.chmod(0o755)
    stage = base / "e2e"
    _stage(stage)
    name = f"preemptd-e2e-{os.getpid()}"
    log = base / "nspawn.log"
    binds = _host_paths()
    cmd = [
        "systemd-nspawn", "--quiet", "--volatile=yes", "--directory=/", "--boot",
        "--register=no", "--keep-unit",  # no machined / system bus needed on the host
        "--private-network",  # the daemon must reach nothing outside
        "--console=pipe", "--link-journal=no", f"--machine={name}",
        *(f"--bind-ro={p}" for p in binds), f"--bind-ro={stage}:/e2e",
    ]
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    box: Container | None = None
    try:
        leader = None
        while leader is None and proc.poll() is None and time.monotonic() - t0 < BOOT_TIMEOUT:
            time.sleep(0.2)
            leader = _find_leader(proc.pid)
        if leader is None:
            pytest.skip(f"systemd-nspawn could not boot a container here: {log.read_text()[-800:]!r}")
        box = Container(name=name, proc=proc, leader=leader, log=log)
        state, res = "", None
        while state not in ("running", "degraded") and time.monotonic() - t0 < BOOT_TIMEOUT:
            # Fails until PID 1 listens on its private socket; then --wait blocks until booted.
            res = box.run("timeout", str(int(BOOT_TIMEOUT)), "systemctl", "is-system-running", "--wait",
                          check=False)
            state = res.stdout.strip()
            time.sleep(0.2)
        # "degraded" is fine: systemd-firstboot fails on an empty /etc, unrelated to us.
        assert state in ("running", "degraded"), f"container boot ended in {state!r}: {res}"
        box.timings["boot_seconds"] = time.monotonic() - t0
        box.run("systemd-sysusers", "/e2e/preemptd.sysusers")
        box.run("cp", "/e2e/preemptd.service", "/etc/systemd/system/preemptd.service")
        box.run("mkdir", "-p", "/etc/systemd/system/preemptd.service.d")
        box.run("cp", "/e2e/e2e.conf", "/etc/systemd/system/preemptd.service.d/e2e.conf")
        # network-online.target would wait 2 min for a network the container lacks.
        box.run("systemctl", "mask", "--quiet", "systemd-networkd-wait-online.service")
        box.run("systemctl", "daemon-reload")
        yield box
    finally:
        _shutdown(proc, name)


def _shutdown(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own nspawn; its container dies with it
            proc.wait(timeout=10)
    # nspawn refuses to rm -rf this on a disk-backed /run; it is ours and empty.
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}", ignore_errors=True)


def _worker_pid(box: Container) -> int | None:
    res = box.run(str(Path(sys.prefix) / "bin" / "python"), "-m", "daemon", "status", "--json",
                  "--state-dir", STATE, check=False)
    if res.returncode != 0:
        return None
    pid = json.loads(res.stdout).get("worker_pid")
    return pid if isinstance(pid, int) and pid > 0 else None


def _valid(box: Container) -> list[tuple[contract.Entry, contract.Manifest]]:
    found = contract.iter_valid_newest_first(box.path(f"{STATE}/checkpoints"))
    return [(e, m) for e, m in found if isinstance(m, contract.Manifest)]


def test_unit_lifecycle_under_real_systemd(container: Container, record_property: Any) -> None:
    box = container

    # ---- start: systemctl returns once the daemon sent READY=1
    t0 = time.monotonic()
    box.run("systemctl", "start", "preemptd.service", timeout=240)
    start_s = time.monotonic() - t0
    props = box.show("ActiveState", "SubState", "MainPID", "NRestarts", "Type", "NotifyAccess")
    assert props["ActiveState"] == "active", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    main_pid = props["MainPID"]
    assert props["NRestarts"] == "0"

    # ---- the worker trains: periodic checkpoints land and STATUS= shows the step
    def periodic_commits() -> list[dict[str, Any]]:
        return [e for e in events(box.journal())
                if e["event"] == "checkpoint.committed" and e.get("reason") == "periodic"]

    wait_for("a periodic checkpoint", periodic_commits, timeout=150)
    status_text = box.show("StatusText")["StatusText"]
    assert "step" in status_text, f"STATUS= line lacks the step: {status_text!r}"
    shown = box.run("systemctl", "status", "preemptd.service", "--no-pager", check=False).stdout
    assert 'Status: "' in shown, shown
    print("\nsystemctl status preemptd (while training):\n" + shown)
    wd_before = int(box.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])

    # ---- SIGKILL the worker: the daemon restarts it, systemd does not restart the daemon
    worker = wait_for("the worker pid in the state file", lambda: _worker_pid(box), timeout=30)
    box.run("kill", "-KILL", str(worker))

    def restarted() -> bool:
        evs = events(box.journal())
        return any(e["event"] == "worker.exited" and e.get("signal") in (9, "SIGKILL") for e in evs) and any(
            e["event"] == "worker.started" and e.get("restart", 0) >= 1 for e in evs)

    wait_for("worker.exited by SIGKILL and worker.started with restart >= 1", restarted, timeout=60)
    new_worker = wait_for("the new worker pid", lambda: (p := _worker_pid(box)) != worker and p, timeout=60)
    assert new_worker != worker
    # It resumed from the newest valid checkpoint that existed when it was started.
    started = [e for e in events(box.journal())
               if e["event"] == "worker.started" and e.get("restart", 0) >= 1][0]
    older = [(m.step, m.created) for _, m in _valid(box) if (m.created_epoch or 0) * 1e6 < started["_usec"]]
    assert started.get("resume_step") == max(older)[0], (started, older)
    # ... and the worker restored that one (it logs checkpoint.skipped when it falls back).
    wait_for("the restarted worker's hello", lambda: [
        e for e in events(box.journal()) if e["event"] == "worker.hello" and e["_usec"] > started["_usec"]],
        timeout=150)
    skipped = [str(e.get("MESSAGE")) for e in box.journal() if "checkpoint.skipped" in str(e.get("MESSAGE"))]
    assert not skipped, skipped
    # Trains again after the restart: a new periodic checkpoint from restart 1.
    after = wait_for("a checkpoint from the restarted worker",
                     lambda: [e for e in periodic_commits() if e.get("restart", 0) >= 1], timeout=150)
    # Stop between periodic saves, so the stop writes a checkpoint of its own (at a step
    # that is already saved the worker only confirms that one; see below).
    last_saved = after[-1]["step"]
    wait_for("training past the last periodic checkpoint",
             lambda: [e for e in events(box.journal()) if e["event"] == "worker.progress"
                      and (e.get("step") or 0) > last_saved], timeout=60)

    # ---- the watchdog: pinged all along, never fired (same MainPID, no unit restart)
    props = box.show("ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic", "WatchdogUSec")
    assert props["ActiveState"] == "active" and props["MainPID"] == main_pid, props
    assert props["NRestarts"] == "0", props
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s", props
    assert int(props["WatchdogTimestampMonotonic"]) > wd_before, "no WATCHDOG=1 seen by systemd"

    # ---- stop: the final checkpoint is committed before the unit is inactive
    cursor_usec = int(time.time() * 1e6)
    t0 = time.monotonic()
    box.run("systemctl", "stop", "preemptd.service", timeout=120)
    stop_s = time.monotonic() - t0
    props = box.show("ActiveState", "Result", "ExecMainStatus", "InactiveEnterTimestamp")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props

    entries = box.journal()
    evs = events(entries)
    stop_lines = [str(e.get("MESSAGE")) for e in entries if int(e["__REALTIME_TIMESTAMP"]) >= cursor_usec]
    print("\njournal of one stop (journalctl -u preemptd -o cat):")
    print("\n".join(stop_lines))

    newest = contract.newest_valid(box.path(f"{STATE}/checkpoints"))
    assert newest is not None, "no valid checkpoint after stop"
    entry, manifest = newest
    final = [e for e in evs if e["event"] == "checkpoint.committed" and e.get("reason") == "preemption"]
    assert final and final[-1]["step"] == manifest.step, final
    if manifest.reason != "preemption":
        # Legitimate only when the stop hit a step that was already saved: the worker then
        # confirms that checkpoint (reported with reason preemption) instead of rewriting it.
        earlier = [e for e in evs if e["event"] == "checkpoint.committed" and e["step"] == manifest.step
                   and e.get("reason") != "preemption" and e["_usec"] < final[-1]["_usec"]]
        assert earlier, f"newest checkpoint {entry.path} has reason {manifest.reason}"
    stopped_unit = [int(e["__REALTIME_TIMESTAMP"]) for e in entries
                    if str(e.get("MESSAGE", "")).startswith("Stopped preemptd.service")]
    assert stopped_unit, "systemd never logged the unit as stopped"
    assert final[-1]["_usec"] < stopped_unit[-1], "final checkpoint logged after the unit stopped"
    names = {e["event"] for e in evs}
    for needed in ("daemon.started", "worker.started", "worker.exited", "worker.restarting",
                   "checkpoint.committed", "worker.progress", "daemon.stopping", "daemon.stopped"):
        assert needed in names, f"{needed} missing from the journal; saw {sorted(names)}"
    stopped = [e for e in evs if e["event"] == "daemon.stopped"][-1]
    assert stopped.get("confirmed") is True, stopped

    # ---- what the operator sees for one stop (printed for the report)
    report = {"boot_seconds": round(box.timings["boot_seconds"], 2),
              "start_to_ready_seconds": round(start_s, 2),
              "stop_to_inactive_seconds": round(stop_s, 2), "final_step": manifest.step}
    record_property("systemd_e2e", json.dumps(report))
    print("\nsystemd e2e:", json.dumps(report))
    assert stop_s < 30, f"stop took {stop_s:.1f} s, beyond the unit's TimeoutStopSec=30s"

    # The documented jq filter works on the real journal stream.
    if shutil.which("jq"):
        out = box.run("sh", "-c", "journalctl -u preemptd -o cat | jq -cR "
                      "'fromjson? | select(.event == \"checkpoint.committed\") | .reason'").stdout
        assert '"preemption"' in out.split() and '"periodic"' in out.split(), out


def test_crashed_daemon_is_restarted_and_takes_its_worker_along(container: Container) -> None:
    box = container
    box.run("systemctl", "reset-failed", "preemptd.service", check=False)
    box.run("systemctl", "start", "preemptd.service", timeout=240)
    main_pid = box.show("MainPID")["MainPID"]
    worker = wait_for("the worker pid", lambda: _worker_pid(box), timeout=60)
    box.run("kill", "-KILL", main_pid)
    # Restart=on-failure: systemd schedules a restart (RestartSec=10s) ...
    wait_for("auto-restart", lambda: box.show("SubState")["SubState"] == "auto-restart", timeout=30)
    # ... and the orphaned worker does not survive its daemon.
    wait_for("the worker to die with the daemon",
             lambda: box.run("kill", "-0", str(worker), check=False).returncode != 0, timeout=30)
    box.run("systemctl", "stop", "preemptd.service", timeout=60)  # cancel the pending restart
    assert box.show("ActiveState")["ActiveState"] in ("inactive", "failed")


def test_config_error_exits_78_and_is_not_restarted(container: Container) -> None:
    box = container
    box.run("systemctl", "reset-failed", "preemptd.service", check=False)
    box.run("cp", "/e2e/bad.conf", "/etc/systemd/system/preemptd.service.d/zz-bad.conf")
    box.run("systemctl", "daemon-reload")
    try:
        since = int(time.time() * 1e6)
        res = box.run("systemctl", "start", "preemptd.service", check=False, timeout=120)
        assert res.returncode != 0, "a config error must fail the start job"
        props = box.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
        # RestartPreventExitStatus=78: failed for good, not "auto-restart".
        assert props["ExecMainStatus"] == str(contract.EXIT_CONFIG), props
        assert props["ActiveState"] == "failed" and props["SubState"] == "failed", props
        assert props["NRestarts"] == "0", props
        said = [str(e.get("MESSAGE")) for e in box.journal() if int(e["__REALTIME_TIMESTAMP"]) >= since]
        assert any("restart.max_restarts" in m for m in said), said
        assert not any("Traceback" in m for m in said), said
    finally:
        box.run("rm", "-f", "/etc/systemd/system/preemptd.service.d/zz-bad.conf")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "reset-failed", "preemptd.service", check=False)
