"""The state file: the daemon's facts for `preemptd status`, written atomically.

Keys (a contract, see docs/DESIGN.md): state, daemon_pid, worker_pid, step, restarts,
last_exit {code, signal}, last_checkpoint {path, step, reason, age_seconds},
notices, disk {percent, free_bytes}; plus extra facts and one key per component.
`age_seconds` is as of `updated`; readers recompute it from `last_checkpoint.wall`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from daemon.contract import write_json_atomic

STATE_NAME = "state.json"


class StateFileError(Exception):
    """The state file is missing or unreadable; the message names the path."""


def path_in(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_NAME


def write(state_dir: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Atomically replace the state file (temp file, fsync, rename, fsync dir)."""
    write_json_atomic(path_in(state_dir), data)


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
