"""Replica laws: merge is commutative, associative, idempotent; delta sync converges."""

from __future__ import annotations

import pytest
from core_support import chain, universe
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import ChainError, Equivocation, InvariantViolation, MessageTooLarge
from syncengine.core.hlc import Hlc
from syncengine.core.ops import Op, make_next
from syncengine.core.replica import Replica

ALL = universe()
subsets = st.lists(st.sampled_from(ALL), max_size=len(ALL) * 2)  # duplicates included


def replica_of(ops: list[Op]) -> Replica:
    r = Replica()
    r.merge(ops)
    return r


def merged(a: Replica, b: Replica) -> Replica:
    out = a.copy()
    out.merge(held_and_logged(b))
    return out


def held_and_logged(r: Replica) -> list[Op]:
    ops = list(r.ops())
    ops += [op for per in r._held.values() for op in per.values()]
    return ops


@given(subsets, subsets)
def test_merge_is_commutative(a: list[Op], b: list[Op]) -> None:
    ra, rb = replica_of(a), replica_of(b)
    assert merged(ra, rb).state_key() == merged(rb, ra).state_key()


@given(subsets, subsets, subsets)
def test_merge_is_associative(a: list[Op], b: list[Op], c: list[Op]) -> None:
    ra, rb, rc = replica_of(a), replica_of(b), replica_of(c)
    left = merged(merged(ra, rb), rc)
    right = merged(ra, merged(rb, rc))
    assert left.state_key() == right.state_key()


@given(subsets)
def test_merge_is_idempotent(a: list[Op]) -> None:
    ra = replica_of(a)
    before = ra.state_key()
    result = ra.merge(held_and_logged(ra))
    assert ra.state_key() == before
    assert result.applied == ()


@given(st.permutations(ALL))
def test_any_delivery_order_gives_the_same_state(order: list[Op]) -> None:
    assert replica_of(order).state_key() == replica_of(ALL).state_key()
    assert replica_of(order).held_count() == 0


ORIGINS = sorted({op.origin for op in ALL})
prefixes = st.tuples(*[st.integers(0, sum(op.origin == o for op in ALL)) for o in ORIGINS])


def prefix_replica(lengths: tuple[int, ...]) -> Replica:
    """A replica as delta sync builds it: a prefix of each origin's chain."""
    wanted = dict(zip(ORIGINS, lengths, strict=True))
    return replica_of([op for op in ALL if op.seq <= wanted[op.origin]])


@given(prefixes, prefixes)
def test_delta_then_merge_converges(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    ra, rb = prefix_replica(a), prefix_replica(b)
    ra.merge(rb.delta(ra.version_vector()))
    rb.merge(ra.delta(rb.version_vector()))
    assert list(ra.ops()) == list(rb.ops())
    # Delta sends exactly what the peer lacks: nothing left afterwards.
    assert ra.delta(rb.version_vector()) == []


def test_delta_is_bounded_and_resumable() -> None:
    r = replica_of(ALL)
    peer = Replica()
    rounds = 0
    while batch := r.delta(peer.version_vector(), ops_max=4):
        assert len(batch) <= 4
        peer.merge(batch)
        rounds += 1
    assert list(peer.ops()) == list(r.ops())
    assert rounds == -(-len(ALL) // 4)


def test_version_vector_is_highest_contiguous_seq() -> None:
    t1 = chain("T1", 6)
    r = replica_of([t1[0], t1[1], t1[3], t1[4]])
    assert r.version_vector() == {"T1": 2}
    assert r.held_count() == 2
    r.merge([t1[2]])
    assert r.version_vector() == {"T1": 5}
    assert r.held_count() == 0


def test_equivocation_is_refused_and_changes_nothing() -> None:
    t1 = chain("T1", 3)
    r = replica_of(t1)
    before = r.state_key()
    fork = make_next(t1[0], "T1", Hlc(1, 5), "void_request", {"payment_id": "x", "at_ms": 1})
    with pytest.raises(Equivocation):
        r.merge([chain("T2", 1)[0], fork])
    assert r.state_key() == before


def test_tampered_link_is_refused_and_changes_nothing() -> None:
    t1 = chain("T1", 3)
    r = replica_of(t1[:1])
    forged = Op("T1", 2, t1[1].hlc, t1[1].kind, {**t1[1].body, "reason": "forged"}, t1[1].prev)
    bad_next = Op("T1", 3, t1[2].hlc, t1[2].kind, t1[2].body, "f" * 64)
    before = r.state_key()
    with pytest.raises(ChainError):
        r.merge([t1[1], bad_next])
    assert r.state_key() == before
    r.merge([forged])  # a different but well-chained op 2 is fine once: it is the first seen
    assert r.version_vector() == {"T1": 2}


def test_held_back_ops_are_bounded() -> None:
    t1 = chain("T1", 10)
    r = Replica(held_ops_max=3)
    with pytest.raises(MessageTooLarge, match="missing ops"):
        r.merge(t1[1:6])
    assert len(r) == 0 and r.held_count() == 0
    r.merge(t1[1:4])
    assert r.held_count() == 3


@given(subsets, st.data())
def test_truncate_gives_back_exactly_the_suffix_it_drops(a: list[Op], data: st.DataObject) -> None:
    """truncate(origin, k) drops the log above k (and what is held back there) and returns
    it; merging it back gives the contiguous log again; a second truncate drops nothing."""
    r = replica_of(a)
    origins = sorted({op.origin for op in ALL})
    origin = data.draw(st.sampled_from(origins))
    head = r.head(origin)[0]
    keep = data.draw(st.integers(0, head))
    logged_before = [op.digest for op in r.ops()]
    others = [op.digest for op in r.ops() if op.origin != origin]
    removed = r.range(origin, keep, head)
    assert r.truncate(origin, keep) == len(removed)
    assert [op.seq for op in removed] == list(range(keep + 1, head + 1))
    assert r.head(origin)[0] == keep
    assert [op.digest for op in r.ops() if op.origin != origin] == others
    assert r.truncate(origin, keep) == 0
    r.merge(removed)
    assert [op.digest for op in r.ops()] == logged_before


# -- compaction: ops leave memory and are read back from a store ------------------------------


class DurableLog:
    """The store a compacting replica reads back from: every op it applied, by key."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, int], Op] = {}
        self.reads = 0

    def keep(self, ops: tuple[Op, ...] | list[Op]) -> None:
        for op in ops:
            self.ops[(op.origin, op.seq)] = op

    def read(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        self.reads += 1
        return [self.ops[(origin, seq)] for seq in range(after_seq + 1, end_seq + 1)]


def _same_answers(plain: Replica, lean: Replica, vv: dict[str, int], ops_max: int) -> None:
    assert lean.version_vector() == plain.version_vector()
    assert lean.state_key() == plain.state_key()
    assert list(lean.ops()) == list(plain.ops()) and len(lean) == len(plain)
    assert lean.held_count() == plain.held_count()
    for origin in ORIGINS:
        assert lean.head(origin) == plain.head(origin)
        assert lean.ops_of(origin) == plain.ops_of(origin)
        head = plain.head(origin)[0]
        for seq in range(0, head + 3):
            assert lean.get(origin, seq) == plain.get(origin, seq)
            for end in (seq, seq + 1, head, head + 2):
                assert lean.range(origin, seq, end) == plain.range(origin, seq, end)
        assert [op.seq for op in plain.range(origin, 0, head)] == list(range(1, head + 1))
    assert lean.delta(vv) == plain.delta(vv)
    assert lean.delta(vv, ops_max) == plain.delta(vv, ops_max)


@given(subsets, subsets, st.data())
def test_a_compacted_replica_answers_as_the_whole_one(
    a: list[Op], b: list[Op], data: st.DataObject
) -> None:
    """Compacting any prefix of any origin changes no answer: heads, vectors, gets, deltas
    (bounded or not), merges and truncates are those of the replica that kept every op."""
    plain, store = replica_of(a), DurableLog()
    lean = Replica(reader=store.read)
    store.keep(lean.merge(a).applied)
    vv = {o: data.draw(st.integers(-1, plain.head(o)[0] + 1)) for o in ORIGINS}
    ops_max = data.draw(st.integers(1, len(ALL)))
    for origin in ORIGINS:
        upto = data.draw(st.integers(0, plain.head(origin)[0] + 1))
        moved = lean.compact(origin, upto)
        assert moved == min(upto, plain.head(origin)[0])
        assert lean.in_memory(origin) == plain.head(origin)[0] - moved
    _same_answers(plain, lean, vv, ops_max)
    # Merges go on from the compacted heads; a duplicate of a compacted op is one.
    expected = plain.merge(b)
    result = lean.merge(b)
    store.keep(result.applied)
    assert result == expected
    _same_answers(plain, lean, vv, ops_max)
    for origin in ORIGINS:  # compact again, past what the merge added
        lean.compact(origin, data.draw(st.integers(0, plain.head(origin)[0])))
    origin = data.draw(st.sampled_from(ORIGINS))
    keep = data.draw(st.integers(0, plain.head(origin)[0]))
    head = plain.head(origin)[0]
    assert lean.range(origin, keep, head) == plain.range(origin, keep, head)
    assert lean.truncate(origin, keep) == plain.truncate(origin, keep)
    _same_answers(plain, lean, vv, ops_max)
    assert lean.copy().state_key() == plain.state_key()


def test_compaction_needs_a_store_that_gives_back_the_same_ops() -> None:
    t1 = chain("T1", 6)
    with pytest.raises(ValueError, match="reader"):
        replica_of(t1).compact("T1", 3)
    store = DurableLog()
    lean = Replica(reader=store.read)
    store.keep(lean.merge(t1).applied)
    assert lean.compact("T1", 4) == 4 and lean.in_memory("T1") == 2
    assert lean.head("T1") == (6, t1[5].digest) and store.reads == 0  # no read for a head
    assert lean.get("T1", 2) == t1[1] and store.reads == 1
    del store.ops[("T1", 3)]
    store.ops[("T1", 3)] = t1[0]  # the store answers with another op
    with pytest.raises(InvariantViolation, match=r"T1#3\.\.3"):
        lean.get("T1", 3)
    # Everything compacted: the chain goes on from the base alone.
    lean.compact("T1", 6)
    assert lean.in_memory("T1") == 0 and lean.version_vector() == {"T1": 6}
    nxt = make_next(t1[5], "T1", Hlc(99, 0), "void_request", {"payment_id": "x", "at_ms": 1})
    assert lean.merge([nxt]).applied == (nxt,)
