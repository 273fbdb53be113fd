"""The sandbox processor's ledger: pure, deterministic, shared by the HTTP service and the
simulator.

Theory of operation
-------------------
1. **Sans-I/O.** :class:`SandboxCore` never reads a clock, draws randomness or touches a
   disk. Each call is one event: ``charge(request, now_ms)``, ``lookup(payment_id)``,
   ``refund(request, now_ms)``. Randomness for the probabilistic fault comes from the
   ``chance`` callable given to the constructor (``random.Random(seed).random`` in the
   simulator, ``random.random`` in the service).
2. **The ledger is an append-only journal** of :class:`LedgerCharge` and
   :class:`LedgerRefund` entries, numbered 1, 2, 3, ... (``position``). A shell that
   persists the ledger reads :meth:`SandboxCore.entries_since` after every call and writes
   those entries before it answers; on restart it passes them back to the constructor.
   After calling a method, you must persist ``entries_since(previous entry_count)``.
3. **Idempotency.** A charge is keyed by ``payment_id``: the same key with the same
   request returns the first result and appends nothing; a different request under a
   used key raises :class:`IdempotencyConflict`. A refund is keyed by ``refund_id`` the
   same way. Declines are final answers and are recorded; a transient error records
   nothing (so a retry under the same key may still succeed).
4. **Outcomes come from the test card number** (:data:`TEST_CARDS`, docs/processor.md).
   A card that does not open with the processor key and ``card_aad(payment_id)`` is
   declined ``invalid_card_data``. Any other Luhn-valid card is approved. Expiry dates
   are not checked: use the ``expired_card`` test number.
5. **Faults are data** (:class:`Faults`): ``outage`` makes charge, lookup and refund raise
   :class:`ProcessorUnavailable` without touching the ledger; ``outcome_unknown_next`` and
   ``outcome_unknown_ppm`` make a charge commit to the ledger and then raise
   :class:`OutcomeUnknown` (the response was lost); ``refuse_next`` makes the next charges
   and refunds raise :class:`RequestRefused` before anything is applied (the HTTP service
   answers 400, as for a malformed request); ``latency_ms`` is only reported, the
   shell sleeps; ``idempotency_window_ms`` prunes keys: a charge under a key first used
   that long ago is charged again (a second ledger entry, reported by the audit), while
   ``lookup`` still finds the latest charge of a payment id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from syncengine.core import canonical
from syncengine.core.crypto import b64d, card_aad, open_card, x25519_public_from_private
from syncengine.core.errors import (
    ConfigError,
    CryptoError,
    ProtocolError,
    Refused,
    check,
)
from syncengine.core.money import Money
from syncengine.processor import wire
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    IdempotencyConflict,
    Outcome,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundRequest,
    RefundResult,
    RequestRefused,
)

LEDGER_ENTRIES_MAX = 1_000_000  # a sandbox, not a bank: refuse (503) beyond this
LATENCY_MS_MAX = 60_000
IDEMPOTENCY_WINDOW_MS_MAX = 90 * 24 * 3_600_000  # 90 days
OUTCOME_UNKNOWN_NEXT_MAX = 1_000_000
PPM = 1_000_000  # probabilities are integer parts per million (no floats on the wire)

OutcomeUnknownMode = Literal["504", "drop"]

# --- test cards -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardRule:
    """What the sandbox does with one test card number."""

    kind: Literal["approve", "decline", "transient"]
    code: str
    message: str


APPROVED = CardRule("approve", "approved", "approved")

# Numbers follow the public test cards of card processors (Stripe's, for Visa declines).
TEST_CARDS: dict[str, CardRule] = {
    "4242424242424242": APPROVED,
    "4000056655665556": APPROVED,  # Visa debit
    "5555555555554444": APPROVED,
    "2223003122003222": APPROVED,  # Mastercard 2-series
    "378282246310005": APPROVED,
    "6011111111111117": APPROVED,
    "4000000000000002": CardRule("decline", "card_declined", "the card was declined"),
    "4000000000009995": CardRule("decline", "insufficient_funds", "insufficient funds"),
    "4000000000009987": CardRule("decline", "lost_card", "the card was reported lost"),
    "4000000000009979": CardRule("decline", "stolen_card", "the card was reported stolen"),
    "4000000000000069": CardRule("decline", "expired_card", "the card has expired"),
    "4000000000000119": CardRule(
        "transient", "processing_error", "the processor failed; retry with the same key"
    ),
}

INVALID_CARD = CardRule(
    "decline",
    "invalid_card_data",
    "the sealed card could not be opened by the processor key for this payment",
)


def rule_for(pan: str) -> CardRule:
    """The sandbox's answer for a (Luhn-valid) card number: the table, else approve."""
    return TEST_CARDS.get(pan, APPROVED)


def brand_of(pan: str) -> str:
    """Card brand from the number's prefix (enough for the sandbox's ledger)."""
    if pan.startswith("4"):
        return "visa"
    if pan[:2] in {"51", "52", "53", "54", "55"} or 2221 <= int(pan[:4]) <= 2720:
        return "mastercard"
    if pan[:2] in {"34", "37"}:
        return "amex"
    if pan.startswith(("6011", "65")) or 644 <= int(pan[:3]) <= 649:
        return "discover"
    return "other"


# --- faults -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault switches. The default is a healthy processor."""

    outage: bool = False
    latency_ms: int = 0
    outcome_unknown_next: int = 0  # the next N charges commit but their answer is lost
    outcome_unknown_ppm: int = 0  # each charge's answer is lost with probability ppm/10^6
    outcome_unknown_mode: OutcomeUnknownMode = "504"  # how the HTTP service loses it
    # The next N charges and refunds are refused as requests (HTTP 400) before anything is
    # applied, as a processor does with a field it will not accept.
    refuse_next: int = 0
    # A charge under a key first used this long ago (or longer) is a new charge, as with
    # a processor that prunes idempotency keys (Stripe: 24 h). 0: keys are kept forever.
    idempotency_window_ms: int = 0

    def __post_init__(self) -> None:
        if type(self.outage) is not bool:
            raise ConfigError("outage must be true or false")
        for name, high in (
            ("latency_ms", LATENCY_MS_MAX),
            ("outcome_unknown_next", OUTCOME_UNKNOWN_NEXT_MAX),
            ("outcome_unknown_ppm", PPM),
            ("refuse_next", OUTCOME_UNKNOWN_NEXT_MAX),
            ("idempotency_window_ms", IDEMPOTENCY_WINDOW_MS_MAX),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= high:
                raise ConfigError(f"{name} must be an integer from 0 to {high}")
        if self.outcome_unknown_mode not in ("504", "drop"):
            raise ConfigError('outcome_unknown_mode must be "504" or "drop"')

    def to_wire(self) -> dict[str, Any]:
        """JSON form, as served by ``GET /v1/faults``."""
        return {
            "outage": self.outage,
            "latency_ms": self.latency_ms,
            "outcome_unknown_next": self.outcome_unknown_next,
            "outcome_unknown_ppm": self.outcome_unknown_ppm,
            "outcome_unknown_mode": self.outcome_unknown_mode,
            "refuse_next": self.refuse_next,
            "idempotency_window_ms": self.idempotency_window_ms,
        }

    def updated(self, changes: object) -> Faults:
        """Apply a partial JSON update (``POST /v1/faults``); raises ConfigError."""
        if not isinstance(changes, dict):
            raise ConfigError("faults must be a JSON object")
        unknown = sorted(set(changes) - set(self.to_wire()))
        if unknown:
            raise ConfigError(f"unknown fault(s): {', '.join(unknown)}")
        return replace(self, **changes)


# --- ledger entries ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerCharge:
    """One charge decision, approved or declined. Holds the last four digits only."""

    position: int
    payment_id: str
    merchant_id: str
    terminal_id: str
    amount: Money
    channel: str
    captured_at_ms: int
    fingerprint: str  # SHA-256 of the canonical request: tells a retry from a conflict
    outcome: Outcome
    code: str
    message: str
    processor_ref: str
    at_ms: int
    card_last4: str
    card_brand: str

    def result(self) -> ChargeResult:
        """The answer the caller gets (first and every later time)."""
        return ChargeResult(
            self.payment_id,
            self.outcome,
            self.code,
            self.message,
            self.processor_ref,
            self.at_ms,
            self.amount,
        )


@dataclass(frozen=True, slots=True)
class LedgerRefund:
    """One refund of (part of) an approved charge."""

    position: int
    refund_id: str
    payment_id: str
    amount: Money
    processor_ref: str
    at_ms: int

    def result(self) -> RefundResult:
        """The answer the caller gets (first and every later time)."""
        return RefundResult(self.payment_id, self.refund_id, self.amount, self.at_ms)


LedgerEntry = LedgerCharge | LedgerRefund


def entry_to_wire(entry: LedgerEntry) -> dict[str, Any]:
    """JSON form of a ledger entry (``GET /v1/ledger`` and the service's SQLite rows)."""
    if isinstance(entry, LedgerCharge):
        return {
            "kind": "charge",
            "position": entry.position,
            "payment_id": entry.payment_id,
            "merchant_id": entry.merchant_id,
            "terminal_id": entry.terminal_id,
            "amount": entry.amount.to_wire(),
            "channel": entry.channel,
            "captured_at_ms": entry.captured_at_ms,
            "fingerprint": entry.fingerprint,
            "outcome": entry.outcome,
            "code": entry.code,
            "message": entry.message,
            "processor_ref": entry.processor_ref,
            "at_ms": entry.at_ms,
            "card_last4": entry.card_last4,
            "card_brand": entry.card_brand,
        }
    return {
        "kind": "refund",
        "position": entry.position,
        "refund_id": entry.refund_id,
        "payment_id": entry.payment_id,
        "amount": entry.amount.to_wire(),
        "processor_ref": entry.processor_ref,
        "at_ms": entry.at_ms,
    }


_INT_FIELDS = frozenset({"position", "captured_at_ms", "at_ms"})


def entry_from_wire(value: object) -> LedgerEntry:
    """Validate and rebuild a ledger entry; raises ProtocolError."""
    if not isinstance(value, dict):
        raise ProtocolError("ledger entry must be a JSON object")
    kind = value.get("kind")
    if kind not in ("charge", "refund"):
        raise ProtocolError("ledger entry kind must be charge or refund")
    cls = LedgerCharge if kind == "charge" else LedgerRefund
    keys = frozenset(cls.__dataclass_fields__) | {"kind"}
    body = wire.object_with(value, keys, f"ledger {kind} entry")
    fields: dict[str, Any] = {}
    for name, raw in body.items():
        if name == "amount":
            fields[name] = wire.money(raw, name)
        elif name in _INT_FIELDS:
            fields[name] = wire.integer(raw, name, 0, wire.TIME_MS_MAX)
        elif name != "kind":
            fields[name] = wire.text(raw, name, wire.TEXT_CHARS_MAX, empty_ok=True)
    entry: LedgerEntry = cls(**fields)
    if isinstance(entry, LedgerCharge) and entry.outcome not in wire.OUTCOMES:
        raise ProtocolError("ledger charge outcome must be approved or declined")
    return entry


def fingerprint_of(request: ChargeRequest) -> str:
    """SHA-256 (hex) of the canonical JSON of a charge request."""
    return hashlib.sha256(canonical.dumps(wire.charge_request_to_wire(request))).hexdigest()


# --- audit ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Audit:
    """What the chaos checker asserts on: every count should be zero but the totals."""

    charges_count: int
    approved_count: int
    declined_count: int
    refunds_count: int
    approved_minor_by_currency: dict[str, int] = field(default_factory=dict)
    duplicate_charges: dict[str, int] = field(default_factory=dict)  # payment_id -> entries
    duplicate_refunds: dict[str, int] = field(default_factory=dict)  # refund_id -> entries
    over_refunded: tuple[str, ...] = ()  # payment ids refunded above their amount
    refunds_without_approval: tuple[str, ...] = ()  # refund ids of unapproved charges

    @property
    def ok(self) -> bool:
        """True when nothing was charged or refunded twice or beyond its amount."""
        return not (
            self.duplicate_charges
            or self.duplicate_refunds
            or self.over_refunded
            or self.refunds_without_approval
        )

    def to_wire(self) -> dict[str, Any]:
        """JSON form, part of ``GET /v1/ledger``."""
        return {
            "ok": self.ok,
            "charges_count": self.charges_count,
            "approved_count": self.approved_count,
            "declined_count": self.declined_count,
            "refunds_count": self.refunds_count,
            "approved_minor_by_currency": dict(self.approved_minor_by_currency),
            "duplicate_charges": dict(self.duplicate_charges),
            "duplicate_refunds": dict(self.duplicate_refunds),
            "over_refunded": list(self.over_refunded),
            "refunds_without_approval": list(self.refunds_without_approval),
        }


def audit_entries(entries: Iterable[LedgerEntry]) -> Audit:
    """Audit a ledger from its entries alone, trusting none of the core's indexes."""
    charges: dict[str, list[LedgerCharge]] = {}
    refunds: dict[str, list[LedgerRefund]] = {}
    for entry in entries:
        if isinstance(entry, LedgerCharge):
            charges.setdefault(entry.payment_id, []).append(entry)
        else:
            refunds.setdefault(entry.refund_id, []).append(entry)
    approved = [c for group in charges.values() for c in group if c.outcome == "approved"]
    totals: dict[str, int] = {}
    for c in approved:
        totals[c.amount.currency] = totals.get(c.amount.currency, 0) + c.amount.minor
    refunded: dict[str, int] = {}
    orphans: list[str] = []
    for refund_id, group in refunds.items():
        for r in group:
            target = [c for c in charges.get(r.payment_id, []) if c.outcome == "approved"]
            if not target or target[0].amount.currency != r.amount.currency:
                orphans.append(refund_id)
                continue
            refunded[r.payment_id] = refunded.get(r.payment_id, 0) + r.amount.minor
    over = [
        pid
        for pid, minor in refunded.items()
        if minor > next(c for c in charges[pid] if c.outcome == "approved").amount.minor
    ]
    n_charges = sum(len(g) for g in charges.values())
    return Audit(
        charges_count=n_charges,
        approved_count=len(approved),
        declined_count=n_charges - len(approved),
        refunds_count=sum(len(g) for g in refunds.values()),
        approved_minor_by_currency=totals,
        duplicate_charges={pid: len(g) for pid, g in charges.items() if len(g) > 1},
        duplicate_refunds={rid: len(g) for rid, g in refunds.items() if len(g) > 1},
        over_refunded=tuple(sorted(over)),
        refunds_without_approval=tuple(sorted(set(orphans))),
    )


# --- the core ---------------------------------------------------------------------------


class SandboxCore:
    """The sandbox processor's state and rules; see the module docstring.

    ``private_key`` is the processor's raw X25519 private key (32 bytes). ``entries`` is a
    ledger previously read from :meth:`entries_since` (positions 1..n, in order). ``chance``
    returns a float in [0, 1); it is needed only when ``outcome_unknown_ppm`` is set.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        entries: Sequence[LedgerEntry] = (),
        chance: Callable[[], float] | None = None,
        ledger_entries_max: int = LEDGER_ENTRIES_MAX,
    ) -> None:
        self._private_key = private_key
        self.public_key: bytes = x25519_public_from_private(private_key)
        self._chance = chance
        self._entries_max = ledger_entries_max
        self._entries: list[LedgerEntry] = []
        self._charges: dict[str, LedgerCharge] = {}
        self._refunds: dict[str, LedgerRefund] = {}
        self._refunded_minor: dict[str, int] = {}
        self._faults = Faults()
        for entry in entries:
            self._append(entry)

    # --- faults

    @property
    def faults(self) -> Faults:
        """The current fault switches."""
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault switches. A probability needs a ``chance`` source."""
        if faults.outcome_unknown_ppm and self._chance is None:
            raise ConfigError("outcome_unknown_ppm needs SandboxCore(chance=...)")
        self._faults = faults

    # --- ledger

    @property
    def entry_count(self) -> int:
        """Number of ledger entries (the position of the last one)."""
        return len(self._entries)

    def entries_since(self, count: int) -> list[LedgerEntry]:
        """Entries after the first ``count``: what a shell must persist after a call."""
        return self._entries[count:]

    def ledger(self) -> list[LedgerEntry]:
        """All ledger entries in order (charges and refunds)."""
        return list(self._entries)

    def charges_for(self, payment_id: str) -> list[LedgerCharge]:
        """Every ledger charge under ``payment_id`` (more than one would be a bug)."""
        return [
            e for e in self._entries if isinstance(e, LedgerCharge) and e.payment_id == payment_id
        ]

    def refunds_for(self, payment_id: str) -> list[LedgerRefund]:
        """Every refund of ``payment_id``."""
        return [
            e for e in self._entries if isinstance(e, LedgerRefund) and e.payment_id == payment_id
        ]

    def audit(self) -> Audit:
        """Audit the ledger (duplicates, over-refunds); see :func:`audit_entries`."""
        return audit_entries(self._entries)

    def _append(self, entry: LedgerEntry) -> None:
        check(entry.position == len(self._entries) + 1, "ledger positions are dense")
        if isinstance(entry, LedgerCharge):
            earlier = self._charges.get(entry.payment_id)
            # A second charge under one key only once the key was pruned
            # (``idempotency_window_ms``); the audit reports it as a duplicate.
            check(earlier is None or earlier.at_ms <= entry.at_ms, "charges of a key in order")
            self._charges[entry.payment_id] = entry
        else:
            charge = self._charges.get(entry.payment_id)
            check(charge is not None and charge.outcome == "approved", "refund of approved")
            check(entry.refund_id not in self._refunds, "one refund per refund id")
            self._refunds[entry.refund_id] = entry
            total = self._refunded_minor.get(entry.payment_id, 0) + entry.amount.minor
            check(charge is not None and total <= charge.amount.minor, "refunds <= amount")
            self._refunded_minor[entry.payment_id] = total
        self._entries.append(entry)

    def _room(self) -> None:
        if len(self._entries) >= self._entries_max:
            raise ProcessorUnavailable(
                f"sandbox ledger is full ({self._entries_max} entries); start with a new data dir"
            )

    def _available(self) -> None:
        if self._faults.outage:
            raise ProcessorUnavailable("processor outage (sandbox fault); retry later")

    # --- operations

    def charge(self, request: ChargeRequest, now_ms: int) -> ChargeResult:
        """Charge once per ``payment_id``; see the module docstring for the rules.

        Raises ProtocolError (malformed request), ProcessorUnavailable (outage, transient
        card; nothing charged), IdempotencyConflict, or OutcomeUnknown (committed, answer
        lost).
        """
        wire.validate_charge_request(request)
        self._available()
        self._maybe_refuse(f"charge {request.payment_id!r}")
        fingerprint = fingerprint_of(request)
        existing = self._charges.get(request.payment_id)
        window = self._faults.idempotency_window_ms
        if existing is not None and window and now_ms - existing.at_ms >= window:
            existing = None  # the key was pruned: this is a new charge (a second one)
        if existing is None:
            result = self._new_charge(request, fingerprint, now_ms)
        elif existing.fingerprint != fingerprint:
            raise IdempotencyConflict(
                f"payment {request.payment_id!r} was already charged with a different request;"
                " an idempotency key must not be reused for another payment"
            )
        else:
            result = existing.result()
        self._maybe_lose_answer(request.payment_id)
        return result

    def _new_charge(self, request: ChargeRequest, fingerprint: str, now_ms: int) -> ChargeResult:
        self._room()
        try:
            envelope = b64d(request.sealed_card, chars_max=wire.SEALED_CARD_CHARS_MAX)
            card = open_card(self._private_key, envelope, card_aad(request.payment_id))
        except (ProtocolError, CryptoError, Refused):
            rule, last4, brand = INVALID_CARD, "", "unknown"
        else:
            rule, last4, brand = rule_for(card.pan), card.pan[-4:], brand_of(card.pan)
        if rule.kind == "transient":
            raise ProcessorUnavailable(f"{rule.code}: {rule.message}")
        position = len(self._entries) + 1
        entry = LedgerCharge(
            position=position,
            payment_id=request.payment_id,
            merchant_id=request.merchant_id,
            terminal_id=request.terminal_id,
            amount=request.amount,
            channel=request.channel,
            captured_at_ms=request.captured_at_ms,
            fingerprint=fingerprint,
            outcome="approved" if rule.kind == "approve" else "declined",
            code=rule.code,
            message=rule.message,
            processor_ref=f"ch_{position:010d}",
            at_ms=now_ms,
            card_last4=last4,
            card_brand=brand,
        )
        self._append(entry)
        return entry.result()

    def _maybe_refuse(self, what: str) -> None:
        faults = self._faults
        if faults.refuse_next > 0:
            self._faults = replace(faults, refuse_next=faults.refuse_next - 1)
            raise RequestRefused(f"the {what} was refused as a request (sandbox fault)")

    def _maybe_lose_answer(self, payment_id: str) -> None:
        faults = self._faults
        if faults.outcome_unknown_next > 0:
            self._faults = replace(faults, outcome_unknown_next=faults.outcome_unknown_next - 1)
        elif not self._lost_by_chance(faults.outcome_unknown_ppm):
            return
        raise OutcomeUnknown(
            f"the charge for {payment_id!r} was committed but its answer was lost (sandbox"
            " fault); look it up by payment id"
        )

    def _lost_by_chance(self, ppm: int) -> bool:
        if ppm == 0 or self._chance is None:
            return False
        draw = self._chance()
        check(0.0 <= draw < 1.0, "chance() returns a float in [0, 1)")
        return draw * PPM < ppm

    def lookup(self, payment_id: str) -> ChargeResult | None:
        """The recorded answer for ``payment_id``, or None if it was never charged."""
        self._available()
        existing = self._charges.get(payment_id)
        return None if existing is None else existing.result()

    def refund(self, request: RefundRequest, now_ms: int) -> RefundResult:
        """Refund (part of) an approved charge, once per ``refund_id``.

        Raises ProtocolError (malformed), ProcessorUnavailable (outage), IdempotencyConflict
        (refund id reused for another refund) or Refused with reason ``charge_not_found``,
        ``charge_not_approved``, ``currency_mismatch`` or ``refund_exceeds_amount``.
        """
        wire.refund_request_from_wire(wire.refund_request_to_wire(request))
        self._available()
        self._maybe_refuse(f"refund {request.refund_id!r}")
        existing = self._refunds.get(request.refund_id)
        if existing is not None:
            if (existing.payment_id, existing.amount) != (request.payment_id, request.amount):
                raise IdempotencyConflict(
                    f"refund id {request.refund_id!r} was already used for a different refund"
                )
            return existing.result()
        charge = self._charges.get(request.payment_id)
        self._check_refundable(request, charge)
        self._room()
        position = len(self._entries) + 1
        entry = LedgerRefund(
            position,
            request.refund_id,
            request.payment_id,
            request.amount,
            f"re_{position:010d}",
            now_ms,
        )
        self._append(entry)
        return entry.result()

    def _check_refundable(self, request: RefundRequest, charge: LedgerCharge | None) -> None:
        if charge is None:
            raise Refused(
                "charge_not_found", f"no charge for payment {request.payment_id!r} to refund"
            )
        if charge.outcome != "approved":
            raise Refused(
                "charge_not_approved",
                f"payment {request.payment_id!r} was declined ({charge.code}); nothing to refund",
            )
        if request.amount.currency != charge.amount.currency:
            raise Refused(
                "currency_mismatch",
                f"refund is in {request.amount.currency} but the charge was in"
                f" {charge.amount.currency}",
            )
        refunded = self._refunded_minor.get(request.payment_id, 0)
        if refunded + request.amount.minor > charge.amount.minor:
            left = Money(charge.amount.minor - refunded, charge.amount.currency)
            raise Refused(
                "refund_exceeds_amount",
                f"at most {left} of payment {request.payment_id!r} is left to refund",
            )
