"""Worker-side pieces that need no TensorFlow: settings, policy, commit protocol, reports, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import contract
from daemon.clock import FakeClock
from service import commit as commit_mod
from service.errors import CheckpointDirError, ConfigError
from service.policy import CopyPolicy, PeriodicPolicy, StepTimer
from service.reporter import Reporter
from service.settings import Settings
from service.signals import SignalRequests

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ settings


def test_settings_keyword_over_env_over_default(tmp_path: Path) -> None:
    env = {
        contract.ENV_CHECKPOINT_DIR: str(tmp_path),
        contract.ENV_EVERY_STEPS: "50",
        contract.ENV_EVERY_SECONDS: "30",
        contract.ENV_KEEP: "4",
        contract.ENV_SOCKET: "/run/x.sock",
        contract.ENV_RESUME: str(tmp_path / "ckpt-000000000050"),
        contract.ENV_RESTART: "2",
    }
    s = Settings.resolve(env, every_steps=10)
    assert (s.directory, s.every_steps, s.every_seconds, s.keep) == (tmp_path, 10, 30.0, 4)
    assert s.socket_path == "/run/x.sock" and s.restart == 2 and s.resume.endswith("50")
    d = Settings.resolve({}, directory=tmp_path)
    assert (d.every_steps, d.every_seconds, d.keep) == (0, 600.0, 3)


@pytest.mark.parametrize(
    ("env", "kwargs", "match"),
    [
        ({}, {}, "PREEMPTD_CHECKPOINT_DIR"),
        ({contract.ENV_KEEP: "0"}, {"directory": "/x"}, "keep must be >= 1"),
        ({contract.ENV_EVERY_STEPS: "ten"}, {"directory": "/x"}, "PREEMPTD_EVERY_STEPS='ten'"),
        ({contract.ENV_EVERY_STEPS: "2.5"}, {"directory": "/x"}, "whole number"),
        ({}, {"directory": "/x", "every_seconds": -1}, "every_seconds"),
        ({}, {"directory": "/x", "keep": "3"}, "keep must be a number"),
    ],
)
def test_settings_errors_name_the_value(env: dict[str, str], kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.resolve(env, **kwargs)


# -------------------------------------------------------------------- policy


def test_policy_by_steps_and_seconds() -> None:
    clock = FakeClock()
    p = PeriodicPolicy(every_steps=100, every_seconds=60)
    p.reset(0, clock.monotonic())
    assert not p.due(99, clock.monotonic())
    assert p.due(100, clock.monotonic())
    p.reset(100, clock.monotonic())
    clock.advance(59)
    assert not p.due(120, clock.monotonic())
    clock.advance(1)
    assert p.due(120, clock.monotonic())
    assert not p.due(100, clock.monotonic())  # nothing new since the last save


def test_policy_steps_land_on_multiples_after_a_resume_or_request() -> None:
    # Resumed at 511 (a preemption save) the next periodic save is 600, not 611.
    p = PeriodicPolicy(every_steps=100)
    p.reset(511, 0.0)
    assert not p.due(599, 0.0)
    assert p.due(600, 0.0)
    p.reset(600, 0.0)
    p.reset(616, 0.0)  # a requested save in between
    assert not p.due(699, 0.0) and p.due(700, 0.0)


def test_policy_off() -> None:
    p = PeriodicPolicy()
    assert not p.due(10**9, 10**9)


def test_copy_is_deferred_only_when_steps_are_long_compared_with_the_measured_copy() -> None:
    policy = CopyPolicy()
    assert not policy.defer(None, 0.1)  # no step timed yet
    assert not policy.defer(5.0, None)  # no copy timed yet: the first snapshot copies in place
    assert not policy.defer(0.39, 0.1)  # an update could come before the copy is done
    assert policy.defer(0.4, 0.1)


def test_copy_policy_backs_off_after_a_collision() -> None:
    policy = CopyPolicy(factor=4.0, max_factor=16.0)
    policy.collided(0)  # a deferred copy that won the race changes nothing
    assert policy.defer(0.4, 0.1)
    policy.collided(3)
    assert not policy.defer(0.4, 0.1) and policy.defer(0.8, 0.1)
    for _ in range(5):
        policy.collided(1)
    assert policy.factor == 16.0  # capped: a later, longer step can still defer


def test_step_timer_median_of_recent_steps_ignores_save_pauses() -> None:
    timer = StepTimer(window=3)
    assert timer.median() is None
    timer.tick(0.0)
    assert timer.median() is None  # one boundary is not a step
    for now in (1.0, 2.0, 3.0):
        timer.tick(now)
    assert timer.median() == 1.0
    timer.restart(10.0)  # a save paused training from 3.0 to 10.0: not a step
    timer.tick(10.5)
    timer.tick(11.0)
    timer.tick(11.5)
    assert timer.median() == 0.5  # the window keeps only the last 3 intervals


# ------------------------------------------------------------ commit protocol


def _temp_with_files(directory: Path, step: int) -> Path:
    temp = directory / contract.temp_dirname(step)
    (temp / "sub").mkdir(parents=True)
    (temp / "ckpt.data-00000-of-00001").write_bytes(os.urandom(300_000))
    (temp / "ckpt.index").write_bytes(b"i" * 10)
    (temp / "sub" / "part").write_bytes(b"nested")
    return temp


def test_commit_creates_verifiable_checkpoint(tmp_path: Path) -> None:
    temp = _temp_with_files(tmp_path, 7)
    done = commit_mod.commit(temp, 7, "requested", started=0.0, versions={"tensorflow": "x"}, extra={"a": 1})
    assert done.path == tmp_path / "ckpt-000000000007" and not temp.exists()
    manifest = contract.verify(done.path, checksums=True)
    assert manifest.step == 7 and manifest.reason == "requested" and manifest.extra == {"a": 1}
    assert set(manifest.files) == {"ckpt.data-00000-of-00001", "ckpt.index", "sub/part"}
    assert done.bytes == 300_000 + 10 + 6
    assert manifest.created_epoch is not None
    assert manifest.seconds is not None and manifest.seconds > 0  # save time, for deadline checks
    assert contract.newest_valid(tmp_path)[0].step == 7  # type: ignore[index]


def test_commit_of_empty_folder_fails_without_committing(tmp_path: Path) -> None:
    temp = tmp_path / contract.temp_dirname(3)
    temp.mkdir()
    with pytest.raises(OSError, match="no files"):
        commit_mod.commit(temp, 3, "periodic", started=0.0)
    assert contract.committed(tmp_path) == []


def test_checksums_detect_a_flipped_byte(tmp_path: Path) -> None:
    done = commit_mod.commit(_temp_with_files(tmp_path, 1), 1, "periodic", started=0.0)
    data = done.path / "ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x01
    data.write_bytes(bytes(raw))
    contract.verify(done.path, checksums=False)  # same size: only the checksum sees it
    with pytest.raises(contract.InvalidCheckpoint, match="checksum"):
        contract.verify(done.path, checksums=True)


def test_stale_temp_removed_live_one_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / contract.temp_dirname(5, int(dead.stdout))
    live = tmp_path / contract.temp_dirname(6)  # our own pid: being written
    stale.mkdir()
    live.mkdir()
    assert commit_mod.remove_stale_temp(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_prepare_directory_errors(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(CheckpointDirError, match="not a directory"):
        commit_mod.prepare_directory(afile / "ckpts")
    with pytest.raises(CheckpointDirError, match="not a directory"):
        commit_mod.prepare_directory(afile)
    commit_mod.prepare_directory(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe is gone


# ---------------------------------------------------------------- reporter


@pytest.fixture
def daemon_socket(tmp_path: Path):
    path = str(tmp_path / "w.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def _drain(sock: socket.socket) -> list[dict]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(contract.decode_message(sock.recv(contract.MAX_MESSAGE_BYTES)))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_reporter_messages_and_rate_limit(daemon_socket) -> None:
    path, sock = daemon_socket
    clock = FakeClock()
    r = Reporter(path, clock=clock, heartbeat_interval=0.5)
    r.hello("tensorflow 2.x")
    for step in range(1, 101):  # 100 steps in no time: one heartbeat
        r.progress(step)
    clock.advance(0.5)
    r.progress(101)
    r.send(contract.MSG_CHECKPOINT, step=101, path="/c/ckpt-000000000101", bytes=5, seconds=0.1,
           reason="periodic")
    msgs = _drain(sock)
    assert [m["type"] for m in msgs] == ["hello", "progress", "progress", "checkpoint"]
    assert msgs[0]["handles"] == ["SIGUSR1", "SIGTERM"] and msgs[0]["pid"] == os.getpid()
    assert [m["step"] for m in msgs[1:3]] == [1, 101]
    r.close()


def test_reporter_repeats_its_hello_with_heartbeats(daemon_socket) -> None:
    # A lost hello would keep the daemon from ever sending SIGUSR1: it is repeated.
    path, sock = daemon_socket
    clock = FakeClock()
    r = Reporter(path, clock=clock, heartbeat_interval=0.5)
    r.hello("tensorflow 2.x")
    _drain(sock)
    msgs = []
    for step in range(1, 40):
        clock.advance(0.5)
        r.progress(step)
        msgs += _drain(sock)  # a datagram queue holds only a few messages
    hellos = [m for m in msgs if m["type"] == "hello"]
    assert 1 <= len(hellos) <= 2 and hellos[0]["handles"] == ["SIGUSR1", "SIGTERM"]
    assert sum(m["type"] == "progress" for m in msgs) == 39
    r.close()


def test_reporter_without_daemon_is_silent(tmp_path: Path) -> None:
    assert not Reporter(None).send(contract.MSG_PROGRESS, step=1)
    gone = Reporter(str(tmp_path / "nobody.sock"))
    assert gone.enabled
    assert not gone.send(contract.MSG_PROGRESS, step=1)  # ENOENT: dropped, no exception
    gone.progress(2)
    gone.close()


def test_reporter_never_blocks_on_a_full_queue(daemon_socket) -> None:
    path, sock = daemon_socket
    r = Reporter(path, heartbeat_interval=0)
    sent = sum(r.send(contract.MSG_PROGRESS, step=i) for i in range(5000))  # nobody reads
    assert 0 < sent < 5000
    r.close()


# ------------------------------------------------------------------ signals


def test_signal_handlers_only_record() -> None:
    req = SignalRequests()
    before = signal.getsignal(signal.SIGTERM)
    assert req.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert req.checkpoint_requested and not req.stop_requested
        req.clear_checkpoint()
        os.kill(os.getpid(), signal.SIGTERM)
        assert req.stop_requested and not req.checkpoint_requested
    finally:
        req.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_import_service_is_cheap() -> None:
    code = "import sys, service; assert 'tensorflow' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_manifest_json_is_contract_format(tmp_path: Path) -> None:
    done = commit_mod.commit(_temp_with_files(tmp_path, 2), 2, "final", started=0.0)
    data = json.loads((done.path / contract.MANIFEST_NAME).read_text())
    assert data["format"] == contract.MANIFEST_FORMAT and data["checksum"] == "crc32"
    assert data["reason"] == "final" and data["created"].endswith("Z")
