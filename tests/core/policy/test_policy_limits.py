"""Tests for syncengine.core.policy.limits (R3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import ConfigError, InvalidState, MoneyError, Refused
from syncengine.core.money import Money
from syncengine.core.policy.limits import (
    LIMIT_MAXIMA_MAJOR,
    OfflineLimits,
    check_capture,
    current_max_offline_amount,
    limit_maxima,
)


def usd(text: str) -> Money:
    return Money.parse(text, "USD")


@pytest.mark.parametrize(
    ("currency", "per_tx_minor", "total_minor"),
    [
        pytest.param(
            "USD", 500_000, 5_000_000, id="seed 000: default and maximum $5,000 / $50,000"
        ),
        pytest.param("CAD", 500_000, 5_000_000, id="seed 000: Canada uses the same figures"),
        pytest.param("AUD", 500_000, 5_000_000, id="seed 000: Australia uses the same figures"),
        pytest.param("GBP", 500_000, 5_000_000, id="seed 000: UK uses the same figures"),
        pytest.param("EUR", 500_000, 5_000_000, id="seed 000: Europe uses the same figures"),
        pytest.param("JPY", 750_000, 7_500_000, id="table: zero-decimal currency scaled"),
        pytest.param("KWD", 1_500_000, 15_000_000, id="table: three-decimal currency scaled"),
    ],
)
def test_defaults_equal_maxima(currency: str, per_tx_minor: int, total_minor: int) -> None:
    limits = OfflineLimits.default(currency)
    assert limits == OfflineLimits(Money(per_tx_minor, currency), Money(total_minor, currency))
    assert limit_maxima(currency) == (limits.per_transaction, limits.total)


@pytest.mark.parametrize(
    ("per_tx", "total", "fragment"),
    [
        pytest.param(
            "5000.01", "50000.00", "above the maximum", id="seed 000: can't go above $5,000"
        ),
        pytest.param(
            "5000.00", "50000.01", "above the maximum", id="seed 000: can't go above $50,000"
        ),
        pytest.param("0", "100.00", "above zero", id="R3: a zero limit is not a limit"),
        pytest.param("10.00", "-1.00", "above zero", id="R3: negative total"),
    ],
)
def test_limits_above_maximum_or_not_positive_are_refused(
    per_tx: str, total: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OfflineLimits(usd(per_tx), usd(total))


def test_limits_can_be_lowered() -> None:
    """Seed 000: "You can change both amounts but you can't go above the maximum"."""
    limits = OfflineLimits(usd("250.00"), usd("1000.00"))
    assert limits.per_transaction == usd("250.00")


def test_mixed_or_unknown_currency_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="one currency"):
        OfflineLimits(usd("10.00"), Money.parse("10.00", "EUR"))
    assert "XXX" not in LIMIT_MAXIMA_MAJOR
    with pytest.raises(ConfigError, match="no limit defined"):
        limit_maxima("XXX")


@pytest.mark.parametrize(
    ("outstanding", "expected"),
    [
        pytest.param("0", "5000.00", id="seed 000: nothing stored, per-transaction limit binds"),
        pytest.param("46000.00", "4000.00", id="seed 000: total minus outstanding binds"),
        pytest.param("50000.00", "0.00", id="seed 000: total reached, nothing more"),
    ],
)
def test_current_max_offline_amount(outstanding: str, expected: str) -> None:
    assert current_max_offline_amount(OfflineLimits.default("USD"), usd(outstanding)) == usd(
        expected
    )


def test_current_max_is_floored_at_zero_after_lowering_the_total() -> None:
    limits = OfflineLimits(usd("100.00"), usd("500.00"))
    assert current_max_offline_amount(limits, usd("900.00")) == usd("0")


def test_outstanding_must_be_non_negative_and_same_currency() -> None:
    limits = OfflineLimits.default("USD")
    with pytest.raises(InvalidState):
        current_max_offline_amount(limits, usd("-1.00"))
    with pytest.raises(MoneyError):
        current_max_offline_amount(limits, Money.parse("1.00", "CAD"))


@pytest.mark.parametrize(
    ("outstanding", "amount", "reason"),
    [
        pytest.param("0", "5000.01", "over_transaction_limit", id="seed 000: per transaction"),
        pytest.param("49000.00", "1000.01", "over_total_limit", id="seed 000: total limit"),
        pytest.param("0", "0", "amount_not_positive", id="R3: zero amount"),
        pytest.param("49999.99", "5000.01", "over_transaction_limit", id="per-tx checked first"),
    ],
)
def test_check_capture_refuses(outstanding: str, amount: str, reason: str) -> None:
    with pytest.raises(Refused) as info:
        check_capture(OfflineLimits.default("USD"), usd(outstanding), usd(amount))
    assert info.value.reason == reason


def test_refusal_messages_say_amount_limit_and_what_to_do() -> None:
    limits = OfflineLimits.default("USD")
    with pytest.raises(Refused) as info:
        check_capture(limits, usd("0"), usd("6000.00"))
    assert "6000.00 USD" in str(info.value) and "5000.00 USD" in str(info.value)
    assert "wait until the terminal is back online" in str(info.value)
    with pytest.raises(Refused) as info:
        check_capture(limits, usd("48000.00"), usd("3000.00"))
    message = str(info.value)
    assert "50000.00 USD" in message and "2000.00 USD" in message and "reconnect" in message


def test_check_capture_accepts_exactly_the_limits() -> None:
    limits = OfflineLimits.default("USD")
    check_capture(limits, usd("0"), usd("5000.00"))
    check_capture(limits, usd("45000.00"), usd("5000.00"))


currencies = st.sampled_from(sorted(LIMIT_MAXIMA_MAJOR))


@st.composite
def limits_and_outstanding(draw: st.DrawFn) -> tuple[OfflineLimits, Money]:
    currency = draw(currencies)
    per_tx_max, total_max = limit_maxima(currency)
    per_tx = draw(st.integers(1, per_tx_max.minor))
    total = draw(st.integers(1, total_max.minor))
    outstanding = draw(st.integers(0, 2 * total_max.minor))
    return (
        OfflineLimits(Money(per_tx, currency), Money(total, currency)),
        Money(outstanding, currency),
    )


@given(limits_and_outstanding())
def test_current_max_never_exceeds_a_limit_nor_goes_negative(
    case: tuple[OfflineLimits, Money],
) -> None:
    limits, outstanding = case
    room = current_max_offline_amount(limits, outstanding)
    assert 0 <= room.minor <= limits.per_transaction.minor
    assert outstanding.minor + room.minor <= max(limits.total.minor, outstanding.minor)
    if room.is_positive():
        check_capture(limits, outstanding, room)  # the shown maximum is really accepted
    with pytest.raises(Refused):
        check_capture(limits, outstanding, room + Money(1, room.currency))


@given(currencies, st.integers(-(10**12), 10**12), st.integers(-(10**12), 10**12))
def test_limits_configurable_only_downwards(currency: str, per_tx: int, total: int) -> None:
    per_tx_max, total_max = limit_maxima(currency)
    valid = 0 < per_tx <= per_tx_max.minor and 0 < total <= total_max.minor
    if valid:
        OfflineLimits(Money(per_tx, currency), Money(total, currency))
    else:
        with pytest.raises(ConfigError):
            OfflineLimits(Money(per_tx, currency), Money(total, currency))
