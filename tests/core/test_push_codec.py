"""The typed decoder of push frames agrees with the general decoder, always.

``push_codec.decode_push`` may decline a frame the general decoder accepts (other kinds,
non-ASCII emails, ...); it must never accept a frame the general decoder refuses, and what
it accepts must be the very same push: the same ops (bytes, digests, bodies) and the same
typed captures. ``protocol.decode`` must give, for every frame, what the general decoder
gives -- the same message or the same error.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bodies_fast import mutated_bodies, valid_bodies

from syncengine.core import canonical, protocol
from syncengine.core.bodies import Capture, ModeChange, parse_body
from syncengine.core.canonical import WIRE_INT_MAX
from syncengine.core.errors import ClockError, ProtocolError
from syncengine.core.hlc import LOGICAL_MAX, Hlc
from syncengine.core.ops import GENESIS, OP_BODY_BYTES_MAX, Op, make_next, validate_origin
from syncengine.core.push_codec import PUSH_FRAME_PREFIX, decode_push

LIMITS = protocol.DEFAULT_LIMITS
SIGNATURE = "c2lnbmF0dXJl"


def wire_ops(bodies: list[dict[str, Any]], origin: str = "T1") -> list[list[Any]]:
    """Capture ops of ``bodies`` in their wire form (bodies as given, unchecked; decoding
    does not check the chain, the merge does)."""
    return [
        [origin, seq, [1_000 + seq, 0], "capture", body, GENESIS]
        for seq, body in enumerate(bodies, start=1)
    ]


def frame(ops: object, signature: object = SIGNATURE, **extra: Any) -> bytes:
    return canonical.dumps(
        {"v": 1, "type": "push", "ops": ops, "head_signature": signature, **extra}
    )


Outcome = protocol.Message | tuple[str, str]


def outcome(fn: Any, raw: object) -> Outcome:
    try:
        result: protocol.Message = fn(raw)
    except Exception as exc:  # compared between paths, whatever it is
        return (type(exc).__name__, str(exc))
    return result


def assert_agree(raw: bytes) -> Outcome:
    """The typed decoder takes only what the general one accepts, with the same result."""
    general = outcome(protocol.decode_general, raw)
    fast = decode_push(raw, LIMITS.batch_ops_max, protocol.B64_CHARS_MAX)
    if fast is not None:
        assert isinstance(general, protocol.Push), f"typed decoder took a bad frame: {general}"
        ops, signature = fast
        assert signature == general.head_signature
        assert len(ops) == len(general.ops)
        for mine, theirs in zip(ops, general.ops, strict=True):
            assert type(mine) is Op
            assert mine.canonical_bytes() == theirs.canonical_bytes()
            assert mine.digest == theirs.digest
            assert mine.key == theirs.key and mine.hlc == theirs.hlc and mine.prev == theirs.prev
            assert mine.kind == theirs.kind
            assert mine.body == theirs.body
            assert canonical.dumps(mine.body) == canonical.dumps(theirs.body)
            assert mine.wire_bytes() == theirs.wire_bytes()
            assert theirs._typed is None
            if mine._typed is None:  # decoded the general way inside a frame of mixed kinds
                assert outcome(parse_body, mine) == outcome(parse_body, theirs)
                continue
            assert mine.kind == "capture"
            typed = parse_body(mine)
            assert typed is mine._typed
            assert typed == parse_body(theirs)
            assert repr(typed) == repr(parse_body(theirs))
    assert outcome(protocol.decode, raw) == general
    return general


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    bodies = draw(st.lists(valid_bodies(), min_size=1, max_size=4))
    return frame(wire_ops(bodies))


@given(valid_frames())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_frame_of_valid_captures_takes_the_typed_decoder(raw: bytes) -> None:
    assert raw.startswith(PUSH_FRAME_PREFIX)
    assert decode_push(raw, LIMITS.batch_ops_max, protocol.B64_CHARS_MAX) is not None
    assert isinstance(assert_agree(raw), protocol.Push)


@given(st.lists(mutated_bodies(), min_size=1, max_size=3))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_broken_bodies_are_left_to_the_general_decoder(bodies: list[dict[str, Any]]) -> None:
    try:
        raw = frame(wire_ops(bodies))
    except ProtocolError:
        return  # not encodable as JSON at all (e.g. a NaN): no frame to decode
    assert_agree(raw)


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=70),
    st.sampled_from(
        [
            "",
            "T1",
            "server/T1",
            "T 1",
            "x" * 65,
            "capture",
            "mode",
            "0" * 63,
            "0" * 64,
            "0" * 65,
            [1, 0],
            [1, 0, 0],
            [-1, 0],
            [1, -1],
            [1, LOGICAL_MAX],
            [1, LOGICAL_MAX + 1],
            [True, 0],
            0,
            1,
            -1,
            2**63,
            2**64,
            WIRE_INT_MAX,
            WIRE_INT_MAX + 1,
            [WIRE_INT_MAX, 0],
            [WIRE_INT_MAX + 1, 0],
        ]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@given(
    st.lists(valid_bodies(), min_size=1, max_size=3),
    st.integers(0, 2),
    st.integers(0, 6),
    _junk,
)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_broken_op_fields_are_left_to_the_general_decoder(
    bodies: list[dict[str, Any]], which_op: int, field: int, junk: object
) -> None:
    ops: list[Any] = wire_ops(bodies)
    op = ops[which_op % len(ops)]
    if field == 6:
        op.append(junk)  # seven fields
    else:
        op[field] = junk
    assert_agree(frame(ops))


@given(st.lists(valid_bodies(), min_size=1, max_size=2), st.sampled_from(range(9)), _junk)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_broken_frames_are_left_to_the_general_decoder(
    bodies: list[dict[str, Any]], how: int, junk: object
) -> None:
    ops = wire_ops(bodies)
    raw = {
        0: lambda: frame(ops, junk),
        1: lambda: frame(ops, extra=junk),
        2: lambda: frame(junk),
        3: lambda: canonical.dumps({"v": junk, "type": "push", "ops": ops, "head_signature": "s"}),
        4: lambda: canonical.dumps({"v": 1, "type": junk, "ops": ops, "head_signature": "s"}),
        5: lambda: canonical.dumps({"v": 1, "type": "push", "head_signature": "s"}),
        6: lambda: canonical.dumps({"v": 1, "type": "push", "ops": ops}),
        7: lambda: frame([*ops, junk]),
        8: lambda: frame(ops) + b" ",
    }[how]()
    assert_agree(raw)


def test_limits_of_the_frame_are_the_general_decoders() -> None:
    body = valid_body()
    assert isinstance(assert_agree(frame(wire_ops([body]))), protocol.Push)
    # Too many ops: the general decoder's MessageTooLarge, not the typed decoder's refusal.
    many = frame(wire_ops([dict(body, payment_id=f"p{i}") for i in range(501)]))
    assert assert_agree(many)[0] == "MessageTooLarge"  # type: ignore[index]
    assert assert_agree(frame([]))[0] == "ProtocolError"  # type: ignore[index]
    long_signature = frame(wire_ops([body]), "s" * (protocol.B64_CHARS_MAX + 1))
    assert assert_agree(long_signature)[0] == "ProtocolError"  # type: ignore[index]
    assert isinstance(
        assert_agree(frame(wire_ops([body]), "s" * protocol.B64_CHARS_MAX)), protocol.Push
    )
    # An op over the size limit (a long sealed card and a long device class fit the body
    # rules; the canonical op is over OP_BODY_BYTES_MAX + 512).
    big = copy.deepcopy(body)
    big["card"]["sealed"] = "A" * 2048
    big["card"]["co_brands"] = ["b" * 1700] * 4
    assert len(canonical.dumps(big)) > OP_BODY_BYTES_MAX + 512
    assert decode_push(frame(wire_ops([big])), 500, protocol.B64_CHARS_MAX) is None
    assert assert_agree(frame(wire_ops([big])))[0] == "ProtocolError"  # type: ignore[index]


def test_duplicate_keys_decode_as_the_general_decoder_does() -> None:
    body = valid_body()
    raw = frame(wire_ops([body]))
    for doubled in (
        raw.replace(b'"v":1', b'"v":1,"v":1'),
        raw.replace(b'"v":1', b'"v":2,"v":1'),
        raw.replace(b'"v":1', b'"v":1,"v":2'),
        raw.replace(b'"channel":"offline"', b'"channel":"offline","channel":"online"'),
        raw.replace(b'"channel":"offline"', b'"channel":"online","channel":"offline"'),
        raw.replace(b'"minor":1250', b'"minor":1250,"minor":-5'),
        raw.replace(b'"minor":1250', b'"minor":-5,"minor":1250'),
    ):
        assert doubled != raw
        assert_agree(doubled)


@pytest.mark.parametrize("cached", [False, True])
def test_a_capture_from_a_server_origin_is_left_to_the_general_decoder(cached: bool) -> None:
    if cached:
        validate_origin("server/T1")  # known already, as when the server's stream is read
    raw = frame(wire_ops([valid_body()], origin="server/T1"))
    assert decode_push(raw, 500, protocol.B64_CHARS_MAX) is None
    assert assert_agree(raw)[0] == "ProtocolError"  # type: ignore[index]


def test_a_frame_of_mixed_kinds_types_its_captures_and_decodes_the_rest_the_general_way() -> None:
    """A backlog starts with the mode op of going offline: its push mixes kinds."""
    mode = make_next(
        None,
        "T1",
        Hlc(1, 0),
        "mode",
        ModeChange("online", "offline", "outage_detected", 1).to_body(),
    )
    first = make_next(mode, "T1", Hlc(2, 0), "capture", capture().to_body())
    raw = protocol.encode(protocol.Push((mode, first), SIGNATURE))
    fast = decode_push(raw, 500, protocol.B64_CHARS_MAX)
    assert fast is not None and fast[0] == (mode, first)
    assert fast[0][0]._typed is None and fast[0][1]._typed == capture()
    message = assert_agree(raw)
    assert isinstance(message, protocol.Push)
    assert message.ops == (mode, first)
    assert all(op._typed is None for op in message.ops)
    assert parse_body(message.ops[1]) == capture()


def _other_op(seq: int, kind: str, body: dict[str, Any]) -> list[Any]:
    return ["T1", seq, [1_000 + seq, 0], kind, body, GENESIS]


_MODE = ModeChange("online", "offline", "outage_detected", 1).to_body()
_other_ops = st.one_of(
    st.just(("mode", _MODE)),
    st.just(("void_request", {"payment_id": "p1", "requested_at_ms": 5, "reason": "r"})),
    st.builds(lambda k, v: ("mode", {**_MODE, k: v}), st.sampled_from(sorted(_MODE)), _junk),
    st.builds(lambda kind: (kind, _MODE), st.sampled_from(["status", "nope", "capture", ""])),
    st.just(("mode", {"deep": [[[[[[[[1]]]]]]]]})),
    st.just(("mode", {"long": "x" * 3_000})),
)


@st.composite
def mixed_ops(draw: st.DrawFn) -> list[Any]:
    """Captures (valid and broken) and other ops in wire form, in any order. The order is
    drawn here rather than shuffled in the test, so every draw happens before the test runs
    and a failing example replays and shrinks the same way."""
    bodies = draw(st.lists(st.one_of(valid_bodies(), mutated_bodies()), min_size=0, max_size=3))
    others = draw(st.lists(_other_ops, min_size=1, max_size=3))
    ops: list[Any] = wire_ops(bodies) + [
        _other_op(len(bodies) + i, kind, body) for i, (kind, body) in enumerate(others, 1)
    ]
    return draw(st.permutations(ops))


@given(mixed_ops())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_frames_of_mixed_kinds_agree_with_the_general_decoder(ops: list[Any]) -> None:
    try:
        raw = frame(ops)
    except ProtocolError:
        return  # not encodable as JSON at all (e.g. an infinite float): no frame to decode
    assert_agree(raw)


def test_the_server_path_uses_the_typed_capture() -> None:
    ops: list[Op] = []
    prev: Op | None = None
    for i in range(3):
        prev = make_next(
            prev,
            "T1",
            Hlc(10 + i, 0),
            "capture",
            dict(capture().to_body(), payment_id=f"p-{i}"),
        )
        ops.append(prev)
    raw = protocol.encode(protocol.Push(tuple(ops), SIGNATURE))
    message = protocol.decode(raw)
    assert isinstance(message, protocol.Push)
    assert message.ops == tuple(ops)
    for op, original in zip(message.ops, ops, strict=True):
        assert isinstance(op._typed, Capture)
        assert parse_body(op) is op._typed
        assert parse_body(op) == parse_body(original)
        assert original._typed is None  # built, not decoded: checked when parsed
    assert protocol.encode(message) == raw


@pytest.mark.parametrize(
    "email",
    ["jos\u00e9@example.com", "a b@c.co", "no-at-sign", "a@b\u2003c", "a@b.co"],
)
def test_emails_the_typed_decoder_leaves_alone_decode_the_general_way(email: str) -> None:
    body = dict(valid_body(), email=email)
    result = assert_agree(frame(wire_ops([body])))
    taken = decode_push(frame(wire_ops([body])), 500, protocol.B64_CHARS_MAX) is not None
    assert taken == (email == "a@b.co")
    # Decoding takes any body; its rules are checked when it is parsed (by the merge).
    assert isinstance(result, protocol.Push)
    valid = email in ("a@b.co", "jos\u00e9@example.com")
    assert isinstance(outcome(lambda _: parse_body(result.ops[0]), b""), Capture) == valid


def capture() -> Capture:
    body = valid_body()
    return Capture.from_body(body)


def valid_body() -> dict[str, Any]:
    return {
        "payment_id": "p-1",
        "merchant_id": "m-1",
        "amount": {"minor": 1250, "currency": "USD"},
        "channel": "offline",
        "card": {
            "brand": "visa",
            "last4": "4242",
            "entry_method": "tap",
            "sealed": "c2VhbGVk",
            "co_brands": [],
        },
        "captured_at_ms": 1_000,
        "expires_at_ms": 86_401_000,
        "device_class": "terminal",
        "email": None,
    }


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq", WIRE_INT_MAX + 1),
        ("hlc", [WIRE_INT_MAX + 1, 0]),
        ("captured_at_ms", WIRE_INT_MAX + 1),
        ("expires_at_ms", 10**20),
    ],
)
def test_an_integer_above_the_wire_bound_is_refused_by_both_decoders(
    field: str, value: object
) -> None:
    # Larger than a database column holds: it would pass every check and then fail in the
    # store (a session dying mid-merge, a terminal's chain stuck behind the op for good).
    body = valid_body()
    op: list[Any] = wire_ops([body])[0]
    if field == "seq":
        op[1] = value
    elif field == "hlc":
        op[2] = value
    else:
        body[field] = value
    general = assert_agree(frame([op]))
    if field in ("seq", "hlc"):  # refused with the frame
        assert isinstance(general, tuple) and general[0] == "ProtocolError", general
    else:  # bodies are checked by parse_body, before the merge
        assert isinstance(general, protocol.Push)
        with pytest.raises(ProtocolError, match=f"{field}' must be an integer from 0 to"):
            parse_body(general.ops[0])
    op_at_bound = ["T1", WIRE_INT_MAX, [WIRE_INT_MAX, 0], "capture", valid_body(), GENESIS]
    assert isinstance(assert_agree(frame([op_at_bound])), protocol.Push)


def test_message_integers_above_the_wire_bound_are_refused() -> None:
    pull = {"v": 1, "type": "pull", "vector": {"server/T1": 10**20}}
    with pytest.raises(ProtocolError, match="must be an integer from 0 to"):
        protocol.decode(canonical.dumps(pull))
    with pytest.raises(ClockError, match="out of range"):
        Hlc(WIRE_INT_MAX + 1, 0)
    assert Hlc.from_wire([WIRE_INT_MAX, 0]).wall_ms == WIRE_INT_MAX
