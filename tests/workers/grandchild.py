"""Fork a grandchild (a sleeping process) that records its pid, then sleep or crash.

argv[1]: "sleep" (stay alive) or "crash" (exit 3 after the grandchild is up).
"""

import subprocess
import sys
import time

from tests.workers.common import record

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
record("started", grandchild=child.pid)
if len(sys.argv) > 1 and sys.argv[1] == "crash":
    time.sleep(0.2)
    sys.exit(3)
while True:
    time.sleep(3600)
