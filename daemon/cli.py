"""`preemptd` command line: run, status, checkpoint, validate.

Bad input never produces a traceback: one line on stderr naming the key, flag or
path, and a documented exit code (64 usage, 78 config; see docs/supervisor.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog

from daemon import config as config_mod
from daemon import contract, statefile
from daemon.config import Config, ConfigError

# `preemptd status` / `checkpoint` when no daemon runs on the state dir (LSB "not running").
EXIT_NOT_RUNNING = 3

# CLI flags of `run` that override one config key each: flag -> (section, key, type).
OVERRIDES: dict[str, tuple[str, str, type]] = {
    "state_dir": ("daemon", "state_dir", str),
    "checkpoint_dir": ("checkpoint", "dir", str),
    "grace_seconds": ("stop", "grace_seconds", float),
    "max_restarts": ("restart", "max_restarts", int),
    "window_seconds": ("restart", "window_seconds", float),
    "backoff_initial_seconds": ("restart", "backoff_initial_seconds", float),
    "backoff_max_seconds": ("restart", "backoff_max_seconds", float),
    "hang_timeout_seconds": ("restart", "hang_timeout_seconds", float),
    "log_level": ("daemon", "log_level", str),
    "log_format": ("daemon", "log_format", str),
}


class UsageError(Exception):
    """Bad command line (exit 64)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preemptd", description="Keeps training alive on preemptible VMs.")
    sub = parser.add_subparsers(dest="verb", metavar="{run,status,checkpoint,validate}")

    run = sub.add_parser("run", help="supervise the worker command (after `--` or in the config)",
                         usage="preemptd run [options] [-- COMMAND [ARGS...]]")
    run.add_argument("-c", "--config", help="TOML config file")
    run.add_argument("--state-dir", help="daemon.state_dir")
    run.add_argument("--checkpoint-dir", help="checkpoint.dir")
    run.add_argument("--grace-seconds", type=float, help="stop.grace_seconds")
    run.add_argument("--max-restarts", type=int, help="restart.max_restarts")
    run.add_argument("--window-seconds", type=float, help="restart.window_seconds")
    run.add_argument("--backoff-initial-seconds", type=float, help="restart.backoff_initial_seconds")
    run.add_argument("--backoff-max-seconds", type=float, help="restart.backoff_max_seconds")
    run.add_argument("--hang-timeout-seconds", type=float, help="restart.hang_timeout_seconds")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--log-format", choices=("json", "console", "auto"))

    for verb, text in (("status", "show what the running daemon is doing"),
                       ("checkpoint", "ask the running daemon for a checkpoint now")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("-c", "--config", help="TOML config file (for its daemon.state_dir)")
        p.add_argument("--state-dir", help="the daemon's state dir")
        if verb == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("--wait", type=float, metavar="SECONDS", default=0.0,
                           help="wait up to SECONDS for the checkpoint to be committed")

    val = sub.add_parser("validate", help="check a config file and say what is wrong")
    val.add_argument("config", metavar="CONFIG", help="TOML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `preemptd` console script and `python -m daemon`."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in args_list:
        i = args_list.index("--")
        args_list, command = args_list[:i], args_list[i + 1:]
    try:
        args = build_parser().parse_args(args_list)
        if args.verb is None:
            raise UsageError("preemptd: missing verb; one of run, status, checkpoint, validate")
        if command is not None and args.verb != "run":
            raise UsageError(f"preemptd {args.verb}: takes no command after `--`")
        if args.verb == "run":
            return cmd_run(args, command)
        if args.verb == "status":
            return cmd_status(args)
        if args.verb == "checkpoint":
            return cmd_checkpoint(args)
        return cmd_validate(args)
    except UsageError as exc:
        _err(str(exc))
        return contract.EXIT_USAGE
    except ConfigError as exc:
        _err(f"preemptd: {exc}")
        return contract.EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C before the daemon installed its handlers
        _err("preemptd: interrupted")
        return 130


def _err(text: str) -> None:
    print(" ".join(text.split()) if "\n" not in text.strip() else text.strip(), file=sys.stderr)


# ------------------------------------------------------------------------ config

def load_config(path: str | None, args: argparse.Namespace | None = None,
                command: Sequence[str] | None = None) -> Config:
    """Config file (or defaults) + CLI overrides + command after `--`, validated."""
    cfg = config_mod.load(path) if path else Config()
    if args is not None:
        for attr, (section, key, _type) in OVERRIDES.items():
            value = getattr(args, attr, None)
            if value is None:
                continue
            check = config_mod.SCHEMA[section][key]
            cfg = cfg.replace(section, **{key: check(f"{section}.{key}", value)})
    if command:
        check = config_mod.SCHEMA["worker"]["command"]
        cfg = cfg.replace("worker", command=check("worker.command", list(command)))
    config_mod._cross_checks(cfg)
    return cfg


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    return Path(load_config(args.config).daemon.state_dir)


# ---------------------------------------------------------------------------- run

def cmd_run(args: argparse.Namespace, command: list[str] | None) -> int:
    from daemon import logging as dlogging
    from daemon.assembly import build_components
    from daemon.clock import SystemClock
    from daemon.lock import AlreadyRunning
    from daemon.standby import spawner_factory
    from daemon.supervisor import Supervisor

    if command is not None and not command:
        raise UsageError("preemptd run: `--` must be followed by the worker command")
    cfg = load_config(args.config, args, command)
    config_mod.require_command(cfg)
    dlogging.configure(cfg.daemon.log_level, cfg.daemon.log_format)
    clock = SystemClock()
    try:
        components = build_components(cfg, clock)
    except OSError as exc:  # e.g. a component cannot open what its config names
        raise ConfigError(f"cannot set up the daemon's components: {exc}") from None
    # worker.warm_standby: a spare worker with the framework imported takes over after a crash.
    supervisor = Supervisor(cfg, components=components, clock=clock, spawner_factory=spawner_factory(cfg))
    try:
        code = supervisor.run()
    except AlreadyRunning as exc:
        _err(f"preemptd: {exc}")
        return contract.EXIT_CONFIG
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a daemon bug: logged with its traceback, EX_SOFTWARE
        structlog.get_logger().exception("daemon.internal_error")
        return contract.EXIT_GAVE_UP
    if supervisor.failure:
        _err(f"preemptd: {supervisor.failure}")
    return code


# ------------------------------------------------------------------------- status

def _daemon_running(state_dir: Path) -> int | None:
    from daemon.lock import held_by

    return held_by(state_dir)


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    running_pid = _daemon_running(state_dir)
    try:
        data = statefile.read(state_dir)
    except statefile.StateFileError as exc:
        if args.json:
            print(json.dumps({"daemon_running": running_pid is not None, "error": str(exc)}))
        else:
            _err(f"preemptd: {exc}")
        return EXIT_NOT_RUNNING
    data["daemon_running"] = running_pid is not None
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(render_status(data))
    return 0 if running_pid is not None else EXIT_NOT_RUNNING


def _fmt_age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def render_status(data: dict[str, Any]) -> str:
    """Human text for `preemptd status`."""
    lines = []
    if data.get("daemon_running"):
        lines.append(f"preemptd: running (pid {data.get('daemon_pid')}), worker {data.get('state')}"
                     + (f" (pid {data['worker_pid']})" if data.get("worker_pid") else ""))
    else:
        lines.append(f"preemptd: not running (last state: {data.get('state')}"
                     + (f", exit code {data['exit_code']}" if data.get("exit_code") is not None else "")
                     + ")")
    lines.append(f"  step:            {data.get('step') if data.get('step') is not None else '-'}")
    ck = data.get("last_checkpoint") or {}
    if ck.get("path"):
        lines.append(f"  last checkpoint: step {ck.get('step')}, {_fmt_age(ck.get('age_seconds'))} ago, "
                     f"{ck.get('reason')}, {ck.get('path')}")
    else:
        lines.append("  last checkpoint: none reported since the daemon started")
    last_exit = data.get("last_exit") or {}
    exit_text = ("-" if last_exit.get("code") is None and last_exit.get("signal") is None
                 else f"code {last_exit['code']}" if last_exit.get("code") is not None
                 else f"signal {last_exit['signal']}")
    lines.append(f"  restarts:        {data.get('restarts', 0)} (last exit: {exit_text})")
    notices = data.get("notices") or []
    if notices:
        last = notices[-1]
        lines.append(f"  notices:         {len(notices)}; last: {last.get('source')} {last.get('kind')}")
    else:
        lines.append("  notices:         none")
    disk = data.get("disk") or {}
    if disk.get("percent") is not None:
        free = _fmt_bytes(disk.get("free_bytes"))
        lines.append(f"  disk:            {disk['percent']:.1f}% used, {free} free")
    for name in data.get("components") or []:
        key = name if name in data else f"component.{name}"
        value = data.get(key)
        if not value:
            continue
        # A component's own one-line summary reads better than its raw facts.
        text = value.get("summary") if isinstance(value, dict) else None
        if not isinstance(text, str):
            text = json.dumps(value, sort_keys=True, default=str)
        lines.append(f"  {name + ':':<17}{text}")
    return "\n".join(lines)


# --------------------------------------------------------------------- checkpoint

def cmd_checkpoint(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    pid = _daemon_running(state_dir)
    if pid is None:
        _err(f"preemptd: no preemptd is running on state dir {state_dir}")
        return EXIT_NOT_RUNNING
    before = _checkpoint_mark(state_dir)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        _err(f"preemptd: daemon pid {pid} is gone")
        return EXIT_NOT_RUNNING
    except PermissionError:
        _err(f"preemptd: not allowed to signal daemon pid {pid} (run as its user)")
        return contract.EXIT_USAGE
    print(f"checkpoint requested from preemptd pid {pid}")
    if args.wait <= 0:
        return 0
    end = time.monotonic() + args.wait
    while time.monotonic() < end:
        mark = _checkpoint_mark(state_dir)
        if mark is not None and mark != before:
            print(f"checkpoint committed: step {mark[1]}, {mark[2]}")
            return 0
        time.sleep(0.2)
    _err(f"preemptd: no checkpoint committed within {args.wait:g} s")
    return contract.EXIT_UNCONFIRMED


def _checkpoint_mark(state_dir: Path) -> tuple[Any, Any, Any] | None:
    try:
        ck = statefile.read(state_dir).get("last_checkpoint") or {}
    except statefile.StateFileError:
        return None
    return (ck.get("wall"), ck.get("step"), ck.get("path"))


# ----------------------------------------------------------------------- validate

def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{args.config}: OK")
    cmd = " ".join(cfg.worker.command) or "(not set: give it after -- to preemptd run)"
    print(f"  worker.command:  {cmd}")
    print(f"  checkpoint.dir:  {cfg.checkpoint.dir}")
    print(f"  daemon.state_dir: {cfg.daemon.state_dir}")
    r = cfg.restart
    print(f"  restart:         up to {r.max_restarts} in {r.window_seconds:g} s, backoff "
          f"{r.backoff_initial_seconds:g}-{r.backoff_max_seconds:g} s, hang timeout "
          f"{r.hang_timeout_seconds:g} s{' (off)' if r.hang_timeout_seconds == 0 else ''}")
    print(f"  stop:            grace {cfg.stop.grace_seconds:g} s")
    if cfg.remote.url:
        # A missing optional package or a bad storage option must show here, not at run.
        from daemon.remote.store import open_store, scrub_url

        open_store(cfg.remote)
        print(f"  remote:          {scrub_url(cfg.remote.url)}")
    return 0
