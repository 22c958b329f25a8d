"""The remote side through fsspec: list, read, write and delete checkpoint folders.

fsspec and the backend package (s3fs, gcsfs, ...) are optional: they are imported
here, lazily, when a `[remote] url` is configured, so `import daemon.cli` stays light.
Credentials come from each SDK's usual chain (environment, config files, instance
metadata) or from `[remote] storage_options`; nothing this module logs or raises
contains them (`RemoteStore.scrub`).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import contract
from daemon.config import ConfigError, RemoteConfig

S3_PROTOCOLS = ("s3", "s3a")
# Bounded network waits so a dead endpoint fails an attempt (then backoff) instead of
# hanging the uploader; the user's storage_options.config_kwargs win.
S3_CONFIG_DEFAULTS = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}


def scrub_url(url: str) -> str:
    """`url` without user info, query or fragment (where credentials hide)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


_USERINFO_RE = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")
_QUERY_RE = re.compile(r"(\w[\w+.-]*://[^\s?'\"]*)\?[^\s'\"]*")
_AWS_KEY_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


_SECRET_KEY_RE = re.compile(r"key|secret|token|passw|credential|session|sas|auth", re.IGNORECASE)


def _secret_values(options: Mapping[str, Any]) -> list[str]:
    """String values of storage options whose names say they are credentials."""
    found: list[str] = []
    for name, value in options.items():
        if isinstance(value, str) and value and _SECRET_KEY_RE.search(str(name)):
            found.append(value)
        elif isinstance(value, Mapping):
            found.extend(_secret_values(value))
    return found


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One layout folder on the remote, as listed."""

    name: str
    step: int
    files: Mapping[str, int]  # relative path -> size

    @property
    def committed(self) -> bool:
        """The manifest is written last, so a folder without it is a partial upload."""
        return contract.MANIFEST_NAME in self.files


class RemoteStore:
    """Checkpoint folders under one remote root (an fsspec filesystem and a path)."""

    def __init__(self, fs: Any, root: str, url: str, secrets: Iterable[str] = ()) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.display_url = scrub_url(url)
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    # ------------------------------------------------------------------ helpers

    def scrub(self, text: str) -> str:
        """`text` (an error message) with credentials removed."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _USERINFO_RE.sub(r"\1***@", text)
        text = _QUERY_RE.sub(r"\1?***", text)
        return _AWS_KEY_RE.sub("***", text)

    def _path(self, name: str, rel: str = "") -> str:
        return f"{self.root}/{name}/{rel}" if rel else f"{self.root}/{name}"

    def where(self, name: str) -> str:
        """Credential-free URL of a remote checkpoint folder, for logs."""
        return f"{self.display_url}/{name}"

    # ------------------------------------------------------------------ listing

    def checkpoints(self) -> list[RemoteCheckpoint]:
        """Every layout folder under the root, oldest step first (one listing request).

        Objects that do not follow the layout are ignored (and never touched).
        """
        return self._list(self.root)

    def checkpoint(self, name: str) -> RemoteCheckpoint | None:
        """The listing of one folder (only its own objects), None when nothing is there."""
        found = self._list(self._path(name))
        return found[0] if found else None

    def _list(self, under: str) -> list[RemoteCheckpoint]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(under, detail=True)
        except FileNotFoundError:
            return []
        folders: dict[str, dict[str, int]] = {}
        prefix = self.root + "/"
        for full, info in found.items():
            full = full.rstrip("/")
            if not full.startswith(prefix) or info.get("type") == "directory":
                continue
            name, _, rel = full[len(prefix):].partition("/")
            parsed = contract.parse_dirname(name)
            if not rel or parsed is None or parsed[1] is not None:
                continue
            folders.setdefault(name, {})[rel] = int(info.get("size") or 0)
        out = []
        for name, files in folders.items():
            parsed = contract.parse_dirname(name)
            assert parsed is not None
            out.append(RemoteCheckpoint(name=name, step=parsed[0], files=files))
        return sorted(out, key=lambda c: c.step)

    # ------------------------------------------------------------------ read/write

    def read_bytes(self, name: str, rel: str) -> bytes:
        data: bytes = self.fs.cat_file(self._path(name, rel))
        return data

    def write_bytes(self, name: str, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name, rel), data)

    def open_writer(self, name: str, rel: str, block_size: int) -> Any:
        """A binary writer for a streamed (throttled) upload; has write() and close()."""
        return self.fs.open(self._path(name, rel), "wb", block_size=block_size)

    def put_file(self, local: Path, name: str, rel: str, on_bytes: Callable[[int], None]) -> None:
        """Upload one file with the backend's own fast path (multipart, concurrent parts).

        `on_bytes(total_sent_of_this_file)` reports progress where the backend tells.
        """
        from fsspec.callbacks import Callback

        callback = Callback(hooks={"progress": lambda size, value, **_: on_bytes(int(value))})
        self.fs.put_file(str(local), self._path(name, rel), callback=callback)

    def get_file(self, name: str, rel: str, local: Path) -> None:
        self.fs.get_file(self._path(name, rel), str(local))

    def uncommit(self, name: str) -> None:
        """Delete the manifest only, so the folder stops being a checkpoint at once."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name, contract.MANIFEST_NAME))

    def remove(self, cp: RemoteCheckpoint) -> None:
        """Delete a remote checkpoint: manifest first (never a half-deleted 'checkpoint')."""
        if cp.committed:
            self.uncommit(cp.name)
        rest = [self._path(cp.name, rel) for rel in cp.files if rel != contract.MANIFEST_NAME]
        if rest:
            self.fs.rm(rest)
        self.fs.invalidate_cache()


def _missing_package(protocol: str, exc: ImportError) -> ConfigError:
    from fsspec.registry import known_implementations

    impl = known_implementations.get(protocol, {}).get("class", "")
    package = impl.split(".")[0] if impl else (exc.name or "?")
    hint = {"s3fs": "pip install 'preemptd[remote]'", "gcsfs": "pip install 'preemptd[gcs]'"}.get(
        package, f"pip install {package}")
    return ConfigError(
        f"remote.url: {protocol}:// needs the optional package {package!r}, which is not "
        f"installed ({hint})"
    )


def open_store(cfg: RemoteConfig) -> RemoteStore:
    """The store for `[remote]`; ConfigError names what is wrong (missing package, bad option).

    Builds the filesystem object only: no request is made here.
    """
    if not cfg.url:
        raise ConfigError("remote.url: empty (the remote mirror is off)")
    try:
        import fsspec
        import fsspec.core
        import fsspec.utils
    except ImportError:
        raise ConfigError(
            "remote.url: needs the optional package 'fsspec', which is not installed "
            "(pip install 'preemptd[remote]')"
        ) from None
    protocol = fsspec.utils.get_protocol(cfg.url)
    options: dict[str, Any] = dict(cfg.storage_options)
    if cfg.endpoint_url:
        if protocol not in S3_PROTOCOLS:
            raise ConfigError(
                f"remote.endpoint_url: only for s3:// URLs; for {protocol}:// set the backend's "
                "option in remote.storage_options"
            )
        options.setdefault("endpoint_url", cfg.endpoint_url)
    if protocol in S3_PROTOCOLS:
        config_kwargs = dict(options.get("config_kwargs") or {})
        for key, value in S3_CONFIG_DEFAULTS.items():
            config_kwargs.setdefault(key, value)
        options["config_kwargs"] = config_kwargs
    if protocol in ("file", "local"):
        options.setdefault("auto_mkdir", True)
    # A private instance: the mirror and a test or a second daemon never share caches.
    options["skip_instance_cache"] = True
    try:
        fs, root = fsspec.core.url_to_fs(cfg.url, **options)
    except ImportError as exc:
        raise _missing_package(protocol, exc) from None
    except (ValueError, TypeError, KeyError) as exc:
        store = RemoteStore(None, "", cfg.url, _secret_values(cfg.storage_options))
        raise ConfigError(
            f"remote.url / remote.storage_options: cannot open {store.display_url}: "
            f"{store.scrub(str(exc))}"
        ) from None
    return RemoteStore(fs, root, cfg.url, _secret_values(options))


def ensure_dir(path: Path) -> None:
    """mkdir -p that fsyncs the parent of each new folder."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    contract.fsync_dir(path.parent)
