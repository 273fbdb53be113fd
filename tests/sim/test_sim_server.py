"""The simulator runs the server code that ships: ServerMachine, SQLite store, forwarder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from syncengine.sim import facts as f
from syncengine.sim import runner
from syncengine.sim.scenario import load, loads
from syncengine.sim.server import RealServer

ROOT = Path(__file__).parents[2]

ACK_BEFORE_STORE = """
name = "planted-ack-before-store"
seed = 5
duration = "1h"
[[terminals]]
id = "T1"
[workload]
payments_per_hour = 60
[[faults]]
kind = "bug"
bug = "ack_before_store"
at = "10m"
duration = "20m"
"""

SLOW_CLOCK = """
name = "slow-clock"
seed = 22
duration = "30m"
[[terminals]]
id = "T1"
[workload]
payments_per_hour = 30
[[faults]]
kind = "clock_skew"
at = "0s"
offset = "-7m"
"""

PORTAL_LIMIT = """
name = "portal-limit"
seed = 9
duration = "1h"
[merchant]
total_limit = "50000.00"
[[terminals]]
id = "T1"
[workload]
payments_per_hour = 0
"""


def test_server_crash_dies_inside_a_processor_call_and_recovers() -> None:
    result = runner.run(load(ROOT / "scenarios/server-crash-mid-forward.toml"))
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    trace = result.facts.trace
    died = [e for e in trace if e.kind == f.FORWARD and e.detail == "server died mid-forward"]
    assert len(died) == 2
    restarts = [e for e in trace if e.kind == f.RESTART and e.detail == "server"]
    assert len(restarts) == 2
    # the payment charged by the dead process is resolved by a lookup, never charged again
    charged = [e.payment_id for e in trace if e.kind == f.FORWARD and e.detail == "approved"]
    assert len(charged) == len(set(charged)) or result.counters["duplicate_charges"] == 0
    assert result.facts.server_files, "the server's SQLite files are checked for card numbers"


def test_committed_server_state_survives_a_crash(tmp_path: Path) -> None:
    world = runner.World(load(ROOT / "scenarios/decline-after-reconnect.toml"), 3, tmp_path)
    world.setup_server()
    for tid in world.terminals:
        world.boot_terminal(tid)
        world.schedule_arrival(tid)
    world.queue.after(0, world.tick_terminals, "tick")
    world.queue.after(0, world.tick_server, "server-tick")
    world.queue.run_until(world.queue.start_ms + 30 * 60_000)
    before = {op.key for op in world.server.stored_ops()}
    assert before
    world.crash_server()
    assert isinstance(world.server, RealServer) and world.server.store is None
    world.boot_server()
    assert {op.key for op in world.server.stored_ops()} == before
    world.close()


def test_portal_force_offline_reaches_the_terminal_through_the_server() -> None:
    result = runner.run(load(ROOT / "scenarios/forced-offline.toml"))
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    told = Counter((e.terminal, e.kind) for e in result.facts.trace)
    assert told[("T1", f.APPROVED_OFFLINE)] > 0
    assert told[("T2", f.APPROVED_OFFLINE)] == 0
    settings = [
        op for op in result.facts.server_ops if op.kind == "setting" and op.origin == "server/T1"
    ]
    assert [op.body["value"] for op in settings if op.body["key"] == "force_offline"] == [
        False,
        True,
        False,
    ]


def test_ack_before_store_is_caught() -> None:
    result = runner.run(loads(ACK_BEFORE_STORE))
    assert any(v.startswith("ack_after_durable") for v in result.violations)


def test_portal_total_limit_reaches_the_terminal(tmp_path: Path) -> None:
    # Once broken: the server wrote one "limits" setting the SDK did not read (fixed in
    # 4df7826); a lowered limit must reach the terminal through the real server.
    world = runner.World(loads(PORTAL_LIMIT), 9, tmp_path)
    world.setup_server()
    world.boot_terminal("T1")
    world.queue.after(0, world.tick_terminals, "tick")
    world.queue.after(0, world.tick_server, "server-tick")
    world.queue.run_until(world.queue.start_ms + 60_000)
    world.server.update_settings(world.queue.now_ms, "T1", total_limit_minor=30_000)
    world._flush_server()
    world.queue.run_until(world.queue.now_ms + 60_000)
    machine = world.terminals["T1"].machine
    assert machine is not None
    total = machine.limits().total.minor
    world.close()
    assert total == 30_000


def test_slow_terminal_clock_still_learns_outcomes() -> None:
    result = runner.run(loads(SLOW_CLOCK))
    errors = [e for e in result.facts.trace if e.kind == "protocol_error"]
    assert result.counters.get("unreported", 0) == 0 and not errors


FORCE_AGAIN = """
name = "force-again"
seed = 4
duration = "2h"
[[terminals]]
id = "T1"
device_class = "register"
[workload]
payments_per_hour = 30
[[faults]]
kind = "force_offline"
at = "10m"
duration = "1h40m"
targets = ["T1"]
[[faults]]
kind = "partition"
at = "30m"
duration = "10m"
targets = ["T1"]
[[faults]]
kind = "reboot"
at = "50m"
duration = "1m"
targets = ["T1"]
[[faults]]
kind = "force_offline"
at = "1h10m"
duration = "20m"
targets = ["T1"]
"""


def test_a_terminal_that_left_forced_offline_is_forced_again_by_a_new_press() -> None:
    """Forced offline, the link lost and back: the terminal leaves forced offline (rule 5)
    and stays online, also across a reboot, though the setting still says forced. The
    owner presses force offline again (same value): the server writes it again and the
    terminal goes offline once more."""
    result = runner.run(loads(FORCE_AGAIN))
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    start = min(e.at_ms for e in result.facts.trace)
    forced_at = [
        (op.body["at_ms"] - start) // 60_000
        for op in result.facts.server_ops
        if op.origin == "T1"
        and op.kind == "mode"
        and op.body["reason"] == "forced_offline_by_portal"
    ]
    assert len(forced_at) == 2, forced_at
    assert 10 <= forced_at[0] < 30 and 70 <= forced_at[1] < 90
    presses = [
        op.body["value"]
        for op in result.facts.server_ops
        if op.origin == "server/T1" and op.kind == "setting" and op.body["key"] == "force_offline"
    ]
    assert presses == [False, True, True, False]
    told = Counter(e.kind for e in result.facts.trace if e.terminal == "T1")
    assert told[f.APPROVED_OFFLINE] > 0
