"""The payment lifecycle: ONE transition table, a status lattice, refunds under approved.

Theory of operation
-------------------
1. A payment is born ``captured`` when its capture op exists. Only the server writes status
   ops after that (single writer): ``forwarding`` when a forwarder claims it, then exactly
   one final status: ``approved``, ``offline_declined`` or ``expired``.
2. :data:`TRANSITIONS` is the whole state machine. Nothing else decides which move is legal.
3. The status of a payment is the *join* of the status ops seen, in the lattice
   ``captured < forwarding < {approved, offline_declined, expired}``. The join does not
   depend on arrival order, so a replica that sees ops reordered, duplicated or replayed
   computes the same status, and status never moves backwards.
4. Two different finals for one payment cannot happen with a single writer; if they are
   ever seen the join raises :class:`InvariantViolation` (a bug, never silently resolved).
5. Refunds are a grow-only set under ``approved``: each refund has its own id, and the sum
   of refunds never exceeds the amount. Rules for *asking* for a refund (90 days, disputes,
   card present) are in :func:`check_refund`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from syncengine.core.errors import InvalidState, InvariantViolation, Refused
from syncengine.core.money import Money


class Status(StrEnum):
    CAPTURED = "captured"
    FORWARDING = "forwarding"
    APPROVED = "approved"
    OFFLINE_DECLINED = "offline_declined"
    EXPIRED = "expired"


FINAL = frozenset({Status.APPROVED, Status.OFFLINE_DECLINED, Status.EXPIRED})

# The whole state machine: status -> the statuses it may move to.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CAPTURED: frozenset(
        {Status.FORWARDING, Status.APPROVED, Status.OFFLINE_DECLINED, Status.EXPIRED}
    ),
    Status.FORWARDING: frozenset({Status.APPROVED, Status.OFFLINE_DECLINED, Status.EXPIRED}),
    Status.APPROVED: frozenset(),
    Status.OFFLINE_DECLINED: frozenset(),
    Status.EXPIRED: frozenset(),
}

RANK: dict[Status, int] = {
    Status.CAPTURED: 0,
    Status.FORWARDING: 1,
    Status.APPROVED: 2,
    Status.OFFLINE_DECLINED: 2,
    Status.EXPIRED: 2,
}

REFUND_WINDOW_MS = 90 * 24 * 3600 * 1000


def parse_status(value: object) -> Status:
    try:
        return Status(str(value)) if isinstance(value, str) else Status("")
    except ValueError:
        raise InvalidState(f"unknown payment status {value!r}") from None


def can_move(current: Status, target: Status) -> bool:
    """Whether the table allows ``current -> target`` (staying put is always allowed)."""
    return target == current or target in TRANSITIONS[current]


def join(a: Status, b: Status) -> Status:
    """Least upper bound of two statuses in the lattice."""
    if a == b:
        return a
    if RANK[a] != RANK[b]:
        return a if RANK[a] > RANK[b] else b
    raise InvariantViolation(f"two different final statuses for one payment: {a.value}, {b.value}")


def join_all(statuses: Iterable[Status]) -> Status:
    result = Status.CAPTURED
    for status in statuses:
        result = join(result, status)
    return result


def transition(current: Status, target: Status) -> Status:
    """Move ``current`` to ``target`` or raise :class:`InvalidState` naming the rule."""
    if not can_move(current, target):
        raise InvalidState(f"a payment cannot move from {current.value} to {target.value}")
    return target


@dataclass(frozen=True, slots=True)
class RefundState:
    """Refunds recorded for one payment (a grow-only set keyed by refund id)."""

    amount: Money
    refunds: dict[str, Money] = field(default_factory=dict)

    @property
    def refunded(self) -> Money:
        total = Money.zero(self.amount.currency)
        for value in self.refunds.values():
            total = total + value
        return total

    @property
    def remaining(self) -> Money:
        return self.amount - self.refunded

    def add(self, refund_id: str, value: Money) -> RefundState:
        """The state with one more refund. Re-adding the same refund changes nothing."""
        if refund_id in self.refunds:
            if self.refunds[refund_id] != value:
                raise InvariantViolation(f"refund {refund_id} recorded with two amounts")
            return self
        if not value.is_positive() or value > self.remaining:
            raise InvariantViolation(
                f"refund {refund_id} of {value} exceeds the remaining {self.remaining}"
            )
        return RefundState(self.amount, {**self.refunds, refund_id: value})


def check_refund(
    *,
    status: Status,
    refunds: RefundState,
    amount: Money,
    processed_at_ms: int | None,
    now_ms: int,
    dispute_open: bool,
    card_present_required: bool = False,
    card_present: bool = False,
) -> None:
    """Raise :class:`Refused` with a clear reason unless this refund may be made (R9)."""
    if status not in FINAL:
        raise Refused(
            "not_processed",
            "This payment has not been processed yet; refund it after it is forwarded "
            "and approved.",
        )
    if status != Status.APPROVED:
        raise Refused(
            "not_approved", f"Only approved payments can be refunded; this one is {status.value}."
        )
    if processed_at_ms is not None and now_ms - processed_at_ms > REFUND_WINDOW_MS:
        raise Refused(
            "refund_window_passed",
            "Refunds are possible only within 90 days of processing; this payment is older.",
        )
    if dispute_open:
        raise Refused(
            "dispute_open",
            "A chargeback dispute is open on this payment; wait until it is resolved.",
        )
    if not refunds.remaining.is_positive():
        raise Refused("fully_refunded", "This payment has already been fully refunded.")
    if not amount.is_positive():
        raise Refused("invalid_amount", "A refund amount must be positive.")
    if amount.currency != refunds.amount.currency:
        raise Refused(
            "currency_mismatch",
            f"Refund in {amount.currency} for a payment in {refunds.amount.currency}.",
        )
    if amount > refunds.remaining:
        raise Refused(
            "exceeds_remaining",
            f"Refund of {amount} exceeds the {refunds.remaining} that can still be refunded.",
        )
    if card_present_required and not card_present:
        raise Refused(
            "card_not_present",
            "This refund method needs the customer's card on the terminal.",
        )
