"""Point-in-time copy of a tf.train.Checkpoint's state, written later off the training thread.

Why not `tf.train.CheckpointOptions(enable_async=True)` directly: TF 2.21's
AsyncCheckpointHelper re-runs `_copy_trackable_to_cpu` inside a tf.function, and a
Keras 3 variable's implementation creates a new tf.Variable there, so the second
async save of any Keras 3 model fails ("tf.function only supports singleton
tf.Variables"). We use the same TF protocol the helper uses (each trackable's
`_copy_trackable_to_cpu` into an object map, handed to the saver of a second
Checkpoint over the same objects), run eagerly, with Keras variables mapped onto
the copy of the tf.Variable they wrap. TF's own serialisation still writes the files.

Numeric CPU variables are copied with one memcpy-speed numpy copy into a persistent,
already mapped host buffer (see `_HostBuffer`): the floor for any copy-based
snapshot. `take(defer=True)` only pins the buffers of the big ones (a read shares
them) and leaves their copy to a helper thread; TF's own copy-on-write keeps
the snapshot exact if training updates a variable before its copy is done (it then
copies that variable on the training thread, which is why deferring is a choice:
see `service.policy.CopyPolicy`). Variables on other devices get a device-to-host
copy into a host variable on the training thread.
"""

from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import structlog
import tensorflow as tf
from tensorflow.python.checkpoint import saveable_compat, trackable_view
from tensorflow.python.data.ops import iterator_ops
from tensorflow.python.eager import context
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.util import object_identity

log = structlog.get_logger()


# Variables at least this big have their copy deferred when the policy says so.
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


class _HostBuffer:
    """A host tf.Variable that numpy writes into directly, at memcpy speed.

    TF's ways of copying into an existing variable (assign, strided-slice assign)
    run 3-4x slower than a memcpy on CPU, and TF's aliasing copy makes the next
    optimizer update copy into freshly mapped memory (about 5x). A CPU tensor's
    buffer is shared by `np.asarray` without a copy; the variable below is never
    written by TF, so its buffer never moves and a writable view of it stays valid.
    """

    def __init__(self, var: Any) -> None:
        with tf.device("CPU:0"):
            self.variable = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False)
            # An in-place update copies a buffer that anything else shares (TF's
            # copy-on-write): after it, numpy writes reach this variable alone.
            self.variable.assign_add(tf.zeros(var.shape, var.dtype))
        shared = np.asarray(self.variable.read_value())
        if shared.flags.owndata or shared.shape != tuple(var.shape):
            raise SnapshotUnsupported("this TensorFlow does not share CPU buffers with numpy")
        raw = (ctypes.c_char * shared.nbytes).from_address(shared.ctypes.data)
        flat = np.frombuffer(memoryview(raw).cast("B"), dtype=shared.dtype)
        self.view: np.ndarray = flat.reshape(shared.shape)
        del shared
        self.view.fill(0)  # fault the pages in now, not during the first (timed) copy
        # Prove the view is the variable's buffer before any snapshot relies on it.
        self.view.reshape(-1)[0] = 1
        if not bool(tf.reshape(self.variable, [-1])[0] == 1):
            raise SnapshotUnsupported("a numpy view of a host variable does not reach its buffer")


class Snapshotter:
    """Copies the state of `checkpoint` at a step boundary; writes the copy later, off the training thread."""

    def __init__(self, checkpoint: tf.train.Checkpoint, copier: Executor | None = None) -> None:
        """`copier` runs deferred copies (default: a thread started by the first one)."""
        kwargs = getattr(checkpoint, "_kwargs", None)
        if kwargs is None:
            raise SnapshotUnsupported("not a tf.train.Checkpoint (no constructor arguments to mirror)")
        # A second Checkpoint over the same objects: its object graph (and so the
        # file) is the one the user's Checkpoint writes, but its saver reads copies.
        self._writer = tf.train.Checkpoint(**kwargs)
        self._map: Any = object_identity.ObjectIdentityDictionary()
        self._items: list[Any] | None = None
        self._keras_variable: Any = _keras_variable_type()
        self._buffers: Any = object_identity.ObjectIdentityDictionary()  # variable -> _HostBuffer
        self._numpy_copy = True  # False once this TF turned out not to share CPU buffers
        # (variable, pinned read of it, its numpy alias, destination view): copies left for write().
        self._pending: list[tuple[Any, Any, np.ndarray, np.ndarray]] = []
        self._collisions = 0  # variables a deferred copy found already updated (TF copied them)
        # Deferred copies run on their own thread, at the priority of the thread that
        # takes snapshots (training): they must finish before training updates the
        # variables, while the write may yield to training (service.priority).
        self._copier = copier
        self._copying: Future[None] | None = None
        self.copy_seconds: float | None = None  # the last copy on the training thread (uncontended)
        self.deferred_copy_seconds: float | None = None  # the last copy on the helper thread
        self.deferred_bytes = 0  # bytes whose copy the last take() left to write()

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

    def _copy(self, obj: Any, defer: bool) -> None:  # obj: a TF trackable (untyped upstream)
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
        elif (var := self._variable_of(obj)) is not None:
            self._copy_variable(var, defer)
            if var is not obj:  # a Keras variable: its copy is that of the tf.Variable it wraps
                self._map[obj] = self._map[var]
        else:
            obj._copy_trackable_to_cpu(object_map=self._map)

    def _host_buffer(self, var: Any) -> _HostBuffer | None:
        """The numpy-writable host copy of a numeric CPU variable (created on first use)."""
        buffer = self._buffers.get(var)
        if buffer is not None or not self._numpy_copy:
            return buffer
        if not var.dtype.is_numeric or "CPU" not in (var.device or "/device:CPU:0").upper():
            return None
        try:
            buffer = self._buffers[var] = _HostBuffer(var)
        except SnapshotUnsupported as exc:
            log.warning("checkpoint.snapshot_fallback", why=str(exc))
            self._numpy_copy = False
        return buffer

    def _copy_variable(self, var: Any, defer: bool) -> None:
        """Copy (or, when `defer` and big, pin for a later copy) a variable's value into its host copy."""
        nbytes = var.shape.num_elements() * var.dtype.size if var.shape.is_fully_defined() else 0
        buffer = self._host_buffer(var)
        if buffer is not None:
            self._map[var] = buffer.variable
            # Shares the buffer (TF copies it on the next write); the raw op skips
            # read_value()'s extra identity op and wrappers (a third of the pause).
            pinned = tf.raw_ops.ReadVariableOp(resource=var.handle, dtype=var.dtype)
            source = np.asarray(pinned)
            if defer and nbytes >= _BIG:
                self._pending.append((var, pinned, source, buffer.view))
            else:
                np.copyto(buffer.view, source)
        elif nbytes >= _BIG and var.shape.rank:
            self._copy_on_device(var)
        else:
            # TF's copy shares the buffer; the next update copies it (cheap when small).
            var._copy_trackable_to_cpu(object_map=self._map)

    def _variable_of(self, obj: Any) -> Any:
        if self._keras_variable is not None and isinstance(obj, self._keras_variable):
            return obj.value
        return obj if isinstance(obj, resource_variable_ops.ResourceVariable) else None

    def _copy_on_device(self, var: Any) -> None:
        """Device-to-host copy into a host variable (strided-slice assignment, no aliasing)."""
        dest = self._map.get(var)
        if dest is None:
            with tf.device("CPU:0"):
                dest = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False)
            self._map[var] = dest
        rank = var.shape.rank
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=dest.handle, begin=[0] * rank, end=var.shape.as_list(), strides=[1] * rank,
            value=var.read_value(),
        )

    def take(self, defer: bool = False) -> None:
        """Copy the current state on the calling (training) thread.

        With `defer`, big CPU variables are only pinned here and copied by `write()`.
        """
        if self._copying is not None:
            # A snapshot that was never written (its save failed first): its copy must
            # not run on while this one pins the variables again.
            copying, self._copying = self._copying, None
            copying.exception()
        first = self._items is None
        if self._items is None:
            self._items = self._collect()
            for obj in self._items:  # map (and fault in) the host copies outside the timed copy
                var = self._variable_of(obj)
                if var is not None:
                    self._host_buffer(var)
        started = time.perf_counter()
        try:
            for obj in self._items:
                self._copy(obj, defer)
        except NotImplementedError as exc:
            self._pending.clear()
            raise SnapshotUnsupported(f"{type(exc).__name__}: {exc}") from None
        if first:
            self._writer._saver._object_map = self._map
        context.async_wait()  # the copy has finished before training mutates state
        self.deferred_bytes = sum(view.nbytes for *_, view in self._pending)
        if not self._pending:
            self.copy_seconds = time.perf_counter() - started
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preemptd-snapshot")
        self._copying = self._copier.submit(self._finish_copy)

    def _finish_copy(self) -> None:
        started = time.perf_counter()
        collisions = 0
        try:
            while self._pending:
                # Pop first: each variable is unpinned as soon as its copy is done.
                var, pinned, source, view = self._pending.pop(0)
                np.copyto(view, source)
                del pinned
                # Training updated it meanwhile iff TF moved it to a new buffer (copy-on-write).
                collisions += np.asarray(var.read_value()).ctypes.data != source.ctypes.data
                del source
        finally:
            self._pending.clear()
        self._collisions += collisions
        self.deferred_copy_seconds = time.perf_counter() - started

    def take_collisions(self) -> int:
        """Variables that training updated before a deferred copy reached them, since the last call."""
        collisions, self._collisions = self._collisions, 0
        return collisions

    def write(self, file_prefix: str) -> str:
        """Wait for a deferred copy, then write the snapshot with TF's serialisation (any thread)."""
        copying, self._copying = self._copying, None
        if copying is not None:
            copying.result()
        return str(self._writer.write(file_prefix))

    def close(self) -> None:
        """Finish a deferred copy (unpinning the variables) and stop the copy thread."""
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None
        self._copying = None
