"""AWS EC2: IMDSv2 spot interruption notices and rebalance recommendations.

Protocol: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
returns a session token, sent as ``X-aws-ec2-metadata-token`` on every GET; a
missing, wrong or expired token gets 401. The token is renewed shortly before it
expires and fetched again on any 401.

- ``/latest/meta-data/spot/instance-action``: 404 while nothing is planned; then
  ``{"action": "terminate"|"stop"|"hibernate", "time": "2026-11-25T13:22:00Z"}``
  about two minutes ahead -> STOP notice with `time` as deadline. Back to 404
  after a notice -> CANCELLED.
- ``/latest/meta-data/events/recommendations/rebalance``: 404, then
  ``{"noticeTime": "..."}`` when the instance is at elevated risk -> CHECKPOINT
  notice (an early save; training goes on). Posted once per noticeTime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from daemon.clock import Clock
from daemon.components import NoticeKind
from daemon.notices.base import NoticeSource, Watcher
from daemon.notices.http import HttpClient, MetadataError, Response

TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_SECONDS = 21600  # the maximum IMDS allows (6 h)
RENEW_MARGIN_SECONDS = 60.0
ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class InstanceAction:
    """A planned spot interruption."""

    action: str
    time_wall: float  # epoch seconds
    raw_time: str


def parse_time(value: Any) -> float:
    """IMDS timestamps (``2026-11-25T13:22:00Z``) as epoch seconds; MetadataError if not one."""
    if not isinstance(value, str):
        raise MetadataError("garbage", f"timestamp is not a string: {value!r:.80}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MetadataError("garbage", f"unparsable timestamp {value[:80]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _json_object(resp: Response, what: str) -> dict[str, Any]:
    try:
        data = json.loads(resp.text())
    except ValueError:
        raise MetadataError("garbage", f"{what}: not JSON: {resp.body[:80]!r}") from None
    if not isinstance(data, dict):
        raise MetadataError("garbage", f"{what}: not a JSON object")
    return data


def parse_instance_action(resp: Response) -> InstanceAction | None:
    """None for 404 (nothing planned); the action for a well-formed 200; else MetadataError."""
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise MetadataError("bad_status", f"spot/instance-action: HTTP {resp.status}")
    data = _json_object(resp, "spot/instance-action")
    action = data.get("action")
    if action not in ACTIONS:
        raise MetadataError("garbage", f"spot/instance-action: unknown action {action!r:.80}")
    return InstanceAction(str(action), parse_time(data.get("time")), str(data.get("time")))


def parse_rebalance(resp: Response) -> str | None:
    """None for 404; the noticeTime of a well-formed 200; else MetadataError."""
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise MetadataError("bad_status", f"rebalance: HTTP {resp.status}")
    data = _json_object(resp, "rebalance")
    notice_time = data.get("noticeTime")
    parse_time(notice_time)
    return str(notice_time)


class ImdsSession:
    """IMDSv2 token handling: fetch, renew before expiry, fetch again on 401."""

    def __init__(self, client: HttpClient, clock: Clock, ttl_seconds: int = TOKEN_TTL_SECONDS) -> None:
        self._client = client
        self._clock = clock
        self._ttl = ttl_seconds
        self._token: str | None = None
        self._expires = 0.0  # monotonic
        self.tokens_fetched = 0

    def _fetch_token(self) -> str:
        began = self._clock.monotonic()
        resp = self._client.request("PUT", TOKEN_PATH, {TTL_HEADER: str(self._ttl)})
        if resp.status != 200:
            raise MetadataError("bad_status", f"token PUT: HTTP {resp.status}")
        token = resp.text().strip()
        if not token or len(token) > 4096 or not token.isprintable():
            raise MetadataError("garbage", "token PUT: answer is not a token")
        granted = resp.headers.get(TTL_HEADER.lower(), "")
        ttl = float(granted) if granted.isdigit() else float(self._ttl)
        self._token, self._expires = token, began + ttl
        self.tokens_fetched += 1
        return token

    def get(self, path: str) -> Response:
        """GET with a valid token; one retry with a fresh token after a 401."""
        token = self._token
        if token is None or self._clock.monotonic() >= self._expires - RENEW_MARGIN_SECONDS:
            token = self._fetch_token()
        resp = self._client.request("GET", path, {TOKEN_HEADER: token})
        if resp.status == 401:
            self._token = None
            resp = self._client.request("GET", path, {TOKEN_HEADER: self._fetch_token()})
            if resp.status == 401:
                raise MetadataError("unauthorized", f"{path}: 401 even with a fresh token")
        return resp


class AwsSource(NoticeSource):
    """Spot interruption (STOP) and rebalance recommendation (CHECKPOINT) from IMDSv2."""

    provider = "aws"

    def __init__(
        self,
        clock: Clock,
        url: str,
        *,
        poll_seconds: float = 5.0,
        request_timeout: float = 2.0,
        grace_seconds: float | None = None,
    ) -> None:
        # Backoff scales with the poll: at the default 5 s it tops out at 20 s, well inside 120 s.
        super().__init__(clock, detect_seconds=poll_seconds + request_timeout,
                         backoff_initial=min(1.0, poll_seconds), backoff_max=4 * poll_seconds,
                         grace_seconds=grace_seconds)
        self._client = HttpClient(url, request_timeout)
        self.session = ImdsSession(self._client, clock)
        self._poll = poll_seconds
        self._action: InstanceAction | None = None  # the one a STOP was posted for
        self._rebalance_seen: set[str] = set()

    def watchers(self) -> dict[str, Watcher]:
        return {"imds": self._step}

    def clients(self) -> list[HttpClient]:
        return [self._client]

    def _step(self) -> float:
        # The interruption first: a broken rebalance answer must not delay it.
        self.decide_action(parse_instance_action(self.session.get(INSTANCE_ACTION_PATH)))
        self.decide_rebalance(parse_rebalance(self.session.get(REBALANCE_PATH)))
        return self._poll

    def decide_action(self, action: InstanceAction | None) -> None:
        """Post STOP for a new interruption, CANCELLED when a posted one is gone."""
        if action is not None and action != self._action:
            first = self._action is None
            self._action = action
            if first:
                self.emit(NoticeKind.STOP, action.time_wall,
                          {"key": "spot/instance-action", "action": action.action, "time": action.raw_time})
        elif action is None and self._action is not None:
            gone = self._action
            self._action = None
            self.emit(NoticeKind.CANCELLED, None, {"key": "spot/instance-action", "action": gone.action,
                                                   "reason": "interruption notice withdrawn"})

    def decide_rebalance(self, notice_time: str | None) -> None:
        """Post CHECKPOINT once per rebalance recommendation."""
        if notice_time is not None and notice_time not in self._rebalance_seen:
            self._rebalance_seen.add(notice_time)
            self.emit(NoticeKind.CHECKPOINT, None,
                      {"key": "events/recommendations/rebalance", "noticeTime": notice_time})
