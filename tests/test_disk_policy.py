"""Unit tests of the pure disk policy (daemon/disk_policy.py) with made-up numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.config import DiskConfig
from daemon.disk_policy import (
    CheckpointSize,
    DiskState,
    PressureLatch,
    Usage,
    classify,
    decide,
    need_bytes,
    over_limits,
)

MiB = 1 << 20
CFG = DiskConfig(warn_percent=80, prune_percent=90, margin=1.5)
HOUR = 3600.0


def usage(used_mib: int, total_mib: int = 1000) -> Usage:
    return Usage(total=total_mib * MiB, used=used_mib * MiB, free=(total_mib - used_mib) * MiB)


def ckpts(*steps: int, size_mib: int = 50, invalid: tuple[int, ...] = ()) -> list[CheckpointSize]:
    return [CheckpointSize(s, created=1_700_000_000.0 + s, valid=s not in invalid, bytes=size_mib * MiB)
            for s in steps]


def test_percent_follows_psutil_definition() -> None:
    # psutil: used / (used + free), where free excludes blocks reserved for root.
    u = Usage(total=100, used=45, free=45)
    assert u.percent == pytest.approx(50.0)
    assert Usage(0, 0, 0).percent == 0.0


def test_need_is_biggest_recent_checkpoint_times_margin() -> None:
    assert need_bytes(100 * MiB, 0, 1.5) == 150 * MiB
    assert need_bytes(100 * MiB, 300 * MiB, 1.5) == 450 * MiB  # a save that grew / died of ENOSPC
    assert need_bytes(0, 0, 1.5) == 0  # nothing known yet: no low-space claims


@pytest.mark.parametrize(
    ("used", "need", "state"),
    [
        (500, 0, DiskState.OK),
        (799, 0, DiskState.OK),
        (800, 0, DiskState.WARN),
        (899, 50 * MiB, DiskState.WARN),
        (900, 0, DiskState.PRUNING),
        (950, 40 * MiB, DiskState.PRUNING),
        (950, 60 * MiB, DiskState.LOW_SPACE),  # 50 MiB free < 60 MiB needed
        (100, 901 * MiB, DiskState.LOW_SPACE),
    ],
)
def test_classify(used: int, need: int, state: DiskState) -> None:
    assert classify(usage(used), need, CFG) is state


def test_below_thresholds_nothing_happens() -> None:
    d = decide(usage(700), ckpts(1, 2, 3, 4), need=75 * MiB, cfg=CFG)
    assert d.prune == () and d.state is DiskState.OK and not d.skip_periodic and not d.exhausted


def test_warn_does_not_prune() -> None:
    d = decide(usage(850), ckpts(1, 2, 3, 4), need=75 * MiB, cfg=CFG)
    assert d.prune == () and d.state is DiskState.WARN


def test_prunes_oldest_until_below_prune_threshold() -> None:
    # 920 MiB used, each checkpoint 50 MiB: one deletion gives 870 (< 900) -> stop.
    d = decide(usage(920), ckpts(100, 200, 300, 400), need=75 * MiB, cfg=CFG)
    assert d.prune == (100,)
    assert d.prune_bytes == 50 * MiB
    assert d.projected.used == 870 * MiB
    assert d.state is DiskState.WARN


def test_prunes_damaged_first_then_oldest_valid() -> None:
    cands = ckpts(100, 200, 300, 400, invalid=(300,))
    d = decide(usage(999), cands, need=140 * MiB, cfg=CFG)
    assert d.prune == (300, 100, 200)  # never 400, the newest valid
    assert not d.exhausted and d.state is DiskState.WARN  # 849 of 1000 MiB


def test_never_the_newest_valid_even_when_everything_else_is_gone() -> None:
    d = decide(usage(999), ckpts(100, 200), need=75 * MiB, cfg=CFG)
    assert d.prune == (100,)
    assert d.exhausted
    assert d.state is DiskState.LOW_SPACE and d.skip_periodic


def test_damaged_folder_newer_than_newest_valid_is_left_alone() -> None:
    d = decide(usage(999), ckpts(100, 200, 300, invalid=(300,)), need=0, cfg=CFG)
    assert 300 not in d.prune and 200 not in d.prune


def test_hourly_anchors_are_kept() -> None:
    base = 1_700_000_000.0 - (1_700_000_000.0 % HOUR)
    cands = [
        CheckpointSize(100, base + 10, True, 50 * MiB),  # anchor of hour 0
        CheckpointSize(200, base + 1200, True, 50 * MiB),
        CheckpointSize(300, base + HOUR + 10, True, 50 * MiB),  # anchor of hour 1
        CheckpointSize(400, base + HOUR + 1200, True, 50 * MiB),  # newest
    ]
    d = decide(usage(999), cands, need=0, cfg=CFG, keep_every_hours=1.0)
    assert d.prune == (200,)
    assert d.exhausted


def test_prunes_below_prune_percent_to_keep_room_for_the_emergency_save() -> None:
    # 850 MiB used (warn only) but 150 MiB free < 300 MiB needed: make room.
    d = decide(usage(850), ckpts(100, 200, 300, 400, size_mib=100), need=300 * MiB, cfg=CFG)
    assert d.prune == (100, 200)
    assert d.projected.free >= 300 * MiB
    assert not d.skip_periodic and d.state is DiskState.OK


def test_skip_periodic_when_pruning_cannot_make_room() -> None:
    d = decide(usage(850), ckpts(400, size_mib=100), need=300 * MiB, cfg=CFG)
    assert d.prune == () and d.exhausted
    assert d.skip_periodic and d.state is DiskState.LOW_SPACE


def test_space_failure_frees_everything_that_may_go() -> None:
    d = decide(usage(500), ckpts(100, 200, 300, 400), need=75 * MiB, cfg=CFG, space_failure=True)
    assert d.prune == (100, 200, 300)
    assert d.state is DiskState.OK


def test_no_checkpoints_no_crash() -> None:
    d = decide(usage(999), [], need=0, cfg=CFG)
    assert d.prune == () and d.exhausted and d.state is DiskState.PRUNING


def test_pressure_latch_once_per_crossing_with_hysteresis() -> None:
    latch = PressureLatch()
    seen = [latch.crossings(p, CFG) for p in (50, 81, 85, 80.5, 79.5, 82, 91, 95, 89.5, 88, 90, 78, 81)]
    assert seen == [[], ["warn"], [], [], [], [], ["prune"], [], [], [], ["prune"], [], ["warn"]]
    # one jump over both thresholds reports both
    assert PressureLatch().crossings(99, CFG) == ["warn", "prune"]


sizes = st.integers(min_value=0, max_value=200 * MiB)


@given(
    used=st.integers(min_value=0, max_value=1000),
    steps=st.lists(st.integers(min_value=1, max_value=50), unique=True, max_size=12),
    bad=st.sets(st.integers(min_value=1, max_value=50)),
    ckpt_sizes=st.lists(sizes, min_size=12, max_size=12),
    need=sizes,
    failure=st.booleans(),
)
def test_invariants(used: int, steps: list[int], bad: set[int], ckpt_sizes: list[int], need: int,
                    failure: bool) -> None:
    cands = [CheckpointSize(s, 1e9 + s, s not in bad, ckpt_sizes[i]) for i, s in enumerate(steps)]
    u = usage(used)
    d = decide(u, cands, need, CFG, space_failure=failure)
    valid = [c.step for c in cands if c.valid]
    if valid:
        assert max(valid) not in d.prune  # never the newest valid
    assert len(set(d.prune)) == len(d.prune)
    assert set(d.prune) <= {c.step for c in cands}
    if not failure and not over_limits(u, need, CFG):
        assert d.prune == ()
    if d.prune and not failure:
        # stops as soon as the limits are met: without the last deletion it was still over
        without_last = u.after_freeing(d.prune_bytes - next(c.bytes for c in cands if c.step == d.prune[-1]))
        assert over_limits(without_last, need, CFG)
    assert d.skip_periodic == (d.state is DiskState.LOW_SPACE)
