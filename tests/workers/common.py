"""Shared bits of the test workers: report over PREEMPTD_SOCKET, record starts, write checkpoints.

Workers import only the standard library and daemon.contract (the wire contract).
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any

from daemon import contract

_sock: socket.socket | None = None


def send(msg_type: str, **fields: Any) -> None:
    """Send one message to the daemon (no-op without PREEMPTD_SOCKET)."""
    global _sock
    path = os.environ.get(contract.ENV_SOCKET)
    if not path:
        return
    if _sock is None:
        _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    _sock.sendto(contract.encode_message(msg_type, pid=os.getpid(), **fields), path)


def send_raw(data: bytes) -> None:
    global _sock
    if _sock is None:
        _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    _sock.sendto(data, os.environ[contract.ENV_SOCKET])


def record(event: str, **fields: Any) -> None:
    """Append one JSON line to $WORKER_LOG (what the test reads back)."""
    path = os.environ.get("WORKER_LOG")
    if not path:
        return
    line = {"event": event, "pid": os.getpid(), "t": time.time(),
            "restart": os.environ.get(contract.ENV_RESTART),
            "resume": os.environ.get(contract.ENV_RESUME), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(step: int, reason: str, payload: bytes = b"weights") -> str:
    """Commit a checkpoint per the layout contract; return its final path."""
    root = Path(os.environ[contract.ENV_CHECKPOINT_DIR])
    final = root / contract.checkpoint_dirname(step)
    if final.exists():  # already saved at this step (e.g. a request, then a stop)
        return str(final)
    tmp = root / contract.temp_dirname(step)
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "data.bin"
    with open(data, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    manifest = contract.Manifest(
        step=step, reason=reason, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files={"data.bin": {"size": len(payload), "crc32": zlib.crc32(payload)}},
    )
    contract.write_json_atomic(tmp / contract.MANIFEST_NAME, manifest.to_json())
    os.rename(tmp, final)
    contract.fsync_dir(root)
    return str(final)


def resume_step() -> int:
    resume = os.environ.get(contract.ENV_RESUME, "")
    if not resume:
        return 0
    return contract.read_manifest(resume).step
