"""The disk guard with real TensorFlow saves (service.CheckpointManager) on a small tmpfs.

A real TF save runs out of space: no half checkpoint, the worker's error text is
recognised as a space failure, the guard prunes, the next real save succeeds and
restores exactly; the newest valid checkpoint verifies throughout.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from daemon import contract
from daemon.clock import SystemClock
from daemon.components import CheckpointFailure
from daemon.config import DiskConfig
from daemon.diskguard import DiskGuard, is_space_error
from tests.disk_fixtures import mounted, write_foreign

pytestmark = [pytest.mark.tf, pytest.mark.root]

MiB = 1 << 20


@pytest.fixture
def volume() -> object:
    try:
        cm = mounted("tmpfs", 24)
        mnt = cm.__enter__()
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a 24 MiB tmpfs: {exc}")
    try:
        yield mnt
    finally:
        cm.__exit__(None, None, None)


def test_real_tf_save_hits_enospc_guard_prunes_next_save_succeeds(volume: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    import service
    from service.errors import CheckpointError

    ckpt_dir, state = volume / "ckpt", volume / "state"
    weights = tf.Variable(tf.random.normal([1000, 1000]))  # ~4 MB per checkpoint
    step_var = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(w=weights, step=step_var)
    manager = service.CheckpointManager(ckpt, ckpt_dir, keep=100, every_steps=0, every_seconds=0,
                                        async_save=False, handle_signals=False, environ={})
    for step in (1, 2, 3):
        step_var.assign(step)
        manager.save(step, reason="requested")
    newest = ckpt_dir / contract.checkpoint_dirname(3)
    contract.verify(newest)
    # Something else fills the volume: the next save cannot fit.
    free = psutil.disk_usage(str(volume)).free
    write_foreign(volume / "hog", free - 2 * MiB)

    weights.assign(tf.ones([1000, 1000]))
    step_var.assign(4)
    with pytest.raises(CheckpointError) as failed:
        manager.save(4, reason="requested")
    error = str(failed.value)
    assert is_space_error(error), error
    assert [e.step for e in contract.scan(ckpt_dir)] == [1, 2, 3]  # no half checkpoint, no tmp
    contract.verify(newest)

    guard = DiskGuard(ckpt_dir, state, DiskConfig(warn_percent=98, prune_percent=99.9, margin=1.0),
                      SystemClock(), background_checks=False)  # one synchronous check below
    guard.on_checkpoint_failed(CheckpointFailure(4, "requested", error))  # relayed by the supervisor
    guard.evaluate()
    assert [e.step for e in contract.scan(ckpt_dir)] == [3]
    contract.verify(newest)

    manager.save(4, reason="requested")
    manager.close(final=False)
    contract.verify(ckpt_dir / contract.checkpoint_dirname(4))

    weights.assign(tf.zeros([1000, 1000]))
    restored = service.CheckpointManager(ckpt, ckpt_dir, async_save=False, handle_signals=False,
                                         environ={})
    assert restored.restore_or_initialize() == 4
    assert float(tf.reduce_min(weights)) == 1.0 and int(step_var.numpy()) == 4
    restored.close(final=False)
