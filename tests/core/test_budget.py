"""Merchant-wide escrow budget: the sum outstanding never exceeds the budget, partitioned or not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core.budget import MerchantEscrow, TerminalBudget, fair_share
from syncengine.core.errors import Refused
from syncengine.core.money import Money


def usd(minor: int) -> Money:
    return Money(minor, "USD")


def test_terminal_refuses_beyond_its_rights() -> None:
    budget = TerminalBudget(granted=usd(12_000), used=usd(7_000))
    assert budget.available == usd(5_000)
    budget.check_capture(usd(5_000))
    with pytest.raises(Refused) as info:
        budget.check_capture(usd(5_001))
    assert info.value.reason == "over_merchant_budget"


def test_server_never_grants_past_the_budget() -> None:
    escrow = MerchantEscrow(usd(100_00))
    assert escrow.top_up("T1", usd(60_00)) == usd(60_00)
    assert escrow.top_up("T2", usd(60_00)) == usd(40_00)  # only what is free
    assert escrow.top_up("T3", usd(1)) is None
    escrow.release("T1", usd(30_00))
    escrow.release("T1", usd(10_00))  # an older, smaller release changes nothing
    assert escrow.top_up("T3", usd(50_00)) == usd(30_00)
    assert escrow.committed() == usd(100_00)


def test_fair_share_rounds_down() -> None:
    assert fair_share(usd(100), ["a", "b", "c"]) == usd(33)


# One step of a fleet: a grant delivered (or not), a capture, a final outcome.
step = st.tuples(
    st.sampled_from(["grant", "deliver", "capture", "final", "partition", "heal"]),
    st.integers(0, 3),
    st.integers(1, 4_000),
)


@settings(max_examples=300)
@given(st.lists(step, max_size=120))
def test_outstanding_across_partitioned_terminals_never_exceeds_budget(
    steps: list[tuple[str, int, int]],
) -> None:
    budget = usd(10_000)
    escrow = MerchantEscrow(budget)
    terminals = [f"T{i}" for i in range(4)]
    # What each terminal has *received* of its grants (a grant may be in flight).
    delivered = {t: usd(0) for t in terminals}
    in_flight: dict[str, Money] = {}
    used = {t: usd(0) for t in terminals}
    released = {t: usd(0) for t in terminals}
    pending: dict[str, list[Money]] = {t: [] for t in terminals}
    partitioned: set[str] = set()
    for action, index, amount in steps:
        t = terminals[index]
        if action == "grant":
            new_total = escrow.top_up(t, usd(amount))
            if new_total is not None:
                in_flight[t] = new_total
        elif action == "deliver" and t in in_flight and t not in partitioned:
            delivered[t] = delivered[t].max(in_flight.pop(t))
        elif action == "capture":
            view = TerminalBudget(delivered[t], used[t])
            try:
                view.check_capture(usd(amount))
            except Refused:
                continue
            used[t] = used[t] + usd(amount)
            pending[t].append(usd(amount))
        elif action == "final" and pending[t] and t not in partitioned:
            released[t] = released[t] + pending[t].pop(0)
            escrow.release(t, released[t])
            # The server hands the released room back by raising the cumulative grant.
            new_total = escrow.top_up(t, escrow.held(t) + usd(amount))
            if new_total is not None:
                in_flight[t] = new_total
        elif action == "partition":
            partitioned.add(t)
        elif action == "heal":
            partitioned.discard(t)
        outstanding = sum((used[x] - released[x]).minor for x in terminals)
        assert outstanding <= budget.minor
        escrow.check()
