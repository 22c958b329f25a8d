"""Upload bandwidth bound: a token bucket that says how long to wait, never sleeps itself.

Keeping the sleep outside makes the policy testable with a fake clock and lets the
uploader wait on an event that a stop or a more urgent upload can interrupt.
"""

from __future__ import annotations

from daemon.clock import Clock

MB = 1_000_000  # `bandwidth_mbps` is megabytes (10^6 bytes) per second


class TokenBucket:
    """`rate` bytes per second on average, at most `burst` bytes ahead of it.

    `reserve(n)` takes `n` bytes from the bucket (it may go into debt) and returns the
    seconds to wait before sending them so that the long-run rate stays at `rate`.
    """

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock.monotonic()

    def reserve(self, n: int) -> float:
        """Take `n` bytes; seconds to wait before sending them (0 when within budget)."""
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def from_mbps(mbps: float, clock: Clock, min_burst: int) -> TokenBucket | None:
    """The limiter for `[remote] bandwidth_mbps` (None = unlimited).

    The burst is half a second of traffic but at least `min_burst` (the uploader passes
    one backend part plus one chunk, so that time spent blocked sending a part earns
    the tokens for the next one instead of losing them).
    """
    if mbps <= 0:
        return None
    rate = mbps * MB
    return TokenBucket(rate, max(float(min_burst), rate / 2), clock)
