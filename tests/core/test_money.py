"""Money: integer minor units, exponent-aware parsing, no mixed currencies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import MoneyError
from syncengine.core.money import CURRENCY_EXPONENT, Money


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [
        ("12.50", "USD", 1250),
        ("12.5", "USD", 1250),
        ("12", "USD", 1200),
        ("0.01", "EUR", 1),
        ("5000.00", "CAD", 500000),
        ("1250", "JPY", 1250),
        ("1.234", "BHD", 1234),
        ("-3.10", "GBP", -310),
    ],
)
def test_parse_uses_currency_exponent(text: str, currency: str, minor: int) -> None:
    assert Money.parse(text, currency) == Money(minor, currency)


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("12.505", "USD"),
        ("1.5", "JPY"),
        ("abc", "USD"),
        ("1e3", "USD"),
        ("", "USD"),
        ("1,00", "EUR"),
    ],
)
def test_parse_refuses_rounding_and_garbage(text: str, currency: str) -> None:
    with pytest.raises(MoneyError):
        Money.parse(text, currency)


def test_unknown_currency_is_refused() -> None:
    with pytest.raises(MoneyError, match="unknown currency"):
        Money(100, "XXX")


def test_floats_are_refused() -> None:
    with pytest.raises(MoneyError):
        Money(12.5, "USD")  # type: ignore[arg-type]


def test_mixed_currencies_are_refused() -> None:
    with pytest.raises(MoneyError, match="USD with EUR"):
        _ = Money(1, "USD") + Money(1, "EUR")
    with pytest.raises(MoneyError):
        _ = Money(1, "USD") < Money(1, "CAD")


currencies = st.sampled_from(sorted(CURRENCY_EXPONENT))
minors = st.integers(min_value=-(10**12), max_value=10**12)


@given(minors, currencies)
def test_format_parse_round_trip_never_loses_a_minor_unit(minor: int, currency: str) -> None:
    money = Money(minor, currency)
    assert Money.parse(money.format(), currency) == money


@given(st.lists(minors, max_size=50), currencies)
def test_sum_is_exact(values: list[int], currency: str) -> None:
    total = Money.zero(currency)
    for value in values:
        total = total + Money(value, currency)
    assert total.minor == sum(values)
    back = total
    for value in values:
        back = back - Money(value, currency)
    assert back == Money.zero(currency)


def test_wire_round_trip_and_validation() -> None:
    money = Money(1999, "USD")
    assert Money.from_wire(money.to_wire()) == money
    for bad in [
        {"minor": 1.5, "currency": "USD"},
        {"minor": 1},
        [1, "USD"],
        {"minor": True, "currency": "USD"},
    ]:
        with pytest.raises(MoneyError):
            Money.from_wire(bad)
