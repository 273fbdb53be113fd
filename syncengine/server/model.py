"""Plain records the server's sans-I/O machine and its stores exchange. Pure: no I/O.

These are the nouns of the server: who a terminal is, what a merge batch contains, what a
stored payment looks like, what a forwarding attempt should do. The store interface
(:mod:`syncengine.server.store`) reads and writes them; :mod:`syncengine.server.merge`
plans them; nothing here touches a database, a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from syncengine.core.bodies import Capture, ModeChange, StatusChange, VoidRequest
from syncengine.core.hlc import Hlc
from syncengine.core.ops import GENESIS, Op

#: Why a revoked terminal's session ends (a revoked id stays retired: a replacement device
#: is enrolled under a new terminal id).
TERMINAL_REVOKED_TEXT = (
    "This terminal was revoked by the merchant and can no longer sync; a replacement is "
    "enrolled under a new terminal id."
)


class Role(StrEnum):
    """API key roles. Owners and managers administer; cashiers take and refund payments."""

    OWNER = "owner"
    MANAGER = "manager"
    CASHIER = "cashier"


ADMIN_ROLES = frozenset({Role.OWNER, Role.MANAGER})


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated API client (the secret itself is never stored, only its hash)."""

    key_id: str
    merchant_id: str
    role: Role
    name: str


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """An API key as an owner sees it in the list: never its secret nor its hash."""

    key_id: str
    role: Role
    name: str
    created_at_ms: int
    revoked_at_ms: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "role": self.role.value,
            "name": self.name,
            "created_at_ms": self.created_at_ms,
            "revoked_at_ms": self.revoked_at_ms,
        }


#: What :meth:`Store.revoke_api_key` says happened.
REVOKED = "revoked"
REVOKE_UNKNOWN = "unknown"  # no key with that id for this merchant
REVOKE_ALREADY = "already_revoked"
REVOKE_LAST_OWNER = "last_owner"  # the merchant's only live owner key is kept


@dataclass(frozen=True, slots=True)
class MerchantInfo:
    """Merchant-wide settings; ``liability_*`` records who accepted offline liability (R2)."""

    merchant_id: str
    currency: str
    timezone: str
    batch_close_local: str  # "HH:MM" merchant-local time at which the day's batch closes
    standalone_allowed: bool
    liability_accepted_by: str | None
    liability_accepted_at_ms: int | None
    offline_budget_minor: int | None = None  # merchant-wide offline budget; None = none


@dataclass(frozen=True, slots=True)
class TerminalSettings:
    """Per-terminal offline settings; every change reaches the terminal as ``setting`` ops."""

    offline_allowed: bool
    per_transaction_limit_minor: int
    total_limit_minor: int
    offline_entry_policy: str  # "prompt" | "auto"
    offline_auto_delay_ms: int
    force_offline: bool

    def to_setting_bodies(self, currency: str, standalone_allowed: bool) -> list[dict[str, Any]]:
        """The ``setting`` op bodies that tell a terminal these settings (docs/protocol.md)."""
        return [
            {"key": "offline_allowed", "value": self.offline_allowed},
            {"key": "standalone_allowed", "value": standalone_allowed},
            {
                "key": "per_transaction_limit",
                "value": {"minor": self.per_transaction_limit_minor, "currency": currency},
            },
            {
                "key": "total_limit",
                "value": {"minor": self.total_limit_minor, "currency": currency},
            },
            {
                "key": "offline_entry",
                "value": {
                    "policy": self.offline_entry_policy,
                    "auto_delay_ms": self.offline_auto_delay_ms,
                },
            },
            {"key": "force_offline", "value": self.force_offline},
        ]

    def setting_changes(
        self,
        before: TerminalSettings,
        currency: str,
        standalone_allowed: bool,
        pressed: frozenset[str] = frozenset(),
    ) -> list[dict[str, Any]]:
        """The ``setting`` bodies to write going from ``before`` to these settings: the ones
        that changed, and the keys in ``pressed`` even when unchanged (a portal action
        pressed again, such as ``force_offline``: each press is an op of its own, which a
        terminal acts on once)."""
        old = before.to_setting_bodies(currency, standalone_allowed)
        new = self.to_setting_bodies(currency, standalone_allowed)
        return [b for b, o in zip(new, old, strict=True) if b != o or b["key"] in pressed]


#: Settings that are portal actions: each press of ``true`` is written, also unchanged.
ACTION_SETTINGS = frozenset({"force_offline"})


def pressed_settings(request: Mapping[str, Any]) -> frozenset[str]:
    """The action settings a settings change presses (sets to ``true``), for
    :meth:`TerminalSettings.setting_changes`."""
    return frozenset(key for key in ACTION_SETTINGS if request.get(key) is True)


OFFLINE_ENTRY_POLICIES = frozenset({"prompt", "auto", "forced"})  # core EntryPolicy
OFFLINE_AUTO_DELAY_MS_DEFAULT = 60_000
OFFLINE_AUTO_DELAY_MS_MAX = 3_600_000


@dataclass(frozen=True, slots=True)
class TerminalEscrow:
    """One terminal's share of the merchant-wide offline budget, as the server sees it.

    ``granted_minor`` is the cumulative grant (the last ``grant`` op's total, grow-only);
    ``used_minor`` the sum of its offline captures the server holds; ``released_minor`` the
    part of those that reached a final status. ``eligible``: active and offline allowed.
    """

    terminal_id: str
    granted_minor: int
    used_minor: int
    released_minor: int
    eligible: bool
    last_seen_ms: int | None = None  # its last merged push, or Store.mark_seen (None: never)
    revoked: bool = False  # revoked by an owner or manager: it can no longer sync

    @property
    def outstanding_minor(self) -> int:
        return self.used_minor - self.released_minor


@dataclass(frozen=True, slots=True)
class EscrowState:
    """A merchant's offline budget and every terminal's share of it (read in one transaction)."""

    merchant_id: str
    currency: str
    budget_minor: int | None
    terminals: tuple[TerminalEscrow, ...]
    # Terminals the budget waits for after a restore from a backup (server.budget.
    # restore_hold): while any is listed, nothing is granted.
    held_by: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TerminalInfo:
    """An enrolled terminal as the sync machine needs it."""

    terminal_id: str
    merchant_id: str
    public_key: bytes
    device_class: str
    active: bool
    head_seq: int = 0
    head_digest: str = GENESIS
    server_seq: int = 0


@dataclass(frozen=True, slots=True)
class ChainView:
    """What the store holds of one origin: its head and the digests of some stored seqs."""

    head_seq: int
    head_digest: str
    digests: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MergeBatch:
    """A planned merge: ops that extend a terminal's chain from ``expected_head_seq``.

    The store applies it in one transaction only if the head is still the expected one
    (another session of the same terminal may have moved it): otherwise nothing changes and
    it answers :class:`HeadMoved`. ``expired`` are status bodies for captures received
    after their deadline on a server that forwards nothing (written to ``server/T`` in the
    same transaction; a forwarding server leaves them to its forwarder).
    """

    terminal_id: str
    merchant_id: str
    expected_head_seq: int
    expected_head_digest: str
    ops: tuple[Op, ...]
    captures: tuple[tuple[int, Capture], ...]  # (op seq, capture)
    expired: tuple[StatusChange, ...]
    voids: tuple[VoidRequest, ...]
    last_mode: ModeChange | None
    received_at_ms: int

    @property
    def head_seq(self) -> int:
        return self.ops[-1].seq

    @property
    def head_digest(self) -> str:
        return self.ops[-1].digest


@dataclass(frozen=True, slots=True)
class BatchStored:
    """The batch is durable; ``server_ops_written`` says if ``server/T`` grew too."""

    head_seq: int
    head_digest: str
    server_ops_written: int


@dataclass(frozen=True, slots=True)
class HeadMoved:
    """The chain head moved since the batch was planned; nothing was written."""

    head_seq: int


@dataclass(frozen=True, slots=True)
class Payment:
    """A stored payment with its derived state (one row of the payments view)."""

    payment_id: str
    merchant_id: str
    terminal_id: str
    capture_seq: int
    amount_minor: int
    currency: str
    channel: str
    brand: str
    last4: str
    entry_method: str
    sealed: str
    captured_at_ms: int
    expires_at_ms: int | None
    received_at_ms: int
    device_class: str
    email: str | None
    status: str
    code: str
    message: str
    processor_ref: str | None
    processed_at_ms: int | None
    fwd_state: str  # "pending" | "done" | "error"
    attempts: int
    next_attempt_at_ms: int
    last_error: str | None
    batch_id: int | None
    refunded_minor: int
    dispute_open: bool

    @property
    def payout_status(self) -> str:
        """``none`` (not approved), ``unbatched`` (approved, batch still open) or ``batched``."""
        if self.status != "approved":
            return "none"
        return "batched" if self.batch_id is not None else "unbatched"

    def to_json(self) -> dict[str, Any]:
        """The REST representation (no sealed card data)."""
        return {
            "payment_id": self.payment_id,
            "merchant_id": self.merchant_id,
            "terminal_id": self.terminal_id,
            "amount": {"minor": self.amount_minor, "currency": self.currency},
            "channel": self.channel,
            "card": {"brand": self.brand, "last4": self.last4, "entry_method": self.entry_method},
            "captured_at_ms": self.captured_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "received_at_ms": self.received_at_ms,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "processed_at_ms": self.processed_at_ms,
            "payout_status": self.payout_status,
            "batch_id": self.batch_id,
            "refunded": {"minor": self.refunded_minor, "currency": self.currency},
            "dispute_open": self.dispute_open,
            # last_error: why the last attempt failed, or why it is parked (a person
            # resolving it needs to know: an idempotency conflict, a refused request).
            "forwarding": {
                "state": self.fwd_state,
                "attempts": self.attempts,
                "last_error": self.last_error,
            },
            "email_on_file": self.email is not None,
        }


class AttemptAction(StrEnum):
    """What the forwarder must do for a claimed payment."""

    CHARGE = "charge"  # first attempt, or earlier attempts certainly charged nothing
    LOOKUP = "lookup"  # an earlier attempt may have charged: ask the processor first
    DONE = "done"  # nothing to do: already final


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of ``begin_attempt``: the payment and what to do with it."""

    payment: Payment
    action: AttemptAction


RESOLVE_ACTIONS = ("retry", "approved", "declined")


@dataclass(frozen=True, slots=True)
class Resolution:
    """An operator's decision on a parked payment (``POST /v1/payments/{id}/resolve``).

    ``retry``: forward it again under the same idempotency key. ``approved`` (with the
    processor's ``processor_ref``) / ``declined`` (with its decline ``code``): the
    processor's own record says so; the payment is finalized as if it had answered.
    """

    action: str  # one of RESOLVE_ACTIONS
    processor_ref: str | None = None  # approved only
    code: str | None = None  # declined only
    note: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentFilter:
    """Filters of the payments view (R10). ``None`` means any."""

    merchant_id: str
    channel: str | None = None
    status: str | None = None
    payout_status: str | None = None
    terminal_id: str | None = None
    from_ms: int | None = None  # captured_at_ms >= from_ms
    to_ms: int | None = None  # captured_at_ms < to_ms
    limit: int = 100
    after_payment_id: str | None = None
    forwarding: str | None = None  # pending, done or error (parked: needs a person)
    batch_id: int | None = None  # the payments of one settlement batch


@dataclass(frozen=True, slots=True)
class ReceiptJob:
    """One outbox row to deliver: the email and what the receipt says."""

    payment_id: str
    email: str
    merchant_id: str
    amount_minor: int
    currency: str
    brand: str
    last4: str
    status: str
    code: str
    processed_at_ms: int
    attempts: int


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund (or a terminal's void) recorded on the server."""

    refund_id: str
    payment_id: str
    amount_minor: int
    currency: str
    # "pending" (processor not yet confirmed) | "parked" (the processor holds another
    # request under this id; a person resolves it) | "done" | "refused" (by the processor)
    state: str
    requested_by: str
    requested_at_ms: int
    processed_at_ms: int | None
    batch_id: int | None
    last_error: str | None = None  # why it was parked (kept as history once resolved)


@dataclass(frozen=True, slots=True)
class Batch:
    """A closed settlement batch: payments and refunds processed before its close (R11)."""

    batch_id: int
    merchant_id: str
    business_day: str  # YYYY-MM-DD, merchant-local
    close_at_ms: int
    closed_at_ms: int
    payments_count: int
    sales_minor: int
    refunds_minor: int
    currency: str

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "merchant_id": self.merchant_id,
            "business_day": self.business_day,
            "close_at_ms": self.close_at_ms,
            "closed_at_ms": self.closed_at_ms,
            "payments_count": self.payments_count,
            "sales": {"minor": self.sales_minor, "currency": self.currency},
            "refunds": {"minor": self.refunds_minor, "currency": self.currency},
            "net": {"minor": self.sales_minor - self.refunds_minor, "currency": self.currency},
        }


def next_hlc(last: Hlc, now_ms: int) -> Hlc:
    """The HLC of the next op of a server stream: after ``last``, near ``now_ms``."""
    if now_ms > last.wall_ms:
        return Hlc(now_ms, 0)
    return Hlc(last.wall_ms, last.logical + 1)
