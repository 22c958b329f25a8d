"""The disk guard on real, small filesystems the test mounts (tmpfs; ext4 on a loop device).

Real psutil.disk_usage, real inotify, real writer processes that fill the disk. Needs
root to mount; skipped with the reason otherwise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from daemon import contract
from daemon.clock import SystemClock
from daemon.components import CheckpointFailure
from daemon.config import DiskConfig
from daemon.diskguard import DiskGuard
from tests.disk_fixtures import EXIT_NO_SPACE, mounted, write_checkpoint, write_foreign

pytestmark = pytest.mark.root

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def volume(request: pytest.FixtureRequest) -> Iterator[Path]:
    kind, size = request.param
    try:
        cm = mounted(kind, size)
        mnt = cm.__enter__()
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a {size} MiB {kind}: {exc}")
    try:
        yield mnt
    finally:
        cm.__exit__(None, None, None)


def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until `cond` held; raises AssertionError on timeout."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - t0


def steps_in(ckpt: Path) -> list[int]:
    return [e.step for e in contract.scan(ckpt) if not e.is_temp]


def start_guard(ckpt: Path, state: Path, **disk: Any) -> DiskGuard:
    cfg = DiskConfig(**{"margin": 1.0, "interval_seconds": 30.0, **disk})
    guard = DiskGuard(ckpt, state, cfg, SystemClock(), stale_grace_seconds=0.5)
    guard.start(lambda _event: None)
    wait_for(lambda: guard.status()["percent"] is not None, 5)
    return guard


def run_writer(ckpt: Path, step: int, nbytes: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.disk_fixtures", "write", str(ckpt), str(step), str(nbytes), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


class Verifier(threading.Thread):
    """Checks, over and over while a scenario runs, that a restorable checkpoint at least
    as new as `min_step` exists (newest valid, checksums included)."""

    def __init__(self, directory: Path, min_step: int) -> None:
        super().__init__(daemon=True)
        self.directory, self.min_step = directory, min_step
        self.checks = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def _ok(self) -> bool:
        found = contract.newest_valid(self.directory)
        return found is not None and found[0].step >= self.min_step

    def run(self) -> None:
        while not self._done.is_set():
            # A listing taken just before a newer checkpoint's rename may name a folder
            # that is pruned right after; a restore would simply look again.
            if not self._ok() and not self._ok():
                self.failures.append(f"no valid checkpoint >= {self.min_step}: {steps_in(self.directory)}")
            self.checks += 1

    def finish(self) -> None:
        self._done.set()
        self.join(5)


@pytest.mark.parametrize("volume", [("tmpfs", 48), ("ext4", 48)], indirect=True, ids=["tmpfs", "ext4"])
def test_prunes_in_order_keeps_newest_and_foreign(volume: Path) -> None:
    ckpt, state = volume / "checkpoints", volume / "state"
    ckpt.mkdir()
    du = psutil.disk_usage(str(volume))
    unit = (du.free // 16) // 4096 * 4096  # sizes relative to what this filesystem offers
    foreign = write_foreign(ckpt / "user-notes.bin", 2 * unit)
    foreign_crc = zlib.crc32(foreign.read_bytes())
    for step in (100, 200, 300, 400, 500):
        write_checkpoint(ckpt, step, 2 * unit)
    damaged = ckpt / contract.checkpoint_dirname(250)  # no manifest: not a checkpoint
    damaged.mkdir()
    write_foreign(damaged / "half", unit)
    percent = psutil.disk_usage(str(volume)).percent
    assert 70 < percent < 85, percent  # 13 of 16 units: warn, not prune yet

    with capture_logs() as logs:
        guard = start_guard(ckpt, state, warn_percent=60, prune_percent=85)
        try:
            assert steps_in(ckpt) == [100, 200, 250, 300, 400, 500]
            write_checkpoint(ckpt, 600, 2 * unit)  # 15 units: crosses 85 %
            t0 = time.monotonic()
            reaction = wait_for(lambda: psutil.disk_usage(str(volume)).percent < 85, 5)
            time.sleep(0.3)  # let it settle: nothing more may go
        finally:
            guard.stop()
    pruned = [e for e in logs if e["event"] == "disk.pruned"]
    assert [e["step"] for e in pruned] == [250, 100]  # damaged first, then the oldest
    assert steps_in(ckpt) == [200, 300, 400, 500, 600]
    contract.verify(ckpt / contract.checkpoint_dirname(600))
    assert zlib.crc32(foreign.read_bytes()) == foreign_crc
    assert [e["path"] for e in logs if e["event"] == "disk.foreign_entry"] == [str(foreign)]
    assert reaction < 3.0, f"reaction {reaction:.3f} s"  # generous; the timer would take 30 s
    assert time.monotonic() - t0 < 10
    assert guard.status()["pruned_count"] == 2


@pytest.mark.parametrize("volume", [("tmpfs", 32)], indirect=True, ids=["tmpfs"])
def test_skip_periodic_control_file_appears_and_disappears(volume: Path) -> None:
    ckpt, state = volume / "checkpoints", volume / "state"
    ckpt.mkdir()
    write_checkpoint(ckpt, 10, 6 * MiB)
    guard = start_guard(ckpt, state, warn_percent=80, prune_percent=95, margin=1.5)
    control = state / "control.json"
    try:
        assert not control.exists()
        hog = write_foreign(ckpt / "hog", 18 * MiB)  # 8 MiB free < 9 MiB needed; nothing may go
        appeared = wait_for(control.exists, 3)
        assert contract.read_control(control)["skip_periodic"] is True
        assert guard.status()["state"] == "low_space"
        assert steps_in(ckpt) == [10]  # the newest valid one is never pruned
        hog.unlink()
        disappeared = wait_for(lambda: not control.exists(), 3)
    finally:
        guard.stop()
    assert guard.status()["state"] in ("ok", "warn")
    assert appeared < 3 and disappeared < 3


@pytest.mark.parametrize("volume", [("tmpfs", 64)], indirect=True, ids=["tmpfs"])
def test_enospc_mid_save_then_next_save_succeeds(volume: Path) -> None:
    ckpt, state = volume / "checkpoints", volume / "state"
    ckpt.mkdir()
    write_foreign(ckpt / "dataset.cache", 4 * MiB)
    for step in (100, 200, 300, 400):
        write_checkpoint(ckpt, step, 8 * MiB)
    previous = ckpt / contract.checkpoint_dirname(400)
    verifier = Verifier(ckpt, 400)
    verifier.start()
    guard = start_guard(ckpt, state, warn_percent=80, prune_percent=90)
    try:
        # The model grew: this save (40 MiB) does not fit in the 28 MiB left; one write
        # call fills the disk, the writer fails and removes its `.tmp-` folder.
        failed = run_writer(ckpt, 500, 40 * MiB, "--single-write")
        assert failed.returncode == EXIT_NO_SPACE, failed.stderr
        assert not [e for e in contract.scan(ckpt) if e.step == 500]  # no half checkpoint
        # The supervisor relays the worker's checkpoint_failed message.
        guard.on_checkpoint_failed(CheckpointFailure(500, "periodic", failed.stdout))
        wait_for(lambda: steps_in(ckpt) == [400], 5)
        contract.verify(previous)  # the newest valid one was never at risk
        ok = run_writer(ckpt, 500, 40 * MiB, "--single-write")
        assert ok.returncode == 0, ok.stderr + ok.stdout
    finally:
        guard.stop()
        verifier.finish()
    contract.verify(ckpt / contract.checkpoint_dirname(500))
    assert verifier.failures == [] and verifier.checks > 0
    assert (ckpt / "dataset.cache").stat().st_size == 4 * MiB


@pytest.mark.parametrize("volume", [("tmpfs", 64)], indirect=True, ids=["tmpfs"])
def test_save_that_outgrows_the_disk_is_made_room_for_while_it_writes(volume: Path) -> None:
    """Prune before it fills: a slow, growing save crosses the threshold and the guard
    frees space during the write, so the save never sees ENOSPC."""
    ckpt, state = volume / "checkpoints", volume / "state"
    ckpt.mkdir()
    for step in (100, 200, 300, 400):
        write_checkpoint(ckpt, step, 8 * MiB)
    verifier = Verifier(ckpt, 400)
    verifier.start()
    guard = start_guard(ckpt, state, warn_percent=70, prune_percent=85)
    writer = (
        "import os, sys, time\n"
        "from tests.disk_fixtures import write_checkpoint\n"
        "import tests.disk_fixtures as f\n"
        "orig = f._write_all\n"
        "def slow(fd, data):\n"
        "    orig(fd, data); time.sleep(0.01)\n"
        "f._write_all = slow\n"
        f"write_checkpoint({str(ckpt)!r}, 500, 48 * {MiB})\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", writer], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr  # no ENOSPC: room was made during the write
        # 400 goes too once 500 is in: room for the next 48 MiB save is wanted
        wait_for(lambda: steps_in(ckpt) == [500], 5)
    finally:
        guard.stop()
        verifier.finish()
    contract.verify(ckpt / contract.checkpoint_dirname(500))
    assert verifier.failures == [] and verifier.checks > 0


@pytest.mark.parametrize("volume", [("tmpfs", 32)], indirect=True, ids=["tmpfs"])
def test_killed_writer_leftover_removed_live_writer_untouched(volume: Path) -> None:
    ckpt, state = volume / "checkpoints", volume / "state"
    ckpt.mkdir()
    write_checkpoint(ckpt, 1, 4 * MiB)
    hold = (
        "import os, sys, time\n"
        "from daemon import contract\n"
        f"d = os.path.join({str(ckpt)!r}, contract.temp_dirname(int(sys.argv[1])))\n"
        "os.mkdir(d)\n"
        "with open(os.path.join(d, 'part'), 'wb') as f:\n"
        f"    f.write(os.urandom(8 * {MiB})); f.flush(); os.fsync(f.fileno())\n"
        "print('written', flush=True)\n"
        "time.sleep(120)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", hold, str(step)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE) for step in (2, 3)]
    guard = None
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "written"
        # 20 MiB of 32: pressure over 60 %, but both writers are alive.
        guard = start_guard(ckpt, state, warn_percent=50, prune_percent=60)
        time.sleep(1.0)
        assert len([e for e in contract.scan(ckpt) if e.is_temp]) == 2
        procs[0].send_signal(signal.SIGKILL)  # preempted mid-save
        procs[0].wait()
        guard.before_worker_start(str(ckpt))  # the supervisor is about to restart the worker
        wait_for(lambda: not (ckpt / contract.temp_dirname(2, procs[0].pid)).exists(), 5)
        live = ckpt / contract.temp_dirname(3, procs[1].pid)
        assert live.exists() and (live / "part").stat().st_size == 8 * MiB
        assert steps_in(ckpt) == [1]
    finally:
        if guard is not None:
            guard.stop()
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("volume", [("tmpfs", 4)], indirect=True, ids=["tmpfs"])
def test_atomic_json_write_on_a_full_disk_leaves_no_temp_file(volume: Path) -> None:
    """contract.write_json_atomic (the control file, the state file) on ENOSPC: an error,
    the previous file intact, and no half-written temp file left behind."""
    target = volume / "control.json"
    contract.write_json_atomic(target, {"skip_periodic": False})
    filler = volume / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
    with pytest.raises(OSError):
        contract.write_json_atomic(target, {"skip_periodic": True, "reason": "x" * 200_000})
    assert contract.read_control(target) == {"skip_periodic": False}
    assert sorted(p.name for p in volume.iterdir()) == ["control.json", "filler"]


E2E_WORKER = """
import os, sys, time
from daemon import contract
from tests.disk_fixtures import write_checkpoint
from tests.workers.common import send
ckpt = os.environ[contract.ENV_CHECKPOINT_DIR]
control = os.environ.get(contract.ENV_CONTROL)
send("hello", handles=["SIGUSR1", "SIGTERM"], framework="test")
skipped = 0
for step in range(1, 13):
    time.sleep(0.15)
    send("progress", step=step)
    if contract.read_control(control).get("skip_periodic"):
        skipped += 1
        continue
    t0 = time.monotonic()
    path = write_checkpoint(ckpt, step, 3 << 20)  # raises (exit 1) on ENOSPC
    send("checkpoint", step=step, path=str(path), bytes=3 << 20,
         seconds=time.monotonic() - t0, reason="periodic")
print("skipped", skipped, flush=True)
"""


@pytest.mark.parametrize("volume", [("tmpfs", 24)], indirect=True, ids=["tmpfs"])
def test_daemon_end_to_end_prunes_while_a_worker_saves(volume: Path, tmp_path: Path) -> None:
    """`preemptd run` with the guard from build_components: a worker saving 3 MiB every
    0.15 s on a 24 MiB volume never runs out of space; the state file shows the guard."""
    from tests.workers.harness import PY, Daemon

    config = tmp_path / "preemptd.toml"
    config.write_text(
        "[preemption]\nsources = []\n"
        "[checkpoint]\nkeep = 100\n"  # the worker keeps everything: only the guard prunes
        "[disk]\nwarn_percent = 50\nprune_percent = 70\nmargin = 1.0\ninterval_seconds = 30\n"
    )
    d = Daemon(tmp_path, [PY, "-c", E2E_WORKER], config=config, checkpoint_dir=volume / "ckpt",
               log_level="info")
    try:
        rc = d.wait(60)
    finally:
        d.close()
    assert rc == 0, d.raw[-20:]
    pruned = d.events("disk.pruned")
    assert len(pruned) >= 5
    assert [e["step"] for e in pruned] == sorted(e["step"] for e in pruned)  # oldest first
    assert d.events("disk.pressure")
    assert not d.events("checkpoint.failed")
    newest = contract.newest_valid(volume / "ckpt")
    assert newest is not None and newest[0].step == 12
    disk = d.state()["disk"]
    assert disk["pruned_count"] == len(pruned) and disk["state"] in ("ok", "warn", "pruning")
    assert disk["total_bytes"] == psutil.disk_usage(str(volume)).total
