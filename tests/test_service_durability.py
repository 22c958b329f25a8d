"""Durability of the commit protocol under strace, a full disk and a read-only mount (real TF)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import contract

pytestmark = pytest.mark.tf
ROOT = Path(__file__).resolve().parents[1]
STRACE = shutil.which("strace")

SAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    import service
    v = tf.Variable(tf.zeros((256, 256)))
    it = iter(tf.data.Dataset.range(100))
    ckpt = tf.train.Checkpoint(v=v, data=it)
    mgr = service.CheckpointManager(ckpt, sys.argv[1], every_steps=2, every_seconds=0, keep=5)
    mgr.restore_or_initialize()
    for step in range(4):
        v.assign_add(tf.ones_like(v))
        next(it)
        mgr.step_done(step + 1)   # periodic (background) saves at 2 and 4
        mgr.wait()                # (one in flight at a time: let each finish)
    v.assign_add(tf.ones_like(v))
    mgr.close(step=5)             # final (synchronous) save
    """
)

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_FSYNC = re.compile(r"^f(?:data)?sync\(\d+<([^>]*)>")
_DIRFD = r"(?:AT_FDCWD(?:<[^>]*>)?, )?"
_RENAME = re.compile(rf'^rename(?:at2?)?\({_DIRFD}"([^"]+)", {_DIRFD}"([^"]+)"')


def _events(trace: str) -> Iterator[tuple[str, str, str]]:
    """('fsync', path, '') and ('rename', old, new) in completion order, failed calls dropped."""
    pending: dict[str, str] = {}
    for raw in trace.splitlines():
        m = _LINE.match(raw)
        pid, line = (m.group(1), m.group(2)) if m else ("0", raw)
        if "<unfinished ...>" in line:
            pending[pid] = line.split(" <unfinished ...>")[0]
            continue
        resumed = re.match(r"^<\.\.\. \w+ resumed>(.*)$", line)
        if resumed:
            line = pending.pop(pid, "") + resumed.group(1)
        if not re.search(r"= 0$", line.strip()):
            continue
        if fs := _FSYNC.match(line):
            yield "fsync", fs.group(1), ""
        elif rn := _RENAME.match(line):
            yield "rename", rn.group(1), rn.group(2)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_strace_every_file_fsynced_before_rename_parent_after(tmp_path: Path) -> None:
    ckdir = (tmp_path / "ckpts").resolve()
    trace_file = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in list(env):
        if name.startswith("PREEMPTD_"):
            del env[name]
    proc = subprocess.run(
        [STRACE, "-f", "--seccomp-bpf", "-y", "-qq", "-s", "512", "-o", str(trace_file),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", SAVE_SCRIPT, str(ckdir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list(_events(trace_file.read_text()))
    committed = {e.step: e.path for e in contract.committed(ckdir)}
    assert sorted(committed) == [2, 4, 5]
    for step, final in committed.items():
        manifest = contract.verify(final)
        renames = [i for i, (kind, old, new) in enumerate(events)
                   if kind == "rename" and new == str(final)]
        assert len(renames) == 1, f"no single rename to {final}"
        at = renames[0]
        temp = events[at][1]
        assert contract.parse_dirname(Path(temp).name) == (step, proc_pid(temp))
        synced_before = {path for kind, path, _ in events[:at] if kind == "fsync"}
        for rel in [*manifest.files, contract.MANIFEST_NAME]:
            assert f"{temp}/{rel}" in synced_before, f"{rel} of step {step} not fsynced before rename"
        assert temp in synced_before, "temp folder not fsynced before rename"
        synced_after = [path for kind, path, _ in events[at + 1:] if kind == "fsync"]
        assert str(ckdir) in synced_after, f"parent not fsynced after the rename of step {step}"


def proc_pid(temp: str) -> int:
    return int(temp.rsplit("-", 1)[1])


def _mount_tmpfs(where: Path, size: str, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True,
                   capture_output=True)


def _can_mount(tmp_path: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    probe = tmp_path / "probe"
    try:
        _mount_tmpfs(probe, "64k")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return f"cannot mount tmpfs here: {exc}"
    subprocess.run(["umount", str(probe)], check=True)
    return None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    where = tmp_path / "small"
    _mount_tmpfs(where, "1m")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.root
def test_enospc_keeps_previous_checkpoint_and_reports(small_fs: Path, tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    import service
    from service.errors import CheckpointError

    sock_path = str(tmp_path / "d.sock")
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(sock_path)
    v = tf.Variable(tf.zeros((400, 400)))  # 640 KB: one fits in 1 MB, two do not
    ckpt = tf.train.Checkpoint(v=v)
    mgr = service.CheckpointManager(ckpt, small_fs, every_steps=1, every_seconds=0, keep=1,
                                    handle_signals=False, environ={contract.ENV_SOCKET: sock_path})
    mgr.restore_or_initialize()
    v.assign_add(tf.ones_like(v))
    mgr.step_done(1)
    mgr.wait()
    v.assign_add(tf.ones_like(v))
    mgr.step_done(2)  # starts the save of step 2 in the background; it runs out of space
    with pytest.raises(CheckpointError, match="step 2.*intact"):
        mgr.wait()
    mgr.close(final=False)
    # Only the committed step 1 is left: no temp folder, no half checkpoint.
    assert [(e.step, e.is_temp) for e in contract.scan(small_fs)] == [(1, False)]
    assert contract.newest_valid(small_fs)[0].step == 1  # type: ignore[index]
    daemon.setblocking(False)
    msgs = []
    while True:
        try:
            msgs.append(contract.decode_message(daemon.recv(4096)))
        except BlockingIOError:
            break
    daemon.close()
    failed = [m for m in msgs if m["type"] == contract.MSG_CHECKPOINT_FAILED]
    assert failed and failed[0]["step"] == 2 and failed[0]["reason"] == "periodic"
    # And it restores the previous one.
    w = tf.Variable(tf.zeros((400, 400)))
    m2 = service.CheckpointManager(tf.train.Checkpoint(v=w), small_fs, handle_signals=False, environ={})
    assert m2.restore_or_initialize() == 1
    assert float(w.numpy()[0, 0]) == 1.0
    m2.close(final=False)


@pytest.mark.root
def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    tf = pytest.importorskip("tensorflow")
    import service
    from service.errors import CheckpointDirError

    where = tmp_path / "ro"
    _mount_tmpfs(where, "64k", "ro")
    try:
        with pytest.raises(CheckpointDirError, match=r"not writable: Read-only file system"):
            service.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), where, environ={})
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
