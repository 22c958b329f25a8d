"""The TOML config file: schema, defaults and validation.

Every key is optional except the worker command (which may also come after `--`).
An unknown key or a bad value raises ConfigError naming the key, e.g.
``restart.max_restarts: must be an integer >= 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(Exception):
    """A config problem; str() names the key or path and what is wrong."""


PROVIDERS = ("gce", "aws", "azure")


@dataclass(frozen=True)
class WorkerConfig:
    command: tuple[str, ...] = ()
    cwd: str = ""  # empty = the daemon's cwd
    env: Mapping[str, str] = field(default_factory=dict)
    # Issue 8: keep a spare process that has imported the framework and waits.
    warm_standby: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "/var/lib/preemptd/checkpoints"
    every_steps: int = 0
    every_seconds: float = 600.0
    keep: int = 3
    keep_every_hours: float = 0.0  # 0 = off; else keep one checkpoint per N hours forever


@dataclass(frozen=True)
class RestartConfig:
    max_restarts: int = 10
    window_seconds: float = 3600.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    hang_timeout_seconds: float = 0.0


@dataclass(frozen=True)
class StopConfig:
    grace_seconds: float = 25.0


@dataclass(frozen=True)
class PreemptionConfig:
    sources: tuple[str, ...] = ("auto",)
    gce_url: str = "http://metadata.google.internal"
    aws_url: str = "http://169.254.169.254"
    azure_url: str = "http://169.254.169.254"
    aws_poll_seconds: float = 5.0
    azure_poll_seconds: float = 1.0
    gce_timeout_seconds: float = 60.0  # long-poll timeout_sec per request
    request_timeout_seconds: float = 2.0  # connect/read bound for one short request


@dataclass(frozen=True)
class DiskConfig:
    warn_percent: float = 80.0
    prune_percent: float = 90.0
    observer: str = "inotify"  # or "polling" (network filesystems)
    interval_seconds: float = 30.0  # slow timer besides filesystem events
    # Room the next save needs = last checkpoint size x this margin.
    margin: float = 1.5


@dataclass(frozen=True)
class RemoteConfig:
    url: str = ""
    keep: int = 3
    bandwidth_mbps: float = 0.0  # 0 = unlimited (megabytes per second)
    retries: int = 5
    # Issue 7: S3-compatible servers (MinIO, Ceph, R2) and fsspec filesystem options.
    endpoint_url: str = ""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    # How long the stop path waits for the final checkpoint's upload; 0 = stop.grace_seconds.
    final_wait_seconds: float = 0.0


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = "/var/lib/preemptd"
    log_level: str = "info"
    log_format: str = "auto"  # json | console | auto
    progress_interval_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: str = ""  # the file this came from, for messages

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed (used for CLI flags)."""
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )


# ------------------------------------------------------------------ checkers

Check = Callable[[str, Any], Any]


def _number(min_value: float | None = None, *, positive: bool = False,
            max_value: float | None = None, integer: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            raise ConfigError(f"{key}: must be {kind}, got {type(v).__name__} {v!r}")
        if not integer and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v!r}")
        if positive and v <= 0:
            raise ConfigError(f"{key}: must be {kind} > 0, got {v!r}")
        if min_value is not None and v < min_value:
            raise ConfigError(f"{key}: must be {kind} >= {min_value:g}, got {v!r}")
        if max_value is not None and v > max_value:
            raise ConfigError(f"{key}: must be {kind} <= {max_value:g}, got {v!r}")
        return v if integer else float(v)
    return check


def _string(*choices: str, nonempty: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: must be a string, got {type(v).__name__} {v!r}")
        if choices and v not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {v!r}")
        if nonempty and not v:
            raise ConfigError(f"{key}: must not be empty")
        if "\x00" in v:
            raise ConfigError(f"{key}: must not contain NUL")
        return v
    return check


def _url(key: str, v: Any) -> Any:
    v = _string(nonempty=True)(key, v)
    if not v.startswith(("http://", "https://")):
        raise ConfigError(f"{key}: must be an http:// or https:// URL, got {v!r}")
    return v.rstrip("/")


def _remote_url(key: str, v: Any) -> Any:
    v = _string()(key, v)
    if v and "://" not in v:
        raise ConfigError(f"{key}: must be a URL such as s3://bucket/run or gs://bucket/run, got {v!r}")
    return v.rstrip("/")


def _optional_url(key: str, v: Any) -> Any:
    return _url(key, v) if v != "" else v


def _table(key: str, v: Any) -> Any:
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a table, got {type(v).__name__}")
    return dict(v)


def _bool(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: must be true or false, got {v!r}")
    return v


def _command(key: str, v: Any) -> Any:
    if isinstance(v, str):
        import shlex

        try:
            v = shlex.split(v)
        except ValueError as exc:
            raise ConfigError(f"{key}: cannot split command string: {exc}") from None
    if not isinstance(v, list) or not all(isinstance(a, str) and "\x00" not in a for a in v):
        raise ConfigError(f"{key}: must be a list of strings, got {v!r}")
    if v and not v[0]:
        raise ConfigError(f"{key}: program name must not be empty")
    return tuple(v)


def _env(key: str, v: Any) -> Any:
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a table of strings")
    for k, val in v.items():
        if not isinstance(val, str) or "=" in k or not k or "\x00" in k + val:
            raise ConfigError(f"{key}.{k}: must be a string (name without '=')")
    return dict(v)


def _sources(key: str, v: Any) -> Any:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{key}: must be a list of strings, got {v!r}")
    allowed = (*PROVIDERS, "auto")
    for s in v:
        if s not in allowed:
            raise ConfigError(f"{key}: unknown source {s!r}; known: {', '.join(allowed)}")
    if "auto" in v and len(v) > 1:
        raise ConfigError(f"{key}: 'auto' cannot be combined with named sources")
    if len(set(v)) != len(v):
        raise ConfigError(f"{key}: duplicate source")
    return tuple(v)


SCHEMA: dict[str, dict[str, Check]] = {
    "worker": {"command": _command, "cwd": _string(), "env": _env, "warm_standby": _bool},
    "checkpoint": {
        "dir": _string(nonempty=True),
        "every_steps": _number(0, integer=True),
        "every_seconds": _number(0),
        "keep": _number(1, integer=True),
        "keep_every_hours": _number(0),
    },
    "restart": {
        "max_restarts": _number(0, integer=True),
        "window_seconds": _number(positive=True),
        "backoff_initial_seconds": _number(0),
        "backoff_max_seconds": _number(0),
        "hang_timeout_seconds": _number(0),
    },
    "stop": {"grace_seconds": _number(positive=True, max_value=86400)},
    "preemption": {
        "sources": _sources,
        "gce_url": _url,
        "aws_url": _url,
        "azure_url": _url,
        "aws_poll_seconds": _number(positive=True),
        "azure_poll_seconds": _number(positive=True),
        "gce_timeout_seconds": _number(positive=True, max_value=3600),
        "request_timeout_seconds": _number(positive=True, max_value=60),
    },
    "disk": {
        "warn_percent": _number(0, max_value=100),
        "prune_percent": _number(0, max_value=100),
        "observer": _string("inotify", "polling"),
        "interval_seconds": _number(positive=True),
        "margin": _number(1),
    },
    "remote": {
        "url": _remote_url,
        "keep": _number(1, integer=True),
        "bandwidth_mbps": _number(0),
        "retries": _number(0, integer=True),
        "endpoint_url": _optional_url,
        "storage_options": _table,
        "backoff_initial_seconds": _number(0),
        "backoff_max_seconds": _number(0),
        "final_wait_seconds": _number(0, max_value=86400),
    },
    "daemon": {
        "state_dir": _string(nonempty=True),
        "log_level": _string("debug", "info", "warning", "error"),
        "log_format": _string("json", "console", "auto"),
        "progress_interval_seconds": _number(positive=True),
    },
}

_SECTION_CLASSES: dict[str, type] = {
    "worker": WorkerConfig,
    "checkpoint": CheckpointConfig,
    "restart": RestartConfig,
    "stop": StopConfig,
    "preemption": PreemptionConfig,
    "disk": DiskConfig,
    "remote": RemoteConfig,
    "daemon": DaemonConfig,
}


def from_mapping(data: Mapping[str, Any], source: str = "") -> Config:
    """Build a validated Config from parsed TOML; ConfigError names the first bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError("config: top level must be a table")
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in SCHEMA:
            raise ConfigError(f"{name}: unknown section; known: {', '.join(SCHEMA)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: must be a table ([{name}])")
        values = {}
        for key, value in table.items():
            check = SCHEMA[name].get(key)
            if check is None:
                raise ConfigError(
                    f"{name}.{key}: unknown key; known in [{name}]: {', '.join(SCHEMA[name])}"
                )
            values[key] = check(f"{name}.{key}", value)
        sections[name] = _SECTION_CLASSES[name](**values)
    cfg = Config(**sections, source=source)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    r = cfg.restart
    if r.backoff_max_seconds < r.backoff_initial_seconds:
        raise ConfigError(
            "restart.backoff_max_seconds: must be >= restart.backoff_initial_seconds "
            f"({r.backoff_max_seconds:g} < {r.backoff_initial_seconds:g})"
        )
    d = cfg.disk
    if d.prune_percent < d.warn_percent:
        raise ConfigError(
            f"disk.prune_percent: must be >= disk.warn_percent ({d.prune_percent:g} < {d.warn_percent:g})"
        )


def load(path: str | Path) -> Config:
    """Read and validate a config file. ConfigError on any problem (never a traceback)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level ("a = [[[[...")
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    try:
        return from_mapping(data, source=str(path))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None


def require_command(cfg: Config) -> None:
    """The worker command is the one key without a default."""
    if not cfg.worker.command:
        raise ConfigError(
            "worker.command: missing; set it in the config or give it after `--` on the CLI"
        )
