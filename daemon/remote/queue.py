"""The upload queue: which committed checkpoint to upload next (pure; no threads, no I/O).

Order: `preemption`/`final` checkpoints first (they race the VM's death), then
`requested`, then `periodic`; within a class the newest step first, since the newest
checkpoint is the one a new VM resumes from. A failed upload waits out its backoff
(`not_before`) while other ready jobs go ahead. Queued jobs that remote retention
would delete anyway (older than the `keep` newest queued) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORITY = {"preemption": 0, "final": 0, "requested": 1, "periodic": 2}
URGENT = 0


def priority_of(reason: str) -> int:
    """Queue class of a checkpoint reason (unknown reasons rank as periodic)."""
    return PRIORITY.get(reason, PRIORITY["periodic"])


@dataclass
class Job:
    """One checkpoint to upload."""

    step: int
    path: str
    reason: str
    enqueued: float  # monotonic time the local commit was reported
    attempts: int = 0  # failed attempts so far
    not_before: float = 0.0  # monotonic; backoff after a failure
    deadline: float | None = None  # monotonic; urgent jobs only
    total_bytes: int = 0
    resumed: bool = False  # re-queued from the journal after a daemon restart
    started: float = 0.0  # monotonic; when its latest attempt began
    key: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (priority_of(self.reason), -self.step)

    @property
    def priority(self) -> int:
        return self.key[0]


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the `attempt`-th consecutive failure (1-based), doubling."""
    if attempt < 1:
        return 0.0
    return min(max(maximum, initial), initial * 2.0 ** (attempt - 1))


class UploadQueue:
    """Pending uploads; at most one job per step (the more urgent reason wins)."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self._keep = keep
        self._jobs: dict[int, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, step: object) -> bool:
        return step in self._jobs

    def get(self, step: int) -> Job | None:
        return self._jobs.get(step)

    def jobs(self) -> list[Job]:
        """Pending jobs in upload order (ignoring backoff)."""
        return sorted(self._jobs.values(), key=lambda j: j.key)

    def push(self, job: Job) -> list[Job]:
        """Queue `job`; returns the jobs this made pointless (superseded), now dropped."""
        old = self._jobs.get(job.step)
        if old is not None and old.key <= job.key:
            return []  # already queued with the same or a more urgent reason
        self._jobs[job.step] = job
        return self._drop_superseded()

    def _drop_superseded(self) -> list[Job]:
        # Urgent jobs are never dropped: they are what the stop path waits for.
        steps = sorted((j.step for j in self._jobs.values()), reverse=True)
        keep = set(steps[: self._keep])
        dropped = [j for j in self._jobs.values() if j.step not in keep and j.priority != URGENT]
        for j in dropped:
            del self._jobs[j.step]
        return sorted(dropped, key=lambda j: j.step)

    def pop_ready(self, now: float) -> Job | None:
        """Remove and return the best job whose backoff is over, or None."""
        ready = [j for j in self._jobs.values() if j.not_before <= now]
        if not ready:
            return None
        best = min(ready, key=lambda j: j.key)
        del self._jobs[best.step]
        return best

    def next_ready_at(self) -> float | None:
        """Monotonic time the earliest job becomes ready (None when empty)."""
        return min((j.not_before for j in self._jobs.values()), default=None)

    def has_more_urgent(self, job: Job, now: float) -> bool:
        """True when a ready job is of a more urgent class than `job` (which should yield)."""
        return any(j.priority < job.priority and j.not_before <= now for j in self._jobs.values())
