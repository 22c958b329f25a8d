"""Metadata servers misbehaving: bounded, quiet, no crash, and never a false notice.

Each case runs all three sources at once against their fakes switched to one
failure mode, checks that nothing was posted, that the trouble was logged once
(not once per poll) and shows in status(), then heals the fake, preempts the VM
and checks that the notice still comes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.clock import SystemClock
from daemon.components import NoticeKind
from daemon.notices import AwsSource, AzureSource, GceSource, NoticeSource
from daemon.notices.http import HttpClient, MetadataError
from tests.fakes import FakeAws, FakeAzure, FakeGce, FakeMetadataServer, Fault, unused_port
from tests.fakes.collector import NoticeCollector

TIMEOUT = 0.5  # request_timeout_seconds for these tests


def make_sources(urls: dict[str, str]) -> dict[str, NoticeSource]:
    clock = SystemClock()
    return {
        "gce": GceSource(clock, urls["gce"], long_poll_seconds=1.0, request_timeout=TIMEOUT),
        "aws": AwsSource(clock, urls["aws"], poll_seconds=0.2, request_timeout=TIMEOUT),
        "azure": AzureSource(clock, urls["azure"], poll_seconds=0.2, request_timeout=TIMEOUT),
    }


@contextmanager
def running(urls: dict[str, str]) -> Iterator[tuple[dict[str, NoticeSource], NoticeCollector, list[Any]]]:
    got = NoticeCollector()
    sources = make_sources(urls)
    with capture_logs() as logs:
        for s in sources.values():
            s.start(got.post)
        try:
            yield sources, got, logs
        finally:
            began = time.monotonic()
            for s in sources.values():
                s.stop()
            assert time.monotonic() - began < 4.0  # stop() is bounded even mid-failure


def preempt(fakes: dict[str, FakeMetadataServer]) -> None:
    gce, aws, az = fakes["gce"], fakes["aws"], fakes["azure"]
    assert isinstance(gce, FakeGce) and isinstance(aws, FakeAws) and isinstance(az, FakeAzure)
    gce.preempt()
    aws.interrupt()
    az.preempt()


def assert_quiet_errors(logs: list[dict[str, Any]], sources: dict[str, NoticeSource]) -> None:
    errors = [e for e in logs if e["event"] == "preemption.source_error"]
    assert errors, "the trouble must be logged"
    keys = [(e["source"], e["watcher"], e["kind"]) for e in errors]
    assert len(keys) == len(set(keys)), f"one line per kind of trouble, got {keys}"
    for name, s in sources.items():
        st = s.status()
        assert st["state"] == "degraded", (name, st, logs)
        assert st["last_error"], (name, st, logs)
    # Failures were repeated (backoff retried) without more lines.
    assert max(sum(s.status()["errors"].values()) for s in sources.values()) >= 2, logs


FAULTS = [Fault.ERROR_500, Fault.GARBAGE, Fault.HUGE, Fault.HUGE_DECLARED, Fault.SLOW, Fault.TRICKLE,
          Fault.CLOSE, Fault.RESET]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.value for f in FAULTS])
def test_fault_gives_no_notice_one_log_line_and_recovers(fault: Fault) -> None:
    with ExitStack() as stack:
        fakes: dict[str, FakeMetadataServer] = {
            "gce": stack.enter_context(FakeGce()),
            "aws": stack.enter_context(FakeAws()),
            "azure": stack.enter_context(FakeAzure(vm_name=socket.gethostname())),
        }
        for f in fakes.values():
            f.set_fault(fault, seconds=2.0 if fault is Fault.SLOW else 0.3, size=4 << 20)
        with running({k: f.url for k, f in fakes.items()}) as (sources, got, logs):
            time.sleep(1.2)
            assert got.notices == []
            assert_quiet_errors(logs, sources)
            assert not [e for e in logs if e["event"] == "preemption.source_crashed"], logs
            for f in fakes.values():
                f.clear_fault()
            preempt(fakes)
            stops = got.wait(NoticeKind.STOP, timeout=15, count=3)
            assert sorted(n.source for n in stops) == ["aws", "azure", "gce"], stops
            recovered = {e["source"] for e in logs if e["event"] == "preemption.source_recovered"}
            assert recovered == {"aws", "azure", "gce"}, logs
            time.sleep(0.3)
            assert len(got.notices) == 3, got.notices  # exactly one each


def test_connection_refused_is_quiet_and_noticeless() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with running({"gce": url, "aws": url, "azure": url}) as (sources, got, logs):
        time.sleep(1.2)
        assert got.notices == []
        assert_quiet_errors(logs, sources)
        assert {e["kind"] for e in logs if e["event"] == "preemption.source_error"} <= {"unreachable", "name"}


def test_dns_failure_is_quiet_and_noticeless(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver is the environment, not the code under test: make it fail without traffic.
    def no_such_host(*args: object, **kwargs: object) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    url = "http://metadata.invalid"
    with running({"gce": url, "aws": url, "azure": url}) as (sources, got, logs):
        time.sleep(1.2)
        assert got.notices == []
        assert_quiet_errors(logs, sources)
        assert "dns" in {e["kind"] for e in logs if e["event"] == "preemption.source_error"}


def test_client_caps_body_and_bounds_total_time() -> None:
    with FakeGce() as gce:
        client = HttpClient(gce.url, timeout=1.0, max_body=1024)
        gce.set_fault(Fault.HUGE, size=64 << 20)
        with pytest.raises(MetadataError) as err:
            client.request("GET", "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        assert err.value.kind == "too_large"
        gce.set_fault(Fault.TRICKLE, seconds=0.2)  # a byte every 0.2 s: each recv is quick
        began = time.monotonic()
        with pytest.raises(MetadataError) as err:
            client.request("GET", "/computeMetadata/v1/instance/id", {"Metadata-Flavor": "Google"})
        assert err.value.kind == "timeout" and time.monotonic() - began < 1.6


def test_a_bug_in_a_poll_is_logged_and_the_watch_goes_on() -> None:
    with FakeAws() as aws:
        source = AwsSource(SystemClock(), aws.url, poll_seconds=0.1, request_timeout=TIMEOUT)
        calls = {"n": 0}
        real = source.decide_rebalance

        def broken_once(notice_time: str | None) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("simulated bug")
            real(notice_time)

        source.decide_rebalance = broken_once  # type: ignore[method-assign]
        got = NoticeCollector()
        with capture_logs() as logs:
            source.start(got.post)
            try:
                end = time.monotonic() + 5
                while calls["n"] < 2 and time.monotonic() < end:  # crashed once, then polled again
                    time.sleep(0.02)
                aws.interrupt()
                got.wait(NoticeKind.STOP, timeout=5)
            finally:
                source.stop()
        crashed = [e for e in logs if e["event"] == "preemption.source_crashed"]
        assert len(crashed) == 1 and "simulated bug" in crashed[0]["error"]
        assert source.status()["errors"] == {"imds": 1}
