"""Payment ids: the capture time first, so ids sort by time; random bits keep them apart."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.bodies import ID_CHARS_MAX
from syncengine.core.ids import (
    PAYMENT_ID_CHARS,
    PAYMENT_ID_PREFIX,
    PAYMENT_ID_RANDOM_BYTES,
    PAYMENT_ID_TIME_HEX,
    new_payment_id,
)

TIME_MAX = 2**48 - 1
times = st.integers(min_value=0, max_value=TIME_MAX)
randoms = st.binary(min_size=PAYMENT_ID_RANDOM_BYTES, max_size=PAYMENT_ID_RANDOM_BYTES)


def test_format_of_a_known_id() -> None:
    pid = new_payment_id(1_700_000_000_000, bytes(range(PAYMENT_ID_RANDOM_BYTES)))
    assert pid == "pay_018bcfe56800" + "00010203040506070809"
    assert len(pid) == PAYMENT_ID_CHARS == 36  # as long as the earlier random ids


@given(st.tuples(times, times).map(sorted), randoms, randoms)
def test_ids_of_increasing_times_sort_increasingly(
    pair: list[int], first: bytes, second: bytes
) -> None:
    earlier, later = pair
    a, b = new_payment_id(earlier, first), new_payment_id(later, second)
    if earlier < later:
        assert a < b
    else:
        assert (a < b) == (first < second)  # the same millisecond: the random bits decide


@given(times, randoms)
def test_length_and_charset_are_fixed(now_ms: int, random: bytes) -> None:
    pid = new_payment_id(now_ms, random)
    assert len(pid) == PAYMENT_ID_CHARS <= ID_CHARS_MAX
    assert pid.startswith(PAYMENT_ID_PREFIX)
    rest = pid[len(PAYMENT_ID_PREFIX) :]
    assert set(rest) <= set(string.digits + "abcdef")
    assert int(rest[:PAYMENT_ID_TIME_HEX], 16) == now_ms
    assert bytes.fromhex(rest[PAYMENT_ID_TIME_HEX:]) == random


@given(st.integers(min_value=0, max_value=10**20), randoms)
def test_time_wraps_modulo_2_48(now_ms: int, random: bytes) -> None:
    assert new_payment_id(now_ms, random) == new_payment_id(now_ms % 2**48, random)
    assert new_payment_id(now_ms + 2**48, random) == new_payment_id(now_ms, random)


@given(st.binary(max_size=32).filter(lambda b: len(b) != PAYMENT_ID_RANDOM_BYTES), times)
def test_wrong_random_length_is_refused(random: bytes, now_ms: int) -> None:
    with pytest.raises(ValueError, match=f"needs {PAYMENT_ID_RANDOM_BYTES} random bytes"):
        new_payment_id(now_ms, random)


@given(st.integers(max_value=-1), randoms)
def test_negative_time_is_refused(now_ms: int, random: bytes) -> None:
    with pytest.raises(ValueError, match="at or after the epoch"):
        new_payment_id(now_ms, random)
