"""Offline amount limits (R3): a per-transaction limit and a total limit on stored, not yet
forwarded offline payments, per terminal.

Seed 000 (Lightspeed X-Series): "The 'Per transaction limit' has a default and maximum amount
of $5,000 and the 'Total transaction limit' has a default and maximum amount of $50,000. You
can change both amounts but you can't go above the maximum amount limits."

Maxima per currency (:data:`LIMIT_MAXIMA_MAJOR`), in major units of the currency:

- Currencies whose major unit is worth roughly a US dollar or more (USD, CAD, AUD, NZD, GBP,
  EUR, CHF) use the seed's figures as they are: 5,000 and 50,000.
- Other currencies use round figures of about the same purchasing value (for example
  50,000 / 500,000 SEK, 750,000 / 7,500,000 JPY) so that a merchant abroad is not held to
  a limit ten times smaller, or a hundred times larger, than the seed intends.

The table is data, reviewed like code; a currency missing from it cannot be used for offline
payments (``ConfigError``) rather than getting a guessed limit. Default limits equal the
maxima; a merchant may only lower them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from syncengine.core.errors import ConfigError, InvalidState, MoneyError, Refused
from syncengine.core.money import Money, exponent_of

#: (per-transaction maximum, total maximum) in major units, per ISO 4217 currency.
LIMIT_MAXIMA_MAJOR: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "USD": (5_000, 50_000),
        "CAD": (5_000, 50_000),
        "AUD": (5_000, 50_000),
        "NZD": (5_000, 50_000),
        "GBP": (5_000, 50_000),
        "EUR": (5_000, 50_000),
        "CHF": (5_000, 50_000),
        "SEK": (50_000, 500_000),
        "NOK": (50_000, 500_000),
        "DKK": (35_000, 350_000),
        "PLN": (20_000, 200_000),
        "JPY": (750_000, 7_500_000),
        "KRW": (7_000_000, 70_000_000),
        "BHD": (2_000, 20_000),
        "KWD": (1_500, 15_000),
    }
)


def limit_maxima(currency: str) -> tuple[Money, Money]:
    """Return ``(per_transaction_max, total_max)`` for ``currency`` as :class:`Money`.

    Raises :class:`ConfigError` for a currency without an offline limit in the table.
    """
    try:
        per_tx_major, total_major = LIMIT_MAXIMA_MAJOR[currency]
    except KeyError:
        raise ConfigError(
            f"offline payments have no limit defined for currency {currency!r}; "
            f"supported: {', '.join(sorted(LIMIT_MAXIMA_MAJOR))}"
        ) from None
    scale = 10 ** exponent_of(currency)
    return Money(per_tx_major * scale, currency), Money(total_major * scale, currency)


@dataclass(frozen=True, slots=True)
class OfflineLimits:
    """Per-terminal offline limits, validated on construction.

    Both amounts must be in the same currency, above zero and at most the currency's maximum
    from :data:`LIMIT_MAXIMA_MAJOR` (limits are configurable downwards only). A
    per-transaction limit above the total limit is allowed; the total then binds first.
    """

    per_transaction: Money
    total: Money

    def __post_init__(self) -> None:
        if not isinstance(self.per_transaction, Money) or not isinstance(self.total, Money):
            raise ConfigError("offline limits must be Money amounts")
        if self.per_transaction.currency != self.total.currency:
            raise ConfigError(
                f"offline limits must share one currency, got {self.per_transaction.currency} "
                f"and {self.total.currency}"
            )
        per_tx_max, total_max = limit_maxima(self.total.currency)
        _check_limit("per-transaction", self.per_transaction, per_tx_max)
        _check_limit("total", self.total, total_max)

    @property
    def currency(self) -> str:
        """The merchant currency both limits are expressed in."""
        return self.total.currency

    @classmethod
    def default(cls, currency: str) -> OfflineLimits:
        """The default limits for ``currency``: the maxima themselves (seed 000)."""
        per_tx_max, total_max = limit_maxima(currency)
        return cls(per_tx_max, total_max)


def _check_limit(name: str, value: Money, maximum: Money) -> None:
    if not value.is_positive():
        raise ConfigError(
            f"the offline {name} limit must be above zero, got {value}; "
            "to stop offline payments, disallow offline mode instead"
        )
    if value > maximum:
        raise ConfigError(
            f"the offline {name} limit {value} is above the maximum of {maximum}; "
            f"limits can only be lowered, set {maximum} or less"
        )


def current_max_offline_amount(limits: OfflineLimits, outstanding: Money) -> Money:
    """The largest amount the terminal may take offline right now.

    ``min(per_transaction, total - outstanding)``, floored at zero. ``outstanding`` is the
    sum of stored offline payments not yet forwarded; it must be in the limits' currency
    (otherwise :class:`MoneyError`) and not negative (otherwise :class:`InvalidState`).
    """
    _check_outstanding(limits, outstanding)
    room = limits.total - outstanding
    return limits.per_transaction.min(room).max(Money.zero(limits.currency))


def check_capture(limits: OfflineLimits, outstanding: Money, amount: Money) -> None:
    """Refuse an offline capture of ``amount`` that would break a limit; return if allowed.

    Raises :class:`Refused` with reason ``amount_not_positive``, ``over_transaction_limit``
    or ``over_total_limit``. The per-transaction limit is checked first because it is the
    one the cashier can act on by splitting the payment.
    """
    _check_outstanding(limits, outstanding)
    if amount.currency != limits.currency:
        raise MoneyError(f"cannot take {amount.currency} against limits in {limits.currency}")
    if not amount.is_positive():
        raise Refused(
            "amount_not_positive",
            f"The amount {amount} is not a payment; enter an amount above zero.",
        )
    if amount > limits.per_transaction:
        raise Refused(
            "over_transaction_limit",
            f"{amount} is over the offline limit of {limits.per_transaction} per payment. "
            f"Take {limits.per_transaction} or less, split the payment, or wait until the "
            "terminal is back online.",
        )
    if outstanding + amount > limits.total:
        room = current_max_offline_amount(limits, outstanding)
        raise Refused(
            "over_total_limit",
            f"{amount} would bring stored offline payments to {outstanding + amount}, over "
            f"the offline total limit of {limits.total}. At most {room} can be taken "
            "offline now; reconnect so stored payments are forwarded and the room frees up.",
        )


def _check_outstanding(limits: OfflineLimits, outstanding: Money) -> None:
    if outstanding.currency != limits.currency:
        raise MoneyError(
            f"outstanding amount is in {outstanding.currency} but limits are in {limits.currency}"
        )
    if outstanding.minor < 0:
        raise InvalidState(f"outstanding offline amount cannot be negative, got {outstanding}")
