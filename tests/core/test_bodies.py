"""Op bodies: typed, validated before anything uses them."""

from __future__ import annotations

from typing import Any

import pytest

from syncengine.core.bodies import (
    Capture,
    CardInfo,
    Dispute,
    Grant,
    ModeChange,
    RefundRecord,
    Setting,
    StatusChange,
    VoidRequest,
    parse_body,
)
from syncengine.core.errors import ProtocolError
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.core.ops import Op

CARD = CardInfo("visa", "4242", "insert", "c2VhbGVk", ("eftpos",))
CAPTURE = Capture(
    "p-1", "m-1", Money(1250, "USD"), "offline", CARD, 1_000, 86_401_000, "terminal", "a@b.co"
)


@pytest.mark.parametrize(
    ("kind", "origin", "body"),
    [
        ("capture", "T1", CAPTURE),
        ("mode", "T1", ModeChange("online", "offline", "auto_after_delay", 5)),
        ("void_request", "T1", VoidRequest("p-1", 9)),
        ("status", "server/T1", StatusChange("p-1", Status.APPROVED, 7, "approved", "")),
        ("refund", "server/T1", RefundRecord("p-1", "r-1", Money(50, "USD"), 8)),
        ("setting", "server/T1", Setting("per_transaction_limit", {"minor": 1, "currency": "USD"})),
        ("grant", "server/T1", Grant(Money(5_000_000, "USD"), 3)),
        ("dispute", "server/T1", Dispute("p-1", True, 4)),
    ],
)
def test_round_trip_through_an_op(kind: str, origin: str, body: Any) -> None:
    op = Op(origin, 1, Hlc(1), kind, body.to_body())
    assert parse_body(op) == body


def capture_body(**changes: Any) -> dict[str, Any]:
    body = CAPTURE.to_body()
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "body",
    [
        capture_body(amount={"minor": 0, "currency": "USD"}),
        capture_body(amount={"minor": -5, "currency": "USD"}),
        capture_body(amount={"minor": 5, "currency": "ZZZ"}),
        capture_body(channel="carrier-pigeon"),
        capture_body(email="not an email"),
        capture_body(card={**CARD.to_body(), "last4": "42"}),
        capture_body(card={**CARD.to_body(), "pan": "4242424242424242"}),
        capture_body(card={**CARD.to_body(), "entry_method": "telepathy"}),
        capture_body(captured_at_ms=-1),
        capture_body(extra=1),
        {k: v for k, v in CAPTURE.to_body().items() if k != "payment_id"},
    ],
)
def test_bad_capture_bodies_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_body(Op("T1", 1, Hlc(1), "capture", body))


def test_unknown_status_refused() -> None:
    body = StatusChange("p", Status.APPROVED, 1).to_body() | {"status": "charged_twice"}
    with pytest.raises(ProtocolError, match="unknown status"):
        parse_body(Op("server/T1", 1, Hlc(1), "status", body))
