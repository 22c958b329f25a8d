"""What the supervisor and the worker agree on: env names, messages, checkpoint layout.

This module is imported by both packages (`daemon` and `service`), so it imports the
standard library only. Anything that changes here changes the wire/disk contract
documented in docs/DESIGN.md.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- env

ENV_CHECKPOINT_DIR = "PREEMPTD_CHECKPOINT_DIR"
ENV_RESUME = "PREEMPTD_RESUME"
ENV_RESTART = "PREEMPTD_RESTART"
ENV_SOCKET = "PREEMPTD_SOCKET"
ENV_GRACE_SECONDS = "PREEMPTD_GRACE_SECONDS"
ENV_EVERY_STEPS = "PREEMPTD_EVERY_STEPS"
ENV_EVERY_SECONDS = "PREEMPTD_EVERY_SECONDS"
ENV_KEEP = "PREEMPTD_KEEP"
ENV_KEEP_EVERY_HOURS = "PREEMPTD_KEEP_EVERY_HOURS"
# JSON file the daemon rewrites atomically to steer the worker (see ControlFile).
ENV_CONTROL = "PREEMPTD_CONTROL"
# The daemon's log format (json | console | auto), so a worker's lines match the
# daemon's in the journal (one JSON object per line under systemd).
ENV_LOG_FORMAT = "PREEMPTD_LOG_FORMAT"

# ---------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_USAGE = 64  # EX_USAGE
EXIT_GAVE_UP = 70  # restart budget exhausted (EX_SOFTWARE)
EXIT_UNCONFIRMED = 75  # stopped without a confirmed final checkpoint (EX_TEMPFAIL)
EXIT_CONFIG = 78  # EX_CONFIG


class Reason(str, enum.Enum):
    """Why a checkpoint was written."""

    PERIODIC = "periodic"
    REQUESTED = "requested"
    PREEMPTION = "preemption"
    FINAL = "final"


# ------------------------------------------------------------------ messages
#
# One JSON object per datagram, worker -> daemon. Every message has "type" and "pid".
#   hello       {"type": "hello", "pid", "handles": ["SIGUSR1", "SIGTERM"], "framework": "tensorflow 2.x"}
#   progress    {"type": "progress", "pid", "step"}                      (heartbeat)
#   checkpoint  {"type": "checkpoint", "pid", "step", "path", "bytes", "seconds", "reason"}
#   checkpoint_failed {"type": "checkpoint_failed", "pid", "step", "reason", "error"}
#   export      {"type": "export", "pid", "step", "path", "bytes", "seconds"}   (SavedModel)

MAX_MESSAGE_BYTES = 4096
MSG_HELLO = "hello"
MSG_PROGRESS = "progress"
MSG_CHECKPOINT = "checkpoint"
MSG_CHECKPOINT_FAILED = "checkpoint_failed"
MSG_EXPORT = "export"
MESSAGE_TYPES = frozenset(
    {MSG_HELLO, MSG_PROGRESS, MSG_CHECKPOINT, MSG_CHECKPOINT_FAILED, MSG_EXPORT}
)


class BadMessage(ValueError):
    """A datagram that is not a valid worker message."""


def encode_message(msg_type: str, **fields: Any) -> bytes:
    """Serialise one worker message; raises BadMessage if it would not fit a datagram."""
    data = json.dumps({"type": msg_type, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _int_field(msg: Mapping[str, Any], key: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadMessage(f"field {key!r} must be a non-negative integer")
    return value


def decode_message(data: bytes) -> dict[str, Any]:
    """Parse and validate one datagram. Raises BadMessage for anything malformed.

    Validation is strict so that garbage never counts as progress.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"oversized datagram ({len(data)} bytes)")
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadMessage("not a JSON object")
    msg_type = msg.get("type")
    if msg_type not in MESSAGE_TYPES:
        raise BadMessage(f"unknown message type {msg_type!r}")
    if "pid" in msg:
        _int_field(msg, "pid")
    if msg_type in (MSG_PROGRESS, MSG_CHECKPOINT, MSG_CHECKPOINT_FAILED, MSG_EXPORT):
        _int_field(msg, "step")
    if msg_type in (MSG_CHECKPOINT, MSG_EXPORT):
        if not isinstance(msg.get("path"), str) or not msg["path"]:
            raise BadMessage("field 'path' must be a non-empty string")
        _int_field(msg, "bytes")
        seconds = msg.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise BadMessage("field 'seconds' must be a non-negative number")
    if msg_type in (MSG_CHECKPOINT, MSG_CHECKPOINT_FAILED):
        try:
            Reason(msg.get("reason"))
        except ValueError:
            raise BadMessage(f"unknown reason {msg.get('reason')!r}") from None
    if msg_type == MSG_HELLO:
        handles = msg.get("handles", [])
        if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
            raise BadMessage("field 'handles' must be a list of strings")
    return msg


# -------------------------------------------------------------- control file
#
# The daemon tells the worker things that are not requests (those are signals) by
# rewriting a small JSON file atomically; the worker reads it only when it is about
# to make a decision (e.g. a periodic save is due), so it costs nothing per step.
#   {"skip_periodic": bool, "reason": str}


def read_control(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read the control file; a missing or unreadable file means 'no instructions'."""
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_MESSAGE_BYTES))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write JSON to `path` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(payload)
            while view:  # a short write means the disk is full: raise, do not truncate
                n = os.write(fd, view)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # no half-written temp left behind (e.g. ENOSPC)
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file's data and metadata by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------- checkpoint layout

CHECKPOINT_PREFIX = "ckpt-"
STEP_DIGITS = 12
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
CHECKSUM_ALGORITHM = "crc32"  # integrity, not security; zlib's is fast and stdlib
SAVEDMODEL_DIR = "savedmodel"

_NAME_RE = re.compile(r"^ckpt-(\d{" + str(STEP_DIGITS) + r"})(?:\.tmp-(\d+))?$")


def checkpoint_dirname(step: int) -> str:
    """Final folder name of the checkpoint of `step`."""
    return f"{CHECKPOINT_PREFIX}{step:0{STEP_DIGITS}d}"


def temp_dirname(step: int, pid: int | None = None) -> str:
    """Folder name a writer uses while the checkpoint of `step` is being written."""
    return f"{checkpoint_dirname(step)}.tmp-{os.getpid() if pid is None else pid}"


@dataclass(frozen=True)
class Entry:
    """One folder in the checkpoint dir that follows the layout."""

    path: Path
    step: int
    writer_pid: int | None  # set for a `.tmp-<pid>` folder being (or once) written

    @property
    def is_temp(self) -> bool:
        return self.writer_pid is not None


def parse_dirname(name: str) -> tuple[int, int | None] | None:
    """(step, writer pid or None) for a layout name, None for anything else."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def scan(directory: str | os.PathLike[str]) -> list[Entry]:
    """Every layout folder in `directory` (committed and temp), oldest step first.

    Files and folders that do not follow the layout are not returned (and must never
    be touched by preemptd). A missing directory yields an empty list.
    """
    entries: list[Entry] = []
    try:
        it = os.scandir(directory)
    except FileNotFoundError:
        return []
    with it:
        for de in it:
            parsed = parse_dirname(de.name)
            if parsed is None or not de.is_dir(follow_symlinks=False):
                continue
            entries.append(Entry(Path(de.path), parsed[0], parsed[1]))
    entries.sort(key=lambda e: (e.step, e.writer_pid is not None))
    return entries


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (in our pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Manifest:
    """Parsed MANIFEST.json of a committed checkpoint."""

    step: int
    reason: str
    created: str
    files: dict[str, dict[str, Any]]  # relative path -> {"size": int, "crc32": int}
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # How long the save took (request -> files durable); lets the daemon judge at start
    # whether a save fits the provider's warning window. None for older manifests.
    seconds: float | None = None

    @property
    def created_epoch(self) -> float | None:
        """`created` (ISO 8601) as epoch seconds, None when unparsable."""
        from datetime import datetime

        try:
            return datetime.fromisoformat(self.created.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "step": self.step,
            "reason": self.reason,
            "created": self.created,
            "checksum": CHECKSUM_ALGORITHM,
            "versions": self.versions,
            "seconds": self.seconds,
            "files": self.files,
            "extra": self.extra,
        }


class InvalidCheckpoint(Exception):
    """A folder that is not a valid committed checkpoint; the message says why."""


def read_manifest(ckpt_dir: str | os.PathLike[str]) -> Manifest:
    """Parse the manifest of `ckpt_dir`; InvalidCheckpoint if missing or malformed."""
    mpath = Path(ckpt_dir) / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise InvalidCheckpoint(f"{mpath}: no manifest") from None
    except OSError as exc:
        raise InvalidCheckpoint(f"{mpath}: unreadable manifest: {exc}") from None
    try:
        data = json.loads(raw)
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
        for rel, meta in files.items():
            if os.path.isabs(rel) or ".." in Path(rel).parts:
                raise ValueError(f"unsafe file name {rel!r}")
            if not isinstance(meta.get("size"), int) or meta["size"] < 0:
                raise ValueError(f"bad size for {rel!r}")
        step = data["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("bad step")
        seconds = data.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float | None):
            raise ValueError("bad seconds")
        return Manifest(
            step=step,
            reason=str(data.get("reason", "")),
            created=str(data.get("created", "")),
            files=files,
            versions=dict(data.get("versions") or {}),
            extra=dict(data.get("extra") or {}),
            seconds=None if seconds is None else float(seconds),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidCheckpoint(f"{mpath}: malformed manifest: {exc}") from None


def file_crc32(path: str | os.PathLike[str], chunk: int = 4 << 20) -> int:
    """CRC-32 of a file's content (zlib releases the GIL, so threads parallelise).

    Big files are read by a helper thread while this one checksums the previous
    chunk, so a cold read costs about the read alone instead of read + crc.
    """
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size <= 2 * chunk:
            crc = 0
            buf = bytearray(chunk)
            view = memoryview(buf)
            while n := f.readinto(buf):
                crc = zlib.crc32(view[:n], crc)
            return crc
        return _pipelined_crc32(f, chunk)


def _pipelined_crc32(f: Any, chunk: int) -> int:
    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | OSError] = queue.Queue()
    for _ in range(3):
        free.put(bytearray(chunk))

    def read() -> None:
        try:
            while True:
                buf = free.get()
                n = f.readinto(buf)
                full.put((buf, n))
                if not n:
                    return
        except OSError as exc:  # handed to the checksumming thread, which raises it
            full.put(exc)

    reader = threading.Thread(target=read, name="crc32-read", daemon=True)
    reader.start()
    crc = 0
    while True:
        item = full.get()
        if isinstance(item, OSError):
            raise item
        buf, n = item
        if not n:
            break
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        free.put(buf)
    reader.join()
    return crc


def verify(ckpt_dir: str | os.PathLike[str], checksums: bool = True) -> Manifest:
    """Check a committed checkpoint against its manifest; InvalidCheckpoint says why.

    Sizes are always checked; content checksums when `checksums` is true.
    """
    ckpt_dir = Path(ckpt_dir)
    parsed = parse_dirname(ckpt_dir.name)
    if parsed is None or parsed[1] is not None:
        raise InvalidCheckpoint(f"{ckpt_dir}: not a committed checkpoint folder name")
    manifest = read_manifest(ckpt_dir)
    if manifest.step != parsed[0]:
        raise InvalidCheckpoint(
            f"{ckpt_dir}: manifest says step {manifest.step}, folder says {parsed[0]}"
        )
    for rel, meta in manifest.files.items():
        fpath = ckpt_dir / rel
        try:
            size = fpath.stat().st_size
        except OSError:
            raise InvalidCheckpoint(f"{fpath}: listed in the manifest but missing") from None
        if size != meta["size"]:
            raise InvalidCheckpoint(f"{fpath}: size {size}, manifest says {meta['size']}")
        if checksums and CHECKSUM_ALGORITHM in meta and file_crc32(fpath) != meta[CHECKSUM_ALGORITHM]:
            raise InvalidCheckpoint(f"{fpath}: checksum does not match the manifest")
    return manifest


def committed(directory: str | os.PathLike[str]) -> list[Entry]:
    """Committed-name folders (not necessarily valid), oldest first."""
    return [e for e in scan(directory) if not e.is_temp]


def iter_valid_newest_first(
    directory: str | os.PathLike[str], checksums: bool = True
) -> Iterator[tuple[Entry, Manifest | InvalidCheckpoint]]:
    """Committed folders newest first, each with its Manifest or the reason it is invalid."""
    for entry in reversed(committed(directory)):
        try:
            yield entry, verify(entry.path, checksums=checksums)
        except InvalidCheckpoint as exc:
            yield entry, exc


def newest_valid(
    directory: str | os.PathLike[str], checksums: bool = True
) -> tuple[Entry, Manifest] | None:
    """The newest checkpoint that verifies, or None."""
    for entry, result in iter_valid_newest_first(directory, checksums=checksums):
        if isinstance(result, Manifest):
            return entry, result
    return None


def stale_temp_dirs(directory: str | os.PathLike[str]) -> list[Entry]:
    """`.tmp-<pid>` folders whose writer is gone (safe to remove)."""
    return [e for e in scan(directory) if e.writer_pid is not None and not pid_alive(e.writer_pid)]
