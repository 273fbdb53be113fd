"""The checker catches bugs planted on purpose, and the CLI prints the replaying seed."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from syncengine.sim import checker, cli, runner
from syncengine.sim import facts as f
from syncengine.sim.scenario import loads

RETRY_DECLINE = """
name = "planted-retry-decline"
seed = 3
duration = "3h"
[[terminals]]
id = "T1"
device_class = "register"
[workload]
payments_per_hour = 30
decline_rate = 0.3
[[faults]]
kind = "partition"
at = "20m"
duration = "1h"
[[faults]]
kind = "bug"
bug = "retry_decline_new_key"
at = "0s"
duration = "3h"
"""

IGNORE_LIMIT = """
name = "planted-ignore-limit"
seed = 4
duration = "3h"
[merchant]
total_limit = "300.00"
[[terminals]]
id = "T1"
[workload]
payments_per_hour = 60
[[faults]]
kind = "partition"
at = "10m"
duration = "2h"
[[faults]]
kind = "bug"
bug = "ignore_total_limit"
at = "0s"
duration = "3h"
"""


def test_retry_of_hard_decline_under_new_key_is_caught() -> None:
    result = runner.run(loads(RETRY_DECLINE))
    assert not result.ok
    assert result.counters["duplicate_charges"] > 0
    names = {inv.name for inv in result.invariants if not inv.ok}
    assert {"single_charge", "no_phantom"} <= names


def test_ignored_total_limit_is_caught() -> None:
    result = runner.run(loads(IGNORE_LIMIT))
    assert result.counters["limit_breaches"] > 0
    assert any(v.startswith("offline_limits") for v in result.violations)


def test_cli_prints_the_reproducing_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "planted.toml"
    path.write_text(RETRY_DECLINE)
    args = argparse.Namespace(
        scenario_command="run",
        files=[str(path)],
        seed=None,
        seeds=1,
        report=tmp_path / "r",
        json=False,
        real=False,
        keep=None,
    )
    assert cli.run(args) == 1
    err = capsys.readouterr().err
    assert f"replay: syncengine scenario run {path} --seed 3" in err
    assert "single_charge" in err
    assert (tmp_path / "r" / "planted-retry-decline-seed3.html").exists()


DOUBLE_BUDGET = """
name = "planted-double-budget"
seed = 5
duration = "4h"
[merchant]
offline_budget = "200.00"
[[terminals]]
count = 3
id_prefix = "T"
device_class = "register"
[workload]
payments_per_hour = 60
[[faults]]
kind = "partition"
at = "30m"
duration = "3h"
[[faults]]
kind = "bug"
bug = "double_budget"
at = "0s"
duration = "4h"
"""


def test_a_budget_split_twice_is_caught() -> None:
    """The server grants from twice the merchant's budget: partitioned terminals spend it
    and the checker sees the sum outstanding pass the real budget."""
    result = runner.run(loads(DOUBLE_BUDGET))
    assert result.counters["budget_breaches"] > 0
    assert any(v.startswith("merchant_budget") for v in result.violations)
    honest = runner.run(loads(DOUBLE_BUDGET.split('[[faults]]\nkind = "bug"')[0]))
    assert honest.ok, honest.violations
    assert honest.counters["budget_breaches"] == 0
    assert honest.counters["refused:over_merchant_budget"] > 0


SCENARIOS = Path(__file__).parents[2] / "scenarios"


def test_a_budget_that_does_not_wait_after_a_restore_is_caught() -> None:
    """The shipped scenario budget-restore-hold with the server granting at once after the
    restore: the top-up the restore forgot is spent by the register that holds it while
    the two forced offline registers are handed the same room, and the sum outstanding
    passes the budget. The shipped server (which waits) stays within it."""
    text = (SCENARIOS / "budget-restore-hold.toml").read_text()
    body = text.split("[expect]")[0]
    bug = '[[faults]]\nkind = "bug"\nbug = "no_restore_hold"\nat = "0s"\nduration = "6h"\n'
    result = runner.run(loads(body + bug))
    assert result.counters["budget_breaches"] > 0
    assert any(v.startswith("merchant_budget") for v in result.violations)
    honest = runner.run(loads(body))
    assert honest.ok, honest.violations
    assert honest.counters["budget_breaches"] == 0
    # The wait is what kept it: the same run, the same top-up forgotten by the restore.
    assert honest.counters["notice:server_stream_rewritten"] >= 1
    assert honest.counters["budget_peak_minor"] < result.counters["budget_peak_minor"]


def test_a_server_that_ignores_a_push_of_nothing_new_keeps_the_budget_waiting() -> None:
    """The shipped scenario budget-restore-quiet: T3 loses power before the restore and
    starts after it with nothing new to send; its push of its last op is its word that it
    is back. A server that only acks that push waits for T3 to the end of the run (caught
    by ``restore_hold_lifts``); the shipped server waits for nobody at the end."""
    text = (SCENARIOS / "budget-restore-quiet.toml").read_text()
    body = text.split("[expect]")[0]
    bug = '[[faults]]\nkind = "bug"\nbug = "ignore_back_push"\nat = "0s"\nduration = "3h"\n'
    result = runner.run(loads(body + bug))
    assert [v for v in result.violations if v.startswith("restore_hold_lifts")], result.violations
    assert all(v.startswith("restore_hold_lifts") for v in result.violations)
    honest = runner.run(loads(body))
    assert honest.ok, honest.violations
    assert honest.facts.restore_hold == ()
    # The checker's exceptions: a terminal still cut off at the end, or one with no op of
    # its own to send, may still be waited for; a run that never healed is not judged.
    waiting = dataclasses.replace(honest.facts, restore_hold=("T3",))
    assert _hold_violations(waiting) == ["T3"]
    assert _hold_violations(dataclasses.replace(waiting, down_at_end={"T3"})) == []
    assert _hold_violations(dataclasses.replace(waiting, healed_at_ms=None)) == []
    t3 = waiting.terminals["T3"]
    quiet = dataclasses.replace(t3, ops=[op for op in t3.ops if op.origin != "T3"])
    assert _hold_violations(dataclasses.replace(waiting, terminals={"T3": quiet})) == []


def _hold_violations(facts: f.RunFacts) -> list[str]:
    report = checker.check(facts)
    result = next(i for i in report.invariants if i.name == "restore_hold_lifts")
    return [v.split(":")[0] for v in result.violations]
