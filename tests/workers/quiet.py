"""Benchmark worker: says hello, then one heartbeat per argv[1] seconds, forever."""

import sys
import time

from tests.workers.common import send

send("hello", handles=["SIGTERM"], framework="none")
period = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
step = 0
while True:
    time.sleep(period)
    step += 1
    send("progress", step=step)
