"""Ops: canonical bytes, hash chains, tamper evidence, writer rules."""

from __future__ import annotations

import itertools

import pytest
from core_support import chain
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core import canonical
from syncengine.core.errors import ChainError, Equivocation, ProtocolError
from syncengine.core.hlc import Hlc
from syncengine.core.ops import GENESIS, Op, check_chain, make_next


def test_same_op_same_bytes_regardless_of_key_order() -> None:
    a = Op("T1", 1, Hlc(5, 0), "void_request", {"payment_id": "p", "at_ms": 5})
    b = Op("T1", 1, Hlc(5, 0), "void_request", {"at_ms": 5, "payment_id": "p"})
    assert a.canonical_bytes() == b.canonical_bytes()
    assert a.digest == b.digest
    assert a == b and hash(a) == hash(b)


def test_wire_round_trip() -> None:
    for op in chain("T1", 3):
        again = Op.from_wire(canonical.loads(canonical.dumps(op.to_wire())))
        assert again == op and again.digest == op.digest


def test_chain_links_by_digest() -> None:
    ops = chain("T1", 4)
    assert ops[0].prev == GENESIS
    for earlier, later in itertools.pairwise(ops):
        assert later.prev == earlier.digest
        assert later.seq == earlier.seq + 1


@given(st.data())
def test_tampering_any_byte_breaks_the_chain(data: st.DataObject) -> None:
    ops = chain("T1", 4)
    victim = data.draw(st.integers(0, 2))  # an op that has a successor
    raw = bytearray(canonical.dumps(ops[victim].to_wire()))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = (raw[pos] + data.draw(st.integers(1, 255))) % 256
    try:
        tampered = Op.from_wire(canonical.loads(bytes(raw)))
    except ProtocolError:
        return  # no longer even parses: tampering detected
    if tampered == ops[victim]:
        return  # e.g. whitespace-insensitive byte; the op itself is unchanged
    forged = [*ops[:victim], tampered, *ops[victim + 1 :]]
    with pytest.raises((ChainError, ProtocolError)):
        check_chain(0, GENESIS, forged)


def test_check_chain_plans_without_changing_and_detects_equivocation() -> None:
    ops = chain("T1", 5)
    result = check_chain(0, GENESIS, ops[:3])
    assert [op.seq for op in result.new] == [1, 2, 3]
    again = check_chain(
        result.head_seq, result.head_digest, ops[1:5], {2: ops[1].digest, 3: ops[2].digest}
    )
    assert [op.seq for op in again.new] == [4, 5] and again.duplicates == 2
    other = make_next(ops[1], "T1", Hlc(99, 0), "void_request", {"payment_id": "x", "at_ms": 1})
    with pytest.raises(Equivocation):
        check_chain(3, ops[2].digest, [other], {3: ops[2].digest})


def test_gap_is_refused_by_check_chain() -> None:
    ops = chain("T1", 4)
    with pytest.raises(ChainError, match="gap"):
        check_chain(1, ops[0].digest, [ops[2]])


@pytest.mark.parametrize(
    ("origin", "kind"),
    [("T1", "status"), ("server/T1", "capture"), ("T1", "nope"), ("bad origin!", "mode")],
)
def test_writer_rules_and_bad_fields(origin: str, kind: str) -> None:
    with pytest.raises(ProtocolError):
        Op(origin, 1, Hlc(1), kind, {})


def test_floats_and_huge_bodies_refused() -> None:
    with pytest.raises(ProtocolError, match="float"):
        Op("T1", 1, Hlc(1), "mode", {"x": 1.5})
    with pytest.raises(ProtocolError, match="limit"):
        Op("T1", 1, Hlc(1), "mode", {"x": "a" * 20_000})


@pytest.mark.parametrize(
    "wire",
    [
        ["bad origin!", 1, [5, 0], "mode", {}, GENESIS],
        [7, 1, [5, 0], "mode", {}, GENESIS],
        ["T1", 1, [5, 0.5], "mode", {}, GENESIS],
        ["T1", 1, [5], "mode", {}, GENESIS],
        ["T1", True, [5, 0], "mode", {}, GENESIS],
        ["T1", 1, [5, 0], "status", {}, GENESIS],
    ],
)
def test_from_wire_validates_every_field(wire: list[object]) -> None:
    # from_wire checks the origin once (not again when sealing); it must still refuse.
    with pytest.raises(ProtocolError):
        Op.from_wire(wire, _from_json=True)
