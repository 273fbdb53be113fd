"""The typed decoder of push frames that carry captures: the drain path's fast lane.

A drain is push frames of up to 500 ``capture`` ops. :func:`protocol.decode` parses a
frame into dicts, then checks every op (:meth:`Op.from_wire`) and the server checks every
capture body (:func:`bodies.parse_body`), all in Python: about 15 us an op on the
server's store thread, the larger part of its work per op. Here one msgspec decode of the
whole frame into typed structs checks, in C, what those checks would (exact keys, types,
lengths, allowed values, ranges); Python then makes the few checks msgspec cannot
express, encodes each op's canonical bytes from its struct, hashes them, and builds the
:class:`Op` and its :class:`Capture` directly.

A backlog rarely holds captures alone: the terminal records a ``mode`` op when it goes
offline and when it comes back, so the first push of a drain (and the only push of a
terminal with a small backlog) mixes kinds. Such a frame is decoded with its ops left as
raw JSON: each capture op through the typed decoder of one op, each other op (small, a
few fields) the general way (:func:`canonical.loads`, :meth:`Op.from_wire`), as the
general decoder would decode it inside the frame.

The rule that makes this safe: :func:`decode_push` accepts a frame only if the general
decoder would accept it *with the same result* (the same ops, bytes, digests and typed
captures), and returns ``None`` for anything else -- a frame of other kinds, a bad field,
a bound broken. The caller then runs the general decoder, which gives the precise error
(or accepts what only it handles). tests/core/test_push_codec.py checks the rule on
valid frames and on many broken ones.
"""

from __future__ import annotations

from hashlib import sha256
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from syncengine.core import canonical
from syncengine.core import ops as _ops

# The slot setters of the frozen slotted dataclasses built here, as their modules use them.
from syncengine.core.bodies import (
    EMAIL_CHARS_MAX,
    ID_CHARS_MAX,
    SEALED_B64_CHARS_MAX,
    Capture,
    CardInfo,
    _set_amount,
    _set_brand,
    _set_captured_at_ms,
    _set_card,
    _set_channel,
    _set_co_brands,
    _set_device_class,
    _set_email,
    _set_entry_method,
    _set_expires_at_ms,
    _set_last4,
    _set_merchant_id,
    _set_payment_id,
    _set_sealed,
)
from syncengine.core.errors import ProtocolError
from syncengine.core.hlc import LOGICAL_MAX, Hlc, _set_logical, _set_wall_ms
from syncengine.core.money import (
    AMOUNT_MINOR_MAX,
    CURRENCY_EXPONENT,
    Money,
    _set_currency,
    _set_minor,
)
from syncengine.core.ops import (
    OP_BODY_BYTES_MAX,
    OP_FORMAT_VERSION,
    ORIGIN_CHARS_MAX,
    SERVER_PREFIX,
    Op,
    validate_origin,
)

# The start of every canonical push frame (keys sorted: "head_signature" comes first).
PUSH_FRAME_PREFIX = b'{"head_signature":'

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_CHARS_MAX)]
_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
_Millis = Annotated[int, msgspec.Meta(ge=0, le=canonical.WIRE_INT_MAX)]
if TYPE_CHECKING:
    _Currency = str
else:  # the known currencies, one of them exactly (checked by msgspec, not mypy)
    _Currency = Literal[tuple(CURRENCY_EXPONENT)]


# The structs are never part of a reference cycle (strings, ints, lists of strings), so
# the garbage collector need not track them (gc=False): a frame makes thousands.
class _Amount(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    currency: _Currency
    minor: Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MINOR_MAX)]  # a capture's is positive


class _Card(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    brand: _Short
    co_brands: Annotated[list[str], msgspec.Meta(max_length=4)]
    entry_method: Literal["insert", "manual", "swipe", "tap"]
    last4: Annotated[str, msgspec.Meta(min_length=4, max_length=4)]
    sealed: Annotated[str, msgspec.Meta(min_length=1, max_length=SEALED_B64_CHARS_MAX)]


class _CaptureBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    # Declared in sorted order: encoded as declared, a body gives its canonical bytes.
    amount: _Amount
    captured_at_ms: _Millis
    card: _Card
    channel: Literal["integrated", "offline", "standalone"]
    device_class: _Short
    email: Annotated[str, msgspec.Meta(min_length=1, max_length=EMAIL_CHARS_MAX)] | None
    expires_at_ms: _Millis | None
    merchant_id: _Id
    payment_id: _Id


# An op on the wire: [origin, seq, hlc, kind, body, prev]. A tuple, not an array-like
# struct: those accept extra trailing items, and an op is exactly six.
_CaptureOp = tuple[
    Annotated[str, msgspec.Meta(min_length=1, max_length=ORIGIN_CHARS_MAX)],
    Annotated[int, msgspec.Meta(ge=1, le=canonical.WIRE_INT_MAX)],
    tuple[_Millis, Annotated[int, msgspec.Meta(ge=0, le=LOGICAL_MAX)]],
    Literal["capture"],
    _CaptureBody,
    Annotated[str, msgspec.Meta(min_length=64, max_length=64)],
]


class _PushFrame(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    head_signature: str
    ops: Annotated[list[_CaptureOp], msgspec.Meta(min_length=1)]
    type: Literal["push"]
    v: Literal[1]


class _PushFrameRaw(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A push frame whose ops are decoded one by one (a frame of mixed kinds)."""

    head_signature: str
    ops: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]
    type: Literal["push"]
    v: Literal[1]


_DECODER = msgspec.json.Decoder(_PushFrame)
_RAW_DECODER = msgspec.json.Decoder(_PushFrameRaw)
_CAPTURE_OP_DECODER = msgspec.json.Decoder(_CaptureOp)
# An op of another kind is decoded the general way only up to this size: a mode change or
# a void request is a few hundred bytes. The bound also keeps its nesting far below the
# decoder's depth limit, so decoding it alone or inside its frame cannot differ.
OTHER_OP_BYTES_MAX = 2_048
_ENCODER = msgspec.json.Encoder()
_OP_BYTES_MAX = OP_BODY_BYTES_MAX + 512  # as Op.from_wire
_to_builtins = msgspec.to_builtins
_new = object.__new__


def decode_push(
    raw: bytes, batch_ops_max: int, signature_chars_max: int
) -> tuple[tuple[Op, ...], str] | None:
    """The ops and head signature of a push frame of captures, or ``None`` (never raises).

    ``None`` means "not taken here", not "invalid": :func:`protocol.decode` then decodes
    the frame the general way. Each op comes with its :class:`Capture` already parsed
    (:func:`bodies.parse_body` returns it without checking the body again).
    """
    wire_ops: list[_CaptureOp] | list[_CaptureOp | Op]
    try:
        frame = _DECODER.decode(raw)
        wire_ops, signature = frame.ops, frame.head_signature
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        mixed = _decode_mixed(raw, batch_ops_max)
        if mixed is None:
            return None
        wire_ops, signature = mixed
    if len(wire_ops) > batch_ops_max or len(signature) > signature_chars_max:
        return None
    valid_origins = _ops._valid_origins
    encode = _ENCODER.encode
    out: list[Op] = []
    append = out.append
    for item in wire_ops:
        if isinstance(item, Op):  # another kind, decoded the general way
            append(item)
            continue
        origin, seq, hlc, _kind, body, prev = item
        if origin not in valid_origins:
            try:
                validate_origin(origin)  # and caches it: a batch has one origin
            except ProtocolError:
                return None
        if origin.startswith(SERVER_PREFIX):  # the server's streams carry no captures
            return None
        card = body.card
        email = body.email
        if not card.last4.isdigit() or (
            email is not None
            and (
                "@" not in email
                # As bodies.capture_or_none: printable ASCII without a space has no
                # whitespace at all; any other address goes to the general path.
                or not email.isascii()
                or not email.isprintable()
                or " " in email
            )
        ):
            return None
        data = encode((OP_FORMAT_VERSION, origin, seq, hlc, "capture", body, prev))
        if len(data) > _OP_BYTES_MAX:
            return None
        stamp: Hlc = _new(Hlc)
        _set_wall_ms(stamp, hlc[0])
        _set_logical(stamp, hlc[1])
        money: Money = _new(Money)
        _set_minor(money, body.amount.minor)
        _set_currency(money, body.amount.currency)
        info: CardInfo = _new(CardInfo)
        _set_brand(info, card.brand)
        _set_last4(info, card.last4)
        _set_entry_method(info, card.entry_method)
        _set_sealed(info, card.sealed)
        _set_co_brands(info, tuple(card.co_brands))
        capture: Capture = _new(Capture)
        _set_payment_id(capture, body.payment_id)
        _set_merchant_id(capture, body.merchant_id)
        _set_amount(capture, money)
        _set_channel(capture, body.channel)
        _set_card(capture, info)
        _set_captured_at_ms(capture, body.captured_at_ms)
        _set_expires_at_ms(capture, body.expires_at_ms)
        _set_device_class(capture, body.device_class)
        _set_email(capture, email)
        op: Op = _new(Op)
        _ops._set_origin(op, origin)
        _ops._set_seq(op, seq)
        _ops._set_hlc(op, stamp)
        _ops._set_kind(op, "capture")
        _ops._set_body(op, _to_builtins(body))
        _ops._set_prev(op, prev)
        _ops._set_bytes(op, data)
        _ops._set_digest(op, sha256(data).hexdigest())
        _ops._set_typed(op, capture)
        append(op)
    return tuple(out), signature


def _decode_mixed(raw: bytes, batch_ops_max: int) -> tuple[list[_CaptureOp | Op], str] | None:
    """The ops of a push frame of mixed kinds: captures typed, others as :class:`Op`."""
    try:
        frame = _RAW_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(frame.ops) > batch_ops_max:
        return None
    out: list[_CaptureOp | Op] = []
    for item in frame.ops:
        try:
            out.append(_CAPTURE_OP_DECODER.decode(item))
            continue
        except (msgspec.DecodeError, RecursionError):
            pass
        if len(item) > OTHER_OP_BYTES_MAX:
            return None
        try:
            out.append(Op.from_wire(canonical.loads(item), _from_json=True))
        except ProtocolError:
            return None
    return out, frame.head_signature
