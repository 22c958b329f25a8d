"""Azure: Scheduled Events from the Instance Metadata Service.

Protocol: ``GET /metadata/scheduledevents?api-version=2020-07-01`` with header
``Metadata: true`` (without it: 400) returns
``{"DocumentIncarnation": n, "Events": [{"EventId", "EventType", "ResourceType",
"Resources": [vm names], "EventStatus": "Scheduled"|"Started", "NotBefore": RFC 1123
date or "", ...}]}``. ``POST`` to the same URL with ``{"StartRequests": [{"EventId":
id}]}`` approves an event so that it may start before NotBefore.

Decisions, for events whose Resources name this VM (its IMDS compute name):

- ``Preempt`` (spot eviction, ~30 s) or ``Terminate`` -> STOP, deadline = NotBefore
  (now when the event has already started).
- ``Reboot`` / ``Redeploy`` -> CHECKPOINT: memory is lost but the disk survives and
  systemd starts preemptd again; a fresh save keeps the lost work small.
- ``Freeze`` and unknown types -> logged only.
- A STOP event that disappears before we approved it -> CANCELLED (false alarm).
- Approval: once the stop path has ended (`on_final_checkpoint`, with or without a
  confirmed checkpoint, since the worker is gone either way) the events acted upon
  are approved, so Azure need not hold the VM until NotBefore for nothing.
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.clock import Clock
from daemon.components import CheckpointReport, NoticeKind
from daemon.notices.base import NoticeSource, Watcher
from daemon.notices.http import HttpClient, MetadataError, Response

log = structlog.get_logger()

API_VERSION = "2020-07-01"
EVENTS_PATH = f"/metadata/scheduledevents?api-version={API_VERSION}"
NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
REQUEST_HEADERS = {"Metadata": "true"}
STOP_TYPES = frozenset({"Preempt", "Terminate"})
CHECKPOINT_TYPES = frozenset({"Reboot", "Redeploy"})
ACK_WAIT_SECONDS = 1.0  # how long stop() lets a pending approval finish


@dataclass(frozen=True)
class Event:
    """One scheduled event."""

    event_id: str
    event_type: str
    resources: tuple[str, ...]
    status: str
    not_before_wall: float | None  # None when NotBefore is empty (event started)


@dataclass(frozen=True)
class Document:
    """One scheduled-events document."""

    incarnation: int
    events: tuple[Event, ...]


def parse_not_before(value: Any) -> float | None:
    """RFC 1123 date (``Mon, 19 Sep 2016 18:29:47 GMT``) as epoch; None for ''."""
    if value == "" or value is None:
        return None
    if not isinstance(value, str):
        raise MetadataError("garbage", f"NotBefore is not a string: {value!r:.80}")
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        raise MetadataError("garbage", f"unparsable NotBefore {value[:80]!r}") from None


def parse_document(resp: Response) -> Document:
    """A well-formed scheduled-events document, or MetadataError (never a guess)."""
    if resp.status != 200:
        raise MetadataError("bad_status", f"scheduledevents: HTTP {resp.status}: {resp.body[:120]!r}")
    try:
        data = json.loads(resp.text())
    except ValueError:
        raise MetadataError("garbage", f"scheduledevents: not JSON: {resp.body[:80]!r}") from None
    if not isinstance(data, dict):
        raise MetadataError("garbage", "scheduledevents: not a JSON object")
    incarnation = data.get("DocumentIncarnation")
    raw_events = data.get("Events")
    if isinstance(incarnation, bool) or not isinstance(incarnation, int) or not isinstance(raw_events, list):
        raise MetadataError("garbage", "scheduledevents: missing DocumentIncarnation or Events")
    events = []
    for raw in raw_events:
        if not isinstance(raw, dict):
            raise MetadataError("garbage", "scheduledevents: an event is not an object")
        eid, etype, resources = raw.get("EventId"), raw.get("EventType"), raw.get("Resources", [])
        if not isinstance(eid, str) or not eid or not isinstance(etype, str):
            raise MetadataError("garbage", "scheduledevents: event without EventId or EventType")
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise MetadataError("garbage", f"scheduledevents: event {eid[:40]}: Resources is not a list")
        events.append(Event(eid, etype, tuple(resources), str(raw.get("EventStatus", "")),
                            parse_not_before(raw.get("NotBefore"))))
    return Document(incarnation, tuple(events))


def concerns(event: Event, vm_name: str) -> bool:
    """Whether the event names this VM (names compare case-insensitively)."""
    name = vm_name.lower()
    return any(r.lower() == name for r in event.resources)


class AzureSource(NoticeSource):
    """Spot eviction / termination notices from Azure Scheduled Events."""

    provider = "azure"

    def __init__(
        self,
        clock: Clock,
        url: str,
        *,
        poll_seconds: float = 1.0,
        request_timeout: float = 2.0,
        grace_seconds: float | None = None,
    ) -> None:
        # At the default 1 s poll backoff tops out at 5 s, well inside a 30 s eviction notice.
        super().__init__(clock, detect_seconds=poll_seconds + request_timeout, backoff_initial=poll_seconds,
                         backoff_max=5 * poll_seconds, grace_seconds=grace_seconds)
        self._client = HttpClient(url, request_timeout)
        self._poll = poll_seconds
        self.vm_name: str | None = None
        self._name_fallback_logged = False
        self._incarnation: int | None = None
        self._acted: dict[str, Event] = {}  # STOP posted, not yet approved
        self._checkpointed: set[str] = set()
        self._ignored: set[str] = set()
        self._acked: set[str] = set()
        self._ack_wanted = threading.Event()
        self._ack_done = threading.Event()

    def watchers(self) -> dict[str, Watcher]:
        return {"scheduledevents": self._step}

    def clients(self) -> list[HttpClient]:
        return [self._client]

    # -------------------------------------------------------------- hooks

    def on_final_checkpoint(self, report: CheckpointReport | None) -> None:
        """The stop path ended: approve the events acted upon (on the source's thread)."""
        if self._acted:
            self._ack_done.clear()
            self._ack_wanted.set()
            self._wake.set()

    def stop(self) -> None:
        """Give a pending approval a moment to go out, then stop polling."""
        if self._ack_wanted.is_set():
            self._ack_done.wait(ACK_WAIT_SECONDS)
        super().stop()

    # -------------------------------------------------------------- observe

    def _step(self) -> float:
        if self._ack_wanted.is_set():
            self._acknowledge()
        name = self._vm_name()
        self.decide(parse_document(self._client.request("GET", EVENTS_PATH, REQUEST_HEADERS)), name)
        return self._poll

    def _vm_name(self) -> str:
        if self.vm_name is not None:
            return self.vm_name
        try:
            resp = self._client.request("GET", NAME_PATH, REQUEST_HEADERS)
            if resp.status == 200 and resp.text().strip():
                self.vm_name = resp.text().strip()
                return self.vm_name
            problem = f"HTTP {resp.status}"
        except MetadataError as exc:
            problem = f"{exc.kind}: {exc}"
        # Azure names the host after the VM by default; retried on the next poll.
        if not self._name_fallback_logged:
            self._name_fallback_logged = True
            log.warning("preemption.source_error", source="azure", watcher="compute-name", kind="name",
                        error=problem, note="using the host name to match event Resources meanwhile")
        return socket.gethostname()

    def _acknowledge(self) -> None:
        pending = [eid for eid, ev in self._acted.items()
                   if eid not in self._acked and ev.status != "Started"]
        if pending:
            body = json.dumps({"StartRequests": [{"EventId": eid} for eid in pending]}).encode()
            resp = self._client.request(
                "POST", EVENTS_PATH, {**REQUEST_HEADERS, "Content-Type": "application/json"}, body
            )
            if resp.status != 200:
                raise MetadataError("bad_status", f"approving events: HTTP {resp.status}")
            self._acked.update(pending)
            log.info("preemption.acknowledged", source="azure", events=pending)
        self._ack_wanted.clear()
        self._ack_done.set()

    # -------------------------------------------------------------- decide

    def decide(self, doc: Document, vm_name: str) -> None:
        """Turn one document into notices (each event acted on at most once)."""
        if doc.incarnation != self._incarnation:
            self._incarnation = doc.incarnation
            log.debug("preemption.document", source="azure", incarnation=doc.incarnation,
                      events=len(doc.events))
        present = set()
        for ev in doc.events:
            present.add(ev.event_id)
            if not concerns(ev, vm_name):
                continue
            details = {"event_id": ev.event_id, "event_type": ev.event_type, "event_status": ev.status,
                       "incarnation": doc.incarnation}
            if ev.event_type in STOP_TYPES:
                if ev.event_id not in self._acted and ev.event_id not in self._acked:
                    self._acted[ev.event_id] = ev
                    deadline = ev.not_before_wall if ev.not_before_wall is not None else self._clock.wall()
                    self.emit(NoticeKind.STOP, deadline, details)
                elif ev.event_id in self._acted:
                    self._acted[ev.event_id] = ev  # keep its status current (Scheduled -> Started)
            elif ev.event_type in CHECKPOINT_TYPES:
                if ev.event_id not in self._checkpointed:
                    self._checkpointed.add(ev.event_id)
                    self.emit(NoticeKind.CHECKPOINT, ev.not_before_wall, details)
            elif ev.event_id not in self._ignored:
                self._ignored.add(ev.event_id)
                log.info("preemption.event_ignored", source="azure", **details,
                         note="this event does not end the VM")
        for eid in [e for e in self._acted if e not in present]:
            gone = self._acted.pop(eid)
            if eid not in self._acked:
                self.emit(NoticeKind.CANCELLED, None, {"event_id": eid, "event_type": gone.event_type,
                                                       "reason": "event withdrawn before it started"})
