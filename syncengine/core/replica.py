"""A replica: a set of ops keyed by (origin, seq), with version vectors and delta sync.

Theory of operation
-------------------
1. State is the set of ops held, split per origin into a contiguous log (seq 1..head) and
   a bounded buffer of ops that arrived above a gap ("held back").
2. ``version_vector()`` maps each origin to its highest contiguous seq. ``delta(vv)``
   returns exactly the ops a peer with ``vv`` lacks from our contiguous logs.
3. ``merge(ops)`` is a set union keyed by (origin, seq). It is commutative, associative and
   idempotent; ``tests/core/test_replica.py`` checks these laws with hypothesis.
4. A different op under an (origin, seq) we hold is :class:`Equivocation`; an op that does
   not chain to its predecessor is :class:`ChainError`. Both leave the replica unchanged:
   a merge is planned completely before anything is applied.
5. Ops held back above a gap are bounded by ``held_ops_max``; past it the merge is refused
   with :class:`MessageTooLarge` and the replica is unchanged.
6. A replica given a ``reader`` (its ops' durable store) may :meth:`compact` an origin: the
   ops up to a seq leave memory and are read back from the store when asked for (``get``,
   ``delta``, ``ops_of``, ``truncate``). Only the last op dropped, ``(seq, digest)``, stays:
   the chain goes on from it. A compacted replica answers every question as it did before
   (``tests/core/test_replica.py`` checks it with hypothesis); memory then holds only what
   was not compacted, so a terminal's replica does not grow with its history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from syncengine.core.errors import ChainError, Equivocation, InvariantViolation, MessageTooLarge
from syncengine.core.ops import GENESIS, Op

HELD_OPS_MAX_DEFAULT = 10_000

VersionVector = dict[str, int]

#: ``reader(origin, after_seq, end_seq)``: the durably stored ops of ``origin`` with
#: ``after_seq < seq <= end_seq``, in seq order (what a compacted replica reads back).
OpReader = Callable[[str, int, int], list[Op]]


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge did: ops newly applied (in chain order), held back, and duplicates."""

    applied: tuple[Op, ...]
    held: int
    duplicates: int


class Replica:
    """An in-memory replica of ops. Pure: no I/O, no clock."""

    def __init__(
        self, held_ops_max: int = HELD_OPS_MAX_DEFAULT, reader: OpReader | None = None
    ) -> None:
        if held_ops_max < 0:
            raise ValueError("held_ops_max must be >= 0")
        self.held_ops_max = held_ops_max
        self.reader = reader
        # Per origin: the ops in memory, seqs base+1 .. head, and the base (seq, digest)
        # of the last op compacted out of memory (absent: none was).
        self._logs: dict[str, list[Op]] = {}
        self._base: dict[str, tuple[int, str]] = {}
        self._held: dict[str, dict[int, Op]] = {}

    # -- reading -------------------------------------------------------------------------

    def _base_seq(self, origin: str) -> int:
        base = self._base.get(origin)
        return 0 if base is None else base[0]

    def _read(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        """Compacted ops of ``origin`` with ``after_seq < seq <= end_seq`` from the reader."""
        if end_seq <= after_seq:
            return []
        assert self.reader is not None  # only a replica with a reader has compacted ops
        ops = self.reader(origin, after_seq, end_seq)
        if [op.seq for op in ops] != list(range(after_seq + 1, end_seq + 1)) or any(
            op.origin != origin for op in ops
        ):
            raise InvariantViolation(
                f"the store gave back other ops than {origin}#{after_seq + 1}..{end_seq}"
            )
        return ops

    def version_vector(self) -> VersionVector:
        """Highest contiguous seq per origin."""
        heads = {origin: self.head(origin)[0] for origin in self._logs}
        return {origin: seq for origin, seq in heads.items() if seq}

    def head(self, origin: str) -> tuple[int, str]:
        """``(seq, digest)`` of the last contiguous op of ``origin`` (0, GENESIS if none)."""
        log = self._logs.get(origin)
        if log:
            return log[-1].seq, log[-1].digest
        return self._base.get(origin, (0, GENESIS))

    def get(self, origin: str, seq: int) -> Op | None:
        base = self._base_seq(origin)
        log = self._logs.get(origin, [])
        if base < seq <= base + len(log):
            return log[seq - base - 1]
        if 1 <= seq <= base:
            return self._read(origin, seq - 1, seq)[0]
        return self._held.get(origin, {}).get(seq)

    def ops_of(self, origin: str) -> list[Op]:
        """The contiguous log of ``origin``, by seq (a copy; compacted ops read back)."""
        return self.range(origin, 0, self.head(origin)[0])

    def ops(self) -> Iterator[Op]:
        """Every contiguous op, by origin then seq."""
        for origin in sorted(self._logs):
            yield from self.ops_of(origin)

    def in_memory(self, origin: str) -> int:
        """How many of ``origin``'s contiguous ops are held in memory (not compacted)."""
        return len(self._logs.get(origin, []))

    def held_count(self) -> int:
        return sum(len(held) for held in self._held.values())

    def __len__(self) -> int:
        return sum(self.head(origin)[0] for origin in self._logs)

    def delta(self, vv: Mapping[str, int], ops_max: int | None = None) -> list[Op]:
        """The ops a peer with version vector ``vv`` lacks, by origin then seq.

        ``ops_max`` bounds the answer; the peer asks again with its new vector.
        """
        out: list[Op] = []
        for origin in sorted(self._logs):
            start = max(vv.get(origin, 0), 0)
            room = None if ops_max is None else ops_max - len(out)
            base = self._base_seq(origin)
            if start < base:
                end = base if room is None else min(base, start + room)
                out.extend(self._read(origin, start, end))
                start = end
            log = self._logs[origin]
            for op in log[start - base :]:
                if ops_max is not None and len(out) >= ops_max:
                    return out
                out.append(op)
            if ops_max is not None and len(out) >= ops_max:
                return out
        return out

    def state_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A value equal for two replicas exactly when they hold the same ops."""
        logged = tuple(op.digest for op in self.ops())
        held = tuple(
            sorted(op.digest for per_origin in self._held.values() for op in per_origin.values())
        )
        return logged, held

    # -- merging -------------------------------------------------------------------------

    def merge(self, ops: Iterable[Op]) -> MergeResult:
        """Union ``ops`` into this replica. Planned in full before anything changes."""
        by_origin: dict[str, dict[int, Op]] = {}
        duplicates = 0
        for op in ops:
            existing = self.get(op.origin, op.seq)
            incoming = by_origin.setdefault(op.origin, {})
            seen = existing if existing is not None else incoming.get(op.seq)
            if seen is not None:
                if seen != op:
                    raise Equivocation(
                        f"{op.origin}#{op.seq} differs from the op already held under that seq"
                    )
                duplicates += 1
                continue
            incoming[op.seq] = op

        plans: dict[str, tuple[list[Op], dict[int, Op]]] = {}
        held_total = self.held_count()
        for origin, incoming in by_origin.items():
            held = dict(self._held.get(origin, {}))
            held_total -= len(held)
            held.update(incoming)
            seq, digest = self.head(origin)
            applied: list[Op] = []
            while (nxt := held.get(seq + 1)) is not None:
                if nxt.prev != digest:
                    raise ChainError(f"{origin}#{nxt.seq} does not chain to #{seq}: tampered")
                del held[seq + 1]
                applied.append(nxt)
                seq, digest = nxt.seq, nxt.digest
            held_total += len(held)
            plans[origin] = (applied, held)
        if held_total > self.held_ops_max:
            raise MessageTooLarge(
                f"{held_total} ops would be held back above gaps; the limit is "
                f"{self.held_ops_max}. Send the missing ops first."
            )

        applied_all: list[Op] = []
        held_count = 0
        for origin, (applied, held) in plans.items():
            self._logs.setdefault(origin, []).extend(applied)
            if held:
                self._held[origin] = held
            else:
                self._held.pop(origin, None)
            applied_all.extend(applied)
            held_count += len(held)
        return MergeResult(tuple(applied_all), held_count, duplicates)

    def range(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        """``origin``'s contiguous ops with ``after_seq < seq <= end_seq``, by seq."""
        after_seq, end_seq = max(after_seq, 0), min(end_seq, self.head(origin)[0])
        base = self._base_seq(origin)
        out = self._read(origin, after_seq, min(end_seq, base)) if after_seq < base else []
        log = self._logs.get(origin, [])
        out.extend(log[max(after_seq - base, 0) : max(end_seq - base, 0)])
        return out

    def truncate(self, origin: str, keep_seq: int) -> int:
        """Drop ``origin``'s ops above ``keep_seq`` (and any held back); return how many of
        its contiguous log were dropped.

        Not a merge: only for a stream its own author rewrote (the terminal's copy of a
        server stream the server lost in a restore, kept aside in an archive by the caller).
        Compacted ops dropped are not read back (the store may have moved them already: read
        them with :meth:`range` first if they are wanted); the op at ``keep_seq`` is, if it
        was compacted (it is the new head).
        """
        if keep_seq < 0:
            raise ValueError("keep_seq must be >= 0")
        base = self._base_seq(origin)
        log = self._logs.get(origin, [])
        removed = max(self.head(origin)[0] - keep_seq, 0)
        if keep_seq >= base:
            del log[keep_seq - base :]
        else:  # into the compacted part: keep_seq is the new base
            log.clear()
            if keep_seq == 0:
                self._base.pop(origin, None)
            else:
                self._base[origin] = (
                    keep_seq,
                    self._read(origin, keep_seq - 1, keep_seq)[0].digest,
                )
        if not log and origin not in self._base:
            self._logs.pop(origin, None)
        self._held.pop(origin, None)
        return removed

    def compact(self, origin: str, upto_seq: int) -> int:
        """Let ``origin``'s ops up to ``upto_seq`` leave memory (see 6. above); returns how
        many left. Needs a ``reader``: they are read back from the store when asked for.

        Only for ops the reader holds durably: the caller compacts what it has stored.
        """
        if self.reader is None:
            raise ValueError("only a replica with a reader can compact")
        base = self._base_seq(origin)
        log = self._logs.get(origin, [])
        count = min(upto_seq, base + len(log)) - base
        if count <= 0:
            return 0
        last = log[count - 1]
        self._base[origin] = (last.seq, last.digest)
        del log[:count]
        return count

    def copy(self) -> Replica:
        clone = Replica(self.held_ops_max, self.reader)
        clone._logs = {origin: list(log) for origin, log in self._logs.items()}
        clone._base = dict(self._base)
        clone._held = {origin: dict(held) for origin, held in self._held.items()}
        return clone
