"""Run `preemptd run` as a real subprocess and read its JSON log lines (tests and benchmarks)."""

from __future__ import annotations

import json
import os
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


def worker_cmd(name: str, *args: str) -> list[str]:
    """The command line of one of the test workers in tests/workers/."""
    return [PY, "-m", f"tests.workers.{name}", *args]


def read_worker_log(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Daemon:
    """A `python -m daemon run ...` subprocess with its log lines collected as they come."""

    def __init__(self, tmp: Path, command: Sequence[str] | None, *extra: str,
                 config: Path | None = None, env: dict[str, str] | None = None,
                 state_dir: Path | None = None, checkpoint_dir: Path | None = None,
                 log_level: str = "debug") -> None:
        self.state_dir = state_dir or tmp / "s"
        self.checkpoint_dir = checkpoint_dir or tmp / "c"
        self.worker_log = tmp / "worker.log"
        argv = [PY, "-m", "daemon", "run", "--log-format", "json", "--log-level", log_level,
                "--state-dir", str(self.state_dir), "--checkpoint-dir", str(self.checkpoint_dir)]
        if config is not None:
            argv += ["--config", str(config)]
        argv += list(extra)
        if command is not None:
            argv += ["--", *command]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env["WORKER_LOG"] = str(self.worker_log)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            full_env.pop(key, None)
        full_env.update(env or {})
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and "event" in obj:
                    obj["_received"] = time.time()
                    self.lines.append(obj)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.lines if name is None or e["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 15.0,
                 where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The `count`-th log line with event `name` (and `where`), waiting for it."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.lines if e["event"] == name and (where is None or where(e))]
                if len(found) >= count:
                    return found[count - 1]
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {count}x {name!r} within {timeout} s; events: "
                        f"{[e['event'] for e in self.lines]}; stderr: {self.stderr_now()}"
                    )
                self._cond.wait(min(left, 0.1))

    def stderr_now(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def worker_log_lines(self) -> list[dict[str, Any]]:
        return read_worker_log(self.worker_log)

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())

    def close(self) -> None:
        """Kill the daemon if a test left it running (its guard then kills the worker)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
