"""The sync protocol: versioned, size-limited messages with validated decoding.

Theory of operation
-------------------
1. Every frame is one canonical-JSON object ``{"v": 1, "type": ..., ...fields}``. A frame
   larger than ``frame_bytes_max`` is refused *before* it is parsed.
2. :func:`decode` validates everything -- version, type, the exact set of fields, each
   field's type and bounds -- and returns a frozen message, or raises :class:`ProtocolError`
   (or its subclass :class:`MessageTooLarge`). Nothing may change state before decode
   succeeded. Push frames of captures (a drain) first try the typed decoder of
   :mod:`syncengine.core.push_codec`, which takes a frame only when this decoder would
   accept it with the same result; anything else is decoded the general way.
3. A session: terminal ``Hello`` -> server ``Challenge`` -> terminal ``Auth`` (Ed25519 over
   the challenge) -> server ``Welcome`` (the server's version vector for this terminal).
   Then, in any order: terminal ``Push`` (its own ops above the server's vector, at most
   ``batch_ops_max``, with a signature over the new chain head) -> server ``Ack`` once they
   are durable; terminal ``Pull`` (its vector of the server stream) -> server ``ServerOps``
   (what it lacks, bounded, signed by the server). ``Ping``/``Pong`` measure liveness.
   ``Error`` says what went wrong and whether the session ends.
4. Enrollment is not a sync message; it travels over HTTPS as :class:`EnrollRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from syncengine.core import canonical
from syncengine.core.errors import MessageTooLarge, ProtocolError
from syncengine.core.ops import Op, validate_origin
from syncengine.core.push_codec import PUSH_FRAME_PREFIX, decode_push

PROTOCOL_VERSION = 1
FRAME_BYTES_MAX_DEFAULT = 1024 * 1024
BATCH_OPS_MAX_DEFAULT = 500
VECTOR_ENTRIES_MAX = 16
TEXT_CHARS_MAX = 512
B64_CHARS_MAX = 256


def _text(value: object, name: str, chars_max: int = TEXT_CHARS_MAX) -> str:
    if not isinstance(value, str) or len(value) > chars_max:
        raise ProtocolError(f"field {name!r} must be a string of at most {chars_max} characters")
    return value


def _int(value: object, name: str, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= canonical.WIRE_INT_MAX:
        raise ProtocolError(
            f"field {name!r} must be an integer from {minimum} to {canonical.WIRE_INT_MAX}"
        )
    return value


def _bool(value: object, name: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"field {name!r} must be true or false")
    return value


def _vector(value: object, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > VECTOR_ENTRIES_MAX:
        raise ProtocolError(f"field {name!r} must be an object of at most {VECTOR_ENTRIES_MAX}")
    return {validate_origin(k): _int(v, name) for k, v in value.items()}


def _ops(value: object, name: str, ops_max: int) -> tuple[Op, ...]:
    if not isinstance(value, list):
        raise ProtocolError(f"field {name!r} must be a list of ops")
    if len(value) > ops_max:
        raise MessageTooLarge(f"{len(value)} ops in one batch; the limit is {ops_max}")
    from_wire = Op.from_wire  # once per batch, not once per op
    return tuple([from_wire(item, _from_json=True) for item in value])


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every sync message. ``TYPE`` is the wire name."""

    TYPE: ClassVar[str] = ""

    def to_fields(self, *, skip_ops: bool = False) -> dict[str, Any]:
        """The message's fields as JSON values; ``skip_ops`` leaves lists of ops empty."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], Op):
                value = [] if skip_ops else [op.to_wire() for op in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied on decode. Defaults are safe for terminals and servers."""

    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT
    batch_ops_max: int = BATCH_OPS_MAX_DEFAULT


@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    terminal_id: str
    sdk_version: str

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(validate_origin(data["terminal_id"]), _text(data["sdk_version"], "sdk_version"))


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    TYPE: ClassVar[str] = "challenge"
    nonce: str  # base64url, 32 random bytes
    server_time_ms: int

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            _text(data["nonce"], "nonce", B64_CHARS_MAX),
            _int(data["server_time_ms"], "server_time_ms"),
        )


@dataclass(frozen=True, slots=True)
class Auth(Message):
    TYPE: ClassVar[str] = "auth"
    terminal_id: str
    signature: str  # base64url Ed25519 over crypto.challenge_message(nonce, terminal_id)

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            validate_origin(data["terminal_id"]),
            _text(data["signature"], "signature", B64_CHARS_MAX),
        )


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    vector: dict[str, int]  # what the server holds of this terminal's origin(s)
    server_time_ms: int

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            _vector(data["vector"], "vector"), _int(data["server_time_ms"], "server_time_ms")
        )


@dataclass(frozen=True, slots=True)
class Push(Message):
    TYPE: ClassVar[str] = "push"
    ops: tuple[Op, ...]
    head_signature: str  # base64url Ed25519 over crypto.chain_head_message of the last op

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        ops = _ops(data["ops"], "ops", limits.batch_ops_max)
        if not ops:
            raise ProtocolError("a push carries at least one op")
        return cls(ops, _text(data["head_signature"], "head_signature", B64_CHARS_MAX))


@dataclass(frozen=True, slots=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    origin: str
    seq: int  # every op of ``origin`` up to ``seq`` is durably stored on the server

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(validate_origin(data["origin"]), _int(data["seq"], "seq"))


@dataclass(frozen=True, slots=True)
class Pull(Message):
    TYPE: ClassVar[str] = "pull"
    vector: dict[str, int]

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(_vector(data["vector"], "vector"))


@dataclass(frozen=True, slots=True)
class ServerOps(Message):
    TYPE: ClassVar[str] = "server_ops"
    ops: tuple[Op, ...]
    head_signature: str  # server's Ed25519 over the chain head of the last op ("" if none)
    more: bool  # true when the answer was cut by the batch limit; pull again

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            _ops(data["ops"], "ops", limits.batch_ops_max),
            _text(data["head_signature"], "head_signature", B64_CHARS_MAX),
            _bool(data["more"], "more"),
        )


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    nonce: int

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(_int(data["nonce"], "nonce"))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    nonce: int

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(_int(data["nonce"], "nonce"))


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            _text(data["code"], "code", 64),
            _text(data["message"], "message"),
            _bool(data["fatal"], "fatal"),
        )


@dataclass(frozen=True, slots=True)
class EnrollRequest(Message):
    """Sent over HTTPS to enroll a terminal with a one-time code."""

    TYPE: ClassVar[str] = "enroll"
    terminal_id: str
    code: str
    public_key: str  # base64url raw Ed25519 public key
    device_class: str

    @classmethod
    def from_fields(cls, data: dict[str, Any], limits: Limits) -> Message:
        return cls(
            validate_origin(data["terminal_id"]),
            _text(data["code"], "code", 64),
            _text(data["public_key"], "public_key", B64_CHARS_MAX),
            _text(data["device_class"], "device_class", 32),
        )


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Welcome,
        Push,
        Ack,
        Pull,
        ServerOps,
        Ping,
        Pong,
        Error,
        EnrollRequest,
    )
}

DEFAULT_LIMITS = Limits()


_EMPTY_OPS = b'"ops":[]'


def encode(message: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Canonical bytes of ``message``; refuses to produce a frame over the limit.

    A message that carries ops (a push, the server's ops) is encoded with an empty list
    of ops and their held wire bytes (:meth:`Op.wire_bytes`) are spliced into it: the same
    bytes (tests/core/test_protocol.py holds the two equal) without encoding every op's
    body again; a backlog's frames are mostly ops.
    """
    ops = getattr(message, "ops", None)
    spliced: tuple[Op, ...] = ops if type(ops) is tuple and ops and isinstance(ops[0], Op) else ()
    fields = message.to_fields(skip_ops=bool(spliced))
    data = canonical.dumps({"v": PROTOCOL_VERSION, "type": message.TYPE, **fields})
    if spliced:
        # '"ops":[' can only be the key "ops" of this object: inside a string every '"' is
        # escaped, and no other key of these messages is called "ops".
        cut = data.index(_EMPTY_OPS) + len(_EMPTY_OPS) - 1
        wire = b",".join([op.wire_bytes() for op in spliced])
        data = b"".join((data[:cut], wire, data[cut:]))
    if len(data) > limits.frame_bytes_max:
        raise MessageTooLarge(
            f"{message.TYPE} frame is {len(data)} bytes; the limit is {limits.frame_bytes_max}"
        )
    return data


def decode(data: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode one frame, or raise :class:`ProtocolError`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > limits.frame_bytes_max:
        raise MessageTooLarge(
            f"frame of {len(raw)} bytes is over the limit of {limits.frame_bytes_max}"
        )
    if raw.startswith(PUSH_FRAME_PREFIX):
        # Push frames of captures (a drain) take the typed decoder; what it does not take
        # is decoded below, with the precise error if it is invalid.
        fast = decode_push(raw, limits.batch_ops_max, B64_CHARS_MAX)
        if fast is not None:
            return Push(*fast)
    return decode_general(raw, limits)


def decode_general(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """:func:`decode` without the size check and without the typed decoder of captures:
    every frame the general way (the reference that decoder is tested against)."""
    value = canonical.loads(raw)
    if not isinstance(value, dict):
        raise ProtocolError("a frame is a JSON object")
    if value.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {value.get('v')!r} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); upgrade the older side"
        )
    kind = value.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    expected = {f.name for f in fields(cls)}
    got = set(value) - {"v", "type"}
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ProtocolError(f"{kind} message: missing fields {missing}, unknown fields {extra}")
    return cls.from_fields(value, limits)
