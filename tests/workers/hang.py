"""Send argv[1] heartbeats (one per 50 ms), then go silent forever (but stay alive)."""

import sys
import time

from tests.workers.common import record, send

record("started")
for step in range(1, int(sys.argv[1]) + 1):
    send("progress", step=step)
    time.sleep(0.05)
record("silent")
while True:
    time.sleep(3600)
