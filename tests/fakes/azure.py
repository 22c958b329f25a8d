"""Fake Azure Instance Metadata Service: Scheduled Events (and the compute name), as documented.

- Every request needs ``Metadata: true`` (else 400) and an ``api-version`` query
  parameter (else 400); ``X-Forwarded-For`` is refused (400).
- ``GET /metadata/scheduledevents`` returns ``{"DocumentIncarnation", "Events"}``;
  the incarnation goes up on every change.
- ``POST /metadata/scheduledevents`` with ``{"StartRequests": [{"EventId"}]}``
  approves events: they become ``Started`` with an empty ``NotBefore``.
- ``GET /metadata/instance/compute/name?format=text`` returns the VM name.

    with FakeAzure() as az:
        eid = az.preempt(in_seconds=30)   # a Preempt event for this VM
        az.remove(eid)                    # the event disappears
        az.acknowledged                   # EventIds approved by POST
"""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from typing import Any

from tests.fakes.base import FakeMetadataServer, Reply, Request

NO_HEADER = {"error": "Bad request. Required metadata header not specified"}
NO_VERSION = {
    "error": "Bad request. api-version was not specified in the request. "
    "For more information refer to aka.ms/azureimds",
    "newest-versions": ["2023-07-01", "2021-12-13", "2021-11-15"],
}
JSON = {"Content-Type": "application/json; charset=utf-8"}


class FakeAzure(FakeMetadataServer):
    def __init__(self, vm_name: str = "trainer-spot-1", port: int = 0) -> None:
        super().__init__(port)
        self.vm_name = vm_name
        self.incarnation = 1
        self.events: list[dict[str, Any]] = []
        self.acknowledged: list[str] = []
        self.preempted_at: float | None = None

    # -------------------------------------------------------------- control

    def add_event(self, event_type: str, in_seconds: float = 30.0, resources: list[str] | None = None,
                  status: str = "Scheduled") -> str:
        eid = str(uuid.uuid4()).upper()
        with self.lock:
            self.events.append({
                "EventId": eid,
                "EventType": event_type,
                "ResourceType": "VirtualMachine",
                "Resources": [self.vm_name] if resources is None else resources,
                "EventStatus": status,
                "NotBefore": email.utils.formatdate(time.time() + in_seconds, usegmt=True)
                if status == "Scheduled" else "",
                "Description": f"{event_type} scheduled by the fake",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            })
            self.incarnation += 1
            self.lock.notify_all()
        return eid

    def preempt(self, in_seconds: float = 30.0) -> str:
        """A spot eviction of this VM."""
        self.preempted_at = time.monotonic()
        return self.add_event("Preempt", in_seconds)

    def remove(self, event_id: str) -> None:
        with self.lock:
            self.events = [e for e in self.events if e["EventId"] != event_id]
            self.incarnation += 1

    # -------------------------------------------------------------- protocol

    def garbage_headers(self, req: Request) -> dict[str, str]:
        return dict(JSON)

    def handle(self, req: Request) -> Reply:
        if req.header("X-Forwarded-For") is not None or req.header("Metadata") != "true":
            return Reply(400, json.dumps(NO_HEADER), JSON)
        if "api-version" not in req.query:
            return Reply(400, json.dumps(NO_VERSION), JSON)
        if req.path == "/metadata/instance/compute/name" and req.method == "GET":
            if req.query.get("format") == "text":
                return Reply(200, self.vm_name, {"Content-Type": "text/plain; charset=utf-8"})
            return Reply(200, json.dumps(self.vm_name), JSON)
        if req.path != "/metadata/scheduledevents":
            return Reply(404, json.dumps({"error": "Not found"}), JSON)
        if req.method == "POST":
            return self._start(req)
        if req.method != "GET":
            return Reply(405, json.dumps({"error": "Method not allowed"}), JSON)
        with self.lock:
            doc = {"DocumentIncarnation": self.incarnation, "Events": [dict(e) for e in self.events]}
        return Reply(200, json.dumps(doc), JSON)

    def _start(self, req: Request) -> Reply:
        try:
            data = json.loads(req.body)
            ids = [r["EventId"] for r in data["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return Reply(400, json.dumps({"error": "Bad request. StartRequests not valid"}), JSON)
        with self.lock:
            for e in self.events:
                if e["EventId"] in ids:
                    e["EventStatus"], e["NotBefore"] = "Started", ""
            self.acknowledged.extend(ids)
            self.incarnation += 1
            self.lock.notify_all()
        return Reply(200, "", JSON)
