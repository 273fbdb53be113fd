"""The ``budget_change`` fault: the owner's PUT of the merchant's offline budget mid-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from syncengine.sim import checker, runner
from syncengine.sim import facts as f
from syncengine.sim.scenario import load, loads

SCENARIOS = Path(__file__).parents[2] / "scenarios"


def test_a_raise_is_spent_and_the_checker_holds_the_run_to_it() -> None:
    """budget-change raises $200 to $500 then lowers it to $150: the terminals spend more
    than the first budget (the raise reached them), and the same facts without the
    raise recorded are a breach (the checker bound follows the budget the owner set)."""
    result = runner.run(load(SCENARIOS / "budget-change.toml"))
    assert result.ok, result.violations
    budgets = [e.value for e in result.facts.trace if e.kind == f.BUDGET]
    assert budgets == [50_000, 15_000]
    peak = result.counters["budget_peak_minor"]
    assert 20_000 < peak <= 50_000
    unraised = dataclasses.replace(
        result.facts, trace=[e for e in result.facts.trace if e.kind != f.BUDGET]
    )
    report = checker.check(unraised)
    assert report.counters["budget_breaches"] > 0
    assert not next(i for i in report.invariants if i.name == "merchant_budget").ok


CRASHED = """
name = "budget-while-down"
seed = 5
duration = "2h"
[merchant]
offline_budget = "100.00"
[[terminals]]
count = 2
id_prefix = "T"
device_class = "register"
[workload]
payments_per_hour = 30
[[faults]]
kind = "server_crash"
at = "10m"
duration = "20m"
[[faults]]
kind = "budget_change"
at = "15m"
to = "250.00"
"""


def test_a_change_while_the_server_is_down_takes_effect_when_it_is_back() -> None:
    result = runner.run(loads(CRASHED))
    assert result.ok, result.violations
    trace = result.facts.trace
    restart = next(e.at_ms for e in trace if e.kind == f.RESTART and e.detail == "server")
    (change,) = [e for e in trace if e.kind == f.BUDGET]
    assert change.value == 25_000
    assert change.at_ms == restart  # not at 15m, while nothing answered
