"""`preemptd` CLI: bad input gives one clear stderr line and a documented exit code, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import structlog

from daemon import contract
from daemon.cli import main, render_status
from tests.workers.harness import PY, ROOT


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PY, "-m", "daemon", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def one_line_error(cp: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


@pytest.fixture
def inproc(capsys: pytest.CaptureFixture[str]):
    """Call main() in this process (fast); an escaping exception would fail the test."""

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    yield call
    structlog.reset_defaults()  # `run` configured logging onto capsys's stream


@pytest.mark.parametrize(("args", "code", "needle"), [
    ([], 64, "missing verb"),
    (["frobnicate"], 64, "invalid choice"),
    (["run", "--max-restarts", "x", "--", "true"], 64, "--max-restarts"),
    (["run", "--"], 64, "must be followed by the worker command"),
    (["status", "--", "x"], 64, "takes no command"),
    (["run", "--max-restarts", "-1", "--", "true"], 78, "restart.max_restarts"),
    (["run", "--grace-seconds", "0", "--", "true"], 78, "stop.grace_seconds"),
    (["run", "--backoff-initial-seconds", "9", "--backoff-max-seconds", "1", "--", "true"], 78,
     "restart.backoff_max_seconds"),
    (["run", "--config", "/nonexistent/preemptd.toml", "--", "true"], 78, "config file not found"),
    (["run", "--state-dir", "/dev/null/state", "--", "true"], 78, "daemon.state_dir: /dev/null/state"),
    (["validate", "/nonexistent.toml"], 78, "config file not found"),
])
def test_bad_input_exit_codes(tmp_path: Path, inproc, args: list[str], code: int, needle: str) -> None:
    if args and args[0] == "run" and "--state-dir" not in args:
        args = ["run", "--state-dir", str(tmp_path / "s"), "--checkpoint-dir", str(tmp_path / "c"), *args[1:]]
    cp = inproc(*args)
    assert cp.returncode == code, cp.stderr
    assert needle in one_line_error(cp)


def test_missing_command_and_bad_dirs(tmp_path: Path, inproc) -> None:
    cli = inproc
    cp = cli("run", "--state-dir", str(tmp_path / "s"))
    assert cp.returncode == 78 and "worker.command: missing" in one_line_error(cp)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cp = cli("run", "--state-dir", str(tmp_path / "s"), "--checkpoint-dir", str(blocker / "c"), "--", "true")
    assert cp.returncode == 78 and "checkpoint.dir" in one_line_error(cp)
    too_long = tmp_path / ("d" * 100)
    cp = cli("run", "--state-dir", str(too_long), "--checkpoint-dir", str(tmp_path / "c"), "--", "true")
    assert cp.returncode == 78 and "socket path" in one_line_error(cp)


def test_bad_config_file_names_key(tmp_path: Path, inproc) -> None:
    cli = inproc
    cfg = tmp_path / "c.toml"
    cfg.write_text("[restart]\nmax_restarts = -2\n")
    for args in (["validate", str(cfg)], ["run", "--config", str(cfg), "--", "true"],
                 ["status", "--config", str(cfg)]):
        cp = cli(*args)
        assert cp.returncode == 78
        assert "restart.max_restarts" in one_line_error(cp)


def test_validate_ok_and_example_config(tmp_path: Path, inproc) -> None:
    cli = inproc
    cfg = tmp_path / "c.toml"
    cfg.write_text('[worker]\ncommand = ["python", "train.py"]\n[stop]\ngrace_seconds = 20\n')
    cp = cli("validate", str(cfg))
    assert cp.returncode == 0 and "OK" in cp.stdout and "python train.py" in cp.stdout
    example = ROOT / "deploy" / "config.example.toml"
    if example.exists():
        cp = cli("validate", str(example))
        assert cp.returncode == 0, cp.stderr


def test_config_file_drives_run(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[worker]\ncommand = ["{PY}", "-c", "import sys; sys.exit(0)"]\n'
        f'[daemon]\nstate_dir = "{tmp_path / "s"}"\nlog_format = "json"\n'
        f'[checkpoint]\ndir = "{tmp_path / "c"}"\n'
    )
    cp = cli("run", "--config", str(cfg))
    assert cp.returncode == 0, cp.stderr
    assert '"event": "daemon.stopped"' in cp.stdout
    # Flags override the file; `--` overrides its command.
    cp = cli("run", "--config", str(cfg), "--max-restarts", "0", "--", PY, "-c", "raise SystemExit(4)")
    assert cp.returncode == contract.EXIT_GAVE_UP


def test_status_without_state_file(tmp_path: Path, inproc) -> None:
    cli = inproc
    cp = cli("status", "--state-dir", str(tmp_path))
    assert cp.returncode == 3 and "no state file" in one_line_error(cp)
    cp = cli("status", "--state-dir", str(tmp_path), "--json")
    assert cp.returncode == 3 and '"daemon_running": false' in cp.stdout


def test_log_format_console_and_level(tmp_path: Path) -> None:
    cp = cli("run", "--state-dir", str(tmp_path / "s"), "--checkpoint-dir", str(tmp_path / "c"),
             "--log-format", "console", "--", PY, "-c", "pass")
    assert cp.returncode == 0
    assert "daemon.started" in cp.stdout and not cp.stdout.lstrip().startswith("{")
    cp = cli("run", "--state-dir", str(tmp_path / "s"), "--checkpoint-dir", str(tmp_path / "c"),
             "--log-format", "json", "--log-level", "warning", "--", PY, "-c", "pass")
    assert cp.returncode == 0 and "daemon.started" not in cp.stdout


def test_usage_error_from_subprocess_is_one_line() -> None:
    cp = cli("run", "--bogus")
    assert cp.returncode == 64 and "unrecognized arguments" in one_line_error(cp)


def test_render_status_handles_sparse_data() -> None:
    text = render_status({"state": "running", "daemon_running": True, "daemon_pid": 5,
                          "last_exit": {"code": None, "signal": "SIGKILL"},
                          "last_checkpoint": {"path": "/c/ckpt-1", "step": 1, "reason": "periodic",
                                              "age_seconds": 4000},
                          "disk": {"percent": 12.5, "free_bytes": 3 << 30}, "components": ["gce"],
                          "gce": {"watching": True}})
    assert "signal SIGKILL" in text and "67 min ago" in text and "3.0 GiB free" in text
    assert '"watching": true' in text
    assert "not running" in render_status({})


def test_bad_worker_cwd_is_config_error(tmp_path: Path, inproc) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[worker]\ncommand = ["true"]\ncwd = "{tmp_path / "nope"}"\n')
    cp = inproc("run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"),
                "--checkpoint-dir", str(tmp_path / "c"))
    assert cp.returncode == 78 and "worker.cwd" in one_line_error(cp)
