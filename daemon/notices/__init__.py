"""Cloud preemption notice sources (GCE, AWS, Azure metadata) as supervisor components.

`build_sources(cfg, clock)` turns `[preemption]` into a list of Components; each
polls its metadata server on its own thread and posts `daemon.components.Notice`.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from daemon.clock import Clock
from daemon.config import Config
from daemon.notices.aws import AwsSource
from daemon.notices.azure import AzureSource
from daemon.notices.base import NoticeSource
from daemon.notices.detect import DMI_ROOT, detect
from daemon.notices.gce import GceSource

log = structlog.get_logger()

__all__ = ["AwsSource", "AzureSource", "GceSource", "NoticeSource", "build_sources", "resolve_providers"]


def resolve_providers(sources: tuple[str, ...], dmi_root: str | Path = DMI_ROOT) -> list[str]:
    """The providers to watch: the named ones, or for "auto" the detected cloud (logged once)."""
    if "auto" not in sources:
        if not sources:
            log.info("preemption.signals_only", reason="preemption.sources is empty")
        return list(sources)
    found = detect(dmi_root)
    if found.provider is None:
        log.info("preemption.signals_only", reason=f"no cloud detected: {found.reason}",
                 dmi={k: v for k, v in found.evidence.items() if k != "product_uuid"},
                 note="set preemption.sources to gce, aws or azure to watch one anyway")
        return []
    log.info("preemption.detected", source=found.provider, reason=found.reason)
    return [found.provider]


def build_sources(cfg: Config, clock: Clock, dmi_root: str | Path = DMI_ROOT) -> list[NoticeSource]:
    """One notice source per provider in `cfg.preemption.sources` (see resolve_providers)."""
    p = cfg.preemption
    grace = cfg.stop.grace_seconds
    out: list[NoticeSource] = []
    for provider in resolve_providers(p.sources, dmi_root):
        if provider == "gce":
            out.append(GceSource(clock, p.gce_url, long_poll_seconds=p.gce_timeout_seconds,
                                 request_timeout=p.request_timeout_seconds, grace_seconds=grace))
        elif provider == "aws":
            out.append(AwsSource(clock, p.aws_url, poll_seconds=p.aws_poll_seconds,
                                 request_timeout=p.request_timeout_seconds, grace_seconds=grace))
        elif provider == "azure":
            out.append(AzureSource(clock, p.azure_url, poll_seconds=p.azure_poll_seconds,
                                   request_timeout=p.request_timeout_seconds, grace_seconds=grace))
    return out
