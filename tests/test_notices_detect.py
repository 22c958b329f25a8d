"""`auto`: cloud detection from DMI files (an injected root), and what build_sources makes of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.clock import FakeClock
from daemon.config import from_mapping
from daemon.notices import AwsSource, AzureSource, GceSource, build_sources, resolve_providers
from daemon.notices.detect import AZURE_ASSET_TAG, classify, detect, read_dmi


def dmi(tmp: Path, **fields: str) -> Path:
    root = tmp / "dmi"
    root.mkdir()
    for name, value in fields.items():
        (root / name).write_text(value + "\n")
    return root


@pytest.mark.parametrize(("fields", "provider"), [
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine", "bios_vendor": "Google"}, "gce"),
    ({"sys_vendor": "Amazon EC2", "product_name": "g5.xlarge", "bios_vendor": "Amazon EC2"}, "aws"),
    ({"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"}, "aws"),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
      "chassis_asset_tag": AZURE_ASSET_TAG}, "azure"),
    # Hyper-V on premises looks like Azure but lacks the asset tag.
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
      "chassis_asset_tag": "0000-0000"}, None),
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, None),
    ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R750"}, None),
])
def test_classify_from_dmi_files(tmp_path: Path, fields: dict[str, str], provider: str | None) -> None:
    found = detect(dmi(tmp_path, **fields))
    assert found.provider == provider, found
    assert found.evidence.get("sys_vendor") == fields["sys_vendor"]


def test_missing_dmi_is_no_cloud(tmp_path: Path) -> None:
    found = detect(tmp_path / "absent")
    assert found.provider is None and "not readable" in found.reason
    assert read_dmi(tmp_path / "absent") == {}
    assert classify({}).provider is None


def test_auto_builds_the_detected_source_and_logs_it(tmp_path: Path) -> None:
    root = dmi(tmp_path, sys_vendor="Google", product_name="Google Compute Engine")
    cfg = from_mapping({"preemption": {"gce_url": "http://127.0.0.1:1"}})
    assert cfg.preemption.sources == ("auto",)
    with capture_logs() as logs:
        [source] = build_sources(cfg, FakeClock(), dmi_root=root)
    assert isinstance(source, GceSource) and source.name == "notices.gce"
    assert [e["event"] for e in logs] == ["preemption.detected"]


def test_off_cloud_is_signals_only_said_once(tmp_path: Path) -> None:
    cfg = from_mapping({})
    with capture_logs() as logs:
        assert build_sources(cfg, FakeClock(), dmi_root=dmi(tmp_path, sys_vendor="QEMU")) == []
    assert [e["event"] for e in logs] == ["preemption.signals_only"]
    assert "no cloud detected" in logs[0]["reason"]


def test_named_sources_skip_detection_and_empty_means_signals_only(tmp_path: Path) -> None:
    root = dmi(tmp_path, sys_vendor="Google")
    cfg = from_mapping({"preemption": {"sources": ["aws", "azure"], "aws_poll_seconds": 3}})
    sources = build_sources(cfg, FakeClock(), dmi_root=root)
    assert [type(s) for s in sources] == [AwsSource, AzureSource]
    with capture_logs() as logs:
        assert resolve_providers((), root) == []
    assert logs[0]["event"] == "preemption.signals_only"
