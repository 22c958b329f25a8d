"""What the disk guard should do, given disk usage, checkpoint sizes and config.

Pure functions over plain data: no filesystem, no clock, no logging, so every rule is
unit-tested with made-up numbers. The guard (daemon/diskguard.py) observes, calls
`decide`, and carries the decision out.

Rules:

* `need` — room the next checkpoint needs: the larger of the last committed
  checkpoint and the largest half-written one seen since, times `margin`.
* Prune when usage >= `prune_percent`, or when free space < `need` (so there is
  always room for the emergency save). Delete in `retention.prune_order` (damaged
  first, then oldest valid; never the newest valid, never an hourly anchor) until
  usage < `prune_percent` and free >= `need`, or nothing more may go.
* After a save failed for lack of space (`space_failure`), free everything that may
  go: the failed save's size is unknown, and the next one must succeed.
* Skip periodic saves while free < `need` even after pruning; requested and
  preemption saves always go ahead.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.config import DiskConfig
from daemon.retention import Candidate, prune_order

# Percentage points usage must fall below a threshold before crossing it again
# logs another `disk.pressure` (so hovering at the threshold does not flood).
PRESSURE_HYSTERESIS_PERCENT = 1.0


class DiskState(str, enum.Enum):
    """The guard's state as shown by `preemptd status`."""

    OK = "ok"
    WARN = "warn"  # usage >= warn_percent
    PRUNING = "pruning"  # usage >= prune_percent (pruning, or nothing left that may go)
    LOW_SPACE = "low_space"  # free < need: periodic saves are skipped


@dataclass(frozen=True)
class Usage:
    """Disk usage of the checkpoint volume (as psutil.disk_usage reports it)."""

    total: int
    used: int
    free: int  # available to unprivileged users

    @property
    def percent(self) -> float:
        """Used share of what users can have (psutil's definition: used / (used + free))."""
        room = self.used + self.free
        return 100.0 * self.used / room if room > 0 else 0.0

    def after_freeing(self, nbytes: int) -> Usage:
        """Projected usage after deleting `nbytes` of allocated space."""
        freed = min(nbytes, self.used)
        return Usage(self.total, self.used - freed, self.free + freed)


@dataclass(frozen=True)
class CheckpointSize:
    """A committed checkpoint folder as the disk policy sees it."""

    step: int
    created: float  # epoch seconds
    valid: bool
    bytes: int  # allocated on disk; what deleting it frees


@dataclass(frozen=True)
class Decision:
    """What to do now, and the state the volume will be in afterwards."""

    state: DiskState
    prune: tuple[int, ...]  # steps to delete, in this order
    prune_bytes: int  # what deleting them frees (projected)
    skip_periodic: bool
    need_bytes: int
    projected: Usage  # usage after the planned deletions
    exhausted: bool  # pruning was wanted but nothing more may go

    @property
    def wants_prune(self) -> bool:
        return bool(self.prune)


def need_bytes(last_checkpoint_bytes: int, largest_partial_bytes: int, margin: float) -> int:
    """Room the next checkpoint needs: the biggest recent one times `margin` (0 when unknown)."""
    base = max(last_checkpoint_bytes, largest_partial_bytes, 0)
    return int(math.ceil(base * margin))


def over_limits(usage: Usage, need: int, cfg: DiskConfig) -> bool:
    """True when the guard must free space: usage at the prune threshold, or no room to save."""
    return usage.percent >= cfg.prune_percent or usage.free < need


def classify(usage: Usage, need: int, cfg: DiskConfig) -> DiskState:
    """The state shown for this usage (after whatever pruning was possible)."""
    if need > 0 and usage.free < need:
        return DiskState.LOW_SPACE
    if usage.percent >= cfg.prune_percent:
        return DiskState.PRUNING
    if usage.percent >= cfg.warn_percent:
        return DiskState.WARN
    return DiskState.OK


def decide(
    usage: Usage,
    checkpoints: Sequence[CheckpointSize],
    need: int,
    cfg: DiskConfig,
    keep_every_hours: float = 0.0,
    space_failure: bool = False,
) -> Decision:
    """Plan the deletions and the resulting state for the current usage.

    `checkpoints` are the committed folders (valid or damaged) with their on-disk
    sizes; half-written `.tmp-` folders are not candidates and are not listed.
    """
    by_step = {c.step: c for c in checkpoints}
    order = prune_order(
        [Candidate(step=c.step, created=c.created, valid=c.valid) for c in checkpoints],
        keep_every_hours,
    )
    wanted = space_failure or over_limits(usage, need, cfg)
    plan: list[int] = []
    projected = usage
    if wanted:
        for step in order:
            if not space_failure and not over_limits(projected, need, cfg):
                break
            plan.append(step)
            projected = projected.after_freeing(by_step[step].bytes)
    exhausted = wanted and over_limits(projected, need, cfg) and len(plan) == len(order)
    state = classify(projected, need, cfg)
    return Decision(
        state=state,
        prune=tuple(plan),
        prune_bytes=usage.used - projected.used,
        skip_periodic=state is DiskState.LOW_SPACE,
        need_bytes=need,
        projected=projected,
        exhausted=exhausted,
    )


class PressureLatch:
    """Emits one `disk.pressure` per upward crossing of a threshold (with hysteresis).

    Mutable but pure: it only remembers which thresholds are armed.
    """

    def __init__(self) -> None:
        self._armed = {"warn": True, "prune": True}

    def crossings(self, percent: float, cfg: DiskConfig) -> list[str]:
        """Levels ("warn", "prune") newly crossed at this usage; re-arms below them."""
        crossed: list[str] = []
        for level, threshold in (("warn", cfg.warn_percent), ("prune", cfg.prune_percent)):
            if self._armed[level] and percent >= threshold:
                crossed.append(level)
                self._armed[level] = False
            elif not self._armed[level] and percent < threshold - PRESSURE_HYSTERESIS_PERCENT:
                self._armed[level] = True
        return crossed
