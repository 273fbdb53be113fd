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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from syncengine.core.errors import ChainError, Equivocation, MessageTooLarge
from syncengine.core.ops import GENESIS, Op

HELD_OPS_MAX_DEFAULT = 10_000

VersionVector = dict[str, int]


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge did: ops newly applied (in chain order), held back, and duplicates."""

    applied: tuple[Op, ...]
    held: int
    duplicates: int


class Replica:
    """An in-memory replica of ops. Pure: no I/O, no clock."""

    def __init__(self, held_ops_max: int = HELD_OPS_MAX_DEFAULT) -> None:
        if held_ops_max < 0:
            raise ValueError("held_ops_max must be >= 0")
        self.held_ops_max = held_ops_max
        self._logs: dict[str, list[Op]] = {}
        self._held: dict[str, dict[int, Op]] = {}

    # -- reading -------------------------------------------------------------------------

    def version_vector(self) -> VersionVector:
        """Highest contiguous seq per origin."""
        return {origin: len(log) for origin, log in self._logs.items() if log}

    def head(self, origin: str) -> tuple[int, str]:
        """``(seq, digest)`` of the last contiguous op of ``origin`` (0, GENESIS if none)."""
        log = self._logs.get(origin)
        if not log:
            return 0, GENESIS
        return log[-1].seq, log[-1].digest

    def get(self, origin: str, seq: int) -> Op | None:
        log = self._logs.get(origin, [])
        if 1 <= seq <= len(log):
            return log[seq - 1]
        return self._held.get(origin, {}).get(seq)

    def ops_of(self, origin: str) -> list[Op]:
        """The contiguous log of ``origin``, by seq (a copy)."""
        return list(self._logs.get(origin, []))

    def ops(self) -> Iterator[Op]:
        """Every contiguous op, by origin then seq."""
        for origin in sorted(self._logs):
            yield from self._logs[origin]

    def held_count(self) -> int:
        return sum(len(held) for held in self._held.values())

    def __len__(self) -> int:
        return sum(len(log) for log in self._logs.values())

    def delta(self, vv: Mapping[str, int], ops_max: int | None = None) -> list[Op]:
        """The ops a peer with version vector ``vv`` lacks, by origin then seq.

        ``ops_max`` bounds the answer; the peer asks again with its new vector.
        """
        out: list[Op] = []
        for origin in sorted(self._logs):
            log = self._logs[origin]
            start = max(vv.get(origin, 0), 0)
            for op in log[start:]:
                if ops_max is not None and len(out) >= ops_max:
                    return out
                out.append(op)
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

    def truncate(self, origin: str, keep_seq: int) -> list[Op]:
        """Drop ``origin``'s ops above ``keep_seq`` (and any held back); return them.

        Not a merge: only for a stream its own author rewrote (the terminal's copy of a
        server stream the server lost in a restore, kept aside in an archive by the caller).
        """
        if keep_seq < 0:
            raise ValueError("keep_seq must be >= 0")
        log = self._logs.get(origin, [])
        removed = log[keep_seq:]
        del log[keep_seq:]
        if not log:
            self._logs.pop(origin, None)
        self._held.pop(origin, None)
        return removed

    def copy(self) -> Replica:
        clone = Replica(self.held_ops_max)
        clone._logs = {origin: list(log) for origin, log in self._logs.items()}
        clone._held = {origin: dict(held) for origin, held in self._held.items()}
        return clone
