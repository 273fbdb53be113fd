"""Tests for syncengine.core.policy.expiry (R5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import ConfigError, InvalidState
from syncengine.core.policy.expiry import (
    HOUR_MS,
    WINDOWS,
    DeviceClass,
    ExpiryAnchor,
    expiry_warnings,
    offline_window_closes_at_ms,
    payment_expires_at_ms,
)

LOST_MS = 1_700_000_000_000


@pytest.mark.parametrize(
    ("device_class", "window_ms"),
    [
        pytest.param(DeviceClass.READER, HOUR_MS, id="seed 004: Square Reader offline up to 1 h"),
        pytest.param(DeviceClass.STAND, HOUR_MS, id="seed 004: Square Stand offline up to 1 h"),
        pytest.param(DeviceClass.REGISTER, 24 * HOUR_MS, id="seed 004: Register up to 24 h"),
        pytest.param(DeviceClass.TERMINAL, 24 * HOUR_MS, id="seed 004: Terminal up to 24 h"),
    ],
)
def test_offline_window_by_device_class(device_class: DeviceClass, window_ms: int) -> None:
    assert WINDOWS[device_class].offline_window_ms == window_ms
    assert offline_window_closes_at_ms(device_class, LOST_MS) == LOST_MS + window_ms


@pytest.mark.parametrize(
    ("device_class", "first_payment_ms", "expires_ms"),
    [
        pytest.param(
            DeviceClass.READER,
            LOST_MS + 30 * 60_000,
            LOST_MS + 24 * HOUR_MS,
            id="seed 004: Reader payments expire 24 h after connectivity was lost",
        ),
        pytest.param(
            DeviceClass.STAND,
            None,
            LOST_MS + 24 * HOUR_MS,
            id="seed 004: Stand payments expire 24 h after connectivity was lost",
        ),
        pytest.param(
            DeviceClass.REGISTER,
            LOST_MS + 5 * HOUR_MS,
            LOST_MS + 29 * HOUR_MS,
            id="seed 004: Register payments expire 24 h after the first offline payment",
        ),
        pytest.param(
            DeviceClass.TERMINAL,
            LOST_MS + HOUR_MS,
            LOST_MS + 25 * HOUR_MS,
            id="seed 004: Terminal payments expire 24 h after the first offline payment",
        ),
    ],
)
def test_payment_expiry_by_device_class(
    device_class: DeviceClass, first_payment_ms: int | None, expires_ms: int
) -> None:
    assert payment_expires_at_ms(device_class, LOST_MS, first_payment_ms) == expires_ms


def test_anchors_are_data() -> None:
    assert {w.expiry_anchor for w in WINDOWS.values()} == set(ExpiryAnchor)
    assert set(WINDOWS) == set(DeviceClass)


def test_first_payment_anchor_needs_a_valid_first_payment() -> None:
    with pytest.raises(InvalidState, match="first_offline_payment_at_ms"):
        payment_expires_at_ms(DeviceClass.TERMINAL, LOST_MS)
    with pytest.raises(InvalidState, match="before"):
        payment_expires_at_ms(DeviceClass.REGISTER, LOST_MS, LOST_MS - 1)
    with pytest.raises(InvalidState):
        offline_window_closes_at_ms(DeviceClass.READER, -1)


@pytest.mark.parametrize(
    ("elapsed_percent_x10", "sent", "due"),
    [
        pytest.param(499, frozenset[int](), (), id="R5 BEAT: nothing before 50 %"),
        pytest.param(500, frozenset[int](), (50,), id="R5 BEAT: warn at 50 %"),
        pytest.param(500, frozenset({50}), (), id="R5 BEAT: each warning once"),
        pytest.param(900, frozenset({50}), (90,), id="R5 BEAT: warn again at 90 %"),
        pytest.param(950, frozenset[int](), (50, 90), id="R5 BEAT: late start, both due"),
        pytest.param(1200, frozenset({50, 90}), (), id="R5 BEAT: past expiry, all sent"),
    ],
)
def test_expiry_warnings(elapsed_percent_x10: int, sent: frozenset[int], due: tuple[int]) -> None:
    start_ms, end_ms = LOST_MS, LOST_MS + 24 * HOUR_MS
    now_ms = start_ms + (end_ms - start_ms) * elapsed_percent_x10 // 1000
    assert expiry_warnings(start_ms, end_ms, now_ms, sent) == due


def test_expiry_warning_thresholds_are_configurable_and_validated() -> None:
    assert expiry_warnings(0, 100, 75, frozenset(), (75, 25)) == (25, 75)
    for bad in [(0,), (100,), (50, 50), tuple(range(1, 20))]:
        with pytest.raises(ConfigError):
            expiry_warnings(0, 100, 75, frozenset(), bad)
    with pytest.raises(InvalidState):
        expiry_warnings(100, 100, 100, frozenset())


@given(
    st.integers(0, 10**13),
    st.integers(1, 10**9),
    st.integers(-(10**9), 2 * 10**9),
    st.lists(st.integers(1, 99), unique=True, max_size=5),
)
def test_a_threshold_is_due_iff_its_share_of_the_window_elapsed(
    start_ms: int, length_ms: int, offset_ms: int, thresholds: list[int]
) -> None:
    due = expiry_warnings(
        start_ms, start_ms + length_ms, start_ms + offset_ms, frozenset(), thresholds
    )
    for p in thresholds:
        assert (p in due) == (offset_ms * 100 >= length_ms * p)
    # once sent, never returned again
    assert (
        expiry_warnings(
            start_ms, start_ms + length_ms, start_ms + offset_ms, frozenset(due), thresholds
        )
        == ()
    )
