"""Deadline awareness: save time vs the provider's window; backoff; status and warnings."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from daemon import contract
from daemon.clock import FakeClock
from daemon.components import CheckpointReport, NoticeKind
from daemon.notices import AwsSource, GceSource
from daemon.notices.base import Backoff
from daemon.notices.deadline import WINDOW_SECONDS, SaveBudget
from tests.fakes.collector import NoticeCollector


def report(seconds: float) -> CheckpointReport:
    return CheckpointReport(step=10, path="/c/ckpt-000000000010", bytes=1, seconds=seconds, reason="periodic")


def test_budget_verdicts() -> None:
    budget = SaveBudget(WINDOW_SECONDS["gce"], detect_seconds=0.5)
    assert budget.assess().fits is None  # nothing measured yet
    budget.record(3.0)
    fit = budget.assess()
    assert fit.fits is True and fit.budget_seconds == 30 * 0.8 - 0.5
    budget.record(25.0)
    assert budget.assess().fits is False and budget.last_save_seconds == 25.0
    assert budget.assess(window_seconds=120).fits is True


def test_backoff_doubles_and_caps() -> None:
    b = Backoff(0.5, 5.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.delay(10_000) == 5.0


def test_slow_save_warns_once_and_shows_in_status() -> None:
    source = GceSource(FakeClock(), "http://127.0.0.1:9")
    with capture_logs() as logs:
        source.on_checkpoint(report(2.0))
        source.on_checkpoint(report(26.0))
        source.on_checkpoint(report(27.0))
        st = source.status()
        source.on_checkpoint(report(1.0))
    risks = [e for e in logs if e["event"] == "preemption.deadline_at_risk"]
    assert len(risks) == 1 and risks[0]["last_save_seconds"] == 26.0 and risks[0]["window_seconds"] == 30
    assert st["save_fits"] is False and st["last_save_seconds"] == 27.0 and st["window_seconds"] == 30.0
    assert [e["event"] for e in logs][-1] == "preemption.deadline_ok"
    assert source.status()["save_fits"] is True


def test_the_same_save_fits_aws_but_not_gce() -> None:
    gce, aws = GceSource(FakeClock(), "http://127.0.0.1:9"), AwsSource(FakeClock(), "http://127.0.0.1:9")
    for s in (gce, aws):
        s.on_checkpoint(report(40.0))
    assert gce.status()["save_fits"] is False and aws.status()["save_fits"] is True


def test_warns_at_start_when_grace_exceeds_window_or_known_save_is_too_slow(tmp_path: Path) -> None:
    # A committed checkpoint whose manifest recorded a 28 s save.
    ckpt = tmp_path / contract.checkpoint_dirname(5)
    ckpt.mkdir()
    (ckpt / "data").write_bytes(b"x")
    contract.write_json_atomic(ckpt / contract.MANIFEST_NAME, contract.Manifest(
        step=5, reason="periodic", created="2026-11-25T00:00:00Z", files={"data": {"size": 1}},
        extra={"seconds": 28.0}).to_json())
    source = GceSource(FakeClock(), "http://127.0.0.1:9", grace_seconds=45)
    with capture_logs() as logs:
        source.before_worker_start(str(tmp_path))
        source.start(lambda event: None)
        source.stop()
    risks = [e for e in logs if e["event"] == "preemption.deadline_at_risk"]
    assert {"grace_seconds", "last_save_seconds"} <= {k for e in risks for k in e}
    assert source.status()["last_save_seconds"] == 28.0


def test_notice_with_too_little_time_left_warns() -> None:
    clock = FakeClock(start=0.0, wall_start=1000.0)
    source = AwsSource(clock, "http://127.0.0.1:9")
    got = NoticeCollector()
    source._post = got.post  # the decision alone: no threads
    source.on_checkpoint(report(50.0))
    with capture_logs() as logs:
        source.emit(NoticeKind.STOP, 1030.0, {"key": "spot/instance-action"})
    [notice] = got.notices
    assert notice.deadline == 30.0 and notice.details["last_save_seconds"] == 50.0
    assert [e["seconds_left"] for e in logs if e["event"] == "preemption.deadline_at_risk"] == [30.0]
