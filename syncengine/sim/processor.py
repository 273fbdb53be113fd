"""The simulated processor: the real :class:`~syncengine.processor.sandbox.SandboxCore`
ledger behind the fault switches the scenario turns on and off.

``processor_outage`` sets the sandbox's own ``outage`` switch; ``outcome_unknown`` its
``outcome_unknown_ppm`` (the charge commits, the answer is lost); ``processor_slow`` makes
every call take ``latency_ms`` of virtual time, and a call slower than the forwarder's
``call_timeout_ms`` is an unknown outcome for the caller (it gave up waiting).

Planted bugs (:mod:`syncengine.sim.faults`) that live at the processor boundary are applied
here, *around* the real forwarder, never inside it.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

from syncengine.core.errors import SyncEngineError
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    OutcomeUnknown,
    RefundRequest,
    RefundResult,
)
from syncengine.processor.sandbox import PPM, LedgerCharge, LedgerRefund, SandboxCore
from syncengine.sim.facts import Charge, RefundEntry

CALL_TIMEOUT_MS_DEFAULT = 10_000
RETRY_KEY_SUFFIX = "-r"


class SimProcessor:
    """SandboxCore plus virtual-time faults; every random draw comes from ``rng``."""

    def __init__(self, private_key: bytes, rng: random.Random) -> None:
        self.rng = rng
        self.core = SandboxCore(private_key, chance=rng.random)
        self.latency_ms = 0
        self.call_timeout_ms = CALL_TIMEOUT_MS_DEFAULT
        self.bugs: set[str] = set()
        self.calls_count = 0

    @property
    def public_key(self) -> bytes:
        return self.core.public_key

    @property
    def outage(self) -> bool:
        return self.core.faults.outage

    def set_outage(self, on: bool) -> None:
        self.core.set_faults(replace(self.core.faults, outage=on))

    def set_unknown_probability(self, probability: float) -> None:
        ppm = max(0, min(PPM, int(probability * PPM)))
        self.core.set_faults(replace(self.core.faults, outcome_unknown_ppm=ppm))

    def charge(self, now_ms: int, request: ChargeRequest) -> ChargeResult:
        """Charge through the sandbox; raises ProcessorUnavailable / OutcomeUnknown."""
        self.calls_count += 1
        result = self.core.charge(request, now_ms + self.latency_ms)
        if self.latency_ms > self.call_timeout_ms:
            raise OutcomeUnknown(f"no answer within {self.call_timeout_ms} ms")
        if "retry_decline_new_key" in self.bugs and result.outcome == "declined":
            # PLANTED BUG: a forwarder that "retries" a hard decline under a fresh key.
            retry = replace(request, payment_id=request.payment_id + RETRY_KEY_SUFFIX)
            with contextlib.suppress(SyncEngineError):  # the bug ignores how its retry ends
                self.core.charge(retry, now_ms + self.latency_ms)
        return result

    def refund(self, now_ms: int, request: RefundRequest) -> RefundResult:
        """Refund through the sandbox (idempotent per refund id); raises like ``charge``."""
        self.calls_count += 1
        if "void_new_refund_id" in self.bugs and request.refund_id.startswith("void:"):
            # PLANTED BUG: a void's refund is sent under a new refund id on every call.
            request = replace(request, refund_id=f"{request.refund_id}:{self.calls_count}")
        result = self.core.refund(request, now_ms + self.latency_ms)
        if self.latency_ms > self.call_timeout_ms:
            raise OutcomeUnknown(f"no answer within {self.call_timeout_ms} ms")
        return result

    def lookup(self, now_ms: int, payment_id: str) -> ChargeResult | None:
        self.calls_count += 1
        return self.core.lookup(payment_id)

    def ledger(self) -> list[Charge]:
        """The sandbox ledger's charges as checker facts."""
        return [
            Charge(
                e.payment_id,
                e.amount.minor,
                e.amount.currency,
                e.outcome,
                e.at_ms,
                e.terminal_id,
                e.captured_at_ms,
            )
            for e in self.core.ledger()
            if isinstance(e, LedgerCharge)
        ]

    def refunds(self) -> list[RefundEntry]:
        """The sandbox ledger's refunds as checker facts."""
        return [
            RefundEntry(e.refund_id, e.payment_id, e.amount.minor, e.at_ms)
            for e in self.core.ledger()
            if isinstance(e, LedgerRefund)
        ]
