"""The remote mirror against a real S3-compatible server on 127.0.0.1 (moto over HTTP).

Real uploads and downloads through fsspec/s3fs, real checkpoint folders in the layout
of daemon.contract, failures injected at the server: 500s, the server dying mid-upload,
manifest-less and corrupt remote folders.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import contract
from daemon.components import CheckpointReport
from daemon.config import RemoteConfig
from daemon.remote.fetch import fetch_newest
from daemon.remote.mirror import RemoteMirror
from daemon.remote.store import open_store
from tests.remote_s3 import KEY_ID, SECRET, S3Server, credentials_env

MiB = 1 << 20
# The SDK's own retries off, so each injected failure reaches the mirror's retry/backoff at once.
NO_SDK_RETRY = {"config_kwargs": {"connect_timeout": 2, "retries": {"total_max_attempts": 1}}}


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    srv = S3Server().start()
    yield srv
    srv.stop()


@pytest.fixture
def s3(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    for key, value in credentials_env().items():
        monkeypatch.setenv(key, value)
    server.clear_faults()
    if server._server is None:  # a test stopped it and failed before restarting
        server.start()
    yield server
    server.clear_faults()
    if server._server is None:
        server.start()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def make_checkpoint(root: Path, step: int, sizes: dict[str, int] | None = None,
                    reason: str = "periodic", seed: int = 0) -> Path:
    """A committed checkpoint folder in the contract's layout (payload: plain bytes)."""
    sizes = sizes or {"ckpt.index": 2000, "ckpt.data-00000-of-00001": 300_000}
    final = root / contract.checkpoint_dirname(step)
    tmp = root / contract.temp_dirname(step)
    tmp.mkdir(parents=True)
    files = {}
    for i, (name, size) in enumerate(sorted(sizes.items())):
        block = (f"{step}-{seed}-{i}-".encode() * 64)[:4096] or b"x"
        data = (block * (size // len(block) + 1))[:size]
        (tmp / name).write_bytes(data)
        files[name] = {"size": size, "crc32": zlib.crc32(data)}
    manifest = contract.Manifest(step=step, reason=reason, created="2026-11-25T12:00:00Z", files=files)
    contract.write_json_atomic(tmp / contract.MANIFEST_NAME, manifest.to_json())
    os.rename(tmp, final)
    return final


def report(path: Path, reason: str = "periodic") -> CheckpointReport:
    m = contract.read_manifest(path)
    return CheckpointReport(step=m.step, path=str(path), bytes=m.total_bytes, seconds=0.1, reason=reason)


def wait_until(pred: Callable[[], Any], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


class Env:
    """One test's checkpoint dir, state dir and mirrors (stopped at the end)."""

    def __init__(self, tmp: Path, s3: S3Server, bucket: str) -> None:
        self.tmp = tmp
        self.s3 = s3
        self.bucket = bucket
        self.ckpt = tmp / "ckpt"
        self.ckpt.mkdir()
        self.state = tmp / "state"
        self.mirrors: list[RemoteMirror] = []

    def config(self, **kw: Any) -> RemoteConfig:
        base: dict[str, Any] = dict(url=f"s3://{self.bucket}/run", endpoint_url=self.s3.endpoint,
                                    backoff_initial_seconds=0.2, backoff_max_seconds=1.0, keep=3)
        base.update(kw)
        return RemoteConfig(**base)

    def mirror(self, start: bool = True, grace: float = 10.0, **kw: Any) -> RemoteMirror:
        m = RemoteMirror(self.config(**kw), checkpoint_dir=str(self.ckpt), state_dir=str(self.state),
                         grace_seconds=grace)
        self.mirrors.append(m)
        if start:
            m.start(lambda event: None)
        return m

    def remote_keys(self, step: int | None = None) -> dict[str, int]:
        prefix = "run/" + (contract.checkpoint_dirname(step) + "/" if step is not None else "")
        return self.s3.keys(self.bucket, prefix)

    def committed_remote(self, step: int) -> bool:
        return f"run/{contract.checkpoint_dirname(step)}/{contract.MANIFEST_NAME}" in self.remote_keys(step)

    def close(self) -> None:
        for m in self.mirrors:
            m.stop()


@pytest.fixture
def env(tmp_path: Path, s3: S3Server, bucket: str) -> Iterator[Env]:
    e = Env(tmp_path, s3, bucket)
    yield e
    e.close()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in list(logs) if e["event"] == name]


# ------------------------------------------------------------------ upload


def test_upload_commits_files_then_manifest_last(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100, {"a.index": 1000, "b.data": 3 * MiB + 17})
    env.s3.requests.clear()
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(path))
        wait_until(lambda: events(logs, "remote.uploaded"))
    keys = env.remote_keys(100)
    prefix = "run/ckpt-000000000100/"
    assert keys == {prefix + "a.index": 1000, prefix + "b.data": 3 * MiB + 17,
                    prefix + "MANIFEST.json": (path / "MANIFEST.json").stat().st_size}
    client = env.s3.client()
    body = client.get_object(Bucket=env.bucket, Key=prefix + "MANIFEST.json")["Body"].read()
    assert body == (path / "MANIFEST.json").read_bytes()
    # The commit point is the last write into the folder.
    writes = [p for meth, p in env.s3.requests if meth in ("PUT", "POST") and "ckpt-000000000100" in p]
    assert writes[-1].endswith("/MANIFEST.json")
    assert sum(1 for p in writes if p.endswith("/MANIFEST.json")) == 1
    up = events(logs, "remote.uploaded")[0]
    assert up["step"] == 100 and up["bytes"] == 1000 + 3 * MiB + 17 and up["already"] is False
    assert up["path"] == f"s3://{env.bucket}/run/ckpt-000000000100"
    st = m.status()
    assert st["bytes_uploaded"] == 1000 + 3 * MiB + 17 and st["uploads"] == 1 and st["queue"] == []
    assert st["last_commit"]["step"] == 100 and st["url"] == f"s3://{env.bucket}/run"
    json.dumps(st)  # goes into the state file


def test_already_uploaded_checkpoint_is_not_sent_again(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100)
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(path))
        wait_until(lambda: events(logs, "remote.uploaded"))
        m.stop()
        env.s3.requests.clear()
        # A restarted daemon re-checks the newest local checkpoint against the remote.
        env.mirror()
        wait_until(lambda: len(events(logs, "remote.uploaded")) == 2)
    again = events(logs, "remote.uploaded")[1]
    assert again["already"] is True and again["sent_bytes"] == 0
    assert not [p for meth, p in env.s3.requests if meth == "PUT"]


def test_committed_remote_folder_missing_a_file_is_repaired(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100)
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(path))
        # Idle first: the start-up scan may have queued the same step as the report.
        wait_until(lambda: events(logs, "remote.uploaded") and not m.status()["queue"]
                   and not m.status()["uploading"])
        m.stop()
        before = len(events(logs, "remote.uploaded"))
        env.s3.client().delete_object(Bucket=env.bucket, Key="run/ckpt-000000000100/ckpt.index")
        env.mirror()  # the restarted daemon checks its newest checkpoint against the remote
        wait_until(lambda: len(events(logs, "remote.uploaded")) > before)
    again = events(logs, "remote.uploaded")[before]
    assert again["already"] is False and again["files"] >= 1
    assert "run/ckpt-000000000100/ckpt.index" in env.remote_keys(100)


def test_same_step_new_content_is_uncommitted_before_rewrite(env: Env) -> None:
    first = make_checkpoint(env.ckpt, 100, seed=1)
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(first))
        wait_until(lambda: events(logs, "remote.uploaded"))
        shutil.rmtree(first)
        second = make_checkpoint(env.ckpt, 100, seed=2)
        env.s3.requests.clear()
        m.on_checkpoint(report(second))
        key = "run/ckpt-000000000100/MANIFEST.json"
        want = (second / "MANIFEST.json").read_bytes()
        client = env.s3.client()
        wait_until(lambda: m.status()["queue"] == [] and m.status()["uploading"] is None
                   and env.committed_remote(100)
                   and client.get_object(Bucket=env.bucket, Key=key)["Body"].read() == want)
    ops = [(meth, p.rsplit("/", 1)[-1]) for meth, p in env.s3.requests
           if meth in ("PUT", "DELETE", "POST") and "ckpt-000000000100" in p]
    assert ops[0] == ("DELETE", "MANIFEST.json")  # un-committed before any file changes
    assert ops[-1] == ("PUT", "MANIFEST.json")
    expected = {p.name: p.read_bytes() for p in second.iterdir()}
    shutil.rmtree(second)
    got = fetch_newest(open_store(env.config()), env.ckpt)
    assert got is not None and got.step == 100
    fetched = env.ckpt / "ckpt-000000000100"
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == expected


def test_locally_deleted_checkpoint_is_skipped(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100)
    rep = report(path)
    shutil.rmtree(path)
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(rep)
        wait_until(lambda: events(logs, "remote.upload_skipped"))
    assert env.remote_keys() == {}
    assert m.status()["failures"] == 0


def test_damaged_local_checkpoint_is_never_committed_remotely(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100, {"a.data": 2 * MiB})
    with open(path / "a.data", "r+b") as f:  # same size, other bytes
        f.seek(MiB)
        f.write(b"\x00" * 64)
    with capture_logs() as logs:
        m = env.mirror(bandwidth_mbps=100)  # the streamed path checks checksums on the way
        m.on_checkpoint(report(path))
        failed = wait_until(lambda: events(logs, "remote.upload_failed"))
    assert failed[0]["retry"] is False and "checksum" in failed[0]["error"]
    assert not env.committed_remote(100)
    assert m.status()["last_error"]["step"] == 100


def test_bandwidth_limit_bounds_periodic_uploads_and_uploader_is_niced(env: Env) -> None:
    size = 12 * MiB
    with capture_logs() as logs:
        m = env.mirror(bandwidth_mbps=4)
        uploader = [t for t in threading.enumerate() if t.name == "preemptd-remote"][-1]
        assert uploader.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, uploader.native_id) >= os.getpriority(os.PRIO_PROCESS, 0) + 5
        path = make_checkpoint(env.ckpt, 100, {"a.data": size})
        t0 = time.monotonic()
        m.on_checkpoint(report(path))
        mid = wait_until(lambda: (m.status()["uploading"] or {}).get("percent"))
        assert 0 < mid <= 100 and "uploading step 100" in m.status()["summary"]
        up = wait_until(lambda: events(logs, "remote.uploaded"))[0]
        elapsed = time.monotonic() - t0
    # 4 MB/s after a burst of one 5 MiB part + one 1 MiB chunk: at least (12.6 - 6.3) / 4 = 1.6 s.
    assert elapsed >= 1.4 and up["seconds"] >= 1.4
    assert up["mbps"] <= 4 * 1.1 + 6.3 / up["seconds"]
    assert "last step 100" in m.status()["summary"]


# ------------------------------------------------------------------ failures


def test_500s_are_retried_with_backoff_then_committed(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100)
    env.s3.fail("PUT", "ckpt-000000000100/", status=500, times=3)
    with capture_logs() as logs:
        m = env.mirror(retries=6, storage_options=NO_SDK_RETRY)
        m.on_checkpoint(report(path))
        wait_until(lambda: events(logs, "remote.uploaded"), timeout=40)
    failed = events(logs, "remote.upload_failed")
    assert [f["attempt"] for f in failed] == [1, 2, 3]
    assert [f["retry_in_seconds"] for f in failed] == [0.2, 0.4, 0.8]  # doubling backoff
    assert "internal error" in failed[0]["error"]
    assert env.committed_remote(100)
    assert m.status()["failures"] == len(failed)


def test_gives_up_after_retries_and_says_so(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100)
    env.s3.fail("PUT", "ckpt-000000000100/", status=500, times=1000)
    with capture_logs() as logs:
        m = env.mirror(retries=1, storage_options=NO_SDK_RETRY)
        m.on_checkpoint(report(path))
        final = wait_until(
            lambda: [e for e in events(logs, "remote.upload_failed") if e.get("retry") is False], timeout=40)
    assert final[0]["attempt"] == 2
    assert not env.committed_remote(100)
    assert m.status()["queue"] == []


def test_server_dies_mid_upload_partial_never_restored_then_completes(env: Env, tmp_path: Path) -> None:
    old = make_checkpoint(env.ckpt, 100)
    with capture_logs() as logs:
        m = env.mirror(bandwidth_mbps=4, backoff_initial_seconds=3.0, backoff_max_seconds=3.0, retries=10,
                       storage_options=NO_SDK_RETRY)
        m.on_checkpoint(report(old))
        wait_until(lambda: events(logs, "remote.uploaded"))
        big = make_checkpoint(env.ckpt, 200, {"a.index": 1000, "b.data": 12 * MiB})
        m.on_checkpoint(report(big))
        # Kill the server in the middle of the big file (streamed in 5 MiB parts).
        wait_until(lambda: (m.status()["uploading"] or {}).get("bytes_done", 0) > 9 * MiB)
        env.s3.stop()
        wait_until(lambda: events(logs, "remote.upload_failed"), timeout=60)
        env.s3.start()
        # In the backoff window: what is on the remote is not a checkpoint.
        keys = env.remote_keys(200)
        assert "run/ckpt-000000000200/MANIFEST.json" not in keys
        fresh = tmp_path / "new-vm"
        with capture_logs() as fetch_logs:
            got = fetch_newest(open_store(env.config()), fresh)
        assert got is not None and got.step == 100  # the older complete one, not the partial
        # The small file went first and is there: a folder, but not a checkpoint.
        assert "run/ckpt-000000000200/a.index" in keys
        assert [e["step"] for e in events(fetch_logs, "remote.fetch_rejected")] == [200]
        assert sorted(os.listdir(fresh)) == ["ckpt-000000000100"]
        wait_until(lambda: [e for e in events(logs, "remote.uploaded") if e["step"] == 200], timeout=60)
    assert env.committed_remote(200)
    shutil.rmtree(fresh)
    got = fetch_newest(open_store(env.config()), fresh)
    assert got is not None and got.step == 200
    contract.verify(fresh / "ckpt-000000000200")


def test_manifest_less_remote_folder_is_never_restored(env: Env, tmp_path: Path) -> None:
    path = make_checkpoint(env.ckpt, 100)
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(path))
        wait_until(lambda: events(logs, "remote.uploaded"))
    client = env.s3.client()
    # A newer folder with every file but no manifest (an upload cut before its commit).
    for name in ("ckpt.index", "ckpt.data-00000-of-00001"):
        client.put_object(Bucket=env.bucket, Key=f"run/ckpt-000000000300/{name}", Body=b"x" * 100)
    shutil.rmtree(env.ckpt)
    with capture_logs() as logs:
        m2 = env.mirror(start=False)
        m2.before_worker_start(str(env.ckpt))
    rejected = events(logs, "remote.fetch_rejected")
    assert [e["step"] for e in rejected] == [300] and "no manifest" in rejected[0]["why"]
    fetched = events(logs, "remote.fetched")[0]
    assert fetched["step"] == 100 and fetched["source"] == f"s3://{env.bucket}/run/ckpt-000000000100"
    assert sorted(os.listdir(env.ckpt)) == ["ckpt-000000000100"]
    assert m2.status()["fetched"]["step"] == 100


def test_corrupt_remote_checkpoint_falls_back_to_older(env: Env) -> None:
    with capture_logs() as logs:
        m = env.mirror()
        for step in (100, 200):
            m.on_checkpoint(report(make_checkpoint(env.ckpt, step)))
            wait_until(lambda s=step: [e for e in events(logs, "remote.uploaded") if e["step"] == s])
    client = env.s3.client()
    key = "run/ckpt-000000000200/ckpt.data-00000-of-00001"
    data = bytearray(client.get_object(Bucket=env.bucket, Key=key)["Body"].read())
    data[100] ^= 0xFF  # same size, one bit flipped: only the checksum can tell
    client.put_object(Bucket=env.bucket, Key=key, Body=bytes(data))
    shutil.rmtree(env.ckpt)
    with capture_logs() as logs:
        env.mirror(start=False).before_worker_start(str(env.ckpt))
    rejected = events(logs, "remote.fetch_rejected")
    assert [e["step"] for e in rejected] == [200] and "checksum" in rejected[0]["why"]
    assert events(logs, "remote.fetched")[0]["step"] == 100
    assert sorted(os.listdir(env.ckpt)) == ["ckpt-000000000100"]  # no staging left behind


def test_fetch_only_without_a_valid_local_checkpoint(env: Env) -> None:
    with capture_logs() as logs:
        m = env.mirror()
        m.on_checkpoint(report(make_checkpoint(env.ckpt, 300)))
        wait_until(lambda: events(logs, "remote.uploaded"))
    shutil.rmtree(env.ckpt)
    make_checkpoint(env.ckpt, 100)
    with capture_logs() as logs:
        env.mirror(start=False).before_worker_start(str(env.ckpt))
    assert events(logs, "remote.fetched") == []
    # A damaged local one does not count: the remote one replaces the same-step folder.
    shutil.rmtree(env.ckpt)
    bad = make_checkpoint(env.ckpt, 300)
    (bad / "ckpt.index").write_bytes(b"short")
    with capture_logs() as logs:
        env.mirror(start=False).before_worker_start(str(env.ckpt))
    assert events(logs, "remote.fetched")[0]["step"] == 300
    contract.verify(env.ckpt / "ckpt-000000000300")


def test_empty_remote_and_dead_remote_at_start(env: Env) -> None:
    with capture_logs() as logs:
        env.mirror(start=False).before_worker_start(str(env.ckpt))
    assert [e["event"] for e in logs] == ["remote.fetch_empty"]
    with capture_logs() as logs:
        m = env.mirror(start=False, endpoint_url="http://127.0.0.1:9", retries=1,
                       backoff_initial_seconds=0.1, storage_options={
                           "config_kwargs": {"connect_timeout": 1, "retries": {"total_max_attempts": 1}}})
        t0 = time.monotonic()
        m.before_worker_start(str(env.ckpt))
        assert time.monotonic() - t0 < 60
    failed = events(logs, "remote.fetch_failed")
    assert [f["attempt"] for f in failed] == [1, 2] and failed[-1]["retry"] is False


# ------------------------------------------------------------------ resume, priority, deadline


def test_upload_resumes_after_daemon_restart_without_resending_files(env: Env) -> None:
    # More than the limiter's burst (6.3 MB), so the upload is still going when stopped.
    sizes = {f"shard-{i}.data": MiB for i in range(12)}
    path = make_checkpoint(env.ckpt, 100, sizes)
    with capture_logs() as logs:
        m = env.mirror(bandwidth_mbps=1.5)
        m.on_checkpoint(report(path))
        journal = env.state / "remote-journal.json"
        wait_until(lambda: journal.exists()
                   and len(json.loads(journal.read_text())["jobs"]["100"]["files"]) >= 2, timeout=30)
        m.stop()  # the daemon goes away mid-upload
        assert not env.committed_remote(100)
        sent_before = set(json.loads(journal.read_text())["jobs"]["100"]["files"])
        env.s3.requests.clear()
        env.mirror(bandwidth_mbps=50)
        up = wait_until(lambda: events(logs, "remote.uploaded"), timeout=30)[0]
    assert events(logs, "remote.resumed")[0]["steps"] == [100]
    assert up["resumed"] is True and up["skipped_files"] >= len(sent_before) >= 2
    resent = {p.rsplit("/", 1)[-1] for meth, p in env.s3.requests if meth == "PUT"}
    assert not resent & sent_before
    assert env.committed_remote(100)
    assert "100" not in json.loads(journal.read_text())["jobs"]


def test_preemption_checkpoint_jumps_the_queue_and_meets_the_deadline(env: Env) -> None:
    with capture_logs() as logs:
        m = env.mirror(bandwidth_mbps=2, keep=5)
        slow = make_checkpoint(env.ckpt, 100, {"big.data": 9 * MiB})
        m.on_checkpoint(report(slow))
        # Past the limiter's burst (one part + one chunk): now it is throttled.
        wait_until(lambda: (m.status()["uploading"] or {}).get("bytes_done", 0) > 7 * MiB)
        queued = make_checkpoint(env.ckpt, 150)
        m.on_checkpoint(report(queued))
        urgent = make_checkpoint(env.ckpt, 200, {"big.data": 24 * MiB}, reason="preemption")
        rep = report(urgent, "preemption")
        m.on_checkpoint(rep)
        t0 = time.monotonic()
        m.on_final_checkpoint(rep)
        waited = time.monotonic() - t0
        order = [e["step"] for e in events(logs, "remote.uploaded")]
        assert order[0] == 200  # ahead of the periodic one in flight and the one queued
        wait_until(lambda: len(events(logs, "remote.uploaded")) == 3, timeout=30)
    # Unthrottled: 24 MiB at the 2 MB/s limit would take more than 9 s even after a full burst.
    assert waited < 6.0
    final = events(logs, "remote.final")[0]
    assert final["step"] == 200 and final["reached_remote"] is True and final["seconds"] < 6.0
    up = [e for e in events(logs, "remote.uploaded") if e["step"] == 200][0]
    assert up["before_deadline"] is True
    assert m.status()["final"]["reached_remote"] is True
    assert [e["step"] for e in events(logs, "remote.uploaded")][1:] == [150, 100]


def test_final_checkpoint_that_cannot_reach_the_remote_is_reported(env: Env) -> None:
    m = env.mirror(final_wait_seconds=1.5, retries=10)
    env.s3.stop()
    path = make_checkpoint(env.ckpt, 100, reason="preemption")
    try:
        with capture_logs() as logs:
            rep = report(path, "preemption")
            m.on_checkpoint(rep)
            t0 = time.monotonic()
            m.on_final_checkpoint(rep)
            waited = time.monotonic() - t0
    finally:
        env.s3.start()
    assert 1.0 < waited < 5.0
    final = events(logs, "remote.final")[0]
    assert final["reached_remote"] is False and final["log_level"] == "warning"
    st = m.status()
    assert st["final"]["reached_remote"] is False and st["final"]["deadline_seconds"] == 1.5
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 5.0


def test_final_report_only_at_stop_is_uploaded_too(env: Env) -> None:
    path = make_checkpoint(env.ckpt, 100, reason="final")
    with capture_logs() as logs:
        m = env.mirror()
        m.on_final_checkpoint(report(path, "final"))
    assert events(logs, "remote.final")[0]["reached_remote"] is True
    assert env.committed_remote(100)


# ------------------------------------------------------------------ retention, credentials


def test_remote_retention_keeps_newest_and_removes_partials(env: Env) -> None:
    client = env.s3.client()
    client.put_object(Bucket=env.bucket, Key="run/ckpt-000000000050/ckpt.index", Body=b"partial")
    client.put_object(Bucket=env.bucket, Key="run/notes.txt", Body=b"not ours")
    with capture_logs() as logs:
        m = env.mirror(keep=2)
        for step in (100, 200, 300, 400):
            m.on_checkpoint(report(make_checkpoint(env.ckpt, step)))
            wait_until(lambda s=step: [e for e in events(logs, "remote.uploaded") if e["step"] == s])
        wait_until(lambda: {e["step"] for e in events(logs, "remote.pruned")} >= {50, 100, 200})
    folders = {k.split("/")[1] for k in env.remote_keys()}
    assert folders == {"ckpt-000000000300", "ckpt-000000000400", "notes.txt"}
    assert env.committed_remote(300) and env.committed_remote(400)


def test_credentials_never_logged_or_in_status(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in credentials_env():
        monkeypatch.delenv(key)
    path = make_checkpoint(env.ckpt, 100)
    opts = {"key": KEY_ID, "secret": SECRET, **NO_SDK_RETRY}
    with capture_logs() as logs:
        m = env.mirror(storage_options=opts, retries=0)
        m.on_checkpoint(report(path))
        wait_until(lambda: events(logs, "remote.uploaded"))
        env.s3.fail("PUT", "ckpt-000000000200/", status=500, times=100)
        m.on_checkpoint(report(make_checkpoint(env.ckpt, 200)))
        wait_until(lambda: events(logs, "remote.upload_failed"))
    assert events(logs, "remote.uploaded")[0]["step"] == 100  # the explicit credentials worked
    text = json.dumps([dict(e) for e in logs], default=str) + json.dumps(m.status(), default=str)
    assert "internal error" in text
    assert SECRET not in text and KEY_ID not in text
