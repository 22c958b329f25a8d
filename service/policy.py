"""When a periodic checkpoint is due: a small pure object, tested with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PeriodicPolicy:
    """Due every `every_steps` steps and/or every `every_seconds` (0 = that trigger is off).

    The step trigger fires on multiples of `every_steps` (100, 200, ...), also after a
    resume from step 511 or a requested save at 516: the checkpoints of a run that was
    interrupted land on the same steps as those of one that was not.
    """

    every_steps: int = 0
    every_seconds: float = 0.0
    last_step: int = 0
    last_time: float = 0.0  # monotonic

    def reset(self, step: int, now: float) -> None:
        """A checkpoint of `step` was taken (or restored) at monotonic time `now`."""
        self.last_step = step
        self.last_time = now

    def due(self, step: int, now: float) -> bool:
        """True when a periodic save should start at this step boundary."""
        if step <= self.last_step:
            return False
        if self.every_steps and step // self.every_steps > self.last_step // self.every_steps:
            return True
        return bool(self.every_seconds) and now - self.last_time >= self.every_seconds
