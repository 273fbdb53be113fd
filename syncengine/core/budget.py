"""A merchant-wide offline exposure budget that holds across partitioned terminals.

Theory of operation (an escrow / bounded-counter CRDT)
-----------------------------------------------------
1. The merchant sets a budget ``B``: the most that may be outstanding in offline payments
   (captured, not yet final) across *all* its terminals at once.
2. Rights to spend are split between terminals by the server alone, as ``grant`` ops in
   each terminal's stream ``server/T``. A grant carries the terminal's *cumulative* rights
   ``granted_T`` (a grow-only counter), so a duplicated or reordered grant changes nothing:
   the terminal takes the maximum it has seen.
3. A terminal spends rights by capturing offline (``used_T``, the sum of all its offline
   captures, grows). A payment's rights are *released* when the server writes its final
   status (approved, declined, expired); the server then raises ``granted_T`` to hand the
   room back. The terminal never releases rights on its own, so it needs to know nothing
   but its own captures and the largest grant it has seen.
4. A terminal may capture ``amount`` only if ``used_T + amount <= granted_T``. It needs no
   one's permission, so this holds while it is partitioned. Its outstanding amount
   ``used_T - released_T`` is then at most ``granted_T - released_T``.
5. The server grants more to ``T`` only while ``sum over terminals of
   (granted_T - released_T) <= B`` stays true. Since every terminal's outstanding amount is
   at most ``granted_T - released_T``, the sum of outstanding offline payments of all
   terminals never exceeds ``B``, whatever the network does.
6. Rights move between terminals only through the server: a terminal's unused rights are
   re-granted elsewhere only after its payments are released (rule 3), never by guessing.

The invariant of rule 5 is checked by :meth:`MerchantEscrow.check` and by property tests
that interleave grants, captures, finals and partitions at random.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from syncengine.core.errors import ConfigError, InvariantViolation, Refused
from syncengine.core.money import Money


@dataclass(frozen=True, slots=True)
class TerminalBudget:
    """A terminal's view of its rights: derived from its log, never stored on its own.

    ``granted`` is the largest cumulative grant seen; ``used`` the sum of every offline
    capture this terminal ever made.
    """

    granted: Money
    used: Money

    @property
    def available(self) -> Money:
        return (self.granted - self.used).max(Money.zero(self.granted.currency))

    def check_capture(self, amount: Money) -> None:
        """Raise :class:`Refused` unless ``amount`` fits in the rights this terminal holds."""
        if amount > self.available:
            raise Refused(
                "over_merchant_budget",
                f"{amount} is more than the {self.available} this terminal may still take "
                "offline under the merchant-wide budget; take a smaller payment or wait "
                "until stored payments are forwarded.",
            )


@dataclass
class MerchantEscrow:
    """The server's ledger of rights granted per terminal (pure; persisted by the server)."""

    budget: Money
    granted: dict[str, Money] = field(default_factory=dict)
    released: dict[str, Money] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget.minor < 0:
            raise ConfigError("a merchant budget cannot be negative")

    def _zero(self) -> Money:
        return Money.zero(self.budget.currency)

    def held(self, terminal_id: str) -> Money:
        """Rights terminal ``terminal_id`` holds now: granted minus released."""
        return self.granted.get(terminal_id, self._zero()) - self.released.get(
            terminal_id, self._zero()
        )

    def committed(self) -> Money:
        total = self._zero()
        for terminal_id in self.granted:
            total = total + self.held(terminal_id)
        return total

    def free(self) -> Money:
        return self.budget - self.committed()

    def release(self, terminal_id: str, released_total: Money) -> None:
        """Record the cumulative amount released for a terminal (max wins: idempotent)."""
        current = self.released.get(terminal_id, self._zero())
        if released_total > self.granted.get(terminal_id, self._zero()):
            raise InvariantViolation(f"{terminal_id} released more than it was granted")
        self.released[terminal_id] = current.max(released_total)

    def top_up(self, terminal_id: str, target_held: Money) -> Money | None:
        """Grant ``terminal_id`` enough to hold ``target_held`` if the budget allows.

        Returns the new cumulative grant to write as a ``grant`` op, or ``None`` if nothing
        changes. Never grants past the budget: a terminal gets what is free, possibly less.
        """
        want = target_held - self.held(terminal_id)
        if not want.is_positive():
            return None
        extra = want.min(self.free())
        if not extra.is_positive():
            return None
        new_total = self.granted.get(terminal_id, self._zero()) + extra
        self.granted[terminal_id] = new_total
        self.check()
        return new_total

    def check(self) -> None:
        """The escrow invariant: rights held by all terminals never exceed the budget."""
        if self.committed() > self.budget:
            raise InvariantViolation(
                f"rights held {self.committed()} exceed the merchant budget {self.budget}"
            )


def fair_share(budget: Money, terminal_ids: Mapping[str, object] | list[str]) -> Money:
    """An even split of ``budget`` over terminals, rounded down to a minor unit."""
    count = len(terminal_ids)
    if count == 0:
        return Money.zero(budget.currency)
    return Money(budget.minor // count, budget.currency)
