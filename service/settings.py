"""Checkpoint settings: keyword arguments override the daemon's env, which overrides defaults.

The daemon passes one config file's policy to the worker through PREEMPTD_* variables
(see daemon.contract), so that one file drives both sides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon import contract
from service.errors import ConfigError

DEFAULT_EVERY_SECONDS = 600.0  # docs/DESIGN.md default for [checkpoint] every_seconds
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class Settings:
    """Everything the worker side needs to know about where and when to save."""

    directory: Path
    every_steps: int = 0
    every_seconds: float = DEFAULT_EVERY_SECONDS
    keep: int = DEFAULT_KEEP
    keep_every_hours: float = 0.0
    resume: str = ""
    restart: int = 0
    socket_path: str = ""
    control_path: str = ""
    grace_seconds: float = 0.0

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep: int | None = None,
        keep_every_hours: float | None = None,
    ) -> Settings:
        """Merge keywords (when not None) over env (when set) over defaults; validate."""
        env = os.environ if environ is None else environ
        dir_value = directory if directory is not None else env.get(contract.ENV_CHECKPOINT_DIR, "")
        if not dir_value:
            raise ConfigError(
                f"no checkpoint directory: pass directory=... or set {contract.ENV_CHECKPOINT_DIR}"
            )
        settings = cls(
            directory=Path(dir_value),
            every_steps=_pick_int(every_steps, env, contract.ENV_EVERY_STEPS, 0),
            every_seconds=_pick_float(
                every_seconds, env, contract.ENV_EVERY_SECONDS, DEFAULT_EVERY_SECONDS
            ),
            keep=_pick_int(keep, env, contract.ENV_KEEP, DEFAULT_KEEP),
            keep_every_hours=_pick_float(keep_every_hours, env, contract.ENV_KEEP_EVERY_HOURS, 0.0),
            resume=env.get(contract.ENV_RESUME, ""),
            restart=_pick_int(None, env, contract.ENV_RESTART, 0),
            socket_path=env.get(contract.ENV_SOCKET, ""),
            control_path=env.get(contract.ENV_CONTROL, ""),
            grace_seconds=_pick_float(None, env, contract.ENV_GRACE_SECONDS, 0.0),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if self.every_steps < 0:
            raise ConfigError(f"every_steps must be >= 0 (0 = off), got {self.every_steps}")
        if self.every_seconds < 0:
            raise ConfigError(f"every_seconds must be >= 0 (0 = off), got {self.every_seconds}")
        if self.keep < 1:
            raise ConfigError(f"keep must be >= 1, got {self.keep}")
        if self.keep_every_hours < 0:
            raise ConfigError(f"keep_every_hours must be >= 0, got {self.keep_every_hours}")


def _env_number(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _check_kw(value: float | None, name: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return value


def _pick_int(value: int | None, env: Mapping[str, str], name: str, default: int) -> int:
    kw = _check_kw(value, name.removeprefix("PREEMPTD_").lower())
    if kw is not None:
        number = kw
    else:
        from_env = _env_number(env, name)
        number = default if from_env is None else from_env
    if number != int(number):
        raise ConfigError(f"{name.removeprefix('PREEMPTD_').lower()} must be a whole number, got {number}")
    return int(number)


def _pick_float(value: float | None, env: Mapping[str, str], name: str, default: float) -> float:
    kw = _check_kw(value, name.removeprefix("PREEMPTD_").lower())
    if kw is not None:
        return float(kw)
    from_env = _env_number(env, name)
    return default if from_env is None else from_env
