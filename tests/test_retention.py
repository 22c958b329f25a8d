"""The shared retention policy (daemon/retention.py) and the worker's use of it on real folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import contract, retention
from daemon.retention import Candidate
from service import commit as commit_mod

HOUR = 3600.0


def test_keeps_newest_valid() -> None:
    cands = [Candidate(step=s, created=s * 10.0) for s in (100, 200, 300, 400, 500)]
    assert retention.to_delete(cands, keep=3) == [100, 200]


def test_invalid_newer_than_every_valid_is_left_alone() -> None:
    cands = [
        Candidate(step=100, created=1.0),
        Candidate(step=200, created=2.0),
        Candidate(step=300, created=3.0, valid=False),
    ]
    assert retention.to_delete(cands, keep=1) == [100]


def test_damaged_older_ones_go_first_and_do_not_count() -> None:
    cands = [
        Candidate(step=100, created=1.0),
        Candidate(step=200, created=2.0, valid=False),
        Candidate(step=300, created=3.0),
    ]
    # keep=2 keeps two *valid* ones: 100 and 300; the damaged 200 goes.
    assert retention.to_delete(cands, keep=2) == [200]


def test_hourly_anchors_survive() -> None:
    # One checkpoint every 20 minutes for 3 hours; keep 2 plus one per hour.
    cands = [Candidate(step=i, created=i * 1200.0) for i in range(9)]
    deleted = retention.to_delete(cands, keep=2, keep_every_hours=1)
    kept = {c.step for c in cands} - set(deleted)
    assert kept == {0, 3, 6, 7, 8}


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keep"):
        retention.to_delete([Candidate(1, 1.0)], keep=0)


def test_nothing_valid_deletes_nothing() -> None:
    cands = [Candidate(step=s, created=1.0, valid=False) for s in (1, 2, 3)]
    assert retention.to_delete(cands, keep=1) == []
    assert retention.prune_order(cands) == []


def test_prune_order_damaged_first_never_newest() -> None:
    cands = [
        Candidate(step=100, created=1.0),
        Candidate(step=200, created=2.0, valid=False),
        Candidate(step=300, created=3.0),
        Candidate(step=400, created=4.0),
    ]
    assert retention.prune_order(cands) == [200, 100, 300]


candidates_st = st.lists(
    st.builds(
        Candidate,
        step=st.integers(0, 10_000),
        created=st.floats(0, 100 * HOUR, allow_nan=False),
        valid=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda c: c.step,
)


@settings(max_examples=300, deadline=None)
@given(cands=candidates_st, keep=st.integers(1, 5), hours=st.sampled_from([0.0, 1.0, 6.0]))
def test_properties(cands: list[Candidate], keep: int, hours: float) -> None:
    deleted = retention.to_delete(cands, keep, hours)
    steps = {c.step for c in cands}
    assert set(deleted) <= steps
    assert deleted == sorted(deleted)
    newest = retention.newest_valid_step(cands)
    if newest is not None:
        assert newest not in deleted
        valid_desc = sorted((c.step for c in cands if c.valid), reverse=True)
        assert not set(valid_desc[:keep]) & set(deleted)
        assert all(step < newest for step in deleted)
    else:
        assert deleted == []
    assert not retention.hourly_anchors(cands, hours) & set(deleted)
    pruned = retention.prune_order(cands, hours)
    assert newest not in pruned
    assert len(set(pruned)) == len(pruned)


def _fake_checkpoint(directory: Path, step: int, created: str = "2026-01-01T00:00:00Z") -> Path:
    temp = directory / contract.temp_dirname(step)
    temp.mkdir()
    (temp / "ckpt.data-00000-of-00001").write_bytes(bytes([step % 251]) * 100)
    (temp / "ckpt.index").write_bytes(b"index")
    committed = commit_mod.commit(temp, step, "periodic", started=0.0)
    if created:
        # Rewrite the timestamp to place checkpoints in hours (manifest is our own format).
        import json

        mpath = committed.path / contract.MANIFEST_NAME
        data = json.loads(mpath.read_text())
        data["created"] = created
        mpath.write_text(json.dumps(data))
    return committed.path


def test_apply_retention_on_disk(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step, created=f"2026-01-01T0{step // 10}:00:00Z")
    # A damaged one in the middle and a foreign folder that must never be touched.
    (tmp_path / contract.checkpoint_dirname(25)).mkdir()
    (tmp_path / "notes").mkdir()
    deleted = commit_mod.apply_retention(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == [contract.checkpoint_dirname(s) for s in (10, 20, 25)]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [contract.checkpoint_dirname(30), contract.checkpoint_dirname(40), "notes"]


def test_apply_retention_keeps_hourly(tmp_path: Path) -> None:
    for i, step in enumerate((10, 20, 30, 40, 50)):
        _fake_checkpoint(tmp_path, step, created=f"2026-01-01T00:{i * 20:02d}:00Z")
    commit_mod.apply_retention(tmp_path, keep=1, keep_every_hours=1)
    left = sorted(e.step for e in contract.committed(tmp_path))
    # 00:00 opens the first hour, 01:00 (step 40) the second, 50 is the newest.
    assert left == [10, 40, 50]
