"""What the disk guard sees in the checkpoint dir: sizes, validity, foreign entries.

Observation only (nothing here deletes); the decisions are in daemon/disk_policy.py.
Reads are cached per manifest mtime so a check on every filesystem event stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
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
    """Cached observations of one checkpoint dir, for the guard's thread (plus one
    background thread that reads checksums)."""

    def __init__(
        self, directory: Path, on_checked: Callable[[], None] = lambda: None, background: bool = True
    ) -> None:
        """`background=False` reads checksums inline (deterministic single-threaded tests)."""
        self.directory = directory
        self._background = background
        self._on_checked = on_checked
        self._foreign_seen: set[str] = set()
        self._manifests: dict[str, tuple[int, contract.Manifest | None]] = {}
        self._lock = threading.Lock()  # the checksum cache is shared with the reader thread
        self._checksums: dict[str, tuple[int, bool]] = {}
        self._reading: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self.held_back = False  # the last candidates() kept a folder back (checksums pending)
        self._partial_peak: dict[int, int] = {}  # step -> largest size seen of its .tmp- folder

    def scan(self) -> list[contract.Entry]:
        """Layout folders, oldest step first (contract.scan); forgets folders that went."""
        entries = contract.scan(self.directory)
        present = {os.fspath(e.path) for e in entries}
        for key in [k for k in self._manifests if k not in present]:
            del self._manifests[key]
        with self._lock:
            for key in [k for k in self._checksums if k not in present]:
                del self._checksums[key]
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

        Sizes are checked for all. The newest size-valid folder must also pass its
        checksums, so that a silently corrupt newest folder cannot cost the real newest
        valid checkpoint; that read runs in the background (a big checkpoint takes
        seconds), and until it has passed, the next valid folder is held back too.
        """
        cands: list[CheckpointSize] = []
        protected_found = hold_next = False
        self.held_back = False
        for entry in reversed(entries):
            if entry.is_temp:
                continue
            try:
                manifest: contract.Manifest | None = contract.verify(entry.path, checksums=False)
                valid = True
            except contract.InvalidCheckpoint:
                manifest, valid = None, False
            if valid and not protected_found:
                checked = self.checksums_ok(entry.path)
                valid = checked is not False
                protected_found = valid
                hold_next = checked is None
            elif valid and hold_next:
                hold_next = False
                self.held_back = True
                continue  # not offered until the newer one's checksums have passed
            created = manifest.created_epoch if manifest is not None else None
            if created is None:
                try:
                    created = os.stat(entry.path).st_mtime
                except OSError:
                    continue  # gone meanwhile (the worker's own retention)
            cands.append(CheckpointSize(entry.step, created, valid, disk_bytes(entry.path)))
        cands.reverse()
        return cands

    def newest_committed(self, entries: list[contract.Entry]) -> Path | None:
        """The newest committed-name folder (to have its checksums read early)."""
        for entry in reversed(entries):
            if not entry.is_temp:
                return entry.path
        return None

    def checksums_ok(self, path: Path) -> bool | None:
        """Whether the folder passes full verification; None while that is being read.

        Cached until its manifest changes; the read happens on a background thread,
        which calls `on_checked` when done.
        """
        key = os.fspath(path)
        try:
            mtime = os.stat(path / contract.MANIFEST_NAME).st_mtime_ns
        except OSError:
            return False
        with self._lock:
            cached = self._checksums.get(key)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            if key in self._reading:
                return None
            self._reading.add(key)
        if not self._background:
            self._read_checksums(path, key, mtime)
            return self.checksums_ok(path)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preemptd-disk-verify")
        self._executor.submit(self._read_checksums, path, key, mtime)
        return None

    def _read_checksums(self, path: Path, key: str, mtime: int) -> None:
        try:
            contract.verify(path, checksums=True)
            ok = True
        except contract.InvalidCheckpoint as exc:
            gone = not os.path.isdir(path)
            ok = False
            if not gone:
                log.warning("disk.damaged_checkpoint", path=key, error=str(exc))
        with self._lock:
            self._reading.discard(key)
            self._checksums[key] = (mtime, ok)
        self._on_checked()

    def close(self) -> None:
        """Stop the background reader (a read in progress finishes on its own)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
