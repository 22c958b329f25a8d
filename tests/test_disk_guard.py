"""The disk guard component on real files, with injected disk statistics (no root needed).

The injected volume reports `used` = a fixed baseline + what the checkpoint dir really
occupies, so deleting real folders really frees (fake) space.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import contract
from daemon.clock import FakeClock, SystemClock
from daemon.components import CheckpointFailure, CheckpointReport
from daemon.config import DiskConfig
from daemon.disk_scan import CheckpointDirView
from daemon.diskguard import DiskGuard, is_space_error
from tests.disk_fixtures import write_checkpoint, write_foreign

MiB = 1 << 20


def allocated(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class FakeVolume:
    """disk_usage stand-in: a volume of `total` bytes holding `base` + the dir's real size."""

    def __init__(self, directory: Path, total: int, base: int = 0) -> None:
        self.directory, self.total, self.base = directory, total, base
        self.calls = 0

    def __call__(self, path: str) -> Any:
        self.calls += 1
        used = self.base + allocated(self.directory)
        return type("U", (), {"total": self.total, "used": used, "free": self.total - used})()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    ckpt, state = tmp_path / "ckpt", tmp_path / "state"
    ckpt.mkdir()
    state.mkdir()
    return ckpt, state


def make_guard(ckpt: Path, state: Path, volume: FakeVolume, clock: Any = None, **cfg: Any) -> DiskGuard:
    disk = DiskConfig(**{"warn_percent": 70.0, "prune_percent": 85.0, "margin": 1.0,
                         "interval_seconds": 30.0, **cfg})
    return DiskGuard(ckpt, state, disk, clock or FakeClock(wall_start=time.time()),
                     disk_usage=volume, stale_grace_seconds=0.0, background_checks=False)


def steps_in(ckpt: Path) -> list[int]:
    return [e.step for e in contract.scan(ckpt) if not e.is_temp]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_prunes_oldest_first_keeps_newest_and_foreign(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in range(100, 1100, 100):
        write_checkpoint(ckpt, step, 1 * MiB)
    foreign = write_foreign(ckpt / "notes.txt", 1 * MiB)
    # 11 MiB of 11.5 MiB ~ 96% -> two must go to get below 85%
    volume = FakeVolume(ckpt, total=int(11.5 * MiB))
    guard = make_guard(ckpt, state, volume)
    with capture_logs() as logs:
        decision = guard.evaluate()
        guard.evaluate()  # a second look changes nothing and logs nothing new
    assert decision is not None
    assert steps_in(ckpt) == list(range(300, 1100, 100))
    assert [e["step"] for e in events(logs, "disk.pruned")] == [100, 200]
    assert all(e["bytes"] >= MiB and e["path"].endswith(contract.checkpoint_dirname(e["step"]))
               for e in events(logs, "disk.pruned"))
    assert foreign.exists() and foreign.stat().st_size == MiB
    assert len(events(logs, "disk.foreign_entry")) == 1
    assert [e["level"] for e in events(logs, "disk.pressure")] == ["warn", "prune"]
    status = guard.status()
    assert status["state"] == "warn" and status["pruned_count"] == 2
    assert status["pruned_bytes"] >= 2 * MiB
    assert set(status) >= {"percent", "free_bytes", "total_bytes", "state", "pruned_count", "pruned_bytes"}
    contract.verify(ckpt / contract.checkpoint_dirname(1000))


def test_newest_valid_survives_even_when_nothing_else_is_left(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    write_checkpoint(ckpt, 1, 1 * MiB)
    write_checkpoint(ckpt, 2, 1 * MiB)
    write_foreign(ckpt / "dataset.cache", 3 * MiB)
    # 5 MiB of 5.3: prune; one deletion leaves 1.3 MiB free < 1 MiB x 1.5 needed
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=int(5.3 * MiB)), margin=1.5)
    with capture_logs() as logs:
        guard.evaluate()
    assert steps_in(ckpt) == [2]
    assert len(events(logs, "disk.prune_exhausted")) == 1
    assert guard.status()["state"] == "low_space"
    assert contract.read_control(state / "control.json")["skip_periodic"] is True


def test_content_corrupt_newest_does_not_cost_the_real_newest_valid(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3):
        write_checkpoint(ckpt, step, 1 * MiB)
    data = ckpt / contract.checkpoint_dirname(3) / "variables.data-00000-of-00001"
    with open(data, "r+b") as f:  # same size, different content: only a checksum sees it
        f.write(b"\0" * 4096)
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=3 * MiB + 100_000))
    with capture_logs() as logs:
        guard.evaluate()
    assert 2 in steps_in(ckpt)  # the real newest valid one
    assert contract.newest_valid(ckpt) is not None and contract.newest_valid(ckpt)[0].step == 2
    assert len(events(logs, "disk.damaged_checkpoint")) == 1


def test_damaged_folders_go_before_valid_ones(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3, 4):
        write_checkpoint(ckpt, step, 1 * MiB)
    os.unlink(ckpt / contract.checkpoint_dirname(2) / contract.MANIFEST_NAME)
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=int(4.4 * MiB)))
    with capture_logs() as logs:
        guard.evaluate()
    assert [e["step"] for e in events(logs, "disk.pruned")][0] == 2
    assert steps_in(ckpt)[-1] == 4


def test_stale_temp_removed_live_temp_never(dirs: tuple[Path, Path], dead_pid: int, live_pid: int) -> None:
    ckpt, state = dirs
    write_checkpoint(ckpt, 1, 1 * MiB)
    stale = ckpt / contract.temp_dirname(2, dead_pid)
    live = ckpt / contract.temp_dirname(3, live_pid)
    for folder in (stale, live):
        folder.mkdir()
        write_foreign(folder / "part", 1 * MiB)
    # Over the prune threshold: still the live writer's folder must not be touched.
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=int(3.2 * MiB)))
    with capture_logs() as logs:
        guard.evaluate()
    assert not stale.exists()
    assert live.exists() and (live / "part").stat().st_size == MiB
    assert steps_in(ckpt) == [1]
    removed = events(logs, "disk.stale_temp_removed")
    assert [(e["step"], e["writer_pid"]) for e in removed] == [(2, dead_pid)]


def test_fresh_stale_temp_waits_for_the_grace_period(dirs: tuple[Path, Path], dead_pid: int) -> None:
    ckpt, state = dirs
    stale = ckpt / contract.temp_dirname(7, dead_pid)
    stale.mkdir()
    clock = FakeClock(wall_start=time.time())
    disk = DiskConfig(margin=1.0)
    guard = DiskGuard(ckpt, state, disk, clock, disk_usage=FakeVolume(ckpt, 100 * MiB),
                      stale_grace_seconds=5.0, background_checks=False)
    guard.evaluate()
    assert stale.exists()
    clock.advance(6.0)
    guard.evaluate()
    assert not stale.exists()


def test_skip_periodic_control_file_appears_and_disappears(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    write_checkpoint(ckpt, 1, 2 * MiB)
    hog = write_foreign(ckpt / "hog", 3 * MiB)
    # 5 MiB used of 6 MiB: 1 MiB free < 2 MiB x 1.5 needed, nothing may be pruned.
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=6 * MiB + 100_000), margin=1.5)
    control = state / "control.json"
    with capture_logs() as logs:
        guard.evaluate()
        assert contract.read_control(control)["skip_periodic"] is True
        assert "the next checkpoint needs" in contract.read_control(control)["reason"]
        assert guard.status()["state"] == "low_space" and guard.status()["skip_periodic"]
        guard.evaluate()
        hog.unlink()  # space returns
        guard.evaluate()
    assert not control.exists()
    assert guard.status()["state"] in ("ok", "warn") and not guard.status()["skip_periodic"]
    assert len(events(logs, "disk.skip_periodic")) == 1
    assert len(events(logs, "disk.space_returned")) == 1
    assert steps_in(ckpt) == [1]


def test_stale_control_file_from_a_previous_run_is_cleared(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    contract.write_json_atomic(state / "control.json", {"skip_periodic": True, "reason": "old"})
    guard = make_guard(ckpt, state, FakeVolume(ckpt, 100 * MiB))
    guard.evaluate()
    assert not (state / "control.json").exists()


def test_prunes_below_threshold_to_keep_room_for_next_save(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3):
        write_checkpoint(ckpt, step, 2 * MiB)
    # 6 MiB of 10 (60%, no pressure) but 4 MiB free < 2 MiB x 2.5 margin.
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=10 * MiB + 100_000), margin=2.5)
    with capture_logs() as logs:
        guard.evaluate()
    assert steps_in(ckpt) == [2, 3]
    assert events(logs, "disk.pruned")[0]["reason"] == "room_for_next_save"
    assert not (state / "control.json").exists()


def test_save_failed_for_space_frees_all_that_may_go(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3, 4):
        write_checkpoint(ckpt, step, 1 * MiB)
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=100 * MiB))
    guard.evaluate()
    assert steps_in(ckpt) == [1, 2, 3, 4]  # plenty of room: nothing to do
    guard.on_checkpoint_failed(CheckpointFailure(5, "periodic", "[Errno 28] No space left on device"))
    with capture_logs() as logs:
        guard.evaluate()
    assert steps_in(ckpt) == [4]
    assert {e["reason"] for e in events(logs, "disk.pruned")} == {"save_failed"}
    guard.on_checkpoint_failed(CheckpointFailure(6, "periodic", "worker crashed"))  # not a space error
    write_checkpoint(ckpt, 5, 1 * MiB)
    guard.evaluate()
    assert steps_in(ckpt) == [4, 5]


@pytest.mark.parametrize(
    ("text", "space"),
    [
        ("[Errno 28] No space left on device", True),
        ("OSError: ENOSPC while writing", True),
        ("RESOURCE_EXHAUSTED: ... ; No space left on device", True),
        ("[Errno 122] Disk quota exceeded", True),
        ("ResourceExhaustedError: OOM when allocating tensor with shape[4096,4096]", False),
        ("ValueError: shapes do not match", False),
    ],
)
def test_is_space_error(text: str, space: bool) -> None:
    assert is_space_error(text) is space


def test_growing_save_raises_the_room_needed(dirs: tuple[Path, Path], live_pid: int) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3, 4):
        write_checkpoint(ckpt, step, 1 * MiB)
    growing = ckpt / contract.temp_dirname(5, live_pid)
    growing.mkdir()
    write_foreign(growing / "part", 3 * MiB)  # the model grew: this save is 3x the last
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=16 * MiB))
    guard.evaluate()
    assert steps_in(ckpt) == [1, 2, 3, 4]  # need 3 MiB (the partial), 9 MiB free
    write_foreign(growing / "part2", 3 * MiB)  # it grows on: 6 MiB needed, < 6 free
    guard.evaluate()
    assert guard.status()["need_bytes"] >= 6 * MiB
    assert guard.status()["free_bytes"] >= guard.status()["need_bytes"]
    assert steps_in(ckpt) == [2, 3, 4] and (growing / "part2").exists()


def test_on_checkpoint_report_size_used_before_any_manifest(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=10 * MiB))
    guard.on_checkpoint(CheckpointReport(1, str(ckpt / "x"), 4 * MiB, 1.0, "periodic"))
    guard.evaluate()
    assert guard.status()["need_bytes"] == 4 * MiB


def test_unmeasurable_volume_is_logged_once(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs

    def broken(path: str) -> Any:
        raise PermissionError(13, "Permission denied", path)

    guard = make_guard(ckpt, state, broken)  # type: ignore[arg-type]
    with capture_logs() as logs:
        assert guard.evaluate() is None
        assert guard.evaluate() is None
    assert len(events(logs, "disk.usage_failed")) == 1


def test_symlink_and_files_with_layout_names_are_foreign(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, state = dirs
    outside = tmp_path / "precious"
    outside.mkdir()
    write_foreign(outside / "data", MiB)
    os.symlink(outside, ckpt / contract.checkpoint_dirname(1))
    write_foreign(ckpt / contract.checkpoint_dirname(2), MiB)  # a file, not a folder
    write_checkpoint(ckpt, 3, MiB)
    write_checkpoint(ckpt, 4, MiB)
    guard = make_guard(ckpt, state, FakeVolume(ckpt, total=int(3.3 * MiB)))
    with capture_logs() as logs:
        guard.evaluate()
    assert (outside / "data").exists() and (ckpt / contract.checkpoint_dirname(2)).is_file()
    assert len(events(logs, "disk.foreign_entry")) == 2
    assert steps_in(ckpt) == [4]


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_thread_reacts_to_filesystem_events(dirs: tuple[Path, Path], observer: str) -> None:
    """Real watchdog observer and thread: a new checkpoint that crosses the threshold is pruned."""
    ckpt, state = dirs
    for step in (1, 2, 3):
        write_checkpoint(ckpt, step, 1 * MiB)
    volume = FakeVolume(ckpt, total=int(4.5 * MiB))
    guard = DiskGuard(ckpt, state, DiskConfig(warn_percent=70, prune_percent=85, margin=1.0,
                                              observer=observer, interval_seconds=60.0),
                      SystemClock(), disk_usage=volume)
    posted: list[object] = []
    guard.start(posted.append)
    try:
        deadline = time.monotonic() + 5
        while guard.status()["percent"] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps_in(ckpt) == [1, 2, 3]
        t0 = time.monotonic()
        write_checkpoint(ckpt, 4, 1 * MiB)  # 4 of 4.5 MiB: 89% -> prune
        while 1 in steps_in(ckpt) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        reaction = time.monotonic() - t0
    finally:
        guard.stop()
    assert steps_in(ckpt) == [2, 3, 4]
    # generous (a loaded CI box); the timer alone would take 60 s. bench_disk has the real numbers
    assert reaction < (3.0 if observer == "inotify" else 6.0), reaction  # polling: 1 s scans
    assert guard.status()["observer"] == observer


def test_stop_is_prompt_and_idle_guard_does_little(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    volume = FakeVolume(ckpt, total=100 * MiB)
    guard = DiskGuard(ckpt, state, DiskConfig(interval_seconds=30.0), SystemClock(), disk_usage=volume)
    guard.start(lambda _e: None)
    time.sleep(0.5)
    calls = volume.calls
    time.sleep(1.0)
    assert volume.calls == calls  # no busy polling while nothing changes
    t0 = time.monotonic()
    guard.stop()
    assert time.monotonic() - t0 < 1.5
    assert not any(t.name == "preemptd-diskguard" for t in threading.enumerate())


def test_daemon_package_does_not_import_tensorflow() -> None:
    code = "import daemon.diskguard, sys; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)



def test_unusable_checkpoint_dir_is_reported_once_and_never_crashes(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint dir's parent should be")
    ckpt, state = blocker / "ckpt", tmp_path / "state"
    guard = DiskGuard(ckpt, state, DiskConfig(interval_seconds=0.05), SystemClock())
    with capture_logs() as logs:
        guard.start(lambda _e: None)
        time.sleep(0.6)  # several timer ticks: each would retry and fail
        guard.stop()
    names = [e["event"] for e in logs]
    assert names.count("disk.dir_failed") == 1
    assert names.count("disk.usage_failed") == 1
    assert names.count("disk.check_failed") == 0  # no bug surfaced as an exception
    assert 1 <= names.count("disk.watch_failed") <= 3  # inotify, polling, timer only: once each
    assert guard.status()["percent"] is None


def test_newest_not_yet_checksummed_holds_back_the_one_before(dirs: tuple[Path, Path]) -> None:
    """The newest folder's checksums are read in the background; until they pass, the
    previous valid checkpoint is not offered for pruning (it may be the real newest valid)."""
    ckpt, state = dirs
    for step in (1, 2, 3, 4):
        write_checkpoint(ckpt, step, 1 * MiB)
    checked = threading.Event()
    view = CheckpointDirView(ckpt, on_checked=checked.set)
    try:
        first = view.candidates(view.scan())
        assert [c.step for c in first] == [1, 2, 4]  # 3 held back while 4 is being read
        assert checked.wait(10)
        second = view.candidates(view.scan())
        assert [c.step for c in second] == [1, 2, 3, 4] and all(c.valid for c in second)
    finally:
        view.close()


def test_save_failure_finishes_after_the_background_checksum_read(dirs: tuple[Path, Path]) -> None:
    ckpt, state = dirs
    for step in (1, 2, 3, 4):
        write_checkpoint(ckpt, step, 1 * MiB)
    guard = DiskGuard(ckpt, state, DiskConfig(margin=1.0), FakeClock(wall_start=time.time()),
                      disk_usage=FakeVolume(ckpt, total=100 * MiB))
    try:
        guard.on_checkpoint_failed(CheckpointFailure(5, "periodic", "OSError: [Errno 28] No space left"))
        guard.evaluate()
        # 3 is held back while 4's checksums are read, unless that read already finished
        assert steps_in(ckpt) in ([3, 4], [4])
        deadline = time.monotonic() + 10
        while steps_in(ckpt) != [4] and time.monotonic() < deadline:
            time.sleep(0.02)
            guard.evaluate()  # what the reader's wake-up does in the guard's thread
        assert steps_in(ckpt) == [4]
        write_checkpoint(ckpt, 5, 1 * MiB)
        guard.evaluate()
        assert steps_in(ckpt) == [4, 5]  # the alarm is over: plenty of room, nothing goes
    finally:
        guard.stop()
