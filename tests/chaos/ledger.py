"""What happened during a chaos run, built from the log lines of the daemon and its workers.

Every worker incarnation (one `train.started`) records the step it resumed from, the
checkpoint it restored (verified against its manifest the moment it was reported),
the newest checkpoint known to be committed and intact when it started, and the
highest step it reached. The invariants of the campaign are checked on these facts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from daemon import contract


@dataclass
class Incarnation:
    """One worker process's run of the training loop."""

    start_step: int
    t_start: float
    newest_known: int | None  # newest committed, intact checkpoint when it started
    restored_path: str | None
    restored_step: int | None
    restored_ok: bool | None  # the restored folder verified (checksums) when reported
    restored_error: str = ""
    max_step: int = 0
    t_first_step: float | None = None


@dataclass
class FaultRecord:
    """One injected fault and what it cost."""

    index: int
    kind: str
    at_step: int
    t: float
    incarnation: int  # index of the incarnation hit by the fault
    detail: str = ""
    rc: int | None = None  # daemon exit code, for faults that end the daemon
    recovered_incarnation: int | None = None
    recovery_seconds: float | None = None
    lost: int | None = None


@dataclass
class Ledger:
    """Thread-safe; `on_event` is called from the reader threads for every parsed line."""

    incarnations: list[Incarnation] = field(default_factory=list)
    committed: dict[int, str] = field(default_factory=dict)  # step -> path, intact as far as we know
    corrupted: set[int] = field(default_factory=set)
    failed_saves: int = 0
    skipped_saves: int = 0  # periodic saves the disk guard told the worker to skip
    digest: str | None = None
    t_finished: float | None = None
    worker_pid: int | None = None
    daemon_lines: int = 0
    t_last_step: float = 0.0
    _pending_restore: tuple[str | None, int | None, bool | None, str] = (None, None, None, "")
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------ observing

    def on_event(self, ev: dict[str, Any]) -> None:
        name = ev["event"]
        with self.lock:
            if ev["src"] == "daemon":
                self.daemon_lines += 1
                if name == "worker.started":
                    self.worker_pid = int(ev["pid"])
                elif name == "worker.exited":
                    self.worker_pid = None
                return
            if name == "checkpoint.restored":
                path = str(ev.get("path"))
                ok, error = True, ""
                try:  # verify now: retention may remove it a few saves later
                    contract.verify(path, checksums=True)
                except contract.InvalidCheckpoint as exc:
                    ok, error = False, str(exc)
                self._pending_restore = (path, int(ev["step"]), ok, error)
            elif name == "checkpoint.initialized":
                self._pending_restore = (None, None, None, "")
            elif name == "train.started":
                path, step, ok, error = self._pending_restore
                self._pending_restore = (None, None, None, "")
                start = int(ev["start_step"])
                self.incarnations.append(Incarnation(
                    start_step=start, t_start=ev["_t"], newest_known=self.newest_intact(),
                    restored_path=path, restored_step=step, restored_ok=ok, restored_error=error,
                    max_step=start,
                ))
            elif name == "train.step" and self.incarnations:
                inc = self.incarnations[-1]
                step = int(ev["step"])
                if step > inc.max_step:
                    inc.max_step = step
                if inc.t_first_step is None:
                    inc.t_first_step = ev["_t"]
                self.t_last_step = ev["_t"]
            elif name == "checkpoint.committed":
                step = int(ev["step"])
                self.committed[step] = str(ev.get("path"))
                self.corrupted.discard(step)
            elif name == "checkpoint.failed":
                self.failed_saves += 1
            elif name == "checkpoint.skipped" and ev.get("reason") == "periodic":
                self.skipped_saves += 1
            elif name == "train.finished":
                self.digest = str(ev["weights_sha256"])
                self.t_finished = ev["_t"]

    def newest_intact(self) -> int | None:
        steps = [s for s in self.committed if s not in self.corrupted]
        return max(steps) if steps else None

    def mark_corrupted(self, step: int) -> None:
        with self.lock:
            self.corrupted.add(step)

    # ------------------------------------------------------------ reading

    def current(self) -> tuple[int, Incarnation | None]:
        with self.lock:
            n = len(self.incarnations)
            return n, (self.incarnations[-1] if n else None)

    def steps_lost(self, first: int, last: int) -> int:
        """Steps done by incarnations first..last-1 that the next one did again."""
        with self.lock:
            incs = self.incarnations
            return sum(max(0, incs[j].max_step - incs[j + 1].start_step) for j in range(first, last))

    def violations(self) -> list[str]:
        """Every broken invariant of the resume contract, in words."""
        out = []
        with self.lock:
            for j, inc in enumerate(self.incarnations):
                if j == 0:
                    continue
                if inc.newest_known is not None:
                    if inc.restored_path is None:
                        out.append(f"incarnation {j}: started fresh though step {inc.newest_known} "
                                   "was committed")
                    elif not inc.restored_ok:
                        out.append(f"incarnation {j}: restored an invalid checkpoint {inc.restored_path}: "
                                   f"{inc.restored_error}")
                    if inc.start_step < inc.newest_known:
                        out.append(f"incarnation {j}: resumed at step {inc.start_step}, before the newest "
                                   f"committed checkpoint (step {inc.newest_known})")
                if inc.restored_step is not None and inc.restored_step != inc.start_step:
                    out.append(f"incarnation {j}: restored step {inc.restored_step} but started at "
                               f"{inc.start_step}")
        return out
