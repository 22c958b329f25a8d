"""daemon.config: defaults, errors that name the key, and a fuzz that finds no traceback."""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import config
from daemon.config import Config, ConfigError


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert cfg == Config(source=str(tmp_path / "c.toml"))
    assert cfg.stop.grace_seconds == 25 and cfg.restart.max_restarts == 10


def test_design_example_parses(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[worker]
command = ["python", "-m", "service.examples.custom_loop"]
[checkpoint]
dir = "/var/lib/preemptd/checkpoints"
every_steps = 0
every_seconds = 600
keep = 3
[restart]
max_restarts = 10
window_seconds = 3600
backoff_initial_seconds = 1
backoff_max_seconds = 300
hang_timeout_seconds = 0
[stop]
grace_seconds = 25
[preemption]
sources = ["auto"]
[disk]
warn_percent = 80
prune_percent = 90
[remote]
url = ""
[daemon]
state_dir = "/var/lib/preemptd"
""")
    assert cfg.worker.command == ("python", "-m", "service.examples.custom_loop")
    assert isinstance(cfg.checkpoint.every_seconds, float)
    assert cfg.restart.window_seconds == 3600.0


def test_command_string_is_split(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[worker]\ncommand = "python -m train --lr 0.1"\n')
    assert cfg.worker.command == ("python", "-m", "train", "--lr", "0.1")


@pytest.mark.parametrize(("text", "names"), [
    ("[restart]\nmax_restart = 3\n", "restart.max_restart: unknown key"),
    ("[restarts]\n", "restarts: unknown section"),
    ("[restart]\nmax_restarts = -1\n", "restart.max_restarts: must be an integer >= 0"),
    ("[restart]\nmax_restarts = 1.5\n", "restart.max_restarts: must be an integer"),
    ("[restart]\nmax_restarts = true\n", "restart.max_restarts: must be an integer"),
    ("[restart]\nwindow_seconds = 0\n", "restart.window_seconds: must be a number > 0"),
    ("[stop]\ngrace_seconds = -3\n", "stop.grace_seconds: must be a number > 0"),
    ("[stop]\ngrace_seconds = nan\n", "stop.grace_seconds: must be a finite number"),
    ("[stop]\ngrace_seconds = \"25\"\n", "stop.grace_seconds: must be a number"),
    ("[checkpoint]\nkeep = 0\n", "checkpoint.keep: must be an integer >= 1"),
    ("[checkpoint]\ndir = \"\"\n", "checkpoint.dir: must not be empty"),
    ("[worker]\ncommand = [1, 2]\n", "worker.command: must be a list of strings"),
    ("[worker]\ncommand = \"'unclosed\"\n", "worker.command: cannot split"),
    ("[daemon]\nlog_level = \"loud\"\n", "daemon.log_level: must be one of"),
    ("[restart]\nbackoff_initial_seconds = 10\nbackoff_max_seconds = 1\n", "restart.backoff_max_seconds"),
    ("[disk]\nwarn_percent = 95\nprune_percent = 90\n", "disk.prune_percent"),
    ("[preemption]\nsources = [\"moon\"]\n", "preemption.sources: unknown source"),
    ("stop = 3\n", "stop: must be a table"),
    ("[stop\n", "invalid TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert names in str(info.value)
    assert "\n" not in str(info.value).strip() or "invalid TOML" in names


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[stop]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)


def test_missing_command_is_named() -> None:
    with pytest.raises(ConfigError, match="worker.command: missing"):
        config.require_command(Config())


# --------------------------------------------------------------------------- fuzz

KEYS = [(s, k) for s, keys in config.SCHEMA.items() for k in keys]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["auto", "gce", "json", "info", "s3://b/r", "http://x", "inotify", "", "\x00"]),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def mappings(draw: st.DrawFn) -> object:
    data: dict[str, object] = {}
    for section, key in draw(st.lists(st.sampled_from(KEYS), max_size=6)):
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = draw(values)
    if draw(st.booleans()):
        data[draw(st.text(max_size=8))] = draw(values)
    return draw(st.one_of(st.just(data), values))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mappings())
def test_fuzz_from_mapping_never_tracebacks(data: object) -> None:
    try:
        cfg = config.from_mapping(data)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert str(exc)
        return
    # Whatever passed validation is usable: numbers finite, bounds hold.
    assert cfg.stop.grace_seconds > 0 and math.isfinite(cfg.stop.grace_seconds)
    assert cfg.restart.backoff_max_seconds >= cfg.restart.backoff_initial_seconds
    assert all(isinstance(a, str) for a in cfg.worker.command)


toml_fragments = st.sampled_from([
    "[worker]\n", "[restart]\n", "[stop]\n", "[daemon]\n", "[checkpoint]\n", "command = ", "grace_seconds = ",
    "max_restarts = ", "= ", "\"", "'", "[", "]", "{", "}", "1", "-1", "1e400", "nan", "inf", "true",
    "\n", "[[worker]]\n", "a.b.c = 1\n", "\\u0000", "\x00", "\xff", "0x10", "1979-05-27T07:32:00Z",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(toml_fragments, max_size=20).map("".join),
                 st.text(alphabet=string.printable, max_size=200)))
def test_fuzz_load_text_never_tracebacks(text: str) -> None:
    _load_never_tracebacks(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_load_bytes_never_tracebacks(data: bytes) -> None:
    _load_never_tracebacks(data)


def _load_never_tracebacks(data: bytes) -> None:
    """Any file content loads or raises ConfigError with a message, nothing else."""
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write(data)
    try:
        config.load(f.name)
    except ConfigError as exc:
        assert str(exc)
    finally:
        Path(f.name).unlink()


@pytest.mark.parametrize("text", ["a = " + "[" * 100_000, "a = " + "{b=" * 5_000])
def test_deep_nesting_is_a_clear_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_text(tmp_path, text)
