"""The warm standby worker: `python -m service.standby` (started by the daemon, not by users).

Imports the framework ahead of time — by default ``tensorflow`` and ``keras``; set
``PREEMPTD_STANDBY_PRELOAD`` (comma-separated modules, in ``[worker] env``) to add the
training program's own heavy imports — without creating a TF context, so no GPU is
touched and no GPU memory is taken. It then marks itself ready and blocks on its FIFO
until the daemon promotes it with the go message (argv, env, cwd). It takes that env
(PREEMPTD_RESUME, PREEMPTD_RESTART, ...), and runs ``python -m module args`` or
``python script args`` in this process with runpy, exactly as the interpreter would.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import time
from pathlib import Path

import structlog

from daemon.standby import DEFAULT_PRELOAD, ENV_FIFO, ENV_PRELOAD, READY_SUFFIX, python_target, read_go

log = structlog.get_logger()


def preload(names: list[str]) -> dict[str, float]:
    """Import each module (seconds per module); a missing one is logged and skipped."""
    took = {}
    for name in names:
        started = time.monotonic()
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("standby.preload_failed", module=name, error=str(exc))
            continue
        took[name] = round(time.monotonic() - started, 3)
    return took


def preload_names(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    extra = [n.strip() for n in environ.get(ENV_PRELOAD, "").split(",") if n.strip()]
    return list(dict.fromkeys([*DEFAULT_PRELOAD, *extra]))


def run_command(argv: list[str]) -> None:
    """Run `python -m module args` / `python script args` in this process (raises SystemExit)."""
    target = python_target(argv)
    if target is None:
        raise SystemExit(f"preemptd standby: cannot run {argv!r} in-process")
    if target.kind == "module":
        sys.argv = [target.target, *target.args]  # runpy puts the module's file in argv[0]
        runpy.run_module(target.target, run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(target.target)
        sys.argv = [target.target, *target.args]
        sys.path[0] = os.path.dirname(script)  # as `python script.py` does
        runpy.run_path(script, run_name="__main__")


def main() -> int:
    fifo = os.environ.get(ENV_FIFO, "")
    if not fifo:
        print(f"preemptd standby: {ENV_FIFO} is not set; this is started by the daemon", file=sys.stderr)
        return 64
    fd = os.open(fifo, os.O_RDONLY)  # the daemon holds a read-write end: never blocks
    took = preload(preload_names(os.environ))
    Path(fifo + READY_SUFFIX).touch()
    log.debug("standby.ready", pid=os.getpid(), preloaded=took)
    msg = read_go(fd)
    os.close(fd)
    env = {str(k): str(v) for k, v in msg["env"].items()}
    os.environ.clear()
    os.environ.update(env)
    cwd = str(msg.get("cwd") or "")
    if cwd:
        os.chdir(cwd)
    argv = [str(a) for a in msg["argv"]]
    run_command(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
