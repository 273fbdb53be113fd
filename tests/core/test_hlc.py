"""Hybrid logical clock: monotonic, causal, and a bound on remote drift."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import ClockError
from syncengine.core.hlc import Hlc, HybridClock


def test_now_is_strictly_increasing_even_if_physical_time_goes_back() -> None:
    clock = HybridClock()
    a = clock.now(1_000)
    b = clock.now(1_000)
    c = clock.now(900)  # wall clock stepped backwards
    assert a < b < c
    assert c.wall_ms == 1_000


def test_observe_moves_past_remote() -> None:
    clock = HybridClock(max_drift_ms=10_000)
    remote = Hlc(5_000, 7)
    local = clock.observe(remote, physical_ms=4_000)
    assert local > remote
    assert clock.now(4_001) > local


def test_remote_too_far_ahead_is_refused_and_clock_unchanged() -> None:
    clock = HybridClock(max_drift_ms=60_000)
    before = clock.now(1_000_000)
    with pytest.raises(ClockError, match="ahead"):
        clock.observe(Hlc(1_000_000 + 60_001), physical_ms=1_000_000)
    assert clock.last == before


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 5)),
        max_size=60,
    )
)
def test_timestamps_never_go_backwards(events: list[tuple[bool, int, int, int]]) -> None:
    clock = HybridClock(max_drift_ms=10**7)
    last = clock.last
    for is_remote, physical, remote_wall, remote_logical in events:
        if is_remote:
            stamp = clock.observe(Hlc(remote_wall, remote_logical), physical)
            assert stamp > Hlc(remote_wall, remote_logical)
        else:
            stamp = clock.now(physical)
        assert stamp > last
        last = stamp


def test_wire_validation() -> None:
    assert Hlc.from_wire([5, 1]) == Hlc(5, 1)
    for bad in [[5], "5.1", [5, 1.0], [-1, 0]]:
        with pytest.raises(ClockError):
            Hlc.from_wire(bad)
