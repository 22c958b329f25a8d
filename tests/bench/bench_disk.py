"""Benchmark of the disk guard: threshold crossing -> prune finished, idle CPU, check cost.

Run: ``.venv/bin/python -m tests.bench.bench_disk [--quick]``. On a size-limited tmpfs
when root (real psutil.disk_usage and inotify), else on a temp dir with a simulated
volume of the same size. Anchors, measured side by side in the same run:

- prune reaction: a bare ``shutil.rmtree`` of one checkpoint folder of the same size
  (the floor: what the deletion itself costs);
- idle CPU with inotify: the same guard with the polling observer (what watching a
  network filesystem costs instead);
- one idle check: one ``psutil.disk_usage`` call (the statistic every check reads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import structlog

from daemon import contract
from daemon.clock import SystemClock
from daemon.config import DiskConfig
from daemon.diskguard import DiskGuard
from tests.bench import common
from tests.bench.common import row as _row
from tests.disk_fixtures import mounted, write_checkpoint

MiB = 1 << 20
PRUNE_PERCENT = 78.0


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


class _SimulatedVolume:
    """Used when not root: a volume of `total` bytes holding what the dir occupies."""

    def __init__(self, directory: Path, total: int) -> None:
        self.directory, self.total = directory, total

    def __call__(self, path: str) -> Any:
        used = 0
        for root, dirs, files in os.walk(self.directory):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    used += os.lstat(os.path.join(root, name)).st_blocks * 512
        return _Usage(self.total, used, self.total - used)


@contextlib.contextmanager
def _volume(size_mib: int) -> Iterator[tuple[Path, Callable[[str], Any], str]]:
    cm = mounted("tmpfs", size_mib)
    try:
        mnt = cm.__enter__()
    except RuntimeError:  # not root, or no mount here: simulate the volume
        pass
    else:
        try:
            yield mnt, psutil.disk_usage, "tmpfs"
        finally:
            cm.__exit__(None, None, None)
        return
    with tempfile.TemporaryDirectory(prefix="preemptd-bench-disk-") as tmp:
        root = Path(tmp)
        (root / "checkpoints").mkdir()
        yield root, _SimulatedVolume(root / "checkpoints", size_mib * MiB), "simulated"


def _wait(cond: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("guard did not react")
        time.sleep(0.001)
    return time.monotonic() - t0


def _reactions(observer: str, ckpt_mib: int, rounds: int) -> tuple[list[float], float, float, str]:
    """(reaction seconds per crossing, idle CPU % of one core, one idle check in ms, fs)."""
    units = 20  # the volume holds 20 checkpoints; the 16th crosses the threshold (78 %)
    with _volume(units * ckpt_mib) as (mnt, usage_fn, fs):
        ckpt, state = mnt / "checkpoints", mnt / "state"
        ckpt.mkdir(exist_ok=True)
        for step in range(1, 16):
            write_checkpoint(ckpt, step, ckpt_mib * MiB)
        cfg = DiskConfig(warn_percent=70, prune_percent=PRUNE_PERCENT, observer=observer,
                         interval_seconds=30.0, margin=1.5)
        guard = DiskGuard(ckpt, state, cfg, SystemClock(), disk_usage=usage_fn)
        guard.start(lambda _e: None)
        try:
            _wait(lambda: guard.status()["percent"] is not None, 10)
            times = []
            for i in range(rounds):
                step = 16 + i
                crossed: list[float] = []
                # One write() takes usage from 75 % to 80 %: the threshold is crossed the
                # moment it returns; the oldest checkpoint must go.
                write_checkpoint(ckpt, step, ckpt_mib * MiB, single_write=True,
                                 after_payload=lambda c=crossed: c.append(time.monotonic()))
                t0 = crossed[0]
                oldest = ckpt / contract.checkpoint_dirname(step - 15)
                _wait(lambda o=oldest: not o.exists()  # type: ignore[misc]
                      and usage_fn(str(ckpt)).used / usage_fn(str(ckpt)).total * 100 < PRUNE_PERCENT, 10)
                times.append(time.monotonic() - t0)
            time.sleep(0.5)
            idle_s = 3.0 if rounds < 8 else 10.0
            c0, w0 = time.process_time(), time.monotonic()
            time.sleep(idle_s)
            idle_cpu = 100.0 * (time.process_time() - c0) / (time.monotonic() - w0)
        finally:
            guard.stop()
        # One check with nothing to do, called directly (the thread is stopped).
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            guard.evaluate()
        check_ms = 1000 * (time.perf_counter() - t0) / n
    return times, idle_cpu, check_ms, fs


def _bare_rmtree(ckpt_mib: int, rounds: int) -> list[float]:
    times = []
    with _volume(ckpt_mib * (rounds + 2)) as (mnt, _usage, _fs):
        for i in range(rounds):
            path = write_checkpoint(mnt, i + 1, ckpt_mib * MiB)
            t0 = time.monotonic()
            shutil.rmtree(path)
            times.append(time.monotonic() - t0)
    return times


def _disk_usage_ms(path: str, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        psutil.disk_usage(path)
    return 1000 * (time.perf_counter() - t0) / n


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows: prune reaction (inotify, polling), idle CPU, one idle check."""
    ckpt_mib, rounds = (4, 5) if quick else (16, 12)
    ino, ino_cpu, ino_check, fs = _reactions("inotify", ckpt_mib, rounds)
    poll, poll_cpu, _poll_check, _ = _reactions("polling", ckpt_mib, max(3, rounds // 3))
    bare = statistics.median(_bare_rmtree(ckpt_mib, rounds))
    du_ms = _disk_usage_ms(tempfile.gettempdir())
    where = f"{fs}, {ckpt_mib} MiB checkpoints x 16"
    return [
        _row(f"disk.prune_reaction_median ({where}, inotify)", 1000 * statistics.median(ino), "ms",
             "bare rmtree of one checkpoint", 1000 * bare, "<= 1000 ms"),
        _row(f"disk.prune_reaction_max ({where}, inotify)", 1000 * max(ino), "ms",
             "bare rmtree of one checkpoint", 1000 * bare, "<= 1000 ms"),
        _row(f"disk.prune_reaction_median ({where}, polling 1 s)", 1000 * statistics.median(poll), "ms",
             "bare rmtree of one checkpoint", 1000 * bare, "<= 2000 ms (poll interval + prune)"),
        _row("disk.idle_cpu (inotify)", ino_cpu, "% of one core",
             "same guard, polling observer", poll_cpu, "< 0.5 %"),
        _row("disk.idle_check (16 checkpoints, nothing to do)", ino_check, "ms",
             "one psutil.disk_usage call", du_ms, "< 5 ms"),
    ]


def _quiet_logs() -> None:
    # The guard logs every prune; keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__, setup=_quiet_logs))
