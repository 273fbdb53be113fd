"""Offline windows and payment expiry by device class (R5), as a table.

Seed 004 (Square) gives two windows per device class:

- how long a device may keep taking offline payments ("jusqu'à une heure pour Square Reader
  ou Square Stand et jusqu'à 24 heures pour Square Register ou Square Terminal");
- when a stored payment expires if it has not been uploaded ("dans les 24 heures suivant la
  perte de connexion Internet (Reader/Stand) ou dans les 24 heures suivant la réception de
  votre premier paiement hors ligne (Register/Terminal)").

Both are rows of :data:`WINDOWS`, not branches in code. Windows are half-open: a window of
``w`` ms opened at ``t`` is open for ``t <= now < t + w`` and closed from ``t + w`` on.

BEAT (R5): :func:`expiry_warnings` says which warning thresholds (by default 50 % and 90 % of
a window) are due, so the caller can warn the operator well before expiry and attach the
amount at risk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from syncengine.core.errors import ConfigError, InvalidState

HOUR_MS = 3_600_000


class DeviceClass(StrEnum):
    """Terminal hardware classes whose offline windows differ (seed 004)."""

    READER = "reader"
    STAND = "stand"
    REGISTER = "register"
    TERMINAL = "terminal"


class ExpiryAnchor(StrEnum):
    """The moment a stored payment's expiry countdown starts from."""

    CONNECTIVITY_LOST = "connectivity_lost"
    FIRST_OFFLINE_PAYMENT = "first_offline_payment"


@dataclass(frozen=True, slots=True)
class ExpiryWindow:
    """One row of :data:`WINDOWS`.

    ``offline_window_ms``: how long after connectivity was lost the device may keep taking
    offline payments. ``payment_expiry_ms``: how long after ``expiry_anchor`` stored
    payments must be forwarded before they expire (a loss for the merchant).
    """

    offline_window_ms: int
    payment_expiry_ms: int
    expiry_anchor: ExpiryAnchor


#: Seed 004: Reader/Stand 1 h offline, expiry 24 h after connectivity was lost;
#: Register/Terminal 24 h offline, expiry 24 h after the first offline payment.
WINDOWS: Mapping[DeviceClass, ExpiryWindow] = MappingProxyType(
    {
        DeviceClass.READER: ExpiryWindow(1 * HOUR_MS, 24 * HOUR_MS, ExpiryAnchor.CONNECTIVITY_LOST),
        DeviceClass.STAND: ExpiryWindow(1 * HOUR_MS, 24 * HOUR_MS, ExpiryAnchor.CONNECTIVITY_LOST),
        DeviceClass.REGISTER: ExpiryWindow(
            24 * HOUR_MS, 24 * HOUR_MS, ExpiryAnchor.FIRST_OFFLINE_PAYMENT
        ),
        DeviceClass.TERMINAL: ExpiryWindow(
            24 * HOUR_MS, 24 * HOUR_MS, ExpiryAnchor.FIRST_OFFLINE_PAYMENT
        ),
    }
)

#: Percent of a window at which the operator is warned (BEAT R5).
WARNING_THRESHOLDS_PERCENT_DEFAULT: tuple[int, ...] = (50, 90)
WARNING_THRESHOLDS_COUNT_MAX = 10


def window_for(device_class: DeviceClass) -> ExpiryWindow:
    """Return the :data:`WINDOWS` row of ``device_class``."""
    return WINDOWS[DeviceClass(device_class)]


def offline_window_closes_at_ms(device_class: DeviceClass, connectivity_lost_at_ms: int) -> int:
    """When a device of ``device_class`` that lost connectivity at the given time must stop
    taking offline payments (the first millisecond at which the window is closed)."""
    _check_time("connectivity_lost_at_ms", connectivity_lost_at_ms)
    return connectivity_lost_at_ms + window_for(device_class).offline_window_ms


def payment_expires_at_ms(
    device_class: DeviceClass,
    connectivity_lost_at_ms: int,
    first_offline_payment_at_ms: int | None = None,
) -> int:
    """When offline payments stored during this outage expire if not forwarded.

    Reader/Stand: 24 h after connectivity was lost. Register/Terminal: 24 h after the
    first offline payment of the outage, which must then be given (for the first payment
    itself, pass its own capture time). Raises :class:`InvalidState` if it is missing or
    earlier than the loss of connectivity.
    """
    _check_time("connectivity_lost_at_ms", connectivity_lost_at_ms)
    window = window_for(device_class)
    if window.expiry_anchor is ExpiryAnchor.CONNECTIVITY_LOST:
        return connectivity_lost_at_ms + window.payment_expiry_ms
    if first_offline_payment_at_ms is None:
        raise InvalidState(
            f"a {device_class} device's payments expire from its first offline payment; "
            "pass first_offline_payment_at_ms (the capture time of the first payment)"
        )
    _check_time("first_offline_payment_at_ms", first_offline_payment_at_ms)
    if first_offline_payment_at_ms < connectivity_lost_at_ms:
        raise InvalidState(
            f"first offline payment at {first_offline_payment_at_ms} ms is before "
            f"connectivity was lost at {connectivity_lost_at_ms} ms"
        )
    return first_offline_payment_at_ms + window.payment_expiry_ms


def validate_warning_thresholds(thresholds_percent: Iterable[int]) -> tuple[int, ...]:
    """Return the thresholds sorted, or raise :class:`ConfigError`.

    Each must be an integer percent in 1..99, with no duplicates, at most
    :data:`WARNING_THRESHOLDS_COUNT_MAX` of them.
    """
    values = tuple(thresholds_percent)
    if len(values) > WARNING_THRESHOLDS_COUNT_MAX:
        raise ConfigError(f"at most {WARNING_THRESHOLDS_COUNT_MAX} warning thresholds")
    for value in values:
        if type(value) is not int or not 1 <= value <= 99:
            raise ConfigError(f"warning threshold {value!r} must be a whole percent in 1..99")
    if len(set(values)) != len(values):
        raise ConfigError(f"warning thresholds {values} contain duplicates")
    return tuple(sorted(values))


def expiry_warnings(
    window_start_ms: int,
    window_end_ms: int,
    now_ms: int,
    already_sent: frozenset[int],
    thresholds_percent: Iterable[int] = WARNING_THRESHOLDS_PERCENT_DEFAULT,
) -> tuple[int, ...]:
    """The warning thresholds (percents, ascending) due at ``now_ms`` and not yet sent.

    A threshold ``p`` is due once ``p`` percent of the window has elapsed, computed in
    integers (no rounding drift). The caller sends one warning per returned threshold with
    the amount at risk, and adds them to ``already_sent``. Several may be due at once (after
    a reboot, say); the caller may then send only the highest.
    """
    thresholds = validate_warning_thresholds(thresholds_percent)
    if window_end_ms <= window_start_ms:
        raise InvalidState(
            f"window ends at {window_end_ms} ms, not after its start at {window_start_ms} ms"
        )
    elapsed_ms = now_ms - window_start_ms
    length_ms = window_end_ms - window_start_ms
    return tuple(
        p for p in thresholds if p not in already_sent and elapsed_ms * 100 >= length_ms * p
    )


def _check_time(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise InvalidState(f"{name} must be a non-negative integer of ms, got {value!r}")
