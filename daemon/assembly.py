"""Which helper components run inside the daemon (notice sources, disk guard, mirror...).

The CLI calls `build_components`; the supervisor starts them, passes them its
thread-safe `post`, calls their hooks and puts their `status()` into the state file.
"""

from __future__ import annotations

from daemon.clock import Clock
from daemon.components import Component
from daemon.config import Config
from daemon.diskguard import DiskGuard
from daemon.notices import build_sources


def build_components(cfg: Config, clock: Clock) -> list[Component]:
    """The components for this config, in start order.

    Empty for now: each helper's engineer appends theirs here (e.g. notice sources
    from cfg.preemption, the disk guard from cfg.disk, the remote mirror when
    cfg.remote.url is set). Keep construction cheap; threads start in start(post).
    """
    components: list[Component] = []
    # Cloud preemption notices (issue 4): named sources, or "auto" -> DMI detection.
    components.extend(build_sources(cfg, clock))
    # Disk guard (issue 5): prunes before the checkpoint volume fills; its own thread.
    components.append(DiskGuard.from_config(cfg, clock))
    if cfg.remote.url:
        # Imported here: the mirror's optional fsspec stack is loaded only when configured.
        from daemon.remote import build_mirror

        mirror = build_mirror(cfg)  # ConfigError (exit 78) when the URL's package is missing
        if mirror is not None:
            # First: its on_final_checkpoint waits for the final upload, and must do so
            # before a notice source approves the eviction (Azure) and lets the VM go.
            components.insert(0, mirror)
    return components
