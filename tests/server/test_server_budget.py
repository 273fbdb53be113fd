"""The merchant-wide offline budget on the server: the grant planner and the SQLite store.

The property test plays terminals that obey their grant (as ``TerminalMachine.grant_room``
does), a server that only learns of captures when a terminal syncs, partitions that stop
grants from arriving, finals, re-grants and budget changes in random order: the sum of
outstanding offline payments of all terminals never exceeds the largest budget set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core.money import Money
from syncengine.core.ops import server_origin
from syncengine.server.app import default_settings, hash_secret
from syncengine.server.budget import plan_grants
from syncengine.server.model import EscrowState, TerminalEscrow
from syncengine.server.store.sqlite import SqliteStore

NOW_MS = 1_790_000_000_000


@dataclass
class Model:
    terminal_id: str
    connected: bool = True
    heard_grant: int = 0  # the largest grant that reached the terminal
    captures: list[list[int]] = field(default_factory=list)  # [amount, synced, final]
    server_granted: int = 0

    def used(self) -> int:
        return sum(c[0] for c in self.captures)

    def outstanding(self) -> int:
        return sum(c[0] for c in self.captures if not c[2])

    def escrow(self) -> TerminalEscrow:
        synced = [c for c in self.captures if c[1]]
        return TerminalEscrow(
            self.terminal_id,
            self.server_granted,
            sum(c[0] for c in synced),
            sum(c[0] for c in synced if c[2]),
            True,
        )


def _regrant(models: list[Model], budget: int) -> None:
    state = EscrowState("m", "USD", budget, tuple(m.escrow() for m in models))
    for tid, total in plan_grants(state).items():
        model = next(m for m in models if m.terminal_id == tid)
        assert total > model.server_granted
        model.server_granted = total
    for m in models:
        if m.connected:
            m.heard_grant = max(m.heard_grant, m.server_granted)


actions = st.lists(
    st.tuples(
        st.sampled_from(["capture", "sync", "toggle", "final", "regrant", "budget"]),
        st.integers(0, 3),
        st.integers(1, 4_000),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 4), st.integers(0, 20_000), actions)
def test_outstanding_never_exceeds_the_budget_while_partitioned(
    terminals: int, budget: int, steps: list[tuple[str, int, int]]
) -> None:
    models = [Model(f"T{i}") for i in range(terminals)]
    high = budget
    _regrant(models, budget)
    for action, index, amount in steps:
        m = models[index % terminals]
        if action == "capture" and m.used() + amount <= m.heard_grant:
            m.captures.append([amount, 0, 0])
        elif action == "sync" and m.connected:
            for c in m.captures:
                c[1] = 1
            m.heard_grant = max(m.heard_grant, m.server_granted)
        elif action == "toggle":
            m.connected = not m.connected
        elif action == "final":
            pending = [c for c in m.captures if c[1] and not c[2]]
            if pending:
                pending[0][2] = 1
        elif action == "regrant":
            _regrant(models, budget)
        elif action == "budget":
            budget = amount * 5
            high = max(high, budget)
            _regrant(models, budget)
        assert sum(x.outstanding() for x in models) <= high
        state = EscrowState("m", "USD", budget, tuple(x.escrow() for x in models))
        assert not plan_grants(plan_grants_idempotent(state)), "a second plan grants nothing"


def plan_grants_idempotent(state: EscrowState) -> EscrowState:
    grants = plan_grants(state)
    return EscrowState(
        state.merchant_id,
        state.currency,
        state.budget_minor,
        tuple(
            TerminalEscrow(
                t.terminal_id,
                grants.get(t.terminal_id, t.granted_minor),
                t.used_minor,
                t.released_minor,
                t.eligible,
            )
            for t in state.terminals
        ),
    )


def test_plan_fair_share_released_room_and_free_budget_only() -> None:
    def state(*terminals: TerminalEscrow, budget: int | None = 9_000) -> EscrowState:
        return EscrowState("m", "USD", budget, terminals)

    # 9,000 less a 20 % reserve, split three ways: 2,400 each.
    fresh = [TerminalEscrow(f"T{i}", 0, 0, 0, True) for i in range(3)]
    assert plan_grants(state(*fresh), reserve_percent=0) == {"T0": 3_000, "T1": 3_000, "T2": 3_000}
    assert plan_grants(state(*fresh)) == {"T0": 2_400, "T1": 2_400, "T2": 2_400}
    assert plan_grants(state(*fresh, budget=None)) == {}
    full = [TerminalEscrow(f"T{i}", 3_000, 0, 0, True) for i in (1, 2)]
    # T0 spent 3,000 and 2,000 of it became final: it gets 2,000 back, nothing more.
    spent = TerminalEscrow("T0", 3_000, 3_000, 2_000, True)
    assert plan_grants(state(spent, *full), reserve_percent=0) == {"T0": 5_000}
    # Nothing free: a terminal running low gets nothing taken from the others.
    low = TerminalEscrow("T0", 3_000, 3_000, 0, True)
    assert plan_grants(state(low, *full), reserve_percent=0) == {}
    # With a reserve, the low one gets room for another share, from the reserve only.
    shares = [TerminalEscrow(f"T{i}", 2_400, 0, 0, True) for i in (1, 2)]
    low = TerminalEscrow("T0", 2_400, 2_400, 0, True)
    assert plan_grants(state(low, *shares)) == {"T0": 4_200}  # all that is free: 1,800
    # Payments taken before any grant count against the budget (accounting floor).
    early = TerminalEscrow("T0", 0, 8_000, 0, True)
    rest = [TerminalEscrow(f"T{i}", 0, 0, 0, True) for i in (1, 2)]
    assert plan_grants(state(early, *rest)) == {"T0": 8_000, "T1": 1_000}


def test_sqlite_store_persists_budget_and_writes_grant_ops(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "server.db")
    store.open()
    try:
        store.ensure_merchant("m1", "USD", NOW_MS)
        for tid in ("T1", "T2"):
            store.create_enrollment_code(hash_secret(tid), "m1", tid, None, "t", NOW_MS, NOW_MS + 1)
            store.enroll(
                hash_secret(tid), tid, bytes(32), "terminal", default_settings("USD"), NOW_MS
            )
        assert store.grant_budget("m1", plan_grants, NOW_MS) == []  # no budget yet
        store.set_offline_budget("m1", 10_000, "key:test", NOW_MS)
        assert store.get_merchant("m1").offline_budget_minor == 10_000  # type: ignore[union-attr]
        # Offline not allowed on either terminal: nothing is granted.
        assert store.grant_budget("m1", plan_grants, NOW_MS) == []
        allowed = replace(default_settings("USD"), offline_allowed=True)
        for tid in ("T1", "T2"):
            store.update_terminal_settings(tid, allowed, "t", NOW_MS)
        assert store.grant_budget("m1", plan_grants, NOW_MS + 1) == ["T1", "T2"]
        assert store.grant_budget("m1", plan_grants, NOW_MS + 2) == []  # idempotent
        state = store.escrow_state("m1")
        assert [(t.terminal_id, t.granted_minor) for t in state.terminals] == [
            ("T1", 4_000),
            ("T2", 4_000),
        ]
        ops, _ = store.load_ops(server_origin("T1"), 0, 100)
        grants = [op for op in ops if op.kind == "grant"]
        assert [Money.from_wire(op.body["total"]) for op in grants] == [Money(4_000, "USD")]
        store.set_offline_budget("m1", None, "key:test", NOW_MS)
        assert store.escrow_state("m1").budget_minor is None
    finally:
        store.close()


def test_a_revoked_terminal_gives_back_the_grant_it_did_not_use() -> None:
    """Revoked, a terminal's pushes are refused: of its grant only what the server holds
    of its captures stays held; the rest goes back to the budget for the others."""
    from syncengine.server.budget import escrow_json

    def state(first: TerminalEscrow) -> EscrowState:
        return EscrowState("m", "USD", 9_000, (first, TerminalEscrow("T1", 0, 0, 0, True)))

    revoked = TerminalEscrow("T0", 3_000, 1_000, 400, False, revoked=True)
    used_only = TerminalEscrow("T0", 1_000, 1_000, 400, False)
    assert plan_grants(state(revoked)) == plan_grants(state(used_only))
    kept = TerminalEscrow("T0", 3_000, 1_000, 400, False)  # not revoked: all of it held
    assert plan_grants(state(kept)) != plan_grants(state(revoked))
    view = escrow_json(state(revoked))
    assert view["terminals"][0]["held"] == {"minor": 600, "currency": "USD"}  # type: ignore[index]


def test_a_restore_holds_grants_until_terminals_with_grants_are_back() -> None:
    from syncengine.server.budget import RESTORE_HOLD_MS, restore_hold

    restored = 1_000_000
    terminals = (
        TerminalEscrow("T1", 5_000, 0, 0, True, last_seen_ms=restored + 10),  # back since
        TerminalEscrow("T2", 5_000, 0, 0, True, last_seen_ms=restored - 10),  # not yet
        TerminalEscrow("T3", 0, 0, 0, True, last_seen_ms=None),  # held no grant
        TerminalEscrow("T4", 2_000, 0, 0, False, last_seen_ms=None),  # offline now off: held
        # Revoked: what it takes can no longer reach the server, so it spends nothing of
        # the budget; not waited for (an owner's way to end the wait for a lost device).
        TerminalEscrow("T5", 2_000, 0, 0, False, last_seen_ms=None, revoked=True),
    )
    assert restore_hold(terminals, restored, restored + 1) == ("T2", "T4")
    assert restore_hold(terminals, None, restored + 1) == ()  # never restored
    assert restore_hold(terminals, restored, None) == ()  # no clock: a plain read
    assert restore_hold(terminals, restored, restored + RESTORE_HOLD_MS) == ()  # windows shut
    state = EscrowState("m1", "USD", 40_000, terminals, held_by=("T2",))
    assert plan_grants(state) == {}
    assert plan_grants(replace(state, held_by=())) != {}
