"""Benchmark worker: record the wall time of its death, then die at once (os._exit, no teardown).

argv[1]: seconds to live first (so the daemon is idle in its selector when the death comes).
"""

import json
import os
import sys
import time

time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.1)
fd = os.open(os.environ["WORKER_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
line = json.dumps({"event": "exiting", "pid": os.getpid(), "t": time.time()}) + "\n"
os.write(fd, line.encode())
os._exit(1)
