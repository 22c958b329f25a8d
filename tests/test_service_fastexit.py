"""The stop path skips the interpreter's slow teardown, but never hides a failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys, time
    atexit.register(time.sleep, 3)            # stands for TensorFlow's slow teardown
    from service.fastexit import FastExit
    fx = FastExit()
    fx.install()
    atexit.register(print, "user-handler-ran", flush=True)   # registered later: still runs
    mode = sys.argv[1]
    if mode != "unarmed":
        fx.arm()
    try:
        raise SystemExit(0)
    finally:
        print("finally-ran", flush=True)
        if mode == "crash":
            raise RuntimeError("cleanup failed after the stop")
""")


def _run(mode: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          timeout=60, env=env, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    return proc, time.monotonic() - t0


def test_armed_exit_skips_slow_teardown_but_runs_user_cleanup() -> None:
    proc, seconds = _run("armed")
    assert proc.returncode == 0, proc.stderr
    assert "finally-ran" in proc.stdout and "user-handler-ran" in proc.stdout
    assert seconds < 2.5  # the 3 s handler registered before the manager was skipped


@pytest.mark.parametrize("mode,code", [("unarmed", 0), ("crash", 1)])
def test_normal_teardown_when_not_armed_or_after_a_failure(mode: str, code: int) -> None:
    proc, seconds = _run(mode)
    assert proc.returncode == code, proc.stderr
    assert seconds >= 3.0
    if mode == "crash":
        assert "cleanup failed after the stop" in proc.stderr


def test_opt_out_by_env() -> None:
    import os

    proc, seconds = _run("armed", env={**os.environ, "PREEMPTD_FAST_EXIT": "0"})
    assert proc.returncode == 0 and seconds >= 3.0
