"""GCE source against the fake metadata server: long poll, notices, false alarms, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from daemon.clock import SystemClock
from daemon.components import NoticeKind
from daemon.notices.gce import GceSource, parse_maintenance, parse_preempted
from daemon.notices.http import MetadataError
from tests.fakes import FakeGce, FakeMetadataServer, Reply, Request
from tests.fakes.collector import NoticeCollector


@pytest.fixture
def gce() -> Iterator[FakeGce]:
    with FakeGce() as fake:
        yield fake


def started(url: str, long_poll: float = 2.0) -> tuple[GceSource, NoticeCollector]:
    source = GceSource(SystemClock(), url, long_poll_seconds=long_poll, request_timeout=1.0)
    got = NoticeCollector()
    source.start(got.post)
    return source, got


def settle(fake: FakeMetadataServer, min_requests: int, timeout: float = 5.0) -> None:
    """Wait until the source is long-polling (has made its first requests)."""
    end = time.monotonic() + timeout
    while fake.count() < min_requests and time.monotonic() < end:
        time.sleep(0.02)


def test_preempted_true_is_a_stop_notice_within_half_a_second(gce: FakeGce) -> None:
    source, got = started(gce.url)
    try:
        settle(gce, 4)
        time.sleep(0.2)
        gce.preempt()
        notice = got.wait(NoticeKind.STOP, timeout=5)[0]
        latency = got.posted_at(notice) - (gce.preempted_at or 0)
        assert latency < 0.5, latency
        assert notice.source == "gce" and notice.details["key"] == "instance/preempted"
        assert notice.deadline is not None and 28 < notice.deadline - time.monotonic() <= 30
        assert notice.deadline_wall is not None and 28 < notice.deadline_wall - time.time() <= 30
    finally:
        source.stop()
    assert len(got.notices) == 1


def test_it_long_polls_with_etag_and_timeout(gce: FakeGce) -> None:
    source, got = started(gce.url, long_poll=1.0)
    try:
        time.sleep(2.5)
    finally:
        source.stop()
    polls = [r for r in gce.requests if r.path.endswith("/preempted")]
    assert polls[0].query == {}  # first a plain read for the value and its ETag
    waits = polls[1:]
    assert waits and all(r.query["wait_for_change"] == "true" and r.query["timeout_sec"] == "1"
                         and r.query["last_etag"] for r in waits)
    assert all(r.header("Metadata-Flavor") == "Google" for r in gce.requests)
    assert len(polls) <= 6  # one per long poll, no busy loop
    assert got.notices == []


def test_already_preempted_at_start_is_noticed(gce: FakeGce) -> None:
    gce.preempt()
    source, got = started(gce.url)
    try:
        got.wait(NoticeKind.STOP, timeout=3)
    finally:
        source.stop()


def test_a_reply_that_is_not_a_change_is_not_a_notice(gce: FakeGce) -> None:
    source, got = started(gce.url)
    try:
        settle(gce, 4)
        for _ in range(3):
            gce.bump_etag("instance/preempted")  # new ETag, same FALSE
            time.sleep(0.1)
        time.sleep(0.3)
        assert got.notices == []
        assert source.status()["state"] == "watching"
    finally:
        source.stop()


def test_maintenance_migrate_is_logged_terminate_is_a_stop_and_withdrawal_cancels(gce: FakeGce) -> None:
    source, got = started(gce.url)
    try:
        settle(gce, 4)
        gce.set_value("instance/maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        time.sleep(0.4)
        assert got.notices == []
        gce.set_value("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        stop = got.wait(NoticeKind.STOP, timeout=3)[0]
        assert stop.details["value"] == "TERMINATE_ON_HOST_MAINTENANCE"
        gce.set_value("instance/maintenance-event", "NONE")
        cancelled = got.wait(NoticeKind.CANCELLED, timeout=3)[0]
        assert cancelled.details["key"] == "instance/maintenance-event"
    finally:
        source.stop()


def test_preempted_flag_cleared_is_a_cancel_false_alarm(gce: FakeGce) -> None:
    source, got = started(gce.url)
    try:
        settle(gce, 4)
        gce.preempt()
        got.wait(NoticeKind.STOP, timeout=3)
        gce.set_value("instance/preempted", "FALSE")
        got.wait(NoticeKind.CANCELLED, timeout=3)
        assert [n.kind for n in got.notices] == [NoticeKind.STOP, NoticeKind.CANCELLED]
    finally:
        source.stop()


def test_stop_returns_fast_during_a_long_poll(gce: FakeGce) -> None:
    source, _ = started(gce.url, long_poll=60.0)
    settle(gce, 4)
    began = time.monotonic()
    source.stop()
    assert time.monotonic() - began < 1.5
    assert source.status()["state"] == "stopped"


class _ProxyPretendingTrue(FakeMetadataServer):
    """Something that is not the metadata server (a proxy, a captive portal) answering TRUE."""

    def handle(self, req: Request) -> Reply:
        return Reply(200, "TRUE", {"Content-Type": "text/plain", "ETag": "1"})


def test_an_answer_without_the_flavor_header_is_never_a_notice() -> None:
    with _ProxyPretendingTrue() as fake:
        source, got = started(fake.url)
        try:
            time.sleep(0.8)
            assert got.notices == []
            assert source.status()["state"] == "degraded"
        finally:
            source.stop()


def test_value_parsers_are_strict() -> None:
    assert parse_preempted("TRUE") is True and parse_preempted("FALSE") is False
    for junk in ("true", "TRUE!", "", "1", "<html>"):
        with pytest.raises(MetadataError):
            parse_preempted(junk)
    assert parse_maintenance("NONE") == "NONE"
    with pytest.raises(MetadataError):
        parse_maintenance("TERMINATE")
