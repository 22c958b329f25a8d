"""CheckpointManager in-process with real TensorFlow: saves, restore, fallback, signals, reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import service  # noqa: E402
from daemon import contract  # noqa: E402
from service.errors import CheckpointDirError, CheckpointError, CheckpointMismatch  # noqa: E402

pytestmark = pytest.mark.tf


class Job:
    """A tiny Keras model, optimizer, data iterator and RNG: everything exact resume needs."""

    def __init__(self, units: int = 4, seed: int = 0) -> None:
        # `seed` changes the initial values only. The input pipeline is part of the
        # program, as after a restart: its shuffle seed pair includes the global seed
        # at construction time, so that is the same for every Job.
        tf.random.set_seed(1234)
        self.it = iter(tf.data.Dataset.range(8).shuffle(8, seed=0, reshuffle_each_iteration=True).repeat())
        keras.utils.set_random_seed(seed)
        self.model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units)])
        self.opt = keras.optimizers.SGD(0.1)
        self.opt.build(self.model.trainable_variables)
        self.rng = tf.random.Generator.from_seed(seed)
        # Over 1 MB: the snapshot copies it for real instead of sharing its buffer.
        self.big = tf.Variable(tf.zeros((600, 600)) + float(seed))
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.opt, data=self.it, rng=self.rng,
                                        big=self.big)

    def step(self) -> None:
        x = tf.cast(tf.reshape(next(self.it), (1, 1)), tf.float32) * tf.ones((1, 8)) / 1000.0
        x += self.rng.normal((1, 8))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(self.model(x) ** 2)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.opt.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        self.big.assign_add(tf.fill(self.big.shape, x[0, 0]))

    def state(self) -> list[np.ndarray]:
        return [v.numpy().copy() for v in self.model.weights] + [self.rng.state.numpy().copy(),
                                                                  self.big.numpy().copy()]


def _manager(job: Job, directory: Path, **kw) -> service.CheckpointManager:
    kw.setdefault("environ", {})
    kw.setdefault("every_seconds", 0)
    return service.CheckpointManager(job.ckpt, directory, **kw)


def _run(job: Job, mgr: service.CheckpointManager, start: int, stop: int) -> None:
    for step in range(start, stop):
        job.step()
        mgr.step_done(step + 1)


def test_roundtrip_exact_state_with_async_periodic_saves(tmp_path: Path) -> None:
    a = Job()
    mgr = _manager(a, tmp_path, every_steps=5, keep=2)
    assert mgr.restore_or_initialize() == 0
    _run(a, mgr, 0, 23)
    mgr.wait()
    # Resume from the newest periodic checkpoint and replay to the same step.
    newest = contract.newest_valid(tmp_path)
    assert newest is not None and newest[1].reason == "periodic"
    b = Job(seed=1)  # different init: everything must come from the checkpoint
    mgr_b = _manager(b, tmp_path, every_steps=0, async_save=False)
    resumed = mgr_b.restore_or_initialize()
    assert resumed == newest[0].step and 0 < resumed <= 23
    _run(b, mgr_b, resumed, 23)
    for x, y in zip(a.state(), b.state(), strict=True):
        np.testing.assert_array_equal(x, y)
    # Saving must not change the run itself: same as a run that never saved.
    c = Job()
    for _ in range(23):
        c.step()
    for x, y in zip(a.state(), c.state(), strict=True):
        np.testing.assert_array_equal(x, y)
    mgr.close()
    mgr_b.close(final=False)
    steps = [e.step for e in contract.committed(tmp_path)]
    assert len(steps) == 2 and steps[-1] == 23  # keep=2 and the final save
    assert contract.verify(tmp_path / contract.checkpoint_dirname(23)).reason == "final"


def _big_checkpoint() -> tuple[tf.Variable, tf.train.Checkpoint]:
    big = tf.Variable(tf.reshape(tf.range(600 * 600, dtype=tf.float32), (600, 600)))  # 1.4 MB: copied
    return big, tf.train.Checkpoint(big=big, small=tf.Variable(1.0))


def _address(var: tf.Variable) -> int:
    return int(np.asarray(var.read_value()).ctypes.data)


def test_deferred_copy_stays_exact_when_training_updates_first(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event

    from service.snapshot import Snapshotter

    big, ckpt = _big_checkpoint()
    before = big.numpy().copy()
    copier = ThreadPoolExecutor(max_workers=1)
    gate = Event()
    copier.submit(gate.wait)  # the deferred copy queues behind this
    snap = Snapshotter(ckpt, copier=copier)
    snap.take(defer=True)
    assert snap.deferred_bytes == big.numpy().nbytes
    pinned_at = _address(big)
    big.assign_add(tf.ones_like(big))  # training's next update, before the copy ran
    assert _address(big) != pinned_at  # TF copied the variable away from the pinned buffer
    gate.set()
    snap.write(str(tmp_path / "ckpt"))
    assert snap.take_collisions() == 1 and snap.take_collisions() == 0
    restored, check = _big_checkpoint()
    check.read(str(tmp_path / "ckpt")).assert_consumed()
    np.testing.assert_array_equal(restored.numpy(), before)  # the value at take(), not after
    np.testing.assert_array_equal(big.numpy(), before + 1)  # and training's update is intact
    snap.close()
    copier.shutdown()


def test_deferred_copy_unpins_the_variables_when_done(tmp_path: Path) -> None:
    from service.snapshot import Snapshotter

    big, ckpt = _big_checkpoint()
    snap = Snapshotter(ckpt)
    snap.take()  # on the training thread
    assert snap.deferred_bytes == 0 and snap.copy_seconds is not None
    big.assign_add(tf.ones_like(big))
    snap.take(defer=True)
    value = big.numpy().copy()
    snap.write(str(tmp_path / "ckpt"))  # waits for the copy
    address = _address(big)
    big.assign_add(tf.ones_like(big))
    assert _address(big) == address  # updated in place: nothing pins it any more
    assert snap.take_collisions() == 0 and snap.deferred_copy_seconds is not None
    restored, check = _big_checkpoint()
    check.read(str(tmp_path / "ckpt")).assert_consumed()
    np.testing.assert_array_equal(restored.numpy(), value)
    snap.close()


def test_manager_defers_the_copy_on_long_steps_and_every_checkpoint_is_exact(tmp_path: Path) -> None:
    from daemon.clock import FakeClock

    clock = FakeClock()
    job = Job()
    mgr = _manager(job, tmp_path, every_steps=3, keep=10, clock=clock, handle_signals=False)
    mgr.restore_or_initialize()
    states = {}
    deferred = []
    for step in range(1, 13):
        job.step()  # starts right after step_done: a deferred copy races it
        if step % 3 == 1:
            mgr.wait()  # the save before this step is committed: the next one is due on time
        clock.advance(5.0)  # steps look long next to any copy: the copy is deferred
        mgr.step_done(step)
        states[step] = job.state()
        if step % 3 == 0:
            deferred.append(mgr._snapshotter.deferred_bytes > 0)  # type: ignore[union-attr]
    mgr.close(final=False)
    assert deferred == [False, True, True, True]  # the first copy is timed on the training thread
    for step in (3, 6, 9, 12):
        other = Job(seed=1)
        path = tmp_path / contract.checkpoint_dirname(step)
        resumed = _manager(other, tmp_path, environ={contract.ENV_RESUME: str(path)}, handle_signals=False)
        assert resumed.restore_or_initialize() == step
        resumed.close(final=False)
        for x, y in zip(states[step], other.state(), strict=True):
            np.testing.assert_array_equal(x, y)


def _damage(path: Path, how: str) -> None:
    data = path / "ckpt.data-00000-of-00001"
    if how == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif how == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif how == "no-manifest":
        (path / contract.MANIFEST_NAME).unlink()
    elif how == "lying-manifest":
        mpath = path / contract.MANIFEST_NAME
        m = json.loads(mpath.read_text())
        m["files"]["ckpt.index"]["size"] += 1
        mpath.write_text(json.dumps(m))
    elif how == "truncated-manifest":
        mpath = path / contract.MANIFEST_NAME
        mpath.write_bytes(mpath.read_bytes()[:40])


@pytest.mark.parametrize("how", ["truncate", "flip", "no-manifest", "lying-manifest", "truncated-manifest"])
def test_damaged_newest_falls_back(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    job = Job()
    mgr = _manager(job, tmp_path, async_save=False, handle_signals=False)
    mgr.restore_or_initialize()
    _run(job, mgr, 0, 3)
    mgr.save(3)
    expected = job.state()
    _run(job, mgr, 3, 6)
    mgr.close()  # final save of step 6
    _damage(tmp_path / contract.checkpoint_dirname(6), how)
    fresh = Job(seed=7)
    mgr2 = _manager(fresh, tmp_path, handle_signals=False)
    assert mgr2.restore_or_initialize() == 3
    for x, y in zip(expected, fresh.state(), strict=True):
        np.testing.assert_array_equal(x, y)
    out = capsys.readouterr().out
    assert "checkpoint.skipped" in out and contract.checkpoint_dirname(6) in out
    mgr2.close(final=False)


def test_resume_env_preferred_and_ignored_when_invalid(tmp_path: Path) -> None:
    job = Job()
    mgr = _manager(job, tmp_path, async_save=False, handle_signals=False, keep=5)
    mgr.restore_or_initialize()
    for stop in (2, 4, 6):
        _run(job, mgr, stop - 2, stop)
        mgr.save(stop)
    mgr.close(final=False)
    hint = str(tmp_path / contract.checkpoint_dirname(4))
    m = _manager(Job(), tmp_path, handle_signals=False, environ={contract.ENV_RESUME: hint})
    assert m.restore_or_initialize() == 4
    m.close(final=False)
    _damage(Path(hint), "flip")
    m = _manager(Job(), tmp_path, handle_signals=False, environ={contract.ENV_RESUME: hint})
    assert m.restore_or_initialize() == 6
    m.close(final=False)


def test_different_shape_is_a_clear_error(tmp_path: Path) -> None:
    job = Job(units=4)
    mgr = _manager(job, tmp_path, async_save=False, handle_signals=False)
    mgr.restore_or_initialize()
    _run(job, mgr, 0, 2)
    mgr.close()
    other = Job(units=5)
    m = _manager(other, tmp_path, handle_signals=False)
    with pytest.raises(CheckpointMismatch, match=r"shape \(8, 4\).*shape \(8, 5\)") as info:
        m.restore_or_initialize()
    assert contract.checkpoint_dirname(2) in str(info.value)
    m.close(final=False)
    assert contract.newest_valid(tmp_path) is not None  # nothing damaged


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointDirError, match="not a directory"):
        _manager(Job(), blocker / "ckpts")


def test_signals_requested_and_preemption_with_reports(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "d.sock")
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(sock_path)
    daemon.settimeout(5)
    job = Job()
    mgr = _manager(job, tmp_path / "c", environ={contract.ENV_SOCKET: sock_path}, heartbeat_interval=0)
    mgr.restore_or_initialize()
    _run(job, mgr, 0, 2)
    os.kill(os.getpid(), signal.SIGUSR1)
    _run(job, mgr, 2, 3)  # the request is taken at this boundary (async)
    mgr.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    job.step()
    with pytest.raises(SystemExit) as exit_info:
        mgr.step_done(4)
    assert exit_info.value.code == 0
    msgs = []
    daemon.setblocking(False)
    while True:
        try:
            msgs.append(contract.decode_message(daemon.recv(4096)))
        except BlockingIOError:
            break
    daemon.close()
    assert msgs[0]["type"] == "hello" and "SIGUSR1" in msgs[0]["handles"]
    reports = [(m["step"], m["reason"]) for m in msgs if m["type"] == "checkpoint"]
    assert reports == [(3, "requested"), (4, "preemption")]
    assert any(m["type"] == "progress" for m in msgs)
    assert contract.verify(tmp_path / "c" / contract.checkpoint_dirname(4)).reason == "preemption"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_control_file_skips_periodic_only(tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    contract.write_json_atomic(control, {"skip_periodic": True, "reason": "disk 95% full"})
    job = Job()
    mgr = _manager(job, tmp_path / "c", every_steps=2, handle_signals=False,
                   environ={contract.ENV_CONTROL: str(control)})
    mgr.restore_or_initialize()
    _run(job, mgr, 0, 6)
    mgr.wait()
    assert contract.committed(tmp_path / "c") == []
    mgr.request_checkpoint()
    _run(job, mgr, 6, 7)
    mgr.wait()
    assert [e.step for e in contract.committed(tmp_path / "c")] == [7]


def test_background_failure_raises_at_next_step(tmp_path: Path) -> None:
    job = Job()
    mgr = _manager(job, tmp_path, every_steps=2, handle_signals=False)
    mgr.restore_or_initialize()
    _run(job, mgr, 0, 2)
    mgr.wait()

    def broken_write(prefix: str) -> str:
        raise OSError(28, "No space left on device")

    mgr._snapshot().write = broken_write  # type: ignore[union-attr, method-assign]
    _run(job, mgr, 2, 4)  # periodic save of step 4 starts and fails in the background
    deadline = time.monotonic() + 10
    while mgr._inflight is not None and not mgr._inflight.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    job.step()
    with pytest.raises(CheckpointError, match="periodic checkpoint of step 4.*No space left"):
        mgr.step_done(5)
    assert [e.step for e in contract.scan(tmp_path)] == [2]  # no temp folder, old one intact
    mgr.close(final=False)


def test_background_writes_run_below_training_priority(tmp_path: Path) -> None:
    import threading

    job = Job()
    mgr = _manager(job, tmp_path, every_steps=2, handle_signals=False, background_nice=7)
    mgr.restore_or_initialize()
    seen: dict[str, int] = {}
    snapshotter = mgr._snapshot()
    assert snapshotter is not None
    real_write = snapshotter.write

    def recording_write(prefix: str) -> str:
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real_write(prefix)

    snapshotter.write = recording_write  # type: ignore[method-assign]
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    _run(job, mgr, 0, 2)
    mgr.wait()
    assert seen["writer"] == min(19, training + 7)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == training
    assert [e.step for e in contract.committed(tmp_path)] == [2]
    mgr.close(final=False)


def test_savedmodel_export_is_atomic_and_serves(tmp_path: Path) -> None:
    job = Job()
    exporter = service.SavedModelExporter(job.model, tmp_path / "savedmodel", every_steps=2, keep=2,
                                          environ={})
    paths = [exporter.step_done(s) for s in range(1, 7)]
    assert [p.name for p in paths if p] == ["2", "4", "6"]
    assert sorted(p.name for p in (tmp_path / "savedmodel").iterdir()) == ["4", "6"]
    from service.savedmodel import newest_valid_export, verify_export

    assert verify_export(tmp_path / "savedmodel" / "6").step == 6
    loaded = tf.saved_model.load(str(newest_valid_export(tmp_path / "savedmodel")))
    assert "serving_default" in loaded.signatures
    out = loaded.serve(tf.ones((2, 8)))
    np.testing.assert_allclose(out.numpy(), job.model(tf.ones((2, 8))).numpy(), rtol=1e-6)
    exporter.close()
