"""Fake EC2 instance metadata service, IMDSv2 only (HttpTokens=required), as documented.

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600``
  returns a token (and echoes the TTL header); a missing or out-of-range TTL is 400,
  a request with ``X-Forwarded-For`` is 403.
- Every ``GET /latest/meta-data/...`` needs ``X-aws-ec2-metadata-token`` with a
  live token, else 401.
- ``spot/instance-action`` and ``events/recommendations/rebalance`` are 404 until
  set, then JSON (``{"action", "time"}`` / ``{"noticeTime"}``).

    with FakeAws() as aws:
        aws.interrupt("terminate", in_seconds=120)
        aws.recommend_rebalance()
        aws.expire_tokens()      # every token given so far now gets 401
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone

from tests.fakes.base import FakeMetadataServer, Reply, Request

TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
UNAUTHORIZED = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head><title>401 - Unauthorized'
    "</title></head><body><h1>401 - Unauthorized</h1></body></html>\n"
)


def iso_z(epoch: float) -> str:
    """IMDS timestamp format: 2026-11-25T13:22:00Z."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeAws(FakeMetadataServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.meta: dict[str, str] = {
            "instance-id": "i-0123456789abcdef0",
            "instance-type": "g5.xlarge",
            "instance-life-cycle": "spot",
        }
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self.interrupted_at: float | None = None  # monotonic time of interrupt()

    # -------------------------------------------------------------- control

    def interrupt(self, action: str = "terminate", in_seconds: float = 120.0) -> None:
        """A spot interruption: instance-action appears with `time` = now + in_seconds."""
        with self.lock:
            self.interrupted_at = time.monotonic()
            self.instance_action = {"action": action, "time": iso_z(time.time() + in_seconds)}
            self.lock.notify_all()

    def withdraw(self) -> None:
        """instance-action back to 404."""
        with self.lock:
            self.instance_action = None

    def recommend_rebalance(self) -> None:
        with self.lock:
            self.rebalance = {"noticeTime": iso_z(time.time())}

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens = dict.fromkeys(self.tokens, 0.0)

    # -------------------------------------------------------------- protocol

    def garbage_headers(self, req: Request) -> dict[str, str]:
        return {"Content-Type": "text/plain"}

    def handle(self, req: Request) -> Reply:
        if req.header("X-Forwarded-For") is not None:
            return Reply(403, "Forbidden\n", {"Content-Type": "text/plain"})
        if req.path == "/latest/api/token":
            return self._token(req)
        if req.method != "GET" or not req.path.startswith("/latest/meta-data/"):
            return Reply(405 if req.path.startswith("/latest/") else 404, "", {"Content-Type": "text/plain"})
        with self.lock:
            token = req.header(TOKEN_HEADER)
            if token is None or self.tokens.get(token, 0.0) <= time.monotonic():
                return Reply(401, UNAUTHORIZED, {"Content-Type": "text/html"})
            key = req.path[len("/latest/meta-data/"):]
            if key == "spot/instance-action" and self.instance_action is not None:
                return Reply(200, json.dumps(self.instance_action), {"Content-Type": "text/plain"})
            if key == "events/recommendations/rebalance" and self.rebalance is not None:
                return Reply(200, json.dumps(self.rebalance), {"Content-Type": "text/plain"})
            if key in self.meta:
                return Reply(200, self.meta[key], {"Content-Type": "text/plain"})
        not_found = "<html><body><h1>404 - Not Found</h1></body></html>\n"
        return Reply(404, not_found, {"Content-Type": "text/html"})

    def _token(self, req: Request) -> Reply:
        if req.method != "PUT":
            return Reply(405, "", {"Allow": "OPTIONS, PUT"})
        ttl = req.header(TTL_HEADER)
        if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return Reply(400, "Bad Request\n", {"Content-Type": "text/plain"})
        token = secrets.token_urlsafe(42)
        with self.lock:
            self.tokens[token] = time.monotonic() + int(ttl)
        return Reply(200, token, {"Content-Type": "text/plain", "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})
