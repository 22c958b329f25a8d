"""Helpers for the disk guard tests: small real filesystems and fake-payload checkpoints.

Checkpoints follow the real layout and commit protocol of daemon/contract.py (write
into `.tmp-<pid>`, fsync, MANIFEST.json, rename, fsync parent) with random payloads,
so no TensorFlow is needed. Run as a module it is the writer process of the tests:

    python -m tests.disk_fixtures write DIR STEP NBYTES [--created EPOCH]

exit 0 when committed, 28 when the disk was full (its `.tmp-` folder removed first).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from daemon import contract

EXIT_NO_SPACE = 28
PAYLOAD_NAME = "variables.data-00000-of-00001"
_CHUNK = 1 << 20


def _write_all(fd: int, data: bytes) -> None:
    """Write everything or raise (a short write on a regular file means the disk is full)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def write_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    nbytes: int,
    created: float | None = None,
    single_write: bool = False,
    after_payload: Callable[[], None] | None = None,
) -> Path:
    """Commit a checkpoint of `nbytes` random payload; OSError (tmp removed) on failure.

    `single_write` hands the whole payload to one write() call, so a disk that is too
    small fills within one system call (nothing can free space in between).
    `after_payload` is called as soon as the payload is written (benchmarks time from it).
    """
    directory = Path(directory)
    tmp = directory / contract.temp_dirname(step)
    final = directory / contract.checkpoint_dirname(step)
    try:
        tmp.mkdir()
        payload = os.urandom(nbytes)
        fd = os.open(tmp / PAYLOAD_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if single_write:
                _write_all(fd, payload)
            else:
                for i in range(0, nbytes, _CHUNK):
                    _write_all(fd, payload[i : i + _CHUNK])
            if after_payload is not None:
                after_payload()
            os.fsync(fd)
        finally:
            os.close(fd)
        stamp = datetime.fromtimestamp(
            created if created is not None else datetime.now().timestamp(), tz=timezone.utc
        )
        manifest = contract.Manifest(
            step=step,
            reason="periodic",
            created=stamp.isoformat(),
            files={PAYLOAD_NAME: {"size": nbytes, contract.CHECKSUM_ALGORITHM: zlib.crc32(payload)}},
            versions={"test": "fake payload"},
        )
        contract.write_json_atomic(tmp / contract.MANIFEST_NAME, manifest.to_json())
        os.rename(tmp, final)
        contract.fsync_dir(directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_foreign(path: str | os.PathLike[str], nbytes: int) -> Path:
    """A file preemptd did not write (e.g. a user's notes or a dataset cache)."""
    path = Path(path)
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
    return path


def is_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def mounted(kind: str, size_mib: int) -> Iterator[Path]:
    """A real, size-limited filesystem: "tmpfs", or "ext4" on a loop device.

    Raises RuntimeError with the reason when it cannot be mounted (tests skip on it).
    """
    if not is_root():
        raise RuntimeError("mounting a size-limited filesystem needs root")
    work = Path(tempfile.mkdtemp(prefix=f"preemptd-disk-{kind}-"))
    mnt = work / "mnt"
    mnt.mkdir()
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mnt)]
    elif kind == "ext4":
        image = work / "fs.img"
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        mkfs = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)],
            capture_output=True, text=True, check=False,
        )
        if mkfs.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"mkfs.ext4 failed: {mkfs.stderr.strip()}")
        cmd = ["mount", "-o", "loop", str(image), str(mnt)]
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"cannot mount: {exc}") from None
    if result.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.disk_fixtures")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="commit one fake checkpoint")
    w.add_argument("dir")
    w.add_argument("step", type=int)
    w.add_argument("nbytes", type=int)
    w.add_argument("--created", type=float, default=None)
    w.add_argument("--single-write", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = write_checkpoint(args.dir, args.step, args.nbytes, args.created, args.single_write)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"checkpoint_failed: {exc}", flush=True)
            return EXIT_NO_SPACE
        raise
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
