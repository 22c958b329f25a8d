"""Azure source against the fake Scheduled Events service: which events matter, approval."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from daemon.clock import FakeClock, SystemClock
from daemon.components import CheckpointReport, NoticeKind
from daemon.notices.azure import AzureSource, Document, Event, parse_document
from daemon.notices.http import MetadataError, Response
from tests.fakes import FakeAzure
from tests.fakes.collector import NoticeCollector

POLL = 0.2


@pytest.fixture
def az() -> Iterator[FakeAzure]:
    with FakeAzure(vm_name="Trainer-1") as fake:
        yield fake


def started(url: str) -> tuple[AzureSource, NoticeCollector]:
    source = AzureSource(SystemClock(), url, poll_seconds=POLL, request_timeout=1.0)
    got = NoticeCollector()
    source.start(got.post)
    return source, got


def test_preempt_for_this_vm_is_a_stop_with_notbefore_as_deadline(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        time.sleep(0.4)
        assert source.vm_name == "Trainer-1"
        eid = az.preempt(in_seconds=30)
        notice = got.wait(NoticeKind.STOP, timeout=3)[0]
        assert got.posted_at(notice) - (az.preempted_at or 0) < POLL + 0.5
        assert notice.details["event_id"] == eid and notice.details["event_type"] == "Preempt"
        assert notice.deadline is not None and 27 < notice.deadline - time.monotonic() <= 30.5
        assert all(r.header("Metadata") == "true" for r in az.requests)
        assert all(r.query.get("api-version") for r in az.requests)
        time.sleep(3 * POLL)
        assert len(got.notices) == 1
    finally:
        source.stop()


def test_other_vms_and_harmless_events_are_not_stops(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        az.add_event("Preempt", resources=["someone-else"])
        az.add_event("Freeze")
        az.add_event("Terminate", resources=[])
        reboot = az.add_event("Reboot", in_seconds=900)
        notice = got.wait(NoticeKind.CHECKPOINT, timeout=3)[0]
        assert notice.details["event_id"] == reboot
        time.sleep(3 * POLL)
        assert [n.kind for n in got.notices] == [NoticeKind.CHECKPOINT]
    finally:
        source.stop()


def test_resource_names_compare_case_insensitively(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        az.add_event("Terminate", resources=["trainer-1"], in_seconds=300)
        notice = got.wait(NoticeKind.STOP, timeout=3)[0]
        assert notice.details["event_type"] == "Terminate"
    finally:
        source.stop()


def test_started_event_has_a_deadline_of_now(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        az.add_event("Preempt", status="Started")
        notice = got.wait(NoticeKind.STOP, timeout=3)[0]
        assert notice.deadline is not None and abs(notice.deadline - time.monotonic()) < 1.0
    finally:
        source.stop()


def test_event_that_disappears_is_cancelled(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        eid = az.preempt()
        got.wait(NoticeKind.STOP, timeout=3)
        az.remove(eid)
        cancelled = got.wait(NoticeKind.CANCELLED, timeout=3)[0]
        assert cancelled.details["event_id"] == eid
        assert az.acknowledged == []
    finally:
        source.stop()


def test_final_checkpoint_approves_the_event_even_when_stopped_right_after(az: FakeAzure) -> None:
    source, got = started(az.url)
    eid = az.preempt()
    got.wait(NoticeKind.STOP, timeout=3)
    source.on_final_checkpoint(CheckpointReport(7, "/ckpt/ckpt-000000000007", 10, 0.5, "preemption"))
    began = time.monotonic()
    source.stop()  # the daemon stops its components right after the stop path
    assert time.monotonic() - began < 1.5
    assert az.acknowledged == [eid]
    posts = [r for r in az.requests if r.method == "POST"]
    assert json.loads(posts[0].body) == {"StartRequests": [{"EventId": eid}]}
    assert got.notices[-1].kind is NoticeKind.STOP  # the approved event going away is no cancel


def test_no_final_checkpoint_still_approves(az: FakeAzure) -> None:
    source, got = started(az.url)
    try:
        eid = az.preempt()
        got.wait(NoticeKind.STOP, timeout=3)
        source.on_final_checkpoint(None)
        end = time.monotonic() + 3
        while not az.acknowledged and time.monotonic() < end:
            time.sleep(0.05)
        assert az.acknowledged == [eid]
        az.remove(eid)
        time.sleep(3 * POLL)
        assert NoticeKind.CANCELLED not in [n.kind for n in got.notices]
    finally:
        source.stop()


def test_nothing_to_approve_sends_nothing(az: FakeAzure) -> None:
    source, _ = started(az.url)
    time.sleep(0.3)
    source.on_final_checkpoint(None)
    source.stop()
    assert az.count("POST") == 0


def _doc(body: object) -> Response:
    return Response(200, {}, json.dumps(body).encode() if not isinstance(body, bytes) else body)


def test_document_parser_is_strict() -> None:
    ok = parse_document(_doc({"DocumentIncarnation": 3, "Events": [
        {"EventId": "A", "EventType": "Preempt", "Resources": ["vm"], "EventStatus": "Scheduled",
         "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"}]}))
    assert ok.incarnation == 3 and ok.events[0].not_before_wall == 1474309787.0
    for junk in (b"\x00garbage", b"[]", {"Events": []}, {"DocumentIncarnation": 1},
                 {"DocumentIncarnation": 1, "Events": [{"EventType": "Preempt"}]},
                 {"DocumentIncarnation": 1, "Events": [{"EventId": "A", "EventType": "Preempt",
                                                        "NotBefore": "tomorrow"}]},
                 {"DocumentIncarnation": True, "Events": []}):
        with pytest.raises(MetadataError):
            parse_document(_doc(junk))
    with pytest.raises(MetadataError):
        parse_document(Response(400, {}, b'{"error": "Bad request"}'))


def test_decisions_under_a_fake_clock() -> None:
    clock = FakeClock(start=100.0, wall_start=1_000_000.0)
    source = AzureSource(clock, "http://127.0.0.1:9")
    got = NoticeCollector()
    source._post = got.post  # decisions only: no threads, no HTTP
    ev = Event("E1", "Preempt", ("vm",), "Scheduled", 1_000_030.0)
    source.decide(Document(1, (ev,)), "vm")
    source.decide(Document(2, (ev,)), "vm")
    [stop] = got.notices
    assert stop.deadline == 130.0 and stop.deadline_wall == 1_000_030.0
    source.decide(Document(3, ()), "vm")
    assert [n.kind for n in got.notices] == [NoticeKind.STOP, NoticeKind.CANCELLED]
