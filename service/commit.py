"""The durable commit protocol of docs/DESIGN.md, independent of TensorFlow.

write into `ckpt-<step>.tmp-<pid>/` (the caller does that) → fsync every file →
write and fsync MANIFEST.json → fsync the temp folder → rename it to `ckpt-<step>/`
→ fsync the parent. Plus the housekeeping around it: checking the directory,
removing stale temp folders, retention.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from daemon import contract, retention
from service.errors import CheckpointDirError

log = structlog.get_logger()

# crc32 (zlib) and fsync both release the GIL: one thread per file and per job lets
# the checksum of one file overlap the disk flush of another.
_MAX_IO_THREADS = 8


@dataclass(frozen=True)
class Committed:
    """A checkpoint that is now durable on disk."""

    path: Path
    manifest: contract.Manifest
    seconds: float  # from the start of the save to the parent fsync

    @property
    def bytes(self) -> int:
        return self.manifest.total_bytes


def prepare_directory(directory: Path) -> None:
    """Create the checkpoint dir if needed and prove it is writable; CheckpointDirError if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointDirError(f"checkpoint dir {directory}: a path component is not a directory") from None
    except OSError as exc:
        raise CheckpointDirError(f"checkpoint dir {directory}: cannot create it: {exc.strerror}") from None
    if not directory.is_dir():
        raise CheckpointDirError(f"checkpoint dir {directory}: not a directory")
    # os.access lies for root and on read-only mounts; a real create is the only proof.
    probe = directory / f".preemptd-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointDirError(f"checkpoint dir {directory}: not writable: {exc.strerror}") from None


def remove_stale_temp(directory: Path) -> list[Path]:
    """Remove `.tmp-<pid>` folders whose writer process is gone; return what was removed."""
    removed = []
    for entry in contract.stale_temp_dirs(directory):
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("checkpoint.stale_temp_removed", path=str(entry.path), writer_pid=entry.writer_pid)
        removed.append(entry.path)
    return removed


class EarlyFlusher:
    """Starts the disk flush while the framework is still writing, from a helper thread.

    Every `interval` seconds it fdatasyncs each file that has appeared under `root`,
    so the write to the page cache and the write-back to the disk overlap; the
    fsyncs of the commit then only flush the tail. Only this helper thread waits on
    the disk. It never replaces those fsyncs: it only makes them short.
    """

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._fds: dict[tuple[int, int], int] = {}  # (dev, inode) -> fd
        self._thread = threading.Thread(target=self._run, name="preemptd-flush", daemon=True)

    def __enter__(self) -> EarlyFlusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for dirpath, _dirs, files in os.walk(self._root):
                for name in files:
                    self._flush(os.path.join(dirpath, name))

    def _flush(self, path: str) -> None:
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = os.open(path, os.O_RDONLY)
            os.fdatasync(fd)
        except OSError:
            # The framework renames and removes its own temp files as it goes;
            # anything missed here is fsynced by the commit itself.
            return


def list_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(files, sub-folders) below `root`, relative paths sorted."""
    files: list[Path] = []
    dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirs.extend((base / d).relative_to(root) for d in dirnames)
        files.extend((base / f).relative_to(root) for f in filenames)
    return sorted(files), sorted(dirs)


def fsync_and_checksum(root: Path, files: list[Path], checksums: bool = True) -> dict[str, dict[str, Any]]:
    """fsync every file (and sub-folder) under `root` and describe it for the manifest.

    Runs fsyncs and crc32s in parallel threads; returns {relative path: {size, crc32}}.
    Raises OSError if any flush fails (the checkpoint must then not be committed).
    """
    sizes = {rel: (root / rel).stat().st_size for rel in files}
    with ThreadPoolExecutor(max_workers=min(_MAX_IO_THREADS, 2 * len(files) + 1)) as pool:
        # Biggest first: the longest jobs start earliest.
        order = sorted(files, key=lambda rel: -sizes[rel])
        syncs = [pool.submit(contract.fsync_file, root / rel) for rel in order]
        crcs = {rel: pool.submit(contract.file_crc32, root / rel) for rel in order} if checksums else {}
        for fut in syncs:
            fut.result()
        described: dict[str, dict[str, Any]] = {}
        for rel in files:
            meta: dict[str, Any] = {"size": sizes[rel]}
            if checksums:
                meta[contract.CHECKSUM_ALGORITHM] = crcs[rel].result()
            described[rel.as_posix()] = meta
    return described


def commit(
    temp_dir: Path,
    step: int,
    reason: str,
    *,
    started: float,
    versions: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    checksums: bool = True,
) -> Committed:
    """Make the checkpoint written into `temp_dir` durable and visible as `ckpt-<step>/`.

    `started` is the time.monotonic() at which the save began (for the report).
    On any failure the temp folder is left for the caller to remove and nothing
    named `ckpt-<step>` is created, so a half checkpoint can never be restored.
    """
    parent = temp_dir.parent
    final = parent / contract.checkpoint_dirname(step)
    files, subdirs = list_files(temp_dir)
    if not files:
        raise OSError(f"{temp_dir}: the framework wrote no files")
    described = fsync_and_checksum(temp_dir, files, checksums=checksums)
    manifest = contract.Manifest(
        step=step,
        reason=reason,
        created=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        files=described,
        versions=dict(versions or {}),
        extra=dict(extra or {}),
        seconds=round(time.monotonic() - started, 3),
    )
    manifest_path = temp_dir / contract.MANIFEST_NAME
    _write_manifest(manifest_path, manifest)
    # The manifest's data and the folders' entries are durable before the folder gets
    # its final name; these flushes are independent, so they wait on the disk together.
    with ThreadPoolExecutor(max_workers=2 + len(subdirs)) as pool:
        jobs = [pool.submit(contract.fsync_file, manifest_path), pool.submit(contract.fsync_dir, temp_dir)]
        jobs += [pool.submit(contract.fsync_dir, temp_dir / sub) for sub in subdirs]
        for job in jobs:
            job.result()
    if final.exists():
        # A folder of that step that we are replacing: it did not verify (the caller
        # checks valid ones before writing), so it must not stay in the way.
        shutil.rmtree(final)
    os.rename(temp_dir, final)
    contract.fsync_dir(parent)
    return Committed(path=final, manifest=manifest, seconds=time.monotonic() - started)


def _write_manifest(path: Path, manifest: contract.Manifest) -> None:
    """Create the manifest (the caller fsyncs it, alongside the folder)."""
    payload = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def apply_retention(directory: Path, keep: int, keep_every_hours: float = 0.0) -> list[Path]:
    """Delete committed checkpoints the shared policy no longer keeps; return them.

    Runs only after a new checkpoint has been committed. Sizes are verified (cheap);
    checksums are not, since retention must not re-read gigabytes after each save.
    """
    cands: list[retention.Candidate] = []
    paths: dict[int, Path] = {}
    for entry, result in contract.iter_valid_newest_first(directory, checksums=False):
        valid = isinstance(result, contract.Manifest)
        created = result.created_epoch if isinstance(result, contract.Manifest) else None
        if created is None:
            try:
                created = entry.path.stat().st_mtime
            except OSError:
                continue
        cands.append(retention.Candidate(step=entry.step, created=created, valid=valid))
        paths[entry.step] = entry.path
    deleted = []
    for step in retention.to_delete(cands, keep, keep_every_hours):
        path = paths[step]
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("checkpoint.retention_failed", path=str(path), error=str(exc))
            continue
        deleted.append(path)
        log.info("checkpoint.deleted", path=str(path), step=step, reason="retention")
    if deleted:
        contract.fsync_dir(directory)
    return deleted
