"""Pattern 3: periodic SavedModel export with a serving signature, committed atomically.

    exporter = service.SavedModelExporter(model, every_steps=1000, keep=3)
    for step in ...:
        train_step()
        exporter.step_done(step + 1)

Exports go to `<checkpoint dir>/savedmodel/<step>/` (a plain integer, the layout
TF Serving watches), each written into `.<step>.tmp-<pid>/`, fsynced, given a
MANIFEST.json, renamed, and the parent fsynced: the same protocol as checkpoints,
so a half export is never served. Retention keeps the `keep` newest exports.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import tensorflow as tf

from daemon import contract
from daemon.clock import Clock, SystemClock
from service import commit as commit_mod
from service.errors import CheckpointError, ConfigError
from service.manager import framework_versions
from service.policy import PeriodicPolicy
from service.reporter import Reporter

log = structlog.get_logger()

_EXPORT_RE = re.compile(r"^\d+$")
_TEMP_RE = re.compile(r"^\.(\d+)\.tmp-(\d+)$")


def verify_export(path: Path, checksums: bool = True) -> contract.Manifest:
    """Check an export against its manifest; contract.InvalidCheckpoint says why not."""
    manifest = contract.read_manifest(path)
    for rel, meta in manifest.files.items():
        fpath = path / rel
        try:
            size = fpath.stat().st_size
        except OSError:
            raise contract.InvalidCheckpoint(f"{fpath}: listed in the manifest but missing") from None
        if size != meta["size"]:
            raise contract.InvalidCheckpoint(f"{fpath}: size {size}, manifest says {meta['size']}")
        if checksums and contract.file_crc32(fpath) != meta.get(contract.CHECKSUM_ALGORITHM):
            raise contract.InvalidCheckpoint(f"{fpath}: checksum does not match the manifest")
    return manifest


def exports(directory: Path) -> list[tuple[int, Path]]:
    """Committed export folders (valid or not), oldest step first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((int(n), directory / n) for n in names if _EXPORT_RE.match(n) and (directory / n).is_dir())


def newest_valid_export(directory: Path, checksums: bool = True) -> Path | None:
    """The newest export that verifies, or None."""
    for _, path in reversed(exports(directory)):
        try:
            verify_export(path, checksums=checksums)
        except contract.InvalidCheckpoint as exc:
            log.warning("export.skipped", path=str(path), why=str(exc))
            continue
        return path
    return None


class SavedModelExporter:
    """Exports `model` as a SavedModel every N steps and/or seconds, keeping the newest `keep`."""

    def __init__(
        self,
        model: Any,
        directory: str | os.PathLike[str] | None = None,
        *,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        keep: int = 3,
        signatures: Any = None,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`directory` defaults to `$PREEMPTD_CHECKPOINT_DIR/savedmodel`.

        A Keras model is exported with `model.export` (endpoint `serve`, also the
        `serving_default` signature); anything else with tf.saved_model.save and
        `signatures` (a tf.function with an input_signature, or a dict of them).
        """
        env = os.environ if environ is None else environ
        if directory is None:
            base = env.get(contract.ENV_CHECKPOINT_DIR, "")
            if not base:
                raise ConfigError(
                    f"no export directory: pass directory=... or set {contract.ENV_CHECKPOINT_DIR}"
                )
            directory = Path(base) / contract.SAVEDMODEL_DIR
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        if every_steps < 0 or every_seconds < 0:
            raise ConfigError("every_steps and every_seconds must be >= 0 (0 = off)")
        self.directory = Path(directory)
        commit_mod.prepare_directory(self.directory)
        self._model = model
        self._signatures = signatures
        self._keep = keep
        self._clock = clock or SystemClock()
        self._policy = PeriodicPolicy(every_steps, every_seconds)
        self._policy.reset(0, self._clock.monotonic())
        self._reporter = Reporter(env.get(contract.ENV_SOCKET, ""), clock=self._clock)
        self._remove_stale_temp()
        newest = exports(self.directory)
        if newest:
            self._policy.reset(newest[-1][0], self._clock.monotonic())

    def _remove_stale_temp(self) -> None:
        for name in os.listdir(self.directory):
            m = _TEMP_RE.match(name)
            if m and not contract.pid_alive(int(m.group(2))):
                shutil.rmtree(self.directory / name, ignore_errors=True)
                log.info("export.stale_temp_removed", path=str(self.directory / name))

    def step_done(self, step: int) -> Path | None:
        """Export if due at this step; returns the committed path or None."""
        if not self._policy.due(step, self._clock.monotonic()):
            return None
        return self.export(step)

    def export(self, step: int) -> Path:
        """Export now (synchronously: tracing needs the live model) and commit atomically."""
        started = time.monotonic()
        self._policy.reset(step, self._clock.monotonic())
        final = self.directory / str(step)
        temp = self.directory / f".{step}.tmp-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        try:
            self._write(temp)
            files, subdirs = commit_mod.list_files(temp)
            described = commit_mod.fsync_and_checksum(temp, files)
            for sub in subdirs:
                contract.fsync_dir(temp / sub)
            manifest = contract.Manifest(
                step=step,
                reason="export",
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                files=described,
                versions=framework_versions(),
            )
            contract.write_json_atomic(temp / contract.MANIFEST_NAME, manifest.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.rename(temp, final)
            contract.fsync_dir(self.directory)
        except (OSError, tf.errors.OpError, ValueError) as exc:
            shutil.rmtree(temp, ignore_errors=True)
            error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            log.error("export.failed", step=step, path=str(final), error=error)
            raise CheckpointError(f"SavedModel export of step {step} to {final} failed: {error}") from exc
        seconds = time.monotonic() - started
        log.info("export.committed", step=step, path=str(final), bytes=manifest.total_bytes,
                 seconds=round(seconds, 3))
        self._reporter.send(contract.MSG_EXPORT, step=step, path=str(final), bytes=manifest.total_bytes,
                            seconds=round(seconds, 3))
        self._apply_retention()
        return final

    def _write(self, temp: Path) -> None:
        if hasattr(self._model, "export") and self._signatures is None:
            self._model.export(str(temp), format="tf_saved_model", verbose=False)
        else:
            tf.saved_model.save(self._model, str(temp), signatures=self._signatures)

    def _apply_retention(self) -> None:
        committed = exports(self.directory)
        for step, path in committed[: max(0, len(committed) - self._keep)]:
            shutil.rmtree(path, ignore_errors=True)
            log.info("export.deleted", step=step, path=str(path), reason="retention")

    def close(self) -> None:
        self._reporter.close()
