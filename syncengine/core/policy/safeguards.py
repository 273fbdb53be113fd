"""Safeguards before offline payments are lost (R12).

Seed 004 (Square): "Si des paiements hors ligne sont en attente, ne vous déconnectez pas de
l'application Square et ne changez pas de point de vente. Ne réinitialisez pas aux
paramètres d'usine l'appareil [...] et ne supprimez pas l'application. Dans le cas
contraire, vous devrez payer vous-même les biens ou les services que vous venez de vendre."

Square only asks; we refuse. :data:`SAFEGUARDS` says, per operator action, whether the SDK
offers "forward now, then proceed" (the action is reversible in spirit and happens inside
the app, so it can wait for the drain and then continue) or only refuses (the action
destroys the device's data or happens outside the app, so the operator must reconnect, see
the pending count reach zero and then retry on purpose).

A terminal still offline when its offline window closes stops taking offline payments
(:func:`check_offline_window_open`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from syncengine.core.errors import InvalidState, Refused
from syncengine.core.policy.expiry import (
    HOUR_MS,
    DeviceClass,
    offline_window_closes_at_ms,
    window_for,
)


class OperatorAction(StrEnum):
    """Operator actions that would lose stored offline payments (seed 004)."""

    LOGOUT = "logout"
    SWITCH_LOCATION = "switch_location"
    SWITCH_MERCHANT = "switch_merchant"
    FACTORY_RESET = "factory_reset"
    UNINSTALL = "uninstall"
    DATA_WIPE = "data_wipe"
    SDK_UPGRADE = "sdk_upgrade"


@dataclass(frozen=True, slots=True)
class Safeguard:
    """How an action is guarded: a phrase for messages and whether flushing first is offered."""

    doing: str
    flush_then_proceed: bool


SAFEGUARDS: Mapping[OperatorAction, Safeguard] = MappingProxyType(
    {
        OperatorAction.LOGOUT: Safeguard("logging out", flush_then_proceed=True),
        OperatorAction.SWITCH_LOCATION: Safeguard("switching location", flush_then_proceed=True),
        OperatorAction.SWITCH_MERCHANT: Safeguard("switching merchant", flush_then_proceed=True),
        OperatorAction.SDK_UPGRADE: Safeguard("upgrading the payment app", flush_then_proceed=True),
        OperatorAction.FACTORY_RESET: Safeguard("a factory reset", flush_then_proceed=False),
        OperatorAction.UNINSTALL: Safeguard("uninstalling the app", flush_then_proceed=False),
        OperatorAction.DATA_WIPE: Safeguard("wiping the app's data", flush_then_proceed=False),
    }
)


def flush_offered(action: OperatorAction) -> bool:
    """True if the SDK may offer "forward pending payments now, then proceed" for ``action``."""
    return SAFEGUARDS[OperatorAction(action)].flush_then_proceed


def check_action(action: OperatorAction, pending_count: int) -> None:
    """Return if ``action`` is safe; raise ``Refused("payments_pending", ...)`` otherwise.

    ``pending_count`` is the number of stored offline payments not yet acknowledged by the
    server. A negative count is a caller bug (:class:`InvalidState`).
    """
    if type(pending_count) is not int or pending_count < 0:
        raise InvalidState(f"pending_count must be a non-negative integer, got {pending_count!r}")
    if pending_count == 0:
        return
    guard = SAFEGUARDS[OperatorAction(action)]
    what = "1 offline payment is" if pending_count == 1 else f"{pending_count} offline payments are"
    then = (
        " or choose 'Forward now, then continue'."
        if guard.flush_then_proceed
        else ", then try again."
    )
    raise Refused(
        "payments_pending",
        f"{what} still waiting to be forwarded; {guard.doing} now would lose them and you "
        f"would bear the loss. Reconnect to the internet and let them forward first{then}",
    )


def offline_window_open(
    device_class: DeviceClass, connectivity_lost_at_ms: int, now_ms: int
) -> bool:
    """True while a device that lost connectivity at the given time may take offline payments."""
    return now_ms < offline_window_closes_at_ms(device_class, connectivity_lost_at_ms)


def check_offline_window_open(
    device_class: DeviceClass, connectivity_lost_at_ms: int, now_ms: int
) -> None:
    """Raise ``Refused("offline_window_closed", ...)`` once the device's offline window closed.

    Payments already stored are kept and forwarded on reconnect; only new ones are refused.
    """
    if offline_window_open(device_class, connectivity_lost_at_ms, now_ms):
        return
    hours = window_for(device_class).offline_window_ms // HOUR_MS
    raise Refused(
        "offline_window_closed",
        f"This {device_class} has been offline for {hours} h, the longest it may take "
        "offline payments; reconnect to the internet to take card payments again. Payments "
        "already stored are kept and will be forwarded when it reconnects.",
    )
