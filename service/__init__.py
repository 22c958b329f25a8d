"""preemptd worker side: durable, non-blocking TensorFlow checkpoints with exact resume.

`import service` is cheap: TensorFlow is imported only when one of the public
names is first used (`service.CheckpointManager`, `service.SavedModelExporter`,
`service.keras.PreemptibleCheckpoint`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import service.keras as keras
    from service.errors import CheckpointDirError, CheckpointError, CheckpointMismatch, ConfigError
    from service.manager import CheckpointManager
    from service.savedmodel import SavedModelExporter

__all__ = [
    "CheckpointDirError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatch",
    "ConfigError",
    "SavedModelExporter",
    "keras",
]

_LAZY = {
    "CheckpointManager": "service.manager",
    "SavedModelExporter": "service.savedmodel",
    "CheckpointError": "service.errors",
    "CheckpointDirError": "service.errors",
    "CheckpointMismatch": "service.errors",
    "ConfigError": "service.errors",
}


def __getattr__(name: str) -> Any:
    if name == "keras":
        return importlib.import_module("service.keras")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
