"""When to restart a failed worker: exponential backoff with jitter and a sliding-window budget.

Pure: the caller passes the (monotonic) time; randomness is injected. Only failures
(crash, hang) go through this policy; stops asked for by the operator or by a
preemption notice never reach it, so they never spend the budget.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from daemon.config import RestartConfig


@dataclass(frozen=True)
class RestartDecision:
    """The answer for one failure."""

    restart: bool
    delay: float  # seconds to wait before the next start (0 when not restarting)
    attempt: int  # consecutive failures so far, including this one
    in_window: int  # restarts already spent in the sliding window (before this one)
    max_restarts: int
    window_seconds: float


class RestartPolicy:
    """Backoff `initial * 2**(n-1)` capped at `maximum`, minus up to `jitter` of it.

    The exponent resets once a worker stays up for `stable_seconds` (default: the
    maximum backoff), i.e. when it is healthy again. At most `max_restarts` restarts
    are allowed within any `window_seconds`; the next failure gives up.
    """

    def __init__(
        self,
        max_restarts: int,
        window_seconds: float,
        backoff_initial: float,
        backoff_max: float,
        *,
        jitter: float = 0.2,
        stable_seconds: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.jitter = jitter
        self.stable_seconds = self.backoff_max if stable_seconds is None else stable_seconds
        self._rng = rng or random.Random()
        self._restarts: deque[float] = deque()  # monotonic times of restarts granted
        self._consecutive = 0

    @classmethod
    def from_config(cls, cfg: RestartConfig, rng: random.Random | None = None) -> RestartPolicy:
        return cls(
            cfg.max_restarts,
            cfg.window_seconds,
            cfg.backoff_initial_seconds,
            cfg.backoff_max_seconds,
            rng=rng,
        )

    def restarts_in_window(self, now: float) -> int:
        """Restarts granted within (now - window, now]."""
        self._expire(now)
        return len(self._restarts)

    def backoff(self, attempt: int) -> float:
        """Un-jittered delay before restart number `attempt` (1-based) of a failure streak."""
        if attempt <= 0 or self.backoff_initial <= 0:
            return 0.0
        # Cap the exponent so huge streaks do not overflow floats.
        return min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt - 1, 64))

    def on_failure(self, now: float, uptime: float) -> RestartDecision:
        """Decide about a worker that crashed or hung after running `uptime` seconds."""
        self._expire(now)
        if uptime >= self.stable_seconds:
            self._consecutive = 0
        self._consecutive += 1
        in_window = len(self._restarts)
        if in_window >= self.max_restarts:
            return RestartDecision(
                False, 0.0, self._consecutive, in_window, self.max_restarts, self.window_seconds
            )
        base = self.backoff(self._consecutive)
        # Jitter only shortens the delay, so backoff_max_seconds stays a true upper bound.
        delay = base * (1.0 - self.jitter * self._rng.random())
        self._restarts.append(now)
        return RestartDecision(
            True, delay, self._consecutive, in_window, self.max_restarts, self.window_seconds
        )

    def _expire(self, now: float) -> None:
        while self._restarts and self._restarts[0] <= now - self.window_seconds:
            self._restarts.popleft()
