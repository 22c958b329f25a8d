"""AWS source against the fake IMDSv2: tokens, interruption, rebalance, withdrawal."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from daemon.clock import FakeClock, SystemClock
from daemon.components import NoticeKind
from daemon.notices.aws import (
    INSTANCE_ACTION_PATH,
    AwsSource,
    ImdsSession,
    parse_instance_action,
    parse_rebalance,
)
from daemon.notices.http import HttpClient, MetadataError, Response
from tests.fakes import FakeAws
from tests.fakes.collector import NoticeCollector

POLL = 0.2


@pytest.fixture
def aws() -> Iterator[FakeAws]:
    with FakeAws() as fake:
        yield fake


def started(url: str) -> tuple[AwsSource, NoticeCollector]:
    source = AwsSource(SystemClock(), url, poll_seconds=POLL, request_timeout=1.0)
    got = NoticeCollector()
    source.start(got.post)
    return source, got


def test_interruption_is_a_stop_with_the_announced_deadline(aws: FakeAws) -> None:
    source, got = started(aws.url)
    try:
        time.sleep(0.5)
        aws.interrupt("terminate", in_seconds=120)
        notice = got.wait(NoticeKind.STOP, timeout=3)[0]
        assert got.posted_at(notice) - (aws.interrupted_at or 0) < POLL + 0.5
        assert notice.details["action"] == "terminate"
        # The fake's time has whole seconds: the deadline is 119..120 s away.
        assert notice.deadline is not None and 117 < notice.deadline - time.monotonic() <= 120.5
        time.sleep(3 * POLL)
        assert len(got.notices) == 1  # the same interruption is posted once
    finally:
        source.stop()


def test_one_token_serves_many_polls_and_a_401_fetches_a_new_one(aws: FakeAws) -> None:
    source, got = started(aws.url)
    try:
        time.sleep(6 * POLL)
        assert aws.count("PUT", "/latest/api/token") == 1
        gets = [r for r in aws.requests if r.method == "GET"]
        assert len(gets) >= 4 and all(r.header("X-aws-ec2-metadata-token") for r in gets)
        assert all(r.header("X-aws-ec2-metadata-token-ttl-seconds") == "21600"
                   for r in aws.requests if r.method == "PUT")
        aws.expire_tokens()
        time.sleep(4 * POLL)
        assert aws.count("PUT", "/latest/api/token") == 2
        assert source.status()["state"] == "watching"
        aws.interrupt()
        got.wait(NoticeKind.STOP, timeout=3)
    finally:
        source.stop()


def test_token_is_renewed_before_it_expires(aws: FakeAws) -> None:
    clock = FakeClock()
    session = ImdsSession(HttpClient(aws.url, 2.0), clock, ttl_seconds=300)
    assert session.get(INSTANCE_ACTION_PATH).status == 404
    clock.advance(200)
    session.get(INSTANCE_ACTION_PATH)
    assert session.tokens_fetched == 1
    clock.advance(50)  # 250 s of 300: inside the renewal margin
    session.get(INSTANCE_ACTION_PATH)
    assert session.tokens_fetched == 2


def test_rebalance_is_one_early_checkpoint_not_a_stop(aws: FakeAws) -> None:
    source, got = started(aws.url)
    try:
        time.sleep(0.3)
        aws.recommend_rebalance()
        notice = got.wait(NoticeKind.CHECKPOINT, timeout=3)[0]
        assert notice.deadline is None and "noticeTime" in notice.details
        time.sleep(4 * POLL)
        assert [n.kind for n in got.notices] == [NoticeKind.CHECKPOINT]
    finally:
        source.stop()


def test_withdrawn_interruption_is_cancelled(aws: FakeAws) -> None:
    source, got = started(aws.url)
    try:
        aws.interrupt("stop")
        got.wait(NoticeKind.STOP, timeout=3)
        aws.withdraw()
        got.wait(NoticeKind.CANCELLED, timeout=3)
    finally:
        source.stop()


def _resp(status: int, body: object) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(status, {}, data)


def test_parsers_accept_only_well_formed_answers() -> None:
    assert parse_instance_action(_resp(404, b"")) is None
    ok = parse_instance_action(_resp(200, {"action": "hibernate", "time": "2026-11-25T13:22:00Z"}))
    assert ok is not None and ok.action == "hibernate" and ok.time_wall == 1795612920.0
    for junk in ({"action": "explode", "time": "2026-11-25T13:22:00Z"}, {"action": "terminate"},
                 {"action": "terminate", "time": "soon"}, ["terminate"], b"\xff\x00", b"{"):
        with pytest.raises(MetadataError):
            parse_instance_action(_resp(200, junk))
    with pytest.raises(MetadataError):
        parse_instance_action(_resp(500, b"oops"))
    assert parse_rebalance(_resp(404, b"")) is None
    assert parse_rebalance(_resp(200, {"noticeTime": "2026-11-25T13:22:00Z"})) == "2026-11-25T13:22:00Z"
    with pytest.raises(MetadataError):
        parse_rebalance(_resp(200, {"noticeTime": 5}))


def test_decisions_under_a_fake_clock() -> None:
    clock = FakeClock(start=500.0, wall_start=1_795_612_800.0)
    source = AwsSource(clock, "http://127.0.0.1:9", poll_seconds=5)
    got = NoticeCollector()
    source._post = got.post  # decisions only: no threads, no HTTP
    action = parse_instance_action(_resp(200, {"action": "terminate", "time": "2026-11-25T13:22:00Z"}))
    source.decide_action(action)
    source.decide_action(action)
    [stop] = got.notices
    assert stop.deadline == 500.0 + 120.0 and stop.deadline_wall == 1_795_612_920.0
    source.decide_rebalance("t1")
    source.decide_rebalance("t1")
    source.decide_rebalance("t2")
    source.decide_action(None)
    assert [n.kind for n in got.notices] == [NoticeKind.STOP, NoticeKind.CHECKPOINT, NoticeKind.CHECKPOINT,
                                             NoticeKind.CANCELLED]
