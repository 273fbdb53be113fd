"""Recorded facts of one run: what the invariant checker reads, whichever tier made them.

The deterministic runner and the real-process tier both end a run by filling a
:class:`RunFacts`: every terminal's log as read back from its store, the server's ops as
read back from its store, the processor's ledger, and a trace of events seen from outside
(attempts and what the POS was told, acks on the wire, durable commits, link changes,
outstanding amounts). The checker never asks a live object anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from syncengine.core.ops import Op

# Trace event kinds (``TraceEvent.kind``).
ATTEMPT = "attempt"  # the POS asked for a payment (payment_id may be empty until assigned)
APPROVED_OFFLINE = "approved_offline"  # the POS was told "approved offline" (stored)
APPROVED_ONLINE = "approved_online"  # the POS was told "approved" by the processor
DECLINED_ONLINE = "declined_online"  # declined online at the till (not a capture)
REFUSED = "refused"  # refused by the terminal; detail = reason code
CRASH = "crash"  # detail = POWER_CUT_ACK_LOST when a reboot's power cut took back the ack marker
RESTART = "restart"
# The server's database was restored from a backup: what it wrote since is gone. DURABLE
# facts of what the restored database holds follow at once.
RESTORED = "restored"
MODE = "mode"  # detail = new mode
LINK = "link"  # value = 1 up / 0 down; terminal "" means the server or processor
DURABLE = "durable"  # server stored ops of origin ``detail`` up to seq ``value``
ACK = "ack"  # server sent an ack for origin ``detail`` up to seq ``value``
OUTSTANDING = "outstanding"  # value = outstanding offline minor units after a capture
STATUS = "status"  # server stream shows payment ``payment_id`` in status ``detail``
FAULT = "fault"  # detail = fault kind, value = 1 start / 0 end
FORWARD = "forward"  # a forwarder call; detail = result
VIOLATION = "violation"  # an adapter caught an InvariantViolation; detail = message
VOID_REQUESTED = "void_requested"  # the POS was told the void is requested (stored)
VOID_DECLINED_LOCALLY = "void_declined_locally"  # the terminal refused it; detail = reason
VOIDED = "voided"  # the terminal heard the void was made (PaymentVoided); value = amount
VOID_REFUSED = "void_refused"  # the terminal heard the server refused it; detail = reason
BUDGET = "budget"  # the owner set the merchant's offline budget to ``value`` minor units
NOTICE = "notice"  # the terminal told the POS ForwardingFailed; detail = its code
# Real tier: a payment's final status as the server stamped it (read from its store at the
# end; the in-memory tier's STATUS events say the same as they happen). detail = status.
RELEASED = "released"

# ``CRASH`` detail: the acknowledged seq, committed without fsync, went back with the power.
POWER_CUT_ACK_LOST = "power cut: the ack marker written without fsync was lost"


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One thing that happened, at virtual (or scenario-scaled real) time ``at_ms``."""

    at_ms: int
    kind: str
    terminal: str = ""
    payment_id: str = ""
    value: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Charge:
    """One entry of the processor's ledger: money actually moved (or a decline answered)."""

    payment_id: str  # the idempotency key the charge was made under
    amount_minor: int
    currency: str
    outcome: str  # "approved" | "declined"
    at_ms: int
    terminal_id: str = ""
    captured_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class RefundEntry:
    """One refund in the processor's ledger."""

    refund_id: str  # the idempotency key the refund was made under
    payment_id: str
    amount_minor: int
    at_ms: int


@dataclass
class TerminalFacts:
    """A terminal as read back from its store at the end of a run."""

    terminal_id: str
    device_class: str
    per_transaction_limit_minor: int
    total_limit_minor: int
    ops: list[Op] = field(default_factory=list)  # own origin and server/<id>, as stored
    mode: str = ""
    files: list[Path] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)  # in-memory stores' bytes, for greps


@dataclass
class RunFacts:
    """Everything the checker needs about one run."""

    name: str
    seed: int
    start_ms: int
    end_ms: int
    currency: str
    settle_ms: int
    terminals: dict[str, TerminalFacts] = field(default_factory=dict)
    server_ops: list[Op] = field(default_factory=list)
    server_files: list[Path] = field(default_factory=list)
    server_blobs: list[bytes] = field(default_factory=list)
    ledger: list[Charge] = field(default_factory=list)
    refunds: list[RefundEntry] = field(default_factory=list)  # the ledger's refunds
    timezone: str = "UTC"  # the merchant's time zone (its business day, for voids)
    trace: list[TraceEvent] = field(default_factory=list)
    pans: set[str] = field(default_factory=set)  # every card number used, to grep for
    healed_at_ms: int | None = None  # everything up from here to the end (None: never)
    down_at_end: set[str] = field(default_factory=set)  # terminals still cut off at the end
    # The merchant-wide offline budget the run set (None: none, or not checkable there).
    offline_budget_minor: int | None = None
    # The terminals the server's budget still waited for at the end after a restore
    # (``EscrowState.held_by``; None: not read).
    restore_hold: tuple[str, ...] | None = None


class Trace:
    """An append-only list of :class:`TraceEvent` with a bound."""

    EVENTS_MAX = 2_000_000

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []

    def add(
        self,
        at_ms: int,
        kind: str,
        terminal: str = "",
        payment_id: str = "",
        value: int = 0,
        detail: str = "",
    ) -> None:
        if len(self.events) < self.EVENTS_MAX:
            self.events.append(TraceEvent(at_ms, kind, terminal, payment_id, value, detail))
