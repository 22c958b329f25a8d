"""Exact resume of the real examples, killed with real signals at random steps."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon import contract

pytestmark = pytest.mark.tf
ROOT = Path(__file__).resolve().parents[1]
# Console (key=value) or JSON ("key": value) lines: the examples log like the daemon.
STEP_RE = re.compile(r"train\.step\b.*\bstep\"?[=:] ?(\d+)")
DIGEST_RE = re.compile(r"weights_sha256\"?[=:] ?\"?([0-9a-f]{64})")
RESTORED_RE = re.compile(r"checkpoint\.restored\b.*\bstep\"?[=:] ?(\d+)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREEMPTD_", "EXAMPLE_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Segment:
    returncode: int
    last_step: int
    restored: int
    digest: str | None
    output: str


def _start(module: str, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _segment(module: str, args: list[str], stop_at: int | None = None,
             sig: signal.Signals = signal.SIGKILL) -> Segment:
    """Run the example; send `sig` once it logs a step >= stop_at; collect what it said."""
    proc = _start(module, args)
    assert proc.stdout is not None
    lines, last, sent = [], 0, False
    for line in proc.stdout:
        lines.append(line)
        m = STEP_RE.search(line)
        if m:
            last = int(m.group(1))
            if stop_at is not None and last >= stop_at and not sent:
                proc.send_signal(sig)
                sent = True
    proc.wait(timeout=120)
    out = "".join(lines)
    restored = RESTORED_RE.search(out)
    digest = DIGEST_RE.search(out)
    return Segment(proc.returncode, last, int(restored.group(1)) if restored else 0,
                   digest.group(1) if digest else None, out)


@pytest.mark.slow
def test_custom_loop_killed_three_times_ends_bit_identical(tmp_path: Path) -> None:
    total = 300
    common = ["--steps", str(total), "--every-steps", "20", "--log-every", "1", "--step-delay", "0.005"]
    # The uninterrupted run goes on beside the interrupted ones.
    baseline = _start("service.examples.custom_loop", [*common, "--dir", str(tmp_path / "straight")])
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ckdir = tmp_path / "chaos"
    args = [*common, "--dir", str(ckdir)]
    starts, position = [], 0
    # Three SIGKILLs and one SIGTERM at random steps, then a run to the end.
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        stop_at = position + rng.randint(40, 70)
        seg = _segment("service.examples.custom_loop", args, stop_at=stop_at, sig=sig)
        assert seg.last_step >= stop_at, f"seed {seed}: ran out before step {stop_at}\n{seg.output[-2000:]}"
        if sig == signal.SIGKILL:
            assert seg.returncode == -signal.SIGKILL
        else:
            assert seg.returncode == 0, seg.output[-2000:]  # SIGTERM: durable save, exit 0
            newest = contract.newest_valid(ckdir)
            assert newest is not None and newest[1].reason == "preemption"
            assert newest[1].step >= stop_at
        starts.append(seg.restored)
        newest = contract.newest_valid(ckdir)
        position = newest[0].step if newest else 0
    final = _segment("service.examples.custom_loop", args)
    starts.append(final.restored)
    out, _ = baseline.communicate(timeout=180)
    assert baseline.returncode == 0, out[-2000:]
    straight = DIGEST_RE.search(out)
    assert final.returncode == 0, final.output[-2000:]
    assert straight and final.digest == straight.group(1), f"seed {seed}: weights differ"
    # It really resumed (not restarted from zero) after every interruption.
    assert starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:], strict=False)), (seed, starts)


@pytest.mark.slow
def test_keras_fit_resumes_mid_epoch_bit_identical(tmp_path: Path) -> None:
    common = ["--every-steps", "15", "--log-every", "1"]
    straight = _segment("service.examples.keras_fit",
                        [*common, "--steps", "130", "--dir", str(tmp_path / "a")])
    assert straight.returncode == 0 and straight.digest, straight.output[-2000:]
    chaos = [*common, "--steps", "130", "--dir", str(tmp_path / "b")]
    first = _segment("service.examples.keras_fit", chaos, stop_at=70, sig=signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    second = _segment("service.examples.keras_fit", chaos, stop_at=110, sig=signal.SIGTERM)
    assert second.returncode == 0 and second.restored > 0
    last = _segment("service.examples.keras_fit", chaos)
    assert last.returncode == 0 and last.restored > second.restored
    assert last.digest == straight.digest


@pytest.mark.slow
def test_savedmodel_example_serves(tmp_path: Path) -> None:
    seg = _segment("service.examples.savedmodel_export",
                   ["--steps", "200", "--export-every", "100", "--dir", str(tmp_path)])
    assert seg.returncode == 0, seg.output[-2000:]
    assert "export.served" in seg.output
    assert sorted(p.name for p in (tmp_path / "savedmodel").iterdir()) == ["100", "200"]
