"""Benchmark of the supervisor core: crash detection, restart overhead, footprint.

Run: ``.venv/bin/python -m tests.bench.bench_supervisor [--quick]``. Each row carries an
anchor measured side by side in the same run:

- crash detection / restart overhead: a minimal Python parent that blocks in
  ``Popen.wait()`` and re-spawns at once (the floor any supervisor pays);
- RSS / idle CPU: a bare ``python -c 'sleep'`` interpreter (the floor of any Python
  daemon; supervisord is ~25 MB, torchrun's agent ~216 MB for comparison).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from tests.bench import common
from tests.bench.common import row as _row
from tests.workers.harness import PY, ROOT, Daemon, read_worker_log, worker_cmd


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _daemon_crash_loop(tmp: Path, crashes: int) -> tuple[list[float], list[float]]:
    """Detection and restart latencies (seconds) of the real daemon over `crashes` crashes."""
    d = Daemon(tmp, worker_cmd("bench_crash", "0.15"), "--max-restarts", str(crashes),
               "--backoff-initial-seconds", "0", "--backoff-max-seconds", "0", log_level="info")
    try:
        d.wait(60 + crashes)
    finally:
        d.close()
    deaths = [e["t"] for e in d.worker_log_lines() if e["event"] == "exiting"]
    exited = [_ts(e["timestamp"]) for e in d.events("worker.exited")]
    started = [_ts(e["timestamp"]) for e in d.events("worker.started")]
    detect = [b - a for a, b in zip(deaths, exited, strict=False)]
    restart = [s - x for x, s in zip(deaths, started[1:], strict=False)]
    return detect, restart


def _bare_crash_loop(tmp: Path, crashes: int) -> tuple[list[float], list[float]]:
    """The same worker under the smallest possible parent: Popen.wait(), then Popen again."""
    log = tmp / "bare.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORKER_LOG": str(log)}
    detect, restart = [], []
    proc = subprocess.Popen(worker_cmd("bench_crash", "0.15"), env=env, cwd=ROOT)
    for i in range(crashes):
        proc.wait()
        seen = time.time()
        nxt = None
        if i < crashes - 1:
            nxt = subprocess.Popen(worker_cmd("bench_crash", "0.15"), env=env, cwd=ROOT)
        spawned = time.time()
        death = [e["t"] for e in read_worker_log(log) if e["event"] == "exiting"][-1]
        detect.append(seen - death)
        if nxt is not None:
            restart.append(spawned - death)
            proc = nxt
    return detect, restart


def _cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _footprint(tmp: Path, idle_seconds: float) -> dict[str, float]:
    d = Daemon(tmp, worker_cmd("quiet", "1.0"), log_level="info")
    bare = subprocess.Popen([PY, "-c", "import time; time.sleep(3600)"])
    try:
        d.wait_for("worker.hello", timeout=30)
        time.sleep(1.0)  # let start-up settle
        dp, bp = psutil.Process(d.proc.pid), psutil.Process(bare.pid)
        guard = [c for c in dp.children() if c.name() == "preemptd-guard"]
        c0, b0, t0 = _cpu_seconds(dp), _cpu_seconds(bp), time.monotonic()
        time.sleep(idle_seconds)
        c1, b1, t1 = _cpu_seconds(dp), _cpu_seconds(bp), time.monotonic()
        out = {
            "rss": dp.memory_info().rss / 2**20,
            "uss": dp.memory_full_info().uss / 2**20,
            "bare_rss": bp.memory_info().rss / 2**20,
            "guard_uss": guard[0].memory_full_info().uss / 2**20 if guard else 0.0,
            "cpu": 100 * (c1 - c0) / (t1 - t0),
            "bare_cpu": 100 * (b1 - b0) / (t1 - t0),
        }
        d.signal(signal.SIGTERM)
        d.wait(30)
        return out
    finally:
        bare.kill()
        bare.wait()
        d.close()


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for the report (see the module docstring for what each anchor is)."""
    crashes = 8 if quick else 30
    idle = 5.0 if quick else 30.0
    with tempfile.TemporaryDirectory(prefix="pdbench-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        (tmp / "f").mkdir()
        detect, restart = _daemon_crash_loop(tmp / "a", crashes)
        bare_detect, bare_restart = _bare_crash_loop(tmp / "b", crashes)
        fp = _footprint(tmp / "f", idle)
    ms = 1000.0
    rows = [
        _row("crash detection (worker death -> worker.exited logged), median",
             statistics.median(detect) * ms, "ms", "bare Popen.wait() parent",
             statistics.median(bare_detect) * ms, "<= 50 ms"),
        _row("crash detection, max", max(detect) * ms, "ms", "bare Popen.wait() parent, max",
             max(bare_detect) * ms, "-"),
        _row("restart overhead (worker exit -> next worker exec'd, backoff 0), median",
             statistics.median(restart) * ms, "ms", "bare wait()+Popen() loop",
             statistics.median(bare_restart) * ms, "<= 100 ms"),
        _row("daemon RSS while supervising", fp["rss"], "MB", "bare python interpreter RSS",
             fp["bare_rss"], "<= 40 MB (supervisord ~25 MB, torchrun agent ~216 MB)"),
        _row("daemon USS (private memory)", fp["uss"], "MB", "-", None, "-"),
        _row("guard process USS (forked, shares pages with the daemon)", fp["guard_uss"], "MB", "-",
             None, "-"),
        _row(f"daemon idle CPU over {idle:g} s (worker heartbeat 1/s)", fp["cpu"], "% of a core",
             "bare sleeping python", fp["bare_cpu"], "<= 0.5 %"),
    ]
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
