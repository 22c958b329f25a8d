"""Benchmark of the remote mirror against a real S3-compatible server on 127.0.0.1.

Run: ``.venv/bin/python -m tests.bench.bench_remote [--quick]``. The server (moto's S3
over HTTP, tests/remote_s3.py) runs in its own process so it does not share the
client's interpreter. Anchors, measured side by side in the same run:

- upload throughput: a plain ``s3fs`` ``put`` of the same checkpoint files to the same
  server (no queue, no journal, no manifest-last commit, no checks);
- throttled upload: the configured ``bandwidth_mbps`` (the achieved rate after the
  token bucket's initial burst must not exceed it);
- preemption checkpoint, local commit -> remote commit while a throttled periodic
  upload is in flight: a plain ``s3fs`` ``put`` of the same files on an idle link.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from daemon import contract
from daemon.clock import SystemClock
from daemon.components import CheckpointReport
from daemon.config import RemoteConfig
from daemon.remote.limiter import MB, from_mbps
from daemon.remote.mirror import RemoteMirror
from daemon.remote.upload import BLOCK_BYTES, CHUNK_BYTES
from tests.bench import common
from tests.bench.common import row as _row
from tests.remote_s3 import KEY_ID, REGION, SECRET

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bench-remote"


@contextmanager
def _server() -> Iterator[str]:
    """The fake S3 server in a child process; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.remote_s3", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError("the fake S3 server did not start")
        yield f"http://127.0.0.1:{line}"
    finally:
        proc.terminate()
        proc.wait(10)


def _options() -> dict[str, Any]:
    return {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"region_name": REGION}}


def _plain_fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **_options())


def _make_checkpoint(root: Path, step: int, data_bytes: int, reason: str) -> Path:
    """A committed checkpoint (index + data shard + manifest), written beside and renamed in."""
    staging = root.parent / f"staging-{step}"
    staging.mkdir(parents=True)
    files = {}
    rng = os.urandom(MiB)  # incompressible, repeated: cheap to make
    for name, size in (("ckpt.index", 16 * 1024), ("ckpt.data-00000-of-00001", data_bytes)):
        crc = 0
        with open(staging / name, "wb") as f:
            left = size
            while left:
                chunk = rng[: min(left, MiB)]
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
        files[name] = {"size": size, "crc32": crc}
    manifest = contract.Manifest(step=step, reason=reason, created="2026-11-25T12:00:00Z", files=files)
    contract.write_json_atomic(staging / contract.MANIFEST_NAME, manifest.to_json())
    final = root / contract.checkpoint_dirname(step)
    os.rename(staging, final)
    return final


def _report(path: Path, reason: str) -> CheckpointReport:
    m = contract.read_manifest(path)
    return CheckpointReport(step=m.step, path=str(path), bytes=m.total_bytes, seconds=0.0, reason=reason)


def _wait_commit(mirror: RemoteMirror, step: int, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        last = mirror.status()["last_commit"]
        if last is not None and last["step"] == step:
            return
        time.sleep(0.005)
    raise RuntimeError(f"step {step} did not reach the remote in {timeout} s")


def _mirror(endpoint: str, work: Path, prefix: str, **kw: Any) -> RemoteMirror:
    cfg = RemoteConfig(url=f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint, keep=1000,
                       storage_options=_options(), **kw)
    m = RemoteMirror(cfg, checkpoint_dir=str(work / "ckpt"), state_dir=str(work / f"state-{prefix}"),
                     grace_seconds=30.0)
    m.start(lambda event: None)
    return m


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows: mirror upload throughput vs a plain s3fs put; throttle; preemption commit latency."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    data_bytes = (16 if quick else 64) * MiB
    reps = 2 if quick else 6
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp, _server() as endpoint:
        work = Path(tmp)
        ckpt = work / "ckpt"
        ckpt.mkdir()
        plain = _plain_fs(endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                     aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
        mirror = _mirror(endpoint, work, "mirror")

        # ---- throughput: alternate plain put and mirror upload of fresh checkpoints.
        plain_rates, mirror_rates = [], []
        step = 0
        for rep in range(reps + 1):  # rep 0 warms both clients up and is not counted
            step += 100
            path = _make_checkpoint(ckpt, step, data_bytes, "periodic")
            total = contract.read_manifest(path).total_bytes
            t_plain = t_mirror = 0.0
            for which in (("plain", "mirror") if rep % 2 else ("mirror", "plain")):  # no order bias
                t0 = time.perf_counter()
                if which == "plain":
                    plain.put(str(path), f"{BUCKET}/plain/{path.name}", recursive=True)
                    t_plain = time.perf_counter() - t0
                else:
                    mirror.on_checkpoint(_report(path, "periodic"))
                    _wait_commit(mirror, step)
                    t_mirror = time.perf_counter() - t0
            if rep:
                plain_rates.append(total / t_plain / MB)
                mirror_rates.append(total / t_mirror / MB)
            plain.rm([f"{BUCKET}/plain/{path.name}"], recursive=True)
            shutil.rmtree(path)
        rows.append(_row(
            f"mirror upload throughput ({data_bytes // MiB} MiB checkpoint, median of {reps})",
            statistics.median(mirror_rates), "MB/s",
            "plain s3fs put of the same files, same server", statistics.median(plain_rates), ">= 0.8"))

        # ---- throttled path: achieved rate vs the configured limit.
        limit = 8.0  # below what this server takes, so the limit is what binds
        throttled = _mirror(endpoint, work, "throttled", bandwidth_mbps=limit)
        step += 100
        warm = _make_checkpoint(ckpt, step, MiB, "periodic")  # client start-up not timed
        throttled.on_checkpoint(_report(warm, "periodic"))
        _wait_commit(throttled, step)
        shutil.rmtree(warm)
        step += 100
        path = _make_checkpoint(ckpt, step, data_bytes, "periodic")
        total = contract.read_manifest(path).total_bytes
        throttled.on_checkpoint(_report(path, "periodic"))
        # Steady state: from the end of the token bucket's initial burst on.
        bucket = from_mbps(limit, SystemClock(), BLOCK_BYTES + CHUNK_BYTES)
        assert bucket is not None
        burst = bucket.burst
        end = time.monotonic() + 120
        while time.monotonic() < end:
            up = throttled.status()["uploading"]
            if up is not None and up["bytes_done"] >= burst:
                t1, b1 = time.perf_counter(), up["bytes_done"]
                break
            time.sleep(0.002)
        else:
            raise RuntimeError("throttled upload did not get past its burst")
        _wait_commit(throttled, step)
        rate = (total - b1) / (time.perf_counter() - t1) / MB
        rows.append(_row(f"throttled upload rate after the burst (bandwidth_mbps = {limit:g})", rate,
                         "MB/s", "configured limit", limit, "<= 1.05"))
        shutil.rmtree(path)

        # ---- preemption checkpoint while a throttled periodic upload is in flight.
        pre_bytes = data_bytes // 4
        latencies, plain_times = [], []
        for _ in range(reps):
            step += 100
            periodic = _make_checkpoint(ckpt, step, data_bytes, "periodic")
            throttled.on_checkpoint(_report(periodic, "periodic"))
            time.sleep(0.5)  # the periodic upload is under way
            step += 100
            urgent = _make_checkpoint(ckpt, step, pre_bytes, "preemption")
            rep_ = _report(urgent, "preemption")
            throttled.on_checkpoint(rep_)
            throttled.on_final_checkpoint(rep_)
            final = throttled.status()["final"]
            if not final or not final["reached_remote"]:
                raise RuntimeError(f"preemption checkpoint did not reach the remote: {final}")
            latencies.append(final["seconds"])
            t0 = time.perf_counter()
            plain.put(str(urgent), f"{BUCKET}/plain/{urgent.name}", recursive=True)
            plain_times.append(time.perf_counter() - t0)
            _wait_commit(throttled, step - 100)  # let the periodic one finish before the next rep
        rows.append(_row(
            f"preemption ckpt ({pre_bytes // MiB} MiB) local commit -> remote commit, "
            "throttled periodic upload in flight",
            statistics.median(latencies), "s",
            "plain s3fs put of the same files, idle link", statistics.median(plain_times), "<= 2"))
        throttled.stop()
        mirror.stop()
    return rows


if __name__ == "__main__":
    raise SystemExit(common.main(measure, __doc__))
