"""A small, strictly bounded HTTP client for metadata servers (stdlib http.client only).

Every request has one total deadline (connect, headers and body together), a capped
body size, and can be aborted from another thread (so `stop()` never waits for a
60 s long poll). Every failure is a `MetadataError` with a short `kind`, so callers
log one line per kind of trouble instead of a traceback per poll.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_BODY = 64 * 1024  # a metadata answer is a few hundred bytes


class MetadataError(Exception):
    """A metadata request failed; `kind` names the failure for logs and status."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Response:
    """A complete HTTP answer; header names are lower-case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def text(self) -> str:
        """The body as UTF-8 text; MetadataError('garbage') when it is not."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise MetadataError("garbage", f"HTTP {self.status}: body is not UTF-8") from None


class _DeadlineSocket(socket.socket):
    """A socket whose every receive is bounded by one absolute monotonic deadline.

    http.client only knows a per-operation timeout, so a server that trickles a byte
    a second would hold it forever; this bounds the whole exchange.
    """

    deadline: float = 0.0

    def recv_into(self, buffer, nbytes=0, flags=0):  # type: ignore[no-untyped-def]
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self.settimeout(remaining)
        return super().recv_into(buffer, nbytes, flags)


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, deadline: float, client: HttpClient) -> None:
        super().__init__(host, port, timeout=max(0.001, deadline - time.monotonic()))
        self._deadline = deadline
        self._client = client

    def connect(self) -> None:
        raw = socket.create_connection(
            (self.host, self.port), timeout=max(0.001, self._deadline - time.monotonic())
        )
        sock = _DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.deadline = self._deadline
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._client._set_active(sock)


class HttpClient:
    """Requests against one metadata base URL (e.g. ``http://169.254.169.254``).

    One connection per request (`Connection: close`): metadata servers are local,
    and a fresh connection cannot be left half-read by an earlier failure.
    """

    def __init__(self, base_url: str, timeout: float, max_body: int = DEFAULT_MAX_BODY) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"metadata URL must be http://host[:port], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.max_body = max_body
        self._lock = threading.Lock()
        self._active: socket.socket | None = None
        self._aborted = False

    def _set_active(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._active = sock
            aborted = self._aborted
        if aborted and sock is not None:
            _shutdown(sock)

    def abort(self) -> None:
        """Cut the request in flight (from any thread) and refuse new ones."""
        with self._lock:
            self._aborted = True
            sock = self._active
        if sock is not None:
            _shutdown(sock)

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request and read the whole answer within `timeout` seconds.

        Raises MetadataError: unreachable, dns, timeout, closed, too_large, aborted.
        Any HTTP status is returned; judging it is the caller's business.
        """
        if self._aborted:
            raise MetadataError("aborted", "client stopped")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        conn = _Connection(self._host, self._port, deadline, self)
        send_headers = {"Connection": "close", **(headers or {})}
        try:
            conn.request(method, self._prefix + path, body=body, headers=send_headers)
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                raise MetadataError("too_large", f"HTTP {resp.status}: body of {length} bytes refused")
            data = resp.read(self.max_body + 1)
            if len(data) > self.max_body:
                raise MetadataError("too_large", f"HTTP {resp.status}: body over {self.max_body} bytes")
            headers_out = {k.lower(): v for k, v in resp.getheaders()}
            return Response(resp.status, headers_out, data)
        except MetadataError:
            raise
        except socket.gaierror as exc:
            raise MetadataError("dns", f"cannot resolve {self._host}: {exc.strerror or exc}") from None
        except UnicodeError:  # a host name IDNA cannot encode never resolves
            raise MetadataError("dns", f"cannot resolve {self._host}: invalid host name") from None
        except TimeoutError:
            if self._aborted:
                raise MetadataError("aborted", "client stopped") from None
            raise MetadataError("timeout", f"no complete answer from {self.base_url} in time") from None
        except ConnectionRefusedError:
            raise MetadataError("unreachable", f"connection refused by {self.base_url}") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            if self._aborted:
                raise MetadataError("aborted", "client stopped") from None
            raise MetadataError(
                "closed", f"{self.base_url} broke the exchange: {type(exc).__name__} {exc}"
            ) from None
        except OSError as exc:
            if self._aborted:
                raise MetadataError("aborted", "client stopped") from None
            raise MetadataError("unreachable", f"{self.base_url}: {exc.strerror or exc}") from None
        finally:
            self._set_active(None)
            conn.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing left to cut
        sock.shutdown(socket.SHUT_RDWR)
