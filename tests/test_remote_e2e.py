"""End to end: `preemptd run` with `[remote]` against a real S3 server on 127.0.0.1.

Train, take a preemption checkpoint (SIGTERM), lose the VM's disk (delete the checkpoint
and state dirs), start again: the daemon fetches the checkpoint from the remote and the
worker resumes from it.
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import contract
from tests.remote_s3 import S3Server, credentials_env
from tests.workers.harness import Daemon, worker_cmd


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    srv = S3Server().start()
    yield srv
    srv.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def write_config(path: Path, bucket: str, endpoint: str, extra: str = "", remote: str = "") -> Path:
    path.write_text(
        "[remote]\n"
        f'url = "s3://{bucket}/run-1"\n'
        f'endpoint_url = "{endpoint}"\n'
        "backoff_initial_seconds = 0.2\n"
        "keep = 2\n" + remote +
        "[preemption]\n"
        "sources = []\n"
        "[stop]\n"
        "grace_seconds = 20\n" + extra
    )
    return path


def test_new_vm_resumes_from_the_remote(tmp_path: Path, server: S3Server, daemons: list[Daemon]) -> None:
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    cfg = write_config(tmp_path / "preemptd.toml", bucket, server.endpoint)
    env = {**credentials_env(), "STEP_SECONDS": "0.01"}

    vm1 = tmp_path / "vm1"
    vm1.mkdir()
    d1 = Daemon(vm1, worker_cmd("well_behaved"), config=cfg, env=env)
    daemons.append(d1)
    d1.wait_for("worker.hello")
    time.sleep(0.5)
    d1.signal(signal.SIGTERM)  # the VM is going away
    assert d1.wait(60) == 0
    committed = d1.events("checkpoint.committed")[-1]
    assert committed["reason"] == "preemption"
    uploaded = d1.wait_for("remote.uploaded", where=lambda e: e["step"] == committed["step"])
    assert uploaded["before_deadline"] is True
    final = d1.events("remote.final")[0]
    assert final["step"] == committed["step"] and final["reached_remote"] is True
    assert d1.state()["remote"]["final"]["reached_remote"] is True
    keys = server.keys(bucket, "run-1/")
    assert f"run-1/{contract.checkpoint_dirname(committed['step'])}/MANIFEST.json" in keys

    # A new VM: nothing of vm1's disk survives (checkpoints, state dir, journal).
    shutil.rmtree(vm1)
    vm2 = tmp_path / "vm2"
    vm2.mkdir()
    d2 = Daemon(vm2, worker_cmd("well_behaved"), config=cfg, env=env)
    daemons.append(d2)
    fetched = d2.wait_for("remote.fetched", timeout=30)
    assert fetched["step"] == committed["step"]
    assert fetched["source"] == f"s3://{bucket}/run-1/{contract.checkpoint_dirname(committed['step'])}"
    started = d2.wait_for("worker.started")
    assert started["resume_step"] == committed["step"]
    assert started["resume"] == str(d2.checkpoint_dir / contract.checkpoint_dirname(committed["step"]))
    d2.wait_for("worker.hello")
    first = [line for line in d2.worker_log_lines() if line["event"] == "started"][0]
    assert first["step"] == committed["step"]  # the worker itself resumed from the fetched one
    d2.signal(signal.SIGTERM)
    assert d2.wait(60) == 0
    second = d2.events("checkpoint.committed")[-1]
    assert second["step"] > committed["step"]
    assert d2.events("remote.final")[0]["reached_remote"] is True
    # Remote retention kept the two newest.
    folders = {k.split("/")[1] for k in server.keys(bucket, "run-1/")}
    assert folders == {contract.checkpoint_dirname(committed["step"]),
                       contract.checkpoint_dirname(second["step"])}


def test_dead_remote_does_not_stop_training_or_the_stop_path(
        tmp_path: Path, server: S3Server, daemons: list[Daemon]) -> None:
    cfg = write_config(tmp_path / "preemptd.toml", "no-such-bucket-x", "http://127.0.0.1:9",
                       remote="final_wait_seconds = 2\nretries = 1\n")
    d = Daemon(tmp_path, worker_cmd("well_behaved"), config=cfg,
               env={**credentials_env(), "STEP_SECONDS": "0.01"})
    daemons.append(d)
    d.wait_for("remote.fetch_failed", where=lambda e: e.get("retry") is False, timeout=60)
    d.wait_for("worker.hello", timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0  # the local checkpoint is confirmed; the remote miss is reported
    final = d.events("remote.final")[0]
    assert final["reached_remote"] is False and final["level"] == "warning"
    # Bounded by final_wait_seconds from the report (or less, once the upload gave up).
    assert final["deadline_seconds"] == 2 and final["waited_seconds"] <= 2.5


@pytest.mark.tf
@pytest.mark.slow
def test_tensorflow_training_resumes_from_the_remote_on_a_new_vm(
        tmp_path: Path, server: S3Server, daemons: list[Daemon]) -> None:
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    cfg = write_config(tmp_path / "preemptd.toml", bucket, server.endpoint,
                       "[checkpoint]\nevery_steps = 100\n")
    env = {**credentials_env(), "EXAMPLE_STEPS": "100000", "EXAMPLE_STEP_DELAY": "0.002"}
    cmd = [worker_cmd("well_behaved")[0], "-m", "service.examples.custom_loop"]
    vm1 = tmp_path / "vm1"
    vm1.mkdir()
    d1 = Daemon(vm1, cmd, config=cfg, env=env)
    daemons.append(d1)
    d1.wait_for("remote.uploaded", timeout=180, where=lambda e: e["step"] >= 200)
    d1.signal(signal.SIGTERM)
    assert d1.wait(120) == 0
    committed = d1.events("checkpoint.committed")[-1]
    assert d1.events("remote.final")[0]["reached_remote"] is True
    shutil.rmtree(vm1)
    vm2 = tmp_path / "vm2"
    vm2.mkdir()
    d2 = Daemon(vm2, cmd, config=cfg, env=env)
    daemons.append(d2)
    assert d2.wait_for("remote.fetched", timeout=60)["step"] == committed["step"]
    assert d2.wait_for("worker.started")["resume_step"] == committed["step"]
    d2.wait_for("checkpoint.committed", timeout=180, where=lambda e: e["step"] > committed["step"])
    d2.signal(signal.SIGTERM)
    assert d2.wait(120) == 0
