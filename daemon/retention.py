"""Which committed checkpoints to keep: one pure policy for both sides.

The worker applies it after each commit (`keep` newest plus one per
`keep_every_hours`); the daemon's disk guard uses `prune_order` under pressure.
Both never offer the newest valid checkpoint for deletion. Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A committed checkpoint as the policy sees it."""

    step: int
    created: float  # epoch seconds (manifest `created`, else folder mtime)
    valid: bool = True


def hourly_anchors(cands: Sequence[Candidate], keep_every_hours: float) -> set[int]:
    """Steps kept forever: the first valid checkpoint of each `keep_every_hours` bucket."""
    if keep_every_hours <= 0:
        return set()
    bucket_seconds = keep_every_hours * 3600.0
    anchors: dict[int, Candidate] = {}
    for c in sorted(cands, key=lambda c: c.step):
        if not c.valid:
            continue
        bucket = int(c.created // bucket_seconds)
        anchors.setdefault(bucket, c)
    return {c.step for c in anchors.values()}


def newest_valid_step(cands: Sequence[Candidate]) -> int | None:
    valid = [c.step for c in cands if c.valid]
    return max(valid) if valid else None


def to_delete(cands: Sequence[Candidate], keep: int, keep_every_hours: float = 0.0) -> list[int]:
    """Steps that retention removes, oldest first.

    Keeps the `keep` newest valid checkpoints and the hourly anchors. Invalid
    (damaged) checkpoints older than the newest valid one are removed too; an
    invalid one newer than every valid one is left alone, since it may be a folder
    still settling on a network filesystem.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    newest = newest_valid_step(cands)
    if newest is None:
        return []
    valid_desc = sorted((c.step for c in cands if c.valid), reverse=True)
    protected = set(valid_desc[:keep]) | hourly_anchors(cands, keep_every_hours)
    return sorted(c.step for c in cands if c.step not in protected and c.step < newest)


def prune_order(cands: Sequence[Candidate], keep_every_hours: float = 0.0) -> list[int]:
    """Steps the disk guard may delete under pressure, in the order to delete them.

    Damaged checkpoints first, then valid ones oldest first; never the newest valid
    checkpoint and never an hourly anchor.
    """
    newest = newest_valid_step(cands)
    if newest is None:
        return []
    anchors = hourly_anchors(cands, keep_every_hours)
    invalid = sorted(c.step for c in cands if not c.valid and c.step < newest)
    valid = sorted(c.step for c in cands if c.valid and c.step != newest and c.step not in anchors)
    return invalid + valid
