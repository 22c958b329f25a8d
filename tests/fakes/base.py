"""A real HTTP server on 127.0.0.1, in a thread, with switchable failure modes.

Provider fakes (gce.py, aws.py, azure.py) subclass `FakeMetadataServer` and
implement `handle(request) -> Reply` per the provider's documented protocol.
Every fake can be told to misbehave at any time (tests and chaos campaigns flip it
while a daemon is polling):

    fake.set_fault(Fault.ERROR_500)                 # every request
    fake.set_fault(Fault.GARBAGE, only="rebalance") # requests whose path contains "rebalance"
    fake.set_fault(Fault.SLOW, seconds=5)           # answer after 5 s
    fake.clear_fault()

Faults: ERROR_500, GARBAGE (200 with junk, provider headers kept), HUGE (a body of
`size` bytes, no Content-Length), HUGE_DECLARED (Content-Length says `size`),
SLOW (delay, then the real answer), TRICKLE (headers, then a byte every `seconds`),
CLOSE (drop the connection without an answer), RESET (TCP reset).
"""

from __future__ import annotations

import enum
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class Fault(str, enum.Enum):
    NONE = "none"
    ERROR_500 = "500"
    GARBAGE = "garbage"
    HUGE = "huge"
    HUGE_DECLARED = "huge_declared"
    SLOW = "slow"
    TRICKLE = "trickle"
    CLOSE = "close"
    RESET = "reset"


@dataclass
class Request:
    """What the fake received (recorded for assertions)."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)

    def data(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


GARBAGE_BODY = b"\x89PNG\r\n\x1a\n\x00\xff<html>{\"action\": oops"


class FakeMetadataServer:
    """Base of the provider fakes; a context manager that serves on 127.0.0.1:<free port>."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Condition()  # guards the fake's state; notify_all() on changes
        self.requests: list[Request] = []
        self._fault = Fault.NONE
        self._fault_only: str | None = None
        self._fault_seconds = 0.0
        self._fault_size = 0
        self.closing = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet tests
                return

            def _serve(self) -> None:
                fake._dispatch(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{type(self).__name__}", daemon=True)

    # -------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()  # wake long polls
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- faults

    def set_fault(self, fault: Fault | str, *, only: str | None = None, seconds: float = 1.0,
                  size: int = 8 * 1024 * 1024) -> None:
        """Misbehave from now on (for requests whose path contains `only`, if given)."""
        with self.lock:
            self._fault = Fault(fault)
            self._fault_only = only
            self._fault_seconds = seconds
            self._fault_size = size

    def clear_fault(self) -> None:
        self.set_fault(Fault.NONE)

    def changed(self) -> None:
        """Call after changing state (under or outside `lock`): wakes long polls."""
        with self.lock:
            self.lock.notify_all()

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """How many requests matched."""
        with self.lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method) and path_contains in r.path)

    # -------------------------------------------------------------- for subclasses

    def handle(self, req: Request) -> Reply:
        raise NotImplementedError

    def garbage_headers(self, req: Request) -> dict[str, str]:
        """Headers a garbage answer keeps (so garbage is not rejected for its headers alone)."""
        return {}

    # -------------------------------------------------------------- internals

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        req = Request(h.command, split.path, {k: v[-1] for k, v in parse_qs(split.query).items()},
                      {k.lower(): v for k, v in h.headers.items()}, body)
        with self.lock:
            self.requests.append(req)
            fault = self._fault if (self._fault_only is None or self._fault_only in req.path) else Fault.NONE
            seconds, size = self._fault_seconds, self._fault_size
        h.close_connection = True
        if fault is Fault.CLOSE:
            return
        if fault is Fault.RESET:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if fault is Fault.SLOW:
            self._sleep(seconds)
        if fault is Fault.ERROR_500:
            reply = Reply(500, "Internal Server Error\n", {"Content-Type": "text/plain"})
        elif fault is Fault.GARBAGE:
            reply = Reply(200, GARBAGE_BODY, self.garbage_headers(req))
        elif fault in (Fault.HUGE, Fault.HUGE_DECLARED):
            self._send_huge(h, req, size, declared=fault is Fault.HUGE_DECLARED)
            return
        else:
            reply = self.handle(req)
        if fault is Fault.TRICKLE:
            self._send_trickle(h, reply, seconds)
            return
        self._send(h, reply)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        with self.lock:
            while not self.closing and time.monotonic() < end:
                self.lock.wait(end - time.monotonic())

    def _send(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        data = reply.data() if h.command != "HEAD" else b""
        try:
            h.send_response(reply.status)
            for k, v in reply.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(reply.data())))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client went away (aborted long poll): nothing to answer

    def _send_huge(self, h: BaseHTTPRequestHandler, req: Request, size: int, declared: bool) -> None:
        chunk = b"TRUE" * 16384
        try:
            h.send_response(200)
            for k, v in self.garbage_headers(req).items():
                h.send_header(k, v)
            if declared:
                h.send_header("Content-Length", str(size))
            h.send_header("Connection", "close")
            h.end_headers()
            sent = 0
            while sent < size:
                piece = chunk[: size - sent]
                h.wfile.write(piece)
                sent += len(piece)
        except OSError:
            pass  # the client stopped reading at its cap: expected

    def _send_trickle(self, h: BaseHTTPRequestHandler, reply: Reply, seconds: float) -> None:
        data = reply.data()
        try:
            h.send_response(reply.status)
            for k, v in reply.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.flush()
            for i in range(len(data)):
                self._sleep(seconds)
                if self.closing:
                    return
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
        except OSError:
            pass  # the client gave up: expected


def unused_port() -> int:
    """A local port with nothing listening (for 'connection refused')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
