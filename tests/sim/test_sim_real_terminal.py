"""The real tier's terminal process: its schedule of device faults (clock_skew, disk_full)
and its void decisions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import pytest

from syncengine.sim.clock import EventQueue
from syncengine.sim.faults import FaultInjector
from syncengine.sim.real_terminal import (
    DeviceChange,
    DeviceState,
    Driver,
    device_changes,
    device_state,
)
from syncengine.sim.scenario import FaultSpec

MIN = 60_000


def skew(
    at: int, offset: int, duration: int = 0, targets: tuple[str, ...] | None = None
) -> FaultSpec:
    return FaultSpec("clock_skew", at, duration, targets, offset_ms=offset)


def full(at: int, duration: int, targets: tuple[str, ...] | None = None) -> FaultSpec:
    return FaultSpec("disk_full", at, duration, targets)


def test_no_device_faults_no_changes() -> None:
    faults = [FaultSpec("partition", MIN, MIN), FaultSpec("crash", MIN, targets=("T1",))]
    assert device_changes(faults, "T1") == []
    assert device_state([], 10 * MIN) == DeviceState(0, False)


def test_a_skew_without_duration_lasts_to_the_end() -> None:
    changes = device_changes([skew(MIN, -7 * MIN)], "T1")
    assert changes == [DeviceChange(MIN, "clock_skew", True, -7 * MIN)]
    assert device_state(changes, MIN - 1).skew_ms == 0
    assert device_state(changes, MIN).skew_ms == -7 * MIN
    assert device_state(changes, 1_000 * MIN).skew_ms == -7 * MIN


def test_windows_are_half_open_and_only_for_their_targets() -> None:
    faults = [skew(MIN, 3 * MIN, 2 * MIN, ("T2",)), full(2 * MIN, MIN, ("T1",))]
    t1, t2 = device_changes(faults, "T1"), device_changes(faults, "T2")
    assert [c.kind for c in t1] == ["disk_full", "disk_full"]
    assert [c.kind for c in t2] == ["clock_skew", "clock_skew"]
    assert device_state(t1, 2 * MIN) == DeviceState(0, True)
    assert device_state(t1, 3 * MIN - 1) == DeviceState(0, True)
    assert device_state(t1, 3 * MIN) == DeviceState(0, False)
    assert device_state(t2, MIN) == DeviceState(3 * MIN, False)
    assert device_state(t2, 3 * MIN) == DeviceState(0, False)


def test_overlaps_follow_the_in_memory_rule() -> None:
    # The later start rules; the first end clears, even if another fault is still on.
    faults = [skew(0, -MIN, 4 * MIN), skew(MIN, 2 * MIN, MIN), full(0, 3 * MIN), full(MIN, MIN)]
    changes = device_changes(faults, "T1")
    assert device_state(changes, 0) == DeviceState(-MIN, True)
    assert device_state(changes, MIN) == DeviceState(2 * MIN, True)
    assert device_state(changes, 2 * MIN) == DeviceState(0, False)
    assert device_state(changes, 3 * MIN) == DeviceState(0, False)


def test_a_start_and_an_end_at_the_same_time_the_end_wins() -> None:
    changes = device_changes([skew(MIN, 5_000, MIN), skew(2 * MIN, -5_000, MIN)], "T1")
    assert [c.start for c in changes] == [True, True, False, False]
    assert device_state(changes, 2 * MIN).skew_ms == 0


class _Terminal:
    def __init__(self) -> None:
        self.disk_full = False

    def set_disk_full(self, on: bool) -> None:
        self.disk_full = on


class _World:
    """Just what FaultInjector touches for clock_skew and disk_full."""

    def __init__(self) -> None:
        self.queue = EventQueue(0)
        self.skew_ms = {"T1": 0, "T2": 0}
        self.terminals = {"T1": _Terminal(), "T2": _Terminal()}

    def fault_started(self, fault: FaultSpec) -> None:
        pass

    def fault_ended(self, fault: FaultSpec) -> None:
        pass


@pytest.mark.parametrize(
    "faults",
    [
        [skew(0, -7 * MIN, targets=("T1",)), full(2 * MIN, 2 * MIN, ("T2",))],
        [skew(0, -MIN, 4 * MIN), skew(MIN, 2 * MIN, MIN), full(0, 3 * MIN), full(MIN, MIN)],
        [skew(MIN, 5_000, MIN), skew(2 * MIN, -5_000, MIN), full(MIN, MIN), full(2 * MIN, MIN)],
        [skew(MIN, 9_000), skew(MIN, -9_000, MIN, ("T2",)), full(MIN, 3 * MIN, ("T2",))],
    ],
)
def test_same_states_as_the_in_memory_tier(faults: list[FaultSpec]) -> None:
    faults = sorted(faults, key=lambda ft: (ft.at_ms, ft.kind))  # as the scenario loader does
    world = _World()
    FaultInjector(cast(Any, world)).schedule(tuple(faults))
    changes = {tid: device_changes(faults, tid) for tid in world.terminals}
    for at in range(0, 6 * MIN, 30_000):
        world.queue.run_until(at)
        for tid, term in world.terminals.items():
            want = DeviceState(world.skew_ms[tid], term.disk_full)
            assert device_state(changes[tid], at) == want, (tid, at)


@pytest.mark.parametrize("boot", [0, 1])
def test_voids_are_decided_from_the_in_memory_tiers_stream(tmp_path: Path, boot: int) -> None:
    """Boot 0 draws the in-memory tier's ``seed:voids:<id>`` stream, one draw per approved
    standalone payment; a restarted process draws a stream of its own."""
    scenario = tmp_path / "voids.toml"
    scenario.write_text(VOIDS_SCENARIO)
    cfg = {
        "scenario": str(scenario),
        "terminal_id": "T2",
        "clock_factor": 60.0,
        "t0": 0.0,
        "start_ms": 0,
        "seed": 9,
        "boot": boot,
        "log": str(tmp_path / "trace.jsonl"),
        "pans": str(tmp_path / "pans.txt"),
    }
    driver = Driver(cfg)
    try:
        got = [driver.wants_void() for _ in range(200)]
    finally:
        driver.log.close()
        driver.pan_log.close()
    stream = random.Random("9:voids:T2" + (f":{boot}" if boot else ""))
    assert got == [stream.random() < 0.3 for _ in range(200)]
    assert 20 < sum(got) < 100


VOIDS_SCENARIO = """
name = "voids-stream"
duration = "1h"
[[terminals]]
count = 2
[workload]
standalone = 1.0
void_fraction = 0.3
"""
