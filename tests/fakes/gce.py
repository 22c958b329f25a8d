"""Fake GCE metadata server (computeMetadata/v1), as documented by Google.

- Every request needs ``Metadata-Flavor: Google`` (else 403); a request carrying
  ``X-Forwarded-For`` is refused (403), as the real server does.
- Every answer carries ``Metadata-Flavor: Google`` and an ``ETag`` for the value.
- ``?wait_for_change=true`` blocks until the value changes; with ``last_etag=E``
  it returns at once when the current ETag differs from E; ``timeout_sec=T``
  returns the unchanged value after T seconds.

    with FakeGce() as gce:
        ...  # point preemption.gce_url at gce.url
        gce.preempt()                        # instance/preempted -> TRUE
        gce.set_value("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
"""

from __future__ import annotations

import hashlib
import time

from tests.fakes.base import FakeMetadataServer, Reply, Request

PREFIX = "/computeMetadata/v1/"
FORBIDDEN = (
    "<!DOCTYPE html>\n<html lang=en>\n<title>Error 403 (Forbidden)!!1</title>\n"
    "<p>Your client does not have permission to get URL <code>{path}</code> from this server. "
    "Missing Metadata-Flavor:Google header.\n"
)
MAX_WAIT_SECONDS = 3600.0  # wait_for_change without timeout_sec waits "indefinitely"


class FakeGce(FakeMetadataServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.values: dict[str, str] = {
            "instance/preempted": "FALSE",
            "instance/maintenance-event": "NONE",
            "instance/id": "4520031799277581759",
            "instance/zone": "projects/123456789/zones/europe-west4-a",
        }
        self._generation: dict[str, int] = dict.fromkeys(self.values, 0)
        self.preempted_at: float | None = None  # monotonic time of preempt()

    # -------------------------------------------------------------- control

    def set_value(self, key: str, value: str) -> None:
        with self.lock:
            self.values[key] = value
            self._generation[key] = self._generation.get(key, 0) + 1
            self.lock.notify_all()

    def preempt(self) -> None:
        """The VM is being preempted: instance/preempted becomes TRUE."""
        self.preempted_at = time.monotonic()
        self.set_value("instance/preempted", "TRUE")

    def bump_etag(self, key: str) -> None:
        """A new ETag with the same value (a reply that is not a change)."""
        with self.lock:
            self._generation[key] += 1
            self.lock.notify_all()

    def etag(self, key: str) -> str:
        with self.lock:
            seed = f"{key}\0{self.values[key]}\0{self._generation[key]}".encode()
        return hashlib.sha1(seed).hexdigest()[:16]

    # -------------------------------------------------------------- protocol

    def garbage_headers(self, req: Request) -> dict[str, str]:
        return {"Metadata-Flavor": "Google", "Content-Type": "application/text", "ETag": "0badc0de"}

    def handle(self, req: Request) -> Reply:
        if req.header("X-Forwarded-For") is not None or req.header("Metadata-Flavor") != "Google":
            return Reply(403, FORBIDDEN.format(path=req.path), {"Content-Type": "text/html; charset=UTF-8"})
        if req.method != "GET" or not req.path.startswith(PREFIX):
            return Reply(404, "Not Found\n", {"Content-Type": "text/html"})
        key = req.path[len(PREFIX):].rstrip("/")
        with self.lock:
            if key not in self.values:
                return Reply(404, "Not Found\n", {"Content-Type": "text/html", "Metadata-Flavor": "Google"})
            if req.query.get("wait_for_change") == "true":
                timeout = float(req.query.get("timeout_sec", MAX_WAIT_SECONDS))
                last = req.query.get("last_etag")
                start_generation = self._generation[key]
                end = time.monotonic() + timeout
                while not self.closing and time.monotonic() < end:
                    if last is not None and last != self._etag_locked(key):
                        break
                    if last is None and self._generation[key] != start_generation:
                        break
                    self.lock.wait(end - time.monotonic())
            value, etag = self.values[key], self._etag_locked(key)
        return Reply(200, value, {"Metadata-Flavor": "Google", "Content-Type": "application/text",
                                  "ETag": etag})

    def _etag_locked(self, key: str) -> str:
        seed = f"{key}\0{self.values[key]}\0{self._generation[key]}".encode()
        return hashlib.sha1(seed).hexdigest()[:16]
