"""Typed bodies of each op kind, with validation on the way in.

An op's ``body`` is a plain JSON object on the wire; these frozen dataclasses are how code
reads and writes it. ``parse_body(op)`` validates a received op's body completely (types,
bounds, allowed values) and raises :class:`ProtocolError` before any state changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from syncengine.core.canonical import WIRE_INT_MAX
from syncengine.core.errors import MoneyError, ProtocolError
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money, money_or_none
from syncengine.core.ops import Op

ID_CHARS_MAX = 64
EMAIL_CHARS_MAX = 254
SEALED_B64_CHARS_MAX = 2048

CHANNELS = frozenset({"integrated", "standalone", "offline"})
ENTRY_METHODS = frozenset({"tap", "insert", "swipe", "manual"})
MODES = frozenset(
    {"online", "outage_detected", "prompting", "offline", "window_closed", "forwarding", "disabled"}
)


def _str(data: dict[str, Any], key: str, chars_max: int = ID_CHARS_MAX) -> str:
    value = data.get(key)
    # ``type(...) is`` rather than isinstance: this runs for every field of every op merged.
    if type(value) is not str or not value or len(value) > chars_max:
        raise ProtocolError(f"body field {key!r} must be a non-empty string (<= {chars_max})")
    return value


def _opt_str(data: dict[str, Any], key: str, chars_max: int) -> str | None:
    if data.get(key) is None:
        return None
    return _str(data, key, chars_max)


_NOT_IN_EMAIL = frozenset(',;<>()[]"\\:')


def is_one_email_address(email: str) -> bool:
    """A receipt address a terminal takes for a new payment: one ``name@domain``, no
    spaces nor list or display-name punctuation, at most ``EMAIL_CHARS_MAX`` characters.

    Stricter than a stored capture's check (an ``@`` and no spaces), which stays as it was
    so that ops stored by older terminals still merge; the server sends a receipt only to
    exactly one address either way.
    """
    local, at, domain = email.partition("@")
    return (
        bool(at)
        and 0 < len(email) <= EMAIL_CHARS_MAX
        and bool(local)
        and "." in domain.strip(".")
        and "@" not in domain
        and email.isprintable()
        and not any(c.isspace() or c in _NOT_IN_EMAIL for c in email)
    )


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is not int or not 0 <= value <= WIRE_INT_MAX:
        raise ProtocolError(
            f"body field {key!r} must be an integer from 0 to {WIRE_INT_MAX}, got {value!r}"
        )
    return value


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    return None if data.get(key) is None else _int(data, key)


def _money(data: dict[str, Any], key: str) -> Money:
    try:
        return Money.from_wire(data.get(key))
    except MoneyError as exc:
        raise ProtocolError(f"body field {key!r}: {exc}") from None


def _one_of(data: dict[str, Any], key: str, allowed: frozenset[str]) -> str:
    value = _str(data, key)
    if value not in allowed:
        raise ProtocolError(f"body field {key!r} must be one of {sorted(allowed)}")
    return value


def _exact_keys(data: dict[str, Any], required: frozenset[str], optional: frozenset[str]) -> None:
    keys = data.keys()
    if keys == required:
        return  # the common case, one comparison
    if not required <= keys or not keys <= required | optional:
        raise ProtocolError(
            f"body fields {sorted(keys)}: need {sorted(required)}, may add {sorted(optional)}"
        )


_NONE: frozenset[str] = frozenset()
_CO_BRANDS_MAX = 4
_CARD_KEYS = frozenset({"brand", "last4", "entry_method", "sealed", "co_brands"})
_CAPTURE_KEYS = frozenset(
    {
        "payment_id",
        "merchant_id",
        "amount",
        "channel",
        "card",
        "captured_at_ms",
        "expires_at_ms",
        "device_class",
        "email",
    }
)
_MODE_KEYS = frozenset({"from", "to", "reason", "at_ms"})
_VOID_KEYS = frozenset({"payment_id", "at_ms"})
_STATUS_KEYS = frozenset({"payment_id", "status", "at_ms", "code", "message"})
_REFUND_KEYS = frozenset({"payment_id", "refund_id", "amount", "at_ms"})
_SETTING_KEYS = frozenset({"key", "value"})
_GRANT_KEYS = frozenset({"total", "at_ms"})
_DISPUTE_KEYS = frozenset({"payment_id", "open", "at_ms"})


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What a terminal may store about a card: never the number, only the sealed blob."""

    brand: str
    last4: str
    entry_method: str
    sealed: str  # base64url envelope only the processor can open
    co_brands: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        return {
            "brand": self.brand,
            "last4": self.last4,
            "entry_method": self.entry_method,
            "sealed": self.sealed,
            "co_brands": list(self.co_brands),
        }

    @classmethod
    def from_body(cls, data: object) -> CardInfo:
        if not isinstance(data, dict):
            raise ProtocolError("card must be an object")
        _exact_keys(data, _CARD_KEYS, _NONE)
        last4 = _str(data, "last4", 4)
        if len(last4) != 4 or not last4.isdigit():
            raise ProtocolError("card last4 must be 4 digits")
        co = data["co_brands"]
        if (
            not isinstance(co, list)
            or len(co) > _CO_BRANDS_MAX
            or not all(isinstance(b, str) for b in co)
        ):
            raise ProtocolError("card co_brands must be a short list of strings")
        return cls(
            _str(data, "brand", 32),
            last4,
            _one_of(data, "entry_method", ENTRY_METHODS),
            _str(data, "sealed", SEALED_B64_CHARS_MAX),
            tuple(co),
        )


@dataclass(frozen=True, slots=True)
class Capture:
    """A payment taken on a terminal (kind ``capture``)."""

    payment_id: str
    merchant_id: str
    amount: Money
    channel: str
    card: CardInfo
    captured_at_ms: int
    expires_at_ms: int | None  # deadline to reach the processor; None for integrated
    device_class: str
    email: str | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "merchant_id": self.merchant_id,
            "amount": self.amount.to_wire(),
            "channel": self.channel,
            "card": self.card.to_body(),
            "captured_at_ms": self.captured_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "device_class": self.device_class,
            "email": self.email,
        }

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> Capture:
        if cls is Capture:
            fast = capture_or_none(data)
            if fast is not None:
                return fast
        return cls.from_body_checked(data)

    @classmethod
    def from_body_checked(cls, data: dict[str, Any]) -> Capture:
        """The detailed validator: says precisely what is wrong with ``data``."""
        _exact_keys(data, _CAPTURE_KEYS, _NONE)
        amount = _money(data, "amount")
        if not amount.is_positive():
            raise ProtocolError("a captured amount must be positive")
        email = _opt_str(data, "email", EMAIL_CHARS_MAX)
        if email is not None and ("@" not in email or any(c.isspace() for c in email)):
            raise ProtocolError("email must look like name@example.com")
        return cls(
            _str(data, "payment_id"),
            _str(data, "merchant_id"),
            amount,
            _one_of(data, "channel", CHANNELS),
            CardInfo.from_body(data["card"]),
            _int(data, "captured_at_ms"),
            _opt_int(data, "expires_at_ms"),
            _str(data, "device_class", 32),
            email,
        )


@dataclass(frozen=True, slots=True)
class ModeChange:
    """A terminal's offline-mode change (kind ``mode``), recorded for the audit trail (R4)."""

    from_mode: str
    to_mode: str
    reason: str
    at_ms: int

    def to_body(self) -> dict[str, Any]:
        return {
            "from": self.from_mode,
            "to": self.to_mode,
            "reason": self.reason,
            "at_ms": self.at_ms,
        }

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> ModeChange:
        _exact_keys(data, _MODE_KEYS, _NONE)
        return cls(
            _one_of(data, "from", MODES),
            _one_of(data, "to", MODES),
            _str(data, "reason", 128),
            _int(data, "at_ms"),
        )


@dataclass(frozen=True, slots=True)
class VoidRequest:
    """A terminal asks to void a same-day standalone payment (kind ``void_request``)."""

    payment_id: str
    at_ms: int

    def to_body(self) -> dict[str, Any]:
        return {"payment_id": self.payment_id, "at_ms": self.at_ms}

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> VoidRequest:
        _exact_keys(data, _VOID_KEYS, _NONE)
        return cls(_str(data, "payment_id"), _int(data, "at_ms"))


# A void the server did not make (R9: the merchant's time zone puts the payment on another
# day, the processor refused the refund, ...) comes back to the terminal as a ``status`` op
# that repeats the payment's status with the code ``void_refused:<reason>``. A status that
# does not move is ignored by terminals that predate it, so the server can send it to any
# terminal; newer ones end the pending void with a ``VoidRefused`` notice.
VOID_REFUSED_CODE_PREFIX = "void_refused:"
# The server's refund of a void has the id ``void:<payment_id>``; the terminal hears the
# void made when that refund op arrives.
VOID_REFUND_PREFIX = "void:"


def void_refused_reason(code: str) -> str | None:
    """The reason of a ``void_refused:<reason>`` status code, or ``None`` for any other."""
    if code.startswith(VOID_REFUSED_CODE_PREFIX):
        return code[len(VOID_REFUSED_CODE_PREFIX) :] or "refused"
    return None


@dataclass(frozen=True, slots=True)
class StatusChange:
    """The server's outcome for a payment (kind ``status``)."""

    payment_id: str
    status: Status
    at_ms: int
    code: str = ""  # processor decline/error code, e.g. "insufficient_funds"
    message: str = ""

    def to_body(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "status": self.status.value,
            "at_ms": self.at_ms,
            "code": self.code,
            "message": self.message,
        }

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> StatusChange:
        _exact_keys(data, _STATUS_KEYS, _NONE)
        status = _str(data, "status", 32)
        try:
            parsed = Status(status)
        except ValueError:
            raise ProtocolError(f"unknown status {status!r}") from None
        code, message = data["code"], data["message"]
        if not isinstance(code, str) or not isinstance(message, str) or len(message) > 512:
            raise ProtocolError("status code and message must be short strings")
        return cls(_str(data, "payment_id"), parsed, _int(data, "at_ms"), code[:64], message)


@dataclass(frozen=True, slots=True)
class RefundRecord:
    """A refund or void the server made (kind ``refund``)."""

    payment_id: str
    refund_id: str
    amount: Money
    at_ms: int

    def to_body(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "refund_id": self.refund_id,
            "amount": self.amount.to_wire(),
            "at_ms": self.at_ms,
        }

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> RefundRecord:
        _exact_keys(data, _REFUND_KEYS, _NONE)
        amount = _money(data, "amount")
        if not amount.is_positive():
            raise ProtocolError("a refund amount must be positive")
        return cls(_str(data, "payment_id"), _str(data, "refund_id"), amount, _int(data, "at_ms"))


@dataclass(frozen=True, slots=True)
class Setting:
    """A last-writer-wins setting for a terminal (kind ``setting``), ordered by op HLC."""

    key: str
    value: Any

    def to_body(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value}

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> Setting:
        _exact_keys(data, _SETTING_KEYS, _NONE)
        return cls(_str(data, "key"), data["value"])


@dataclass(frozen=True, slots=True)
class Grant:
    """Budget rights granted to a terminal (kind ``grant``): its total offline allowance.

    ``total`` is the cumulative amount granted (a grow-only counter); the terminal may hold
    outstanding offline payments up to ``total - released``.
    """

    total: Money
    at_ms: int

    def to_body(self) -> dict[str, Any]:
        return {"total": self.total.to_wire(), "at_ms": self.at_ms}

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> Grant:
        _exact_keys(data, _GRANT_KEYS, _NONE)
        return cls(_money(data, "total"), _int(data, "at_ms"))


@dataclass(frozen=True, slots=True)
class Dispute:
    """A chargeback dispute opened or closed on a payment (kind ``dispute``)."""

    payment_id: str
    open: bool
    at_ms: int

    def to_body(self) -> dict[str, Any]:
        return {"payment_id": self.payment_id, "open": self.open, "at_ms": self.at_ms}

    @classmethod
    def from_body(cls, data: dict[str, Any]) -> Dispute:
        _exact_keys(data, _DISPUTE_KEYS, _NONE)
        if type(data["open"]) is not bool:
            raise ProtocolError("dispute 'open' must be true or false")
        return cls(_str(data, "payment_id"), data["open"], _int(data, "at_ms"))


# The fast path of ``capture`` bodies, which are nearly all of a drain: the checks of
# Capture.from_body_checked, CardInfo.from_body and Money, inlined and in places stricter
# (an exact ``dict``/``str``/``int``/``list``, an ASCII email); the frozen slotted
# dataclasses are built through their slot descriptors. What it does not accept goes to
# the detailed validator, which raises the precise error (or accepts what only it judges).
# tests/core/test_bodies_fast.py checks that both paths agree.
_new = object.__new__
_CHANNELS_OK = frozenset(v for v in CHANNELS if 0 < len(v) <= ID_CHARS_MAX)
_ENTRY_METHODS_OK = frozenset(v for v in ENTRY_METHODS if 0 < len(v) <= ID_CHARS_MAX)
_CAPTURE_KEY_COUNT = len(_CAPTURE_KEYS)
_CARD_KEY_COUNT = len(_CARD_KEYS)


def _setter(cls: type, name: str) -> Any:
    """The slot descriptor's ``__set__`` of field ``name``: sets it despite ``frozen``."""
    return cls.__dict__[name].__set__


_set_brand = _setter(CardInfo, "brand")
_set_last4 = _setter(CardInfo, "last4")
_set_entry_method = _setter(CardInfo, "entry_method")
_set_sealed = _setter(CardInfo, "sealed")
_set_co_brands = _setter(CardInfo, "co_brands")
_set_payment_id = _setter(Capture, "payment_id")
_set_merchant_id = _setter(Capture, "merchant_id")
_set_amount = _setter(Capture, "amount")
_set_channel = _setter(Capture, "channel")
_set_card = _setter(Capture, "card")
_set_captured_at_ms = _setter(Capture, "captured_at_ms")
_set_expires_at_ms = _setter(Capture, "expires_at_ms")
_set_device_class = _setter(Capture, "device_class")
_set_email = _setter(Capture, "email")


def capture_or_none(data: object) -> Capture | None:
    """The :class:`Capture` of a valid ``capture`` body, or ``None`` (never raises).

    ``None`` means "not accepted here", not "invalid": :meth:`Capture.from_body_checked`
    then decides, with its precise message.
    """
    # Exactly the keys of _CAPTURE_KEYS: as many keys, and every one of them present.
    if type(data) is not dict or len(data) != _CAPTURE_KEY_COUNT:
        return None
    try:
        payment_id = data["payment_id"]
        merchant_id = data["merchant_id"]
        amount = data["amount"]
        channel = data["channel"]
        card = data["card"]
        captured_at_ms = data["captured_at_ms"]
        expires_at_ms = data["expires_at_ms"]
        device_class = data["device_class"]
        email = data["email"]
    except KeyError:
        return None
    if (
        type(payment_id) is not str
        or not 0 < len(payment_id) <= ID_CHARS_MAX
        or type(merchant_id) is not str
        or not 0 < len(merchant_id) <= ID_CHARS_MAX
        or type(channel) is not str
        or channel not in _CHANNELS_OK
        or type(captured_at_ms) is not int
        or not 0 <= captured_at_ms <= WIRE_INT_MAX
        or (
            expires_at_ms is not None
            and (type(expires_at_ms) is not int or not 0 <= expires_at_ms <= WIRE_INT_MAX)
        )
        or type(device_class) is not str
        or not 0 < len(device_class) <= 32
        or type(amount) is not dict
        or len(amount) != 2
        or type(card) is not dict
        or len(card) != _CARD_KEY_COUNT
    ):
        return None
    if email is not None and (
        type(email) is not str
        or not 0 < len(email) <= EMAIL_CHARS_MAX
        or "@" not in email
        # Printable ASCII holds no whitespace but the space itself; any other address
        # goes to the exact check (str.isspace on every character) of the slow path.
        or not email.isascii()
        or not email.isprintable()
        or " " in email
    ):
        return None
    # The amount: money_or_none makes Money's own checks; positive, as for a capture.
    money = money_or_none(amount.get("minor"), amount.get("currency"))
    if money is None or money.minor <= 0:
        return None
    try:
        brand = card["brand"]
        last4 = card["last4"]
        entry_method = card["entry_method"]
        sealed = card["sealed"]
        co_brands = card["co_brands"]
    except KeyError:
        return None
    if (
        type(brand) is not str
        or not 0 < len(brand) <= 32
        or type(last4) is not str
        or len(last4) != 4
        or not last4.isdigit()
        or type(entry_method) is not str
        or entry_method not in _ENTRY_METHODS_OK
        or type(sealed) is not str
        or not 0 < len(sealed) <= SEALED_B64_CHARS_MAX
        or type(co_brands) is not list
        or len(co_brands) > _CO_BRANDS_MAX
    ):
        return None
    for co_brand in co_brands:
        if type(co_brand) is not str:
            return None
    info: CardInfo = _new(CardInfo)
    _set_brand(info, brand)
    _set_last4(info, last4)
    _set_entry_method(info, entry_method)
    _set_sealed(info, sealed)
    _set_co_brands(info, tuple(co_brands))
    capture: Capture = _new(Capture)
    _set_payment_id(capture, payment_id)
    _set_merchant_id(capture, merchant_id)
    _set_amount(capture, money)
    _set_channel(capture, channel)
    _set_card(capture, info)
    _set_captured_at_ms(capture, captured_at_ms)
    _set_expires_at_ms(capture, expires_at_ms)
    _set_device_class(capture, device_class)
    _set_email(capture, email)
    return capture


def without_sealed_card(capture: Capture) -> Capture:
    """``capture`` with an empty ``card.sealed``: what a terminal keeps in memory for its
    view of a payment (the envelope stays in the stored op). Built field by field as the
    decoder does: this runs for every payment when a terminal opens."""
    card = capture.card
    info: CardInfo = _new(CardInfo)
    _set_brand(info, card.brand)
    _set_last4(info, card.last4)
    _set_entry_method(info, card.entry_method)
    _set_sealed(info, "")
    _set_co_brands(info, card.co_brands)
    out: Capture = _new(Capture)
    _set_payment_id(out, capture.payment_id)
    _set_merchant_id(out, capture.merchant_id)
    _set_amount(out, capture.amount)
    _set_channel(out, capture.channel)
    _set_card(out, info)
    _set_captured_at_ms(out, capture.captured_at_ms)
    _set_expires_at_ms(out, capture.expires_at_ms)
    _set_device_class(out, capture.device_class)
    _set_email(out, capture.email)
    return out


Body = Capture | ModeChange | VoidRequest | StatusChange | RefundRecord | Setting | Grant | Dispute

_PARSERS: dict[str, Any] = {
    "capture": Capture.from_body,
    "mode": ModeChange.from_body,
    "void_request": VoidRequest.from_body,
    "status": StatusChange.from_body,
    "refund": RefundRecord.from_body,
    "setting": Setting.from_body,
    "grant": Grant.from_body,
    "dispute": Dispute.from_body,
}


def parse_body(op: Op) -> Body:
    """Validate and type the body of ``op`` or raise :class:`ProtocolError`."""
    typed: Body | None = op._typed  # checked and typed when it was decoded (push_codec)
    if typed is not None:
        return typed
    if op.kind == "capture":
        capture = capture_or_none(op.body)
        if capture is not None:
            return capture
        return Capture.from_body_checked(op.body)
    parser = _PARSERS.get(op.kind)
    if parser is None:
        raise ProtocolError(f"no body schema for kind {op.kind!r}")
    result: Body = parser(op.body)
    return result
