"""Send garbage, oversized and unknown datagrams, then one valid heartbeat; then sleep."""

import contextlib
import json
import os
import time

from tests.workers.common import record, send, send_raw

record("started")
pid = os.getpid()
bad = [
    b"",
    b"\xff\xfe not utf8",
    b"not json",
    b"[1, 2, 3]",
    json.dumps({"type": "nope", "pid": pid}).encode(),
    json.dumps({"type": "progress", "pid": pid, "step": -5}).encode(),
    json.dumps({"type": "progress", "pid": pid, "step": "7"}).encode(),
    json.dumps({"type": "checkpoint", "pid": pid, "step": 3, "path": "", "bytes": 1,
                "seconds": 1, "reason": "periodic"}).encode(),
    json.dumps({"type": "checkpoint", "pid": pid, "step": 3, "path": "/x", "bytes": 1,
                "seconds": 1, "reason": "bogus"}).encode(),
    b"{" * 3000,
]
for data in bad:
    send_raw(data)
with contextlib.suppress(OSError):  # too big for the socket buffer is fine too
    send_raw(b"x" * 60000)  # oversized
send("progress", step=42)
record("sent")
while True:
    time.sleep(3600)
