"""Checkpoint costs of service.CheckpointManager, measured side by side with their anchors.

    .venv/bin/python -m tests.bench.bench_checkpoint           # 100 MB and 1 GB
    .venv/bin/python -m tests.bench.bench_checkpoint --quick   # 100 MB only

Rows (median of a few repetitions, same files system, same run):
- emergency save (request -> durable commit: TF write, fsync + crc32 of every file,
  manifest, rename, parent fsync) / raw write+fsync of the same bytes. Target <= 1.3.
- TF's synchronous write followed by fsync / raw write+fsync (the issue's reference point).
- (the training-thread stall per periodic save is in bench_stall.py)
- restore (verify sizes and crc32, TF read) / raw read of the same bytes, both from
  disk: the files' pages are dropped from the cache first (posix_fadvise DONTNEED).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import common
from tests.bench.common import row as _row

MB = 1 << 20
CHUNK = 64 * MB


def _drop_cache(path: Path) -> None:
    """Evict this file's (or folder's files') pages so the next read comes from disk."""
    paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_write_fsync(data: memoryview, path: Path) -> float:
    common.settle()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), CHUNK):
            os.write(fd, data[off:off + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def _raw_read(path: Path) -> float:
    _drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def _median(fn: Callable[[], float], reps: int) -> float:
    return statistics.median(fn() for _ in range(reps))


def measure_size(size_mb: int, reps: int, workdir: Path) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    import service
    from daemon import contract

    rows: list[dict] = []
    label = f"{size_mb} MB" if size_mb < 1024 else f"{size_mb // 1024} GB"
    n_vars = 4
    per_var = size_mb * MB // 4 // n_vars  # float32 elements per variable
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(per_var, dtype=np.float32) for _ in range(n_vars)]
    variables = [tf.Variable(v) for v in values]
    deltas = [tf.fill(v.shape, 1e-3) for v in variables]
    raw = memoryview(b"".join(v.tobytes() for v in values))
    del values

    def train_step() -> None:  # touches all the state, like an optimizer update
        for var, d in zip(variables, deltas, strict=True):
            var.assign_add(d)

    ckpt = tf.train.Checkpoint(**{f"v{i}": v for i, v in enumerate(variables)})
    raw_path = workdir / "raw.bin"
    ckdir = workdir / "ckpts"

    # -- emergency save vs raw write + fsync
    raw_times, emergency_times, tf_fsync_times = [], [], []
    step = 0
    for _ in range(reps):
        raw_times.append(_raw_write_fsync(raw, raw_path))
        raw_path.unlink()
        shutil.rmtree(ckdir, ignore_errors=True)
        mgr = service.CheckpointManager(ckpt, ckdir, every_steps=0, every_seconds=0, keep=100,
                                        handle_signals=False, environ={})
        step += 1
        train_step()
        common.settle()
        start = time.perf_counter()
        mgr.save(step, reason="preemption", wait=True)
        emergency_times.append(time.perf_counter() - start)
        mgr.close(final=False)
        shutil.rmtree(ckdir)
        # TF synchronous write, then fsync of what it wrote (no checksums, no manifest).
        prefix = workdir / "tfsync" / "ckpt"
        common.settle()
        start = time.perf_counter()
        ckpt.write(str(prefix))
        for p in prefix.parent.iterdir():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        contract.fsync_dir(prefix.parent)
        tf_fsync_times.append(time.perf_counter() - start)
        shutil.rmtree(prefix.parent)
    raw_med = statistics.median(raw_times)
    rows.append(_row(f"emergency save {label}", statistics.median(emergency_times), "s",
                     "raw write+fsync", raw_med, "<= 1.3"))
    rows.append(_row(f"TF write + fsync {label} (reference)", statistics.median(tf_fsync_times), "s",
                     "raw write+fsync", raw_med, "(issue: 1.7-2.0)"))

    # -- restore vs raw read
    shutil.rmtree(ckdir, ignore_errors=True)
    mgr = service.CheckpointManager(ckpt, ckdir, every_steps=0, every_seconds=0, handle_signals=False,
                                    environ={})
    committed = mgr.save(step, reason="requested", wait=True)
    mgr.close(final=False)
    _raw_write_fsync(raw, raw_path)

    def restore(checksums: bool = True) -> float:
        _drop_cache(committed)
        m = service.CheckpointManager(ckpt, ckdir, handle_signals=False, environ={}, checksums=checksums)
        start = time.perf_counter()
        assert m.restore_or_initialize() == step
        elapsed = time.perf_counter() - start
        m.close(final=False)
        return elapsed

    restore_med = _median(restore, reps)
    read_med = _median(lambda: _raw_read(raw_path), reps)
    sizes_only = _median(lambda: restore(checksums=False), reps)
    rows.append(_row(f"restore {label} (verify crc32 + TF read, cold)", restore_med, "s",
                     "raw read (cold)", read_med, "report"))
    rows.append(_row(f"restore {label} (sizes only + TF read, cold)", sizes_only, "s",
                     "raw read (cold)", read_med, "report"))
    raw_path.unlink()
    shutil.rmtree(ckdir)
    return rows


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for 100 MB (and 1 GB unless quick); see the module docstring."""
    import structlog

    # The manager logs every commit; keep the benchmark's output to its table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    sizes = [100] if quick else [100, 1024]
    rows: list[dict[str, Any]] = []
    base = Path(os.environ.get("BENCH_DIR") or tempfile.gettempdir())
    for size in sizes:
        workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
        try:
            rows.extend(measure_size(size, reps=5 if size <= 100 else 3, workdir=workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
