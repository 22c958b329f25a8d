"""Fault-injection campaign: a deterministic TF job under `preemptd run`, hit by random faults.

    .venv/bin/python -m tests.chaos.campaign                    # >= 100 faults (the full campaign)
    .venv/bin/python -m tests.chaos.campaign --faults 12 --seed 7

The job is service.examples.custom_loop (op determinism; model, optimizer, data
iterator and RNG in the checkpoint). Faults, seeded (the seed is printed):

- worker_sigkill / worker_sigkill_saving (while a `.tmp-` checkpoint folder exists)
- daemon_sigkill (then started again, as systemd would), daemon_sigterm (then started again)
- notice_gce / notice_aws / notice_azure: the provider's fake metadata server (tests/fakes)
  announces the preemption; the daemon stops; the "VM" comes back with a new daemon
- disk_full: the checkpoint tmpfs is filled for a while (root only; skipped with a reason)
- ckpt_truncate / ckpt_bitflip: the newest checkpoint is damaged, then the worker is killed

Afterwards: training completed; every restart resumed from a checkpoint that verified;
no restart resumed before the newest committed intact checkpoint; the final weights equal
an uninterrupted run's bit for bit. Printed: faults per kind, restarts, steps lost per fault
(0 for every noticed preemption and SIGTERM), recovery times and total overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import contract
from tests.chaos.ledger import FaultRecord, Ledger
from tests.chaos.procs import PY, LoggedProcess, base_env, run_bare, training_command
from tests.fakes import FakeAws, FakeAzure, FakeGce

KINDS = ("worker_sigkill", "worker_sigkill_saving", "daemon_sigkill", "daemon_sigterm",
         "notice_gce", "notice_aws", "notice_azure", "disk_full", "ckpt_truncate", "ckpt_bitflip")
# Faults after which the worker must have saved exactly where it stopped.
NOTICED = frozenset({"daemon_sigterm", "notice_gce", "notice_aws", "notice_azure"})
WAIT = 300.0  # generous: a TF start takes 5-25 s on a busy 2-core box


@dataclass
class Settings:
    faults: int = 100
    seed: int = 0
    gap: int = 10  # steps between faults
    every_steps: int = 5
    step_delay: float = 0.02
    kinds: tuple[str, ...] = KINDS
    plan: tuple[str, ...] = ()  # fixed sequence of kinds (overrides random choice)
    warm_standby: bool = False  # run the worker through the warm standby (worker.warm_standby)
    parallel_baseline: bool = False  # run the uninterrupted reference at the same time (short runs)
    tmpfs_mib: int = 48
    workdir: Path | None = None
    verbose: bool = True

    @property
    def steps(self) -> int:
        return (self.faults + 1) * self.gap + 10


@dataclass
class Result:
    settings: Settings
    faults: list[FaultRecord]
    ledger: Ledger
    baseline_digest: str
    baseline_seconds: float
    campaign_seconds: float
    daemon_starts: int
    final_rc: int | None
    skipped: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def _tmpfs(path: Path, mib: int) -> str | None:
    """Mount a small tmpfs for the checkpoints; the reason when that is not possible."""
    if os.geteuid() != 0:
        return "not root: cannot mount a small tmpfs to fill"
    if shutil.which("mount") is None:
        return "no mount(8)"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"mount tmpfs failed: {res.stderr.strip()}"
    return None


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Campaign:
    """Runs one campaign in a work dir; `run()` returns a Result (violations listed, not raised)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.ledger = Ledger()
        self.faults: list[FaultRecord] = []
        self.skipped: dict[str, str] = {}
        self.daemon: LoggedProcess | None = None
        self.fakes: dict[str, Any] = {}
        self.daemon_starts = 0
        self.final_rc: int | None = None
        self.violations: list[str] = []
        self._events_lock = threading.Lock()

    def say(self, text: str) -> None:
        if self.s.verbose:
            print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)

    # ------------------------------------------------------------------ set-up

    def _write_config(self) -> Path:
        cfg = self.work / "preemptd.toml"
        env = {"EXAMPLE_LOG_EVERY": "1", "EXAMPLE_STEP_DELAY": f"{self.s.step_delay:g}",
               "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = training_command(self.s.steps, self.s.every_steps)
        lines = [
            "[worker]",
            "command = [" + ", ".join(f'"{a}"' for a in cmd) + "]",
            f'cwd = "{Path(__file__).resolve().parents[2]}"',
            "env = {" + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + "}",
            f"warm_standby = {'true' if self.s.warm_standby else 'false'}",
            "[checkpoint]",
            f'dir = "{self.ckpt}"',
            f"every_steps = {self.s.every_steps}",
            "every_seconds = 0",
            "keep = 3",
            "[restart]",
            "max_restarts = 100000",
            "window_seconds = 3600",
            "backoff_initial_seconds = 0.05",
            "backoff_max_seconds = 0.5",
            "[stop]",
            "grace_seconds = 60",
            "[preemption]",
            'sources = ["gce", "aws", "azure"]',
            f'gce_url = "{self.fakes["gce"].url}"',
            f'aws_url = "{self.fakes["aws"].url}"',
            f'azure_url = "{self.fakes["azure"].url}"',
            "gce_timeout_seconds = 10",
            "aws_poll_seconds = 0.5",
            "azure_poll_seconds = 0.5",
            "[daemon]",
            f'state_dir = "{self.work / "state"}"',
            'log_format = "json"',
            'log_level = "info"',
        ]
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def _start_daemon(self) -> None:
        # A "new VM" each time: fresh metadata servers with no pending notice.
        for fake in self.fakes.values():
            fake.close()
        self.fakes = {"gce": FakeGce().start(), "aws": FakeAws().start(), "azure": FakeAzure().start()}
        cfg = self._write_config()
        self.daemon_starts += 1
        self.daemon = LoggedProcess([PY, "-m", "daemon", "run", "--config", str(cfg)],
                                    self.work / "daemon.stderr", base_env(), self._on_event)

    def _on_event(self, ev: dict[str, Any]) -> None:
        # Every line of every process, for the post-mortem of a failed campaign.
        with self._events_lock:
            self._events_file.write(json.dumps({"daemon": self.daemon_starts, **ev}, default=str) + "\n")
        self.ledger.on_event(ev)

    def _end_daemon(self, timeout: float = WAIT) -> int:
        assert self.daemon is not None
        try:
            rc = self.daemon.finish(timeout)
        finally:
            self.daemon.close()
        return rc

    # ------------------------------------------------------------------ waiting

    def _wait(self, cond: Any, timeout: float = WAIT, what: str = "") -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise AssertionError(f"chaos: timed out waiting for {what}")
            if self.daemon is not None and self.daemon.eof and self.ledger.digest is None and not cond():
                raise AssertionError(f"chaos: the daemon ended while waiting for {what} "
                                         f"(rc {self.daemon.proc.poll()}); see {self.work}/daemon.stderr")
            time.sleep(0.002)

    def _progress_at_least(self, step: int) -> bool:
        _, inc = self.ledger.current()
        return inc is not None and inc.max_step >= max(step, inc.start_step + 1) and \
            self.ledger.worker_pid is not None

    # ------------------------------------------------------------------ faults

    def _kill_worker(self) -> int | None:
        pid = self.ledger.worker_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pid

    def _temp_dirs(self) -> list[Path]:
        return [e.path for e in contract.scan(self.ckpt) if e.is_temp]

    def _inject(self, rec: FaultRecord) -> None:
        kind = rec.kind
        if kind == "worker_sigkill":
            rec.detail = f"pid {self._kill_worker()}"
        elif kind == "worker_sigkill_saving":
            self._wait(lambda: bool(self._temp_dirs()), what="a checkpoint being written")
            self._kill_worker()
            rec.detail = "during save" if self._temp_dirs() else "save had just finished"
        elif kind in ("daemon_sigkill", "daemon_sigterm"):
            assert self.daemon is not None
            self.daemon.signal(signal.SIGKILL if kind == "daemon_sigkill" else signal.SIGTERM)
            rec.rc = self._end_daemon()
            self._start_daemon()
        elif kind.startswith("notice_"):
            provider = kind.removeprefix("notice_")
            fake = self.fakes[provider]
            if provider == "gce":
                fake.preempt()
            elif provider == "aws":
                fake.interrupt("terminate", in_seconds=120)
            else:
                fake.preempt(in_seconds=30)
            rec.rc = self._end_daemon()
            self._start_daemon()
        elif kind == "disk_full":
            self._disk_full(rec)
        elif kind in ("ckpt_truncate", "ckpt_bitflip"):
            self._corrupt(rec)
        else:  # pragma: no cover - KINDS is closed
            raise ValueError(kind)

    def _disk_full(self, rec: FaultRecord) -> None:
        filler = self.ckpt / "chaos-filler"
        failed_before = self.ledger.failed_saves
        n_inc, _ = self.ledger.current()
        chunk = b"\0" * (1 << 20)
        with open(filler, "wb", buffering=0) as f:
            for block in (chunk, chunk[:4096]):
                try:
                    while True:
                        f.write(block)
                except OSError:
                    pass
        hold = self.rng.uniform(0.2, 1.0)
        skipped_before = self.ledger.skipped_saves
        end = time.monotonic() + 5 + self.s.every_steps * self.s.step_delay * 2
        # Hold the disk full until a save has run into it, the disk guard has told the worker
        # to skip periodic saves, or the worker died of it (bounded: training goes on meanwhile).
        while time.monotonic() < end and self.ledger.failed_saves == failed_before \
                and self.ledger.skipped_saves == skipped_before and self.ledger.current()[0] == n_inc:
            time.sleep(0.01)
        time.sleep(hold)
        filler.unlink()
        rec.detail = (f"{self.ledger.failed_saves - failed_before} saves failed, "
                      f"{self.ledger.skipped_saves - skipped_before} skipped; freed after +{hold:.1f}s")

    def _intact(self) -> list[contract.Entry]:
        """Committed checkpoints that verify and that we have not damaged, oldest first."""
        out = []
        for entry, result in contract.iter_valid_newest_first(self.ckpt, checksums=False):
            if isinstance(result, contract.Manifest) and entry.step not in self.ledger.corrupted:
                out.append(entry)
        return out[::-1]

    def _corrupt(self, rec: FaultRecord) -> None:
        # Damage the newest intact checkpoint, when an older intact one exists to fall back to.
        def ready() -> bool:
            # Its commit line must have been seen, so that a later line for the step is a re-save.
            intact = self._intact()
            return len(intact) >= 2 and intact[-1].step in self.ledger.committed \
                and self.ledger.worker_pid is not None

        self._wait(ready, what="two intact committed checkpoints")
        newest = self._intact()[-1]
        files = sorted((p for p in newest.path.iterdir() if p.name != contract.MANIFEST_NAME),
                       key=lambda p: p.stat().st_size)
        target = files[-1]
        size = target.stat().st_size
        if rec.kind == "ckpt_truncate":
            os.truncate(target, size // 2)
            rec.detail = f"{newest.path.name}/{target.name} truncated to {size // 2} of {size} bytes"
        else:
            pos = self.rng.randrange(size)
            with open(target, "r+b") as f:
                f.seek(pos)
                byte = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([byte ^ (1 << self.rng.randrange(8))]))
            rec.detail = f"{newest.path.name}/{target.name} bit flipped at byte {pos}"
        self.ledger.mark_corrupted(newest.step)
        self._kill_worker()

    # ------------------------------------------------------------------ run

    def _plan(self) -> list[str]:
        if self.s.plan:
            return [k for k in self.s.plan if k not in self.skipped]
        kinds = [k for k in self.s.kinds if k not in self.skipped]
        # Every kind at least once, then random; shuffled with the seed.
        plan = list(kinds)[: self.s.faults]
        plan += [self.rng.choice(kinds) for _ in range(self.s.faults - len(plan))]
        self.rng.shuffle(plan)
        return plan

    def run(self) -> Result:
        owned = self.s.workdir is None
        self.work = Path(tempfile.mkdtemp(prefix="preemptd-chaos-")) if owned else Path(self.s.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.work / "ckpt"
        self.ckpt.mkdir()
        self._events_file = open(self.work / "events.jsonl", "a", buffering=1)  # noqa: SIM115
        reason = _tmpfs(self.ckpt, self.s.tmpfs_mib)
        mounted = reason is None
        if reason:
            self.skipped["disk_full"] = reason
        try:
            return self._run()
        finally:
            if self.daemon is not None:
                self.daemon.close()
            for fake in self.fakes.values():
                fake.close()
            if mounted:
                _umount(self.ckpt)
            self._events_file.close()
            if owned and not self.violations:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> Result:
        s = self.s
        plan = self._plan()
        self.say(f"seed {s.seed}; {len(plan)} faults; {s.steps} steps, checkpoint every {s.every_steps}; "
                 f"work dir {self.work}" + "".join(f"; {k} skipped: {v}" for k, v in self.skipped.items()))
        baseline: dict[str, Any] = {}

        def reference() -> None:
            baseline["digest"], baseline["seconds"] = run_bare(
                s.steps, s.every_steps, self.work / "bare", self.work,
                env={"EXAMPLE_STEP_DELAY": f"{s.step_delay:g}"})

        ref_thread = threading.Thread(target=reference, daemon=True)
        if s.parallel_baseline:
            ref_thread.start()
        else:
            reference()
            self.say(f"uninterrupted run: {baseline['seconds']:.1f} s, weights {baseline['digest'][:16]}")
        t0 = time.monotonic()
        self._start_daemon()
        for i, kind in enumerate(plan):
            target = (i + 1) * s.gap
            self._wait(lambda t=target: self._progress_at_least(t), what=f"step {target}")
            n_inc, inc = self.ledger.current()
            assert inc is not None
            rec = FaultRecord(index=i, kind=kind, at_step=inc.max_step, t=time.monotonic(),
                              incarnation=n_inc - 1)
            self._inject(rec)
            if kind == "disk_full":
                released = time.monotonic()
                self._wait(lambda r=released: self._stepped_since(r), what="training after disk full")
            else:
                self._wait(lambda n=n_inc: self._new_incarnation_stepped(n), what=f"recovery from {kind}")
            n_now, now_inc = self.ledger.current()
            rec.recovered_incarnation = n_now - 1
            if now_inc is not None and n_now > n_inc and now_inc.t_first_step is not None:
                rec.recovery_seconds = now_inc.t_first_step - rec.t
            rec.lost = self.ledger.steps_lost(rec.incarnation, n_now - 1)
            self.faults.append(rec)
            self.say(f"fault {i + 1}/{len(plan)} {kind} at step {rec.at_step}: {rec.detail or ''} "
                     f"rc={rec.rc} lost={rec.lost} recovery={_s(rec.recovery_seconds)}")
        self._wait(lambda: self.ledger.digest is not None, timeout=WAIT * 4, what="training to finish")
        campaign_seconds = (self.ledger.t_finished or time.monotonic()) - t0
        self.final_rc = self._end_daemon()
        if s.parallel_baseline:
            ref_thread.join(WAIT * 3)
        result = Result(s, self.faults, self.ledger, baseline.get("digest", ""), baseline.get("seconds", 0.0),
                        campaign_seconds, self.daemon_starts, self.final_rc, dict(self.skipped))
        result.violations = self.violations = check(result, len(plan))
        return result

    def _new_incarnation_stepped(self, n_before: int) -> bool:
        n, inc = self.ledger.current()
        return n > n_before and inc is not None and inc.t_first_step is not None

    def _stepped_since(self, t: float) -> bool:
        with self.ledger.lock:
            return self.ledger.t_last_step > t


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}s"


def check(r: Result, planned: int) -> list[str]:
    """The campaign's invariants; an empty list when all hold."""
    out = list(r.ledger.violations())
    if len(r.faults) != planned:
        out.append(f"only {len(r.faults)} of {planned} faults were injected")
    if r.ledger.digest is None:
        out.append("training did not complete")
    if r.final_rc != contract.EXIT_OK:
        out.append(f"the last daemon exited {r.final_rc}, not 0")
    if not r.baseline_digest:
        out.append("the uninterrupted reference run did not finish")
    elif r.ledger.digest != r.baseline_digest:
        out.append("final weights differ from the uninterrupted run: "
                   f"{r.ledger.digest} != {r.baseline_digest}")
    for f in r.faults:
        if f.kind in NOTICED and f.lost != 0:
            out.append(f"fault {f.index} ({f.kind}): {f.lost} steps lost, expected 0")
        if f.kind in NOTICED and f.rc != contract.EXIT_OK:
            out.append(f"fault {f.index} ({f.kind}): daemon exited {f.rc}, "
                       "expected 0 (confirmed final checkpoint)")
    return out


def summary(r: Result) -> str:
    """Faults per kind, restarts, steps lost per fault, recovery and total overhead, as text."""
    lines = [f"chaos campaign: seed {r.settings.seed}, {len(r.faults)} faults, {r.settings.steps} steps, "
             f"checkpoint every {r.settings.every_steps} steps"
             + (", warm standby on" if r.settings.warm_standby else "")]
    for kind, why in r.skipped.items():
        lines.append(f"  skipped kind {kind}: {why}")
    by_kind: dict[str, list[FaultRecord]] = {}
    for f in r.faults:
        by_kind.setdefault(f.kind, []).append(f)
    lines.append(f"  {'kind':<24}{'count':>6}{'lost/fault (each)':>40}{'recovery median':>18}")
    for kind in KINDS:
        fs = by_kind.get(kind, [])
        if not fs:
            continue
        lost = [f.lost for f in fs if f.lost is not None]
        rec = [f.recovery_seconds for f in fs if f.recovery_seconds is not None]
        each = ",".join(str(x) for x in lost)
        each = each if len(each) <= 38 else each[:35] + "..."
        lines.append(f"  {kind:<24}{len(fs):>6}{each:>40}{_s(statistics.median(rec) if rec else None):>18}")
    n_inc = len(r.ledger.incarnations)
    lost_total = sum(f.lost or 0 for f in r.faults)
    lines.append(f"  restarts: {n_inc - 1} worker starts after the first, "
                 f"{r.daemon_starts - 1} daemon restarts; "
                 f"disk full: {r.ledger.failed_saves} saves failed, {r.ledger.skipped_saves} skipped")
    lines.append(f"  steps lost: {lost_total} in all, {lost_total / max(1, len(r.faults)):.2f} per fault; "
                 f"noticed preemptions/SIGTERM: "
                 f"{sum(f.lost or 0 for f in r.faults if f.kind in NOTICED)} lost over "
                 f"{sum(1 for f in r.faults if f.kind in NOTICED)}")
    if r.baseline_seconds:
        lines.append(f"  overhead: {r.campaign_seconds:.1f} s under faults vs {r.baseline_seconds:.1f} s "
                     f"uninterrupted ({r.campaign_seconds / r.baseline_seconds:.2f}x"
                     + (", reference ran concurrently" if r.settings.parallel_baseline else "") + ")")
    lines.append(f"  final weights {'EQUAL' if r.ledger.digest == r.baseline_digest else 'DIFFER'}: "
                 f"{(r.ledger.digest or '-')[:16]} vs uninterrupted {(r.baseline_digest or '-')[:16]}")
    lines.append("  invariants: " + ("all hold" if r.ok else "VIOLATED:\n    " + "\n    ".join(r.violations)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.campaign", description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--gap", type=int, default=10, help="training steps between faults")
    p.add_argument("--every-steps", type=int, default=5)
    p.add_argument("--step-delay", type=float, default=0.02)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: " + ", ".join(KINDS))
    p.add_argument("--warm-standby", action="store_true", help="worker.warm_standby = true")
    p.add_argument("--workdir", default=None,
                   help="keep everything here (default: a temp dir, removed on success)")
    a = p.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kind(s): {', '.join(bad)}")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    s = Settings(faults=a.faults, seed=seed, gap=a.gap, every_steps=a.every_steps, step_delay=a.step_delay,
                 kinds=kinds, warm_standby=a.warm_standby, workdir=Path(a.workdir) if a.workdir else None)
    result = Campaign(s).run()
    print(summary(result), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
