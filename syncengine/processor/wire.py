"""JSON shapes of the processor API, shared by the sandbox service and the HTTP client.

Every ``*_from_wire`` function validates an untrusted decoded JSON value and raises
:class:`ProtocolError` with a message that names the offending field; nothing is built from
a value that failed validation. Money is ``{"minor": int, "currency": str}``; times are
integer milliseconds; there are no floats (see docs/design.md).
"""

from __future__ import annotations

from typing import Any

from syncengine.core.errors import MoneyError, ProtocolError
from syncengine.core.money import Money
from syncengine.processor.api import ChargeRequest, ChargeResult, RefundRequest, RefundResult

ID_CHARS_MAX = 128  # payment, refund, merchant and terminal ids
TEXT_CHARS_MAX = 512  # codes, messages, processor references
SEALED_CARD_CHARS_MAX = 4096  # base64url of a card envelope is ~416 characters
TIME_MS_MAX = 2**53  # far beyond any real epoch milliseconds; keeps JSON numbers exact
CHANNELS = frozenset({"integrated", "standalone", "offline"})
OUTCOMES = frozenset({"approved", "declined"})

_CHARGE_REQUEST_KEYS = frozenset(
    {
        "payment_id",
        "merchant_id",
        "terminal_id",
        "amount",
        "sealed_card",
        "channel",
        "captured_at_ms",
    }
)
_CHARGE_RESULT_KEYS = frozenset(
    {"payment_id", "outcome", "code", "message", "processor_ref", "processed_at_ms", "amount"}
)
_REFUND_REQUEST_KEYS = frozenset({"payment_id", "refund_id", "amount"})
_REFUND_RESULT_KEYS = frozenset({"payment_id", "refund_id", "amount", "processed_at_ms"})


def object_with(value: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    """Return ``value`` as a dict if it has exactly ``keys``; else raise ProtocolError."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    missing = sorted(keys - set(value))
    unknown = sorted(set(value) - keys)
    if missing:
        raise ProtocolError(f"{what} is missing field(s): {', '.join(missing)}")
    if unknown:
        raise ProtocolError(f"{what} has unknown field(s): {', '.join(unknown)}")
    return value


def text(value: object, field: str, chars_max: int, *, empty_ok: bool = False) -> str:
    """Validate a string field: at most ``chars_max`` characters, no NUL, UTF-8 encodable."""
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be a string")
    if not empty_ok and not value:
        raise ProtocolError(f"{field} must not be empty")
    if len(value) > chars_max:
        raise ProtocolError(f"{field} is longer than {chars_max} characters")
    if "\x00" in value:
        raise ProtocolError(f"{field} must not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{field} is not valid Unicode text") from None
    return value


def integer(value: object, field: str, low: int, high: int) -> int:
    """Validate an integer field in ``[low, high]`` (booleans are not integers here)."""
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{field} must be an integer from {low} to {high}")
    return value


def money(value: object, field: str) -> Money:
    """Validate a positive :class:`Money` field."""
    try:
        amount = Money.from_wire(value)
    except MoneyError as exc:
        raise ProtocolError(f"{field}: {exc}") from None
    if not amount.is_positive():
        raise ProtocolError(f"{field} must be a positive amount")
    return amount


# --- charges ----------------------------------------------------------------------------


def charge_request_to_wire(request: ChargeRequest) -> dict[str, Any]:
    """The JSON body of ``POST /v1/charges``."""
    return {
        "payment_id": request.payment_id,
        "merchant_id": request.merchant_id,
        "terminal_id": request.terminal_id,
        "amount": request.amount.to_wire(),
        "sealed_card": request.sealed_card,
        "channel": request.channel,
        "captured_at_ms": request.captured_at_ms,
    }


def charge_request_from_wire(value: object) -> ChargeRequest:
    """Validate and build a :class:`ChargeRequest`."""
    body = object_with(value, _CHARGE_REQUEST_KEYS, "charge request")
    channel = text(body["channel"], "channel", ID_CHARS_MAX)
    if channel not in CHANNELS:
        raise ProtocolError(f"channel must be one of {', '.join(sorted(CHANNELS))}")
    return ChargeRequest(
        payment_id=text(body["payment_id"], "payment_id", ID_CHARS_MAX),
        merchant_id=text(body["merchant_id"], "merchant_id", ID_CHARS_MAX),
        terminal_id=text(body["terminal_id"], "terminal_id", ID_CHARS_MAX),
        amount=money(body["amount"], "amount"),
        sealed_card=text(body["sealed_card"], "sealed_card", SEALED_CARD_CHARS_MAX),
        channel=channel,
        captured_at_ms=integer(body["captured_at_ms"], "captured_at_ms", 0, TIME_MS_MAX),
    )


def validate_charge_request(request: ChargeRequest) -> None:
    """Raise ProtocolError unless a typed request would survive a wire round trip."""
    charge_request_from_wire(charge_request_to_wire(request))


def charge_result_to_wire(result: ChargeResult) -> dict[str, Any]:
    """The JSON body of a charge answer (200 approved, 402 declined, lookup 200)."""
    return {
        "payment_id": result.payment_id,
        "outcome": result.outcome,
        "code": result.code,
        "message": result.message,
        "processor_ref": result.processor_ref,
        "processed_at_ms": result.processed_at_ms,
        "amount": result.amount.to_wire(),
    }


def charge_result_from_wire(value: object) -> ChargeResult:
    """Validate and build a :class:`ChargeResult`."""
    body = object_with(value, _CHARGE_RESULT_KEYS, "charge result")
    outcome = body["outcome"]
    if outcome not in OUTCOMES:
        raise ProtocolError("outcome must be approved or declined")
    return ChargeResult(
        payment_id=text(body["payment_id"], "payment_id", ID_CHARS_MAX),
        outcome="approved" if outcome == "approved" else "declined",
        code=text(body["code"], "code", TEXT_CHARS_MAX),
        message=text(body["message"], "message", TEXT_CHARS_MAX, empty_ok=True),
        processor_ref=text(body["processor_ref"], "processor_ref", TEXT_CHARS_MAX),
        processed_at_ms=integer(body["processed_at_ms"], "processed_at_ms", 0, TIME_MS_MAX),
        amount=money(body["amount"], "amount"),
    )


# --- refunds ----------------------------------------------------------------------------


def refund_request_to_wire(request: RefundRequest) -> dict[str, Any]:
    """The JSON body of ``POST /v1/refunds``."""
    return {
        "payment_id": request.payment_id,
        "refund_id": request.refund_id,
        "amount": request.amount.to_wire(),
    }


def refund_request_from_wire(value: object) -> RefundRequest:
    """Validate and build a :class:`RefundRequest`."""
    body = object_with(value, _REFUND_REQUEST_KEYS, "refund request")
    return RefundRequest(
        payment_id=text(body["payment_id"], "payment_id", ID_CHARS_MAX),
        refund_id=text(body["refund_id"], "refund_id", ID_CHARS_MAX),
        amount=money(body["amount"], "amount"),
    )


def refund_result_to_wire(result: RefundResult) -> dict[str, Any]:
    """The JSON body of a successful refund."""
    return {
        "payment_id": result.payment_id,
        "refund_id": result.refund_id,
        "amount": result.amount.to_wire(),
        "processed_at_ms": result.processed_at_ms,
    }


def refund_result_from_wire(value: object) -> RefundResult:
    """Validate and build a :class:`RefundResult`."""
    body = object_with(value, _REFUND_RESULT_KEYS, "refund result")
    return RefundResult(
        payment_id=text(body["payment_id"], "payment_id", ID_CHARS_MAX),
        refund_id=text(body["refund_id"], "refund_id", ID_CHARS_MAX),
        amount=money(body["amount"], "amount"),
        processed_at_ms=integer(body["processed_at_ms"], "processed_at_ms", 0, TIME_MS_MAX),
    )
