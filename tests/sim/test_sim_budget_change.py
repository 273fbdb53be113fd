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


def test_after_a_lower_budget_the_bound_falls_as_payments_are_released() -> None:
    """The checker's bound after a lowering: rights granted before it may still be spent,
    but each release gives back rights as large as the payment and the server grants
    nothing above the new budget; so the bound is the new budget or what is left of the
    old one, whichever is larger. A raise counts at once."""

    def facts(*events: tuple[str, str, int]) -> f.RunFacts:
        trace = []
        for i, (kind, pid, value) in enumerate(events):
            detail = "approved" if kind == f.STATUS else ""
            trace.append(f.TraceEvent(i, kind, "T1", pid, value, detail))
        out = f.RunFacts("t", 1, 0, len(events), "USD", 0, trace=trace)
        out.offline_budget_minor = 100
        return out

    def breaches(run: f.RunFacts) -> int:
        return checker.check(run).counters["budget_breaches"]

    lowered = [
        (f.APPROVED_OFFLINE, "a", 80),
        (f.BUDGET, "", 50),
        (f.APPROVED_OFFLINE, "b", 10),  # 90 out: within the rights granted before
    ]
    assert breaches(facts(*lowered)) == 0
    released = [*lowered, (f.STATUS, "a", 0)]  # 10 out; what is left of 100 is 20
    assert breaches(facts(*released, (f.APPROVED_OFFLINE, "c", 40))) == 0  # 50 = budget
    assert breaches(facts(*released, (f.APPROVED_OFFLINE, "c", 41))) == 1  # 51 > 50
    # Without the release, 90 + 10 is within what the old budget granted.
    assert breaches(facts(*lowered, (f.APPROVED_OFFLINE, "c", 10))) == 0
    assert breaches(facts(*lowered, (f.APPROVED_OFFLINE, "c", 11))) == 1
    # A second release of the same payment gives nothing back twice.
    twice = [*released, (f.STATUS, "a", 0), (f.APPROVED_OFFLINE, "c", 41)]
    assert breaches(facts(*twice)) == 1
    # A raise after the lowering: its budget at once.
    raised = [*released, (f.BUDGET, "", 70), (f.APPROVED_OFFLINE, "c", 60)]
    assert breaches(facts(*raised)) == 0
    assert breaches(facts(*raised, (f.APPROVED_OFFLINE, "d", 1))) == 1


def test_a_server_that_grants_on_the_old_budget_after_a_lowering_is_caught() -> None:
    """budget-change with the server planning on the highest budget ever set: after the
    lowering to $150 it re-grants released room as if $500 still held, and the sum
    outstanding passes what the checker allows (still below $500: a bound of the highest
    budget alone would not see it). The shipped server stays within the falling bound."""
    text = (SCENARIOS / "budget-change.toml").read_text()
    body = text.split("[expect]")[0]
    bug = '[[faults]]\nkind = "bug"\nbug = "ignore_lower_budget"\nat = "0s"\nduration = "8h"\n'
    result = runner.run(loads(body + bug))
    assert result.counters["budget_breaches"] > 0
    assert all(v.startswith("merchant_budget") for v in result.violations), result.violations
    assert result.counters["budget_peak_minor"] <= 50_000
    honest = runner.run(loads(body))
    assert honest.ok, honest.violations
