"""The server's store interface: one contract, several backends.

Theory of operation
-------------------
1. Every method is one transaction: it either happens completely or not at all. Methods are
   synchronous; the asyncio shell runs them on a bounded thread pool
   (:class:`StoreRunner`), which suits SQLite (one writer) and a pooled PostgreSQL alike.
2. **Merge** (:meth:`Store.merge_batch`) is conditional on the chain head the batch was
   planned against, so two sessions of one terminal cannot interleave; its inserts are
   keyed by ``(origin, seq)`` and ``payment_id`` (``INSERT ... ON CONFLICT DO NOTHING``),
   so a replay changes nothing. The caller acks only after it returned.
3. **Server streams** (``server/T``) get dense seqs allocated under the terminal's row lock
   (SQLite: the database write lock of ``BEGIN IMMEDIATE``; PostgreSQL:
   ``SELECT ... FOR UPDATE`` on the terminal row).
4. **Forwarding work** is claimed per terminal with a lease (:meth:`Store.claim_terminal`;
   PostgreSQL: ``FOR UPDATE SKIP LOCKED``), so payments of one terminal go to the
   processor in capture order and two processes never work on one terminal at once. The
   lease is an optimisation, not the safety net: outcomes are recorded only while the
   payment is still pending, and the processor is idempotent by payment id.
5. **Schema migrations** are numbered and applied in order on :meth:`Store.open`; the
   applied version is stored in the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, Protocol, TypeVar

from syncengine.core import canonical
from syncengine.core.bodies import StatusChange
from syncengine.core.errors import ProtocolError, StorageError
from syncengine.core.ops import Op
from syncengine.server.model import (
    ApiKey,
    ApiKeyInfo,
    Attempt,
    Batch,
    BatchStored,
    ChainView,
    EscrowState,
    HeadMoved,
    MerchantInfo,
    MergeBatch,
    Payment,
    PaymentFilter,
    ReceiptJob,
    Refund,
    Resolution,
    Role,
    TerminalInfo,
    TerminalSettings,
)
from syncengine.server.store.rules import (
    LIST_ROWS_MAX,
    REFUND_PENDING,
    RESOLVED_NOT_MADE_CODE,
    RESOLVED_NOT_MADE_TEXT,
    refund_resolution_audit_detail,
)

P = ParamSpec("P")
T = TypeVar("T")


class Store(Protocol):
    """What the sync server needs from durable storage. See the module docstring."""

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Connect and apply pending schema migrations."""

    def close(self) -> None:
        """Release connections. Idempotent."""

    def schema_version(self) -> int:
        """The highest migration applied."""

    # -- merchants, keys, enrollment -------------------------------------------------------

    def ensure_merchant(self, merchant_id: str, currency: str, now_ms: int) -> bool:
        """Create the merchant if missing; True if it was created."""

    def get_merchant(self, merchant_id: str) -> MerchantInfo | None: ...

    def update_merchant(
        self,
        merchant_id: str,
        *,
        timezone: str | None = None,
        batch_close_local: str | None = None,
        standalone_allowed: bool | None = None,
        liability_accepted_by: str | None = None,
        liability_accepted_at_ms: int | None = None,
        actor: str,
        now_ms: int,
    ) -> list[str]:
        """Change merchant settings; returns the terminal ids whose ``server/T`` grew.

        ``standalone_allowed=False`` also turns offline payments (and a forced offline) off
        on every terminal of the merchant, in the same transaction (R2: offline only where
        standalone is): all of it is stored, or none."""

    def count_api_keys(self) -> int: ...

    def get_maintenance(self) -> bool:
        """The provider's maintenance switch, shared by every process on this store."""

    def set_maintenance(self, enabled: bool, actor: str, now_ms: int) -> None:
        """Turn the maintenance switch on or off (audited)."""

    def create_first_api_key(
        self, key_hash: str, key_id: str, merchant_id: str, role: Role, name: str, now_ms: int
    ) -> bool:
        """Create this key only if no API key exists yet; True if it was created.

        Atomic across processes: of several processes starting together on an empty
        database, exactly one creates the bootstrap key.
        """

    def create_api_key(
        self,
        key_hash: str,
        key_id: str,
        merchant_id: str,
        role: Role,
        name: str,
        now_ms: int,
        *,
        live_max: int | None = None,
    ) -> ApiKey:
        """Store a new key; with ``live_max``, refused (``Refused`` ``too_many_keys``) when
        the merchant already has that many live keys, checked in the same transaction."""

    def get_api_key(self, key_hash: str) -> ApiKey | None:
        """The live API key with this hash, or None."""

    def count_live_api_keys(self, merchant_id: str) -> int:
        """How many of the merchant's API keys are not revoked."""

    def list_api_keys(self, merchant_id: str, limit: int) -> list[ApiKeyInfo]:
        """The merchant's keys, no secrets: live ones oldest first, then revoked ones most
        recently revoked first; at most ``limit``."""

    def revoke_api_key(self, merchant_id: str, key_id: str, actor: str, now_ms: int) -> str:
        """Revoke one of the merchant's live keys, audited in the same transaction.

        Returns ``REVOKED``, ``REVOKE_UNKNOWN`` (no such key for this merchant),
        ``REVOKE_ALREADY``, or ``REVOKE_LAST_OWNER``: the merchant's last live owner key is
        never revoked (nobody could then manage keys; ``syncengine owner-key`` makes a new
        one). Two revokes at once cannot both pass that check.
        """

    def create_enrollment_code(
        self,
        code_hash: str,
        merchant_id: str,
        terminal_id: str | None,
        device_class: str | None,
        created_by: str,
        now_ms: int,
        expires_at_ms: int,
    ) -> None: ...

    def enroll(
        self,
        code_hash: str,
        terminal_id: str,
        public_key: bytes,
        device_class: str,
        settings: TerminalSettings,
        now_ms: int,
    ) -> TerminalInfo:
        """Use a one-time code to enroll a terminal; raises ``Refused`` with a reason.

        Re-sending the same request (same terminal, key and code) returns the terminal
        again, so a lost response can be retried. Initial ``setting`` ops are written to
        ``server/T`` in the same transaction.
        """

    def load_terminal(self, terminal_id: str) -> TerminalInfo | None: ...

    def list_terminals(
        self, merchant_id: str, after: str | None = None, limit: int = LIST_ROWS_MAX
    ) -> list[dict[str, object]]:
        """The merchant's terminals by id: at most ``limit`` (1 to LIST_ROWS_MAX), those
        after the id ``after`` (a cursor: the last id of the page before)."""

    def get_terminal_settings(self, terminal_id: str) -> TerminalSettings | None: ...

    def revoke_terminal(
        self, merchant_id: str, terminal_id: str, actor: str, now_ms: int
    ) -> tuple[int, bool] | None:
        """Revoke the merchant's terminal (lost, stolen, out of use): it can no longer
        connect, and a push of a session still open is refused (``merge_batch``). Audited.
        Returns when it was revoked and whether by this call (False: it already was); None
        if the merchant has no such terminal."""

    def update_terminal_settings(
        self,
        terminal_id: str,
        settings: TerminalSettings,
        actor: str,
        now_ms: int,
        pressed: frozenset[str] = frozenset(),
    ) -> list[Op]:
        """Store new settings and append the changed ``setting`` ops to ``server/T`` (and
        the keys in ``pressed`` even when unchanged: a portal action pressed again)."""

    # -- merchant-wide offline budget (escrow) ---------------------------------------------

    def set_offline_budget(
        self, merchant_id: str, budget_minor: int | None, actor: str, now_ms: int
    ) -> None:
        """Set (or with None remove) the merchant-wide offline budget; audited."""

    def escrow_state(self, merchant_id: str, now_ms: int | None = None) -> EscrowState:
        """The budget and every terminal's granted/used/released amounts, read at once.

        ``used``/``released`` count the terminal's ``offline`` captures (all / final ones).
        With ``now_ms``, ``held_by`` lists the terminals a restore hold waits for
        (:func:`syncengine.server.budget.restore_hold`).
        """

    def mark_restored(self, now_ms: int) -> None:
        """Record that this database was just restored from a backup (budget grants wait
        for the terminals that held one; :func:`syncengine.server.budget.restore_hold`)."""

    def grant_budget(
        self,
        merchant_id: str,
        plan: Callable[[EscrowState], dict[str, int]],
        now_ms: int,
    ) -> list[str]:
        """Run ``plan`` on a fresh :meth:`escrow_state` inside one transaction and write its
        grants: for each ``terminal_id -> new cumulative grant`` (never below the current
        one) store it and append a ``grant`` op to ``server/T``. Returns the terminal ids
        whose ``server/T`` grew. PostgreSQL: lock the merchant row ``FOR UPDATE`` first, so
        two processes never grant from the same free budget.
        """

    # -- merge -----------------------------------------------------------------------------

    def load_chain(self, origin: str, seq_lo: int, seq_hi: int) -> ChainView:
        """Head of ``origin`` and the digests of its stored ops with seq in [lo, hi]."""

    def merge_batch(self, batch: MergeBatch) -> BatchStored | HeadMoved:
        """Apply a planned batch atomically, or change nothing if the head moved.

        Raises ``ProtocolError`` (and changes nothing) if a payment id of the batch is
        already stored under another op.
        """

    def mark_seen(self, terminal_id: str, now_ms: int) -> bool:
        """The terminal pushed again what the store holds (a verified push, nothing new):
        count it as back, as a merged push does (``last_seen_ms``), but only where a
        restore hold waits for it (seen last before :meth:`mark_restored`): otherwise
        nothing is written. True if it was written (a hold may have lifted)."""

    def load_ops(self, origin: str, after_seq: int, ops_max: int) -> tuple[list[Op], bool]:
        """Ops of ``origin`` with seq > after_seq, at most ``ops_max``; and whether more."""

    def append_server_ops(
        self, terminal_id: str, bodies: list[tuple[str, dict[str, object]]], now_ms: int
    ) -> list[Op]:
        """Append ops (kind, body) to ``server/T`` with dense seqs; returns them."""

    # -- forwarding --------------------------------------------------------------------------

    def claim_terminal(self, owner: str, now_ms: int, lease_ms: int) -> str | None:
        """Lease one terminal whose oldest pending payment is due; None if none is."""

    def release_terminal(self, terminal_id: str, owner: str) -> None: ...

    def release_leases(self, owner: str) -> int:
        """Release every terminal ``owner`` holds; how many. For an owner that holds
        nothing it believes in: a claim whose commit was lost with its connection may
        have taken a lease after all."""

    def next_pending(self, terminal_id: str) -> Payment | None:
        """The terminal's pending payment with the lowest capture seq."""

    def begin_attempt(self, payment_id: str, owner: str, now_ms: int, lease_ms: int) -> Attempt:
        """Record that an attempt starts (durably, before the processor is called).

        A first attempt after the payment's ``expires_at_ms`` expires it instead
        (``DONE``); a payment with earlier attempts answers ``LOOKUP``. The first attempt
        also appends a ``forwarding`` status op.
        """

    def record_outcome(self, change: StatusChange, processor_ref: str | None, now_ms: int) -> bool:
        """Record a final status (op + payment row + receipt outbox) if still pending.

        Returns False (and changes nothing) if the payment was already final.
        """

    def defer(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None:
        """Keep the payment pending; retry it not before ``next_attempt_at_ms``."""

    def park(self, payment_id: str, error: str) -> None:
        """Stop forwarding a payment that needs a person (e.g. an idempotency conflict)."""

    def resolve_parked(
        self, payment_id: str, resolution: Resolution, actor: str, now_ms: int
    ) -> Payment:
        """An operator's decision on a parked payment, audited in the same transaction.

        ``retry``: pending again, due at once (``next_attempt_at_ms=0``); its attempts are
        kept, so the forwarder looks the same idempotency key up before it charges.
        ``approved``/``declined``: finalized like :meth:`record_outcome` (status op,
        escrow settlement, receipt outbox). The payment's ``fwd_state`` is checked under
        its terminal's lock: of two resolutions at once one wins, the other raises
        ``Refused("not_parked")``; an unknown payment raises ``Refused("unknown_payment")``.
        Returns the payment as stored afterwards.
        """

    def expire_due(self, now_ms: int, limit: int) -> list[StatusChange]:
        """Expire pending payments past their deadline that were never attempted."""

    # -- receipts ----------------------------------------------------------------------------

    def claim_receipts(self, now_ms: int, lease_ms: int, limit: int) -> list[ReceiptJob]: ...

    def receipt_sent(self, payment_id: str, now_ms: int) -> None: ...

    def receipt_failed(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None: ...

    def receipt_undeliverable(self, payment_id: str, error: str, now_ms: int) -> None:
        """End a pending receipt unsent (``undeliverable``): the mail system refused it for
        good, or it failed ``ReceiptConfig.attempts_max`` times. It is never tried again."""

    # -- payments, refunds, disputes ---------------------------------------------------------

    def get_payment(self, payment_id: str) -> Payment | None: ...

    def list_payments(self, flt: PaymentFilter) -> list[Payment]: ...

    def refunds_of(self, payment_id: str) -> list[Refund]: ...

    def begin_refund(
        self,
        payment_id: str,
        refund_id: str,
        amount_minor: int,
        actor: str,
        now_ms: int,
        rules: Callable[[Payment, list[Refund]], None] | None = None,
    ) -> Refund:
        """Record a pending refund; ``rules`` (R9) runs inside the transaction on a fresh
        read and raises ``Refused`` to stop it.

        Re-using a ``refund_id`` with the same payment and amount returns the stored one.
        """

    def finish_refund(self, refund_id: str, now_ms: int) -> Refund:
        """Mark a pending refund done after the processor confirmed it, and append its op.
        A refund that is not pending is returned as it is."""

    def refuse_refund(
        self, refund_id: str, code: str, text: str, actor: str, now_ms: int
    ) -> Refund:
        """End a pending refund the processor refused for good (``refused``): its amount
        is no longer counted as refunded, and the change is audited with why (``code``, a
        word such as the processor's reason code, and ``text``). A void's refund ends its
        void ``refused_<code>``. A refund that is not pending is returned as it is."""

    def pending_refunds(self, limit: int) -> list[Refund]: ...

    def park_refund(self, refund_id: str, reason: str, actor: str, now_ms: int) -> Refund:
        """Park a pending refund that the processor cannot make under its id (another
        request holds that id there): it is no longer retried, its amount stays counted as
        refunded until a person resolves it, and the parking is audited with ``reason``.
        A refund that is not pending is returned as it is."""

    def resolve_refund(
        self, refund_id: str, action: str, actor: str, note: str | None, now_ms: int
    ) -> Refund:
        """A person's decision on a parked refund, audited in the same transaction:
        ``retry`` (pending again, for the processor under the same id), ``done`` (the
        processor's record shows it made: done, with its ``refund`` op) or ``refused``
        (it was not made: its amount is refundable again). Raises ``Refused``
        (``unknown_refund``, ``not_parked``)."""

    def list_refunds(self, merchant_id: str, state: str, limit: int) -> list[Refund]:
        """A merchant's refunds in ``state`` (``pending`` or ``parked``), oldest first."""

    def set_dispute(self, payment_id: str, open_: bool, actor: str, now_ms: int) -> None: ...

    def pending_voids(self, limit: int) -> list[tuple[str, str, int]]:
        """(payment_id, terminal_id, requested_at_ms) of terminal void requests to act on."""

    def finish_void(self, payment_id: str, state: str, now_ms: int) -> str | None:
        """End a pending void as ``state`` (``voided`` or why not). A refusal is also
        written to the requesting terminal's stream (``rules.void_refusal``) in the same
        transaction; returns that terminal's id when an op was written, else ``None``. A
        void that is no longer pending is left as it is."""

    # -- batches and reports -----------------------------------------------------------------

    def last_closed_day(self, merchant_id: str) -> str | None: ...

    def payments_between(self, merchant_id: str, from_ms: int, to_ms: int) -> list[Payment]:
        """Payments captured or processed in [from_ms, to_ms)."""

    def batch_payments(self, batch_id: int) -> list[Payment]: ...

    def receipt_states(self) -> dict[str, str]: ...

    def close_batch(
        self, merchant_id: str, business_day: str, close_at_ms: int, now_ms: int
    ) -> Batch | None:
        """Close the day's batch: everything processed before ``close_at_ms`` and not yet
        in a batch. None if that day's batch is already closed."""

    def list_batches(self, merchant_id: str, limit: int) -> list[Batch]: ...

    def get_batch(self, batch_id: int) -> Batch | None: ...

    def get_batch_of_day(self, merchant_id: str, business_day: str) -> Batch | None:
        """The merchant's batch of that business day (``YYYY-MM-DD``), however old."""

    def list_merchants(self) -> list[MerchantInfo]: ...

    def z_report(self, terminal_id: str, reset: bool, now_ms: int) -> dict[str, object]:
        """Totals of the terminal since its last Z reset; ``reset`` closes the period."""

    def audit(self, actor: str, action: str, detail: str, now_ms: int) -> None: ...

    def counts(self) -> dict[str, int]:
        """Gauges for /metrics (payments by status, pending forwards, outbox size ...)."""


def apply_refund_resolution(
    store: Store, refund: Refund, action: str, actor: str, note: str | None, now_ms: int
) -> Refund:
    """The part of ``resolve_refund`` both backends share, inside their transaction, once
    the parked ``refund`` (read under the lock) was made pending again: the audit row, then
    ``done`` / ``refused`` through ``finish_refund`` / ``refuse_refund``; ``retry`` leaves
    it pending."""
    store.audit(
        actor,
        "refund.resolve",
        refund_resolution_audit_detail(refund.payment_id, refund.refund_id, action, note),
        now_ms,
    )
    if action == "done":
        return store.finish_refund(refund.refund_id, now_ms)
    if action == "refused":
        return store.refuse_refund(
            refund.refund_id, RESOLVED_NOT_MADE_CODE, RESOLVED_NOT_MADE_TEXT, actor, now_ms
        )
    return dataclasses.replace(refund, state=REFUND_PENDING)


def op_from_row(data: bytes, digest: str) -> Op:
    """An op read back from the ``ops`` table (its canonical bytes), checked against the
    digest stored beside it: a row that does not match is corruption, never used.

    The bytes come from :func:`canonical.loads`, which yields only JSON types, so the body
    is not walked again (``_from_json``); every other check of an op is made.
    """
    try:
        _version, origin, seq, hlc, kind, body, prev = canonical.loads(data)
        op = Op.from_wire([origin, seq, hlc, kind, body, prev], _from_json=True)
    except (ProtocolError, TypeError, ValueError) as exc:
        raise StorageError(f"a stored op is not a valid op: corruption ({exc})") from None
    if op.digest != digest:
        raise StorageError(f"stored op {origin}#{seq} does not match its digest: corruption")
    return op


class StoreRunner:
    """Runs store calls off the event loop on a bounded pool of threads.

    SQLite uses one thread (one writer, no lock needed); a PostgreSQL store may use more.
    """

    def __init__(self, store: Store, threads_max: int = 1) -> None:
        if threads_max < 1:
            raise ValueError("threads_max must be >= 1")
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=threads_max, thread_name_prefix="store")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
