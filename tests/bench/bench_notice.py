"""Benchmark: cloud preemption notice -> committed checkpoint, per provider.

Run: ``.venv/bin/python -m tests.bench.bench_notice [--quick]``.

For each provider the real daemon supervises the bundled TensorFlow example
(`service.examples.custom_loop`) with its notice source pointed at the fake
metadata server (real HTTP on 127.0.0.1), at the default poll intervals (GCE long
poll, AWS 5 s, Azure 1 s). The fake is flipped to "preempted" at a random moment;
we time flip -> `preemption.notice` and flip -> `checkpoint.committed`
(reason preemption) from the daemon's own log timestamps.

Anchors, measured side by side in the same run:

- detection: a bare stdlib client doing the same long poll / the same poll loop
  against the same fake (the floor of any watcher with that interval);
- notice -> committed: the save itself, as the worker reports it (`seconds`), so
  the ratio shows what detection, signalling and the step boundary add.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.bench import common
from tests.bench.common import row as _row
from tests.fakes import FakeAws, FakeAzure, FakeGce, FakeMetadataServer
from tests.workers.harness import PY, Daemon

POLL = {"gce": 0.0, "aws": 5.0, "azure": 1.0}  # the config defaults
TF_WORKER = [PY, "-m", "service.examples.custom_loop", "--steps", "10000000", "--log-every", "10000000"]


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _fake(provider: str) -> FakeMetadataServer:
    return {"gce": FakeGce, "aws": FakeAws, "azure": FakeAzure}[provider]()


def _flip(fake: FakeMetadataServer, on: bool) -> None:
    if isinstance(fake, FakeGce):
        fake.set_value("instance/preempted", "TRUE" if on else "FALSE")
    elif isinstance(fake, FakeAws):
        fake.interrupt() if on else fake.withdraw()
    elif isinstance(fake, FakeAzure):
        if on:
            fake.preempt()
        else:
            for e in list(fake.events):
                fake.remove(e["EventId"])


# ------------------------------------------------------------------ daemon runs

class RunFailed(Exception):
    """One daemon run did not give a measurement (the message says what was seen)."""


def _daemon_run(tmp: Path, provider: str) -> dict[str, float]:
    """One preemption of the TF example under the daemon; seconds from the flip."""
    with _fake(provider) as fake:
        cfg = tmp / "preemptd.toml"
        cfg.write_text(f'[preemption]\nsources = ["{provider}"]\n{provider}_url = "{fake.url}"\n')
        d = Daemon(tmp, TF_WORKER, config=cfg, env={"EXAMPLE_STEP_DELAY": "0.005"}, log_level="info")
        try:
            try:
                d.wait_for("worker.hello", timeout=300)
            except AssertionError:
                steps = [e.get("step") for e in d.events("worker.progress")]
                raise RunFailed(
                    f"{provider}: worker never said hello in 300 s (progress steps {steps})") from None
            # Past the first steps (tf.function tracing makes step 1 take seconds), then a
            # random poll phase.
            time.sleep(6.0 + random.uniform(0, max(POLL[provider], 0.5)))
            flipped = time.time()
            _flip(fake, True)
            d.wait(timeout=120)
            notice = d.events("preemption.notice")[0]
            saves = [e for e in d.events("checkpoint.committed") if e["reason"] == "preemption"]
            if not saves:
                seen = [(e["event"], e.get("reason"), e.get("exit_code")) for e in d.events()]
                raise RunFailed(f"{provider}: no preemption checkpoint; events: {seen}")
            committed = saves[-1]
            stopped = d.events("daemon.stopped")[0]
            return {
                "notice": _ts(notice["timestamp"]) - flipped,
                "committed": _ts(committed["timestamp"]) - flipped,
                "stopped": _ts(stopped["timestamp"]) - flipped,
                "save": float(committed["seconds"]),
            }
        finally:
            d.close()


# ------------------------------------------------------------------ bare anchor

def _request(url: str, method: str, path: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _bare_watch(provider: str, url: str, seen: threading.Event, stop: threading.Event) -> None:
    """The simplest correct watcher: same requests, same interval, nothing else."""
    if provider == "gce":
        h = {"Metadata-Flavor": "Google"}
        while not stop.is_set():
            path = "/computeMetadata/v1/instance/preempted?wait_for_change=true&timeout_sec=2"
            if _request(url, "GET", path, h, 5)[1] == b"TRUE":
                seen.set()
                return
        return
    if provider == "aws":
        _, token = _request(url, "PUT", "/latest/api/token",
                            {"X-aws-ec2-metadata-token-ttl-seconds": "600"}, 2)
        check: Callable[[], bool] = lambda: _request(  # noqa: E731
            url, "GET", "/latest/meta-data/spot/instance-action",
            {"X-aws-ec2-metadata-token": token.decode()}, 2)[0] == 200
    else:
        check = lambda: bool(json.loads(_request(  # noqa: E731
            url, "GET", "/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"}, 2)[1])
            ["Events"])
    while not stop.is_set():
        if check():
            seen.set()
            return
        stop.wait(POLL[provider])


def _bare_detect(provider: str, flips: int) -> list[float]:
    out = []
    with _fake(provider) as fake:
        for _ in range(flips):
            _flip(fake, False)
            seen, stop = threading.Event(), threading.Event()
            t = threading.Thread(target=_bare_watch, args=(provider, fake.url, seen, stop), daemon=True)
            t.start()
            time.sleep(0.3 + random.uniform(0, max(POLL[provider], 0.2)))
            flipped = time.monotonic()
            _flip(fake, True)
            seen.wait(30)
            out.append(time.monotonic() - flipped)
            stop.set()
            t.join(5)
    return out


# ------------------------------------------------------------------ report

def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows per provider: detection, notice -> committed, excess over the save."""
    runs = 1 if quick else 3
    flips = 3 if quick else 10
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pdbench-notice-", dir="/tmp") as tmpdir:
        for provider in ("gce", "aws", "azure"):
            results, failed = [], 0
            for i in range(runs + 2):  # two spare attempts for a run that goes wrong
                if len(results) == runs:
                    break
                run_dir = Path(tmpdir) / f"{provider}-{i}"
                run_dir.mkdir()
                try:
                    results.append(_daemon_run(run_dir, provider))
                except RunFailed as exc:
                    failed += 1
                    print(f"bench_notice: run failed: {exc}", file=sys.stderr)
            if not results:
                raise RuntimeError(f"bench_notice: every {provider} run failed")
            bare = statistics.median(_bare_detect(provider, flips))
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            runs_done = len(results)
            poll = POLL[provider]
            allowance = 0.5 if provider == "gce" else poll
            label = {"gce": "GCE (long poll)", "aws": "AWS (5 s poll)", "azure": "Azure (1 s poll)"}[provider]
            rows += [
                _row(f"{label}: flip -> preemption.notice, median of {runs_done}", med["notice"], "s",
                     f"bare stdlib watcher, same interval, median of {flips}", bare,
                     "<= 0.5 s" if provider == "gce" else f"<= {poll:g} s"),
                _row(f"{label}: flip -> checkpoint.committed (TF example), median of {runs_done}",
                     med["committed"], "s", "the save itself (worker-reported seconds)", med["save"],
                     f"<= {allowance:g} s + save"),
                _row(f"{label}: flip -> committed minus the save", med["committed"] - med["save"], "s",
                     "-", None, f"<= {allowance:g} s"),
                _row(f"{label}: flip -> daemon.stopped (worker exited)", med["stopped"], "s",
                     "provider window", {"gce": 30.0, "aws": 120.0, "azure": 30.0}[provider],
                     "< window"),
            ]
            if failed:
                rows.append(_row(f"{label}: runs without a measurement", failed, "runs", "-", None, "0"))
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
