"""Processes of a chaos run: `preemptd run` (its JSON lines and the worker's console lines) and
the same training job run bare (the uninterrupted reference)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# structlog's console rendering (the worker's default): "2026-01-01 12:00:00 [info     ] event  k=v k=v"
_CONSOLE = re.compile(r"^\S+ \S+ \[(\w+)\s*\] (\S+)\s*(.*)$")
_KV = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def _value(raw: str) -> Any:
    if raw[:1] in "'\"":
        return raw[1:-1]
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(raw, raw)


def split_lines(line: str) -> list[str]:
    """Undo interleaving: an unbuffered worker prints its message and its newline in two writes,
    so a daemon line (JSON, starting with {"timestamp") can land in between."""
    i = line.find('{"timestamp"', 1)
    if i < 0:
        return [line]
    return [line[:i], *split_lines(line[i:])]


def parse_line(line: str) -> dict[str, Any] | None:
    """One log line as a dict with `event` and `src` ("daemon" or "worker"), or None.

    JSON lines with origin=worker and structlog console lines (a bare worker) are the worker's."""
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if isinstance(obj, dict) and "event" in obj:
            # Workers log like the daemon (PREEMPTD_LOG_FORMAT), their lines marked origin=worker.
            obj["src"] = "worker" if obj.get("origin") == "worker" else "daemon"
            return obj
        return None
    m = _CONSOLE.match(line)
    if not m:
        return None
    ev: dict[str, Any] = {"event": m.group(2), "level": m.group(1), "src": "worker"}
    for k, v in _KV.findall(m.group(3)):
        ev[k] = _value(v)
    return ev


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the daemon (workers add PYTHONUNBUFFERED via worker.env: a killed
    worker's last lines must not die in a buffer; the daemon's lines stay whole writes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("PYTHONUNBUFFERED", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


class LoggedProcess:
    """A subprocess whose stdout lines are parsed as they come; stderr goes to a file."""

    def __init__(self, argv: Sequence[str], stderr_path: Path, env: dict[str, str],
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.started = time.monotonic()
        self._stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed in close()
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._on_event = on_event
        self.proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            for line in split_lines(raw):
                ev = parse_line(line)
                if ev is None:
                    continue
                ev["_t"] = time.monotonic()
                if self._on_event is not None:
                    self._on_event(ev)
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def eof(self) -> bool:
        return not self._reader.is_alive()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                 since: int = 0) -> dict[str, Any] | None:
        """First event (index >= since) matching `pred`, waiting up to `timeout`; None at EOF/timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if pred(ev):
                        return ev
                since = max(since, len(self.events))
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    return None
                self._cond.wait(min(left, 0.05))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float) -> int:
        """Wait for exit and for the pipe's EOF (every writer gone: the worker too)."""
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def training_command(steps: int, every_steps: int, directory: Path | None = None) -> list[str]:
    """The deterministic TF job of the campaign (custom loop, op determinism, exact resume)."""
    cmd = [PY, "-m", "service.examples.custom_loop", "--steps", str(steps), "--every-steps", str(every_steps)]
    if directory is not None:
        cmd += ["--dir", str(directory)]
    return cmd


def run_bare(steps: int, every_steps: int, directory: Path, log_dir: Path,
             env: dict[str, str] | None = None, timeout: float = 900) -> tuple[str, float]:
    """The same job without preemptd, uninterrupted: (final weights digest, wall seconds)."""
    proc = LoggedProcess(training_command(steps, every_steps, directory), log_dir / "bare.stderr",
                         base_env({"EXAMPLE_LOG_EVERY": "1000000000", **(env or {})}))
    try:
        ev = proc.wait_for(lambda e: e["event"] == "train.finished", timeout)
        rc = proc.finish(60)
        if ev is None or rc != 0:
            raise AssertionError(f"uninterrupted run failed (rc {rc}); see {log_dir / 'bare.stderr'}")
        return str(ev["weights_sha256"]), ev["_t"] - proc.started
    finally:
        proc.close()
