"""Warm standby: protocol, command parsing, and a real promotion (real processes, real FIFO, real TF)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from daemon import contract
from daemon.config import Config
from daemon.spawner import PosixSpawner
from daemon.standby import (
    PythonTarget,
    StandbySpawner,
    encode_go,
    python_target,
    read_go,
    spawner_factory,
)

ROOT = Path(__file__).resolve().parents[1]


def test_python_target_accepts_module_and_script_only() -> None:
    assert python_target(["/v/bin/python3", "-m", "pkg.mod", "--x", "1"]) == PythonTarget(
        "/v/bin/python3", "module", "pkg.mod", ("--x", "1"))
    assert python_target(["python", "train.py", "a"]) == PythonTarget("python", "script", "train.py", ("a",))
    assert python_target(["python", "-c", "print(1)"]) is None
    assert python_target(["python", "-u", "-m", "x"]) is None
    assert python_target(["bash", "train.sh"]) is None
    assert python_target(["python"]) is None


def test_go_message_round_trips_through_a_real_pipe() -> None:
    r, w = os.pipe()
    try:
        os.write(w, encode_go(["python", "-m", "m"], {"A": "1", contract.ENV_RESTART: "2"}, "/tmp"))
        msg = read_go(r)
    finally:
        os.close(r)
        os.close(w)
    assert msg == {"argv": ["python", "-m", "m"], "env": {"A": "1", contract.ENV_RESTART: "2"}, "cwd": "/tmp"}
    with pytest.raises(ValueError, match="exceeds"):
        encode_go(["python", "x.py"], {"BIG": "x" * 70_000}, None)


def test_factory_only_when_configured() -> None:
    assert spawner_factory(Config()) is None
    cfg = Config().replace("worker", warm_standby=True)
    factory = spawner_factory(cfg)
    assert factory is not None
    spawner = factory(None)
    assert isinstance(spawner, StandbySpawner)
    spawner.close()


WORKER = r"""
import json, os, sys
tf_loaded = "tensorflow" in sys.modules  # only the standby has it: a cold start stays cheap
if tf_loaded:
    from tensorflow.python.eager import context
fields = {"pid": os.getpid(), "argv": sys.argv[1:], "restart": os.environ.get("PREEMPTD_RESTART"),
          "resume": os.environ.get("PREEMPTD_RESUME"), "keep": os.environ.get("KEEP_ME"),
          "tf_loaded": tf_loaded,
          # Proof that the standby never created a TF context (never touched a GPU) before the go.
          "tf_context": context.context()._context_handle is not None if tf_loaded else None,
          "cwd": os.getcwd()}
with open(os.environ["OUT_FILE"], "a") as f:
    f.write(json.dumps(fields) + "\n")
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
"""


def _wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.tf
@pytest.mark.timeout(300)
def test_standby_is_promoted_with_the_per_start_env(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.jsonl"
    state = tmp_path / "state"
    state.mkdir()
    argv = [sys.executable, str(script), "--flag"]
    base = {"PYTHONPATH": str(ROOT), "KEEP_ME": "yes", "OUT_FILE": str(out), "TF_CPP_MIN_LOG_LEVEL": "2",
            "PATH": os.environ.get("PATH", "")}
    spawner = StandbySpawner(PosixSpawner(None), state, delay=0.0)
    workers = []
    try:
        # First start: cold (no standby yet); a standby is planned right away (delay 0).
        w1 = spawner.spawn(argv, {**base, contract.ENV_RESTART: "0", contract.ENV_RESUME: ""}, str(tmp_path))
        workers.append(w1)
        assert _wait(lambda: w1.poll() is not None, 120)
        assert _wait(lambda: bool(list(state.glob("standby-*.fifo.ready"))), 240), "standby never ready"
        standby_pid = spawner._standby.worker.pid  # type: ignore[union-attr]
        # Second start: the standby takes over, in its own process, with the new per-start env.
        w2 = spawner.spawn(argv, {**base, contract.ENV_RESTART: "1", contract.ENV_RESUME: "/ck/ckpt-1"},
                           str(tmp_path))
        workers.append(w2)
        assert w2.pid == standby_pid
        assert _wait(lambda: w2.poll() is not None, 60)
        assert w2.poll() is not None and w2.poll().code == 0  # type: ignore[union-attr]
        # A changed environment (not per-start) is never served by a stale standby.
        assert _wait(lambda: spawner._standby is not None, 30)
        stale = spawner._standby.worker.pid  # type: ignore[union-attr]
        w3 = spawner.spawn(argv, {**base, "KEEP_ME": "changed", contract.ENV_RESTART: "2"}, str(tmp_path))
        workers.append(w3)
        assert w3.pid != stale
        assert _wait(lambda: w3.poll() is not None, 120)
    finally:
        spawner.close()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGKILL)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    by_pid = {line["pid"]: line for line in lines}
    first, promoted = by_pid[w1.pid], by_pid[w2.pid]
    assert first["restart"] == "0" and first["argv"] == ["--flag"]
    assert promoted == {"pid": standby_pid, "argv": ["--flag"], "restart": "1", "resume": "/ck/ckpt-1",
                        "keep": "yes", "tf_loaded": True, "tf_context": False, "cwd": str(tmp_path)}
    assert by_pid[w3.pid]["keep"] == "changed"
    assert not list(state.glob("standby-*")), "standby files left behind"
