"""Enrollment-code rules shared by the SQLite and PostgreSQL stores."""

from __future__ import annotations

from typing import Any

import pytest

from syncengine.core.errors import Refused
from syncengine.core.ops import GENESIS
from syncengine.server.model import TerminalInfo
from syncengine.server.store.rules import check_enrollment_code

KEY = b"k" * 32
ENROLLED = TerminalInfo("T1", "m1", KEY, "terminal", True, 0, GENESIS, 0)


def decide(**changes: Any) -> TerminalInfo | None:
    args: dict[str, Any] = {
        "for_terminal": "T1",
        "for_class": "terminal",
        "expires_at_ms": 1_000,
        "used_at_ms": None,
        "used_by": None,
        "existing": None,
        "terminal_id": "T1",
        "public_key": KEY,
        "device_class": "terminal",
        "now_ms": 999,
    }
    args.update(changes)
    return check_enrollment_code(**args)


def test_a_fresh_code_may_enroll() -> None:
    assert decide() is None
    assert decide(for_terminal=None, for_class=None) is None


def test_a_retry_of_the_same_enrollment_returns_the_terminal() -> None:
    assert decide(used_at_ms=5, used_by="T1", existing=ENROLLED) is ENROLLED


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"used_at_ms": 5, "used_by": "T2"}, "enrollment_code_used"),
        (
            {"used_at_ms": 5, "used_by": "T1", "existing": ENROLLED, "public_key": b"x" * 32},
            "enrollment_code_used",
        ),
        ({"now_ms": 1_000}, "enrollment_code_expired"),
        ({"terminal_id": "T9"}, "enrollment_code_other_terminal"),
        ({"device_class": "reader"}, "enrollment_code_other_device_class"),
    ],
)
def test_refusals_name_their_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refused) as info:
        decide(**changes)
    assert info.value.reason == reason
