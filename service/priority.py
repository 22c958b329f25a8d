"""Background checkpoint threads yield the CPU to training.

On a machine whose cores the training saturates, a background write (TF's
serialisation, crc32, page-cache copies) running at the same priority slows the
training threads by about as much CPU time as it uses. A higher nice value on
the writing thread (and the helper threads it starts, which inherit it) lets the
training run first; the write finishes in the gaps, and at full speed once
training waits for it (a stop request, close()).
"""

from __future__ import annotations

import os
import threading

import structlog

log = structlog.get_logger()

DEFAULT_BACKGROUND_NICE = 10


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux: per thread); 0 = leave it."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:
        # Not fatal: the saves stay correct, they only compete with training.
        log.warning("checkpoint.priority_unchanged", thread=threading.current_thread().name, error=str(exc))
