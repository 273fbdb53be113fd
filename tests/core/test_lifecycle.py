"""Payment lifecycle: one table, a lattice join, status never moves backwards."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import InvalidState, InvariantViolation, Refused
from syncengine.core.lifecycle import (
    FINAL,
    RANK,
    REFUND_WINDOW_MS,
    TRANSITIONS,
    RefundState,
    Status,
    can_move,
    check_refund,
    join,
    join_all,
    transition,
)
from syncengine.core.money import Money

DAY_MS = 24 * 3600 * 1000


def test_table_covers_every_status_and_finals_are_terminal() -> None:
    assert set(TRANSITIONS) == set(Status)
    for status in FINAL:
        assert TRANSITIONS[status] == frozenset()
    for source, targets in TRANSITIONS.items():
        for target in targets:
            assert RANK[target] > RANK[source]  # every move goes forward


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Status.APPROVED, Status.CAPTURED),
        (Status.FORWARDING, Status.CAPTURED),
        (Status.OFFLINE_DECLINED, Status.APPROVED),  # seed 002 NX: "no retry mechanism"
        (Status.EXPIRED, Status.APPROVED),  # seed 004 Square: an expired payment is a loss
    ],
)
def test_backward_and_sideways_moves_are_refused(source: Status, target: Status) -> None:
    assert not can_move(source, target)
    with pytest.raises(InvalidState):
        transition(source, target)


# A single writer produces at most one final per payment: a chain captured -> ... -> final.
single_writer_histories = st.sampled_from(sorted(FINAL)).flatmap(
    lambda final: st.lists(st.sampled_from([Status.CAPTURED, Status.FORWARDING, final]), max_size=8)
)


@given(single_writer_histories, st.randoms())
def test_join_ignores_arrival_order_and_never_regresses(history: list[Status], rnd: object) -> None:
    shuffled = list(history)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert join_all(history) == join_all(shuffled)
    running = Status.CAPTURED
    for status in shuffled:
        nxt = join(running, status)
        assert RANK[nxt] >= RANK[running]
        assert can_move(running, nxt)
        running = nxt


@given(st.sampled_from(list(Status)), st.sampled_from(list(Status)), st.sampled_from(list(Status)))
def test_join_laws(a: Status, b: Status, c: Status) -> None:
    try:
        assert join(a, b) == join(b, a)
        assert join(join(a, b), c) == join(a, join(b, c))
        assert join(a, a) == a
    except InvariantViolation:
        finals = {a, b, c} & FINAL
        assert len(finals) > 1  # only two different finals may conflict


def test_two_finals_are_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        join(Status.APPROVED, Status.EXPIRED)


def usd(text: str) -> Money:
    return Money.parse(text, "USD")


def refund_ok(**kw: object) -> None:
    args: dict[str, object] = {
        "status": Status.APPROVED,
        "refunds": RefundState(usd("100.00")),
        "amount": usd("10.00"),
        "processed_at_ms": 0,
        "now_ms": DAY_MS,
        "dispute_open": False,
    }
    args.update(kw)
    check_refund(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        # seed 000: offline payments can't be refunded before connectivity returns
        ({"status": Status.CAPTURED}, "not_processed"),
        ({"status": Status.FORWARDING}, "not_processed"),
        ({"status": Status.OFFLINE_DECLINED}, "not_approved"),
        ({"now_ms": REFUND_WINDOW_MS + 1}, "refund_window_passed"),  # seed 003: 90 days
        ({"dispute_open": True}, "dispute_open"),  # seed 003: not during a chargeback
        (
            {"refunds": RefundState(usd("100.00"), {"r1": usd("100.00")})},
            "fully_refunded",
        ),
        ({"amount": usd("100.01")}, "exceeds_remaining"),
        ({"card_present_required": True}, "card_not_present"),  # seed 003: card present
        ({"amount": Money(0, "USD")}, "invalid_amount"),
    ],
)
def test_refund_rules(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(Refused) as info:
        refund_ok(**overrides)
    assert info.value.reason == reason


def test_partial_refunds_up_to_amount() -> None:
    refund_ok()
    state = RefundState(usd("100.00")).add("r1", usd("60.00")).add("r1", usd("60.00"))
    assert state.remaining == usd("40.00")
    refund_ok(refunds=state, amount=usd("40.00"))
    with pytest.raises(InvariantViolation):
        state.add("r2", usd("40.01"))


@given(st.lists(st.integers(1, 5_000), max_size=30))
def test_refund_sum_never_exceeds_amount(amounts: list[int]) -> None:
    state = RefundState(Money(20_000, "USD"))
    for i, minor in enumerate(amounts):
        value = Money(minor, "USD")
        if value <= state.remaining:
            state = state.add(f"r{i}", value)
        else:
            with pytest.raises(InvariantViolation):
                state.add(f"r{i}", value)
    assert state.refunded <= state.amount
