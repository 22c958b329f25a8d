"""Google Compute Engine: long-poll `instance/preempted` and `instance/maintenance-event`.

Protocol (metadata server, `Metadata-Flavor: Google` on every request and answer):
a plain GET returns the value and an `ETag`; ``?wait_for_change=true&last_etag=E
&timeout_sec=T`` returns at once if the value's ETag is no longer E, else when it
changes, else after T seconds with the unchanged value. A reply is therefore not a
change: the body is compared with the last one.

- `preempted` becomes ``TRUE`` when the spot/preemptible VM is being stopped (about
  30 s before it is gone) -> STOP notice, deadline = now + 30 s.
- `maintenance-event` ``TERMINATE_ON_HOST_MAINTENANCE`` -> STOP notice (deadline not
  given by the server); ``MIGRATE_ON_HOST_MAINTENANCE`` -> logged only (live
  migration keeps the VM and its processes).
- A value going back (``FALSE`` / ``NONE``) after a notice -> CANCELLED.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import structlog

from daemon.clock import Clock
from daemon.components import NoticeKind
from daemon.notices.base import NoticeSource, Watcher
from daemon.notices.deadline import WINDOW_SECONDS
from daemon.notices.http import HttpClient, MetadataError, Response

log = structlog.get_logger()

PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
REQUEST_HEADERS = {"Metadata-Flavor": "Google"}
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
# A long poll that returns at once without a change (a misbehaving server) must not
# turn into a busy loop.
MIN_REPOLL_SECONDS = 1.0


def read_value(resp: Response) -> tuple[str, str | None]:
    """(value, ETag) of a metadata answer; MetadataError for anything but a real answer."""
    if resp.status != 200:
        raise MetadataError("bad_status", f"HTTP {resp.status}: {resp.body[:120]!r}")
    if resp.headers.get("metadata-flavor") != "Google":
        # The real server always says who it is; anything else is a proxy or a captive page.
        raise MetadataError("garbage", "answer without 'Metadata-Flavor: Google' (not the metadata server)")
    return resp.text().strip(), resp.headers.get("etag") or None


def parse_preempted(value: str) -> bool:
    """`TRUE` / `FALSE`; anything else is garbage (never a notice)."""
    if value == "TRUE":
        return True
    if value == "FALSE":
        return False
    raise MetadataError("garbage", f"instance/preempted is neither TRUE nor FALSE: {value[:80]!r}")


def parse_maintenance(value: str) -> str:
    """One of MAINTENANCE_VALUES; anything else is garbage (never a notice)."""
    if value not in MAINTENANCE_VALUES:
        raise MetadataError("garbage", f"instance/maintenance-event has unknown value {value[:80]!r}")
    return value


class _KeyWatch:
    """Long-polls one metadata key and calls `on_value(old, new)` when its body changes."""

    def __init__(
        self,
        client: HttpClient,
        path: str,
        parse: Callable[[str], Any],
        on_value: Callable[[Any, Any], None],
        long_poll_seconds: float,
        request_timeout: float,
        monotonic: Callable[[], float],
    ) -> None:
        self._client = client
        self._path = path
        self._parse = parse
        self._on_value = on_value
        self._long_poll = long_poll_seconds
        self._request_timeout = request_timeout
        self._monotonic = monotonic
        self._etag: str | None = None
        self._value: Any = None
        self._known = False

    def step(self) -> float:
        began = self._monotonic()
        if self._etag is None:
            resp = self._client.request("GET", self._path, REQUEST_HEADERS, timeout=self._request_timeout)
        else:
            timeout_sec = max(1, round(self._long_poll))  # the server takes whole seconds
            query = urllib.parse.urlencode(
                {"wait_for_change": "true", "last_etag": self._etag, "timeout_sec": timeout_sec}
            )
            resp = self._client.request(
                "GET", f"{self._path}?{query}", REQUEST_HEADERS,
                timeout=self._long_poll + self._request_timeout,
            )
        raw, etag = read_value(resp)
        value = self._parse(raw)
        old, known = self._value, self._known
        unchanged_etag = etag is not None and etag == self._etag
        self._etag, self._value, self._known = etag, value, True
        if not known or value != old:
            self._on_value(old if known else None, value)
        if etag is None:
            return MIN_REPOLL_SECONDS  # cannot long-poll without an ETag: poll plainly
        if known and unchanged_etag and self._monotonic() - began < MIN_REPOLL_SECONDS / 2:
            return MIN_REPOLL_SECONDS
        return 0.0


class GceSource(NoticeSource):
    """Preemption and host-maintenance notices from the GCE metadata server."""

    provider = "gce"

    def __init__(
        self,
        clock: Clock,
        url: str,
        *,
        long_poll_seconds: float = 60.0,
        request_timeout: float = 2.0,
        grace_seconds: float | None = None,
    ) -> None:
        super().__init__(clock, detect_seconds=0.5, backoff_initial=0.5, backoff_max=5.0,
                         grace_seconds=grace_seconds)
        self._clients = [HttpClient(url, request_timeout), HttpClient(url, request_timeout)]
        self._preempted = _KeyWatch(self._clients[0], PREEMPTED_PATH, parse_preempted, self._on_preempted,
                                    long_poll_seconds, request_timeout, clock.monotonic)
        self._maintenance = _KeyWatch(self._clients[1], MAINTENANCE_PATH, parse_maintenance,
                                      self._on_maintenance, long_poll_seconds, request_timeout,
                                      clock.monotonic)
        self._stop_posted = {"preempted": False, "maintenance-event": False}

    def watchers(self) -> dict[str, Watcher]:
        return {"preempted": self._preempted.step, "maintenance-event": self._maintenance.step}

    def clients(self) -> list[HttpClient]:
        return list(self._clients)

    # Decisions: one function per key, from (old, new) to at most one notice.

    def _on_preempted(self, old: bool | None, new: bool) -> None:
        if new and not self._stop_posted["preempted"]:
            self._stop_posted["preempted"] = True
            self.emit(NoticeKind.STOP, self._clock.wall() + WINDOW_SECONDS["gce"],
                      {"key": "instance/preempted", "value": "TRUE"})
        elif not new and self._stop_posted["preempted"]:
            self._stop_posted["preempted"] = False
            self.emit(NoticeKind.CANCELLED, None,
                      {"key": "instance/preempted", "value": "FALSE", "reason": "preempted flag cleared"})

    def _on_maintenance(self, old: str | None, new: str) -> None:
        if new == "TERMINATE_ON_HOST_MAINTENANCE" and not self._stop_posted["maintenance-event"]:
            self._stop_posted["maintenance-event"] = True
            self.emit(NoticeKind.STOP, None, {"key": "instance/maintenance-event", "value": new})
        elif new == "MIGRATE_ON_HOST_MAINTENANCE":
            log.info("preemption.maintenance", source="gce", value=new,
                     note="live migration keeps the VM running; no checkpoint needed")
        elif new == "NONE" and self._stop_posted["maintenance-event"]:
            self._stop_posted["maintenance-event"] = False
            self.emit(NoticeKind.CANCELLED, None, {"key": "instance/maintenance-event", "value": new,
                                                   "reason": "maintenance event withdrawn"})
