"""Tests for syncengine.core.policy.offline_mode (R2, R4, R5, R12)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core.errors import ConfigError, InvalidState, Refused
from syncengine.core.policy.expiry import HOUR_MS, DeviceClass
from syncengine.core.policy.offline_mode import (
    EVENT_TYPES,
    IGNORE,
    TABLE,
    Alert,
    AlertKind,
    ConnectivityLost,
    ConnectivityRestored,
    Drained,
    Effect,
    EntryPolicy,
    Event,
    ForcedOffline,
    ForcedOnline,
    Mode,
    OfflineAllowedChanged,
    OfflineMode,
    OfflineModePolicy,
    OfflineSettings,
    OperatorActivate,
    OperatorDecline,
    OperatorResume,
    OutageKind,
    Prompt,
    PromptKind,
    RecordModeChange,
    Reject,
    StartForwarding,
    Tick,
    start,
    step,
)

T0 = 1_700_000_000_000
ALLOWED = OfflineSettings(True, True, "owner@example.com", T0 - 1)
NETWORK, PROVIDER = OutageKind.NETWORK, OutageKind.PROVIDER


def machine(
    entry: EntryPolicy = EntryPolicy.PROMPT,
    device_class: DeviceClass = DeviceClass.TERMINAL,
    settings_: OfflineSettings = ALLOWED,
    auto_on_provider_outage: bool = False,
) -> OfflineMode:
    policy = OfflineModePolicy(entry, auto_on_provider_outage=auto_on_provider_outage)
    return start(settings_, policy, device_class, T0)


def run(m: OfflineMode, events: Sequence[Event]) -> tuple[OfflineMode, list[Effect]]:
    effects: list[Effect] = []
    for event in events:
        result = step(m, event)
        m = result.machine
        effects.extend(result.effects)
    return m, effects


# --- R2: settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param(
            {"allowed": True, "liability_accepted_by": "a", "liability_accepted_at_ms": 1},
            "standalone",
            id="seed 000: you must first enable standalone mode",
        ),
        pytest.param(
            {"allowed": True, "standalone_allowed": True, "liability_accepted_at_ms": 1},
            "who accepted",
            id="seed 000: enabling offline mode accepts responsibility — who",
        ),
        pytest.param(
            {"allowed": True, "standalone_allowed": True, "liability_accepted_by": "a"},
            "when liability",
            id="seed 000: enabling offline mode accepts responsibility — when",
        ),
        pytest.param(
            {
                "allowed": True,
                "standalone_allowed": True,
                "liability_accepted_by": "  ",
                "liability_accepted_at_ms": 1,
            },
            "who accepted",
            id="R2: a blank name is not an acceptance",
        ),
    ],
)
def test_offline_settings_validation(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OfflineSettings(**kwargs)  # type: ignore[arg-type]


def test_offline_is_off_by_default() -> None:
    """Seed 002: "By default, all Venues are configured to disallow Offline Payments Mode"."""
    assert OfflineSettings().allowed is False
    assert machine(settings_=OfflineSettings()).mode is Mode.DISABLED


@pytest.mark.parametrize("auto_after_ms", [0, 999, HOUR_MS + 1])
def test_auto_delay_is_bounded(auto_after_ms: int) -> None:
    with pytest.raises(ConfigError):
        OfflineModePolicy(EntryPolicy.AUTO, auto_after_ms)


def test_auto_delay_defaults_to_one_minute() -> None:
    """Seed 002: NX enters offline once "the internet connection has been lost for more than
    1 minute"."""
    assert OfflineModePolicy().auto_after_ms == 60_000


# --- R4: entering and leaving -------------------------------------------------------------


def test_seed_000_prompt_flow() -> None:
    """Seed 000: "Unable to connect to network" -> "Activate offline payments" -> activated;
    on reconnection "Resume Integrated payments"."""
    m, effects = run(machine(), [ConnectivityLost(NETWORK, T0 + 5)])
    assert m.mode is Mode.PROMPTING
    assert effects == [
        RecordModeChange(Mode.ONLINE, Mode.PROMPTING, "connectivity_lost"),
        Alert(AlertKind.NETWORK_OUTAGE),
        Prompt(PromptKind.UNABLE_TO_CONNECT),
    ]
    m, effects = run(m, [OperatorActivate()])
    assert m.mode is Mode.OFFLINE and m.accepts_offline_payments
    assert effects == [
        RecordModeChange(Mode.PROMPTING, Mode.OFFLINE, "operator_activated"),
        Alert(AlertKind.OFFLINE_ACTIVATED),
    ]
    m, effects = run(m, [ConnectivityRestored()])
    assert m.mode is Mode.FORWARDING and not m.accepts_offline_payments
    assert effects == [
        RecordModeChange(Mode.OFFLINE, Mode.FORWARDING, "connectivity_restored"),
        Alert(AlertKind.CONNECTIVITY_RESTORED),
        Prompt(PromptKind.RESUME_INTEGRATED_PAYMENTS),
        StartForwarding(),
    ]
    m, effects = run(m, [OperatorResume()])
    assert m.mode is Mode.ONLINE
    assert effects == [RecordModeChange(Mode.FORWARDING, Mode.ONLINE, "operator_resumed")]


def test_operator_may_decline_then_activate_later() -> None:
    m, _ = run(machine(), [ConnectivityLost(NETWORK, T0), OperatorDecline()])
    assert m.mode is Mode.OUTAGE_DETECTED
    m, _ = run(m, [Tick(T0 + 10 * 60_000)])
    assert m.mode is Mode.OUTAGE_DETECTED  # prompt policy never enters on its own
    m, _ = run(m, [OperatorActivate()])
    assert m.mode is Mode.OFFLINE


@pytest.mark.parametrize(
    ("elapsed_ms", "mode"),
    [
        pytest.param(60_000, Mode.OUTAGE_DETECTED, id="seed 002: not at exactly 1 minute"),
        pytest.param(60_001, Mode.OFFLINE, id="seed 002: lost for more than 1 minute -> offline"),
    ],
)
def test_auto_entry_after_delay(elapsed_ms: int, mode: Mode) -> None:
    m, effects = run(
        machine(EntryPolicy.AUTO), [ConnectivityLost(NETWORK, T0), Tick(T0 + elapsed_ms)]
    )
    assert m.mode is mode
    if mode is Mode.OFFLINE:
        assert RecordModeChange(Mode.OUTAGE_DETECTED, Mode.OFFLINE, "auto_after_delay") in effects


def test_forced_policy_waits_for_the_portal() -> None:
    """Seed 002: "A user with the proper permissions manually enables Offline Mode via the
    NX Portal"."""
    m, _ = run(machine(EntryPolicy.FORCED), [ConnectivityLost(NETWORK, T0), Tick(T0 + HOUR_MS)])
    assert m.mode is Mode.OUTAGE_DETECTED
    with pytest.raises(Refused) as info:
        step(m, OperatorActivate())
    assert info.value.reason == "offline_entry_portal_only"
    m, effects = run(m, [ForcedOffline()])
    assert m.mode is Mode.OFFLINE
    assert effects[0] == RecordModeChange(
        Mode.OUTAGE_DETECTED, Mode.OFFLINE, "forced_offline_by_portal"
    )


def test_portal_may_force_a_connected_terminal_offline_and_back() -> None:
    """Seed 002: the portal enables offline mode, and "an authorized user turns Offline
    Payments Mode off" starts processing."""
    m, _ = run(machine(), [Tick(T0 + 10), ForcedOffline()])
    assert m.mode is Mode.OFFLINE and m.offline_since_ms == T0 + 10
    m, _ = run(m, [ConnectivityRestored()])  # nothing was lost: a duplicate report
    assert m.mode is Mode.OFFLINE
    m, effects = run(m, [ForcedOnline()])
    assert m.mode is Mode.FORWARDING and StartForwarding() in effects


@pytest.mark.parametrize(
    ("kind", "auto", "mode", "alert"),
    [
        pytest.param(
            NETWORK,
            True,
            Mode.PROMPTING,
            AlertKind.NETWORK_OUTAGE,
            id="seed 004: network outage alert (Vous êtes hors ligne)",
        ),
        pytest.param(
            PROVIDER,
            True,
            Mode.OFFLINE,
            AlertKind.PROVIDER_OUTAGE,
            id="seed 004: provider outage — paiements hors ligne activés",
        ),
        pytest.param(
            PROVIDER,
            False,
            Mode.PROMPTING,
            AlertKind.PROVIDER_OUTAGE,
            id="R4: provider auto-enable is configurable",
        ),
    ],
)
def test_network_and_provider_outages_are_distinguished(
    kind: OutageKind, auto: bool, mode: Mode, alert: AlertKind
) -> None:
    m, effects = run(machine(auto_on_provider_outage=auto), [ConnectivityLost(kind, T0)])
    assert m.mode is mode
    assert Alert(alert) in effects
    other = AlertKind.NETWORK_OUTAGE if kind is PROVIDER else AlertKind.PROVIDER_OUTAGE
    assert Alert(other) not in effects


def test_provider_outage_after_network_outage_can_still_auto_enable() -> None:
    m, _ = run(
        machine(auto_on_provider_outage=True),
        [ConnectivityLost(NETWORK, T0), ConnectivityLost(PROVIDER, T0 + 1)],
    )
    assert m.mode is Mode.OFFLINE
    assert m.offline_since_ms == T0  # the window still runs from the first loss


def test_disabled_terminal_refuses_offline() -> None:
    m, effects = run(machine(settings_=OfflineSettings()), [ConnectivityLost(NETWORK, T0)])
    assert m.mode is Mode.DISABLED and effects == [Alert(AlertKind.NETWORK_OUTAGE)]
    for event in (OperatorActivate(), ForcedOffline()):
        with pytest.raises(Refused) as info:
            step(m, event)
        assert info.value.reason == "offline_mode_not_allowed"


def test_allowing_mid_outage_prompts_at_once() -> None:
    m, _ = run(machine(settings_=OfflineSettings()), [ConnectivityLost(NETWORK, T0)])
    m, effects = run(m, [OfflineAllowedChanged(True)])
    assert m.mode is Mode.PROMPTING and Prompt(PromptKind.UNABLE_TO_CONNECT) in effects


def test_disallowing_while_offline_keeps_stored_payments_and_stops_new_ones() -> None:
    m, _ = run(machine(), [ConnectivityLost(NETWORK, T0), OperatorActivate()])
    m, _ = run(m, [OfflineAllowedChanged(False)])
    assert m.mode is Mode.WINDOW_CLOSED
    m, effects = run(m, [ConnectivityRestored(), Drained()])
    assert m.mode is Mode.DISABLED and StartForwarding() in effects


# --- R5/R12: windows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_class", "elapsed_ms", "mode"),
    [
        pytest.param(DeviceClass.READER, HOUR_MS - 1, Mode.OFFLINE, id="seed 004: Reader < 1 h"),
        pytest.param(DeviceClass.READER, HOUR_MS, Mode.WINDOW_CLOSED, id="seed 004: Reader 1 h"),
        pytest.param(DeviceClass.STAND, HOUR_MS, Mode.WINDOW_CLOSED, id="seed 004: Stand 1 h"),
        pytest.param(
            DeviceClass.REGISTER, 23 * HOUR_MS, Mode.OFFLINE, id="seed 004: Register < 24 h"
        ),
        pytest.param(
            DeviceClass.TERMINAL, 24 * HOUR_MS, Mode.WINDOW_CLOSED, id="seed 004: Terminal 24 h"
        ),
    ],
)
def test_window_closes_by_device_class(
    device_class: DeviceClass, elapsed_ms: int, mode: Mode
) -> None:
    m, effects = run(
        machine(device_class=device_class),
        [ConnectivityLost(NETWORK, T0), OperatorActivate(), Tick(T0 + elapsed_ms)],
    )
    assert m.mode is mode
    closed = Mode.WINDOW_CLOSED
    assert (Alert(AlertKind.OFFLINE_WINDOW_CLOSED) in effects) is (mode is closed)


def test_window_closed_refuses_reactivation_and_forwards_on_reconnect() -> None:
    m, _ = run(
        machine(device_class=DeviceClass.READER),
        [ConnectivityLost(NETWORK, T0), OperatorActivate(), Tick(T0 + 2 * HOUR_MS)],
    )
    for event in (OperatorActivate(), ForcedOffline()):
        with pytest.raises(Refused) as info:
            step(m, event)
        assert info.value.reason == "offline_window_closed"
    m, effects = run(m, [ConnectivityRestored()])
    assert m.mode is Mode.FORWARDING and StartForwarding() in effects


def test_activating_after_the_window_already_closed_goes_straight_to_window_closed() -> None:
    m, effects = run(
        machine(device_class=DeviceClass.READER),
        [ConnectivityLost(NETWORK, T0), Tick(T0 + HOUR_MS), OperatorActivate()],
    )
    assert m.mode is Mode.WINDOW_CLOSED and Alert(AlertKind.OFFLINE_ACTIVATED) not in effects


def test_clock_never_moves_backwards() -> None:
    m, _ = run(machine(), [Tick(T0 + 100), Tick(T0 + 50)])
    assert m.clock_ms == T0 + 100


# --- the table ----------------------------------------------------------------------------


def test_every_mode_event_pair_has_a_cell() -> None:
    assert set(TABLE) == {(mode, ev) for mode in Mode for ev in EVENT_TYPES}


@pytest.mark.parametrize(
    ("mode", "event_type"),
    [key for key, cell in TABLE.items() if isinstance(cell, Reject)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_rejected_cells_raise_invalid_state_with_a_reason(
    mode: Mode, event_type: type[Event]
) -> None:
    m = OfflineMode(mode, DeviceClass.TERMINAL, OfflineModePolicy(), True, T0, NETWORK, T0, T0)
    with pytest.raises(InvalidState, match="not expected in offline mode"):
        step(m, event_type())  # type: ignore[call-arg]


events = st.one_of(
    st.builds(ConnectivityLost, st.sampled_from(OutageKind), st.integers(T0, T0 + 48 * HOUR_MS)),
    st.builds(Tick, st.integers(T0, T0 + 48 * HOUR_MS)),
    st.sampled_from(
        [
            OperatorActivate(),
            OperatorDecline(),
            ForcedOffline(),
            ForcedOnline(),
            ConnectivityRestored(),
            Drained(),
            OperatorResume(),
        ]
    ),
    st.builds(OfflineAllowedChanged, st.booleans()),
)


def check_invariants(m: OfflineMode) -> None:
    assert m.mode in Mode
    if m.allowed:
        assert m.mode is not Mode.DISABLED
    else:
        assert m.mode in (Mode.DISABLED, Mode.WINDOW_CLOSED, Mode.FORWARDING)
    if m.mode in (Mode.ONLINE, Mode.FORWARDING):
        assert m.connectivity_lost_at_ms is None and m.offline_since_ms is None
    if m.mode in (Mode.OUTAGE_DETECTED, Mode.PROMPTING):
        assert m.connectivity_lost_at_ms is not None and m.offline_since_ms is None
    if m.mode in (Mode.OFFLINE, Mode.WINDOW_CLOSED):
        assert m.offline_since_ms is not None
    if m.mode is Mode.OFFLINE:
        closes_at_ms = m.offline_window_closes_at_ms
        assert closes_at_ms is not None and m.clock_ms < closes_at_ms


@settings(max_examples=300)
@given(
    st.sampled_from(EntryPolicy),
    st.sampled_from(DeviceClass),
    st.booleans(),
    st.booleans(),
    st.lists(events, max_size=40),
)
def test_random_event_sequences_never_reach_an_undefined_state(
    entry: EntryPolicy,
    device_class: DeviceClass,
    allowed: bool,
    auto_provider: bool,
    sequence: list[Event],
) -> None:
    settings_ = ALLOWED if allowed else OfflineSettings()
    m = machine(entry, device_class, settings_, auto_provider)
    check_invariants(m)
    for event in sequence:
        cell = TABLE[(m.mode, type(event))]
        try:
            result = step(m, event)
        except InvalidState:
            assert isinstance(cell, Reject)
            continue
        except Refused as refused:
            assert refused.reason in {
                "offline_mode_not_allowed",
                "offline_window_closed",
                "offline_entry_portal_only",
            }
            continue
        assert not isinstance(cell, Reject)
        new = result.machine
        changes = [e for e in result.effects if isinstance(e, RecordModeChange)]
        if new.mode is m.mode:
            assert changes == []
        else:
            assert changes == [RecordModeChange(m.mode, new.mode, changes[0].reason)]
            assert result.effects[0] == changes[0]
        if cell is IGNORE:
            assert result.effects == () and new.mode is m.mode
        assert new.clock_ms >= m.clock_ms
        check_invariants(new)
        m = new
