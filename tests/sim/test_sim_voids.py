"""Voids in chaos workloads: the scenario passes, planted void bugs are caught, the
workload's void keys are validated."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from syncengine.sim import checker, cli, runner
from syncengine.sim import facts as f
from syncengine.sim.scenario import ScenarioError, load, loads

VOIDS = Path(__file__).parents[2] / "scenarios" / "voids.toml"

NEW_REFUND_ID = """
name = "planted-void-new-refund-id"
seed = 5
duration = "1h"
[[terminals]]
count = 2
[workload]
payments_per_hour = 60
standalone = 1.0
void_fraction = 0.5
void_after = "5m"
[[faults]]
kind = "bug"
bug = "void_new_refund_id"
at = "0s"
duration = "1h"
"""

DAY_IN_UTC = """
name = "planted-void-day-in-utc"
seed = 6
duration = "2h"
[merchant]
timezone = "Atlantic/Cape_Verde"
[[terminals]]
count = 3
[workload]
payments_per_hour = 60
standalone = 1.0
void_fraction = 0.5
void_after = "20m"
[[faults]]
kind = "bug"
bug = "void_day_in_utc"
at = "0s"
duration = "2h"
"""


def _failed(result: runner.RunResult) -> set[str]:
    return {inv.name for inv in result.invariants if not inv.ok}


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_voids_scenario_passes(seed: int) -> None:
    result = runner.run(load(VOIDS), seed)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    c = result.counters
    assert c["voided"] > 0 and c["void_refused:refused_rules"] > 0
    assert c["voids_requested"] == c["voided"] + c["void_refused"]
    died = [e for e in result.facts.trace if e.detail == "server died mid-refund"]
    assert died, "the server_crash fault hits a void's refund"


def test_void_refunded_under_a_new_refund_id_is_caught() -> None:
    result = runner.run(loads(NEW_REFUND_ID))
    assert not result.ok
    assert result.counters["voided"] > 0
    assert {"void_once", "void_matches"} <= _failed(result)


def test_void_judged_in_utc_instead_of_the_merchant_day_is_caught() -> None:
    result = runner.run(loads(DAY_IN_UTC))
    assert not result.ok
    assert _failed(result) == {"void_rules"}
    assert any("Atlantic/Cape_Verde" in v for v in result.violations)


def test_the_same_scenarios_pass_without_the_bug() -> None:
    for text, bug in ((NEW_REFUND_ID, "void_new_refund_id"), (DAY_IN_UTC, "void_day_in_utc")):
        sc = loads(text)
        clean = dataclasses.replace(sc, faults=tuple(x for x in sc.faults if x.bug != bug))
        result = runner.run(clean)
        assert result.ok, "\n".join(result.violations + result.expect_failures)
        assert result.counters["voided"] > 0


def test_a_second_refund_of_a_void_is_reported() -> None:
    sc = loads(NEW_REFUND_ID)
    result = runner.run(dataclasses.replace(sc, faults=()))
    assert result.ok, "\n".join(result.violations)
    facts = result.facts
    first = facts.refunds[0]
    facts.refunds.append(dataclasses.replace(first, at_ms=first.at_ms + 1))
    facts.refunds.append(f.RefundEntry("manual-1", first.payment_id, 1, first.at_ms + 2))
    report = checker.check(facts)
    once = next(inv for inv in report.invariants if inv.name == "void_once")
    assert any("used 2 times" in v for v in once.violations)
    assert any("also refunded under manual-1" in v for v in once.violations)
    assert any("refunded" in v and "charged" in v for v in once.violations)


def test_cli_prints_the_replay_command_of_a_void_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "planted.toml"
    path.write_text(NEW_REFUND_ID)
    args = argparse.Namespace(
        scenario_command="run",
        files=[str(path)],
        seed=None,
        seeds=1,
        report=None,
        json=False,
        real=False,
        keep=None,
    )
    assert cli.run(args) == 1
    err = capsys.readouterr().err
    assert f"replay: syncengine scenario run {path} --seed 5" in err
    assert "void_matches" in err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[workload]\nvoid_fraction = 0.1", "needs standalone > 0"),
        ("[workload]\nstandalone = 1.5", r"\[workload\].standalone must be a number in 0.0..1.0"),
        ("[workload]\nstandalone = 0.5\nvoid_fraction = 2", r"void_fraction must be a number"),
        ('[workload]\nstandalone = 0.5\nvoid_fraction = 0.1\nvoid_after = "0"', "positive"),
        ('[workload]\nvoid_after = "2 minutes"', r"\[workload\].void_after: duration"),
        ("[workload]\nvoid_fracton = 0.1", "unknown key"),
        ('[merchant]\ntimezone = "Mars/Olympus"', "not a time zone"),
        ('[[faults]]\nkind = "partition"\nduration = "1m"\ncall = "refund"', "server_crash"),
        ('[[faults]]\nkind = "server_crash"\nduration = "1m"\ncall = "lookup"', "use one of"),
    ],
)
def test_void_keys_are_validated(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        loads(text)


def test_void_keys_parse() -> None:
    sc = loads(
        '[merchant]\ntimezone = "America/New_York"\n'
        '[workload]\nstandalone = 0.4\nvoid_fraction = 0.2\nvoid_after = "90s"\n'
        '[[faults]]\nkind = "server_crash"\nduration = "30s"\ncall = "refund"\n'
    )
    assert sc.merchant.timezone == "America/New_York"
    assert (sc.workload.standalone, sc.workload.void_fraction) == (0.4, 0.2)
    assert sc.workload.void_after_ms == 90_000
    assert sc.faults[0].call == "refund"
    assert loads("").workload.void_fraction == 0.0


def test_the_run_settles_after_the_last_void() -> None:
    """A void asked ``void_after`` after the last payment still gets the whole ``settle``
    window (it once got what was left of it: at 240x in the real tier, milliseconds)."""
    base = 'duration = "1h"\nsettle = "5m"\n'
    plain = loads(base)
    assert plain.end_ms == 3_600_000 + 300_000
    voids = loads(base + '[workload]\nstandalone = 1.0\nvoid_fraction = 0.5\nvoid_after = "20m"\n')
    assert voids.end_ms == 3_600_000 + 1_200_000 + 300_000
    stopped = loads(
        base + '[workload]\nstop = "30m"\nstandalone = 1.0\nvoid_fraction = 0.5\n'
        'void_after = "20m"\n'
    )
    assert stopped.end_ms == 3_600_000 + 300_000  # the last void (50m) comes before 1h
    late_fault = loads(base + '[[faults]]\nkind = "partition"\nat = "55m"\nduration = "30m"\n')
    assert late_fault.end_ms == 85 * 60_000 + 300_000
