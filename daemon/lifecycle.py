"""The worker lifecycle: an explicit state enum and the one function that moves it.

Every move logs exactly one line whose `event` is the dotted name of the move
(``worker.started``, ``worker.exited``, ``daemon.stopping`` ...), so the log reads as
the story of the worker. What to do next is decided by the supervisor; this module
only guards which moves are legal and records them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger()


class State(str, enum.Enum):
    """Where the supervised worker is in its life."""

    INIT = "init"  # daemon constructed, nothing started yet
    STARTING = "starting"  # daemon up, first worker about to be spawned
    RUNNING = "running"  # a worker process is alive
    HUNG = "hung"  # worker went silent; SIGTERM sent, SIGKILL at the grace deadline
    EXITED = "exited"  # worker just died; deciding what next (transient)
    BACKOFF = "backoff"  # waiting before the next start
    STOPPING = "stopping"  # stop requested; waiting for the final checkpoint and exit
    FINISHED = "finished"  # worker exited 0 on its own: training is done
    STOPPED = "stopped"  # stop path ended
    GAVE_UP = "gave_up"  # restart budget exhausted
    FAILED = "failed"  # the command cannot be executed at all

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.FINISHED, State.STOPPED, State.GAVE_UP, State.FAILED})

# Legal moves and the event each one logs. A move not listed here is a bug.
MOVES: dict[tuple[State, State], str] = {
    (State.INIT, State.STARTING): "daemon.started",
    (State.STARTING, State.RUNNING): "worker.started",
    (State.BACKOFF, State.RUNNING): "worker.started",
    (State.STARTING, State.FAILED): "worker.start_failed",
    (State.BACKOFF, State.FAILED): "worker.start_failed",
    (State.STARTING, State.EXITED): "worker.start_error",  # transient spawn failure (e.g. fork EAGAIN)
    (State.BACKOFF, State.EXITED): "worker.start_error",
    (State.RUNNING, State.HUNG): "worker.hung",
    (State.RUNNING, State.EXITED): "worker.exited",
    (State.HUNG, State.EXITED): "worker.exited",
    (State.STOPPING, State.EXITED): "worker.exited",
    (State.EXITED, State.BACKOFF): "worker.restarting",
    (State.EXITED, State.GAVE_UP): "daemon.gave_up",
    (State.EXITED, State.FINISHED): "daemon.stopped",  # reason=finished
    (State.EXITED, State.STOPPED): "daemon.stopped",
    (State.RUNNING, State.STOPPING): "daemon.stopping",
    (State.HUNG, State.STOPPING): "daemon.stopping",
    (State.STARTING, State.STOPPED): "daemon.stopped",
    (State.BACKOFF, State.STOPPED): "daemon.stopped",
}


class IllegalMove(RuntimeError):
    """A move the state machine does not allow (a supervisor bug)."""


class Lifecycle:
    """Holds the current state; `move` is the only way to change it."""

    def __init__(self, on_change: Callable[[State, State], None] | None = None) -> None:
        self._state = State.INIT
        self._on_change = on_change

    @property
    def state(self) -> State:
        return self._state

    def can_move(self, to: State) -> bool:
        return (self._state, to) in MOVES

    def move(self, to: State, **fields: Any) -> str:
        """Move to `to`, log the move's one line with `fields`, return the event name."""
        event = MOVES.get((self._state, to))
        if event is None:
            raise IllegalMove(f"illegal lifecycle move {self._state.value} -> {to.value}")
        prev, self._state = self._state, to
        level = "warning" if to in (State.HUNG, State.GAVE_UP, State.FAILED) else "info"
        getattr(log, level)(event, state=to.value, previous=prev.value, **fields)
        if self._on_change is not None:
            self._on_change(prev, to)
        return event
