"""The fault campaign as tests: a short one in the default run, the full >= 100-fault one on demand.

    .venv/bin/pytest tests/chaos -m slow        # the full campaign (also: python -m tests.chaos.campaign)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.campaign import KINDS, Campaign, Settings, summary
from tests.chaos.procs import parse_line


def test_log_lines_of_both_sides_parse() -> None:
    worker = parse_line("2026-11-25 13:28:55 [info     ] checkpoint.committed           bytes=676185 "
                        "path=/tmp/c/ckpt-000000000010 reason=periodic seconds=0.46 step=10")
    assert worker == {"event": "checkpoint.committed", "level": "info", "src": "worker", "bytes": 676185,
                      "path": "/tmp/c/ckpt-000000000010", "reason": "periodic", "seconds": 0.46, "step": 10}
    daemon = parse_line('{"timestamp": "x", "level": "info", "event": "worker.started", "pid": 12}')
    assert daemon is not None and daemon["src"] == "daemon" and daemon["pid"] == 12
    worker_json = parse_line('{"timestamp": "x", "event": "train.step", "step": 3, "origin": "worker"}')
    assert worker_json is not None and worker_json["src"] == "worker" and worker_json["step"] == 3
    assert parse_line("I0000 00:00:1795613355.677681 cpu_feature_guard.cc:227] This TensorFlow") is None


def _run(settings: Settings) -> None:
    result = Campaign(settings).run()
    print(summary(result))
    assert result.ok, summary(result)
    assert len(result.faults) == len(settings.plan) or len(result.faults) >= settings.faults


@pytest.mark.tf
@pytest.mark.timeout(600)
def test_short_campaign(tmp_path: Path) -> None:
    """Three of the hardest faults: a worker SIGKILL during a save, a provider's preemption
    notice (the daemon stops and a new one starts, as on a new VM), a bit-flipped newest
    checkpoint. Each costs a TensorFlow start: ~10 s on an idle 2-core box, more when busy."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
    notice = random.Random(seed).choice(["notice_gce", "notice_aws", "notice_azure"])
    plan = ("worker_sigkill_saving", notice, "ckpt_bitflip")
    _run(Settings(faults=len(plan), seed=seed, plan=plan, gap=8, every_steps=4, step_delay=0.01,
                  parallel_baseline=True, workdir=tmp_path / "chaos"))


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_full_campaign(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
    _run(Settings(faults=int(os.environ.get("CHAOS_FAULTS") or 100), seed=seed, kinds=KINDS,
                  workdir=tmp_path / "chaos"))
