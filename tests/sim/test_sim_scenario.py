"""Scenario parsing and validation: durations, keys, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from syncengine.sim.scenario import (
    EXPECT_COUNTERS,
    ScenarioError,
    format_duration_ms,
    load,
    loads,
    parse_duration_ms,
)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("90s", 90_000),
        ("30m", 1_800_000),
        ("1h30m", 5_400_000),
        ("2d", 172_800_000),
        ("250ms", 250),
        ("1h0m5s", 3_605_000),
        ("0", 0),
    ],
)
def test_durations_parse(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "90", "1.5h", "30m1h", "1h1h", "h", "-5m", "5 m", "31d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ScenarioError):
        parse_duration_ms(text)


def test_negative_offset_allowed_where_asked() -> None:
    assert parse_duration_ms("-7m", allow_negative=True) == -420_000
    assert format_duration_ms(5_400_000) == "1h30m"


def test_issue_example_parses() -> None:
    sc = loads(
        """
name = "store-outage"
seed = 7
duration = "30h"
[merchant]
region = "US"
currency = "USD"
offline_allowed = true
offline_entry = "auto"
auto_after = "60s"
per_transaction_limit = "5000.00"
total_limit = "50000.00"
[[terminals]]
count = 3
id_prefix = "T"
device_class = "terminal"
[workload]
payments_per_hour = 30
amount_min = "1.00"
amount_max = "300.00"
cards = { visa = 0.6, mastercard = 0.3, amex = 0.05, interac = 0.05 }
entry = { tap = 0.7, insert = 0.3 }
decline_rate = 0.02
emails = 0.5
[[faults]]
kind = "partition"
at = "1h"
duration = "20h"
targets = ["T1", "T2"]
[[faults]]
kind = "clock_skew"
at = "2h"
offset = "-7m"
[expect]
lost = 0
duplicate_charges = 0
limit_breaches = 0
"""
    )
    assert [t.id for t in sc.terminals] == ["T1", "T2", "T3"]
    assert sc.merchant.total_limit_minor == 5_000_000
    assert sc.duration_ms == 30 * 3_600_000
    assert sc.faults[0].targets == ("T1", "T2")
    assert sc.faults[1].offset_ms == -420_000
    assert sc.merchant.operator_delay_ms == 30_000


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('duration = "1h"\ncolour = 1', "unknown key"),
        ("[merchant]\ntotal_limit = 50000.0", "decimal string"),
        ('[merchant]\ntotal_limit = "60000.00"', "total_limit"),
        ('[merchant]\noffline_entry = "maybe"', "offline_entry"),
        (
            '[[terminals]]\nid = "T1"\n[[faults]]\nkind = "partition"\nat = "1h"\nduration = "1h"\ntargets = ["T9"]',
            "T9",
        ),
        ('[[faults]]\nkind = "meteor"\nat = "1h"', "kind"),
        ('[[faults]]\nkind = "partition"\nat = "1h"', "duration"),
        ("[workload]\ncards = { diners = 1.0 }", "diners"),
        ('[[terminals]]\nid = "T1"\n[[terminals]]\nid = "T1"', "repeat"),
        ('[[faults]]\nkind = "budget_change"\nat = "1h"\nto = "5.00"', "offline_budget"),
        (
            '[merchant]\noffline_budget = "1.00"\n[[faults]]\nkind = "budget_change"\nat = "1h"',
            'to = "600.00"',
        ),
        (
            '[merchant]\noffline_budget = "1.00"\n[[faults]]\nkind = "budget_change"\n'
            'at = "1h"\nto = "5.00"\nduration = "1h"',
            "no duration",
        ),
        (
            '[merchant]\noffline_budget = "1.00"\n[[faults]]\nkind = "budget_change"\n'
            'at = "1h"\nto = 5.0',
            "decimal string",
        ),
        (
            '[[faults]]\nkind = "partition"\nat = "1h"\nduration = "1h"\nto = "5.00"',
            "budget_change",
        ),
    ],
)
def test_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        loads(text, "x.toml")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[expect]\nduplicate_charge = 0", r"\[expect\].duplicate_charge: unknown counter"),
        ("[expect]\napproved_offline_mni = 1", "approved_offline_mni"),
        ('[expect]\n"refused:" = 1', "refused:<reason>"),
        ("[expect]\nvoided_minimum = 1", "voided_minimum"),
        ('duration = "1h"\n[workload]\nstart = "2h"', r"start \(2h\) is after the end of duration"),
        ('[workload]\nstart = "40m"\nstop = "30m"', r"start \(40m\) is after stop \(30m\)"),
        ('duration = "1h"\n[workload]\nstop = "2h"', r"stop \(2h\) is after the end of duration"),
        (
            'duration = "1h"\n[[faults]]\nkind = "partition"\nat = "61m"\nduration = "5m"',
            r"\[\[faults\]\] #1 \(partition\): at = 1h1m is after the end of the scenario "
            r"\(duration = 1h\)",
        ),
        ('name = "a/b"', "without '/'"),
        ('name = "a\\u0000b"', "control characters"),
        (f'name = "{"x" * 201}"', "longer than 200 bytes"),
    ],
)
def test_more_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        loads(text, "x.toml")


def test_expect_accepts_every_counter_form() -> None:
    sc = loads(
        "[expect]\nlost = 0\napproved_offline_min = 1\nbudget_peak_minor_max = 5\n"
        '"refused:offline_window_closed_min" = 1\n"notice:server_behind" = 0\n'
        '"void_refused:refused_rules_min" = 1\n"void_declined_locally:not_same_day_max" = 2\n'
        "faults_skipped = 0\n"
    )
    assert sc.expect["approved_offline_min"] == 1
    # the window edges are allowed: start = stop (no payment), a fault at the very end
    assert loads('duration = "1h"\n[workload]\nstart = "1h"').workload.start_ms == 3_600_000
    fault = '[[faults]]\nkind = "crash"\nat = "1h"\n'
    assert loads('duration = "1h"\n' + fault).faults[0].at_ms == 3_600_000


def test_expect_counters_cover_what_the_checker_counts() -> None:
    """A counter the checker (or the real tier) adds must be allowed in ``[expect]``."""
    root = Path(__file__).parents[2] / "syncengine" / "sim"
    source = (root / "checker.py").read_text() + (root / "real.py").read_text()
    names = set(re.findall(r'(?:\bc|counters)(?:\[|\.get\(|\.setdefault\()"([a-z_]+)"', source))
    assert {"lost", "budget_breaches", "voided", "faults_skipped"} <= names
    assert names <= EXPECT_COUNTERS


def test_empty_or_undecodable_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("\n# nothing here\n")
    with pytest.raises(ScenarioError, match=f"^{re.escape(str(empty))} is empty"):
        load(empty)
    noise = tmp_path / "noise.toml"
    noise.write_bytes(b'name = "x"\n\xff\xfe')
    with pytest.raises(ScenarioError, match="not a UTF-8 text file"):
        load(noise)
    assert loads("").duration_ms == 3_600_000  # text (not a file) may still be empty


def test_every_shipped_scenario_still_loads() -> None:
    root = Path(__file__).parents[2]
    paths = sorted((root / "scenarios").glob("*.toml")) + sorted(
        (root / "tests" / "sim").glob("real-*.toml")
    )
    assert len(paths) > 20
    for path in paths:
        load(path)
