"""RestartPolicy under a fake clock: backoff, jitter bounds, sliding-window budget, reset."""

from __future__ import annotations

import random

from daemon.clock import FakeClock
from daemon.config import RestartConfig
from daemon.restart_policy import RestartPolicy


def policy(**kw) -> RestartPolicy:
    args = {"max_restarts": 3, "window_seconds": 100.0, "backoff_initial": 1.0, "backoff_max": 8.0}
    args.update(kw)
    return RestartPolicy(args.pop("max_restarts"), args.pop("window_seconds"), args.pop("backoff_initial"),
                         args.pop("backoff_max"), rng=random.Random(7), **args)


def test_exponential_backoff_capped() -> None:
    p = policy()
    assert [p.backoff(n) for n in range(0, 7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert p.backoff(10_000) == 8.0  # no float overflow on long streaks


def test_jitter_only_shortens_and_stays_within_bounds() -> None:
    clock = FakeClock()
    p = policy(max_restarts=1000, jitter=0.2)
    delays = []
    for _ in range(200):
        clock.advance(0.1)
        d = p.on_failure(clock.monotonic(), uptime=0.1)
        assert d.restart
        delays.append((d.attempt, d.delay))
    for attempt, delay in delays:
        base = p.backoff(attempt)
        assert 0.8 * base <= delay <= base
    assert len({round(d, 6) for _, d in delays[10:]}) > 50  # actually jittered


def test_budget_sliding_window() -> None:
    clock = FakeClock()
    p = policy(max_restarts=3, window_seconds=100.0)
    for i in range(3):
        d = p.on_failure(clock.monotonic(), uptime=1)
        assert d.restart and d.in_window == i
        clock.advance(10)
    d = p.on_failure(clock.monotonic(), uptime=1)
    assert not d.restart and d.in_window == 3 and d.delay == 0.0
    # The first restart (t=0) leaves the window at t=100: one slot frees up.
    clock.advance(100 - 30 + 0.001)
    assert p.restarts_in_window(clock.monotonic()) == 2
    assert p.on_failure(clock.monotonic(), uptime=1).restart
    assert not p.on_failure(clock.monotonic(), uptime=1).restart


def test_zero_max_restarts_never_restarts() -> None:
    p = policy(max_restarts=0)
    assert not p.on_failure(0.0, uptime=5).restart


def test_streak_resets_after_a_stable_run() -> None:
    clock = FakeClock()
    p = policy(max_restarts=100, jitter=0.0, backoff_max=8.0)
    assert [p.on_failure(clock.monotonic(), 0.5).delay for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    # Ran as long as the longest backoff: healthy again, streak starts over.
    d = p.on_failure(clock.monotonic(), uptime=8.0)
    assert d.attempt == 1 and d.delay == 1.0


def test_zero_backoff_and_from_config() -> None:
    p = RestartPolicy.from_config(RestartConfig(backoff_initial_seconds=0, backoff_max_seconds=0))
    assert p.on_failure(0.0, 0.0).delay == 0.0
    p = RestartPolicy.from_config(RestartConfig(max_restarts=2, window_seconds=5))
    assert p.max_restarts == 2 and p.window_seconds == 5
