"""Remote mirror policies under a fake clock: limiter, queue order, backoff, scrubbing, journal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.clock import FakeClock
from daemon.config import ConfigError, RemoteConfig, from_mapping
from daemon.remote.journal import Journal
from daemon.remote.limiter import MB, TokenBucket, from_mbps
from daemon.remote.queue import Job, UploadQueue, backoff_delay
from daemon.remote.store import RemoteStore, open_store, scrub_url

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ limiter


def test_token_bucket_allows_burst_then_holds_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1000.0, burst=500.0, clock=clock)
    assert bucket.reserve(500) == 0.0  # the burst
    assert bucket.reserve(250) == pytest.approx(0.25)  # in debt: wait its share
    clock.advance(0.25)
    assert bucket.reserve(1000) == pytest.approx(1.0)


def test_token_bucket_long_run_average_is_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2 * MB, burst=MB, clock=clock)
    sent = 0
    start = clock.monotonic()
    for _ in range(200):
        wait = bucket.reserve(256 * 1024)
        clock.advance(wait)
        sent += 256 * 1024
    elapsed = clock.monotonic() - start
    # At most one burst above the rate, never faster.
    assert sent <= 2 * MB * elapsed + MB
    assert sent >= 2 * MB * elapsed * 0.99


def test_token_bucket_idle_time_does_not_bank_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=100.0, clock=clock)
    clock.advance(3600)
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(100) == pytest.approx(1.0)


def test_unlimited_bandwidth_is_no_limiter() -> None:
    assert from_mbps(0, FakeClock(), 1024) is None
    limiter = from_mbps(4, FakeClock(), 1 << 20)
    assert limiter is not None and limiter.rate == 4 * MB and limiter.burst == 2 * MB


# ------------------------------------------------------------------ queue


def _job(step: int, reason: str = "periodic", not_before: float = 0.0) -> Job:
    return Job(step=step, path=f"/c/{step}", reason=reason, enqueued=0.0, not_before=not_before)


def test_queue_order_preemption_first_then_newest() -> None:
    q = UploadQueue(keep=10)
    for job in (_job(100), _job(300), _job(200, "requested"), _job(150, "preemption")):
        q.push(job)
    order = []
    while (job := q.pop_ready(0.0)) is not None:
        order.append((job.step, job.reason))
    assert order == [(150, "preemption"), (200, "requested"), (300, "periodic"), (100, "periodic")]


def test_queue_same_step_keeps_the_more_urgent_reason() -> None:
    q = UploadQueue(keep=3)
    q.push(_job(100, "preemption"))
    q.push(_job(100, "periodic"))
    assert [j.reason for j in q.jobs()] == ["preemption"]
    q2 = UploadQueue(keep=3)
    q2.push(_job(100, "periodic"))
    q2.push(_job(100, "final"))
    assert [j.reason for j in q2.jobs()] == ["final"]


def test_queue_drops_what_remote_retention_would_delete_but_never_urgent() -> None:
    q = UploadQueue(keep=2)
    assert q.push(_job(50, "preemption")) == []
    q.push(_job(100))
    q.push(_job(200))
    dropped = q.push(_job(300))
    assert [j.step for j in dropped] == [100]
    assert sorted(j.step for j in q.jobs()) == [50, 200, 300]  # 50 is urgent: kept


def test_queue_backoff_lets_ready_jobs_pass() -> None:
    q = UploadQueue(keep=5)
    q.push(_job(300, not_before=10.0))
    q.push(_job(100))
    assert q.pop_ready(0.0).step == 100  # type: ignore[union-attr]
    assert q.pop_ready(5.0) is None
    assert q.next_ready_at() == 10.0
    assert q.pop_ready(10.0).step == 300  # type: ignore[union-attr]


def test_queue_more_urgent_ready_job_preempts_current() -> None:
    q = UploadQueue(keep=5)
    current = _job(100)
    assert not q.has_more_urgent(current, 0.0)
    q.push(_job(200))
    assert not q.has_more_urgent(current, 0.0)  # newer periodic: same class, no preemption
    q.push(_job(150, "preemption", not_before=5.0))
    assert not q.has_more_urgent(current, 0.0)  # still backing off
    assert q.has_more_urgent(current, 5.0)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(a, 1.0, 10.0) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff_delay(0, 1.0, 10.0) == 0.0
    assert backoff_delay(3, 2.0, 1.0) == 2.0  # a max below the initial never shortens it


# ------------------------------------------------------------------ scrubbing


def test_scrub_url_drops_credentials() -> None:
    assert scrub_url("s3://bucket/run-1") == "s3://bucket/run-1"
    assert scrub_url("ftp://user:hunter22@host:21/dir?x=1#f") == "ftp://host:21/dir"
    assert scrub_url("https://acct.blob/c/run?sv=2020&sig=SECRETSIG") == "https://acct.blob/c/run"


def test_store_scrub_hides_secrets_keys_and_signed_queries() -> None:
    store = RemoteStore(None, "bucket/run", "s3://bucket/run",
                        secrets=["s3cr3t-value-123", "tok-abcdef"])
    text = ("failed https://u:pw@host/x?X-Amz-Signature=abc&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP "
            "secret=s3cr3t-value-123 token tok-abcdef key AKIAABCDEFGHIJKLMNOP")
    out = store.scrub(text)
    for leaked in ("s3cr3t-value-123", "tok-abcdef", "AKIAABCDEFGHIJKLMNOP", "pw@", "X-Amz-Signature"):
        assert leaked not in out
    assert "https://***@host/x?***" in out


# ------------------------------------------------------------------ journal


def test_journal_round_trip_and_other_url_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state" / "remote-journal.json"
    j = Journal(path, "s3://b/run")
    j.add(100, "/c/ckpt-100", "periodic")
    j.file_sent(100, "a.index", 10, 123)
    j.add(200, "/c/ckpt-200", "preemption")
    j.remove(200)
    again = Journal(path, "s3://b/run")
    jobs = again.load()
    assert [(x["step"], x["reason"]) for x in jobs] == [(100, "periodic")]
    assert again.sent_files(100) == {"a.index": {"size": 10, "crc32": 123}}
    # Re-adding the same folder keeps its progress; another folder for the step does not.
    again.add(100, "/c/ckpt-100", "periodic")
    assert again.sent_files(100)
    again.add(100, "/other/ckpt-100", "periodic")
    assert again.sent_files(100) == {}
    assert Journal(path, "s3://b/other-run").load() == []


def test_journal_corrupt_file_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "remote-journal.json"
    path.write_text("{not json")
    with capture_logs() as logs:
        assert Journal(path, "s3://b/run").load() == []
    assert [e["event"] for e in logs] == ["remote.journal_unreadable"]
    path.write_text(json.dumps({"format": 1, "url": "s3://b/run", "jobs": {"1": {"step": "x"}}}))
    assert Journal(path, "s3://b/run").load() == []


def test_journal_unwritable_dir_warns_once_and_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    j = Journal(blocker / "remote-journal.json", "s3://b/run")
    with capture_logs() as logs:
        j.add(1, "/c/1", "periodic")
        j.file_sent(1, "a", 1, 1)
    assert [e["event"] for e in logs] == ["remote.journal_failed"]
    assert j.sent_files(1) == {"a": {"size": 1, "crc32": 1}}


# ------------------------------------------------------------------ config


def test_config_keys_validated() -> None:
    cfg = from_mapping({"remote": {"url": "s3://b/r", "endpoint_url": "http://127.0.0.1:9000",
                                   "storage_options": {"anon": False}, "final_wait_seconds": 20}})
    assert cfg.remote.endpoint_url == "http://127.0.0.1:9000"
    for bad, key in (({"endpoint_url": "ftp://x"}, "remote.endpoint_url"),
                     ({"storage_options": "key=1"}, "remote.storage_options"),
                     ({"bandwidth_mbps": -1}, "remote.bandwidth_mbps"),
                     ({"url": "bucket/run"}, "remote.url")):
        with pytest.raises(ConfigError, match=key):
            from_mapping({"remote": bad})


def test_open_store_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="remote.endpoint_url: only for s3://"):
        open_store(RemoteConfig(url="gs://b/r", endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ConfigError, match="remote.url"):
        open_store(RemoteConfig(url="nosuchproto://b/r"))
    store = open_store(RemoteConfig(url="s3://bucket/run", endpoint_url="http://127.0.0.1:1"))
    assert store.root == "bucket/run" and store.display_url == "s3://bucket/run"


def _run_py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_cli_import_does_not_load_fsspec() -> None:
    out = _run_py("import sys, daemon.cli, daemon.assembly, daemon.remote; "
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                  "('fsspec', 's3fs', 'botocore', 'aiobotocore', 'tensorflow')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_extra_is_a_config_error_naming_the_package(tmp_path: Path) -> None:
    cfg = tmp_path / "preemptd.toml"
    cfg.write_text(f'[worker]\ncommand = ["true"]\n[remote]\nurl = "s3://bucket/run"\n'
                   f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[checkpoint]\ndir = "{tmp_path / "ckpt"}"\n[preemption]\nsources = []\n')
    # `sys.modules[name] = None` makes `import name` fail as if it were not installed.
    for missing, named in (("s3fs", "'s3fs'"), ("fsspec", "'fsspec'")):
        out = _run_py(f"import sys; sys.modules[{missing!r}] = None\n"
                      "from daemon.cli import main\n"
                      f"sys.exit(main(['run', '--config', {str(cfg)!r}]))")
        assert out.returncode == 78, (out.stdout, out.stderr)
        assert named in out.stderr and "Traceback" not in out.stderr


def test_gs_url_without_gcsfs_names_the_package() -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here; the missing-package path cannot be shown for gs://")
    with pytest.raises(ConfigError, match=r"remote.url: gs:// needs the optional package 'gcsfs'"):
        open_store(RemoteConfig(url="gs://bucket/run"))


def test_any_fsspec_url_works_file_url_round_trip(tmp_path: Path) -> None:
    """The mirror is not S3-specific: a file:// remote (e.g. an NFS mount) uploads and fetches."""
    import time
    import zlib

    from daemon import contract
    from daemon.components import CheckpointReport
    from daemon.remote.mirror import RemoteMirror

    ckpt = tmp_path / "ckpt"
    folder = ckpt / contract.checkpoint_dirname(7)
    folder.mkdir(parents=True)
    data = b"weights" * 1000
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(data)
    manifest = contract.Manifest(step=7, reason="periodic", created="2026-11-25T12:00:00Z",
                                 files={"sub/w.bin": {"size": len(data), "crc32": zlib.crc32(data)}})
    contract.write_json_atomic(folder / contract.MANIFEST_NAME, manifest.to_json())
    cfg = RemoteConfig(url=f"file://{tmp_path}/remote/run", bandwidth_mbps=10)
    with capture_logs() as logs:
        m = RemoteMirror(cfg, checkpoint_dir=str(ckpt), state_dir=str(tmp_path / "state"), grace_seconds=5)
        m.start(lambda e: None)
        m.on_checkpoint(CheckpointReport(7, str(folder), len(data), 0.1, "periodic"))
        end = time.monotonic() + 20
        while not [e for e in logs if e["event"] == "remote.uploaded"] and time.monotonic() < end:
            time.sleep(0.02)
        m.stop()
    remote = tmp_path / "remote" / "run" / contract.checkpoint_dirname(7)
    assert (remote / "sub" / "w.bin").read_bytes() == data
    assert (remote / contract.MANIFEST_NAME).read_bytes() == (folder / contract.MANIFEST_NAME).read_bytes()
    new_vm = tmp_path / "new-vm"
    with capture_logs() as logs:
        RemoteMirror(cfg, checkpoint_dir=str(new_vm), state_dir=None, grace_seconds=5).before_worker_start(
            str(new_vm))
    assert [e["event"] for e in logs] == ["remote.fetched"]
    assert contract.verify(new_vm / contract.checkpoint_dirname(7)).step == 7


def test_stop_without_confirmed_final_waits_for_newest_pending_upload(tmp_path: Path) -> None:
    import zlib

    from daemon import contract
    from daemon.components import CheckpointReport
    from daemon.remote.mirror import RemoteMirror

    ckpt = tmp_path / "ckpt"
    cfg = RemoteConfig(url=f"file://{tmp_path}/remote", bandwidth_mbps=4, final_wait_seconds=20)
    m = RemoteMirror(cfg, checkpoint_dir=str(ckpt), state_dir=None, grace_seconds=5)
    with capture_logs() as logs:
        m.on_final_checkpoint(None)  # nothing pending: nothing to wait for
        m.start(lambda e: None)
        folder = ckpt / contract.checkpoint_dirname(3)
        folder.mkdir(parents=True)
        data = bytes(3_000_000)
        (folder / "w.bin").write_bytes(data)
        contract.write_json_atomic(folder / contract.MANIFEST_NAME, contract.Manifest(
            step=3, reason="periodic", created="2026-11-25T12:00:00Z",
            files={"w.bin": {"size": len(data), "crc32": zlib.crc32(data)}}).to_json())
        m.on_checkpoint(CheckpointReport(3, str(folder), len(data), 0.1, "periodic"))
        m.on_final_checkpoint(None)  # throttled: about 0.5 s past the 2 MB burst
        m.stop()
    finals = [e for e in logs if e["event"] == "remote.final"]
    assert finals[0]["step"] is None and finals[0]["reached_remote"] is None
    assert finals[1]["step"] == 3 and finals[1]["reached_remote"] is True
    assert (tmp_path / "remote" / contract.checkpoint_dirname(3) / contract.MANIFEST_NAME).exists()


def test_build_components_wires_the_mirror_first_only_when_configured(tmp_path: Path) -> None:
    from daemon.assembly import build_components
    from daemon.clock import SystemClock

    base = {"preemption": {"sources": []}, "checkpoint": {"dir": str(tmp_path / "c")},
            "daemon": {"state_dir": str(tmp_path / "s")}}
    assert "remote" not in [c.name for c in build_components(from_mapping(base), SystemClock())]
    cfg = from_mapping({**base, "remote": {"url": "s3://bucket/run", "endpoint_url": "http://127.0.0.1:9"}})
    names = [c.name for c in build_components(cfg, SystemClock())]
    # First: the stop path waits for the final upload before a source approves an eviction.
    assert names[0] == "remote" and names.count("remote") == 1
