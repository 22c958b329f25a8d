"""Deadline awareness: does the last checkpoint save fit in the provider's warning window?

Pure policy (no I/O, no clock): the notice sources feed it the duration of committed
checkpoints and ask it whether a preemption save would still finish in time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# The time between the notice and the VM's end, as each provider documents it.
WINDOW_SECONDS = {"gce": 30.0, "aws": 120.0, "azure": 30.0}

# The save starts at the worker's next step boundary and ends with fsyncs on a busy
# disk; keep this much of the window in reserve rather than plan to the last second.
SAFETY_FRACTION = 0.2


@dataclass(frozen=True)
class Fit:
    """The verdict for one window."""

    window_seconds: float
    detect_seconds: float  # worst-case time between the notice and our seeing it
    save_seconds: float | None  # duration of the last save, None before any
    fits: bool | None  # None while no save has been measured

    @property
    def budget_seconds(self) -> float:
        """Time the save may take once the notice is seen."""
        return max(0.0, self.window_seconds * (1 - SAFETY_FRACTION) - self.detect_seconds)

    def to_json(self) -> dict[str, float | bool | None]:
        return {
            "window_seconds": self.window_seconds,
            "detect_seconds": self.detect_seconds,
            "budget_seconds": round(self.budget_seconds, 3),
            "last_save_seconds": self.save_seconds,
            "save_fits": self.fits,
        }


class SaveBudget:
    """Remembers recent save durations and judges them against a window."""

    def __init__(self, window_seconds: float, detect_seconds: float, history: int = 5) -> None:
        self.window_seconds = window_seconds
        self.detect_seconds = detect_seconds
        self._recent: deque[float] = deque(maxlen=history)

    def record(self, seconds: float) -> None:
        """One committed checkpoint took `seconds`."""
        if seconds >= 0:
            self._recent.append(float(seconds))

    @property
    def last_save_seconds(self) -> float | None:
        return self._recent[-1] if self._recent else None

    def assess(self, window_seconds: float | None = None) -> Fit:
        """Would the last save fit in `window_seconds` (default: the provider's window)?"""
        window = self.window_seconds if window_seconds is None else window_seconds
        last = self.last_save_seconds
        fit = Fit(window, self.detect_seconds, last, None)
        if last is None:
            return fit
        return Fit(window, self.detect_seconds, last, last <= fit.budget_seconds)
