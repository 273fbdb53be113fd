"""Ops: the immutable facts every replica holds, chained per origin.

Theory of operation
-------------------
1. An op is ``(origin, seq, hlc, kind, body, prev)``. ``origin`` is a terminal id (``"T1"``)
   or a server stream for one terminal (``"server/T1"``); ``seq`` is dense per origin
   (1, 2, 3, ...).
2. ``prev`` is the SHA-256 digest (hex) of the previous op of the same origin;
   :data:`GENESIS` for ``seq == 1``. Every origin's log is thus a hash chain: changing any
   byte of any op changes every later digest, and signing the head digest signs the chain.
3. The canonical bytes of an op never change: the same op always encodes to the same bytes,
   so its digest and any signature over it are stable across processes and versions.
4. Only the listed kinds exist; each kind has one writer (terminal or server). A body is
   canonical JSON no larger than :data:`OP_BODY_BYTES_MAX`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from syncengine.core import canonical
from syncengine.core.errors import ChainError, Equivocation, ProtocolError
from syncengine.core.hlc import Hlc

OP_FORMAT_VERSION = 1
_VERSION_PREFIX_BYTES = len(b"[%d," % OP_FORMAT_VERSION)
GENESIS = "0" * 64
OP_BODY_BYTES_MAX = 8 * 1024
ORIGIN_CHARS_MAX = 64
SERVER_PREFIX = "server/"

# kind -> who writes it. Terminals write their own facts; the server writes outcomes.
TERMINAL_KINDS = frozenset({"capture", "mode", "void_request"})
SERVER_KINDS = frozenset({"status", "refund", "setting", "grant", "dispute"})
KINDS = TERMINAL_KINDS | SERVER_KINDS

_ORIGIN_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/")


def server_origin(terminal_id: str) -> str:
    """The origin of the server's stream of ops addressed to ``terminal_id``."""
    return SERVER_PREFIX + terminal_id


def is_server_origin(origin: str) -> bool:
    return origin.startswith(SERVER_PREFIX)


# Origins already validated, so the check is one set lookup: every op of a batch carries
# the same origin. Bounded: cleared when full, so a peer sending many distinct origins
# costs at most this many strings. Only exact ``str`` is cached (a subclass could
# compare equal to a cached origin without being one).
ORIGIN_CACHE_MAX = 1024
_valid_origins: set[str] = set()


def validate_origin(origin: object) -> str:
    if type(origin) is str and origin in _valid_origins:
        return origin
    if (
        not isinstance(origin, str)
        or not 0 < len(origin) <= ORIGIN_CHARS_MAX
        or not set(origin) <= _ORIGIN_ALLOWED
    ):
        raise ProtocolError(f"malformed origin {origin!r}")
    if type(origin) is str:
        if len(_valid_origins) >= ORIGIN_CACHE_MAX:
            _valid_origins.clear()
        _valid_origins.add(origin)
    return origin


@dataclass(frozen=True, slots=True, eq=False)
class Op:
    """One immutable fact. Equality and hashing are by canonical bytes."""

    origin: str
    seq: int
    hlc: Hlc
    kind: str
    body: dict[str, Any]
    prev: str = GENESIS
    _bytes: bytes = field(init=False, repr=False)
    _digest: str = field(init=False, repr=False)
    # The body already checked and typed by a decoder that did both at once (see
    # push_codec), or None: bodies.parse_body returns it instead of checking again.
    _typed: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._seal(check_values=True)

    def _seal(self, *, check_values: bool) -> None:
        """Validate the fields and fix the canonical bytes and digest.

        ``check_values`` walks the body for floats and foreign types. :meth:`from_wire`
        makes these same checks inline (tests/core/test_decode_fast.py holds them equal).
        """
        # Locals, not attributes: ops built from the store go through here one by one.
        origin, seq, kind, body, prev, hlc = (
            self.origin,
            self.seq,
            self.kind,
            self.body,
            self.prev,
            self.hlc,
        )
        validate_origin(origin)
        if type(seq) is not int or not 1 <= seq <= canonical.WIRE_INT_MAX:
            raise ProtocolError(f"op seq must be a positive integer, got {seq!r}")
        if kind not in KINDS:
            raise ProtocolError(f"unknown op kind {kind!r}")
        if origin.startswith(SERVER_PREFIX) != (kind in SERVER_KINDS):
            raise ProtocolError(f"origin {origin!r} may not write ops of kind {kind!r}")
        if not isinstance(body, dict):
            raise ProtocolError("op body must be an object")
        if not isinstance(prev, str) or len(prev) != 64:
            raise ProtocolError("op prev must be a 64-character hex digest")
        if check_values:
            canonical.validate(body)
        data = canonical.dumps(
            [OP_FORMAT_VERSION, origin, seq, [hlc.wall_ms, hlc.logical], kind, body, prev]
        )
        if len(data) > OP_BODY_BYTES_MAX + 512:
            raise ProtocolError(f"op is {len(data)} bytes; the limit is {OP_BODY_BYTES_MAX}")
        _set_bytes(self, data)
        _set_digest(self, sha256(data).hexdigest())

    @property
    def key(self) -> tuple[str, int]:
        return (self.origin, self.seq)

    def canonical_bytes(self) -> bytes:
        """The op's canonical encoding; the input of its digest."""
        return self._bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical bytes, lowercase hex. The next op's ``prev``."""
        return self._digest

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and other._bytes == self._bytes

    def __hash__(self) -> int:
        return hash(self._digest)

    def to_wire(self) -> list[Any]:
        return [self.origin, self.seq, self.hlc.to_wire(), self.kind, self.body, self.prev]

    def wire_bytes(self) -> bytes:
        """The canonical encoding of :meth:`to_wire`, cut from the held canonical bytes.

        Those are ``[<format version>,<the wire fields>]``: dropping the version gives the
        wire form without encoding the body again (frames of ops are spliced from these).
        """
        return b"[" + self._bytes[_VERSION_PREFIX_BYTES:]

    @classmethod
    def from_wire(cls, value: object, *, _from_json: bool = False) -> Op:
        """Decode an op from its wire form, validating every field.

        ``_from_json`` is for decoders whose input came from :func:`canonical.loads`: its
        body holds only JSON types, so the walk over it is skipped.

        This runs once per op on the drain path, so the checks of :meth:`_seal` are made
        inline here (tests/core/test_decode_fast.py holds the two equal), a cached origin
        costs one set lookup, and the fields are set through the slot descriptors rather
        than the frozen ``__setattr__``.
        """
        if not isinstance(value, list) or len(value) != 6:
            raise ProtocolError("an op is a list of 6 fields")
        origin, seq, hlc, kind, body, prev = value
        if not isinstance(kind, str) or not isinstance(body, dict):
            raise ProtocolError("malformed op kind or body")
        try:
            stamp = Hlc.from_wire(hlc)
        except Exception as exc:  # ClockError -> ProtocolError at the boundary
            raise ProtocolError(f"malformed op hlc: {exc}") from None
        if not isinstance(prev, str):
            raise ProtocolError("malformed op prev")
        if type(origin) is not str or origin not in _valid_origins:
            validate_origin(origin)
        if type(seq) is not int:
            raise ProtocolError(f"op seq must be an integer, got {seq!r}")
        # From here on, the checks of _seal.
        if not 1 <= seq <= canonical.WIRE_INT_MAX:
            raise ProtocolError(f"op seq must be a positive integer, got {seq!r}")
        if kind not in KINDS:
            raise ProtocolError(f"unknown op kind {kind!r}")
        if origin.startswith(SERVER_PREFIX) != (kind in SERVER_KINDS):
            raise ProtocolError(f"origin {origin!r} may not write ops of kind {kind!r}")
        if len(prev) != 64:
            raise ProtocolError("op prev must be a 64-character hex digest")
        if not _from_json:
            canonical.validate(body)
        # A plain list that Hlc.from_wire accepted is exactly [wall_ms, logical].
        wire_hlc = hlc if type(hlc) is list else [stamp.wall_ms, stamp.logical]
        data = canonical.dumps([OP_FORMAT_VERSION, origin, seq, wire_hlc, kind, body, prev])
        if len(data) > OP_BODY_BYTES_MAX + 512:
            raise ProtocolError(f"op is {len(data)} bytes; the limit is {OP_BODY_BYTES_MAX}")
        op = _new(cls)
        _set_origin(op, origin)
        _set_seq(op, seq)
        _set_hlc(op, stamp)
        _set_kind(op, kind)
        _set_body(op, body)
        _set_prev(op, prev)
        _set_bytes(op, data)
        _set_digest(op, sha256(data).hexdigest())
        _set_typed(op, None)
        return op


# Op is a frozen slotted dataclass: its fields are set once, through the slot descriptors.
_new = object.__new__
_set_origin = Op.__dict__["origin"].__set__
_set_seq = Op.__dict__["seq"].__set__
_set_hlc = Op.__dict__["hlc"].__set__
_set_kind = Op.__dict__["kind"].__set__
_set_body = Op.__dict__["body"].__set__
_set_prev = Op.__dict__["prev"].__set__
_set_bytes = Op.__dict__["_bytes"].__set__
_set_digest = Op.__dict__["_digest"].__set__
_set_typed = Op.__dict__["_typed"].__set__


def make_next(previous: Op | None, origin: str, hlc: Hlc, kind: str, body: dict[str, Any]) -> Op:
    """Build the op that follows ``previous`` (or the first op when it is ``None``)."""
    if previous is not None and previous.origin != origin:
        raise ProtocolError("previous op belongs to another origin")
    seq = 1 if previous is None else previous.seq + 1
    prev = GENESIS if previous is None else previous.digest
    return Op(origin, seq, hlc, kind, body, prev)


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Result of :func:`check_chain`: ops that are new, and the head after them."""

    new: tuple[Op, ...]
    duplicates: int
    head_seq: int
    head_digest: str


def check_chain(
    head_seq: int,
    head_digest: str,
    ops: Iterable[Op],
    known_digest: dict[int, str] | None = None,
) -> ChainCheck:
    """Check that ``ops`` of one origin extend a chain whose head is ``(head_seq, head_digest)``.

    Ops at or below the head are duplicates; if ``known_digest`` maps their seq to the digest
    already stored, a different op there raises :class:`Equivocation`. Ops above the head
    must be contiguous and chained; anything else
    raises :class:`ChainError`. Nothing is changed by this function: it only plans.
    """
    new: list[Op] = []
    duplicates = 0
    seq, digest = head_seq, head_digest
    origin: str | None = None
    for op in ops:
        if origin is None:
            origin = op.origin
        elif op.origin != origin:
            raise ChainError("a chain check covers one origin at a time")
        if op.seq <= head_seq:
            stored = None if known_digest is None else known_digest.get(op.seq)
            if stored is not None and stored != op.digest:
                raise Equivocation(
                    f"{op.origin}#{op.seq} differs from the op already stored under that seq"
                )
            duplicates += 1
            continue
        if op.seq != seq + 1:
            raise ChainError(f"{op.origin}#{op.seq} does not follow #{seq}: a gap or reorder")
        if op.prev != digest:
            raise ChainError(f"{op.origin}#{op.seq} does not chain to #{seq}: tampered")
        new.append(op)
        seq, digest = op.seq, op.digest
    return ChainCheck(tuple(new), duplicates, seq, digest)
