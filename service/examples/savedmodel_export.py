"""Pattern 3: periodic SavedModel export with a serving signature, next to checkpoints.

    python -m service.examples.savedmodel_export --steps 300 --dir /tmp/ckpt-sm --export-every 100

Trains the digits MLP in a custom loop with a CheckpointManager and exports a
SavedModel every `--export-every` steps to `<dir>/savedmodel/<step>/` (the newest
`--export-keep` kept), then loads the newest export and classifies a few digits
through its `serve` endpoint to show it serves.
"""

from __future__ import annotations

import sys

import structlog

from service.examples._common import common_args, digits, env_int, mlp, setup_determinism, setup_logging

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    parser = common_args(__doc__.splitlines()[0], default_steps=300)
    parser.add_argument("--export-every", type=int, default=env_int("EXAMPLE_EXPORT_EVERY", 100))
    parser.add_argument("--export-keep", type=int, default=2)
    args = parser.parse_args(argv)
    setup_logging()
    setup_determinism(args.seed)

    from pathlib import Path

    import keras
    import numpy as np
    import tensorflow as tf

    import service
    from service.savedmodel import newest_valid_export

    x, y = digits()
    iterator = iter(
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed).repeat().batch(32)
    )
    model = mlp()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step() -> tf.Tensor:
        xb, yb = next(iterator)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, data=iterator)
    manager = service.CheckpointManager(ckpt, args.dir, every_steps=args.every_steps)
    exporter = service.SavedModelExporter(
        model, Path(args.dir) / "savedmodel", every_steps=args.export_every, keep=args.export_keep
    )
    start = manager.restore_or_initialize()
    for step in range(start, args.steps):
        loss = train_step()
        if (step + 1) % args.log_every == 0:
            log.info("train.step", step=step + 1, loss=round(float(loss), 4))
        manager.step_done(step + 1)
        exporter.step_done(step + 1)
    manager.close()
    exporter.close()

    newest = newest_valid_export(exporter.directory)
    if newest is None:
        log.warning("export.none", dir=str(exporter.directory))
        return 0
    served = tf.saved_model.load(str(newest))
    logits = served.serve(tf.constant(x[:8]))
    predicted = np.argmax(logits.numpy(), axis=1)
    log.info("export.served", path=str(newest), signatures=sorted(served.signatures.keys()),
             predicted=predicted.tolist(), expected=y[:8].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
