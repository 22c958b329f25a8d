"""Shared bits of the examples: a small real dataset with no download, determinism, args."""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

import numpy as np


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def common_args(description: str, default_steps: int) -> argparse.ArgumentParser:
    """Arguments every example takes; each has an EXAMPLE_* env fallback for the supervisor."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=env_int("EXAMPLE_STEPS", default_steps),
                   help="total training steps (env EXAMPLE_STEPS)")
    p.add_argument("--dir", default=os.environ.get("PREEMPTD_CHECKPOINT_DIR") or "checkpoints",
                   help="checkpoint dir (default: $PREEMPTD_CHECKPOINT_DIR, else ./checkpoints)")
    p.add_argument("--every-steps", type=int, default=None,
                   help="periodic checkpoint every N steps (default: $PREEMPTD_EVERY_STEPS)")
    p.add_argument("--log-every", type=int, default=env_int("EXAMPLE_LOG_EVERY", 50),
                   help="one progress line every N steps (env EXAMPLE_LOG_EVERY)")
    p.add_argument("--step-delay", type=float, default=env_float("EXAMPLE_STEP_DELAY", 0.0),
                   help="sleep this long after each step, to watch it under the supervisor "
                        "(env EXAMPLE_STEP_DELAY)")
    p.add_argument("--seed", type=int, default=env_int("EXAMPLE_SEED", 42))
    return p


def setup_logging() -> None:
    """Log like the supervising daemon: JSON lines under systemd, console on a terminal."""
    from daemon import contract
    from daemon import logging as dlogging

    fmt = os.environ.get(contract.ENV_LOG_FORMAT, "auto")
    dlogging.configure(fmt=fmt if fmt in dlogging.FORMATS else "auto", origin="worker")


def setup_determinism(seed: int) -> None:
    """Same seed, same ops order, same bits: needed for an exact resume to be checkable."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    # One thread each: reductions then run in a fixed order on CPU.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)


def mlp() -> Any:
    """The small digits classifier every example trains (64 -> 64 relu -> 10 logits)."""
    import keras

    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download); pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype("float32"), data.target.astype("int64")


def weights_digest(variables: Any) -> str:
    """sha256 over the bytes of every weight, in order: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for v in variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()
