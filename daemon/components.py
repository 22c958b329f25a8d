"""How the supervisor's helpers (notice sources, disk guard, remote mirror) plug in.

A component runs its own thread(s) and never blocks the supervisor's main loop. It
talks to the main loop only by `post(event)`, which is thread-safe and wakes the
loop. The main loop calls the hooks below from its own thread; hooks must return
quickly (hand work to the component's thread).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Post = Callable[[object], None]


class NoticeKind(str, enum.Enum):
    STOP = "stop"  # the VM is going away: final checkpoint, stop, do not restart
    CHECKPOINT = "checkpoint"  # early warning (e.g. AWS rebalance): checkpoint, keep going
    CANCELLED = "cancelled"  # an earlier notice was withdrawn (e.g. Azure event gone)


@dataclass(frozen=True)
class Notice:
    """A preemption notice from any source, posted to the main loop."""

    source: str  # "gce" | "aws" | "azure" | "signal" | ...
    kind: NoticeKind
    deadline: float | None = None  # monotonic seconds, when known
    deadline_wall: float | None = None  # epoch seconds, for people
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointReport:
    """A checkpoint the worker reported as committed."""

    step: int
    path: str
    bytes: int
    seconds: float
    reason: str


@dataclass(frozen=True)
class CheckpointFailure:
    """A save the worker reported as failed (`checkpoint_failed` message)."""

    step: int
    reason: str
    error: str


class Component:
    """Base class with no-op hooks; subclasses override what they need."""

    name = "component"

    def start(self, post: Post) -> None:
        """Start background work; `post` delivers events to the main loop."""

    def stop(self) -> None:
        """Stop background work; must return within about a second."""

    def status(self) -> dict[str, Any]:
        """Facts for the state file and `preemptd status` (JSON-serialisable)."""
        return {}

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """A checkpoint was committed by the worker (called on the main loop)."""

    def on_checkpoint_failed(self, failure: CheckpointFailure) -> None:
        """The worker reported a failed save (called on the main loop; e.g. ENOSPC)."""

    def on_final_checkpoint(self, report: CheckpointReport | None) -> None:
        """The stop path ended; `report` is the confirmed final checkpoint or None."""

    def before_worker_start(self, checkpoint_dir: str) -> None:
        """Called on the main loop before each worker start (e.g. fetch a remote checkpoint).

        May block briefly; a long fetch is acceptable only before the first start.
        """
