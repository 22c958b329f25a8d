"""The state file: the daemon's facts for `preemptd status`, written atomically.

Keys (a contract, see docs/DESIGN.md): state, daemon_pid, worker_pid, step, restarts,
last_exit {code, signal}, last_checkpoint {path, step, reason, age_seconds},
notices, disk {percent, free_bytes}; plus extra facts and one key per component.
Written atomically (rename) on every change.
`age_seconds` is as of `updated`; readers recompute it from `last_checkpoint.wall`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATE_NAME = "state.json"


class StateFileError(Exception):
    """The state file is missing or unreadable; the message names the path."""


def path_in(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_NAME


def write(state_dir: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Atomically replace the state file: readers see the old or the new file, never a mix.

    Not fsynced on purpose: it describes a live process (after a power loss it is stale
    anyway), and an fsync on every lifecycle move would sit on the restart path.
    """
    path = path_in(state_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse the state file and refresh `last_checkpoint.age_seconds` to now."""
    path = path_in(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"{path}: no state file (has preemptd run with this state dir?)") from None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read state file: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StateFileError(f"{path}: not a JSON object")
    ckpt = data.get("last_checkpoint")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("wall"), int | float):
        ckpt["age_seconds"] = round(max(0.0, time.time() - ckpt["wall"]), 1)
    return data
