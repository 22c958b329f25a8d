#!/usr/bin/env python3
"""Set up and run preemptd's main jobs with nothing but Python installed.

    python3 tasks.py demo    # venv + install, then the example training under the supervisor
    python3 tasks.py test    # venv + install, then lint, types and the test suite
    python3 tasks.py bench   # venv + install, then every benchmark, one report

The venv lives in .venv; it is (re)installed when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".preemptd-installed"


def run(*cmd: str | os.PathLike[str], check: bool = True) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=check).returncode


def setup(extras: str = "tf,test") -> None:
    """Create .venv and install the project (editable) with `extras`, once per pyproject."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not PY.exists():
        run(sys.executable, "-m", "venv", VENV)
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]")
    STAMP.write_text(want)


def test(args: list[str]) -> int:
    setup("tf,test,remote")
    bin_ = VENV / "bin"
    rc = 0
    rc |= run(bin_ / "ruff", "check", "daemon", "service", check=False)
    rc |= run(bin_ / "mypy", check=False)
    # Default run: everything but the slow/on-demand tests; benchmarks live elsewhere.
    rc |= run(PY, "-m", "pytest", "-m", "not slow", "-q", *args, check=False)
    return 1 if rc else 0


def demo(args: list[str]) -> int:
    setup("tf,test")
    return run(PY, "-m", "service.examples.demo", *args, check=False)


def bench(args: list[str]) -> int:
    setup("tf,test,remote")
    return run(PY, "-m", "tests.bench.report", *args, check=False)


def main() -> int:
    tasks = {"test": test, "demo": demo, "bench": bench}
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        print(__doc__, file=sys.stderr)
        return 64
    return tasks[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
