"""Die by a signal (argv[1], e.g. SEGV or KILL) after argv[2] seconds."""

import os
import signal
import sys
import time

from tests.workers.common import record

record("started")
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
sig = getattr(signal, "SIG" + sys.argv[1])
signal.signal(sig, signal.SIG_DFL)
record("exiting")
os.kill(os.getpid(), sig)
time.sleep(5)
