"""Scenario parsing and validation: durations, keys, clear errors."""

from __future__ import annotations

import pytest

from syncengine.sim.scenario import ScenarioError, format_duration_ms, loads, parse_duration_ms


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
