"""TerminalMachine: the whole terminal, sans-I/O. Events in, effects out.

Theory of operation
-------------------
1. The machine never touches a socket, a file or a clock. A shell (``sdk.Terminal`` for
   real, the simulator for tests) feeds it events -- :class:`Tick`, :class:`Connected`,
   :class:`ConnectFailed`, :class:`Disconnected`, :class:`Received`, :class:`TakePayment`,
   :class:`VoidPayment`, :class:`ActivateOffline`, :class:`ResumeIntegrated` -- through :meth:`TerminalMachine.handle`
   and performs the effects it returns, in order.
2. **Durability first.** An event that creates ops returns a :class:`Persist` effect as its
   *last* effect and stages the ops without applying them. The shell writes them in one
   durable transaction and then feeds :class:`Committed` (or :class:`CommitFailed`); only
   then are the ops applied and the follow-up effects (the payment result, the push, the
   UI notifications) released. So "approved offline" is never said of a payment that is not
   on disk, and a failed write leaves the machine exactly as it was. Any other event while a
   commit is outstanding is :class:`InvalidState`.
3. **Mode** is the core offline-mode machine (:mod:`syncengine.core.policy.offline_mode`,
   one table). Every change is written as a ``mode`` op (R4) together with a snapshot of
   that machine in the same transaction, so the mode, the moment connectivity was lost and
   the offline window survive a reboot (:meth:`TerminalMachine.restore`).
4. **Sync.** On :class:`Connected` the machine says Hello, answers the Challenge with an
   Ed25519 signature, and on Welcome pushes its ops above the server's vector in batches of
   at most ``push_batch_ops_max`` (up to ``pushes_in_flight_max`` unacknowledged at once;
   acks are cumulative) and pulls the server stream. It pushes once its copy of the
   server's stream is checked; a terminal holding a grant with nothing new pushes its last
   op again, once a session, so that a server restored from a backup knows it is back.
   No op is ever deleted; ``acked_seq`` grows with the acks, and only a Welcome whose
   vector is below it (a server restored from a backup) lowers it, so the ops the server
   lost go again (read back from the store if they left memory, 8. below). The server
   stream is pulled from its last op held, not after it, so a stream the server lost and
   wrote again (a restore) shows where it parts from ours: a search 1, 2, 4, ... seqs
   lower finds the first op that differs, our copy from there moves to the archive (views
   keep it; grants in it stop counting) and the server's ops take the seqs (docs/protocol.md, "A rewritten stream"). Heartbeat: a Ping every
   ``heartbeat_interval_ms``; silence for
   ``heartbeat_timeout_ms`` closes the link.
   Reconnects are scheduled with capped exponential backoff plus injected jitter
   (:class:`ConnectAt`).
5. **Outages** are of two kinds: ``network`` (cannot connect, DNS, refused, silence) and
   ``provider`` (server reachable but unavailable, or what it sent was refused). A provider
   outage may switch offline automatically (``OfflineModePolicy.auto_on_provider_outage``).
6. **Voids** (R9): :class:`VoidPayment` checks on the terminal that the payment is its
   own, processed and approved, standalone, of the same local business day
   (``TerminalConfig.utc_offset_minutes``, UTC if None) and not voided or fully refunded,
   then stages a ``void_request`` op; the result is a :class:`VoidDecided` notice. The
   server's full refund comes back as a ``refund`` op with id ``void:<payment_id>``
   (:class:`PaymentVoided`; other refunds give :class:`PaymentRefunded`).
7. **Policy** (limits, windows, card rules) comes from :mod:`syncengine.core.policy`;
   settings written by the server (``setting`` ops) override the local configuration,
   last writer wins by HLC.
8. **Memory.** Given the store's ``reader`` (:meth:`syncengine.node.store.Store.read_ops`),
   the replica keeps in memory only the ops it may still send or compare soon: its own ops
   the server has not acknowledged, the head of each stream, and up to
   ``compact_slack_ops`` more of each. The rest is compacted out of memory
   (:meth:`Replica.compact`) and read back from the store when a restored server needs it
   again or its stream is compared. The payments' views stay in memory. :meth:`restore`
   reads the log in pages and compacts as it goes, so opening a long history does not hold
   all of it at once. Without a reader (tests), every op stays in memory.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from syncengine.core import canonical, crypto, protocol
from syncengine.core.bodies import (
    VOID_REFUND_PREFIX,
    Capture,
    CardInfo,
    Grant,
    ModeChange,
    RefundRecord,
    Setting,
    StatusChange,
    VoidRequest,
    is_one_email_address,
    parse_body,
    void_refused_reason,
    without_sealed_card,
)
from syncengine.core.budget import TerminalBudget
from syncengine.core.errors import (
    ChainError,
    ConfigError,
    InvalidState,
    ProtocolError,
    Refused,
    StorageError,
    SyncEngineError,
    check,
)
from syncengine.core.hlc import Hlc, HybridClock
from syncengine.core.lifecycle import FINAL, Status, join
from syncengine.core.money import Money
from syncengine.core.ops import GENESIS, Op, check_chain, make_next, server_origin
from syncengine.core.policy import offline_mode
from syncengine.core.policy.acceptance import (
    DEFAULT_RULES,
    Brand,
    Card,
    EntryMethod,
    Region,
    Rule,
    RuleSet,
)
from syncengine.core.policy.expiry import (
    DeviceClass,
    expiry_warnings,
    payment_expires_at_ms,
    window_for,
)
from syncengine.core.policy.limits import OfflineLimits, check_capture, current_max_offline_amount
from syncengine.core.policy.offline_mode import (
    Mode,
    OfflineMode,
    OfflineModePolicy,
    OfflineSettings,
    OutageKind,
)
from syncengine.core.policy.safeguards import (
    OperatorAction,
    check_action,
    check_offline_window_open,
)
from syncengine.core.replica import OpReader, Replica

SDK_VERSION = "syncengine-node/0.1"

# --- limits (named, unit-suffixed, safe defaults) ---------------------------------------

PUSH_BATCH_OPS_MAX_DEFAULT = 500  # ops per Push frame (the server's batch limit)
PUSHES_IN_FLIGHT_MAX_DEFAULT = 4  # unacknowledged Push frames at once (pipelining)
# Room left in a frame for the Push envelope (type, version, the head signature) and the
# JSON punctuation around each op; a push also stops short of the frame limit in bytes.
PUSH_FRAME_ENVELOPE_BYTES = 1_024
PUSH_OP_OVERHEAD_BYTES = 16
HEARTBEAT_INTERVAL_MS_DEFAULT = 5_000
HEARTBEAT_TIMEOUT_MS_DEFAULT = 15_000  # silence after which the link is declared down
HANDSHAKE_TIMEOUT_MS_DEFAULT = 10_000
RECONNECT_BASE_MS_DEFAULT = 500
RECONNECT_CAP_MS_DEFAULT = 30_000
ONLINE_OUTCOME_TIMEOUT_MS_DEFAULT = 30_000  # how long take_payment waits online
PUSH_ACK_TIMEOUT_MS_DEFAULT = 20_000  # a push unacknowledged this long resets the link
PAYMENTS_MAX = 1_000_000  # bound on the in-memory views; far above a day's trade
#: Stored ops of a stream that may gather in memory beyond what is still needed there
#: before they are compacted out of it together (8. above): a few hundred KiB.
COMPACT_SLACK_OPS_DEFAULT = 512
RESTORE_PAGE_OPS = 4_096  # ops merged and applied at a time when a store is read back
PENDING_WAITERS_MAX = 64  # online payments awaiting their outcome at once
DAY_MS = 86_400_000
UTC_OFFSET_MINUTES_MAX = 14 * 60  # the widest real offsets are -12:00 and +14:00

Outage = Literal["network", "provider"]
LinkState = Literal["connecting", "handshaking", "connected", "network_outage", "provider_outage"]
Outcome = Literal["approved_online", "approved_offline", "declined", "pending", "refused"]

_OUTAGE_MODES = frozenset({Mode.OUTAGE_DETECTED, Mode.PROMPTING, Mode.OFFLINE, Mode.WINDOW_CLOSED})
_CONNECTED_MODES = frozenset({Mode.ONLINE, Mode.FORWARDING, Mode.DISABLED})


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TerminalConfig:
    """What a terminal is and the local defaults of its settings.

    Server ``setting`` ops override the ``*`` defaults marked below (see :data:`SETTING_KEYS`).
    """

    terminal_id: str
    merchant_id: str
    device_class: DeviceClass
    currency: str
    region: Region
    processor_public_key: bytes
    server_public_key: bytes | None = None  # verifies ServerOps head signatures when set
    offline: OfflineSettings = field(default_factory=OfflineSettings)  # R2: off by default
    policy: OfflineModePolicy = field(default_factory=OfflineModePolicy)
    rules: frozenset[Rule] = DEFAULT_RULES  # *
    limits: OfflineLimits | None = None  # * None: the currency's default maxima
    warning_thresholds_percent: tuple[int, ...] = (50, 90)
    push_batch_ops_max: int = PUSH_BATCH_OPS_MAX_DEFAULT
    heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS_DEFAULT
    heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS_DEFAULT
    handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS_DEFAULT
    reconnect_base_ms: int = RECONNECT_BASE_MS_DEFAULT
    reconnect_cap_ms: int = RECONNECT_CAP_MS_DEFAULT
    online_outcome_timeout_ms: int = ONLINE_OUTCOME_TIMEOUT_MS_DEFAULT
    push_ack_timeout_ms: int = PUSH_ACK_TIMEOUT_MS_DEFAULT
    pushes_in_flight_max: int = PUSHES_IN_FLIGHT_MAX_DEFAULT
    # The local business day for voids (R9): UTC plus this many minutes; None: UTC. Set it
    # to the merchant's offset so the terminal and the server agree on "same day".
    utc_offset_minutes: int | None = None

    def __post_init__(self) -> None:
        if self.utc_offset_minutes is not None and not (
            -UTC_OFFSET_MINUTES_MAX <= self.utc_offset_minutes <= UTC_OFFSET_MINUTES_MAX
        ):
            raise ConfigError(f"utc_offset_minutes must be within +-{UTC_OFFSET_MINUTES_MAX}")
        if not 1 <= self.push_batch_ops_max <= protocol.BATCH_OPS_MAX_DEFAULT:
            raise ConfigError(
                f"push_batch_ops_max must be 1..{protocol.BATCH_OPS_MAX_DEFAULT} (server limit)"
            )
        if not 1 <= self.pushes_in_flight_max <= 64:
            raise ConfigError("pushes_in_flight_max must be 1..64")
        if not 0 < self.heartbeat_interval_ms < self.heartbeat_timeout_ms:
            raise ConfigError("heartbeat_interval_ms must be positive and below the timeout")
        if not 0 < self.reconnect_base_ms <= self.reconnect_cap_ms:
            raise ConfigError("reconnect_base_ms must be positive and at most the cap")
        if self.online_outcome_timeout_ms <= 0 or self.push_ack_timeout_ms <= 0:
            raise ConfigError("timeouts must be positive")
        DeviceClass(self.device_class)
        Region(self.region)


#: Setting keys the server may write, with the type of their value.
SETTING_KEYS: dict[str, str] = {
    "offline_allowed": "bool (the server checked standalone + liability acceptance)",
    "force_offline": "bool",
    "rules": "list of rule names",
    "per_transaction_limit": "money",
    "total_limit": "money",
    "offline_entry": '{"policy": "prompt" | "auto", "auto_delay_ms": int} (R4)',
    "standalone_allowed": "bool (informational: the server gates offline_allowed on it)",
}


# --- cards and results --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class CardRead:
    """A card as the reader got it: the sensitive data (sealed at once) and its networks."""

    data: crypto.CardData
    brand: Brand
    co_brands: frozenset[Brand] = frozenset()
    is_gift: bool = False

    def __repr__(self) -> str:
        return f"CardRead({self.brand}, {self.data!r})"


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """What ``take_payment`` tells the POS.

    ``outcome``: ``approved_online``, ``approved_offline`` (stored durably, forwarded later),
    ``declined`` (by the processor; ``reason`` is its code), ``pending`` (stored and sent,
    outcome not known yet: it arrives later as a ``PaymentForwarded`` event) or
    ``refused`` (nothing stored; ``reason`` is a stable code, ``message`` says what to do).
    """

    outcome: Outcome
    amount: Money
    payment_id: str | None = None
    channel: str | None = None
    reason: str = ""
    message: str = ""
    expires_at_ms: int | None = None
    brand: str = ""
    last4: str = ""


@dataclass(slots=True)
class PaymentView:
    """One payment as the terminal sees it (derived from the log; never the card number).

    ``capture.card.sealed`` is empty: the sealed card stays in the stored op only (a view
    is kept in memory for every payment, and the POS has no use for the envelope).
    """

    payment_id: str
    seq: int
    capture: Capture
    status: Status = Status.CAPTURED
    code: str = ""
    message: str = ""
    processed_at_ms: int | None = None
    refunded_minor: int = 0  # every refund the server made (voids included)
    voided_minor: int = 0  # the part of it that is this terminal's void
    void_requested_at_ms: int | None = None  # set once a void_request op is in the log
    void_seq: int | None = None  # own-log seq of that op (the Z-report period of the void)
    void_refused: str = ""  # the server's reason when it did not make the void
    refund_ids: tuple[str, ...] = ()  # the refunds counted (a refund is counted once)

    @property
    def refunded(self) -> Money:
        return Money(self.refunded_minor, self.capture.amount.currency)

    @property
    def voided(self) -> Money:
        return Money(self.voided_minor, self.capture.amount.currency)

    @property
    def void_state(self) -> str:
        """``""`` (never voided), ``requested`` (awaiting the server), ``voided``, or
        ``refused`` (the server did not make the void; ``void_refused`` says why)."""
        if self.voided_minor > 0:
            return "voided"
        if self.void_refused:
            return "refused"
        return "" if self.void_requested_at_ms is None else "requested"


VoidOutcome = Literal["requested", "refused"]


@dataclass(frozen=True, slots=True)
class VoidResult:
    """What ``void_payment`` tells the POS.

    ``requested``: the void request is stored durably and sent; the server turns it into a
    full refund and the terminal hears it later (a :class:`PaymentVoided` notice).
    ``refused``: nothing stored; ``reason`` is a stable code (``not_found``,
    ``not_standalone``, ``not_processed``, ``not_approved``, ``not_same_day``,
    ``already_voided``, ``void_refused``, ``already_refunded``, ``storage_failed``),
    ``message`` says why.
    """

    outcome: VoidOutcome
    payment_id: str
    amount: Money | None = None
    reason: str = ""
    message: str = ""


# --- events in ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. Feed at least every ``heartbeat_interval_ms``."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class Connected:
    """A transport connection to the server is open (not yet authenticated)."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A connection attempt failed; ``outage`` says whose fault it looks like."""

    now_ms: int
    outage: Outage
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """An open connection ended."""

    now_ms: int
    outage: Outage
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message arrived from the server."""

    now_ms: int
    message: protocol.Message


@dataclass(frozen=True, slots=True, repr=False)
class TakePayment:
    """The POS asks for a payment. Ids and randomness are passed in (sans-I/O)."""

    now_ms: int
    payment_id: str
    amount: Money
    card: CardRead
    entry_method: EntryMethod
    ephemeral_private: bytes  # 32 fresh random bytes for sealing
    nonce: bytes  # 12 fresh random bytes for sealing
    email: str | None = None
    standalone: bool = False

    def __repr__(self) -> str:
        return f"TakePayment({self.payment_id}, {self.amount}, {self.card!r})"


@dataclass(frozen=True, slots=True)
class VoidPayment:
    """The operator voids a same-day standalone payment (Transactions > History > void)."""

    now_ms: int
    payment_id: str


@dataclass(frozen=True, slots=True)
class ActivateOffline:
    """The operator accepted the "Activate offline payments" prompt."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class ResumeIntegrated:
    """The operator pressed "Resume integrated payments"."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class Committed:
    """The shell durably wrote the last :class:`Persist`."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """The shell could not write the last :class:`Persist`; nothing of it is on disk."""

    now_ms: int
    error: str


Event = (
    Tick
    | Connected
    | ConnectFailed
    | Disconnected
    | Received
    | TakePayment
    | VoidPayment
    | ActivateOffline
    | ResumeIntegrated
    | Committed
    | CommitFailed
)


# --- effects out and UI notifications ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Persist:
    """Write ``ops`` (and ``meta``) in ONE transaction, then feed Committed/CommitFailed.

    ``durable`` (the default) means the commit is on disk before Committed is fed (fsync).
    Only bookkeeping the server can tell again is written with ``durable=False``: the
    acknowledged seq (:class:`~syncengine.core.protocol.Ack`). A power cut may take it
    back; the terminal then counts those payments as unacknowledged (the cautious side)
    until the next Welcome carries the server's vector. Ops are always durable.
    """

    ops: tuple[Op, ...]
    meta: dict[str, int | str] = field(default_factory=dict)
    durable: bool = True
    # (origin, seq): first move origin's stored ops from seq up to the archive (the same
    # transaction; :meth:`syncengine.node.store.Store.write`), so ``ops`` reuse those seqs.
    archive: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` on the open connection (drop it if there is none)."""

    message: protocol.Message


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Close the connection; then feed :class:`Disconnected` is NOT needed (already done)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectAt:
    """Open a connection at ``at_ms`` (the shell feeds Connected or ConnectFailed)."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class PaymentDecided:
    """The answer to a :class:`TakePayment` (possibly several events later)."""

    result: PaymentResult


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """Mode or network state changed."""

    mode: str
    network: LinkState


@dataclass(frozen=True, slots=True)
class OfflinePrompt:
    """Show "Unable to connect to network" -> "Activate offline payments"."""

    outage: Outage
    message: str


@dataclass(frozen=True, slots=True)
class OutageAlert:
    """A network or provider outage was detected on the link (two different kinds, R4)."""

    outage: Outage
    message: str


@dataclass(frozen=True, slots=True)
class ModeAlert:
    """An alert of the offline-mode machine (``network_outage``, ``provider_outage``,
    ``offline_activated``, ``offline_window_closed``, ``connectivity_restored``)."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class ResumePrompt:
    """Connectivity is back: show "Resume integrated payments"; forwarding has started."""

    pending_count: int
    message: str


@dataclass(frozen=True, slots=True)
class PaymentForwarded:
    """A stored payment reached a final status at the processor."""

    payment_id: str
    status: str
    code: str
    amount: Money
    channel: str


@dataclass(frozen=True, slots=True)
class ForwardingFailed:
    """The server refused or could not take our ops; they stay stored and are retried.

    Also what a restored server (from a backup) means for this terminal: ``server_behind``
    (it lost some of our ops; they go again), ``server_stream_behind`` and
    ``server_stream_rewritten`` (it lost and rewrote its stream to us; our copy is kept in
    the archive) and ``status_conflict`` (it decided a payment differently; kept the first).
    ``storage_failed``: ops that left memory could not be read back from the store (8. in
    the module docstring); tried again on the next tick, or in the next session.
    """

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ExpiryWarning:
    """``percent`` of the expiry window of stored payments has elapsed (R5 BEAT)."""

    percent: int
    expires_at_ms: int
    amount_at_risk: Money
    count_at_risk: int


@dataclass(frozen=True, slots=True)
class VoidDecided:
    """The answer to a :class:`VoidPayment` (after its commit, or at once if refused)."""

    result: VoidResult


@dataclass(frozen=True, slots=True)
class PaymentVoided:
    """The server voided a payment of this terminal: a full refund was made."""

    payment_id: str
    refund_id: str
    amount: Money
    channel: str


@dataclass(frozen=True, slots=True)
class VoidRefused:
    """The server did not make a void this terminal requested; nothing was refunded.

    ``reason`` is the server's code (``refused_rules``: not the same business day in the
    merchant's time zone, or not standalone; ``not_charged``: the payment was not
    approved; ``refused_<code>``: the processor refused the refund); ``message`` says what
    to do (refund it from the POS or the portal if it still must be).
    """

    payment_id: str
    amount: Money
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class PaymentRefunded:
    """The server refunded (part of) a payment of this terminal (not a void)."""

    payment_id: str
    refund_id: str
    amount: Money
    refunded_total: Money


Notice = (
    StatusChanged
    | OfflinePrompt
    | OutageAlert
    | ModeAlert
    | ResumePrompt
    | PaymentForwarded
    | ForwardingFailed
    | ExpiryWarning
    | VoidDecided
    | PaymentVoided
    | VoidRefused
    | PaymentRefunded
)


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell the POS UI listeners about ``notice``."""

    notice: Notice


Effect = Persist | Send | CloseLink | ConnectAt | PaymentDecided | Notify


@dataclass(frozen=True, slots=True)
class TerminalStatus:
    """A snapshot for the POS status bar (all times in ms)."""

    mode: str
    network: LinkState
    offline_allowed: bool
    pending_count: int
    pending_amount: Money
    unsynced_ops: int
    max_offline_amount: Money
    offline_window_left_ms: int | None
    first_expiry_left_ms: int | None


@dataclass(slots=True)
class _Staged:
    ops: list[Op]
    meta: dict[str, int | str]
    after_ok: list[Effect]
    after_fail: list[Effect]
    om_after: OfflineMode | None = None
    archive_from: int = 0  # > 0: the server stream from this seq moves to the archive
    archives_grant: bool = False  # a grant op is among those that move


# --- the machine --------------------------------------------------------------------------


class TerminalMachine:
    """The terminal's replica, policy and sync session, driven by events.

    Contract: after :meth:`handle`, perform the returned effects in order. A
    :class:`Persist` is always last; write it durably, then call ``handle(Committed(now))``
    (or ``handle(CommitFailed(now, error))``) and perform what that returns.
    ``jitter_ms(n)`` must return a random int in ``0..n`` (inject a seeded one to replay).
    """

    def __init__(
        self,
        config: TerminalConfig,
        signing_key: bytes,
        jitter_ms: Callable[[int], int],
        now_ms: int,
        reader: OpReader | None = None,
        compact_slack_ops: int = COMPACT_SLACK_OPS_DEFAULT,
    ) -> None:
        if compact_slack_ops < 0:
            raise ValueError("compact_slack_ops must be >= 0")
        self.config = config
        self._key = signing_key
        self._signer = crypto.Signer(signing_key)
        self._jitter_ms = jitter_ms
        self.origin = config.terminal_id
        self.server_origin = server_origin(config.terminal_id)
        self.replica = Replica(reader=reader)
        self.compact_slack_ops = compact_slack_ops
        self.clock = HybridClock()
        self.payments: dict[str, PaymentView] = {}
        # The capture seqs of ``payments``, ascending: unacked_payments() is a bisection.
        self._capture_seqs: list[int] = []
        self._stored_views: dict[str, PaymentView] = {}
        self._outstanding_minor = 0
        # deadline ms -> [count, amount minor] of stored payments: O(1) per capture/outcome,
        # so status() and expiry warnings cost nothing as the history grows.
        self._deadlines: dict[int, list[int]] = {}
        self._offline_used_minor = 0
        self.settings: dict[str, tuple[Any, Any]] = {}  # key -> (hlc, value)
        self.grant_total: Money | None = None
        self.om = offline_mode.start(config.offline, config.policy, config.device_class, now_ms)
        self.link: LinkState = "connecting"
        self._first_offline: tuple[int, int] | None = None  # (offline_since_ms, captured_at)
        self.acked_seq = 0
        self._server_has = 0  # the server's vector entry for our origin (this session)
        self._gap_reported = False  # the server answered chain_gap; its Ack follows
        # (last seq, sent at ms) of each Push not yet acknowledged, oldest first.
        self._in_flight: list[tuple[int, int]] = []
        # server clock minus ours, measured at Welcome; bounds how far ahead server ops
        # may be stamped without trusting a skewed local clock (0 until first measured).
        self._server_offset_ms = 0
        self._last_rx_ms = now_ms
        self._last_ping_ms = now_ms
        self._ping_nonce = 0
        self._connect_attempts = 0
        self._handshake_started_ms = 0
        self._warned: set[tuple[int, int]] = set()
        self._waiters: dict[str, int] = {}  # online payment id -> deadline ms
        self._staged: _Staged | None = None
        self._forced_by: tuple[Any, Any] | None = None  # the force_offline press acted on
        self._forced_offline_hlc: Hlc | None = None  # our last mode op forced by the portal
        self._now_ms = now_ms
        # Verifying the server stream against ours (a server restored from a backup may
        # have lost and rewritten part of it): the seq our last verifying Pull asked after,
        # and how far below it the next one goes when that answer does not chain to ours.
        self._probe: int | None = None
        self._probe_step = 1
        self._probe_passed = False  # a push was left alone while verifying: pull once more
        # Each session pushes only once our copy of the server's stream is checked against
        # the server's (the first answer, or the search's end): a push merged after a
        # restore then shows the server that we dropped the rights it forgot (the budget's
        # restore hold waits for it).
        self._stream_checked = False
        # Whether this session sent a push once checked. A terminal holding a grant with
        # nothing new to push sends its last op again instead: that push, a duplicate,
        # tells the server it is back (after a restore the budget waits for it).
        self._pushed_in_session = False
        self._push_read_failing = False  # a push's ops could not be read back: retry on ticks
        self.archived_ops = 0  # server ops of ours the server rewrote, kept in the archive

    # -- restore ---------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        config: TerminalConfig,
        signing_key: bytes,
        jitter_ms: Callable[[int], int],
        now_ms: int,
        ops: Iterable[Op],
        acked_seq: int,
        mode_snapshot: str = "",
        archived: Iterable[Op] = (),
        reader: OpReader | None = None,
        compact_slack_ops: int = COMPACT_SLACK_OPS_DEFAULT,
    ) -> TerminalMachine:
        """Rebuild a machine from the ops a store gave back (chains are re-verified).

        ``archived``: the store's archive (server ops the server rewrote), folded into the
        views after our own ops and before the server's current stream, as they were when
        they arrived.

        Without ``reader`` the ops may come in any order. With the store's ``reader``
        (see 8. above) they are taken in pages and compacted as they go: they must come
        as the store's ``iter_log`` gives them, each origin in seq order and our own ops
        first, so that memory holds a page at a time, not the whole history.
        """
        machine = cls(config, signing_key, jitter_ms, now_ms, reader, compact_slack_ops)
        if mode_snapshot:
            machine.om = _om_from_snapshot(mode_snapshot, config)
        own = machine.origin
        if reader is None:
            ops = sorted(ops, key=lambda op: (op.origin != own, op.origin, op.seq))
        machine.acked_seq = acked_seq  # compaction during the replay keeps the unacked
        archive_pending = True
        stream = iter(ops)
        while page := tuple(itertools.islice(stream, RESTORE_PAGE_OPS)):
            result = machine.replica.merge(page)
            for op in result.applied:
                if op.origin != own and archive_pending:
                    machine._apply_archived(archived)
                    archive_pending = False
                check(op.origin != own or archive_pending, "our own ops come first")
                machine._apply(op)
            machine._compact()
        check(machine.replica.held_count() == 0, "a stored log has a gap: the store is corrupt")
        if archive_pending:
            machine._apply_archived(archived)
        # The force_offline press we already went offline for: our mode op recording it is
        # stamped after the setting (we observed its HLC before acting on it).
        entry = machine.settings.get("force_offline")
        forced_at = machine._forced_offline_hlc
        if (
            entry is not None
            and entry[1] is True
            and forced_at is not None
            and forced_at > entry[0]
        ):
            machine._forced_by = entry
        return machine

    def _apply_archived(self, archived: Iterable[Op]) -> None:
        for op in archived:
            check(op.origin == self.server_origin, "only our server stream is archived")
            self.archived_ops += 1
            if op.kind != "grant":  # budget rights the server forgot are not ours to use
                self._apply(op)

    def _compact(self) -> None:
        """Let stored ops leave memory (see 8. above): our own acknowledged ones and the
        server's, except each stream's head, once ``compact_slack_ops`` have gathered."""
        if self.replica.reader is None:
            return
        for origin, upto in (
            (self.origin, min(self.acked_seq, self.replica.head(self.origin)[0] - 1)),
            (self.server_origin, self.replica.head(self.server_origin)[0] - 1),
        ):
            in_memory = self.replica.in_memory(origin)
            head = self.replica.head(origin)[0]
            if upto - (head - in_memory) > self.compact_slack_ops:
                self.replica.compact(origin, upto)

    # -- reading ---------------------------------------------------------------------------

    def setting(self, key: str, default: Any) -> Any:
        entry = self.settings.get(key)
        return default if entry is None else entry[1]

    @property
    def mode(self) -> str:
        """The offline mode (``online``, ``offline``, ``forwarding``, ...)."""
        return self.om.mode.value

    @property
    def offline_allowed(self) -> bool:
        return self.om.allowed

    def limits(self) -> OfflineLimits:
        base = self.config.limits or OfflineLimits.default(self.config.currency)
        per_tx, total = base.per_transaction, base.total
        try:
            raw_per = self.settings.get("per_transaction_limit")
            raw_total = self.settings.get("total_limit")
            if raw_per is not None:
                per_tx = Money.from_wire(raw_per[1])
            if raw_total is not None:
                total = Money.from_wire(raw_total[1])
            return OfflineLimits(per_tx, total)
        except SyncEngineError:
            return base  # a malformed server setting never loosens the local limits

    def grant_room(self) -> Money | None:
        """Escrow: what the server's cumulative grant still allows (None without a grant).

        Rights are used by every offline capture ever made and come back only as larger
        grants from the server, so ``used <= granted`` holds even while partitioned.
        """
        budget = self._budget()
        return None if budget is None else budget.available

    def _budget(self) -> TerminalBudget | None:
        if self.grant_total is None:
            return None
        return TerminalBudget(granted=self.grant_total, used=self._offline_used())

    def _offline_used(self) -> Money:
        return Money(self._offline_used_minor, self.config.currency)

    def _outstanding(self) -> Money:
        # Kept incrementally: a capture adds, a final status removes (O(1) per payment).
        return Money(self._outstanding_minor, self.config.currency)

    def unsynced_ops(self) -> int:
        """Own ops the server has not acknowledged as durable."""
        return self.replica.head(self.origin)[0] - self.acked_seq

    def window_closes_at_ms(self) -> int | None:
        return self.om.offline_window_closes_at_ms

    def status(self, now_ms: int) -> TerminalStatus:
        """The status bar: mode, network, pending, max offline amount, time left."""
        outstanding = self._outstanding()
        max_amount = current_max_offline_amount(self.limits(), outstanding)
        room = self.grant_room()
        if room is not None:
            max_amount = max_amount.min(room)
        if not self.om.accepts_offline_payments:
            max_amount = Money.zero(self.config.currency)
        closes = self.window_closes_at_ms()
        first_expiry = min(self._deadlines) if self._deadlines else None
        return TerminalStatus(
            mode=self.mode,
            network=self.link,
            offline_allowed=self.offline_allowed,
            pending_count=len(self._stored_views),
            pending_amount=outstanding,
            unsynced_ops=self.unsynced_ops(),
            max_offline_amount=max_amount,
            offline_window_left_ms=None if closes is None else max(0, closes - now_ms),
            first_expiry_left_ms=None if first_expiry is None else max(0, first_expiry - now_ms),
        )

    def history(self) -> list[PaymentView]:
        """Every payment in capture order."""
        return sorted(self.payments.values(), key=lambda v: v.seq)

    def unacked_payments(self) -> int:
        """Payments whose capture the server has not acknowledged as durable."""
        seqs = self._capture_seqs
        return len(seqs) - bisect.bisect_right(seqs, self.acked_seq)

    def check_safeguard(self, action: OperatorAction) -> None:
        """Refuse a data-losing ``action`` while payments are not yet safe on the server."""
        check_action(action, self.unacked_payments())

    # -- the entry point -------------------------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        """Feed one event; return the effects to perform in order (Persist last)."""
        if isinstance(event, Committed | CommitFailed):
            return self._finish_commit(event)
        if self._staged is not None:
            raise InvalidState("a Persist is outstanding: feed Committed or CommitFailed first")
        self._now_ms = max(self._now_ms, event.now_ms)
        if isinstance(event, Tick):
            return self._on_tick(event.now_ms)
        if isinstance(event, Connected):
            return self._on_connected(event.now_ms)
        if isinstance(event, ConnectFailed | Disconnected):
            return self._on_link_down(event.now_ms, event.outage, event.detail)
        if isinstance(event, Received):
            self._last_rx_ms = event.now_ms
            try:
                return self._on_message(event.now_ms, event.message)
            except StorageError as exc:
                # Ops that left memory could not be read back (8.): nothing was written;
                # end the session, the next one starts over from the server's Welcome.
                detail = f"reading the log failed: {exc}"
                return [
                    Notify(ForwardingFailed("storage_failed", detail)),
                    CloseLink("storage_failed"),
                    *self._on_link_down(event.now_ms, "network", detail),
                ]
        if isinstance(event, TakePayment):
            return self._on_take_payment(event)
        if isinstance(event, VoidPayment):
            return self._on_void(event)
        if isinstance(event, ActivateOffline):
            return self._on_activate(event.now_ms)
        return self._on_resume(event.now_ms)

    def start(self, now_ms: int) -> list[Effect]:
        """Effects to perform when the shell starts: connect now."""
        return [ConnectAt(now_ms)]

    # -- commits ---------------------------------------------------------------------------

    def _stage(
        self,
        ops: list[Op],
        after_ok: list[Effect],
        after_fail: list[Effect] | None = None,
        meta: dict[str, int | str] | None = None,
        om_after: OfflineMode | None = None,
        durable: bool = True,
        archive_from: int = 0,
    ) -> list[Effect]:
        check(self._staged is None, "one staged write at a time")
        check(durable or not ops, "ops are always written durably")
        meta = dict(meta or {})
        if om_after is not None:
            meta["offline_mode"] = _om_snapshot(om_after)
        grant = False
        if archive_from:  # read before the store moves them (they may be compacted)
            moving = self.replica.range(self.server_origin, archive_from - 1, self._server_head())
            grant = any(op.kind == "grant" for op in moving)
        self._staged = _Staged(ops, meta, after_ok, after_fail or [], om_after, archive_from, grant)
        archive = (self.server_origin, archive_from) if archive_from else None
        return [Persist(tuple(ops), dict(meta), durable, archive)]

    def _finish_commit(self, event: Committed | CommitFailed) -> list[Effect]:
        staged = self._staged
        if staged is None:
            raise InvalidState("Committed/CommitFailed fed without an outstanding Persist")
        self._staged = None
        if isinstance(event, CommitFailed):
            # A waiter must not outlive a payment that was never stored.
            for payment_id in [p for p in self._waiters if p not in self.payments]:
                del self._waiters[payment_id]
            return list(staged.after_fail)
        if staged.archive_from:
            # The views keep what these ops told (statuses never move backwards); only the
            # log lets go of them, for the server's rewritten stream.
            self.archived_ops += self.replica.truncate(self.server_origin, staged.archive_from - 1)
            if staged.archives_grant:
                self._regrant()
        if staged.ops:
            result = self.replica.merge(staged.ops)
            check(len(result.applied) == len(staged.ops), "staged ops apply in full")
        mode_before = self.mode
        if staged.om_after is not None:
            self.om = staged.om_after
        effects: list[Effect] = []
        for op in staged.ops:
            effects.extend(self._apply(op))
        acked = staged.meta.get("acked_seq")
        if isinstance(acked, int):
            self.acked_seq = max(self.acked_seq, acked)
        self._compact()
        effects.extend(staged.after_ok)
        if self.mode != mode_before:
            effects.append(Notify(StatusChanged(self.mode, self.link)))
        effects.extend(self._after_change(event.now_ms))
        return effects

    def _after_change(self, now_ms: int) -> list[Effect]:
        """Follow-ups once state moved: push new ops, portal force/unforce, drain."""
        effects = self._maybe_push()
        allowed = bool(self.setting("offline_allowed", self.config.offline.allowed))
        if allowed != self.om.allowed:
            return self._om(now_ms, offline_mode.OfflineAllowedChanged(allowed), effects)
        # Each portal press of force_offline is an op of its own, acted on once: a terminal
        # that left forced offline because its link came back (rule 5 of the offline-mode
        # machine) stays online until the portal forces it again.
        entry = self.settings.get("force_offline")
        forced = None if entry is None else entry[1]
        if forced is True and self.om.mode is not Mode.OFFLINE and self._forced_by != entry:
            self._forced_by = entry
            return self._om(now_ms, offline_mode.ForcedOffline(), effects, quiet=True)
        if forced is False and self._forced_by is not None:
            self._forced_by = None
            return self._om(now_ms, offline_mode.ForcedOnline(), effects, quiet=True)
        if self.om.mode is Mode.FORWARDING and not self._stored_views and self.unsynced_ops() == 0:
            return self._om(now_ms, offline_mode.Drained(), effects)
        return effects

    # -- folding ops into views (also used on restore) -------------------------------------

    def _apply(self, op: Op) -> list[Effect]:
        # Drift was bounded where the op was accepted; here we only keep HLCs monotonic.
        self.clock.observe(op.hlc, max(self._now_ms, op.hlc.wall_ms))
        body = parse_body(op)
        if isinstance(body, Capture):
            check(len(self.payments) < PAYMENTS_MAX, "payment views are bounded")
            view = PaymentView(body.payment_id, op.seq, without_sealed_card(body))
            replaced = self.payments.get(body.payment_id)
            self.payments[body.payment_id] = view
            seqs = self._capture_seqs
            if replaced is not None:
                seqs.remove(replaced.seq)
            if not seqs or op.seq > seqs[-1]:
                seqs.append(op.seq)
            else:
                bisect.insort(seqs, op.seq)
            if body.amount.currency == self.config.currency:
                if body.channel == "offline":
                    self._offline_used_minor += body.amount.minor
                if body.expires_at_ms is not None:
                    self._stored_views[body.payment_id] = view
                    self._outstanding_minor += body.amount.minor
                    agg = self._deadlines.setdefault(body.expires_at_ms, [0, 0])
                    agg[0] += 1
                    agg[1] += body.amount.minor
            since = self.om.offline_since_ms
            if (
                body.channel == "offline"
                and since is not None
                and body.captured_at_ms >= since
                and (self._first_offline is None or self._first_offline[0] != since)
            ):
                self._first_offline = (since, body.captured_at_ms)
            return []
        if isinstance(body, ModeChange):
            if body.reason == offline_mode.FORCED_OFFLINE_REASON:
                self._forced_offline_hlc = op.hlc  # read on restore (_forced_by)
            return []  # the mode itself lives in self.om (snapshot stored beside the op)
        if isinstance(body, StatusChange):
            return self._apply_status(body)
        if isinstance(body, Setting):
            current = self.settings.get(body.key)
            if current is None or current[0] < op.hlc:
                self.settings[body.key] = (op.hlc, body.value)
                if body.key == "offline_entry":
                    self.om = replace(self.om, policy=self._entry_policy(body.value))
            return []
        if isinstance(body, Grant):
            if body.total.currency == self.config.currency and (
                self.grant_total is None or body.total > self.grant_total
            ):
                self.grant_total = body.total  # grow-only counter
            return []
        if isinstance(body, VoidRequest):
            voided = self.payments.get(body.payment_id)
            if voided is not None and op.origin == self.origin:
                voided.void_requested_at_ms, voided.void_seq = body.at_ms, op.seq
            return []
        if isinstance(body, RefundRecord):
            return self._apply_refund(body)
        return []  # disputes: recorded in the log only

    def _regrant(self) -> None:
        """The grant total from the server's current stream alone. Rights granted in ops
        the server lost (restored from a backup) may have been granted again elsewhere:
        using them could break the merchant-wide budget, so they no longer count."""
        self.grant_total = None
        try:
            stream = self.replica.ops_of(self.server_origin)
        except StorageError:
            return  # no rights until the server's next grant: the budget's safe side
        for op in stream:
            if op.kind == "grant":
                self._apply(op)

    def _entry_policy(self, value: Any) -> OfflineModePolicy:
        """The ``offline_entry`` setting as a policy; a malformed one keeps the current."""
        current = self.om.policy
        if not isinstance(value, dict):
            return current
        try:
            return OfflineModePolicy(
                offline_mode.EntryPolicy(str(value.get("policy"))),
                int(value.get("auto_delay_ms", current.auto_after_ms)),
                current.auto_on_provider_outage,
            )
        except (ValueError, TypeError, ConfigError):
            return current

    def _apply_status(self, body: StatusChange) -> list[Effect]:
        view = self.payments.get(body.payment_id)
        if view is None:
            return []  # an outcome for a payment this replica never held (e.g. wiped)
        refused = void_refused_reason(body.code)
        if refused is not None:
            # Not an outcome: the server repeats the payment's status to say it did not
            # make our void (its outcome came earlier in the same stream).
            return self._apply_void_refused(view, refused, body.message)
        before = view.status
        if (
            self.archived_ops
            and before in FINAL
            and body.status in FINAL
            and body.status is not before
        ):
            # A rewritten server stream (restored from a backup) decided again and
            # differently, e.g. expired where the lost server had it approved (the
            # processor forgot the charge's key). The first outcome stays: a status never
            # moves backwards. Someone has to look at the payment.
            return [
                Notify(
                    ForwardingFailed(
                        "status_conflict",
                        f"payment {view.payment_id} was {before.value}; the server now "
                        f"says {body.status.value} ({body.code or 'no code'}). Kept "
                        f"{before.value}: tell the provider",
                    )
                )
            ]
        view.status = join(view.status, body.status)
        if view.status == before or view.status not in FINAL:
            return []
        view.code, view.message, view.processed_at_ms = body.code, body.message, body.at_ms
        if self._stored_views.pop(view.payment_id, None) is not None:
            self._outstanding_minor -= view.capture.amount.minor
            check(self._outstanding_minor >= 0, "outstanding never goes negative")
            deadline = view.capture.expires_at_ms
            check(deadline is not None and deadline in self._deadlines, "deadline tracked")
            agg = self._deadlines[int(deadline or 0)]
            agg[0] -= 1
            agg[1] -= view.capture.amount.minor
            if agg[0] == 0:
                del self._deadlines[int(deadline or 0)]
                # Its warnings go with it: the set stays as small as the live deadlines.
                self._warned = {w for w in self._warned if w[0] != deadline}
        effects: list[Effect] = [
            Notify(
                PaymentForwarded(
                    view.payment_id,
                    view.status.value,
                    body.code,
                    view.capture.amount,
                    view.capture.channel,
                )
            )
        ]
        if view.payment_id in self._waiters:
            del self._waiters[view.payment_id]
            outcome: Outcome = "approved_online" if view.status == Status.APPROVED else "declined"
            effects.append(PaymentDecided(self._result(view, outcome, body.code, body.message)))
        return effects

    def _apply_void_refused(self, view: PaymentView, reason: str, message: str) -> list[Effect]:
        if view.void_requested_at_ms is None or view.voided_minor > 0 or view.void_refused:
            return []  # no void of ours is waiting (or it was answered already)
        view.void_refused = reason
        return [Notify(VoidRefused(view.payment_id, view.capture.amount, reason, message))]

    def _apply_refund(self, body: RefundRecord) -> list[Effect]:
        view = self.payments.get(body.payment_id)
        if view is None or body.amount.currency != view.capture.amount.currency:
            return []  # a refund of a payment this replica never held (e.g. wiped)
        if body.refund_id in view.refund_ids:
            return []  # told again by a rewritten server stream (the archive holds it)
        view.refund_ids += (body.refund_id,)
        view.refunded_minor += body.amount.minor
        if body.refund_id == VOID_REFUND_PREFIX + body.payment_id:
            view.voided_minor += body.amount.minor
            notice: Notice = PaymentVoided(
                body.payment_id, body.refund_id, body.amount, view.capture.channel
            )
        else:
            notice = PaymentRefunded(body.payment_id, body.refund_id, body.amount, view.refunded)
        return [Notify(notice)]

    def _result(self, view: PaymentView, outcome: Outcome, reason: str, msg: str) -> PaymentResult:
        cap = view.capture
        return PaymentResult(
            outcome,
            cap.amount,
            cap.payment_id,
            cap.channel,
            reason,
            msg,
            cap.expires_at_ms,
            cap.card.brand,
            cap.card.last4,
        )

    # -- mode ------------------------------------------------------------------------------

    def _om(
        self,
        now_ms: int,
        event: offline_mode.Event,
        extra: list[Effect] | None = None,
        quiet: bool = False,
        meta: dict[str, int | str] | None = None,
    ) -> list[Effect]:
        """Step the core offline-mode machine; a mode change is staged as a ``mode`` op.

        ``quiet`` swallows a :class:`Refused` (a portal setting the machine cannot honour
        now, e.g. forcing offline after the window closed): the setting stays recorded.
        ``meta`` is written durably with the mode op, or on its own if the mode is
        unchanged.
        """
        try:
            transition = offline_mode.step(self.om, event)
        except Refused:
            if quiet:
                return self._stage([], list(extra or []), meta=meta) if meta else list(extra or [])
            raise
        effects = list(extra or [])
        ops: list[Op] = []
        new = transition.machine
        for effect in transition.effects:
            if isinstance(effect, offline_mode.RecordModeChange):
                ops.append(self._mode_op(now_ms, effect, len(ops)))
            elif isinstance(effect, offline_mode.Alert | offline_mode.Prompt):
                effects.append(Notify(self._notice(effect, new)))
        if not ops:
            self.om = new
            return self._stage([], effects, meta=meta) if meta else effects
        return self._stage(ops, effects, meta=meta, om_after=new)

    def _notice(self, effect: offline_mode.Alert | offline_mode.Prompt, new: OfflineMode) -> Notice:
        if isinstance(effect, offline_mode.Prompt):
            if effect.kind is offline_mode.PromptKind.UNABLE_TO_CONNECT:
                kind: Outage = "provider" if new.outage_kind is OutageKind.PROVIDER else "network"
                return OfflinePrompt(
                    kind, "Unable to connect to network. Activate offline payments?"
                )
            stored = len(self._stored_views)
            return ResumePrompt(
                stored,
                f"Connection restored. Resume integrated payments; {stored} stored "
                "payment(s) are being forwarded.",
            )
        return ModeAlert(effect.kind.value, _ALERT_TEXT[effect.kind])

    def _mode_op(self, now_ms: int, change: offline_mode.RecordModeChange, index: int) -> Op:
        seq = self.replica.head(self.origin)[0]
        prev = self.replica.get(self.origin, seq)
        check(index == 0, "one mode change per step")
        body = ModeChange(
            change.from_mode.value, change.to_mode.value, change.reason[:128], now_ms
        ).to_body()
        return make_next(prev, self.origin, self.clock.now(now_ms), "mode", body)

    def _set_link(self, state: LinkState) -> list[Effect]:
        if state == self.link:
            return []
        self.link = state
        return [Notify(StatusChanged(self.mode, state))]

    # -- connectivity ----------------------------------------------------------------------

    def _on_connected(self, now_ms: int) -> list[Effect]:
        self._last_rx_ms = now_ms
        self._handshake_started_ms = now_ms
        effects = self._set_link("handshaking")
        effects.append(Send(protocol.Hello(self.origin, SDK_VERSION)))
        return effects

    def _backoff(self, now_ms: int) -> ConnectAt:
        exp = min(self._connect_attempts, 30)
        delay = min(self.config.reconnect_cap_ms, self.config.reconnect_base_ms * 2**exp)
        half = delay // 2
        jitter = self._jitter_ms(half)
        check(0 <= jitter <= half, "jitter_ms(n) returns 0..n")
        self._connect_attempts += 1
        return ConnectAt(now_ms + half + jitter)

    def _on_link_down(self, now_ms: int, outage: Outage, detail: str) -> list[Effect]:
        was_connected = self.link in ("connected", "handshaking")
        self._in_flight.clear()
        effects: list[Effect] = []
        for payment_id in list(self._waiters):
            del self._waiters[payment_id]
            view = self.payments[payment_id]
            effects.append(
                PaymentDecided(
                    self._result(
                        view,
                        "pending",
                        "link_lost",
                        "The payment is stored and was sent, but the link failed before "
                        "its outcome arrived; it is reported later (PaymentForwarded).",
                    )
                )
            )
        new_link: LinkState = "provider_outage" if outage == "provider" else "network_outage"
        changed = new_link != self.link
        effects.extend(self._set_link(new_link))
        if changed or was_connected:
            effects.append(Notify(OutageAlert(outage, _outage_message(outage, detail))))
        effects.append(self._backoff(now_ms))
        kind = OutageKind.PROVIDER if outage == "provider" else OutageKind.NETWORK
        return self._om(now_ms, offline_mode.ConnectivityLost(kind, now_ms), effects)

    def _on_tick(self, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        for payment_id, deadline in list(self._waiters.items()):
            if now_ms >= deadline:
                del self._waiters[payment_id]
                view = self.payments[payment_id]
                effects.append(
                    PaymentDecided(
                        self._result(
                            view,
                            "pending",
                            "outcome_timeout",
                            "The payment is stored and sent; its outcome did not arrive in "
                            "time and is reported later (PaymentForwarded).",
                        )
                    )
                )
        effects.extend(self._expiry_warnings(now_ms))
        if self.link == "handshaking" and (
            now_ms - self._handshake_started_ms >= self.config.handshake_timeout_ms
        ):
            effects.append(CloseLink("handshake timed out"))
            effects.extend(self._on_link_down(now_ms, "network", "handshake timed out"))
            return effects
        if self.link == "connected":
            if (
                self._in_flight
                and now_ms - self._in_flight[0][1] >= self.config.push_ack_timeout_ms
            ):
                # A push whose ack never came (a frame lost inside a live connection):
                # reset the link; the Welcome of the next session says what the server has.
                effects.append(CloseLink("push not acknowledged"))
                effects.extend(self._on_link_down(now_ms, "network", "push not acknowledged"))
                return effects
            if now_ms - self._last_rx_ms >= self.config.heartbeat_timeout_ms:
                effects.append(CloseLink("heartbeat timed out"))
                effects.extend(self._on_link_down(now_ms, "network", "no heartbeat"))
                return effects
            if self._push_read_failing:
                effects.extend(self._maybe_push())
            if now_ms - self._last_ping_ms >= self.config.heartbeat_interval_ms:
                self._last_ping_ms = now_ms
                self._ping_nonce += 1
                effects.append(Send(protocol.Ping(self._ping_nonce)))
        return self._om(now_ms, offline_mode.Tick(now_ms), effects)

    def _expiry_warnings(self, now_ms: int) -> list[Effect]:
        if not self._deadlines:
            return []
        expiry_ms = window_for(self.config.device_class).payment_expiry_ms
        effects: list[Effect] = []
        for deadline, (count, amount_minor) in sorted(self._deadlines.items()):
            sent = frozenset(p for d, p in self._warned if d == deadline)
            due = expiry_warnings(
                deadline - expiry_ms,
                deadline,
                now_ms,
                sent,
                self.config.warning_thresholds_percent,
            )
            if not due:
                continue
            for percent in due:
                self._warned.add((deadline, percent))
            amount = Money(amount_minor, self.config.currency)
            effects.append(Notify(ExpiryWarning(max(due), deadline, amount, count)))
        return effects

    # -- messages --------------------------------------------------------------------------

    def _on_message(self, now_ms: int, message: protocol.Message) -> list[Effect]:
        if isinstance(message, protocol.Challenge):
            nonce = crypto.b64d(message.nonce, chars_max=protocol.B64_CHARS_MAX)
            signature = self._signer.sign(crypto.challenge_message(nonce, self.origin))
            return [Send(protocol.Auth(self.origin, crypto.b64e(signature)))]
        if isinstance(message, protocol.Welcome):
            return self._on_welcome(now_ms, message)
        if isinstance(message, protocol.Ack):
            return self._on_ack(now_ms, message)
        if isinstance(message, protocol.ServerOps):
            return self._on_server_ops(now_ms, message)
        if isinstance(message, protocol.Ping):
            return [Send(protocol.Pong(message.nonce))]
        if isinstance(message, protocol.Pong):
            return []
        if isinstance(message, protocol.Error):
            return self._on_error(now_ms, message)
        raise ProtocolError(f"a terminal does not expect {message.TYPE} messages")

    def _on_error(self, now_ms: int, message: protocol.Error) -> list[Effect]:
        if message.code == "service_unavailable":
            effects: list[Effect] = [CloseLink("provider unavailable")]
            return effects + self._on_link_down(now_ms, "provider", message.message)
        notice = Notify(ForwardingFailed(message.code, message.message))
        if message.fatal:
            return [notice, CloseLink(message.code), *self._on_link_down(now_ms, "network", "")]
        self._in_flight.clear()
        self._gap_reported = message.code == "chain_gap"
        return [notice]

    def _on_welcome(self, now_ms: int, message: protocol.Welcome) -> list[Effect]:
        # The authenticated server's clock is the reference: a terminal whose clock is
        # minutes slow must still accept outcomes stamped by the server's clock.
        if message.server_time_ms > 0:  # 0: the server did not say
            self._server_offset_ms = message.server_time_ms - now_ms
        self._connect_attempts = 0
        self._last_ping_ms = now_ms
        self._server_has = max(0, message.vector.get(self.origin, 0))
        self._in_flight.clear()
        self._gap_reported = False
        effects = self._set_link("connected")
        lowered: dict[str, int | str] = {}
        if self._server_has > self.acked_seq:
            head = self.replica.head(self.origin)[0]
            self.acked_seq = min(self._server_has, head)
        elif self._server_has < self.acked_seq:
            # The server holds less of our log than it once acknowledged: it lost data
            # (restored from a backup, a failover to a lagging copy). Nothing here was
            # trimmed, so those ops go again from what it holds, and they count as
            # unacknowledged (limits, safeguards) until it acks them again.
            effects.append(
                Notify(
                    ForwardingFailed(
                        "server_behind",
                        f"the server holds our log up to #{self._server_has} but had "
                        f"acknowledged #{self.acked_seq}; sending the difference again",
                    )
                )
            )
            self.acked_seq = self._server_has
            lowered = {"acked_seq": self._server_has}
        server_stream = message.vector.get(self.server_origin)
        self._probe, self._probe_step, self._probe_passed = None, 1, False
        head = self._server_head()
        self._stream_checked = head == 0  # nothing of its stream held: nothing to check
        self._pushed_in_session = False
        # From our last op, not after it: the answer shows whether the server still holds
        # that op (one op more a session) or parted from our copy of its stream.
        pull_after = max(head - 1, 0)
        if server_stream is not None and server_stream < head:
            # It lost what it wrote for us too (docs/operations.md, "Restore from a
            # backup"). Find where its stream and ours part, starting from its own last op;
            # what we hold above that moves to the archive and its new ops take the seqs.
            effects.append(
                Notify(
                    ForwardingFailed(
                        "server_stream_behind",
                        f"the server holds its stream for this terminal up to #{server_stream}"
                        f", this terminal up to #{head}: taking the server's stream "
                        "from where they part (what this terminal holds above it is kept)",
                    )
                )
            )
            pull_after = self._probe = max(server_stream - 1, 0)
        effects.extend(self._maybe_push())
        effects.append(Send(protocol.Pull({self.server_origin: pull_after})))
        return self._om(now_ms, offline_mode.ConnectivityRestored(), effects, meta=lowered)

    def _server_head(self) -> int:
        return self.replica.head(self.server_origin)[0]

    def _maybe_push(self) -> list[Effect]:
        """Send Push frames above what the server has, up to the in-flight bound."""
        effects: list[Effect] = []
        if self.link != "connected" or self._staged is not None or not self._stream_checked:
            return effects
        head = self.replica.head(self.origin)[0]
        try:
            while len(self._in_flight) < self.config.pushes_in_flight_max:
                sent_to = self._in_flight[-1][0] if self._in_flight else 0
                start = max(self._server_has, self.acked_seq, sent_to)
                if head <= start:
                    break
                end = min(head, start + self.config.push_batch_ops_max)
                effects.append(self._push(self._push_slice(start, end)))
        except StorageError as exc:
            # Ops that left memory could not be read back (8.): tried again on the next
            # tick; the POS hears of it once a streak.
            if not self._push_read_failing:
                detail = f"reading the log failed: {exc}"
                effects.append(Notify(ForwardingFailed("storage_failed", detail)))
            self._push_read_failing = True
            self._pushed_in_session |= bool(effects)
            return effects
        self._push_read_failing = False
        if (
            not effects
            and not self._pushed_in_session
            and not self._in_flight
            and 0 < head <= self._server_has
            and self.grant_total is not None
            and self.grant_total.minor > 0
        ):
            # Nothing new, yet holding a grant: our last op again says we are back, our
            # copy of the server's stream checked (docs/protocol.md, "Back after a restore").
            effects.append(self._push(self._push_slice(head - 1, head)))
        self._pushed_in_session |= bool(effects)
        return effects

    def _push(self, ops: tuple[Op, ...]) -> Send:
        """A Push of ``ops`` (our own, chained), its head signed; counted in flight."""
        last = ops[-1]
        message = crypto.chain_head_message(self.origin, last.seq, last.digest)
        self._in_flight.append((last.seq, self._now_ms))
        return Send(protocol.Push(ops, crypto.b64e(self._signer.sign(message))))

    def _push_slice(self, start: int, end: int) -> tuple[Op, ...]:
        """Own ops start+1..end, cut short so that the Push frame stays under the limit."""
        budget = protocol.FRAME_BYTES_MAX_DEFAULT - PUSH_FRAME_ENVELOPE_BYTES
        ops: list[Op] = []
        own = self.replica.range(self.origin, start, end)  # compacted ones read back
        check(len(own) == max(end - start, 0), "the own log is contiguous")
        for op in own:
            budget -= len(op.canonical_bytes()) + PUSH_OP_OVERHEAD_BYTES
            if budget < 0 and ops:
                break
            ops.append(op)
        return tuple(ops)

    def _on_ack(self, now_ms: int, message: protocol.Ack) -> list[Effect]:
        if message.origin != self.origin:
            raise ProtocolError(f"ack for origin {message.origin!r}, not ours")
        head = self.replica.head(self.origin)[0]
        if message.seq > head:
            raise ProtocolError(f"ack of seq {message.seq} above our head {head}")
        gap, self._gap_reported = self._gap_reported, False
        if gap and message.seq < self.acked_seq:
            # The server lost ops it had acknowledged, within this session (a database
            # failover to a copy that lagged): pushing above our marker would only meet
            # chain_gap again. Reset the link; the next Welcome says what it holds.
            detail = f"the server holds #{message.seq}, below the acknowledged #{self.acked_seq}"
            return [CloseLink("server behind"), *self._on_link_down(now_ms, "network", detail)]
        self._server_has = max(self._server_has, message.seq)
        while self._in_flight and self._in_flight[0][0] <= message.seq:
            self._in_flight.pop(0)
        if message.seq <= self.acked_seq:
            return self._maybe_push()
        # Not fsynced: the server holds these ops durably and says so again in the next
        # Welcome; a lost marker only makes the terminal more cautious until then.
        return self._stage([], [], meta={"acked_seq": message.seq}, durable=False)

    def _on_server_ops(self, now_ms: int, message: protocol.ServerOps) -> list[Effect]:
        ops = sorted(message.ops, key=lambda op: op.seq)
        if any(op.origin != self.server_origin for op in ops):
            raise ProtocolError("server ops for another terminal")
        seq, digest = self.replica.head(self.server_origin)
        if self._probe is not None:
            if ops and ops[0].seq != self._probe + 1:
                self._probe_passed = True  # a push, not the answer: asked for again at the end
                return []
            return self._on_probe_answer(now_ms, message, ops)
        if ops and ops[0].seq > seq + 1:
            # Ops above a gap (e.g. a push that overtook the answer to our pull): ask for
            # what we lack instead of failing the session.
            return [Send(protocol.Pull({self.server_origin: seq}))]
        if ops and self._parts_at(ops) is not None:
            self._probe, self._probe_step = ops[0].seq - 1, 1
            return self._on_probe_answer(now_ms, message, ops)
        if not ops and seq > 0 and not self._stream_checked:
            # The answer to our first Pull (from our last op) holds nothing: the server
            # does not hold that op after all. Search where its stream and ours part.
            self._probe, self._probe_step = seq - 1, 1
            return self._on_probe_answer(now_ms, message, ops)
        known = {
            op.seq: held.digest
            for op in ops
            if op.seq <= seq and (held := self.replica.get(self.server_origin, op.seq))
        }
        plan = check_chain(seq, digest if seq else GENESIS, ops, known)
        if plan.new:
            self._check_server_batch(now_ms, message, plan.new)
        after: list[Effect] = []
        if message.more:
            after.append(Send(protocol.Pull({self.server_origin: plan.head_seq})))
        if ops and ops[-1].seq >= seq and not self._stream_checked:
            # The server's op at our head (or the one chained onto it) is ours: by the hash
            # chain our whole copy is a prefix of its stream. Pushes may go (after the
            # commit below when there is one: _after_change pushes then).
            self._stream_checked = True
            if not plan.new:
                after.extend(self._maybe_push())
        if not plan.new:
            return after
        return self._stage(list(plan.new), after)

    def _check_server_batch(
        self, now_ms: int, message: protocol.ServerOps, ops: list[Op] | tuple[Op, ...]
    ) -> None:
        """Validate server ops before anything changes: chained one to the next, bodies
        valid, not stamped in the future, the last one signed by the server."""
        for before, op in itertools.pairwise(ops):
            if op.seq != before.seq + 1 or op.prev != before.digest:
                raise ChainError(f"{op.origin}#{op.seq} does not chain to #{before.seq}")
        for op in ops:
            parse_body(op)  # validate every body before anything changes
            if op.hlc.wall_ms - (now_ms + self._server_offset_ms) > self.clock.max_drift_ms:
                raise ProtocolError(f"server op {op.seq} is stamped too far in the future")
        if ops and self.config.server_public_key is not None:
            last = ops[-1]
            crypto.verify(
                self.config.server_public_key,
                crypto.chain_head_message(self.server_origin, last.seq, last.digest),
                crypto.b64d(message.head_signature, chars_max=protocol.B64_CHARS_MAX),
            )

    def _parts_at(self, ops: list[Op]) -> int | None:
        """Where the server's contiguous ``ops`` part from our copy of its stream: the
        first seq that differs, ``ops[0].seq - 1`` (or lower) when even the first does not
        chain to ours, ``None`` when every op we also hold is the same."""
        first = ops[0]
        below = self.replica.get(self.server_origin, first.seq - 1)
        if first.prev != (below.digest if below is not None else GENESIS):
            return first.seq - 1
        head = self._server_head()
        # Ours of the same seqs, in one read if they were compacted (ops are contiguous).
        held = self.replica.range(self.server_origin, first.seq - 1, min(ops[-1].seq, head))
        for op, mine in zip(ops, held, strict=False):
            check(op.seq == mine.seq, "a server batch is contiguous")
            if mine.digest != op.digest:
                return op.seq
        return None

    def _on_probe_answer(
        self, now_ms: int, message: protocol.ServerOps, ops: list[Op]
    ) -> list[Effect]:
        """The answer to a verifying Pull (after ``self._probe``): the server's stream
        from there, to be compared with ours until the two part or ours ends."""
        head = self._server_head()
        probe = self._probe
        check(probe is not None, "probing")
        assert probe is not None
        if ops:
            self._check_server_batch(now_ms, message, ops)
        parts = self._parts_at(ops) if ops else probe
        if parts is not None and parts == (ops[0].seq - 1 if ops else probe):
            # Not even the first op chains to ours (or the server holds nothing above the
            # probe): they part lower. Look further down, twice as far each time.
            if probe == 0:
                if ops:
                    raise ChainError(f"{self.server_origin}#1 does not start the stream")
                parts = 1  # the server holds none of its stream for us
            else:
                lower = max(probe - self._probe_step, 0)
                self._probe, self._probe_step = lower, self._probe_step * 2
                return [Send(protocol.Pull({self.server_origin: lower}))]
        if parts is None:
            last = ops[-1].seq
            if last < head and message.more:
                self._probe = last  # the same so far: keep comparing
                return [Send(protocol.Pull({self.server_origin: last}))]
            if last < head:
                parts = last + 1  # the server's stream is a prefix of ours
        self._probe, self._probe_step = None, 1
        self._stream_checked = True  # found where they part (or that they do not)
        after: list[Effect] = []
        if message.more or self._probe_passed:
            # The stream from where this answer ends (a push left alone comes again).
            end = ops[-1].seq if ops else probe
            after.append(Send(protocol.Pull({self.server_origin: end})))
        self._probe_passed = False
        if parts is None or parts > head:
            new = [op for op in ops if op.seq > head]
            return self._stage(new, after) if new else after + self._maybe_push()
        new = [op for op in ops if op.seq >= parts]
        notice = Notify(
            ForwardingFailed(
                "server_stream_rewritten",
                f"the server rewrote its stream for this terminal from #{parts} (restored "
                f"from a backup); the {head - parts + 1} op(s) this terminal held from there "
                "are kept in its archive and still count",
            )
        )
        return self._stage(new, [notice, *after], archive_from=parts)

    # -- operator actions ------------------------------------------------------------------

    def _on_activate(self, now_ms: int) -> list[Effect]:
        return self._om(now_ms, offline_mode.OperatorActivate())

    def _on_resume(self, now_ms: int) -> list[Effect]:
        return self._om(now_ms, offline_mode.OperatorResume())

    # -- payments --------------------------------------------------------------------------

    def _on_take_payment(self, event: TakePayment) -> list[Effect]:
        try:
            channel, expires_at_ms = self._admit(event)
        except Refused as exc:
            refused = PaymentResult("refused", event.amount, reason=exc.reason, message=str(exc))
            return [PaymentDecided(refused)]
        if event.payment_id in self.payments:
            raise InvalidState(f"payment id {event.payment_id} is already used")
        sealed = crypto.seal_card(
            self.config.processor_public_key,
            event.card.data,
            ephemeral_private=event.ephemeral_private,
            nonce=event.nonce,
            aad=crypto.card_aad(event.payment_id),
        )
        card = CardInfo(
            event.card.brand.value,
            event.card.data.pan[-4:],
            event.entry_method.value,
            crypto.b64e(sealed),
            tuple(sorted(b.value for b in event.card.co_brands)),
        )
        capture = Capture(
            event.payment_id,
            self.config.merchant_id,
            event.amount,
            channel,
            card,
            event.now_ms,
            expires_at_ms,
            self.config.device_class.value,
            event.email,
        )
        prev = self.replica.get(self.origin, self.replica.head(self.origin)[0])
        op = make_next(
            prev, self.origin, self.clock.now(event.now_ms), "capture", capture.to_body()
        )
        view = PaymentView(event.payment_id, op.seq, capture)
        fail = PaymentResult(
            "refused",
            event.amount,
            event.payment_id,
            channel,
            "storage_failed",
            "The payment could not be stored (storage full or failing); it was NOT taken. "
            "Free space or service the terminal, then try again.",
        )
        if channel == "offline":
            ok: list[Effect] = [PaymentDecided(self._result(view, "approved_offline", "", ""))]
        else:
            if len(self._waiters) >= PENDING_WAITERS_MAX:
                raise InvalidState("too many online payments awaiting their outcome")
            self._waiters[event.payment_id] = event.now_ms + self.config.online_outcome_timeout_ms
            ok = []
        return self._stage([op], ok, [PaymentDecided(fail)])

    def business_day(self, at_ms: int) -> int:
        """The local business day of ``at_ms`` (days since the epoch at the configured
        ``utc_offset_minutes``; UTC without one)."""
        offset_ms = (self.config.utc_offset_minutes or 0) * 60_000
        return (at_ms + offset_ms) // DAY_MS

    def _on_void(self, event: VoidPayment) -> list[Effect]:
        held = self.payments.get(event.payment_id)
        try:
            view = self._check_void(event, held)
        except Refused as exc:
            amount = None if held is None else held.capture.amount
            refused = VoidResult("refused", event.payment_id, amount, exc.reason, str(exc))
            return [Notify(VoidDecided(refused))]
        body = VoidRequest(event.payment_id, event.now_ms).to_body()
        prev = self.replica.get(self.origin, self.replica.head(self.origin)[0])
        op = make_next(prev, self.origin, self.clock.now(event.now_ms), "void_request", body)
        amount = view.capture.amount
        ok = VoidResult("requested", event.payment_id, amount)
        fail = VoidResult(
            "refused",
            event.payment_id,
            amount,
            "storage_failed",
            "The void could not be stored (storage full or failing); it was NOT requested.",
        )
        return self._stage([op], [Notify(VoidDecided(ok))], [Notify(VoidDecided(fail))])

    def _check_void(self, event: VoidPayment, view: PaymentView | None) -> PaymentView:
        """The R9 void rules as the terminal can check them; raises :class:`Refused`."""
        if view is None:
            raise Refused("not_found", f"No payment {event.payment_id} on this terminal.")
        channel = view.capture.channel
        if view.status not in FINAL:
            raise Refused(
                "not_processed",
                "This payment is not processed yet; it cannot be voided or refunded before "
                "its outcome is known.",
            )
        if channel != "standalone":
            raise Refused(
                "not_standalone",
                f"Only standalone payments are voided on the terminal; this one is {channel}. "
                "Refund it from the POS or the portal.",
            )
        if view.status != Status.APPROVED:
            raise Refused(
                "not_approved", f"This payment was not charged ({view.status.value}); no void."
            )
        if view.void_refused:
            raise Refused(
                "void_refused",
                f"The server refused to void this payment ({view.void_refused}); refund it "
                "from the POS or the portal.",
            )
        if view.void_requested_at_ms is not None or view.voided_minor > 0:
            raise Refused(
                "already_voided", "This payment is already voided (or its void is on its way)."
            )
        if view.refunded_minor >= view.capture.amount.minor:
            raise Refused("already_refunded", "This payment is already fully refunded.")
        if self.business_day(view.capture.captured_at_ms) != self.business_day(event.now_ms):
            raise Refused(
                "not_same_day",
                "Only payments of today can be voided on the terminal; refund this one from "
                "the POS or the portal.",
            )
        return view

    def _admit(self, event: TakePayment) -> tuple[str, int | None]:
        """Decide the channel and the expiry of a payment, or raise :class:`Refused`."""
        if len(self.payments) >= PAYMENTS_MAX:
            # Refused here, before anything is stored: a capture stored past the bound
            # would fail the check in _apply on every later open of the terminal.
            raise Refused(
                "terminal_full",
                f"This terminal holds {len(self.payments):,} payments, the most it can; "
                "take payments on another terminal and contact support.",
            )
        if event.amount.currency != self.config.currency:
            raise Refused(
                "currency_not_supported",
                f"This terminal takes {self.config.currency}, not {event.amount.currency}.",
            )
        if not event.amount.is_positive():
            raise Refused("amount_not_positive", "Enter an amount above zero.")
        if event.email is not None and not is_one_email_address(event.email):
            raise Refused(
                "invalid_email",
                "Enter one email address for the receipt, like name@example.com, or none.",
            )
        mode = self.om.mode
        if mode in _CONNECTED_MODES and self.link != "connected" and not self.offline_allowed:
            raise Refused(
                "offline_not_allowed",
                "The terminal is not connected and offline payments are not allowed; "
                "reconnect, or ask an administrator to allow offline payments.",
            )
        if mode in _CONNECTED_MODES:
            if self.link != "connected":
                raise Refused(
                    "not_connected",
                    "The terminal is not connected to the payment service yet; try again in "
                    "a moment.",
                )
            return ("standalone" if event.standalone else "integrated"), None
        if mode is Mode.WINDOW_CLOSED:
            raise Refused(
                "offline_window_closed",
                "The offline window of this terminal has closed; reconnect it to the network "
                "before taking more payments. Stored payments are kept.",
            )
        if not self.offline_allowed:
            raise Refused(
                "offline_not_allowed",
                "The terminal is offline and offline payments are not allowed; reconnect, "
                "or ask an administrator to allow offline payments.",
            )
        if not self.om.accepts_offline_payments:
            raise Refused(
                "offline_not_activated",
                "The terminal is offline; activate offline payments first.",
            )
        since = self.om.offline_since_ms
        check(since is not None, "offline mode has a window anchor")
        anchor = int(since or 0)
        # Between ticks the window may have closed: the core check is the last word.
        check_offline_window_open(self.config.device_class, anchor, event.now_ms)
        rules = self._rules()
        rules.check(
            Card(event.card.brand, event.entry_method, event.card.co_brands, event.card.is_gift)
        )
        check_capture(self.limits(), self._outstanding(), event.amount)
        budget = self._budget()
        if budget is not None:
            budget.check_capture(event.amount)  # Refused("over_merchant_budget", ...)
        first = event.now_ms
        if self._first_offline is not None and self._first_offline[0] == anchor:
            first = self._first_offline[1]
        lost = self.om.connectivity_lost_at_ms
        lost = anchor if lost is None else min(lost, anchor)
        expires = payment_expires_at_ms(self.config.device_class, lost, max(first, lost))
        return "offline", expires

    def _rules(self) -> RuleSet:
        names = self.setting("rules", None)
        if isinstance(names, list):
            try:
                return RuleSet.from_names(self.config.region.value, [str(n) for n in names])
            except ConfigError:
                pass
        return RuleSet(self.config.region, self.config.rules)


_ALERT_TEXT: dict[offline_mode.AlertKind, str] = {
    offline_mode.AlertKind.NETWORK_OUTAGE: "Unable to connect to network; check the internet "
    "connection.",
    offline_mode.AlertKind.PROVIDER_OUTAGE: "The payment service is unavailable (provider "
    "outage); the local network works.",
    offline_mode.AlertKind.OFFLINE_ACTIVATED: "Offline payments are active: payments are "
    "stored and forwarded when the connection returns.",
    offline_mode.AlertKind.OFFLINE_WINDOW_CLOSED: "The offline window has closed: no new "
    "offline payments. Stored payments are kept; reconnect to forward them.",
    offline_mode.AlertKind.CONNECTIVITY_RESTORED: "Connection restored; stored payments are "
    "being forwarded.",
}


def _om_snapshot(om: OfflineMode) -> str:
    """The offline-mode machine as canonical JSON, stored beside each mode op."""
    return canonical.dumps(
        {
            "mode": om.mode.value,
            "allowed": om.allowed,
            "clock_ms": om.clock_ms,
            "outage_kind": None if om.outage_kind is None else om.outage_kind.value,
            "lost_at_ms": om.connectivity_lost_at_ms,
            "offline_since_ms": om.offline_since_ms,
        }
    ).decode()


def _om_from_snapshot(text: str, config: TerminalConfig) -> OfflineMode:
    data = canonical.loads(text.encode())
    kind = data["outage_kind"]
    return OfflineMode(
        Mode(data["mode"]),
        config.device_class,
        config.policy,
        bool(data["allowed"]),
        int(data["clock_ms"]),
        None if kind is None else OutageKind(kind),
        data["lost_at_ms"],
        data["offline_since_ms"],
    )


def _outage_message(outage: Outage, detail: str) -> str:
    if outage == "provider":
        return (
            "The payment service is unavailable (provider outage); the local network works. "
            f"Offline payments may be used. {detail}"
        ).strip()
    return f"Unable to connect to network; check the internet connection. {detail}".strip()
