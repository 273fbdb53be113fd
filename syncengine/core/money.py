"""Money as integer minor units with an ISO 4217 currency. No floats, ever.

Amounts are parsed from decimal strings using the currency's exponent ("12.50" USD is
1250 minor units; "1250" JPY is 1250). Arithmetic between currencies raises
:class:`MoneyError` instead of silently producing nonsense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from syncengine.core.errors import MoneyError

# ISO 4217 minor-unit exponents for the currencies our regions use.
CURRENCY_EXPONENT: dict[str, int] = {
    "USD": 2,
    "CAD": 2,
    "AUD": 2,
    "NZD": 2,
    "GBP": 2,
    "EUR": 2,
    "CHF": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "JPY": 0,
    "KRW": 0,
    "BHD": 3,
    "KWD": 3,
}

AMOUNT_MINOR_MAX = 10**15  # far above any card payment; bounds parsing and sums

_AMOUNT_RE = re.compile(r"^(-)?(\d{1,16})(?:\.(\d{1,4}))?$")


def exponent_of(currency: str) -> int:
    """Return the minor-unit exponent of ``currency`` or raise :class:`MoneyError`."""
    try:
        return CURRENCY_EXPONENT[currency]
    except KeyError:
        raise MoneyError(
            f"unknown currency {currency!r}; use an ISO 4217 code such as USD, EUR, CAD"
        ) from None


@dataclass(frozen=True, slots=True, order=False)
class Money:
    """An amount of money: ``minor`` units of ``currency`` (e.g. cents of USD)."""

    minor: int
    currency: str

    def __post_init__(self) -> None:
        if type(self.minor) is not int:
            raise MoneyError(f"Money needs integer minor units, got {type(self.minor).__name__}")
        exponent_of(self.currency)
        if abs(self.minor) > AMOUNT_MINOR_MAX:
            raise MoneyError(f"amount {self.minor} is beyond the allowed magnitude")

    @classmethod
    def parse(cls, text: str, currency: str) -> Money:
        """Parse a decimal string such as ``"12.50"`` into minor units of ``currency``.

        More decimals than the currency has is an error, never a rounding.
        """
        exp = exponent_of(currency)
        match = _AMOUNT_RE.match(text.strip())
        if match is None:
            raise MoneyError(f"{text!r} is not an amount; write it like 12.50")
        sign, whole, frac = match.group(1), match.group(2), match.group(3) or ""
        if len(frac) > exp:
            raise MoneyError(
                f"{text!r} has {len(frac)} decimals but {currency} has {exp}; "
                "amounts are never rounded"
            )
        minor = int(whole) * 10**exp + (int(frac.ljust(exp, "0")) if exp else 0)
        return cls(-minor if sign else minor, currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def _same(self, other: Money) -> None:
        if not isinstance(other, Money):
            raise MoneyError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise MoneyError(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.minor < other.minor

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.minor <= other.minor

    def __gt__(self, other: Money) -> bool:
        self._same(other)
        return self.minor > other.minor

    def __ge__(self, other: Money) -> bool:
        self._same(other)
        return self.minor >= other.minor

    def min(self, other: Money) -> Money:
        return self if self <= other else other

    def max(self, other: Money) -> Money:
        return self if self >= other else other

    def is_positive(self) -> bool:
        return self.minor > 0

    def format(self) -> str:
        """Decimal text without the currency, e.g. ``"12.50"``; inverse of :meth:`parse`."""
        exp = exponent_of(self.currency)
        sign = "-" if self.minor < 0 else ""
        whole, frac = divmod(abs(self.minor), 10**exp) if exp else (abs(self.minor), 0)
        return f"{sign}{whole}.{frac:0{exp}d}" if exp else f"{sign}{whole}"

    def __str__(self) -> str:
        return f"{self.format()} {self.currency}"

    def to_wire(self) -> dict[str, object]:
        return {"minor": self.minor, "currency": self.currency}

    @classmethod
    def from_wire(cls, value: object) -> Money:
        if type(value) is not dict or len(value) != 2:
            raise MoneyError(f"malformed money {value!r}")
        minor, currency = value.get("minor"), value.get("currency")
        if type(minor) is not int or not isinstance(currency, str):
            raise MoneyError(f"malformed money {value!r}")
        if cls is Money:
            fast = money_or_none(minor, currency)
            if fast is not None:
                return fast
        return cls(minor, currency)


# Money is a frozen slotted dataclass: the slot descriptors set a field without the frozen
# ``__setattr__`` (and without ``__post_init__``, whose checks :func:`money_or_none` makes).
_new = object.__new__
_set_minor = Money.__dict__["minor"].__set__
_set_currency = Money.__dict__["currency"].__set__


def money_or_none(minor: object, currency: object) -> Money | None:
    """``Money(minor, currency)`` if that is valid, else ``None`` (never raises).

    The checks of :meth:`Money.__post_init__`, without its call overhead, for decoders on
    the per-op path; on ``None`` the caller builds ``Money`` the ordinary way for the precise
    error. Only an exact ``int`` and an exact ``str`` qualify (``bool`` is not an ``int``
    here, as there).
    """
    if (
        type(minor) is not int
        or type(currency) is not str
        or currency not in CURRENCY_EXPONENT
        or not -AMOUNT_MINOR_MAX <= minor <= AMOUNT_MINOR_MAX
    ):
        return None
    money: Money = _new(Money)
    _set_minor(money, minor)
    _set_currency(money, currency)
    return money
