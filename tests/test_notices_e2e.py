"""End to end: `preemptd run` + a real worker + a fake metadata server flipped to "preempted".

The daemon is a real subprocess reading a real config file that points its notice
source at the fake (real HTTP on 127.0.0.1). Flipping the fake must end in a
committed checkpoint with reason `preemption`, a stopped worker and exit 0, well
within the provider's warning window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import contract
from tests.fakes import FakeAws, FakeAzure, FakeGce, FakeMetadataServer
from tests.workers.harness import PY, Daemon, worker_cmd

TF_WORKER = [PY, "-m", "service.examples.custom_loop", "--steps", "1000000", "--log-every", "1000000"]
WINDOW = {"gce": 30.0, "aws": 120.0, "azure": 30.0}


def write_config(tmp: Path, provider: str, url: str) -> Path:
    path = tmp / "preemptd.toml"
    path.write_text(
        "[preemption]\n"
        f'sources = ["{provider}"]\n'
        f'{provider}_url = "{url}"\n'
        "gce_timeout_seconds = 10\n"
        "aws_poll_seconds = 1.0\n"
        "azure_poll_seconds = 0.5\n"
        "[stop]\n"
        "grace_seconds = 25\n"
        "[daemon]\n"
        "progress_interval_seconds = 1.0\n"
    )
    return path


def _flip(fake: FakeMetadataServer) -> None:
    if isinstance(fake, FakeGce):
        fake.preempt()
    elif isinstance(fake, FakeAws):
        fake.interrupt("terminate", in_seconds=120)
    elif isinstance(fake, FakeAzure):
        fake.preempt(in_seconds=30)


FAKES: dict[str, Callable[[], FakeMetadataServer]] = {"gce": FakeGce, "aws": FakeAws, "azure": FakeAzure}


def run_preemption(tmp_path: Path, provider: str, command: list[str],
                   env: dict[str, str] | None = None, start_timeout: float = 30.0) -> dict[str, Any]:
    """Start the daemon, flip the fake, return what happened (asserting the contract)."""
    with FAKES[provider]() as fake:
        d = Daemon(tmp_path, command, config=write_config(tmp_path, provider, fake.url), env=env)
        try:
            watching = d.wait_for("preemption.watching", timeout=start_timeout)
            assert watching["source"] == provider
            # Training runs: a hello, or (should that one datagram be lost) progress reports.
            d.wait_for("worker.progress", timeout=start_timeout,
                       where=lambda e: bool(e.get("step")) or bool(d.events("worker.hello")))
            time.sleep(1.0)  # a few training steps
            assert d.proc.poll() is None and d.events("preemption.notice") == []
            flipped = time.time()
            _flip(fake)
            assert d.wait(timeout=WINDOW[provider] + 30) == contract.EXIT_OK
            notice = d.events("preemption.notice")[0]
            assert notice["source"] == provider and notice["kind"] == "stop"
            assert 0 < notice["seconds_left"] <= WINDOW[provider]
            committed = [e for e in d.events("checkpoint.committed") if e["reason"] == "preemption"]
            assert committed, d.events("checkpoint.committed")
            assert contract.verify(committed[-1]["path"]).reason == "preemption"
            exited = d.events("worker.exited")
            assert len(exited) == 1 and exited[0]["exit_code"] == 0
            assert d.events("worker.restarting") == []
            stopped = d.events("daemon.stopped")[0]
            assert stopped["confirmed"] is True and stopped["reason"] == "preemption"
            took = {
                "notice": notice["_received"] - flipped,
                "committed": committed[-1]["_received"] - flipped,
                "stopped": stopped["_received"] - flipped,
                "save_seconds": committed[-1]["seconds"],
            }
            assert took["stopped"] < WINDOW[provider], took
            state = d.state()
            assert state["state"] == "stopped" and state["notices"][0]["source"] == provider
            mine = state[f"notices.{provider}"]
            assert mine["source"] == provider and mine["notices"][0]["kind"] == "stop"
            assert mine["window_seconds"] == WINDOW[provider] and "save_fits" in mine
            if isinstance(fake, FakeAzure):
                # The event was approved once the final checkpoint was durable.
                assert fake.acknowledged and fake.events[0]["EventStatus"] == "Started"
            return took
        finally:
            d.close()


@pytest.mark.parametrize("provider", ["gce", "aws", "azure"])
def test_preemption_with_a_plain_worker(tmp_path: Path, provider: str) -> None:
    took = run_preemption(tmp_path, provider, worker_cmd("well_behaved"), env={"SAVE_SECONDS": "0.2"})
    poll = {"gce": 0.0, "aws": 1.0, "azure": 0.5}[provider]
    # Detection: the long poll answers at once; AWS/Azure within one poll (+ slack for a busy box).
    assert took["notice"] < poll + 1.5, took


@pytest.mark.tf
@pytest.mark.parametrize("provider", [
    "gce",
    pytest.param("aws", marks=pytest.mark.slow),
    pytest.param("azure", marks=pytest.mark.slow),
])
def test_preemption_with_the_tensorflow_example(tmp_path: Path, provider: str) -> None:
    took = run_preemption(tmp_path, provider, TF_WORKER, env={"EXAMPLE_STEP_DELAY": "0.01"},
                          start_timeout=240)
    assert took["committed"] < WINDOW[provider], took
