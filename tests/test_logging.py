"""Log lines of the daemon and its worker share one stdout: every line must stay whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A process that logs like the daemon (or a worker, with origin) as fast as it can.
WRITER = """
import sys
import structlog
from daemon import logging as dlogging
dlogging.configure(fmt="json", origin=sys.argv[1])
log = structlog.get_logger()
for i in range(int(sys.argv[2])):
    log.info("bench.line", i=i, pad="x" * 200)
"""


def test_concurrent_writers_on_one_unbuffered_stdout_never_split_a_line() -> None:
    lines = 20000  # fewer lines let the old two-write logger pass now and then
    origins = ("daemon", "worker", "worker2", "worker3")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    read_end, write_end = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, origin, str(lines)], stdout=write_end, env=env)
        for origin in origins
    ]
    os.close(write_end)
    with os.fdopen(read_end, "r") as reader:
        out = reader.read()
    assert [p.wait(60) for p in procs] == [0] * len(procs)
    records = out.splitlines()
    bad = [line[:200] for line in records if not line.startswith("{") or not line.endswith("}")]
    assert not bad, f"{len(bad)} split or merged lines, e.g. {bad[:3]}"
    parsed = [json.loads(line) for line in records]
    for origin in origins:
        assert [r["i"] for r in parsed if r["origin"] == origin] == list(range(lines))
