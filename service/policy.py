"""When a periodic checkpoint is due and how its snapshot is copied: small pure objects."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class CopyPolicy:
    """Whether a periodic snapshot leaves its copy to a helper thread (deferred).

    A deferred copy pins the variables' buffers; a training update that reaches a
    variable before its copy is done makes TF copy it on the training thread into
    freshly mapped memory (about 5x a plain copy). An update comes at the end of a
    step (gradients first), so deferring pays when steps are long compared with the
    copy: `factor` times the copy as measured on the training thread (never before
    one has been). Each time a deferred copy lost that race anyway (a "collision",
    seen afterwards by the snapshot), the factor doubles.
    """

    factor: float = 4.0
    max_factor: float = 256.0

    def defer(self, step_seconds: float | None, copy_seconds: float | None) -> bool:
        """Decide for the snapshot about to be taken."""
        if step_seconds is None or copy_seconds is None:
            return False
        return step_seconds >= self.factor * copy_seconds

    def collided(self, variables: int) -> None:
        """`variables` of the last deferred copy were updated before they were copied."""
        if variables:
            self.factor = min(self.max_factor, self.factor * 2)


@dataclass
class StepTimer:
    """Median duration of the last few training steps, from step-boundary times."""

    window: int = 8
    _last: float | None = None
    _intervals: list[float] = field(default_factory=list)

    def tick(self, now: float) -> None:
        """A step boundary at monotonic time `now`."""
        if self._last is not None:
            self._intervals.append(now - self._last)
            del self._intervals[:-self.window]
        self._last = now

    def restart(self, now: float) -> None:
        """Forget the interval in progress (time spent saving is not a step)."""
        self._last = now

    def median(self) -> float | None:
        """Median of the recorded intervals; None before two boundaries."""
        if not self._intervals:
            return None
        ordered = sorted(self._intervals)
        return ordered[len(ordered) // 2]
