"""Pattern 2: Keras `model.fit` with a preemption-aware checkpoint callback.

    cb = service.keras.PreemptibleCheckpoint(every_batches=100)
    data = cb.resumable(lambda epoch: make_dataset(shuffle_seed=epoch), epochs=5)
    model.fit(data, epochs=5, steps_per_epoch=cb.steps_per_epoch, callbacks=[cb])

The callback restores the model and optimizer at the start of `fit`, resumes at
the saved epoch, saves by batches and/or seconds through a CheckpointManager
(so SIGUSR1 / SIGTERM and the daemon's policy apply), and saves a final checkpoint
at the end. Mid-epoch resume: `cb.resumable(...)` turns the epochs into one stream
that a resumed run enters at the exact batch it stopped after; pass a function of
the epoch (e.g. a shuffle seeded with it) so every epoch's order is the same after
a restart. A plain dataset still resumes at the right epoch, but re-trains the
batches of the interrupted epoch.
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
        # Read by the dataset of `resumable()` when Keras starts iterating.
        self._skip_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="preemptd_skip")
        self._batches_per_epoch: int | None = None
        self._total = 0
        self._wrapped = False
        self._epoch = 0
        self._seen = 0  # batches of the current Keras epoch seen in this process
        self._step = 0  # batches trained in total

    # -------------------------------------------------------------- dataset

    def resumable(self, data: tf.data.Dataset | DatasetFn, epochs: int) -> tf.data.Dataset:
        """All `epochs` of `data` as one stream that a resumed `fit` picks up at the saved batch.

        `data` is a batched dataset of known length, or a function of the epoch (an
        int64 scalar tensor) returning one (e.g. shuffled with the epoch as seed), so
        every epoch's order is the same after a restart. Use it with
        `fit(..., epochs=epochs, steps_per_epoch=callback.steps_per_epoch)`. The
        stream is positioned when Keras creates its iterator (after the restore in
        on_train_begin); training stops after exactly `epochs` epochs of batches.
        After a mid-epoch resume, Keras' epoch boundaries are shifted by the batches
        already done (only epoch-level callbacks see that; the batches are the same).
        """
        make: DatasetFn = data if callable(data) else (lambda epoch: data)
        per_epoch = int(make(tf.constant(0, tf.int64)).cardinality().numpy())
        if per_epoch < 0:
            raise ValueError(
                "resumable() needs a finite dataset whose number of batches is known "
                f"(cardinality {per_epoch}); use drop_remainder batching or assert_cardinality"
            )
        self._batches_per_epoch = per_epoch
        self._total = per_epoch * epochs
        self._wrapped = True
        position = self._skip_var  # batches already trained, read when Keras starts iterating

        def stream(_: tf.Tensor) -> tf.data.Dataset:
            done = position.read_value()
            first = done // per_epoch
            return tf.data.Dataset.range(first, epochs).flat_map(
                lambda epoch: make(epoch).skip(tf.where(epoch == first, done % per_epoch, 0))
            )

        return tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(stream)

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch of the dataset given to resumable() (None before)."""
        return self._batches_per_epoch

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
        if self._wrapped and self._batches_per_epoch:
            self._epoch = self._step // self._batches_per_epoch
        else:
            self._epoch = int(extra.get("epoch", 0))
        self._skip_var.assign(self._step if self._wrapped else 0)
        if self._step:
            # Keras reads this after on_train_begin (as its BackupAndRestore does).
            model._initial_epoch = self._epoch
            log.info("keras.resumed", epoch=self._epoch, step=self._step,
                     batch=int(extra.get("batch", 0)))
            if extra.get("batch") and not self._wrapped:
                log.warning(
                    "keras.resume_epoch_start",
                    epoch=self._epoch,
                    why="dataset not wrapped with resumable(); the epoch restarts from its first batch",
                )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._seen = 0

    def _position(self) -> dict[str, int]:
        if self._wrapped and self._batches_per_epoch:
            epoch, batch = divmod(self._step, self._batches_per_epoch)
            return {"epoch": epoch, "batch": batch}
        return {"epoch": self._epoch, "batch": self._seen}

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.manager is None:
            return
        seen = batch + 1  # Keras numbers batches from 0 within the epoch (end step with steps_per_execution)
        self._step += seen - self._seen
        self._seen = seen
        if self._wrapped and self._total and self._step >= self._total:
            self.model.stop_training = True
        self.manager.step_done(self._step, extra=self._position())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.manager is None or self._wrapped:
            return
        steps = (self.params or {}).get("steps")
        # An epoch cut short by stop_training is not complete: resume at its start.
        complete = self._seen >= steps if steps else not self.model.stop_training
        if complete:
            # The next checkpoint resumes at the start of the next epoch.
            self.manager.step_done(self._step, extra={"epoch": epoch + 1, "batch": 0})

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None
