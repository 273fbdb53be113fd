"""Sync protocol: round trips, limits, and one error type for bad input."""

from __future__ import annotations

import contextlib

import pytest
from core_support import chain
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core import canonical
from syncengine.core.errors import MessageTooLarge, ProtocolError
from syncengine.core.hlc import Hlc
from syncengine.core.ops import Op, make_next
from syncengine.core.protocol import (
    MESSAGE_TYPES,
    Ack,
    Auth,
    Challenge,
    Error,
    Hello,
    Limits,
    Ping,
    Pong,
    Pull,
    Push,
    ServerOps,
    Welcome,
    decode,
    encode,
)

SAMPLES = [
    Hello("T1", "0.1.0"),
    Challenge("bm9uY2U", 1_700_000_000_000),
    Auth("T1", "c2ln"),
    Welcome({"T1": 3, "server/T1": 0}, 5),
    Push(tuple(chain("T1", 3)), "c2ln"),
    Ack("T1", 3),
    Pull({"server/T1": 2}),
    ServerOps(tuple(chain("server/T1", 2)), "c2ln", False),
    ServerOps((), "", False),
    Ping(7),
    Pong(7),
    Error("service_unavailable", "try later", False),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip_is_exact(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert decode(data) == message
    assert encode(decode(data)) == data


_texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10)
_bodies = st.dictionaries(
    _texts, st.none() | st.booleans() | st.integers(-(2**70), 2**70) | _texts, max_size=5
)


@given(
    st.lists(_bodies, min_size=1, max_size=6),
    st.text(alphabet="abcXYZ019-_", max_size=12),
    st.booleans(),
)
def test_frames_of_ops_are_spliced_into_exactly_the_canonical_bytes(
    bodies: list[dict[str, object]], signature: str, more: bool
) -> None:
    ops: list[Op] = []
    for i, body in enumerate(bodies):
        previous = ops[-1] if ops else None
        kind = "status" if i % 2 else "setting"
        ops.append(make_next(previous, "server/T1", Hlc(1_000 + i, i), kind, body))
    pushed = tuple(chain("T1", len(bodies)))
    for message in (ServerOps(tuple(ops), signature, more), Push(pushed, signature)):
        generic = canonical.dumps({"v": 1, "type": message.TYPE, **message.to_fields()})
        assert encode(message) == generic
        assert [op.wire_bytes() for op in message.ops] == [
            canonical.dumps(op.to_wire()) for op in message.ops
        ]


def test_every_type_has_a_sample() -> None:
    assert {m.TYPE for m in SAMPLES} | {"enroll"} == set(MESSAGE_TYPES)


def test_oversized_frame_refused_before_parsing() -> None:
    limits = Limits(frame_bytes_max=100)
    with pytest.raises(MessageTooLarge):
        decode(b"{" + b" " * 200 + b"}", limits)
    with pytest.raises(MessageTooLarge):
        encode(Push(tuple(chain("T1", 3)), "x"), limits)


def test_batch_limit() -> None:
    data = encode(Push(tuple(chain("T1", 5)), "x"))
    with pytest.raises(MessageTooLarge, match="limit is 4"):
        decode(data, Limits(batch_ops_max=4))


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b"[]",
        b'{"v":2,"type":"ping","nonce":1}',
        b'{"v":1,"type":"launch","nonce":1}',
        b'{"v":1,"type":"ping"}',
        b'{"v":1,"type":"ping","nonce":1,"extra":0}',
        b'{"v":1,"type":"ping","nonce":1.5}',
        b'{"v":1,"type":"ping","nonce":-1}',
        b'{"v":1,"type":"ack","origin":"T 1","seq":1}',
        b'{"v":1,"type":"push","ops":[],"head_signature":"x"}',
        b'{"v":1,"type":"push","ops":[[1,2]],"head_signature":"x"}',
        b'{"v":1,"type":"pull","vector":{"T1":"3"}}',
        b'{"v":1,"type":"ping","nonce":NaN}',
        b"\xff\xfe",
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


@given(st.binary(max_size=300))
def test_random_bytes_never_escape_the_error_type(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=20,
    )
)
def test_random_json_never_escapes_the_error_type(value: object) -> None:
    with contextlib.suppress(ProtocolError):
        decode(canonical.dumps({"v": 1, "type": "push", "ops": [value], "head_signature": "x"}))
