"""Recovery time: worker crash -> first training step after restore, against a cold start.

Run: ``.venv/bin/python -m tests.bench.bench_recovery [--quick]``.

The job is service.examples.custom_loop (TensorFlow, restores model, optimizer, data
iterator and RNG). Measured side by side, interleaved round by round, medians:

- anchor: a cold start of the same job without preemptd — spawn `python -m
  service.examples.custom_loop` on a copy of the checkpoint dir, until its first
  training step after the restore;
- preemptd: SIGKILL the worker of `preemptd run` (restart backoff 0), until the new
  worker's first training step after the restore;
- preemptd with ``worker.warm_standby = true``: the same, with a standby that has
  TensorFlow and Keras imported taking over (the bench waits until it is ready).

Both clocks start when the kill/spawn is issued and stop when the step's log line is read.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from daemon import contract
from tests.bench import common
from tests.bench.common import row as _row
from tests.chaos.procs import PY, LoggedProcess, base_env, training_command

STEPS = 10_000_000  # never finishes: the bench kills it
EVERY = 10
STEP_DELAY = 0.2  # slow steps: the background workers cost little CPU between measurements
WORKER_ENV = {"EXAMPLE_LOG_EVERY": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
              "EXAMPLE_STEP_DELAY": f"{STEP_DELAY:g}"}
WAIT = 600.0


class _Daemon:
    """`preemptd run` on the job, with or without a warm standby."""

    def __init__(self, work: Path, standby: bool) -> None:
        self.work = work
        self.state = work / "state"
        self.ckpt = work / "ckpt"
        work.mkdir(parents=True)
        cfg = work / "preemptd.toml"
        cmd = training_command(STEPS, EVERY)
        cfg.write_text("\n".join([
            "[worker]",
            f"command = {json.dumps(cmd)}",
            f"warm_standby = {'true' if standby else 'false'}",
            "env = {" + ", ".join(f'{k} = "{v}"' for k, v in WORKER_ENV.items()) + "}",
            "[checkpoint]", f"dir = {json.dumps(str(self.ckpt))}", f"every_steps = {EVERY}",
            "every_seconds = 0",
            "[restart]", "max_restarts = 1000", "backoff_initial_seconds = 0", "backoff_max_seconds = 0",
            "[preemption]", "sources = []",
            "[daemon]", f"state_dir = {json.dumps(str(self.state))}", 'log_format = "json"',
        ]) + "\n")
        self.proc = LoggedProcess([PY, "-m", "daemon", "run", "--config", str(cfg)], work / "stderr",
                                  base_env())

    def worker_pid(self) -> int:
        started = [e for e in self.proc.events if e["event"] == "worker.started"]
        return int(started[-1]["pid"])

    def wait_step(self, since: int, timeout: float = WAIT) -> dict[str, Any]:
        ev = self.proc.wait_for(lambda e: e["event"] == "train.step", timeout, since=since)
        if ev is None:
            raise RuntimeError(f"no training step within {timeout} s; see {self.work / 'stderr'}")
        return ev

    def wait_checkpoint(self) -> None:
        end = time.monotonic() + WAIT
        while contract.newest_valid(self.ckpt) is None:
            if time.monotonic() > end or self.proc.eof:
                raise RuntimeError(f"no checkpoint; see {self.work / 'stderr'}")
            time.sleep(0.1)

    def wait_standby_ready(self) -> None:
        end = time.monotonic() + WAIT
        while not list(self.state.glob("standby-*.fifo.ready")):
            if time.monotonic() > end or self.proc.eof:
                raise RuntimeError(f"the warm standby never became ready; see {self.work / 'stderr'}")
            time.sleep(0.05)

    def rss_mib(self) -> tuple[float, float] | None:
        """(standby RSS, worker RSS) in MiB, while the standby waits and the worker trains."""
        started = [e for e in self.proc.events if e["event"] == "standby.started"]
        if not started:
            return None
        try:
            return (psutil.Process(int(started[-1]["pid"])).memory_info().rss / 2**20,
                    psutil.Process(self.worker_pid()).memory_info().rss / 2**20)
        except psutil.Error:
            return None

    def crash(self) -> float:
        """SIGKILL the worker; seconds until the next worker's first step after its restore."""
        self.wait_step(0)
        pid = self.worker_pid()
        since = len(self.proc.events)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # The dead worker's last lines may still be in the pipe: count only the new worker's steps.
        started = self.proc.wait_for(lambda e: e["event"] == "worker.started" and e.get("pid") != pid,
                                     WAIT, since=since)
        if started is None:
            raise RuntimeError(f"no new worker after the crash; see {self.work / 'stderr'}")
        ev = self.wait_step(self.proc.events.index(started))
        promoted = [e for e in self.proc.events[since:] if e["event"] == "standby.promoted"]
        self.promoted = bool(promoted)
        return float(ev["_t"]) - t0


def _cold(work: Path, source_ckpt: Path, n: int) -> float:
    """Spawn the bare job on a copy of the checkpoints; seconds to its first step after restore."""
    newest = contract.newest_valid(source_ckpt)
    assert newest is not None
    d = work / f"cold-{n}"
    d.mkdir(parents=True)
    shutil.copytree(newest[0].path, d / newest[0].path.name)
    proc = LoggedProcess(training_command(STEPS, EVERY, d), work / f"cold-{n}.stderr", base_env(WORKER_ENV))
    try:
        ev = proc.wait_for(lambda e: e["event"] == "train.step", WAIT)
        restored = [e for e in proc.events if e["event"] == "checkpoint.restored"]
        if ev is None or not restored:
            raise RuntimeError(f"cold start did not restore and step; see {work / f'cold-{n}.stderr'}")
        return float(ev["_t"]) - proc.started
    finally:
        proc.close()
        shutil.rmtree(d, ignore_errors=True)


def measure(quick: bool = False) -> list[dict[str, Any]]:
    rounds = 3 if quick else 7
    work = Path(tempfile.mkdtemp(prefix="preemptd-bench-recovery-"))
    plain = warm = None
    cold: list[float] = []
    crash: list[float] = []
    standby: list[float] = []
    misses = 0
    rss: tuple[float, float] | None = None
    try:
        plain = _Daemon(work / "plain", standby=False)
        warm = _Daemon(work / "warm", standby=True)
        plain.wait_checkpoint()
        warm.wait_checkpoint()
        for n in range(rounds):
            warm.wait_standby_ready()  # no standby import running during the measurements
            if rss is None:
                rss = warm.rss_mib()
            if n % 2 == 0:  # alternate the order: drift in the machine's load cancels out
                cold.append(_cold(work, plain.ckpt, n))
                crash.append(plain.crash())
            else:
                crash.append(plain.crash())
                cold.append(_cold(work, plain.ckpt, n))
            warm.wait_standby_ready()
            standby.append(warm.crash())
            misses += 0 if warm.promoted else 1
            print(f"bench_recovery: round {n + 1}/{rounds}: cold {cold[-1]:.2f} s, "
                  f"preemptd {crash[-1]:.2f} s, warm standby {standby[-1]:.2f} s", flush=True)
    finally:
        for d in (plain, warm):
            if d is not None:
                d.proc.close()
        shutil.rmtree(work, ignore_errors=True)
    c = statistics.median(cold)
    anchor = "cold start without preemptd (spawn -> first step after restore), median"
    rows = [
        _row(f"crash -> first step after restore, preemptd (backoff 0), median of {rounds}",
             statistics.median(crash), "s", anchor, c, "<= 1.05"),
        _row(f"crash -> first step after restore, warm standby, median of {rounds}"
             + (f" ({misses} not promoted)" if misses else ""),
             statistics.median(standby), "s", anchor, c, "<= 0.35"),
        _row("crash -> first step, preemptd, max", max(crash), "s", "cold start, max", max(cold), "-"),
        _row("crash -> first step, warm standby, max", max(standby), "s", "cold start, max", max(cold), "-"),
    ]
    if rss is not None:
        rows.append(_row("warm standby RSS while waiting (TF + Keras imported)", rss[0], "MiB",
                         "the training worker's RSS", rss[1], "-"))
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
