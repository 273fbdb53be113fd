"""The public SDK a POS app embeds: :class:`Terminal`.

A thin shell: it reads the clock and the random source, feeds :class:`TerminalMachine`
events and performs its effects -- durable writes to the :class:`Store`, frames on the
:class:`SyncClient`, timers, and notices to the POS listeners. All policy is in the
machine. See docs/sdk.md for a POS integration example.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from syncengine.core import crypto, protocol
from syncengine.core.errors import ConfigError, InvalidState, ProtocolError, StorageError
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.core.policy.safeguards import OperatorAction, flush_offered
from syncengine.files import lock_exclusive
from syncengine.node.client import OPEN_TIMEOUT_MS_DEFAULT, SyncClient
from syncengine.node.machine import (
    ActivateOffline,
    CardRead,
    CloseLink,
    CommitFailed,
    Committed,
    ConnectAt,
    Effect,
    Event,
    Notice,
    Notify,
    PaymentDecided,
    PaymentResult,
    PaymentView,
    Persist,
    ResumeIntegrated,
    Send,
    TakePayment,
    TerminalConfig,
    TerminalMachine,
    TerminalStatus,
    Tick,
    VoidDecided,
    VoidPayment,
    VoidResult,
)
from syncengine.node.store import Store

TICK_INTERVAL_MS_DEFAULT = 200
FLUSH_TIMEOUT_MS_DEFAULT = 10_000
LISTENERS_MAX = 64
#: Beside the database: the lock that keeps it to one open Terminal (see Terminal.open).
LOCK_SUFFIX = ".lock"

#: POSTs the request to the server (see :func:`syncengine.node.enroll.http_enroller`) and
#: returns the server's JSON answer (or None): its ``server_public_key``,
#: ``processor_public_key`` and ``merchant_id`` are kept in the terminal database.
Enroller = Callable[[protocol.EnrollRequest], Awaitable[dict[str, Any] | None]]
Listener = Callable[[Notice], None]


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (the real clock; inject another to test)."""
    return time.time_ns() // 1_000_000


def _with_enrolled_keys(config: TerminalConfig, store: Store) -> TerminalConfig:
    """Fill what the enrollment answer delivered into ``config``.

    The server's Ed25519 key (verifies ServerOps) and the processor's X25519 key (seals card
    data) come from the server at enrollment; a key given in ``config`` wins (pinning), an
    empty ``processor_public_key`` or a None ``server_public_key`` is taken from the answer.
    The merchant id must agree with the server's, or every capture would be refused.
    """
    changes: dict[str, Any] = {}
    server_key = store.get_meta("enrolled_server_public_key")
    if config.server_public_key is None and server_key:
        changes["server_public_key"] = crypto.b64d(server_key)
    processor_key = store.get_meta("enrolled_processor_public_key")
    if not config.processor_public_key:
        if not processor_key:
            raise ConfigError(
                "no processor public key: give TerminalConfig.processor_public_key, or enroll "
                "with a server that delivers it"
            )
        changes["processor_public_key"] = crypto.b64d(processor_key)
    merchant = store.get_meta("enrolled_merchant_id")
    if merchant and not config.merchant_id:
        changes["merchant_id"] = merchant
    elif merchant and merchant != config.merchant_id:
        raise ConfigError(
            f"this terminal was enrolled for merchant {merchant!r}, not {config.merchant_id!r}; "
            "fix TerminalConfig.merchant_id (or leave it empty to use the enrolled one)"
        )
    if len(changes.get("processor_public_key", b"\0" * crypto.KEY_BYTES)) != crypto.KEY_BYTES:
        raise ProtocolError("the processor public key from enrollment is not 32 bytes")
    return replace(config, **changes) if changes else config


@dataclass(frozen=True, slots=True)
class ZReport:
    """End-of-day totals since the last reset (R10), per channel and per status.

    ``total`` and ``by_channel`` are net of the voids done in the period (``voided``,
    ``void_count``); ``gross`` is before them. ``by_status`` is per payment status, gross.
    """

    since_seq: int
    count: int
    total: Money
    by_channel: dict[str, Money] = field(default_factory=dict)
    by_status: dict[str, Money] = field(default_factory=dict)
    gross: Money | None = None
    voided: Money | None = None
    void_count: int = 0


_collector_lock = threading.Lock()
_collector_pauses = 0  # opens reading their log back right now, in any thread
_collector_was_enabled = False  # the collector's state before the first of them


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the whole log is read back.

    Reading back makes objects for every op and keeps all of them, so each collection the
    allocations set off walks everything made so far again: about 40% of a reopen of 50,000
    payments. What is read back forms no garbage cycles. Several terminals may be opened at
    once, each reading in a thread of its own: the first pause saves the collector's state
    and the last one to end restores it (it runs as usual afterwards).
    """
    global _collector_pauses, _collector_was_enabled
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_enabled:
                gc.enable()


class Terminal:
    """A payment terminal: takes payments online or offline and keeps them safe.

    Create it with :meth:`open`, then ``await terminal.start()``. Methods are called from
    the event loop that started it.
    """

    def __init__(
        self,
        store: Store,
        machine: TerminalMachine,
        server_url: str,
        *,
        clock_ms: Callable[[], int],
        random_bytes: Callable[[int], bytes],
        tick_interval_ms: int,
        open_timeout_ms: int,
    ) -> None:
        self.store = store
        self.machine = machine
        self.server_url = server_url
        self._clock_ms = clock_ms
        self._random = random_bytes
        self._tick_interval_ms = tick_interval_ms
        self._client = SyncClient(server_url, self._feed, clock_ms, open_timeout_ms=open_timeout_ms)
        self._listeners: list[Listener] = []
        self._waiting: dict[str, asyncio.Future[PaymentResult]] = {}
        self._void_decided: VoidResult | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        self._last_decided: PaymentResult | None = None
        self._storage_error: StorageError | None = None
        self._lock: IO[str] | None = None  # one open Terminal per database, see open()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        config: TerminalConfig,
        server_url: str,
        *,
        enrollment_code: str | None = None,
        enroll: Enroller | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        random_bytes: Callable[[int], bytes] = os.urandom,
        tick_interval_ms: int = TICK_INTERVAL_MS_DEFAULT,
        open_timeout_ms: int = OPEN_TIMEOUT_MS_DEFAULT,
    ) -> Terminal:
        """Open (or create and enroll) the terminal whose database is at ``path``.

        On first use a new Ed25519 key is made and stored, and ``enroll`` is awaited with
        an :class:`EnrollRequest` carrying ``enrollment_code`` (it should POST it to the
        server). Reopening gives back every stored payment; the terminal id must match.

        Timers (reconnect delays, outcome waits, expiry) follow ``clock_ms``, looked at
        every ``tick_interval_ms`` of real time: it may be offset or run fast (a simulation).

        One ``Terminal`` at a time per database, in any process: while one is open (until
        :meth:`close`, or its process ends) another ``open`` of the same path raises
        :class:`InvalidState`. Two at once would each number the next payment alike, and
        the second to store it would fail every payment after that.
        """
        lock = lock_exclusive(Path(f"{path}{LOCK_SUFFIX}"))
        if lock is None:
            raise InvalidState(
                f"the terminal database {path} is already open (by this process or "
                "another); close that Terminal first: one Terminal per database"
            )
        try:
            store = Store(path)
        except BaseException:
            lock.close()
            raise
        try:
            key = await cls._identity(store, config, enrollment_code, enroll, random_bytes)
            config = _with_enrolled_keys(config, store)
            snapshot = store.get_meta("offline_mode") or ""
            acked = int(store.get_meta("acked_seq") or 0)
            now = clock_ms()

            def jitter(n: int) -> int:
                return int.from_bytes(random_bytes(4), "big") % (n + 1) if n > 0 else 0

            def restore() -> TerminalMachine:
                with _collector_paused():
                    # The log a page at a time; what the replica may let go of leaves
                    # memory as it goes and is read back from the store when needed.
                    return TerminalMachine.restore(
                        config,
                        key,
                        jitter,
                        now,
                        store.iter_log(config.terminal_id),
                        acked,
                        snapshot,
                        archived=store.load_archived_ops(),
                        reader=store.read_ops,
                    )

            # Seconds for a long history: read in a worker thread, so the application's
            # event loop goes on meanwhile. Cancelled, the open still waits for the reader
            # to finish before the store is closed under it.
            reading = asyncio.ensure_future(asyncio.to_thread(restore))
            try:
                machine = await asyncio.shield(reading)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await reading
                raise
        except BaseException:
            store.close()
            lock.close()
            raise
        terminal = cls(
            store,
            machine,
            server_url,
            clock_ms=clock_ms,
            random_bytes=random_bytes,
            tick_interval_ms=tick_interval_ms,
            open_timeout_ms=open_timeout_ms,
        )
        terminal._lock = lock
        return terminal

    @staticmethod
    async def _identity(
        store: Store,
        config: TerminalConfig,
        code: str | None,
        enroll: Enroller | None,
        random_bytes: Callable[[int], bytes],
    ) -> bytes:
        stored_id = store.get_meta("terminal_id")
        if stored_id is not None and stored_id != config.terminal_id:
            raise InvalidState(
                f"this database belongs to terminal {stored_id}, not {config.terminal_id}; "
                "use its own database or factory-reset it first"
            )
        key_text = store.get_meta("signing_key")
        if key_text is None:
            key = random_bytes(crypto.KEY_BYTES)
            store.set_meta(
                {
                    "terminal_id": config.terminal_id,
                    "merchant_id": config.merchant_id,
                    "signing_key": crypto.b64e(key),
                    "enrollment": "pending",
                }
            )
        else:
            key = crypto.b64d(key_text)
        if store.get_meta("enrollment") != "enrolled" and code is not None and enroll is not None:
            request = protocol.EnrollRequest(
                config.terminal_id,
                code,
                crypto.b64e(crypto.ed25519_public_from_private(key)),
                config.device_class.value,
            )
            answer = await enroll(request)
            meta = {"enrollment": "enrolled"}
            for name in ("server_public_key", "processor_public_key", "merchant_id"):
                value = (answer or {}).get(name)
                if isinstance(value, str) and value:
                    meta["enrolled_" + name] = value
            store.set_meta(meta)
        return key

    @property
    def config(self) -> TerminalConfig:
        """The configuration in force (keys and merchant from enrollment filled in)."""
        return self.machine.config

    @property
    def public_key(self) -> bytes:
        """The terminal's Ed25519 public key (what the server enrolls)."""
        return crypto.ed25519_public_from_private(self.machine._key)

    async def start(self) -> None:
        """Start syncing: connect, tick timers, reconnect with backoff."""
        if self._ticker is not None:
            return
        self._run(self.machine.start(self._clock_ms()))
        self._ticker = asyncio.create_task(self._tick_loop())

    async def close(self) -> None:
        """Stop syncing and close the database. Stored payments stay on disk."""
        await self._stop()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [self._ticker, self._connect_task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._client.close()
        self.store.close()

    async def __aenter__(self) -> Terminal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the effect loop -------------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        if self._closed:
            return
        self._run(self.machine.handle(event))

    def _run(self, effects: list[Effect]) -> None:
        queue: deque[Effect] = deque(effects)
        while queue:
            effect = queue.popleft()
            if isinstance(effect, Persist):
                now = self._clock_ms()
                try:
                    self.store.write(
                        effect.ops, effect.meta, durable=effect.durable, archive=effect.archive
                    )
                except StorageError as exc:
                    self._storage_error = exc
                    queue.extend(self.machine.handle(CommitFailed(now, str(exc))))
                    continue
                queue.extend(self.machine.handle(Committed(now)))
            elif isinstance(effect, Send):
                self._client.send(effect.message)
            elif isinstance(effect, CloseLink):
                self._spawn(self._client.close())
            elif isinstance(effect, ConnectAt):
                self._schedule_connect(effect.at_ms)
            elif isinstance(effect, PaymentDecided):
                self._decide(effect.result)
            else:
                if isinstance(effect.notice, VoidDecided):
                    self._void_decided = effect.notice.result
                self._notify(effect)

    def _decide(self, result: PaymentResult) -> None:
        self._last_decided = result
        if result.payment_id is None:
            return
        future = self._waiting.pop(result.payment_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _notify(self, effect: Notify) -> None:
        for listener in list(self._listeners):
            try:
                listener(effect.notice)
            except Exception:  # a broken UI callback must not break payments
                continue

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def wrapper() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(wrapper())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule_connect(self, at_ms: int) -> None:
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()

        async def later() -> None:
            # Waited out on the terminal's clock, looked at again at least every tick: a
            # clock that runs fast (a simulation) or jumps is followed, not real seconds.
            while (delay_ms := at_ms - self._clock_ms()) > 0:
                await asyncio.sleep(min(delay_ms, self._tick_interval_ms) / 1000)
            await self._client.connect()

        self._connect_task = asyncio.get_running_loop().create_task(later())

    async def _tick_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._tick_interval_ms / 1000)
            self._feed(Tick(self._clock_ms()))

    # -- payments --------------------------------------------------------------------------

    async def take_payment(
        self,
        amount: Money,
        card: CardRead,
        entry_method: EntryMethod,
        email: str | None = None,
        *,
        standalone: bool = False,
    ) -> PaymentResult:
        """Take a card payment.

        Returns ``approved_online``, ``approved_offline`` (durably stored before this
        returns), ``declined``, ``pending`` (stored and sent; the outcome arrives later as
        a ``PaymentForwarded`` notice) or ``refused`` with a reason. Raises
        :class:`StorageError` if the payment could not be stored (disk full): it was not
        taken and nothing stored earlier is affected.
        """
        if self._closed:
            raise InvalidState("the terminal is closed")
        now = self._clock_ms()
        payment_id = new_payment_id(now, self._random(PAYMENT_ID_RANDOM_BYTES))
        event = TakePayment(
            now,
            payment_id,
            amount,
            card,
            EntryMethod(entry_method),
            self._random(crypto.KEY_BYTES),
            self._random(crypto.NONCE_BYTES),
            email,
            standalone,
        )
        self._storage_error = None
        self._last_decided = None
        future: asyncio.Future[PaymentResult] = asyncio.get_running_loop().create_future()
        self._waiting[payment_id] = future
        try:
            self._feed(event)
            if self._storage_error is not None and not future.done():
                raise self._storage_error
            if future.done():
                result = future.result()
            elif self._last_decided is not None and self._last_decided.payment_id is None:
                result = self._last_decided  # refused before an id was used
            else:
                bound_s = self.machine.config.online_outcome_timeout_ms / 1000 + 5
                result = await asyncio.wait_for(asyncio.shield(future), bound_s)
        finally:
            self._waiting.pop(payment_id, None)
        if result.outcome == "refused" and result.reason == "storage_failed":
            raise self._storage_error or StorageError(result.message)
        return result

    async def void_payment(self, payment_id: str) -> VoidResult:
        """Void a same-day standalone payment of this terminal (R9; docs/sdk.md).

        Returns ``requested`` once the void request is stored durably (it is sent to the
        server, which makes a full refund; the terminal hears it as a ``PaymentVoided``
        notice and ``history()`` shows it), or ``refused`` with a reason (``not_found``,
        ``not_processed``, ``not_standalone``, ``not_approved``, ``already_voided``,
        ``already_refunded``, ``not_same_day``). Raises :class:`StorageError` if the request
        could not be stored.
        """
        if self._closed:
            raise InvalidState("the terminal is closed")
        self._storage_error = None
        self._void_decided = None
        self._feed(VoidPayment(self._clock_ms(), payment_id))
        result = self._void_decided
        self._void_decided = None
        if result is None:
            raise InvalidState("the void was not decided")  # the machine always answers
        if result.outcome == "refused" and result.reason == "storage_failed":
            raise self._storage_error or StorageError(result.message)
        return result

    # -- status, operator actions ----------------------------------------------------------

    def status(self) -> TerminalStatus:
        """Mode, network state, pending count/amount, max offline amount, time left."""
        return self.machine.status(self._clock_ms())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(notice)`` for every UI notice; returns an unsubscribe function."""
        if len(self._listeners) >= LISTENERS_MAX:
            raise InvalidState(f"at most {LISTENERS_MAX} listeners")
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def activate_offline(self) -> None:
        """The operator accepted "Activate offline payments" (raises Refused if not allowed)."""
        self._run(self.machine.handle(ActivateOffline(self._clock_ms())))

    def resume_integrated(self) -> None:
        """The operator pressed "Resume integrated payments"."""
        self._run(self.machine.handle(ResumeIntegrated(self._clock_ms())))

    async def flush(self, timeout_ms: int = FLUSH_TIMEOUT_MS_DEFAULT) -> bool:
        """Wait until every payment is acknowledged by the server; False on timeout."""
        deadline = self._clock_ms() + timeout_ms
        while self.machine.unacked_payments() > 0:
            if self._clock_ms() >= deadline:
                return False
            if self.machine.link != "connected" and (
                self._connect_task is None or self._connect_task.done()
            ):
                self._schedule_connect(self._clock_ms())
            await asyncio.sleep(0.02)
        return True

    async def _guard(self, action: OperatorAction, flush_timeout_ms: int) -> None:
        if self.machine.unacked_payments() > 0 and flush_offered(action):
            await self.flush(flush_timeout_ms)
        self.machine.check_safeguard(action)

    async def logout(self, flush_timeout_ms: int = FLUSH_TIMEOUT_MS_DEFAULT) -> None:
        """Log the operator out; refused (Refused "payments_pending") unless a flush completes."""
        await self._guard(OperatorAction.LOGOUT, flush_timeout_ms)
        self.store.delete_meta("operator")

    async def switch_location(
        self, location_id: str, flush_timeout_ms: int = FLUSH_TIMEOUT_MS_DEFAULT
    ) -> None:
        """Move the terminal to another location; refused while payments are pending."""
        await self._guard(OperatorAction.SWITCH_LOCATION, flush_timeout_ms)
        self.store.set_meta({"location_id": location_id})

    async def factory_reset(self) -> None:
        """Erase the terminal's database; refused while any payment is not on the server."""
        self.machine.check_safeguard(OperatorAction.FACTORY_RESET)
        path = self.store.path
        await self._stop()
        try:  # still locked: no other Terminal opens the files being erased
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(path) + suffix).unlink()
        finally:
            self._unlock()

    # -- reporting -------------------------------------------------------------------------

    def history(self) -> list[PaymentView]:
        """Every payment on this terminal, in capture order (no card numbers, ever)."""
        return self.machine.history()

    def z_report(self) -> ZReport:
        """Totals of payments taken since the last :meth:`reset_z_report`."""
        since = int(self.store.get_meta("z_reset_seq") or 0)
        currency = self.machine.config.currency
        total = Money.zero(currency)
        by_channel: dict[str, Money] = {}
        by_status: dict[str, Money] = {}
        voided = Money.zero(currency)
        count = void_count = 0
        for view in self.machine.history():
            channel = view.capture.channel
            if view.voided_minor > 0 and (view.void_seq or view.seq) > since:
                # a void counts in the period it was done (normally the payment's own)
                void_count += 1
                voided = voided + view.voided
                by_channel[channel] = by_channel.get(channel, Money.zero(currency)) - view.voided
            if view.seq <= since:
                continue
            amount = view.capture.amount
            count += 1
            total = total + amount
            by_channel[channel] = by_channel.get(channel, Money.zero(currency)) + amount
            status = view.status.value
            by_status[status] = by_status.get(status, Money.zero(currency)) + amount
        return ZReport(
            since, count, total - voided, by_channel, by_status, total, voided, void_count
        )

    def reset_z_report(self) -> ZReport:
        """Close the day: return the Z-report and start the next one from now."""
        report = self.z_report()
        head = self.machine.replica.head(self.machine.origin)[0]
        self.store.set_meta({"z_reset_seq": head})
        return report
