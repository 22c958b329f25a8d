"""Pattern 2: Keras `model.fit` with a preemption-aware checkpoint callback.

    cb = service.keras.PreemptibleCheckpoint(every_batches=100)
    model.fit(cb.resumable(lambda epoch: make_dataset(seed=epoch)), epochs=5, callbacks=[cb])

The callback restores the model and optimizer at the start of `fit`, resumes at
the saved epoch, saves by batches and/or seconds through a CheckpointManager
(so SIGUSR1 / SIGTERM and the daemon's policy apply), and saves a final checkpoint
at the end. Mid-epoch resume: the dataset wrapped with `cb.resumable(...)` skips
the batches of the interrupted epoch that were already trained; pass a function
of the epoch (e.g. a shuffle seeded with it) so every epoch's order is the same
after a restart. A plain dataset still resumes at the right epoch, but re-trains
the batches of the interrupted epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import keras
import structlog
import tensorflow as tf

from service.manager import CheckpointManager

log = structlog.get_logger()

DatasetFn = Callable[[tf.Tensor], tf.data.Dataset]


class PreemptibleCheckpoint(keras.callbacks.Callback):
    """Durable checkpoints of `model` and its optimizer during `fit`, with exact resume."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        every_batches: int | None = None,
        every_seconds: float | None = None,
        keep: int | None = None,
        keep_every_hours: float | None = None,
        checksums: bool = True,
        **trackables: Any,
    ) -> None:
        """`directory` and policy default to the daemon's PREEMPTD_* env like CheckpointManager.

        `trackables`: more objects to checkpoint with the model (e.g. rng=tf.random.Generator).
        """
        super().__init__()
        self._directory = directory
        self._policy: dict[str, Any] = {
            "every_steps": every_batches,
            "every_seconds": every_seconds,
            "keep": keep,
            "keep_every_hours": keep_every_hours,
        }
        self._checksums = checksums
        self._trackables = trackables
        self.manager: CheckpointManager | None = None
        # Read by the dataset of `resumable()` each time Keras starts an epoch's iterator.
        self._epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="preemptd_epoch")
        self._skip_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="preemptd_skip")
        self._batches_per_epoch: int | None = None
        self._wrapped = False
        self._epoch = 0
        self._skipped = 0  # batches of the current epoch trained before the restart
        self._seen = 0  # batches of the current epoch seen in this process
        self._step = 0  # batches trained in total

    # -------------------------------------------------------------- dataset

    def resumable(self, data: tf.data.Dataset | DatasetFn) -> tf.data.Dataset:
        """A dataset that resumes mid-epoch: skips the batches already trained in that epoch.

        `data` is a batched dataset, or a function of the epoch (an int64 scalar
        tensor) returning one, for an epoch order that does not depend on restarts.
        """
        make: DatasetFn = data if callable(data) else (lambda epoch: data)
        probe = make(tf.constant(0, tf.int64))
        cardinality = int(probe.cardinality().numpy())
        self._batches_per_epoch = cardinality if cardinality >= 0 else None
        self._wrapped = True
        epoch_var, skip_var = self._epoch_var, self._skip_var
        # flat_map's function runs once per iterator, i.e. at the start of every epoch.
        return tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(
            lambda _: make(epoch_var.read_value()).skip(skip_var.read_value())
        )

    # ------------------------------------------------------------- callbacks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **self._trackables)
        self.manager = CheckpointManager(ckpt, self._directory, checksums=self._checksums, **self._policy)
        self._step = self.manager.restore_or_initialize()
        extra = self.manager.restored_extra
        self._epoch = int(extra.get("epoch", 0))
        self._skipped = int(extra.get("batch", 0)) if self._wrapped else 0
        if self._step:
            # Keras reads this after on_train_begin (as its BackupAndRestore does).
            model._initial_epoch = self._epoch
            log.info("keras.resumed", epoch=self._epoch, batch=int(extra.get("batch", 0)), step=self._step,
                     skipping_batches=self._skipped)
            if extra.get("batch") and not self._wrapped:
                log.warning(
                    "keras.resume_epoch_start",
                    epoch=self._epoch,
                    why="dataset not wrapped with resumable(); the epoch restarts from its first batch",
                )
        self._skip_var.assign(self._skipped)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch != self._epoch:
            self._skipped = 0
            self._skip_var.assign(0)
        self._epoch = epoch
        self._seen = 0
        self._epoch_var.assign(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.manager is None:
            return
        seen = batch + 1  # Keras numbers batches from 0 within the epoch (end step with steps_per_execution)
        self._step += seen - self._seen
        self._seen = seen
        done_in_epoch = self._skipped + seen
        steps = self._batches_per_epoch or (self.params or {}).get("steps")
        if steps and done_in_epoch >= steps:
            position = {"epoch": self._epoch + 1, "batch": 0}
        else:
            position = {"epoch": self._epoch, "batch": done_in_epoch}
        self.manager.step_done(self._step, extra=position)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done_in_epoch = self._skipped + self._seen
        steps = self._batches_per_epoch or (self.params or {}).get("steps")
        # An epoch cut short by stop_training is not complete: resume inside it.
        complete = done_in_epoch >= steps if steps else not self.model.stop_training
        self._skipped = 0
        self._skip_var.assign(0)
        if self.manager is not None and complete:
            # The next checkpoint resumes at the start of the next epoch.
            self.manager.step_done(self._step, extra={"epoch": epoch + 1, "batch": 0})

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None
