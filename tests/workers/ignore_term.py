"""Ignore SIGTERM (and SIGINT) and sleep forever: only SIGKILL stops it."""

import signal
import time

from tests.workers.common import record

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
record("started")
while True:
    time.sleep(3600)
