"""Durable remote mirror: committed checkpoints uploaded to object storage, restored on a new VM.

Turned on by `[remote] url` (`s3://bucket/run`, `gs://bucket/run`, any fsspec URL).
fsspec and the backend (s3fs, gcsfs) are the optional extra `preemptd[remote]`,
imported only when a URL is configured.

Log events (one line each; fields in docs/remote.md):
  remote.uploaded        a checkpoint is committed on the remote (manifest written)
  remote.upload_failed   an attempt failed; `retry_in_seconds` or `retry=false`
  remote.upload_skipped  not uploaded: deleted locally first, or superseded in the queue
  remote.resumed         unfinished uploads re-queued from the journal at start
  remote.fetched         the newest valid remote checkpoint was placed locally at start
  remote.fetch_rejected  a remote folder not restored (no manifest, bad checksum)
  remote.fetch_empty     no remote checkpoint to fetch
  remote.fetch_failed    the remote could not be read at start
  remote.pruned          remote retention removed a checkpoint
  remote.prune_failed    remote retention could not run (tried again later)
  remote.final           on the stop path: did the final checkpoint reach the remote in time
"""

from __future__ import annotations

from daemon.config import Config
from daemon.remote.mirror import RemoteMirror

__all__ = ["RemoteMirror", "build_mirror"]


def build_mirror(cfg: Config) -> RemoteMirror | None:
    """The mirror for this config, None when `[remote] url` is empty.

    Raises ConfigError (exit 78) when the URL needs a package that is not installed.
    """
    if not cfg.remote.url:
        return None
    return RemoteMirror(
        cfg.remote,
        checkpoint_dir=cfg.checkpoint.dir,
        state_dir=cfg.daemon.state_dir,
        grace_seconds=cfg.stop.grace_seconds,
    )
