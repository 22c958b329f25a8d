"""Pattern 1: a custom training loop with service.CheckpointManager.

    python -m service.examples.custom_loop --steps 600 --dir /tmp/ckpt --every-steps 100
    preemptd run -- python -m service.examples.custom_loop

Trains a small MLP on scikit-learn's digits. The checkpoint holds the model, the
optimizer, the tf.data iterator (shuffled, repeated) and the tf.random.Generator
used for input noise, so a run killed at any step and resumed ends with the same
weights, bit for bit, as an uninterrupted one. The last line names a digest of
the final weights. Honours PREEMPTD_* (dir, policy, socket, signals).
"""

from __future__ import annotations

import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    args = common_args(__doc__.splitlines()[0], default_steps=600).parse_args(argv)
    setup_logging()
    setup_determinism(args.seed)

    import keras
    import tensorflow as tf

    import service

    x, y = digits()
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=args.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(32, drop_remainder=True)
    )
    iterator = iter(data)
    model = mlp()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    noise = tf.random.Generator.from_seed(args.seed)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step() -> tf.Tensor:
        xb, yb = next(iterator)
        xb = xb + noise.normal(tf.shape(xb), stddev=0.05)  # RNG state is part of the run
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, data=iterator, rng=noise)
    manager = service.CheckpointManager(ckpt, args.dir, every_steps=args.every_steps)
    start = manager.restore_or_initialize()
    log.info("train.started", start_step=start, total_steps=args.steps, dir=str(manager.directory))
    t0 = time.monotonic()
    for step in range(start, args.steps):
        loss = train_step()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = max(time.monotonic() - t0, 1e-9)
            log.info("train.step", step=done, loss=round(float(loss), 4),
                     steps_per_second=round((done - start) / elapsed, 1))
        if args.step_delay:
            time.sleep(args.step_delay)
        manager.step_done(done)
    manager.close()
    log.info("train.finished", step=args.steps, weights_sha256=weights_digest(model.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
