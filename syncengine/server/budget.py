"""How the server splits a merchant's offline budget between its terminals (pure: no I/O).

Theory of operation
-------------------
The escrow itself is :class:`syncengine.core.budget.MerchantEscrow`: a terminal ``T`` holds
``granted_T - released_T`` rights, where ``granted_T`` is its cumulative grant (``grant``
ops in ``server/T``) and ``released_T`` the sum of its offline payments that reached a final
status. The SDK takes an offline payment only while its offline captures stay within
``granted_T`` (``TerminalMachine.grant_room``), so the sum of outstanding offline payments
of all terminals is at most the sum of rights held, which the server keeps ``<= budget``.

:func:`plan_grants` runs inside the store transaction (``Store.grant_budget``) on a fresh
read and says which grants to raise:

1. **Accounting floor.** A terminal's grant is never below what it is known to have used
   (offline captures taken before its first grant arrived, e.g. before the budget was set):
   those payments are exposure already out, so they count against the budget.
2. **Fair share.** Every eligible terminal (enrolled, active, offline allowed) is topped up
   to a fair share of the budget less a reserve (``reserve_percent``, default 20 %), the
   ones with the least room first. This is the initial grant (budget set, terminal
   enrolled) and the re-grant that hands released room back once payments of ``T`` become
   final.
3. **Rebalancing** toward terminals running low (room below ``low_room_percent`` of the
   share): each gets room for another share -- only from budget still free after step 2
   (the reserve and room nobody holds), never by taking rights back (they cannot be: a
   partitioned terminal may be spending them right now).

Rights only grow, and only through the server, so the invariant holds whatever the network
does; a lower budget takes effect as payments are released.
"""

from __future__ import annotations

from collections.abc import Iterable

from syncengine.core.budget import MerchantEscrow, fair_share
from syncengine.core.money import Money
from syncengine.core.policy.expiry import WINDOWS
from syncengine.server.model import EscrowState, TerminalEscrow

LOW_ROOM_PERCENT_DEFAULT = 25
RESERVE_PERCENT_DEFAULT = 20
# After a restore, grants wait at most this long for terminals that have not been back: a
# terminal cut off since before the restore stops taking offline payments once its offline
# window (24 h at the longest) has closed, so then it can spend nothing the server forgot.
RESTORE_HOLD_MS = max(w.offline_window_ms for w in WINDOWS.values())


def restore_hold(
    terminals: Iterable[TerminalEscrow], restored_at_ms: int | None, now_ms: int | None
) -> tuple[str, ...]:
    """The terminals the budget waits for after a restore from a backup.

    A restored server forgot the grants it wrote after the backup. A terminal that holds
    one and is cut off may spend it, while the server would grant the same room to
    another: the budget could be broken. So once the database was restored
    (``Store.mark_restored``) nothing is granted until every terminal holding a grant has
    pushed since then (it then takes the rewritten stream and drops rights the server
    forgot), or until :data:`RESTORE_HOLD_MS` has passed. A revoked terminal is not waited
    for: nothing it takes can reach the server any more (its pushes are refused), so it
    spends nothing of the merchant's budget (an owner's way to end the wait for a terminal
    that is out of use).
    """
    if restored_at_ms is None or now_ms is None or now_ms >= restored_at_ms + RESTORE_HOLD_MS:
        return ()
    return tuple(
        t.terminal_id
        for t in terminals
        if t.granted_minor > 0
        and not t.revoked
        and (t.last_seen_ms is None or t.last_seen_ms < restored_at_ms)
    )


def held_floor(t: TerminalEscrow) -> int:
    """What of the budget ``t`` holds before its releases: its cumulative grant (or more, if
    it took more than that: a restore forgot a grant). A revoked terminal holds only what
    the server has of its captures: its pushes are refused, so the rest of its grant can
    never be spent against the merchant and goes back to the budget."""
    if t.revoked:
        return t.used_minor
    return max(t.granted_minor, t.used_minor)


def plan_grants(
    state: EscrowState,
    low_room_percent: int = LOW_ROOM_PERCENT_DEFAULT,
    reserve_percent: int = RESERVE_PERCENT_DEFAULT,
) -> dict[str, int]:
    """New cumulative grants (terminal id -> minor units) to write; empty if none change
    (and while a restore hold waits for terminals, :func:`restore_hold`)."""
    if state.budget_minor is None or state.held_by:
        return {}
    cur = state.currency
    floor = {t.terminal_id: held_floor(t) for t in state.terminals}
    escrow = MerchantEscrow(
        Money(state.budget_minor, cur),
        granted={tid: Money(v, cur) for tid, v in floor.items()},
    )
    for t in state.terminals:
        escrow.release(t.terminal_id, Money(min(t.released_minor, floor[t.terminal_id]), cur))
    eligible = [t for t in state.terminals if t.eligible]
    assert 0 <= reserve_percent < 100 and 0 <= low_room_percent <= 100
    shared = Money(state.budget_minor * (100 - reserve_percent) // 100, cur)
    share = fair_share(shared, [t.terminal_id for t in eligible])

    def room(t: TerminalEscrow) -> int:
        return escrow.held(t.terminal_id).minor - t.outstanding_minor

    for t in sorted(eligible, key=lambda t: (room(t), t.terminal_id)):
        escrow.top_up(t.terminal_id, share)
    low_minor = share.minor * low_room_percent // 100
    for t in sorted(eligible, key=lambda t: (room(t), t.terminal_id)):
        if room(t) < low_minor:
            escrow.top_up(t.terminal_id, Money(t.outstanding_minor, cur) + share)
    return {
        t.terminal_id: escrow.granted[t.terminal_id].minor
        for t in state.terminals
        if escrow.granted[t.terminal_id].minor > t.granted_minor
    }


def escrow_json(state: EscrowState) -> dict[str, object]:
    """The REST view of a merchant's budget: per terminal granted, held, outstanding, room."""
    cur = state.currency
    terminals = []
    held_total = 0
    for t in state.terminals:
        granted = held_floor(t)
        held = granted - min(t.released_minor, granted)
        held_total += held
        terminals.append(
            {
                "terminal_id": t.terminal_id,
                "eligible": t.eligible,
                "granted": {"minor": t.granted_minor, "currency": cur},
                "held": {"minor": held, "currency": cur},
                "outstanding": {"minor": t.outstanding_minor, "currency": cur},
                "room": {"minor": max(0, t.granted_minor - t.used_minor), "currency": cur},
            }
        )
    budget = None if state.budget_minor is None else {"minor": state.budget_minor, "currency": cur}
    free = None if state.budget_minor is None else state.budget_minor - held_total
    return {
        "offline_budget": budget,
        "held": {"minor": held_total, "currency": cur},
        "free": None if free is None else {"minor": free, "currency": cur},
        # After a restore: no grants until these terminals are back (restore_hold).
        "restore_hold": list(state.held_by),
        "terminals": terminals,
    }
