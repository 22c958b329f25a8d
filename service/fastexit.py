"""Skip the interpreter's teardown once the stop checkpoint is durable.

With TensorFlow loaded, a normal interpreter exit takes seconds (thousands of modules
torn down, C++ destructors): measured 3-4 s here after the preemption checkpoint was
already committed. On a VM with 30 s of warning that is time the platform may need,
and a unit that is slow to go inactive. After the stop save, every atexit handler
registered after the CheckpointManager (the user's own: summary writers, ...) still
runs, user `finally` blocks still run; then the process ends with os._exit(0).
Set PREEMPTD_FAST_EXIT=0 to keep the normal teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from types import TracebackType

ENV_FAST_EXIT = "PREEMPTD_FAST_EXIT"


class FastExit:
    """Armed by the stop path; ends the process at atexit time unless something failed."""

    def __init__(self) -> None:
        self._armed = False
        self._failed = False
        self._registered = False

    def install(self) -> None:
        """Register the atexit hook (once); handlers registered later run before it."""
        if not self._registered and os.environ.get(ENV_FAST_EXIT, "1") != "0":
            atexit.register(self._at_exit)
            self._registered = True

    def arm(self) -> None:
        """The stop checkpoint is durable and reported: the rest of the exit may be skipped."""
        if not self._registered:
            return
        self._armed = True
        previous = sys.excepthook

        def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            # An uncaught error after the stop: keep its traceback and its exit status.
            self._failed = True
            previous(kind, value, tb)

        sys.excepthook = hook

    def _at_exit(self) -> None:
        if not self._armed or self._failed:
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed or broken pipe
                stream.flush()
        os._exit(0)
