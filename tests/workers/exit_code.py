"""Exit with code argv[1] after sleeping argv[2] seconds (crash: code != 0; finished: 0)."""

import sys
import time

from tests.workers.common import record

record("started")
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
record("exiting")
sys.exit(int(sys.argv[1]))
