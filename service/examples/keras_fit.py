"""Pattern 2: Keras model.fit with service.keras.PreemptibleCheckpoint.

    python -m service.examples.keras_fit --steps 300 --dir /tmp/ckpt-keras --every-steps 50

Trains a small MLP on scikit-learn's digits for `--steps` batches in total (whole
epochs of 50 batches, then part of one). The dataset is wrapped with
`callback.resumable(...)` and shuffled with the epoch as seed, so a run stopped
mid-epoch resumes at the same batch of the same epoch, with the same weights.
"""

from __future__ import annotations

import sys

import structlog

from service.examples._common import (
    common_args,
    digits,
    mlp,
    setup_determinism,
    setup_logging,
    weights_digest,
)

log = structlog.get_logger()

BATCH = 32


def main(argv: list[str] | None = None) -> int:
    args = common_args(__doc__.splitlines()[0], default_steps=300).parse_args(argv)
    setup_logging()
    setup_determinism(args.seed)

    import keras
    import tensorflow as tf

    import service

    x, y = digits()
    batches_per_epoch = len(x) // BATCH
    epochs = -(-args.steps // batches_per_epoch)

    def epoch_data(epoch: tf.Tensor) -> tf.data.Dataset:
        # The order of each epoch depends on the epoch only, not on how often we restarted.
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=args.seed + epoch, reshuffle_each_iteration=False)
            .batch(BATCH, drop_remainder=True)
        )

    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    class StopAt(keras.callbacks.Callback):
        """Ends training after exactly --steps batches (the last epoch may be partial)."""

        def __init__(self) -> None:
            super().__init__()
            self.done = 0

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.done = ckpt_cb.manager.step if ckpt_cb.manager else 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.done += 1
            if self.done % args.log_every == 0:
                log.info("train.step", step=self.done, loss=round(float((logs or {}).get("loss", 0.0)), 4))
            if self.done >= args.steps:
                self.model.stop_training = True

    ckpt_cb = service.keras.PreemptibleCheckpoint(args.dir, every_batches=args.every_steps)
    stop_at = StopAt()
    model.fit(ckpt_cb.resumable(epoch_data, epochs=epochs), epochs=epochs,
              steps_per_epoch=ckpt_cb.steps_per_epoch, verbose=0, callbacks=[ckpt_cb, stop_at])
    log.info("train.finished", step=stop_at.done, weights_sha256=weights_digest(model.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
