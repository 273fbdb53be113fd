"""Tests for syncengine.core.policy.safeguards (R12)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import InvalidState, Refused
from syncengine.core.policy.expiry import HOUR_MS, DeviceClass
from syncengine.core.policy.safeguards import (
    SAFEGUARDS,
    OperatorAction,
    check_action,
    check_offline_window_open,
    flush_offered,
    offline_window_open,
)

GUARDED = [
    pytest.param(OperatorAction.LOGOUT, True, id="seed 004: ne vous déconnectez pas (logout)"),
    pytest.param(
        OperatorAction.SWITCH_LOCATION, True, id="seed 004: ne changez pas de point de vente"
    ),
    pytest.param(OperatorAction.SWITCH_MERCHANT, True, id="R12: switching merchant"),
    pytest.param(
        OperatorAction.FACTORY_RESET,
        False,
        id="seed 004: ne réinitialisez pas aux paramètres d'usine",
    ),
    pytest.param(OperatorAction.UNINSTALL, False, id="seed 004: ne supprimez pas l'application"),
    pytest.param(OperatorAction.DATA_WIPE, False, id="R12: data wipe"),
    pytest.param(OperatorAction.SDK_UPGRADE, True, id="R12: SDK upgrade migrations"),
]


@pytest.mark.parametrize(("action", "flush"), GUARDED)
def test_refused_while_payments_are_pending(action: OperatorAction, flush: bool) -> None:
    check_action(action, 0)
    with pytest.raises(Refused) as info:
        check_action(action, 3)
    assert info.value.reason == "payments_pending"
    message = str(info.value)
    assert "3 offline payments are still waiting" in message
    assert "Reconnect to the internet and let them forward first" in message
    assert SAFEGUARDS[action].doing in message
    assert flush_offered(action) is flush
    assert ("Forward now, then continue" in message) is flush


def test_one_pending_payment_is_singular() -> None:
    with pytest.raises(Refused, match=r"^1 offline payment is still"):
        check_action(OperatorAction.LOGOUT, 1)


def test_negative_pending_count_is_a_caller_bug() -> None:
    with pytest.raises(InvalidState):
        check_action(OperatorAction.LOGOUT, -1)


def test_every_action_has_a_safeguard() -> None:
    assert set(SAFEGUARDS) == set(OperatorAction)


@given(st.sampled_from(OperatorAction), st.integers(0, 10**6))
def test_allowed_iff_nothing_pending(action: OperatorAction, pending: int) -> None:
    try:
        check_action(action, pending)
    except Refused:
        assert pending > 0
    else:
        assert pending == 0


WINDOW = [
    pytest.param(DeviceClass.READER, HOUR_MS - 1, True, id="seed 004: Reader open just before 1 h"),
    pytest.param(DeviceClass.STAND, HOUR_MS, False, id="seed 004: Stand closed at 1 h"),
    pytest.param(DeviceClass.REGISTER, 2 * HOUR_MS, True, id="seed 004: Register open at 2 h"),
    pytest.param(DeviceClass.TERMINAL, 24 * HOUR_MS, False, id="seed 004: Terminal closed at 24 h"),
]


@pytest.mark.parametrize(("device_class", "elapsed_ms", "is_open"), WINDOW)
def test_window_closed_stops_offline_payments(
    device_class: DeviceClass, elapsed_ms: int, is_open: bool
) -> None:
    lost_ms = 1_000_000
    assert offline_window_open(device_class, lost_ms, lost_ms + elapsed_ms) is is_open
    if is_open:
        check_offline_window_open(device_class, lost_ms, lost_ms + elapsed_ms)
    else:
        with pytest.raises(Refused) as info:
            check_offline_window_open(device_class, lost_ms, lost_ms + elapsed_ms)
        assert info.value.reason == "offline_window_closed"
        assert "reconnect" in str(info.value) and "kept" in str(info.value)
