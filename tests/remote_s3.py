"""A real S3-compatible server on 127.0.0.1 for the remote-mirror tests and benchmark.

moto's S3 backend served over real HTTP by werkzeug (what `moto.server` does), plus
what a test needs to break it: `stop()` closes the listening socket AND every open
connection (a dead server, not a polite one), `start()` brings it back on the same
port with the same buckets, and `fail(...)` answers matching requests with S3's own
error document (e.g. 500 InternalError) a given number of times.

Run alone (for the benchmark's separate process): python -m tests.remote_s3 PORT
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

REGION = "us-east-1"
KEY_ID = "testing-key-id"
SECRET = "testing-secret-value"

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>fault-injected</RequestId></Error>"
)
_MESSAGES = {500: ("InternalError", "We encountered an internal error. Please try again."),
             503: ("SlowDown", "Please reduce your request rate.")}


@dataclass
class _Fault:
    method: str
    path_contains: str
    status: int
    times: int


class S3Server:
    """moto S3 over HTTP on 127.0.0.1 with stop/start and fault injection."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._conns: set[socket.socket] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._app = DomainDispatcherApplication(create_backend_app)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> S3Server:
        server_self = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with server_self._lock:
                    server_self._conns.add(self.connection)

            def finish(self) -> None:
                with server_self._lock:
                    server_self._conns.discard(self.connection)
                super().finish()

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass  # quiet

        self._server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True,
                                   request_handler=Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Die: stop listening and cut every open connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    # ------------------------------------------------------------------ faults

    def fail(self, method: str, path_contains: str = "", status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests of `method` whose path contains the text with `status`."""
        with self._lock:
            self._faults.append(_Fault(method.upper(), path_contains, status, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _match_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.times > 0 and f.method == method and f.path_contains in path:
                    f.times -= 1
                    return f
        return None

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        with self._lock:
            self.requests.append((method, path))
        fault = self._match_fault(method, path)
        if fault is not None:
            # Drain the body, as a real server does before answering.
            stream = environ.get("wsgi.input")
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if stream is not None and length:
                stream.read(length)
            code, message = _MESSAGES.get(fault.status, ("InternalError", "injected"))
            body = _ERROR_BODY.format(code=code, message=message).encode()
            start_response(f"{fault.status} Injected", [("Content-Type", "application/xml"),
                                                        ("Content-Length", str(len(body)))])
            return [body]
        result: Iterable[bytes] = self._app(environ, start_response)
        return result

    # ------------------------------------------------------------------ helpers

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` with its size."""
        out: dict[str, int] = {}
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out


def credentials_env() -> dict[str, str]:
    """Environment a process needs to talk to the fake server through the SDK's usual chain."""
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}


if __name__ == "__main__":
    srv = S3Server(int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(srv.port, flush=True)
    threading.Event().wait()
