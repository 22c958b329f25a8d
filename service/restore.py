"""Choose the checkpoint to resume from and read it into the user's objects.

Order: PREEMPTD_RESUME when it verifies, then every committed checkpoint newest
first. A candidate that does not verify (manifest missing, truncated or lying,
file damaged) or that TF cannot read is skipped with a log line saying why; a
checkpoint that reads but does not fit the model raises CheckpointMismatch, since
an older checkpoint of the same run would not fit either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon import contract
from service.errors import CheckpointMismatch

log = structlog.get_logger()

# Name of the TF checkpoint inside a checkpoint folder (`ckpt.index`, `ckpt.data-*`).
FILE_PREFIX = "ckpt"


@dataclass(frozen=True)
class Restored:
    """The checkpoint that was read."""

    path: Path
    manifest: contract.Manifest
    seconds: float


class Unreadable(Exception):
    """The framework could not read a checkpoint that verified (e.g. damage without checksums)."""


def candidates(
    directory: Path, resume_hint: str, checksums: bool
) -> Iterator[tuple[Path, contract.Manifest]]:
    """Valid checkpoints in the order they should be tried; logs every skipped one."""
    tried: set[Path] = set()
    if resume_hint:
        hint = Path(resume_hint)
        try:
            manifest = contract.verify(hint, checksums=checksums)
        except contract.InvalidCheckpoint as exc:
            log.warning("checkpoint.skipped", path=str(hint), why=str(exc), source=contract.ENV_RESUME)
        else:
            tried.add(hint.resolve())
            yield hint, manifest
    for entry, result in contract.iter_valid_newest_first(directory, checksums=checksums):
        if entry.path.resolve() in tried:
            continue
        if isinstance(result, contract.InvalidCheckpoint):
            log.warning("checkpoint.skipped", path=str(entry.path), step=entry.step, why=str(result))
            continue
        yield entry.path, result


def restore_newest(
    directory: Path,
    read: Callable[[str], None],
    *,
    resume_hint: str = "",
    checksums: bool = True,
) -> Restored | None:
    """Read the newest usable checkpoint with `read(file_prefix)`; None when there is none.

    `read` raises Unreadable for a damaged checkpoint (try the next one) and
    CheckpointMismatch when the objects do not fit (stop: it is the program, not the file).
    """
    for path, manifest in candidates(directory, resume_hint, checksums):
        started = time.monotonic()
        try:
            read(str(path / FILE_PREFIX))
        except Unreadable as exc:
            log.warning("checkpoint.skipped", path=str(path), step=manifest.step, why=str(exc))
            continue
        except CheckpointMismatch as exc:
            raise CheckpointMismatch(f"cannot restore {path}: {exc}") from None
        return Restored(path=path, manifest=manifest, seconds=time.monotonic() - started)
    return None
