"""The resume journal: pending uploads and the files each has already sent.

A JSON file in the daemon's state dir, rewritten atomically after every file, so a
restarted daemon re-queues unfinished uploads and skips the files that already reached
the remote (resume is per file: a file cut off mid-way is sent again). It records the
remote URL without credentials; a journal written for another URL is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

JOURNAL_NAME = "remote-journal.json"
JOURNAL_FORMAT = 1


class Journal:
    """Pending uploads by step; `path=None` keeps it in memory only."""

    def __init__(self, path: Path | None, url: str) -> None:
        self.path = path
        self.url = url
        self._jobs: dict[str, dict[str, Any]] = {}
        self._broken = False  # log a failing disk once, not per file

    def load(self) -> list[dict[str, Any]]:
        """Read the journal; the pending jobs it lists (each: step, path, reason, files)."""
        if self.path is None:
            return []
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("remote.journal_unreadable", path=str(self.path), error=str(exc))
            return []
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
            log.warning("remote.journal_unreadable", path=str(self.path), error="unknown format")
            return []
        if data.get("url") != self.url:
            return []  # another remote: its progress means nothing here
        jobs = data.get("jobs")
        if not isinstance(jobs, dict):
            return []
        for key, job in jobs.items():
            if (
                isinstance(job, dict)
                and isinstance(job.get("step"), int)
                and isinstance(job.get("path"), str)
                and isinstance(job.get("reason"), str)
                and isinstance(job.get("files", {}), dict)
            ):
                self._jobs[key] = {
                    "step": job["step"],
                    "path": job["path"],
                    "reason": job["reason"],
                    "files": dict(job.get("files", {})),
                }
        return [dict(j) for j in self._jobs.values()]

    def add(self, step: int, path: str, reason: str) -> None:
        """Record a queued upload (keeps files already sent for the same step and folder)."""
        old = self._jobs.get(str(step))
        files = old["files"] if old and old["path"] == path else {}
        self._jobs[str(step)] = {"step": step, "path": path, "reason": reason, "files": files}
        self._save()

    def file_sent(self, step: int, rel: str, size: int, crc: int | None) -> None:
        """Record that `rel` of `step` reached the remote with this size and checksum."""
        job = self._jobs.get(str(step))
        if job is None:
            return
        job["files"][rel] = {"size": size, "crc32": crc}
        self._save()

    def sent_files(self, step: int) -> dict[str, dict[str, Any]]:
        """Files of `step` that reached the remote in an earlier attempt or daemon run."""
        job = self._jobs.get(str(step))
        return dict(job["files"]) if job else {}

    def remove(self, step: int) -> None:
        """The upload of `step` is finished (committed, dropped or given up)."""
        if self._jobs.pop(str(step), None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic_no_fsync(self.path, {"format": JOURNAL_FORMAT, "url": self.url, "jobs": self._jobs})
            self._broken = False
        except OSError as exc:
            # Resume after a restart is lost, uploads themselves go on: warn once.
            if not self._broken:
                log.warning("remote.journal_failed", path=str(self.path), error=str(exc))
            self._broken = True


def _write_atomic_no_fsync(path: Path, data: dict[str, Any]) -> None:
    """Temp file + rename: whole or absent after a daemon crash, without paying for fsync.

    No fsync on purpose: the journal matters only when the same disk outlives the daemon
    (a restart); after a power cut it may lag by a few files, which costs a re-upload of
    those files, never a wrong commit (the remote listing is checked as well).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)
