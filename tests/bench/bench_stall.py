"""Training-thread stall per periodic save, side by side with TF's synchronous save.

    .venv/bin/python -m tests.bench.bench_stall           # 100 MB and 1 GB states
    .venv/bin/python -m tests.bench.bench_stall --quick   # 100 MB only

Two training steps over the same state size:
- "update-only": every step adds a delta to all of the state (4 variables) and does
  nothing else, so the next update follows step_done at once and nothing can hide the
  snapshot's copy: service.policy.defer_copy keeps the copy on the training thread, and
  its floor is one memory copy of the state (a row of its own: numpy copy of the same
  bytes into mapped buffers, the fastest copy this machine does).
- "Adam step": a dense model (1024 -> hidden -> 1024) trained with Adam in a tf.function,
  batch 64; weights plus Adam's two slots make the state. Gradients come before the
  update, so the copy is deferred to a helper thread while they are computed.

Rows, per step and state size (medians; TF's CheckpointManager.save() of the same
tf.train.Checkpoint is the anchor, measured in the same run; target <= 0.05):
- stall per periodic save: time blocked in step_done (snapshot) plus, for a save
  whose next step paid TF's copy-on-write (a variable's buffer moved: its copy was
  not done before the update), that step's extra time. The count of such steps is in
  the row name.
- training time lost per periodic save (report): cycles of steps with one save at the
  start against the same cycles without a save, interleaved; the difference is the
  stall plus the CPU and memory bandwidth the background copy and write take from
  training (they run at a lower priority: service.priority). A save still running at
  the end of its cycle is waited for and that wait is counted as lost too.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import common
from tests.bench.common import row as _row

MB = 1 << 20
# A cycle lasts this many TF saves: long enough for a background save to end inside it.
CYCLE_SAVES = 6
WARMUP_CYCLES = 2  # the first save maps the host buffers and times the copy (never deferred)


@dataclass
class Job:
    """A training step over a tf.train.Checkpoint, and the tf.Variables it updates."""

    name: str
    step: Callable[[], Any]
    checkpoint: Any
    variables: list[Any]  # tf.Variables whose buffers the step updates in place


def update_only(size_mb: int) -> Job:
    import numpy as np
    import tensorflow as tf

    n_vars = 4
    per_var = size_mb * MB // 4 // n_vars
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.standard_normal(per_var, dtype=np.float32)) for _ in range(n_vars)]
    deltas = [tf.fill(v.shape, 1e-3) for v in variables]

    def step() -> None:
        for var, d in zip(variables, deltas, strict=True):
            var.assign_add(d)

    ckpt = tf.train.Checkpoint(**{f"v{i}": v for i, v in enumerate(variables)})
    return Job("update-only", step, ckpt, variables)


def adam_step(size_mb: int, batch: int = 64, width: int = 1024) -> Job:
    import keras
    import tensorflow as tf

    params = size_mb * MB // 4 // 3  # weights + Adam's two slots
    hidden = params // (2 * width)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dense(width)])
    opt = keras.optimizers.Adam(1e-4)
    opt.build(model.trainable_variables)
    x = tf.random.normal((batch, width))
    y = tf.random.normal((batch, width))

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    variables = [getattr(v, "value", v) for v in list(model.weights) + list(opt.variables)]
    return Job(f"Adam step, batch {batch}", step, ckpt, [v for v in variables if v.shape.rank])


def _addresses(variables: list[Any]) -> list[int]:
    """Buffer addresses of the variables the snapshot copies for real (smaller ones it shares)."""
    import numpy as np

    from service import snapshot

    big = [v for v in variables if v.shape.num_elements() * v.dtype.size >= snapshot._BIG]
    return [np.asarray(v.read_value()).ctypes.data for v in big]


@dataclass
class Samples:
    stalls: list[float] = field(default_factory=list)
    cow_steps: int = 0
    saves: int = 0
    deferred: int = 0
    lost: list[float] = field(default_factory=list)
    leftover: list[float] = field(default_factory=list)  # save still running at the end of its cycle


def _timed_steps(job: Job, mgr: Any, step: int, n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        job.step()
        times.append(time.perf_counter() - start)
        step += 1
        mgr.step_done(step)
    return sum(times), times


def measure_job(job: Job, label: str, pairs: int, workdir: Path, floor: bool = False,
                **manager_kw: Any) -> list[dict[str, Any]]:
    """The stall and lost-time rows of `job`; see the module docstring."""
    import tensorflow as tf

    import service

    # TF's synchronous save: the anchor.
    tf_dir = workdir / "tfmgr"
    tf_mgr = tf.train.CheckpointManager(job.checkpoint, str(tf_dir), max_to_keep=2)
    job.step()
    tf_saves = []
    for _ in range(5):
        job.step()
        common.settle()
        start = time.perf_counter()
        tf_mgr.save()
        tf_saves.append(time.perf_counter() - start)
    shutil.rmtree(tf_dir)
    tf_save = statistics.median(tf_saves)

    # Steps per cycle: long enough for a background save to finish inside it.
    plain = [time.perf_counter()]
    for _ in range(3):
        job.step()
        plain.append(time.perf_counter())
    step_time = statistics.median(b - a for a, b in zip(plain, plain[1:], strict=False))
    per_cycle = max(4, math.ceil(CYCLE_SAVES * tf_save / step_time))

    ckdir = workdir / "ckpts"
    mgr = service.CheckpointManager(job.checkpoint, ckdir, every_steps=0, every_seconds=0, keep=2,
                                    handle_signals=False, environ={}, **manager_kw)
    snapshotter: Any = None
    samples = Samples()
    step = 0
    for cycle in range(2 * pairs + WARMUP_CYCLES):
        warmup = cycle < WARMUP_CYCLES
        with_save = cycle % 2 == 0
        mgr.wait()
        common.settle()
        _timed_steps(job, mgr, step, 2)  # the manager's step timer sees real steps
        step += 2
        start = time.perf_counter()
        stall = 0.0
        if with_save:
            mgr.save(step, reason="periodic", wait=False)
            stall = time.perf_counter() - start
            snapshotter = snapshotter or mgr._snapshotter
        before = _addresses(job.variables)
        first_start = time.perf_counter()
        job.step()
        first = time.perf_counter() - first_start
        moved = _addresses(job.variables) != before
        step += 1
        mgr.step_done(step)
        rest, times = _timed_steps(job, mgr, step, per_cycle - 1)
        step += per_cycle - 1
        wait_start = time.perf_counter()
        mgr.wait()
        leftover = time.perf_counter() - wait_start
        total = stall + first + rest + leftover
        if warmup:
            continue
        if with_save:
            samples.saves += 1
            samples.deferred += bool(snapshotter is not None and snapshotter.deferred_bytes)
            extra = max(0.0, first - statistics.median(times)) if moved else 0.0
            samples.cow_steps += moved
            samples.stalls.append(stall + extra)
            samples.lost.append(total)
            samples.leftover.append(leftover)
        else:
            samples.lost[-1] -= total  # the cycle without a save right after the one with
    mgr.close(final=False)
    shutil.rmtree(ckdir, ignore_errors=True)
    rows = []
    if floor:
        rows.append(_row(f"memory copy of the {label} state (floor of a copy on the training thread)",
                         copy_floor(job), "s", "TF CheckpointManager.save()", tf_save, "report"))
    return rows + [
        _row(f"stall per periodic save {label}, {job.name} ({samples.deferred}/{samples.saves} copies "
             f"deferred, {samples.cow_steps} next steps paid copy-on-write)",
             statistics.median(samples.stalls), "s", "TF CheckpointManager.save()", tf_save, "<= 0.05"),
        _row(f"training time lost per periodic save {label}, {job.name} (stall + background "
             f"copy/write sharing the CPU; {per_cycle}-step cycles, step {step_time:.3f} s, "
             f"save still running at cycle end {statistics.median(samples.leftover):.3f} s)",
             statistics.median(samples.lost), "s", "TF CheckpointManager.save()", tf_save, "report"),
    ]


def copy_floor(job: Job) -> float:
    """numpy copy of the state into already mapped buffers: the floor of a copy-based snapshot."""
    import numpy as np

    sources = [np.asarray(v.read_value()) for v in job.variables]
    dests = [np.ones_like(s) for s in sources]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for d, s in zip(dests, sources, strict=True):
            np.copyto(d, s)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for 100 MB (and 1 GB unless quick); see the module docstring."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    sizes = [100] if quick else [100, 1024]
    base = Path(os.environ.get("BENCH_DIR") or tempfile.gettempdir())
    rows: list[dict[str, Any]] = []
    for size in sizes:
        label = f"{size} MB" if size < 1024 else f"{size // 1024} GB"
        for make in (update_only, adam_step):
            workdir = Path(tempfile.mkdtemp(prefix="bench-stall-", dir=base))
            try:
                job = make(size)
                rows.extend(measure_job(job, label, pairs=3 if quick or size > 100 else 5, workdir=workdir,
                                        floor=make is update_only))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
