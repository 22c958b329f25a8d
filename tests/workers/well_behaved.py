"""A worker that follows the contract: hello, heartbeats, SIGUSR1/SIGTERM checkpoints, resume.

Env knobs: STEP_SECONDS (default 0.02), TOTAL_STEPS (0 = run forever),
SAVE_SECONDS (how long a checkpoint takes; default 0), HEARTBEAT_EVERY (steps, default 5).
"""

import os
import signal
import sys
import time

from tests.workers.common import record, resume_step, send, write_checkpoint

requests: list[str] = []
signal.signal(signal.SIGUSR1, lambda s, f: requests.append("checkpoint"))
signal.signal(signal.SIGTERM, lambda s, f: requests.append("stop"))

step_seconds = float(os.environ.get("STEP_SECONDS", "0.02"))
total = int(os.environ.get("TOTAL_STEPS", "0"))
save_seconds = float(os.environ.get("SAVE_SECONDS", "0"))
every = int(os.environ.get("HEARTBEAT_EVERY", "5"))

step = resume_step()
record("started", step=step)
send("hello", handles=["SIGUSR1", "SIGTERM"], framework="test")


def save(reason: str) -> None:
    t0 = time.monotonic()
    time.sleep(save_seconds)
    path = write_checkpoint(step, reason)
    send("checkpoint", step=step, path=path, bytes=7, seconds=time.monotonic() - t0, reason=reason)
    record("checkpoint", step=step, reason=reason, path=path)


while True:
    time.sleep(step_seconds)
    step += 1
    if step % every == 0:
        send("progress", step=step)
    while requests:
        what = requests.pop(0)
        if what == "checkpoint":
            save("requested")
        else:
            save("preemption")
            record("exiting", step=step)
            sys.exit(0)
    if total and step >= total:
        save("final")
        record("finished", step=step)
        sys.exit(0)
