"""deploy/: the unit passes systemd's own checks, install.sh is idempotent and undoes
itself, the example config documents and validates every key, the cloud files parse.

Uses the real `systemd-analyze` and the real install.sh (in a scratch root, with a
wheel built offline from this checkout); skips what the machine cannot run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config, contract

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "preemptd.service"
EXAMPLE = DEPLOY / "config.example.toml"
INSTALL = DEPLOY / "install.sh"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """`Section.Key` -> every value (keys may repeat), comments and blank lines skipped."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert m, f"unsupported time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


# ---------------------------------------------------------------- the unit


def test_unit_contract_values() -> None:
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.KillMode"] == "mixed"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.User"] == "preemptd" and one["Service.StateDirectory"] == "preemptd"
    assert seconds(one["Service.WatchdogSec"]) > 0
    prevent = set(one["Service.RestartPreventExitStatus"].split())
    assert {str(contract.EXIT_USAGE), str(contract.EXIT_CONFIG)} <= prevent
    # The start limit can trigger: Burst restarts, RestartSec apart, fit in the interval.
    burst = int(one["Unit.StartLimitBurst"])
    assert burst * seconds(one["Service.RestartSec"]) < seconds(one["Unit.StartLimitIntervalSec"])
    # The grace window fits inside the stop timeout, with room for the daemon to report.
    timeout_stop = seconds(one["Service.TimeoutStopSec"])
    assert timeout_stop == 30  # GCE and Azure; AWS gets 120 s from a drop-in
    assert config.load(EXAMPLE).stop.grace_seconds <= timeout_stop - 5
    # Every NVIDIA character device, whatever the GPU count.
    assert "char-nvidia* rw" in s["Service.DeviceAllow"]
    # The metadata server and object storage stay reachable.
    assert "Service.PrivateNetwork" not in s and "Service.IPAddressDeny" not in s
    families = one["Service.RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    # PrivateDevices= would hide /dev/nvidia*; ProtectSystem=strict leaves the state dir writable.
    assert "Service.PrivateDevices" not in s and one["Service.ProtectSystem"] == "strict"


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    # The real ExecStart path exists only after install.sh; point a copy at a real binary.
    text = UNIT.read_text().replace("/opt/preemptd/venv/bin/preemptd", sys.executable)
    copy = tmp_path / "preemptd.service"
    copy.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res

    # The pristine file has exactly one complaint here: the binary install.sh creates.
    res = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert all("/opt/preemptd/venv/bin/preemptd" in ln for ln in complaints), complaints


@needs_analyze
def test_security_exposure_at_most_1_5() -> None:
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True,
    )
    m = re.search(r"Overall exposure level for preemptd\.service: (\d+\.\d+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    exposure = float(m.group(1))
    print(f"\nsystemd-analyze security --offline=yes: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, res.stdout


# -------------------------------------------------------- the example config


def test_example_config_validates_and_documents_every_key() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.worker.command  # the one key without a default is set
    data = tomllib.loads(EXAMPLE.read_text())
    missing = [f"{sec}.{key}" for sec, keys in config.SCHEMA.items() for key in keys
               if key not in data.get(sec, {})]
    assert not missing, f"deploy/config.example.toml lacks {missing}"
    # Each key sits in a block of keys that starts with a comment saying what they do.
    lines = EXAMPLE.read_text().splitlines()
    is_key = re.compile(r"^[a-z_]+ = ")
    for i, line in enumerate(lines):
        if is_key.match(line):
            j = i - 1
            while j >= 0 and is_key.match(lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"undocumented key: {line}"
    # Values written down equal the defaults, so the file doubles as their reference.
    defaults = config.Config()
    for sec, keys in data.items():
        for key in keys:
            if (sec, key) in {("worker", "command")}:
                continue
            want = getattr(getattr(defaults, sec), key)
            got = getattr(getattr(cfg, sec), key)
            assert got == want or (isinstance(want, tuple) and tuple(got) == want), (sec, key, got, want)


# ------------------------------------------------------------ install.sh


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and link under root except the venv's contents, with its hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("opt/preemptd/venv/"):
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as a wheel, built offline with the test venv's setuptools."""
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel offline: {res.stderr[-500:]}")
    return next(out.glob("preemptd-*.whl"))


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates a system user: needs root")
@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_install_is_idempotent_and_uninstall_keeps_checkpoints(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    args = ("--cloud", "aws", "--extra", "none", "--python", sys.base_prefix + "/bin/python3",
            "--package", str(wheel), "--pip-args", "--no-deps --no-index")
    first = _install(root, *args)
    assert first.returncode == 0, first.stderr + first.stdout

    venv = root / "opt/preemptd/venv"
    assert (venv / "bin/preemptd").is_file()
    assert "preemptd:" in (root / "etc/passwd").read_text()
    assert (root / "etc/systemd/system/preemptd.service").read_bytes() == UNIT.read_bytes()
    assert (root / "etc/systemd/system/multi-user.target.wants/preemptd.service").is_symlink()
    dropin = (root / "etc/systemd/system/preemptd.service.d/10-cloud.conf").read_text()
    assert "TimeoutStopSec=120s" in dropin
    cfg = config.load(root / "etc/preemptd/config.toml")
    assert cfg.stop.grace_seconds == 110.0  # AWS: 2 min window minus margin
    assert (root / "etc/preemptd/config.toml").stat().st_mode & 0o777 == 0o640

    # Checkpoints and an operator's config edits exist before the second run.
    ckpt = root / "var/lib/preemptd/checkpoints/ckpt-000000000100"
    ckpt.mkdir(parents=True)
    (ckpt / "MANIFEST.json").write_text("{}")
    before = _snapshot(root)

    second = _install(root, *args)
    assert second.returncode == 0, second.stderr + second.stdout
    assert _snapshot(root) == before, "second install changed files"
    assert "created system user" not in second.stdout

    # Uninstall removes what install added (the untouched config too), keeps checkpoints.
    conf = root / "etc/preemptd/config.toml"
    gone = _install(root, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert (ckpt / "MANIFEST.json").exists()
    assert not conf.exists()
    assert not (root / "opt/preemptd").exists()
    assert not (root / "etc/systemd/system/preemptd.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/preemptd.service").exists()
    assert not (root / "etc/systemd/system/preemptd.service.d").exists()
    assert "preemptd:" not in (root / "etc/passwd").read_text()
    assert "preemptd:" not in (root / "etc/group").read_text()
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert not {p for p in left if "preemptd" in p and not p.startswith("var/lib/preemptd/")}, left
    # A second uninstall is harmless.
    assert _install(root, "--uninstall").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh refuses to run without root")
def test_uninstall_keeps_an_edited_config(tmp_path: Path) -> None:
    # The state --uninstall sees after an install whose config the operator then edited.
    (tmp_path / "opt/preemptd").mkdir(parents=True)
    (tmp_path / "etc/preemptd").mkdir(parents=True)
    (tmp_path / "opt/preemptd/config.installed.toml").write_text(EXAMPLE.read_text())
    conf = tmp_path / "etc/preemptd/config.toml"
    conf.write_text(EXAMPLE.read_text().replace("keep = 3", "keep = 4", 1))
    res = _install(tmp_path, "--uninstall")
    assert res.returncode == 0, res.stderr
    assert "keep = 4" in conf.read_text() and "keeping" in res.stdout
    assert not (tmp_path / "opt/preemptd").exists()


@pytest.mark.parametrize("args", [("--cloud", "gcp"), ("--extra", "cuda"), ("--frobnicate",)])
def test_install_rejects_bad_options(tmp_path: Path, args: tuple[str, ...]) -> None:
    res = _install(tmp_path, *args)
    assert res.returncode == 64, res
    assert "install.sh:" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------- cloud files


@pytest.mark.parametrize("name", ["install.sh", "cloud/bootstrap.sh", "cloud/gce-startup.sh",
                                  "cloud/aws-user-data.sh"])
def test_shell_scripts_parse(name: str) -> None:
    res = subprocess.run(["bash", "-n", str(DEPLOY / name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(DEPLOY / name, os.X_OK)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-x", str(DEPLOY / name)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize(("name", "cloud"), [("cloud/gce-startup.sh", "gce"),
                                             ("cloud/aws-user-data.sh", "aws"),
                                             ("cloud/azure-cloud-init.yaml", "azure")])
def test_cloud_files_pick_their_cloud(name: str, cloud: str) -> None:
    text = (DEPLOY / name).read_text()
    assert re.search(rf'bootstrap\.sh"? --cloud {cloud}\b', text), name
    assert "survive" in text  # each says which storage outlives a preemption and why


def test_azure_cloud_init_is_valid_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    text = (DEPLOY / "cloud/azure-cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert {"write_files", "runcmd"} <= set(doc)
    script = doc["runcmd"][0][2]
    res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bootstrap_rejects_unknown_cloud() -> None:
    res = subprocess.run(["bash", str(DEPLOY / "cloud/bootstrap.sh"), "--cloud", "ibm"],
                         capture_output=True, text=True)
    assert res.returncode == 64 and "--cloud must be" in res.stderr
