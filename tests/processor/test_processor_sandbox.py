"""Unit tests of the pure sandbox ledger (syncengine.processor.sandbox)."""

from __future__ import annotations

import ast
import dataclasses
import os
import random
from pathlib import Path

import pytest

import syncengine.processor.sandbox as sandbox_module
from syncengine.core.crypto import (
    CardData,
    b64e,
    card_aad,
    luhn_ok,
    seal_card,
    x25519_public_from_private,
)
from syncengine.core.errors import ConfigError, InvariantViolation, ProtocolError, Refused
from syncengine.core.money import Money
from syncengine.processor.api import (
    ChargeRequest,
    IdempotencyConflict,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundRequest,
)
from syncengine.processor.sandbox import (
    TEST_CARDS,
    Faults,
    LedgerCharge,
    LedgerRefund,
    SandboxCore,
    audit_entries,
    entry_from_wire,
    entry_to_wire,
)

KEY = bytes(range(1, 33))
OTHER_KEY = bytes(range(2, 34))
NOW_MS = 1_700_000_000_000


def sealed(pan: str, payment_id: str, key: bytes = KEY) -> str:
    envelope = seal_card(
        x25519_public_from_private(key),
        CardData(pan, 12, 2030),
        ephemeral_private=os.urandom(32),
        nonce=os.urandom(12),
        aad=card_aad(payment_id),
    )
    return b64e(envelope)


def charge_request(
    payment_id: str = "pay-1", pan: str = "4242424242424242", minor: int = 1250, **kw: object
) -> ChargeRequest:
    fields: dict[str, object] = {
        "payment_id": payment_id,
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "amount": Money(minor, "USD"),
        "sealed_card": sealed(pan, payment_id),
        "channel": "offline",
        "captured_at_ms": NOW_MS - 60_000,
    }
    fields.update(kw)
    return ChargeRequest(**fields)  # type: ignore[arg-type]


EXPECTED = [
    ("4242424242424242", "approved", "approved"),
    ("5555555555554444", "approved", "approved"),
    ("378282246310005", "approved", "approved"),
    ("6011111111111117", "approved", "approved"),
    ("4111111111111111", "approved", "approved"),  # any other Luhn-valid number
    ("4000000000000002", "declined", "card_declined"),
    ("4000000000009995", "declined", "insufficient_funds"),
    ("4000000000009987", "declined", "lost_card"),
    ("4000000000009979", "declined", "stolen_card"),
    ("4000000000000069", "declined", "expired_card"),
]


@pytest.mark.parametrize(("pan", "outcome", "code"), EXPECTED)
def test_test_cards_choose_the_outcome(pan: str, outcome: str, code: str) -> None:
    core = SandboxCore(KEY)
    result = core.charge(charge_request(pan=pan), NOW_MS)
    assert (result.outcome, result.code, result.processed_at_ms) == (outcome, code, NOW_MS)
    [entry] = core.charges_for("pay-1")
    assert (entry.outcome, entry.card_last4, entry.at_ms) == (outcome, pan[-4:], NOW_MS)
    assert pan not in repr(entry) and pan not in str(entry_to_wire(entry))


def test_brands_are_recorded() -> None:
    core = SandboxCore(KEY)
    for i, (pan, brand) in enumerate(
        [
            ("4242424242424242", "visa"),
            ("5555555555554444", "mastercard"),
            ("2223003122003222", "mastercard"),
            ("378282246310005", "amex"),
            ("6011111111111117", "discover"),
        ]
    ):
        core.charge(charge_request(f"p{i}", pan), NOW_MS)
        assert core.charges_for(f"p{i}")[0].card_brand == brand


def test_transient_card_raises_unavailable_and_charges_nothing() -> None:
    core = SandboxCore(KEY)
    with pytest.raises(ProcessorUnavailable, match="processing_error"):
        core.charge(charge_request(pan="4000000000000119"), NOW_MS)
    assert core.ledger() == [] and core.lookup("pay-1") is None


@pytest.mark.parametrize(
    "sealed_card",
    [
        sealed("4242424242424242", "pay-1", OTHER_KEY),
        sealed("4242424242424242", "pay-2"),
        "!!",
        "AAAA",
    ],
    ids=["wrong-key", "other-payment", "not-base64", "garbage"],
)
def test_a_card_that_does_not_open_is_declined(sealed_card: str) -> None:
    core = SandboxCore(KEY)
    result = core.charge(charge_request(sealed_card=sealed_card), NOW_MS)
    assert (result.outcome, result.code) == ("declined", "invalid_card_data")
    assert core.charges_for("pay-1")[0].card_last4 == ""


def test_same_key_same_request_charges_once() -> None:
    core = SandboxCore(KEY)
    request = charge_request()
    first = core.charge(request, NOW_MS)
    again = core.charge(request, NOW_MS + 5_000)
    assert again == first and first.processed_at_ms == NOW_MS
    assert len(core.charges_for("pay-1")) == 1 and core.entry_count == 1
    assert core.audit().duplicate_charges == {}


def test_declines_are_final_under_their_key() -> None:
    core = SandboxCore(KEY)
    request = charge_request(pan="4000000000009995")
    assert core.charge(request, NOW_MS) == core.charge(request, NOW_MS + 1)
    assert core.entry_count == 1


@pytest.mark.parametrize(
    "change",
    [
        {"minor": 1251},
        {"terminal_id": "t-2"},
        {"channel": "standalone"},
        {"captured_at_ms": 1},
        {"pan": "5555555555554444"},
    ],
)
def test_different_request_under_a_used_key_conflicts(change: dict[str, object]) -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request(), NOW_MS)
    with pytest.raises(IdempotencyConflict):
        core.charge(charge_request(**change), NOW_MS)  # type: ignore[arg-type]
    assert core.entry_count == 1


def test_outage_raises_unavailable_for_every_call_and_changes_nothing() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request(), NOW_MS)
    core.set_faults(Faults(outage=True))
    with pytest.raises(ProcessorUnavailable):
        core.charge(charge_request("pay-2"), NOW_MS)
    with pytest.raises(ProcessorUnavailable):
        core.lookup("pay-1")
    with pytest.raises(ProcessorUnavailable):
        core.refund(RefundRequest("pay-1", "r-1", Money(100, "USD")), NOW_MS)
    assert core.entry_count == 1
    core.set_faults(Faults())
    assert core.charge(charge_request("pay-2"), NOW_MS).outcome == "approved"


def test_outcome_unknown_next_commits_then_loses_the_answer() -> None:
    core = SandboxCore(KEY)
    core.set_faults(Faults(outcome_unknown_next=2))
    request = charge_request()
    with pytest.raises(OutcomeUnknown):
        core.charge(request, NOW_MS)
    assert core.faults.outcome_unknown_next == 1
    found = core.lookup("pay-1")
    assert found is not None and found.outcome == "approved"
    with pytest.raises(OutcomeUnknown):  # a retry's answer can be lost too, but not re-charged
        core.charge(request, NOW_MS + 1)
    assert core.charge(request, NOW_MS + 2) == found
    assert len(core.charges_for("pay-1")) == 1


def test_outcome_unknown_probability_uses_the_injected_chance() -> None:
    draws = iter([0.10, 0.30, 0.20])
    core = SandboxCore(KEY, chance=lambda: next(draws))
    core.set_faults(Faults(outcome_unknown_ppm=250_000))  # 25 %
    with pytest.raises(OutcomeUnknown):
        core.charge(charge_request("a"), NOW_MS)
    assert core.charge(charge_request("b"), NOW_MS).outcome == "approved"
    with pytest.raises(OutcomeUnknown):
        core.charge(charge_request("c"), NOW_MS)
    assert core.entry_count == 3


def test_seeded_chance_is_reproducible() -> None:
    def run(seed: int) -> list[bool]:
        core = SandboxCore(KEY, chance=random.Random(seed).random)
        core.set_faults(Faults(outcome_unknown_ppm=500_000))
        lost = []
        for i in range(20):
            try:
                core.charge(charge_request(f"p{i}"), NOW_MS)
                lost.append(False)
            except OutcomeUnknown:
                lost.append(True)
        return lost

    assert run(7) == run(7) and any(run(7)) and not all(run(7))


def test_probability_without_a_chance_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="chance"):
        SandboxCore(KEY).set_faults(Faults(outcome_unknown_ppm=1))


@pytest.mark.parametrize(
    "changes",
    [
        {"latency_ms": -1},
        {"latency_ms": 60_001},
        {"outage": 1},
        {"outcome_unknown_ppm": 1_000_001},
        {"outcome_unknown_mode": "close"},
        {"nonsense": True},
        {"outcome_unknown_next": 1.0},
    ],
)
def test_faults_are_validated(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Faults().updated(changes)


def test_refund_rules() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request(minor=1000), NOW_MS)
    core.charge(charge_request("declined", pan="4000000000009995"), NOW_MS)
    first = core.refund(RefundRequest("pay-1", "r-1", Money(600, "USD")), NOW_MS + 1)
    assert first.amount == Money(600, "USD") and first.processed_at_ms == NOW_MS + 1
    # Idempotent by refund id.
    assert core.refund(RefundRequest("pay-1", "r-1", Money(600, "USD")), NOW_MS + 9) == first
    with pytest.raises(IdempotencyConflict):
        core.refund(RefundRequest("pay-1", "r-1", Money(500, "USD")), NOW_MS)
    reasons = {}
    for request in [
        RefundRequest("pay-1", "r-2", Money(401, "USD")),
        RefundRequest("pay-1", "r-3", Money(400, "CAD")),
        RefundRequest("declined", "r-4", Money(1, "USD")),
        RefundRequest("nobody", "r-5", Money(1, "USD")),
    ]:
        with pytest.raises(Refused) as info:
            core.refund(request, NOW_MS)
        reasons[request.refund_id] = info.value.reason
    assert reasons == {
        "r-2": "refund_exceeds_amount",
        "r-3": "currency_mismatch",
        "r-4": "charge_not_approved",
        "r-5": "charge_not_found",
    }
    core.refund(RefundRequest("pay-1", "r-6", Money(400, "USD")), NOW_MS)
    assert sum(r.amount.minor for r in core.refunds_for("pay-1")) == 1000
    with pytest.raises(Refused, match="left to refund"):
        core.refund(RefundRequest("pay-1", "r-7", Money(1, "USD")), NOW_MS)
    assert core.audit().ok and core.audit().refunds_count == 2


@pytest.mark.parametrize(
    "change",
    [
        {"amount": Money(0, "USD")},
        {"amount": Money(-5, "USD")},
        {"payment_id": ""},
        {"merchant_id": "x" * 129},
        {"channel": "keyed"},
        {"captured_at_ms": -1},
    ],
)
def test_malformed_requests_are_protocol_errors(change: dict[str, object]) -> None:
    request = dataclasses.replace(charge_request(), **change)  # type: ignore[arg-type]
    core = SandboxCore(KEY)
    with pytest.raises(ProtocolError):
        core.charge(request, NOW_MS)
    assert core.ledger() == []


def test_ledger_rebuilds_from_its_entries_and_round_trips_through_json() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request("a"), NOW_MS)
    core.charge(charge_request("b", pan="4000000000009979"), NOW_MS)
    core.refund(RefundRequest("a", "r", Money(5, "USD")), NOW_MS)
    copied = [entry_from_wire(entry_to_wire(e)) for e in core.entries_since(0)]
    assert copied == core.ledger()
    rebuilt = SandboxCore(KEY, entries=copied)
    assert rebuilt.lookup("b") == core.lookup("b")
    assert rebuilt.charge(charge_request("c"), NOW_MS).processor_ref == "ch_0000000004"
    assert rebuilt.entries_since(3) == [rebuilt.ledger()[3]]


def test_rebuilding_refuses_an_inconsistent_ledger() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request("a"), NOW_MS)
    [entry] = core.ledger()
    with pytest.raises(InvariantViolation):
        SandboxCore(KEY, entries=[entry, entry])  # a duplicate charge


def test_entry_from_wire_refuses_tampered_rows() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request("a"), NOW_MS)
    good = entry_to_wire(core.ledger()[0])
    for bad in [{**good, "at_ms": "1"}, {**good, "extra": 1}, {**good, "kind": "x"}, []]:
        with pytest.raises(ProtocolError):
            entry_from_wire(bad)


def test_audit_counts_duplicates_and_over_refunds() -> None:
    core = SandboxCore(KEY)
    core.charge(charge_request("a", minor=100), NOW_MS)
    [charge] = core.ledger()
    assert isinstance(charge, LedgerCharge)
    twice = dataclasses.replace(charge, position=2)
    refund = LedgerRefund(3, "r", "a", Money(150, "USD"), "re_3", NOW_MS)
    orphan = LedgerRefund(4, "r2", "zzz", Money(1, "USD"), "re_4", NOW_MS)
    audit = audit_entries([charge, twice, refund, orphan])
    assert audit.duplicate_charges == {"a": 2}
    assert audit.over_refunded == ("a",)
    assert audit.refunds_without_approval == ("r2",)
    assert not audit.ok


def test_ledger_is_bounded() -> None:
    core = SandboxCore(KEY, ledger_entries_max=1)
    core.charge(charge_request("a"), NOW_MS)
    with pytest.raises(ProcessorUnavailable, match="full"):
        core.charge(charge_request("b"), NOW_MS)


def test_test_card_table_is_luhn_valid_and_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "processor.md").read_text()
    for pan, rule in TEST_CARDS.items():
        assert luhn_ok(pan), pan
        assert pan in doc and rule.code in doc, pan


def test_sandbox_is_sans_io() -> None:
    tree = ast.parse(Path(sandbox_module.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    forbidden = {"asyncio", "sqlite3", "socket", "time", "random", "uuid", "os", "datetime"}
    assert imported & forbidden == set()


def test_a_pruned_idempotency_key_charges_again_and_the_audit_says_so() -> None:
    """``idempotency_window_ms``: inside the window a retry gets the first answer; from
    the window on the same request is a second charge (what a processor that prunes keys
    does), the audit reports the duplicate, and a lookup finds the latest charge."""
    day_ms = 24 * 3_600_000
    core = SandboxCore(KEY)
    core.set_faults(Faults(idempotency_window_ms=day_ms))
    request = charge_request()
    first = core.charge(request, NOW_MS)
    assert core.charge(request, NOW_MS + day_ms - 1) == first
    assert core.entry_count == 1 and core.audit().duplicate_charges == {}
    second = core.charge(request, NOW_MS + day_ms)
    assert second.processed_at_ms == NOW_MS + day_ms and second != first
    assert core.entry_count == 2 and core.audit().duplicate_charges == {"pay-1": 2}
    assert core.lookup("pay-1") == second
    rebuilt = SandboxCore(KEY, entries=core.ledger())  # a restart keeps both
    assert rebuilt.audit().duplicate_charges == {"pay-1": 2}
    with pytest.raises(ConfigError):
        Faults(idempotency_window_ms=-1)
