"""The offline-mode state machine (R2, R4, R5, R12): one transition table in one module.

Theory of operation
===================

A terminal is in exactly one :class:`Mode`. The caller feeds it events (what the network
probe saw, what the operator or an authorised portal user did, what time it is) through
:func:`step` and gets back the next :class:`OfflineMode` and a tuple of effects to carry out
in order: record the mode change in the replica's log, show an alert or a prompt, start
forwarding. The machine does no I/O and reads no clock; it is a frozen value.

Rules:

1. Offline payments are taken only in ``OFFLINE`` (:attr:`OfflineMode.accepts_offline_payments`).
2. Offline mode exists only where the merchant allowed it (R2, :class:`OfflineSettings`:
   standalone allowed and liability accepted, with who and when). Otherwise the machine sits
   in ``DISABLED`` and activation is refused with ``offline_mode_not_allowed``.
3. Losing connectivity raises one alert naming the kind of outage, network or provider
   (seed 004: two different alerts). Then, by :class:`EntryPolicy`: ``prompt`` asks the
   operator ("Unable to connect to network", seed 000); ``auto`` enters offline once the
   outage has lasted longer than ``auto_after_ms`` (default 60 s, seed 002: "lost for more
   than 1 minute"); ``forced`` waits for an authorised portal user (seed 002). A provider
   outage enters offline at once when ``auto_on_provider_outage`` is set (seed 004:
   "Perturbation des services : paiements hors ligne activés"). A portal user may force
   offline under any policy; the operator may activate from the terminal unless the policy
   is ``forced``.
4. The offline window of the device class (:data:`~syncengine.core.policy.expiry.WINDOWS`)
   runs from the loss of connectivity, or from the moment the portal forced a connected
   terminal offline. When it closes the machine moves to ``WINDOW_CLOSED``: still offline,
   keeping every stored payment, taking no new one (R12). Closure is noticed on ``Tick``
   (and when entering offline), so callers tick at least once a second.
5. Connectivity coming back, or the portal turning offline mode off (seed 002), moves
   ``OFFLINE`` and ``WINDOW_CLOSED`` to ``FORWARDING``: alert, prompt "Resume integrated
   payments" (seed 000), start forwarding. ``Drained`` or the operator's resume returns to
   ``ONLINE`` (forwarding carries on in the background after a resume). Connectivity back
   before offline was entered returns straight to ``ONLINE``; it still emits
   ``StartForwarding`` (idempotent) in case an earlier drain was cut short.
6. Every change of mode emits exactly one :class:`RecordModeChange`, first among the
   effects (R4: every mode change is recorded in the replica's log).
7. Every (mode, event type) pair has a cell in :data:`TABLE`: a handler; ``IGNORE`` for
   harmless repeats and races (a tick with nothing due, a double tap, a late ``Drained``,
   a duplicate connectivity report), which returns the machine unchanged with no effects; or
   a :class:`Reject`, meaning the caller misused the API (:class:`InvalidState`). A refusal
   a person can hit (activating when not allowed, after the window closed, or from the
   terminal when only the portal may) raises :class:`Refused`. A raise changes nothing.
8. The machine's clock ``clock_ms`` is the largest ``Tick.now_ms`` seen; it never moves
   backwards. ``ConnectivityLost.at_ms`` anchors the outage but does not move the clock.
9. Invariants after every step (checked by tests): ``allowed`` implies the mode is not
   ``DISABLED``; not ``allowed`` implies ``DISABLED``, ``WINDOW_CLOSED`` or ``FORWARDING``
   (disallowing while offline stops new payments but keeps stored ones); ``ONLINE`` and
   ``FORWARDING`` have no outage; ``OFFLINE`` means the window is still open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from syncengine.core.errors import ConfigError, InvalidState, InvariantViolation, Refused
from syncengine.core.policy.expiry import DeviceClass, offline_window_closes_at_ms

#: The reason recorded when the portal forces a terminal offline (``RecordModeChange``).
FORCED_OFFLINE_REASON = "forced_offline_by_portal"
AUTO_AFTER_MS_DEFAULT = 60_000  # seed 002: NX enters offline after 1 minute without internet
AUTO_AFTER_MS_MIN = 1_000
AUTO_AFTER_MS_MAX = 3_600_000  # never longer than the shortest offline window (1 h)
ACCEPTED_BY_CHARS_MAX = 200


class Mode(StrEnum):
    """Where a terminal stands with respect to offline payments."""

    DISABLED = "disabled"  # offline mode not allowed by the merchant
    ONLINE = "online"  # integrated payments
    OUTAGE_DETECTED = "outage_detected"  # connectivity lost, not (yet) offline
    PROMPTING = "prompting"  # asking the operator whether to activate offline payments
    OFFLINE = "offline"  # taking offline payments
    WINDOW_CLOSED = "window_closed"  # still offline, no longer taking offline payments
    FORWARDING = "forwarding"  # connectivity back, stored payments draining


class OutageKind(StrEnum):
    """Local network outage or payment provider outage (seed 004)."""

    NETWORK = "network"
    PROVIDER = "provider"


class EntryPolicy(StrEnum):
    """How a terminal enters offline mode on its own (R4)."""

    PROMPT = "prompt"
    AUTO = "auto"
    FORCED = "forced"


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfflineSettings:
    """The merchant's offline settings (R2); invalid combinations cannot be constructed."""

    allowed: bool = False
    standalone_allowed: bool = False
    liability_accepted_by: str | None = None
    liability_accepted_at_ms: int | None = None

    def __post_init__(self) -> None:
        validate_offline_settings(self)


def validate_offline_settings(settings: OfflineSettings) -> None:
    """Raise :class:`ConfigError` unless ``settings`` satisfy R2.

    Offline payments may be allowed only where standalone mode is allowed (seed 000: "you
    must first enable standalone mode") and only with a recorded acceptance of liability for
    expired or declined payments and chargebacks, saying who accepted and when.
    """
    if not settings.allowed:
        return
    if not settings.standalone_allowed:
        raise ConfigError(
            "offline payments can only be allowed where standalone mode is allowed; "
            "allow standalone mode first"
        )
    who, when = settings.liability_accepted_by, settings.liability_accepted_at_ms
    if not isinstance(who, str) or not who.strip() or len(who) > ACCEPTED_BY_CHARS_MAX:
        raise ConfigError(
            "allowing offline payments requires accepting liability for declined or expired "
            "offline payments and chargebacks; record who accepted (liability_accepted_by)"
        )
    if type(when) is not int or when < 0:
        raise ConfigError(
            "allowing offline payments requires recording when liability was accepted "
            "(liability_accepted_at_ms, ms since the epoch)"
        )


@dataclass(frozen=True, slots=True)
class OfflineModePolicy:
    """How the terminal enters offline mode (R4), validated on construction."""

    entry: EntryPolicy = EntryPolicy.PROMPT
    auto_after_ms: int = AUTO_AFTER_MS_DEFAULT
    auto_on_provider_outage: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.entry, EntryPolicy):
            raise ConfigError(f"entry must be one of {', '.join(EntryPolicy)}")
        ms = self.auto_after_ms
        if type(ms) is not int or not AUTO_AFTER_MS_MIN <= ms <= AUTO_AFTER_MS_MAX:
            raise ConfigError(
                f"auto_after_ms must be between {AUTO_AFTER_MS_MIN} and {AUTO_AFTER_MS_MAX} "
                f"ms, got {ms!r}"
            )


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectivityLost:
    """The probe lost the network, or the provider's service is down, since ``at_ms``."""

    kind: OutageKind
    at_ms: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time is now ``now_ms``."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class OperatorActivate:
    """The operator tapped "Activate offline payments"."""


@dataclass(frozen=True, slots=True)
class OperatorDecline:
    """The operator dismissed the "Unable to connect to network" prompt."""


@dataclass(frozen=True, slots=True)
class ForcedOffline:
    """An authorised portal user switched this terminal to offline payments."""


@dataclass(frozen=True, slots=True)
class ForcedOnline:
    """An authorised portal user switched offline payments off for this terminal."""


@dataclass(frozen=True, slots=True)
class ConnectivityRestored:
    """The network and the provider are reachable again."""


@dataclass(frozen=True, slots=True)
class Drained:
    """Every stored offline payment has been forwarded (acknowledged by the server)."""


@dataclass(frozen=True, slots=True)
class OperatorResume:
    """The operator tapped "Resume integrated payments"."""


@dataclass(frozen=True, slots=True)
class OfflineAllowedChanged:
    """The merchant's settings now allow (or no longer allow) offline payments."""

    allowed: bool


Event = (
    ConnectivityLost
    | Tick
    | OperatorActivate
    | OperatorDecline
    | ForcedOffline
    | ForcedOnline
    | ConnectivityRestored
    | Drained
    | OperatorResume
    | OfflineAllowedChanged
)
EVENT_TYPES: tuple[type[Event], ...] = (
    ConnectivityLost,
    Tick,
    OperatorActivate,
    OperatorDecline,
    ForcedOffline,
    ForcedOnline,
    ConnectivityRestored,
    Drained,
    OperatorResume,
    OfflineAllowedChanged,
)

# --- effects ------------------------------------------------------------------------------


class AlertKind(StrEnum):
    """Notifications shown to the operator."""

    NETWORK_OUTAGE = "network_outage"
    PROVIDER_OUTAGE = "provider_outage"
    OFFLINE_ACTIVATED = "offline_activated"
    OFFLINE_WINDOW_CLOSED = "offline_window_closed"
    CONNECTIVITY_RESTORED = "connectivity_restored"


class PromptKind(StrEnum):
    """Questions put to the operator (seed 000)."""

    UNABLE_TO_CONNECT = "unable_to_connect"  # -> OperatorActivate | OperatorDecline
    RESUME_INTEGRATED_PAYMENTS = "resume_integrated_payments"  # -> OperatorResume


@dataclass(frozen=True, slots=True)
class Alert:
    """Show an alert to the operator."""

    kind: AlertKind


@dataclass(frozen=True, slots=True)
class Prompt:
    """Ask the operator; the answer comes back as an operator event."""

    kind: PromptKind


@dataclass(frozen=True, slots=True)
class RecordModeChange:
    """Append a mode-change op to the replica's log (R4)."""

    from_mode: Mode
    to_mode: Mode
    reason: str


@dataclass(frozen=True, slots=True)
class StartForwarding:
    """Start (or keep) forwarding stored offline payments; idempotent."""


Effect = Alert | Prompt | RecordModeChange | StartForwarding

# --- the machine --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfflineMode:
    """The state of one terminal's offline-mode machine. Create it with :func:`start`."""

    mode: Mode
    device_class: DeviceClass
    policy: OfflineModePolicy
    allowed: bool
    clock_ms: int
    outage_kind: OutageKind | None = None
    connectivity_lost_at_ms: int | None = None  # None while connected
    offline_since_ms: int | None = None  # the offline window's anchor while offline

    @property
    def accepts_offline_payments(self) -> bool:
        """True only in ``OFFLINE`` (rule 1)."""
        return self.mode is Mode.OFFLINE

    @property
    def offline_window_closes_at_ms(self) -> int | None:
        """When the current offline window closes, or None when not offline."""
        if self.offline_since_ms is None:
            return None
        return offline_window_closes_at_ms(self.device_class, self.offline_since_ms)


@dataclass(frozen=True, slots=True)
class Transition:
    """What :func:`step` returns: the next machine and the effects to carry out, in order."""

    machine: OfflineMode
    effects: tuple[Effect, ...]


def start(
    settings: OfflineSettings,
    policy: OfflineModePolicy,
    device_class: DeviceClass,
    now_ms: int,
) -> OfflineMode:
    """A connected terminal's machine: ``ONLINE`` if offline is allowed, else ``DISABLED``."""
    if type(now_ms) is not int or now_ms < 0:
        raise InvalidState(f"now_ms must be a non-negative integer, got {now_ms!r}")
    mode = Mode.ONLINE if settings.allowed else Mode.DISABLED
    return OfflineMode(mode, DeviceClass(device_class), policy, settings.allowed, now_ms)


def step(machine: OfflineMode, event: Event) -> Transition:
    """Apply ``event`` to ``machine`` by looking its cell up in :data:`TABLE`.

    Raises :class:`InvalidState` for a rejected pair and :class:`Refused` for a policy
    refusal; in both cases nothing has changed (the machine is immutable).
    """
    cell = TABLE.get((machine.mode, type(event)))
    if cell is None:
        raise InvalidState(f"{type(event).__name__} is not an offline-mode event")
    if isinstance(event, Tick):
        if type(event.now_ms) is not int:
            raise InvalidState(f"Tick.now_ms must be an integer, got {event.now_ms!r}")
        machine = replace(machine, clock_ms=max(machine.clock_ms, event.now_ms))  # rule 8
    if isinstance(event, ConnectivityLost) and (type(event.at_ms) is not int or event.at_ms < 0):
        raise InvalidState(f"ConnectivityLost.at_ms must be a non-negative integer: {event}")
    if isinstance(cell, Reject):
        raise InvalidState(
            f"{type(event).__name__} is not expected in offline mode {machine.mode}: {cell.why}"
        )
    if isinstance(cell, _Ignore):
        return Transition(machine, ())
    return cell(machine, event)


# --- handlers -----------------------------------------------------------------------------

_E = TypeVar("_E")

_OUTAGE_ALERT: Mapping[OutageKind, AlertKind] = MappingProxyType(
    {
        OutageKind.NETWORK: AlertKind.NETWORK_OUTAGE,
        OutageKind.PROVIDER: AlertKind.PROVIDER_OUTAGE,
    }
)


def _as(event: Event, cls: type[_E]) -> _E:
    if not isinstance(event, cls):
        raise InvariantViolation(f"table routed {event!r} to a handler for {cls.__name__}")
    return event


def _move(old: OfflineMode, new: OfflineMode, reason: str, *effects: Effect) -> Transition:
    """Rule 6: a mode change is recorded once, before any other effect."""
    if new.mode is old.mode:
        return Transition(new, effects)
    return Transition(new, (RecordModeChange(old.mode, new.mode, reason), *effects))


def _outage(old: OfflineMode, down: OfflineMode, *effects: Effect) -> Transition:
    """Rule 3: what an outage leads to under the policy; ``down`` already records it."""
    policy = down.policy
    if not down.allowed:
        return _move(old, replace(down, mode=Mode.DISABLED), "offline_not_allowed", *effects)
    if down.outage_kind is OutageKind.PROVIDER and policy.auto_on_provider_outage:
        return _enter_offline(old, down, "provider_outage", *effects)
    if policy.entry is EntryPolicy.PROMPT:
        prompt = Prompt(PromptKind.UNABLE_TO_CONNECT)
        return _move(old, replace(down, mode=Mode.PROMPTING), "connectivity_lost", *effects, prompt)
    return _move(old, replace(down, mode=Mode.OUTAGE_DETECTED), "connectivity_lost", *effects)


def _enter_offline(
    old: OfflineMode, base: OfflineMode, reason: str, *effects: Effect
) -> Transition:
    """Rule 4: open the window (or find it already closed)."""
    since = base.connectivity_lost_at_ms
    entered = replace(base, offline_since_ms=base.clock_ms if since is None else since)
    closes_at_ms = _closes_at_ms(entered)
    if entered.clock_ms >= closes_at_ms:
        closed = replace(entered, mode=Mode.WINDOW_CLOSED)
        return _move(old, closed, "offline_window_closed", *effects, _WINDOW_CLOSED_ALERT)
    activated = Alert(AlertKind.OFFLINE_ACTIVATED)
    return _move(old, replace(entered, mode=Mode.OFFLINE), reason, *effects, activated)


_WINDOW_CLOSED_ALERT = Alert(AlertKind.OFFLINE_WINDOW_CLOSED)


def _closes_at_ms(m: OfflineMode) -> int:
    closes_at_ms = m.offline_window_closes_at_ms
    if closes_at_ms is None:
        raise InvariantViolation(f"mode {m.mode} without an offline window")
    return closes_at_ms


def _require_allowed(m: OfflineMode) -> None:
    if not m.allowed:
        raise Refused(
            "offline_mode_not_allowed",
            "Offline payments are not allowed for this merchant. An administrator can allow "
            "them in the portal settings (standalone mode must be allowed and liability for "
            "declined or expired offline payments accepted).",
        )


def _refuse_window_closed(m: OfflineMode, event: Event) -> Transition:
    raise Refused(
        "offline_window_closed",
        f"This {m.device_class} has been offline as long as it may take offline payments. "
        "Reconnect to the internet to take card payments again; stored payments are kept and "
        "will be forwarded.",
    )


def _refuse_not_allowed(m: OfflineMode, event: Event) -> Transition:
    _require_allowed(m)
    raise InvariantViolation(f"mode {m.mode} with offline allowed")


def _lost(m: OfflineMode, event: Event) -> Transition:
    """Connected (ONLINE, FORWARDING): a new outage begins."""
    ev = _as(event, ConnectivityLost)
    down = replace(m, outage_kind=ev.kind, connectivity_lost_at_ms=ev.at_ms, offline_since_ms=None)
    return _outage(m, down, Alert(_OUTAGE_ALERT[ev.kind]))


def _lost_again(m: OfflineMode, event: Event) -> Transition:
    """Already down, or DISABLED/forced offline while connected: keep the first anchor."""
    ev = _as(event, ConnectivityLost)
    alert = Alert(_OUTAGE_ALERT[ev.kind])
    if m.connectivity_lost_at_ms is None:
        return Transition(
            replace(m, outage_kind=ev.kind, connectivity_lost_at_ms=ev.at_ms), (alert,)
        )
    if ev.kind is m.outage_kind:
        return Transition(m, ())
    new = replace(m, outage_kind=ev.kind)
    waiting = m.mode in (Mode.OUTAGE_DETECTED, Mode.PROMPTING)
    if waiting and ev.kind is OutageKind.PROVIDER and m.policy.auto_on_provider_outage:
        return _enter_offline(m, new, "provider_outage", alert)
    return Transition(new, (alert,))


def _tick_outage(m: OfflineMode, event: Event) -> Transition:
    lost_at_ms = m.connectivity_lost_at_ms
    if lost_at_ms is None:
        raise InvariantViolation(f"mode {m.mode} without an outage")
    if m.policy.entry is EntryPolicy.AUTO and m.clock_ms - lost_at_ms > m.policy.auto_after_ms:
        return _enter_offline(m, m, "auto_after_delay")
    return Transition(m, ())


def _tick_offline(m: OfflineMode, event: Event) -> Transition:
    closes_at_ms = _closes_at_ms(m)
    if m.clock_ms >= closes_at_ms:
        closed = replace(m, mode=Mode.WINDOW_CLOSED)
        return _move(m, closed, "offline_window_closed", _WINDOW_CLOSED_ALERT)
    return Transition(m, ())


def _operator_activate(m: OfflineMode, event: Event) -> Transition:
    _require_allowed(m)
    if m.policy.entry is EntryPolicy.FORCED:
        raise Refused(
            "offline_entry_portal_only",
            "On this terminal offline payments can only be switched on from the portal by an "
            "authorised user; ask your manager, or wait until the connection is back.",
        )
    return _enter_offline(m, m, "operator_activated")


def _forced_offline(m: OfflineMode, event: Event) -> Transition:
    _require_allowed(m)
    return _enter_offline(m, m, FORCED_OFFLINE_REASON)


def _decline(m: OfflineMode, event: Event) -> Transition:
    return _move(m, replace(m, mode=Mode.OUTAGE_DETECTED), "operator_declined")


def _restored_before_offline(m: OfflineMode, event: Event) -> Transition:
    if m.connectivity_lost_at_ms is None:
        return Transition(m, ())  # DISABLED and already connected: a duplicate report
    mode = Mode.ONLINE if m.allowed else Mode.DISABLED
    up = replace(m, mode=mode, outage_kind=None, connectivity_lost_at_ms=None)
    alert = Alert(AlertKind.CONNECTIVITY_RESTORED)
    return _move(m, up, "connectivity_restored", alert, StartForwarding())


def _forwarding(m: OfflineMode, reason: str, *effects: Effect) -> Transition:
    up = replace(
        m,
        mode=Mode.FORWARDING,
        outage_kind=None,
        connectivity_lost_at_ms=None,
        offline_since_ms=None,
    )
    resume = Prompt(PromptKind.RESUME_INTEGRATED_PAYMENTS)
    return _move(m, up, reason, *effects, resume, StartForwarding())


def _restored_offline(m: OfflineMode, event: Event) -> Transition:
    if m.connectivity_lost_at_ms is None:
        return Transition(m, ())  # forced offline while connected: nothing was lost
    return _forwarding(m, "connectivity_restored", Alert(AlertKind.CONNECTIVITY_RESTORED))


def _forced_online(m: OfflineMode, event: Event) -> Transition:
    # The portal reached us; if the link is in fact still down the forwarder retries with
    # backoff and the probe's next ConnectivityLost starts a new outage (rule 5).
    return _forwarding(m, "forced_online_by_portal")


def _finish_forwarding(m: OfflineMode, event: Event) -> Transition:
    reason = "drained" if isinstance(event, Drained) else "operator_resumed"
    mode = Mode.ONLINE if m.allowed else Mode.DISABLED
    return _move(m, replace(m, mode=mode), reason)


def _allowed_changed(m: OfflineMode, event: Event) -> Transition:
    ev = _as(event, OfflineAllowedChanged)
    new = replace(m, allowed=ev.allowed)
    if ev.allowed is m.allowed:
        return Transition(m, ())
    if not ev.allowed:
        if m.mode in (Mode.ONLINE, Mode.OUTAGE_DETECTED, Mode.PROMPTING):
            return _move(m, replace(new, mode=Mode.DISABLED), "offline_disallowed")
        if m.mode is Mode.OFFLINE:  # keep what is stored, take nothing new
            return _move(m, replace(new, mode=Mode.WINDOW_CLOSED), "offline_disallowed")
        return Transition(new, ())  # WINDOW_CLOSED, FORWARDING: nothing new is taken anyway
    if m.mode is not Mode.DISABLED:  # WINDOW_CLOSED stays closed; FORWARDING ends ONLINE
        return Transition(new, ())
    if m.connectivity_lost_at_ms is None:
        return _move(m, replace(new, mode=Mode.ONLINE), "offline_allowed")
    return _outage(m, new)  # allowed mid-outage: as if the outage began now


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    """A table cell for a pair the caller must not produce; ``why`` explains."""

    why: str


class _Ignore:
    """The type of :data:`IGNORE`."""

    def __repr__(self) -> str:
        return "IGNORE"


IGNORE = _Ignore()
Handler = Callable[[OfflineMode, Event], Transition]
Cell = Handler | Reject | _Ignore

_NO_PROMPT = Reject("no 'Unable to connect' prompt is showing")
_NOT_CONNECTED = Reject("connectivity is not back; integrated payments resume once it is")
_CONNECTED = Reject(
    "the terminal is connected; offline payments start after an outage or "
    "when forced from the portal"
)

TABLE: Mapping[tuple[Mode, type[Event]], Cell] = MappingProxyType(
    {
        # DISABLED: offline not allowed; outages are tracked so allowing mid-outage works.
        (Mode.DISABLED, ConnectivityLost): _lost_again,
        (Mode.DISABLED, Tick): IGNORE,
        (Mode.DISABLED, OperatorActivate): _refuse_not_allowed,
        (Mode.DISABLED, OperatorDecline): _NO_PROMPT,
        (Mode.DISABLED, ForcedOffline): _refuse_not_allowed,
        (Mode.DISABLED, ForcedOnline): IGNORE,
        (Mode.DISABLED, ConnectivityRestored): _restored_before_offline,
        (Mode.DISABLED, Drained): IGNORE,
        (Mode.DISABLED, OperatorResume): IGNORE,
        (Mode.DISABLED, OfflineAllowedChanged): _allowed_changed,
        # ONLINE: integrated payments.
        (Mode.ONLINE, ConnectivityLost): _lost,
        (Mode.ONLINE, Tick): IGNORE,
        (Mode.ONLINE, OperatorActivate): _CONNECTED,
        (Mode.ONLINE, OperatorDecline): _NO_PROMPT,
        (Mode.ONLINE, ForcedOffline): _forced_offline,
        (Mode.ONLINE, ForcedOnline): IGNORE,
        (Mode.ONLINE, ConnectivityRestored): IGNORE,
        (Mode.ONLINE, Drained): IGNORE,
        (Mode.ONLINE, OperatorResume): IGNORE,
        (Mode.ONLINE, OfflineAllowedChanged): _allowed_changed,
        # OUTAGE_DETECTED: down, waiting for the delay (auto), the portal, or the operator.
        (Mode.OUTAGE_DETECTED, ConnectivityLost): _lost_again,
        (Mode.OUTAGE_DETECTED, Tick): _tick_outage,
        (Mode.OUTAGE_DETECTED, OperatorActivate): _operator_activate,
        (Mode.OUTAGE_DETECTED, OperatorDecline): IGNORE,
        (Mode.OUTAGE_DETECTED, ForcedOffline): _forced_offline,
        (Mode.OUTAGE_DETECTED, ForcedOnline): IGNORE,
        (Mode.OUTAGE_DETECTED, ConnectivityRestored): _restored_before_offline,
        (Mode.OUTAGE_DETECTED, Drained): IGNORE,
        (Mode.OUTAGE_DETECTED, OperatorResume): _NOT_CONNECTED,
        (Mode.OUTAGE_DETECTED, OfflineAllowedChanged): _allowed_changed,
        # PROMPTING: "Unable to connect to network" is on screen.
        (Mode.PROMPTING, ConnectivityLost): _lost_again,
        (Mode.PROMPTING, Tick): IGNORE,
        (Mode.PROMPTING, OperatorActivate): _operator_activate,
        (Mode.PROMPTING, OperatorDecline): _decline,
        (Mode.PROMPTING, ForcedOffline): _forced_offline,
        (Mode.PROMPTING, ForcedOnline): IGNORE,
        (Mode.PROMPTING, ConnectivityRestored): _restored_before_offline,
        (Mode.PROMPTING, Drained): IGNORE,
        (Mode.PROMPTING, OperatorResume): _NOT_CONNECTED,
        (Mode.PROMPTING, OfflineAllowedChanged): _allowed_changed,
        # OFFLINE: taking offline payments until the window closes.
        (Mode.OFFLINE, ConnectivityLost): _lost_again,
        (Mode.OFFLINE, Tick): _tick_offline,
        (Mode.OFFLINE, OperatorActivate): IGNORE,
        (Mode.OFFLINE, OperatorDecline): Reject("offline payments are already active"),
        (Mode.OFFLINE, ForcedOffline): IGNORE,
        (Mode.OFFLINE, ForcedOnline): _forced_online,
        (Mode.OFFLINE, ConnectivityRestored): _restored_offline,
        (Mode.OFFLINE, Drained): IGNORE,
        (Mode.OFFLINE, OperatorResume): _NOT_CONNECTED,
        (Mode.OFFLINE, OfflineAllowedChanged): _allowed_changed,
        # WINDOW_CLOSED: offline, keeping stored payments, taking no new one.
        (Mode.WINDOW_CLOSED, ConnectivityLost): _lost_again,
        (Mode.WINDOW_CLOSED, Tick): IGNORE,
        (Mode.WINDOW_CLOSED, OperatorActivate): _refuse_window_closed,
        (Mode.WINDOW_CLOSED, OperatorDecline): Reject("the offline window has closed"),
        (Mode.WINDOW_CLOSED, ForcedOffline): _refuse_window_closed,
        (Mode.WINDOW_CLOSED, ForcedOnline): _forced_online,
        (Mode.WINDOW_CLOSED, ConnectivityRestored): _restored_offline,
        (Mode.WINDOW_CLOSED, Drained): IGNORE,
        (Mode.WINDOW_CLOSED, OperatorResume): _NOT_CONNECTED,
        (Mode.WINDOW_CLOSED, OfflineAllowedChanged): _allowed_changed,
        # FORWARDING: connected again, stored payments draining.
        (Mode.FORWARDING, ConnectivityLost): _lost,
        (Mode.FORWARDING, Tick): IGNORE,
        (Mode.FORWARDING, OperatorActivate): _CONNECTED,
        (Mode.FORWARDING, OperatorDecline): _NO_PROMPT,
        (Mode.FORWARDING, ForcedOffline): _forced_offline,
        (Mode.FORWARDING, ForcedOnline): IGNORE,
        (Mode.FORWARDING, ConnectivityRestored): IGNORE,
        (Mode.FORWARDING, Drained): _finish_forwarding,
        (Mode.FORWARDING, OperatorResume): _finish_forwarding,
        (Mode.FORWARDING, OfflineAllowedChanged): _allowed_changed,
    }
)
