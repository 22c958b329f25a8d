"""The lifecycle state machine: legal moves, one log line per move, illegal moves refused."""

from __future__ import annotations

import pytest
import structlog

from daemon.lifecycle import MOVES, IllegalMove, Lifecycle, State


def test_one_line_per_move_with_event_names() -> None:
    seen: list[tuple[State, State]] = []
    lc = Lifecycle(on_change=lambda a, b: seen.append((a, b)))
    path = [State.STARTING, State.RUNNING, State.EXITED, State.BACKOFF, State.RUNNING, State.STOPPING,
            State.EXITED, State.STOPPED]
    with structlog.testing.capture_logs() as logs:
        for to in path:
            lc.move(to, step=1)
    assert [e["event"] for e in logs] == [
        "daemon.started", "worker.started", "worker.exited", "worker.restarting", "worker.started",
        "daemon.stopping", "worker.exited", "daemon.stopped",
    ]
    assert all(e["step"] == 1 and "state" in e and "previous" in e for e in logs)
    assert len(seen) == len(path) and seen[-1] == (State.EXITED, State.STOPPED)
    assert lc.state.terminal


@pytest.mark.parametrize("path", [
    [State.RUNNING],  # INIT -> RUNNING skips daemon.started
    [State.STARTING, State.BACKOFF],  # no exit in between
    [State.STARTING, State.RUNNING, State.FINISHED],  # must pass EXITED
    [State.STARTING, State.RUNNING, State.EXITED, State.FINISHED, State.STARTING],  # terminal
])
def test_illegal_moves_raise_and_keep_state(path: list[State]) -> None:
    lc = Lifecycle()
    with structlog.testing.capture_logs():
        for to in path[:-1]:
            lc.move(to)
        before = lc.state
        with pytest.raises(IllegalMove):
            lc.move(path[-1])
    assert lc.state is before


def test_terminal_states_have_no_way_out() -> None:
    for (frm, _to) in MOVES:
        assert not frm.terminal
    hung = [to for (frm, to) in MOVES if frm is State.HUNG]
    assert set(hung) == {State.EXITED, State.STOPPING}


def test_warning_level_for_bad_news() -> None:
    lc = Lifecycle()
    with structlog.testing.capture_logs() as logs:
        lc.move(State.STARTING)
        lc.move(State.RUNNING)
        lc.move(State.HUNG)
    assert logs[-1]["log_level"] == "warning" and logs[-1]["event"] == "worker.hung"
