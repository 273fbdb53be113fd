"""The processor interface the sync server's forwarder calls.

A real deployment plugs in its acquirer here; this repository ships the sandbox service
(:mod:`syncengine.processor.sandbox`) that behaves like one, faults included.

Contract
--------
- ``charge(request)`` is idempotent by ``request.payment_id``: the same key returns the
  first result and never charges twice; a different request under a used key raises
  :class:`IdempotencyConflict`.
- A transient failure raises :class:`ProcessorUnavailable` (nothing was charged, retry).
- A lost response raises :class:`OutcomeUnknown` (something may have been charged): the
  caller resolves it with ``lookup(payment_id)``, never with a charge under a new key.
- ``declined`` is a final answer: never retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from syncengine.core.errors import SyncEngineError
from syncengine.core.money import Money

Outcome = Literal["approved", "declined"]


class ProcessorError(SyncEngineError):
    """Base of processor failures."""


class ProcessorUnavailable(ProcessorError):
    """The processor could not be reached or failed before charging: retry later."""


class OutcomeUnknown(ProcessorError):
    """The request may or may not have been applied: resolve by lookup, same key."""


class IdempotencyConflict(ProcessorError):
    """A different request was sent under an idempotency key already used."""


class RequestRefused(ProcessorError):
    """The processor refused the request itself (HTTP 400/413: a field it does not accept).

    Nothing was applied, and the same request would be refused again: retrying cannot help,
    so the caller parks it for a person rather than retry it for ever.
    """


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    payment_id: str  # the idempotency key, made on the terminal at capture
    merchant_id: str
    terminal_id: str
    amount: Money
    sealed_card: str  # base64url envelope sealed to the processor, aad = payment_id
    channel: str
    captured_at_ms: int


@dataclass(frozen=True, slots=True)
class ChargeResult:
    payment_id: str
    outcome: Outcome
    code: str  # "approved", or a decline code such as "insufficient_funds"
    message: str
    processor_ref: str
    processed_at_ms: int
    amount: Money  # what this record charged (or declined): a lookup is checked against it


@dataclass(frozen=True, slots=True)
class RefundRequest:
    payment_id: str
    refund_id: str  # idempotency key of the refund
    amount: Money


@dataclass(frozen=True, slots=True)
class RefundResult:
    payment_id: str
    refund_id: str
    amount: Money
    processed_at_ms: int


class Processor(Protocol):
    """What the forwarder needs from a card processor."""

    async def charge(self, request: ChargeRequest) -> ChargeResult: ...

    async def lookup(self, payment_id: str) -> ChargeResult | None: ...

    async def refund(self, request: RefundRequest) -> RefundResult: ...

    async def public_key(self) -> bytes: ...
