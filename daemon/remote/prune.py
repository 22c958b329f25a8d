"""Retention on the remote: the shared policy (`daemon.retention`) applied to the listing.

Keeps the `keep` newest committed remote checkpoints; removes older ones and older
partial uploads, never the newest committed one and never a step still queued or
being uploaded. A remote checkpoint is removed manifest first.
"""

from __future__ import annotations

from collections.abc import Collection

import structlog

from daemon import retention
from daemon.remote.store import RemoteStore

log = structlog.get_logger()


def prune_remote(store: RemoteStore, keep: int, protected: Collection[int]) -> list[int]:
    """Apply retention to the remote; the steps removed, oldest first."""
    cps = store.checkpoints()
    cands = [retention.Candidate(step=cp.step, created=0.0, valid=cp.committed) for cp in cps]
    doomed = set(retention.to_delete(cands, keep)) - set(protected)
    removed = []
    for cp in cps:
        if cp.step in doomed:
            store.remove(cp)
            removed.append(cp.step)
            log.info("remote.pruned", step=cp.step, path=store.where(cp.name),
                     bytes=sum(cp.files.values()), committed=cp.committed)
    return removed
