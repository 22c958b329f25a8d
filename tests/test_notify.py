"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from daemon.notify import Notifier
from tests.workers.harness import Daemon, worker_cmd


class FakeSystemd:
    """Receives notify datagrams like systemd does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def collect(self, until, timeout: float = 15.0) -> list[dict[str, str]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not until(self.messages):
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            fields["_t"] = str(time.monotonic())
            self.messages.append(fields)
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path: Path):
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@preemptd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(address)
    yield fake
    fake.close()


def test_notifier_is_silent_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.watchdog_interval is None


def test_notifier_sends_protocol_lines(systemd: FakeSystemd) -> None:
    n = Notifier({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "3000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 1.5
    assert n.ready("running; step 5")
    assert n.status("running; step 6")
    assert not n.status("running;   step 6")  # unchanged (one line, whitespace folded): not resent
    assert n.watchdog()
    assert n.stopping(35, "stopping\nnow")
    msgs = systemd.collect(lambda m: len(m) >= 4, timeout=3)
    assert msgs[0]["READY"] == "1" and msgs[0]["STATUS"] == "running; step 5"
    assert msgs[1]["STATUS"] == "running; step 6"
    assert msgs[2]["WATCHDOG"] == "1"
    assert msgs[3]["STOPPING"] == "1" and msgs[3]["EXTEND_TIMEOUT_USEC"] == "35000000"
    assert msgs[3]["STATUS"] == "stopping now"
    n.close()


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None


def test_daemon_notifies_ready_status_watchdog_stopping(tmp_path: Path, systemd: FakeSystemd) -> None:
    d = Daemon(tmp_path, worker_cmd("well_behaved"), "--grace-seconds", "9",
               env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "400000"})
    try:
        msgs = systemd.collect(
            lambda m: sum("WATCHDOG" in x for x in m) >= 3 and any("READY" in x for x in m))
        ready = next(m for m in msgs if "READY" in m)
        assert ready["READY"] == "1" and "running" in ready["STATUS"]
        pings = [float(m["_t"]) for m in msgs if m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert all(0.1 <= g <= 0.6 for g in gaps), gaps  # half of WATCHDOG_USEC = 0.2 s
        d.wait_for("worker.hello")
        d.signal(signal.SIGTERM)
        msgs = systemd.collect(lambda m: any("STOPPING" in x for x in m))
        stopping = next(m for m in msgs if "STOPPING" in m)
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 9_000_000
        assert d.wait() == 0
        statuses = [m["STATUS"] for m in systemd.collect(lambda m: False, timeout=0.3) if "STATUS" in m]
        assert all("\n" not in s for s in statuses)
        assert any("step" in s and "checkpoint age" in s for s in statuses)
    finally:
        d.close()
