"""The README demo: the custom-loop example under `preemptd run`, surviving a crash and a preemption.

    python3 tasks.py demo                # sets up .venv, then runs this
    python -m service.examples.demo      # from the venv

What you see, in order:
  1. preemptd starts the training worker (a small MLP on scikit-learn's digits);
     periodic checkpoints are committed every 100 steps.
  2. CRASH: the worker is killed with SIGKILL mid-training. preemptd logs
     worker.exited, backs off, and restarts it from the newest valid checkpoint.
  3. PREEMPTION: the VM's shutdown reaches preemptd as SIGTERM (what systemd sends
     when a spot VM is reclaimed). The worker finishes its step, writes a durable
     `preemption` checkpoint, and preemptd exits 0.
  4. The "new VM" starts preemptd again: training resumes from the preemption
     checkpoint and runs to the end. The final weights equal those of an
     uninterrupted run, bit for bit (the digest is compared).

Everything lives under .demo/ in the current directory. This script only
orchestrates real processes; it does not import TensorFlow itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOTAL_STEPS = 1000
BANNER = "\033[1;36m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BANNER}=== demo: {text}{RESET}\n", flush=True)


def write_config(root: Path, steps: int) -> Path:
    cfg = root / "preemptd.toml"
    cfg.write_text(
        f"""# Written by the demo; see deploy/config.example.toml for every key.
[worker]
command = ["{sys.executable}", "-m", "service.examples.custom_loop", "--steps", "{steps}"]
env = {{ EXAMPLE_STEP_DELAY = "0.01", EXAMPLE_LOG_EVERY = "100", TF_CPP_MIN_LOG_LEVEL = "2" }}

[checkpoint]
dir = "{root / 'checkpoints'}"
every_steps = 100
every_seconds = 0
keep = 3

[restart]
backoff_initial_seconds = 1
max_restarts = 5

[stop]
grace_seconds = 20

[preemption]
sources = []          # off-cloud: signals only (on a VM: "auto")

[daemon]
state_dir = "{root / 'state'}"
progress_interval_seconds = 5
"""
    )
    return cfg


class Daemon:
    """One `preemptd run` process whose output is streamed to the screen."""

    def __init__(self, cfg: Path, log_format: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--log-format", log_format],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.digest: str | None = None
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if "weights_sha256" in line:
                self.digest = _field(line, "weights_sha256")

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc


def _field(line: str, key: str) -> str | None:
    """Pull key=value (console) or "key": "value" (JSON) out of a log line."""
    try:
        return str(json.loads(line)[key])
    except (ValueError, KeyError, TypeError):
        pass
    for part in line.split():
        if part.startswith(key + "="):
            return part.split("=", 1)[1].strip("'\"")
    return None


def status(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def wait_for(what: str, cond: Callable[[dict[str, Any]], bool], state_dir: Path,
             daemon: Daemon, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(state_dir)
        if st and cond(st):
            return st
        if daemon.proc.poll() is not None:
            raise SystemExit(f"demo: preemptd exited ({daemon.proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


def reference_digest(root: Path, steps: int) -> str | None:
    """An uninterrupted run of the same job, without preemptd, for the bit-for-bit check."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for k in list(env):
        if k.startswith("PREEMPTD_"):
            del env[k]
    out = subprocess.run(
        [sys.executable, "-m", "service.examples.custom_loop", "--steps", str(steps),
         "--dir", str(root / "reference"), "--every-steps", "0", "--log-every", str(steps)],
        capture_output=True, text=True, env=env, check=False,
    )
    for line in (out.stdout + out.stderr).splitlines():
        if "weights_sha256" in line:
            return _field(line, "weights_sha256")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".demo", help="work dir (wiped first)")
    ap.add_argument("--steps", type=int, default=TOTAL_STEPS)
    ap.add_argument("--log-format", default="console", choices=("console", "json"))
    ap.add_argument("--no-reference", action="store_true", help="skip the uninterrupted reference run")
    args = ap.parse_args(argv)

    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = write_config(root, args.steps)
    state_dir = root / "state"
    crash_at, preempt_at = args.steps // 4, args.steps // 2

    say(f"starting preemptd with the custom-loop example ({args.steps} steps, checkpoint every 100)")
    d = Daemon(cfg, args.log_format)
    st = wait_for(f"step {crash_at} and a checkpoint",
                  lambda s: (s.get("step") or 0) >= crash_at and bool(s.get("last_checkpoint")),
                  state_dir, d)
    pid = st["worker_pid"]
    say(f"CRASH: killing the training worker (pid {pid}) with SIGKILL at step {st['step']}")
    os.kill(pid, signal.SIGKILL)
    st = wait_for("the restarted worker to pass the crash point",
                  lambda s: s.get("restarts", 0) >= 1 and (s.get("step") or 0) >= preempt_at,
                  state_dir, d)
    say(f"PREEMPTION: the VM is being reclaimed; systemd sends SIGTERM to preemptd at step {st['step']}")
    d.proc.send_signal(signal.SIGTERM)
    rc = d.wait(120)
    ckpt = status(state_dir).get("last_checkpoint") or {}
    say(f"preemptd exited {rc} (0 = final checkpoint confirmed); newest checkpoint: "
        f"step {ckpt.get('step')} reason {ckpt.get('reason')}")
    if rc != 0:
        return rc

    say("the new VM boots and starts preemptd again: resume from the preemption checkpoint")
    d = Daemon(cfg, args.log_format)
    rc = d.wait(600)
    say(f"training finished; preemptd exited {rc}")
    if rc != 0:
        return rc
    print(subprocess.run([sys.executable, "-m", "daemon", "status", "--state-dir", str(state_dir)],
                         capture_output=True, text=True, check=False).stdout)
    if not args.no_reference:
        say("uninterrupted reference run of the same job (no preemptd), to compare the weights")
        ref = reference_digest(root, args.steps)
        same = ref is not None and ref == d.digest
        say(f"final weights {d.digest}\n    reference     {ref}\n    "
            + ("IDENTICAL: the crash and the preemption cost nothing" if same else "DIFFERENT"))
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
