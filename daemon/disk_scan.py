"""What the disk guard sees in the checkpoint dir: sizes, validity, foreign entries.

Observation only (nothing here deletes); the decisions are in daemon/disk_policy.py.
Reads are cached per manifest mtime so a check on every filesystem event stays cheap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from pathlib import Path

import structlog

from daemon import contract
from daemon.disk_policy import CheckpointSize

log = structlog.get_logger()


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes allocated on disk by a folder tree (what deleting it frees); races are tolerated."""
    total = 0
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    total += st.st_blocks * 512
                    if de.is_dir(follow_symlinks=False):
                        stack.append(de.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def newest_mtime(path: str | os.PathLike[str]) -> float:
    """Latest mtime (epoch seconds) of a folder and the entries in it; 0.0 when it is gone."""
    try:
        latest = os.stat(path).st_mtime
        with os.scandir(path) as it:
            for de in it:
                with contextlib.suppress(FileNotFoundError):
                    latest = max(latest, de.stat(follow_symlinks=False).st_mtime)
    except (FileNotFoundError, NotADirectoryError):
        return 0.0
    return latest


class CheckpointDirView:
    """Cached observations of one checkpoint dir, for the guard's thread only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._foreign_seen: set[str] = set()
        self._manifests: dict[str, tuple[int, contract.Manifest | None]] = {}
        self._checksums: dict[str, tuple[int, bool]] = {}
        self._partial_peak: dict[int, int] = {}  # step -> largest size seen of its .tmp- folder

    def scan(self) -> list[contract.Entry]:
        """Layout folders, oldest step first (contract.scan); forgets folders that went."""
        entries = contract.scan(self.directory)
        present = {os.fspath(e.path) for e in entries}
        for cache in (self._manifests, self._checksums):
            for key in [k for k in cache if k not in present]:
                del cache[key]
        return entries

    def new_foreign_entries(self) -> list[Path]:
        """Entries preemptd did not write, each returned once (to be logged, never touched)."""
        try:
            with os.scandir(self.directory) as it:
                names = [(de.name, de.is_dir(follow_symlinks=False)) for de in it]
        except OSError:
            return []
        found = []
        for name, is_dir in names:
            if name in self._foreign_seen:
                continue
            if is_dir and (name == contract.SAVEDMODEL_DIR or contract.parse_dirname(name) is not None):
                continue
            self._foreign_seen.add(name)
            found.append(self.directory / name)
        return found

    def manifest(self, path: Path) -> contract.Manifest | None:
        """The folder's parsed manifest, or None (cached until the manifest file changes)."""
        key = os.fspath(path)
        try:
            mtime = os.stat(path / contract.MANIFEST_NAME).st_mtime_ns
        except OSError:
            self._manifests.pop(key, None)
            return None
        cached = self._manifests.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            manifest: contract.Manifest | None = contract.read_manifest(path)
        except contract.InvalidCheckpoint:
            manifest = None
        self._manifests[key] = (mtime, manifest)
        return manifest

    def last_bytes(self, entries: list[contract.Entry]) -> int | None:
        """Size of the newest committed checkpoint with a readable manifest, None if none."""
        for entry in reversed(entries):
            if not entry.is_temp:
                manifest = self.manifest(entry.path)
                if manifest is not None:
                    return manifest.total_bytes
        return None

    def largest_partial(self, entries: list[contract.Entry], ignore: Collection[Path] = ()) -> int:
        """Largest size reached by a half-written checkpoint newer than every committed one.

        Remembered after its folder is gone, so a save that died of ENOSPC still tells
        how much room the next one needs; forgotten once a newer checkpoint commits.
        `ignore`: folders that are being deleted, not written.
        """
        newest_committed = max((e.step for e in entries if not e.is_temp), default=-1)
        for entry in entries:
            if entry.is_temp and entry.path not in ignore and entry.step > newest_committed:
                size = disk_bytes(entry.path)
                self._partial_peak[entry.step] = max(self._partial_peak.get(entry.step, 0), size)
        for step in [s for s in self._partial_peak if s <= newest_committed]:
            del self._partial_peak[step]
        return max(self._partial_peak.values(), default=0)

    def candidates(self, entries: list[contract.Entry]) -> list[CheckpointSize]:
        """Committed folders with validity and on-disk size, for the prune plan.

        Sizes are checked for all; the newest size-valid one is also checksummed, so a
        silently corrupt newest folder cannot make the guard delete the real newest
        valid checkpoint.
        """
        cands: list[CheckpointSize] = []
        protected_found = False
        for entry in reversed(entries):
            if entry.is_temp:
                continue
            try:
                manifest: contract.Manifest | None = contract.verify(entry.path, checksums=False)
                valid = True
            except contract.InvalidCheckpoint:
                manifest, valid = None, False
            if valid and not protected_found:
                valid = self._checksums_ok(entry.path)
                protected_found = valid
            created = manifest.created_epoch if manifest is not None else None
            if created is None:
                try:
                    created = os.stat(entry.path).st_mtime
                except OSError:
                    continue  # gone meanwhile (the worker's own retention)
            cands.append(CheckpointSize(entry.step, created, valid, disk_bytes(entry.path)))
        cands.reverse()
        return cands

    def _checksums_ok(self, path: Path) -> bool:
        """Full verification of one folder, cached until its manifest changes."""
        key = os.fspath(path)
        try:
            mtime = os.stat(path / contract.MANIFEST_NAME).st_mtime_ns
        except OSError:
            return False
        cached = self._checksums.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            contract.verify(path, checksums=True)
            ok = True
        except contract.InvalidCheckpoint as exc:
            log.warning("disk.damaged_checkpoint", path=key, error=str(exc))
            ok = False
        self._checksums[key] = (mtime, ok)
        return ok
