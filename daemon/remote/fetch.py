"""Fetch-at-start: place the newest valid remote checkpoint in the local checkpoint dir.

Remote content is untrusted until verified: a folder without a manifest is a partial
upload and is skipped; files are downloaded into a private staging folder, checked with
`contract.verify` (sizes and checksums), then moved into place with one rename. A
checkpoint that fails is skipped for the next older one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon import contract
from daemon.remote.store import RemoteCheckpoint, RemoteStore, ensure_dir

log = structlog.get_logger()

STAGING_PREFIX = ".preemptd-fetch-"


@dataclass(frozen=True)
class FetchResult:
    step: int
    path: str  # the local checkpoint folder
    source: str  # credential-free remote URL
    bytes: int
    seconds: float
    reason: str


def fetch_newest(store: RemoteStore, checkpoint_dir: Path) -> FetchResult | None:
    """Download the newest remote checkpoint that verifies; None when the remote has none.

    Raises the backend's error when the remote cannot be read (the caller retries).
    """
    ensure_dir(checkpoint_dir)
    remove_stale_staging(checkpoint_dir)
    for cp in reversed(store.checkpoints()):
        if not cp.committed:
            log.info("remote.fetch_rejected", step=cp.step, source=store.where(cp.name),
                     why="no manifest: a partial upload")
            continue
        try:
            return _fetch_one(store, cp, checkpoint_dir)
        except contract.InvalidCheckpoint as exc:
            log.warning("remote.fetch_rejected", step=cp.step, source=store.where(cp.name),
                        why=store.scrub(str(exc)))
    return None


def remove_stale_staging(checkpoint_dir: Path) -> None:
    """Remove staging folders left by a fetch whose process is gone."""
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        pid = name[len(STAGING_PREFIX):]
        if pid.isdigit() and not contract.pid_alive(int(pid)):
            shutil.rmtree(checkpoint_dir / name, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fetch_one(store: RemoteStore, cp: RemoteCheckpoint, checkpoint_dir: Path) -> FetchResult:
    started = time.monotonic()
    staging = checkpoint_dir / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    target = staging / cp.name
    target.mkdir(parents=True)
    try:
        _write_synced(target / contract.MANIFEST_NAME, store.read_bytes(cp.name, contract.MANIFEST_NAME))
        manifest = contract.read_manifest(target)  # rejects unsafe file names too
        # Cheap rejection before downloading gigabytes: the listing must match the sizes.
        for rel, meta in manifest.files.items():
            if cp.files.get(rel) != meta["size"]:
                raise contract.InvalidCheckpoint(
                    f"{rel}: remote has {cp.files.get(rel)} bytes, manifest says {meta['size']}"
                )
        dirs = {target}
        for rel in manifest.files:
            dest = target / rel
            if dest.parent != target:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(dest.parent)
            store.get_file(cp.name, rel, dest)
            contract.fsync_file(dest)
        for d in dirs:
            contract.fsync_dir(d)
        contract.verify(target, checksums=True)
        final = checkpoint_dir / cp.name
        if final.exists():
            # A damaged local folder of the same step (a valid one means no fetch).
            os.rename(final, staging / f"damaged-{cp.name}")
        os.rename(target, final)
        contract.fsync_dir(checkpoint_dir)
        return FetchResult(
            step=manifest.step,
            path=str(final),
            source=store.where(cp.name),
            bytes=manifest.total_bytes,
            seconds=time.monotonic() - started,
            reason=manifest.reason,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
