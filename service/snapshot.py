"""Point-in-time copy of a tf.train.Checkpoint's state, written later off the training thread.

Why not `tf.train.CheckpointOptions(enable_async=True)` directly: TF 2.21's
AsyncCheckpointHelper re-runs `_copy_trackable_to_cpu` inside a tf.function, and a
Keras 3 variable's implementation creates a new tf.Variable there, so the second
async save of any Keras 3 model fails ("tf.function only supports singleton
tf.Variables"). We use the same TF protocol the helper uses (each trackable's
`_copy_trackable_to_cpu` into an object map, handed to the saver of a second
Checkpoint over the same objects), run eagerly, with Keras variables mapped onto
the copy of the tf.Variable they wrap. TF's own serialisation still writes the files.

On CPU the copy is copy-on-write (a variable read shares the buffer until the next
update), so the training thread pays a few milliseconds plus, at its next update,
one memory copy of the state; on a GPU it is the device-to-host copy.
"""

from __future__ import annotations

import os
from typing import Any

import structlog
import tensorflow as tf
from tensorflow.python.checkpoint import saveable_compat, trackable_view
from tensorflow.python.data.ops import iterator_ops
from tensorflow.python.eager import context
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.util import object_identity

log = structlog.get_logger()


# Variables at least this big get a real copy (see Snapshotter._copy_variable).
_BIG = int(os.environ.get("PREEMPTD_SNAPSHOT_COPY_BYTES", 1 << 20))


class SnapshotUnsupported(Exception):
    """Some object in the checkpoint cannot be copied; saves must be synchronous."""


def _is_saveable(obj: Any) -> bool:
    for cls in type(obj).mro():
        if cls is trackable_base.Trackable:
            continue
        if "_serialize_to_tensors" in cls.__dict__ or "_gather_saveables_for_checkpoint" in cls.__dict__:
            return True
    return False


def _keras_variable_type() -> type | None:
    try:
        import keras
    except ImportError:
        return None
    return getattr(keras, "Variable", None)


class _FrozenIterator(trackable_base.Trackable):
    """Holds an iterator's serialised state as of the last snapshot.

    TF's own `OwnedIterator._copy_trackable_to_cpu` builds a second iterator over
    the same dataset, and that advances the dataset's shared shuffle seed
    generator: the first save would change the order of every later epoch, so a
    run that saved at other steps (a resumed one) would not train on the same
    data. Serialising the state (a value, not a view) touches nothing.
    """

    def __init__(self) -> None:
        self.tensors: Any = None

    def _serialize_to_tensors(self) -> Any:
        return self.tensors


class Snapshotter:
    """Copies the state of `checkpoint` on the training thread; writes the copy anywhere later."""

    def __init__(self, checkpoint: tf.train.Checkpoint) -> None:
        kwargs = getattr(checkpoint, "_kwargs", None)
        if kwargs is None:
            raise SnapshotUnsupported("not a tf.train.Checkpoint (no constructor arguments to mirror)")
        # A second Checkpoint over the same objects: its object graph (and so the
        # file) is the one the user's Checkpoint writes, but its saver reads copies.
        self._writer = tf.train.Checkpoint(**kwargs)
        self._map: Any = object_identity.ObjectIdentityDictionary()
        self._items: list[Any] | None = None
        self._keras_variable: Any = _keras_variable_type()

    def _collect(self) -> list[Any]:
        items = [
            t for t in trackable_view.TrackableView(self._writer).descendants()
            if t is not self._writer and _is_saveable(t)
        ]
        # Slot variables (TF optimizers) are not children in the object graph.
        extra = []
        variables = [t for t in items if isinstance(t, tf.Variable)]
        for t in items:
            if "get_slot_names" in dir(t):
                for slot_name in t.get_slot_names():
                    for var in variables:
                        try:
                            slot = t.get_slot(var, slot_name)
                        except (AttributeError, KeyError):
                            continue
                        if isinstance(slot, trackable_base.Trackable):
                            extra.append(slot)
        return items + extra

    def _copy(self, obj: Any) -> None:  # obj: a TF trackable (untyped upstream)
        if isinstance(obj, iterator_ops.OwnedIterator):
            frozen = self._map.get(obj)
            if frozen is None:
                frozen = self._map[obj] = _FrozenIterator()
                # Same checkpoint key as the iterator itself writes ("ITERATOR_STATE"),
                # or a restore into a real iterator would not find it.
                legacy = saveable_compat.get_saveable_name(obj)
                if legacy is not None:
                    saveable_compat.legacy_saveable_name(legacy)(frozen)
            frozen.tensors = obj._serialize_to_tensors()
        elif self._keras_variable is not None and isinstance(obj, self._keras_variable):
            inner = obj.value
            self._copy_variable(inner)
            self._map[obj] = self._map[inner]
        elif isinstance(obj, resource_variable_ops.ResourceVariable):
            self._copy_variable(obj)
        else:
            obj._copy_trackable_to_cpu(object_map=self._map)

    def _copy_variable(self, var: Any) -> None:
        """Copy a variable's value into its host copy.

        TF's `_copy_trackable_to_cpu` assigns the value, which on CPU shares the
        buffer: the next optimizer update then copies the whole variable into a
        freshly mapped buffer (page faults included), about 4x the cost of a copy.
        A strided-slice assignment of the whole variable writes into the copy's own,
        already mapped buffer instead, and leaves the variable's buffer unshared.
        """
        dest = self._map.get(var)
        big = var.shape.rank and var.dtype.is_numeric and var.shape.num_elements() * var.dtype.size >= _BIG
        if not big:
            var._copy_trackable_to_cpu(object_map=self._map)
            return
        if dest is None:
            with tf.device("CPU:0"):
                dest = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False)
            self._map[var] = dest
        rank = var.shape.rank
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=dest.handle, begin=[0] * rank, end=var.shape.as_list(), strides=[1] * rank,
            value=var.read_value(),
        )

    def take(self) -> None:
        """Copy the current state (training thread; blocks only for the copy)."""
        first = self._items is None
        if self._items is None:
            self._items = self._collect()
        try:
            for obj in self._items:
                self._copy(obj)
        except NotImplementedError as exc:
            raise SnapshotUnsupported(f"{type(exc).__name__}: {exc}") from None
        if first:
            self._writer._saver._object_map = self._map
        context.async_wait()  # the copy has finished before training mutates state

    def write(self, file_prefix: str) -> str:
        """Write the last snapshot with TF's serialisation (any thread)."""
        return str(self._writer.write(file_prefix))
