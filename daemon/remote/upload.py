"""Upload one committed checkpoint with commit semantics on a store without atomic rename.

Protocol: (1) if the remote folder holds a different manifest for the same step, delete
that manifest first, so the folder stops being a checkpoint before any file changes;
(2) upload every file the local manifest lists, skipping files the journal says already
arrived with the same size and checksum and that the remote lists with that size;
(3) list the folder and check every size; (4) write MANIFEST.json last. A remote folder
without a manifest is a partial upload and is never restored.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import contract
from daemon.remote.journal import Journal
from daemon.remote.limiter import TokenBucket
from daemon.remote.queue import Job
from daemon.remote.store import RemoteStore

log = structlog.get_logger()

CHUNK_BYTES = 1 << 20  # read/throttle granularity of a streamed upload
# Backend part size of a streamed upload: S3's minimum, so a more urgent upload waits for
# at most one small part in flight before it takes over.
BLOCK_BYTES = 5 << 20


class Aborted(Exception):
    """The upload stopped on purpose (daemon stopping, a more urgent checkpoint); not a failure."""


class Permanent(Exception):
    """Retrying cannot help: the local checkpoint is gone or damaged."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class UploadError(Exception):
    """The remote did not end up with what was sent (retried)."""


@dataclass(frozen=True)
class UploadResult:
    step: int
    name: str
    bytes_sent: int
    total_bytes: int
    files_sent: int
    files_skipped: int
    already_committed: bool
    seconds: float


@dataclass
class Transfer:
    """How to move bytes: throttled or not, and how to pause or give way."""

    limiter: TokenBucket | None
    wait: Callable[[float], object]  # sleeps, returning early when interrupted
    should_abort: Callable[[], bool]
    on_progress: Callable[[int, int], None]  # (bytes done of this checkpoint, total)


def upload_checkpoint(store: RemoteStore, job: Job, journal: Journal, transfer: Transfer) -> UploadResult:
    """Upload `job`'s checkpoint; raises Aborted, Permanent, or the backend's error (retry)."""
    started = time.monotonic()
    local = Path(job.path)
    if not local.is_dir():
        raise Permanent(f"{local}: deleted locally before its upload", gone=True)
    try:
        manifest = contract.read_manifest(local)
        manifest_bytes = (local / contract.MANIFEST_NAME).read_bytes()
    except (contract.InvalidCheckpoint, OSError) as exc:
        raise Permanent(str(exc), gone=not local.is_dir()) from None
    name = local.name
    parsed = contract.parse_dirname(name)
    if parsed is None or parsed[1] is not None or parsed[0] != manifest.step:
        raise Permanent(f"{local}: not a committed checkpoint folder of step {manifest.step}")
    total = manifest.total_bytes
    job.total_bytes = total

    remote = store.checkpoint(name)
    if remote is not None and remote.committed:
        intact = all(remote.files.get(rel) == meta["size"] for rel, meta in manifest.files.items())
        if intact and store.read_bytes(name, contract.MANIFEST_NAME) == manifest_bytes:
            transfer.on_progress(total, total)
            return UploadResult(manifest.step, name, 0, total, 0, len(manifest.files), True,
                                time.monotonic() - started)
        # Same step, other content (training went back and came here again) or a file
        # lost remotely: un-commit before touching a file, so no reader ever sees a mix.
        store.uncommit(name)

    sent_before = journal.sent_files(manifest.step)
    done = sent = files_sent = files_skipped = 0
    # Small files first: the count of finished files (the resume unit) grows fastest.
    for rel, meta in sorted(manifest.files.items(), key=lambda kv: (kv[1]["size"], kv[0])):
        if transfer.should_abort():
            raise Aborted()
        size = int(meta["size"])
        crc = meta.get(contract.CHECKSUM_ALGORITHM)
        remote_size = remote.files.get(rel) if remote is not None else None
        if sent_before.get(rel) == {"size": size, "crc32": crc} and remote_size == size:
            files_skipped += 1
            done += size
            transfer.on_progress(done, total)
            continue
        base = done

        def progress(n: int, base: int = base) -> None:
            transfer.on_progress(base + n, total)

        if transfer.limiter is not None:
            _stream_file(store, local / rel, name, rel, size, crc, transfer, progress)
        else:
            _check_size(local / rel, size)
            store.put_file(local / rel, name, rel, progress)
        journal.file_sent(manifest.step, rel, size, crc)
        done += size
        sent += size
        files_sent += 1
        transfer.on_progress(done, total)

    after = store.checkpoint(name)
    listed = after.files if after is not None else {}
    for rel, meta in manifest.files.items():
        if listed.get(rel) != meta["size"]:
            raise UploadError(
                f"{store.where(name)}/{rel}: remote lists {listed.get(rel)} bytes, expected {meta['size']}"
            )
    if transfer.should_abort():
        raise Aborted()
    store.write_bytes(name, contract.MANIFEST_NAME, manifest_bytes)  # the commit point
    return UploadResult(manifest.step, name, sent, total, files_sent, files_skipped, False,
                        time.monotonic() - started)


def _check_size(path: Path, size: int) -> None:
    try:
        actual = path.stat().st_size
    except OSError as exc:
        raise Permanent(f"{path}: unreadable: {exc.strerror or exc}", gone=True) from None
    if actual != size:
        raise Permanent(f"{path}: size {actual}, manifest says {size} (local checkpoint damaged)")


def _stream_file(store: RemoteStore, path: Path, name: str, rel: str, size: int, crc: int | None,
                 transfer: Transfer, progress: Callable[[int], None]) -> None:
    """Throttled upload of one file, checking its checksum on the way."""
    assert transfer.limiter is not None
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally, after the writer
    except OSError as exc:
        raise Permanent(f"{path}: unreadable: {exc.strerror or exc}", gone=True) from None
    writer = store.open_writer(name, rel, BLOCK_BYTES)
    committed = False
    try:
        running = 0
        n = 0
        while True:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                break
            delay = transfer.limiter.reserve(len(chunk))
            if delay > 0:
                transfer.wait(delay)
            if transfer.should_abort():
                raise Aborted()
            writer.write(chunk)
            running = zlib.crc32(chunk, running)
            n += len(chunk)
            progress(n)
        if n != size:
            raise Permanent(f"{path}: size {n}, manifest says {size} (local checkpoint damaged)")
        if crc is not None and running != crc:
            raise Permanent(f"{path}: checksum does not match the manifest (local checkpoint damaged)")
        writer.close()  # completes the object (e.g. S3 CompleteMultipartUpload)
        committed = True
    finally:
        f.close()
        if not committed:
            _abandon(writer, store.where(name) + "/" + rel, store.scrub)


def _abandon(writer: Any, where: str, scrub: Callable[[str], str]) -> None:
    """Throw away a half-written remote file without completing it."""
    try:
        writer.discard()  # e.g. S3: AbortMultipartUpload
    except (AttributeError, RuntimeError):
        # No discard (or a local file written in place): the partial file stays; it is
        # harmless, since no manifest is written and the next attempt overwrites it.
        try:
            writer.close()
        except OSError as exc:
            log.warning("remote.discard_failed", path=where, error=scrub(str(exc)))
    except Exception as exc:  # noqa: BLE001 - any SDK error (server gone); the upload's own error goes on
        log.warning("remote.discard_failed", path=where, error=scrub(str(exc)))
    finally:
        # Never let garbage collection "close" (complete) it later, whatever happened above.
        with contextlib.suppress(AttributeError):
            writer.closed = True
