"""The sync server's ASGI app: ``/sync`` websocket, REST API, health, metrics, OpenAPI.

:class:`SyncServer` wires the pieces: a :class:`~syncengine.server.store.Store` (SQLite
under ``data_dir`` by default) run off the event loop, one
:class:`~syncengine.server.merge.ServerMachine` per websocket session, the
:class:`~syncengine.server.forwarder.Forwarder`, the scheduled :class:`Jobs`, refunds and
receipts. Its ``app`` is a Starlette application; run it with uvicorn using the
``websockets`` implementation (``syncengine serve`` does).

REST authentication: ``Authorization: Bearer <api key>``. Keys carry a role; owners and
managers administer (offline mode, limits, liability, enrollment codes), cashiers read
and refund. Enrollment (``POST /v1/enroll``) is authenticated by its one-time code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from syncengine.core import canonical, crypto, protocol
from syncengine.core.errors import (
    ConfigError,
    MoneyError,
    ProtocolError,
    Refused,
    StorageError,
    SyncEngineError,
)
from syncengine.core.money import Money
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.limits import OfflineLimits
from syncengine.files import load_or_create_key_file, write_private_file
from syncengine.httpbody import BodyTooLarge, read_body
from syncengine.processor.api import Processor
from syncengine.server.budget import escrow_json, plan_grants
from syncengine.server.cli import DB_FILE, SERVER_KEY_FILE
from syncengine.server.forwarder import Forwarder, ForwarderConfig
from syncengine.server.group import GroupCommitter, GroupFailed
from syncengine.server.jobs import Jobs, JobsConfig
from syncengine.server.merge import (
    Close,
    Effect,
    LoadChain,
    LoadServerOps,
    LoadTerminal,
    MarkSeen,
    Send,
    ServerMachine,
    SessionLimits,
    State,
    StoreBatch,
)
from syncengine.server.model import (
    ADMIN_ROLES,
    OFFLINE_AUTO_DELAY_MS_DEFAULT,
    OFFLINE_AUTO_DELAY_MS_MAX,
    OFFLINE_ENTRY_POLICIES,
    RESOLVE_ACTIONS,
    REVOKE_ALREADY,
    REVOKE_LAST_OWNER,
    REVOKE_UNKNOWN,
    ApiKey,
    BatchStored,
    MergeBatch,
    PaymentFilter,
    Resolution,
    Role,
    TerminalSettings,
    pressed_settings,
)
from syncengine.server.openapi import OPENAPI
from syncengine.server.receipts import ReceiptConfig, ReceiptSender
from syncengine.server.refunds import Refunds
from syncengine.server.reports import (
    close_at_ms,
    day_bounds_ms,
    parse_close_time,
    reconcile,
    zone,
)
from syncengine.server.reports import now_utc_ms as _now_utc_ms
from syncengine.server.store import Store, StoreRunner
from syncengine.server.store.rules import (
    FORWARDING_STATES,
    LIST_ROWS_MAX,
    REFUND_LIST_STATES,
    REFUND_RESOLVE_ACTIONS,
)
from syncengine.server.store.sqlite import SqliteStore

log = logging.getLogger("syncengine.server")

OWNER_KEY_FILE = "owner-api-key.txt"
API_KEY_PREFIX = "sk_"
API_KEYS_LIVE_MAX = 500  # live API keys per merchant; POST /v1/api-keys refuses more
API_KEYS_LIST_MAX = 1_000  # keys GET /v1/api-keys returns (every live one, then revoked)
API_KEY_NAME_CHARS_MAX = 64
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``syncengine serve`` can set. Times in ms, sizes in bytes."""

    data_dir: Path
    processor_url: str | None = None
    merchant_id: str = "merchant-1"
    currency: str = "USD"
    session: SessionLimits = field(default_factory=SessionLimits)
    handshake_timeout_ms: int = 10_000
    idle_timeout_ms: int = 300_000
    # Websocket sessions this process serves at once; one more is answered
    # service_unavailable (terminals back off and retry, as in a provider outage). Each
    # costs a task and a store read before it authenticates: this bounds a flood of them.
    sessions_max: int = 10_000
    enrollment_code_ttl_ms: int = 24 * 3_600_000
    request_body_bytes_max: int = 64 * 1024
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    receipts: ReceiptConfig = field(default_factory=ReceiptConfig)
    run_background: bool = True  # forwarder + scheduled jobs
    maintenance: bool = False  # /sync answers service_unavailable (a provider outage, R4)
    budget_interval_ms: int = 5_000  # escrow re-grant sweep (also run at once on outcomes)
    # How often a process reads the shared maintenance switch (another process may turn it)
    maintenance_poll_ms: int = 1_000
    # The store's gauges on /metrics are read at most this often (some scan history);
    # scrapes in between get the last reading.
    metrics_counts_max_age_ms: int = 5_000
    # /health says "degraded" once the forwarder has kept failing with unexpected errors
    # this long without one attempt going through (payments wait; a person is needed).
    health_forwarder_failing_ms: int = 60_000


class Coalesced:
    """Run an async job on demand, one run at a time; demands made while it runs become
    one more run after it, however many they are.

    Each forwarded outcome wants its receipt sent and each void wants the refund job: a
    task per demand piled up behind the job's lock (thousands during a drain).
    """

    def __init__(self, name: str, job: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.runs = 0  # how many times the job ran
        self._job = job
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def kick(self) -> None:
        """Ask for a run: now if none runs, else once more after the current one."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            self.runs += 1
            try:
                await self._job()
            except Exception:  # logged; the next demand runs it again
                log.exception("%s failed", self.name)
            if not self._again:
                return

    async def stop(self) -> None:
        """Cancel a run in progress and wait for it to end."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ApiError(Exception):
    """An HTTP error with a stable code and a message saying what to do next."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def hash_secret(secret: str) -> str:
    """SHA-256 of an API key or enrollment code: the only form stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def load_or_create_server_key(data_dir: Path) -> crypto.Ed25519KeyPair:
    """The server's Ed25519 key (signs ``ServerOps``), created 0600 on first start.

    Several processes may start at once on one shared ``data_dir`` (scale-out): the new key
    is written to a private temporary file and *linked* into place, which fails if another
    process got there first; then everyone reads the one key that won. Terminals verify
    every batch of server ops against it, so two keys would be refused.
    """
    key = load_or_create_key_file(
        data_dir / SERVER_KEY_FILE, crypto.KEY_BYTES, lambda: os.urandom(crypto.KEY_BYTES)
    )
    return crypto.Ed25519KeyPair.from_private(key)


class SyncServer:
    """The sync server: build it, then serve ``server.app`` with uvicorn."""

    def __init__(
        self,
        config: ServerConfig,
        processor: Processor | None = None,
        store: Store | None = None,
        clock_ms: Callable[[], int] = _now_utc_ms,
    ) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.store: Store = store or SqliteStore(config.data_dir / DB_FILE)
        # SQLite: one store thread; a pooled store (PostgreSQL) says how many it can use.
        self.run_store = StoreRunner(self.store, getattr(self.store, "threads_max", 1))
        # One transaction for many terminals' frames where the store can (SQLite: one
        # writer, so grouping saves commits); a pooled store commits each on its own.
        group = getattr(self.store, "group", None)
        alive = getattr(self.store, "in_transaction", None)
        self._counts_cache: tuple[float, dict[str, int]] | None = None
        self._counts_lock = asyncio.Lock()
        self.grouper: GroupCommitter | None = (
            GroupCommitter(self.run_store, group, alive)
            if group is not None and alive is not None
            else None
        )
        self.server_key = load_or_create_server_key(config.data_dir)
        self._signer = crypto.Signer(self.server_key.private)  # shared by every session
        self._processor = processor
        self._owns_processor = False
        self.bootstrap_api_key: str | None = None
        self.owner = f"server-{os.getpid()}-{secrets.token_hex(4)}"
        self.metrics: dict[str, int] = {
            "sessions_active": 0,
            "sessions_total": 0,
            "sessions_refused_total": 0,
            "ops_merged_total": 0,
            "ops_duplicate_total": 0,
            "batches_acked_total": 0,
            "server_streams_behind_total": 0,
        }
        self._sessions: dict[str, set[asyncio.Event]] = {}
        self._revoked: set[str] = set()  # revoked here: their live sessions end when woken
        self._all_wakes: set[asyncio.Event] = set()
        self.forwarder: Forwarder | None = None
        self.refunds: Refunds | None = None
        self.receipts = ReceiptSender(self.store, self.run_store, config.receipts, clock_ms)
        self._receipts_kick = Coalesced("sending receipts", self.receipts.send_due)
        self._voids_kick = Coalesced("acting on voids", self._retry_refunds)
        self.jobs: Jobs | None = None
        self.maintenance = config.maintenance
        self._processor_key: bytes | None = None
        self._budget_due: asyncio.Event | None = None
        self._budget_task: asyncio.Task[None] | None = None
        self._maintenance_task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=self._routes(), lifespan=self._lifespan)

    # -- lifecycle ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        """Open the store (migrations), bootstrap the first owner key, start workers."""
        await self.run_store(self.store.open)
        await self._bootstrap()
        if self.config.maintenance:  # --maintenance: on for every process of the store
            await self.run_store(
                self.store.set_maintenance, True, "serve --maintenance", self.clock_ms()
            )
        self.maintenance = await self.run_store(self.store.get_maintenance)
        if self._processor is None and self.config.processor_url:
            from syncengine.processor.client import HttpProcessor

            self._processor = HttpProcessor(self.config.processor_url)
            self._owns_processor = True
        if self._processor is not None:
            self.forwarder = Forwarder(
                self.store,
                self.run_store,
                self._processor,
                self.clock_ms,
                self.owner,
                self.config.forwarder,
                notify=self.notify,
                on_final=self._on_final,
            )
            self.refunds = Refunds(
                self.store, self.run_store, self._processor, self.clock_ms, self.notify
            )
        self.jobs = Jobs(
            self.store,
            self.run_store,
            self.clock_ms,
            self.forwarder,
            self.receipts,
            self.refunds,
            self.notify,
            self.config.jobs,
        )
        self._budget_due = asyncio.Event()
        watch = getattr(self.store, "watch", None)
        if watch is not None:  # a store shared by processes: hear their server/T appends
            loop = asyncio.get_running_loop()
            watch(lambda terminal_id: loop.call_soon_threadsafe(self._store_changed, terminal_id))
        if self.config.run_background:
            if self.forwarder is not None:
                self.forwarder.start()
            self.jobs.start()
            self._budget_task = asyncio.get_running_loop().create_task(self._budget_loop())
            self._maintenance_task = asyncio.get_running_loop().create_task(
                self._maintenance_loop()
            )

    async def shutdown(self) -> None:
        for task in (self._budget_task, self._maintenance_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for kick in (self._receipts_kick, self._voids_kick):
            await kick.stop()
        if self.jobs is not None:
            self.jobs.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self._owns_processor and self._processor is not None:
            aclose = getattr(self._processor, "aclose", None)
            if aclose is not None:
                await aclose()
        await self.run_store(self.store.close)
        self.run_store.shutdown()

    async def _bootstrap(self) -> None:
        now_ms = self.clock_ms()
        await self.run_store(
            self.store.ensure_merchant, self.config.merchant_id, self.config.currency, now_ms
        )
        if await self.run_store(self.store.count_api_keys) > 0:
            return
        key = self.new_api_key_secret()
        created = await self.run_store(
            self.store.create_first_api_key,
            hash_secret(key),
            hash_secret(key)[:12],
            self.config.merchant_id,
            Role.OWNER,
            "bootstrap owner",
            now_ms,
        )
        if not created:  # another process starting together made the first key
            return
        # Durable before anyone is told: the database already holds the key's hash, so a
        # file lost to a power cut would leave no owner key (`syncengine owner-key` is the
        # way back in; this makes it rarely needed).
        path = self.config.data_dir / OWNER_KEY_FILE
        write_private_file(path, (key + "\n").encode(), replace=True)
        self.bootstrap_api_key = key
        log.warning("created the first owner API key; it is in %s", path)

    @staticmethod
    def new_api_key_secret() -> str:
        return API_KEY_PREFIX + crypto.b64e(os.urandom(24))

    # -- notifications -----------------------------------------------------------------------

    def _store_changed(self, terminal_id: str | None) -> None:
        """A process (maybe this one) appended to ``server/T``; None: maybe to any T."""
        if terminal_id is not None:
            self.notify(terminal_id)
            return
        for wake in list(self._all_wakes):
            wake.set()

    def notify(self, terminal_id: str) -> None:
        """``server/T`` grew: wake T's live sessions so they push the new ops."""
        for event in self._sessions.get(terminal_id, ()):
            event.set()

    def _on_final(self) -> None:
        self._receipts_due()
        self.budget_due()

    def budget_due(self) -> None:
        """Payments became final or terminals changed: re-grant budget soon."""
        if self._budget_due is not None:
            self._budget_due.set()

    async def _budget_loop(self) -> None:
        assert self._budget_due is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._budget_due.wait(), self.config.budget_interval_ms / 1000
                )
            self._budget_due.clear()
            try:
                for merchant in await self.run_store(self.store.list_merchants):
                    if merchant.offline_budget_minor is not None:
                        await self.rebalance_budget(merchant.merchant_id)
            except (StorageError, OSError) as exc:
                log.error("budget re-grant failed: %s", exc)

    async def _maintenance_loop(self) -> None:
        """Follow the shared maintenance switch that another process may have turned."""
        while True:
            await asyncio.sleep(self.config.maintenance_poll_ms / 1000)
            try:
                enabled = await self.run_store(self.store.get_maintenance)
            except (StorageError, OSError) as exc:
                log.error("reading the maintenance switch failed: %s", exc)
                continue
            self._apply_maintenance(enabled)

    def _apply_maintenance(self, enabled: bool) -> None:
        turned_on = enabled and not self.maintenance
        self.maintenance = enabled
        if turned_on:  # live sessions answer service_unavailable and close
            for wake in list(self._all_wakes):
                wake.set()

    async def rebalance_budget(self, merchant_id: str) -> list[str]:
        """Write the grants :func:`plan_grants` asks for; wake the terminals that got one."""
        touched = await self.run_store(
            self.store.grant_budget, merchant_id, plan_grants, self.clock_ms()
        )
        for terminal_id in touched:
            self.notify(terminal_id)
        return touched

    async def processor_public_key(self) -> bytes | None:
        """The processor's X25519 key (terminals seal card data to it); None if unknown."""
        if self._processor_key is None and self._processor is not None:
            try:
                self._processor_key = await self._processor.public_key()
            except Exception as exc:  # the processor may be down: enroll anyway
                log.warning("cannot fetch the processor public key: %s", exc)
        return self._processor_key

    def _voids_due(self) -> None:
        """A terminal asked for a void: act on it now, not at the next refund job run."""
        if self.config.run_background and self.jobs is not None and self.refunds is not None:
            self._voids_kick.kick()

    async def _retry_refunds(self) -> None:
        if self.jobs is not None:
            await self.jobs.retry_refunds()

    def _receipts_due(self) -> None:
        if self.config.run_background and self.config.receipts.smtp_host is not None:
            self._receipts_kick.kick()

    # -- websocket ---------------------------------------------------------------------------

    async def _unavailable(
        self,
        ws: WebSocket,
        why: str = "The payment service is under maintenance; keep payments stored and retry "
        "later.",
    ) -> None:
        error = protocol.Error("service_unavailable", why, True)
        limits = self.config.session.protocol_limits()
        with contextlib.suppress(Exception):
            await ws.send_text(protocol.encode(error, limits).decode("utf-8"))
            await ws.close(code=WS_TRY_AGAIN_LATER, reason="service unavailable")

    async def _sync(self, ws: WebSocket) -> None:
        await ws.accept()
        if self.maintenance:
            await self._unavailable(ws)
            return
        if self.metrics["sessions_active"] >= self.config.sessions_max:
            self.metrics["sessions_refused_total"] += 1
            await self._unavailable(
                ws,
                f"The server serves {self.config.sessions_max} sessions at once; keep payments "
                "stored and retry later.",
            )
            return
        machine = ServerMachine(
            self._signer,
            os.urandom(32),
            self.config.session,
            expire_late_captures=self.forwarder is None,
        )
        wake = asyncio.Event()
        self._all_wakes.add(wake)
        registered: str | None = None
        warned = False  # server_stream_behind logged for this session
        loop = asyncio.get_running_loop()
        handshake_deadline = loop.time() + self.config.handshake_timeout_ms / 1000
        recv: asyncio.Task[Any] | None = None
        self.metrics["sessions_active"] += 1
        self.metrics["sessions_total"] += 1
        try:
            while not machine.closed:
                if recv is None:
                    recv = asyncio.create_task(ws.receive())
                waiter = asyncio.create_task(wake.wait())
                if machine.state is State.READY:
                    timeout = self.config.idle_timeout_ms / 1000
                else:
                    timeout = max(0.0, handshake_deadline - loop.time())
                done, _ = await asyncio.wait(
                    {recv, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if not done:
                    await self._execute(ws, machine, machine.timed_out())
                    break
                if wake.is_set():
                    wake.clear()
                    if self.maintenance:
                        await self._unavailable(ws)
                        break
                    if registered in self._revoked:
                        await self._execute(ws, machine, machine.revoked())
                        break
                    await self._execute(ws, machine, machine.server_ops_available(self.clock_ms()))
                if recv in done:
                    message = recv.result()
                    recv = None
                    if message["type"] == "websocket.disconnect":
                        break
                    data = message.get("bytes") or message.get("text") or b""
                    await self._receive(ws, machine, data)
                    if machine.stats.server_stream_behind and not warned:
                        warned = True
                        self.metrics["server_streams_behind_total"] += 1
                        tid = machine.terminal.terminal_id if machine.terminal else "?"
                        log.error(
                            "terminal %s holds %d ops of server/%s that this server lacks: "
                            "the database lost them (restored from a backup?); see "
                            "docs/operations.md, 'Restore from a backup'",
                            tid,
                            machine.stats.server_stream_behind,
                            tid,
                        )
                    if registered is None and machine.state is State.READY:
                        assert machine.terminal is not None
                        registered = machine.terminal.terminal_id
                        self._sessions.setdefault(registered, set()).add(wake)
        except WebSocketDisconnect:
            pass
        finally:
            if recv is not None:
                recv.cancel()
            self._all_wakes.discard(wake)
            if registered is not None:
                wakes = self._sessions.get(registered)
                if wakes is not None:
                    wakes.discard(wake)
                    if not wakes:  # a terminal with no session keeps no entry
                        del self._sessions[registered]
            self.metrics["sessions_active"] -= 1
            stats = machine.stats
            self.metrics["ops_duplicate_total"] += stats.ops_duplicate
            self.metrics["sessions_refused_total"] += int(stats.refused > 0)

    async def _receive(self, ws: WebSocket, machine: ServerMachine, data: bytes | str) -> None:
        """One frame from a terminal: decoded, checked and merged on the store's thread."""

        def work() -> tuple[list[Effect], list[tuple[MergeBatch, BatchStored]]]:
            return self._drive(machine, machine.receive_frame(data, self.clock_ms()))

        if self.grouper is None:
            await self._finish(ws, *(await self.run_store(work)))
            return
        try:
            out, stored = await self.grouper.submit(work)
        except GroupFailed:
            # Nothing of the frame was stored and the session's machine believes otherwise:
            # end the session; the terminal pushes again from what was acknowledged.
            error = protocol.Error(
                "storage_unavailable",
                "The server could not store the batch; keep it and push again later.",
                True,
            )
            out, stored = [Send(error), Close("storage unavailable")], []
        await self._finish(ws, out, stored)

    async def _execute(self, ws: WebSocket, machine: ServerMachine, effects: list[Effect]) -> None:
        """Carry out effects in order, feeding store answers back into the machine."""
        if any(not isinstance(e, Send | Close) for e in effects):
            await self._finish(ws, *(await self.run_store(self._drive, machine, effects)))
        else:
            await self._finish(ws, effects, [])

    def _drive(
        self, machine: ServerMachine, effects: list[Effect]
    ) -> tuple[list[Effect], list[tuple[MergeBatch, BatchStored]]]:
        """Perform the store effects (on the store's thread), feeding answers back.

        The whole of a frame's work -- decode, chain check, body validation, the merge --
        runs on one thread: handing each step back and forth between the event loop and
        the store thread cost two thread hops a frame and made the two contend for the GIL
        on every row written. Returns what is left for the event loop, in order: the frames
        to send (ending at a Close) and the batches stored.
        """
        queue: deque[Effect] = deque(effects)
        out: list[Effect] = []
        stored: list[tuple[MergeBatch, BatchStored]] = []
        store = self.store
        while queue:
            effect = queue.popleft()
            if isinstance(effect, Send):
                out.append(effect)
            elif isinstance(effect, Close):
                out.append(effect)
                break
            elif isinstance(effect, LoadTerminal):
                info = store.load_terminal(effect.terminal_id)
                queue.extend(machine.terminal_loaded(info, self.clock_ms()))
            elif isinstance(effect, LoadChain):
                view = store.load_chain(effect.origin, effect.seq_lo, effect.seq_hi)
                queue.extend(machine.chain_loaded(view, self.clock_ms()))
            elif isinstance(effect, StoreBatch):
                queue.extend(self._store_batch(machine, effect, stored))
            elif isinstance(effect, MarkSeen):
                try:
                    store.mark_seen(effect.terminal_id, self.clock_ms())
                except (StorageError, OSError) as exc:
                    # Only a restore hold waits for this; it waits for the next push.
                    log.warning("could not record %s as back: %s", effect.terminal_id, exc)
                queue.extend(machine.seen_marked())
            elif isinstance(effect, LoadServerOps):
                ops, more = store.load_ops(effect.origin, effect.after_seq, effect.ops_max)
                queue.extend(machine.server_ops_loaded(ops, more, self.clock_ms()))
        return out, stored

    def _store_batch(
        self,
        machine: ServerMachine,
        effect: StoreBatch,
        stored: list[tuple[MergeBatch, BatchStored]],
    ) -> list[Effect]:
        batch = effect.batch
        try:
            result = self.store.merge_batch(batch)
        except ProtocolError as exc:
            return machine.batch_refused("payment_id_reused", str(exc), True)
        except Refused as exc:  # revoked while this session lived
            return machine.batch_refused(exc.reason, str(exc), True)
        except (StorageError, OSError) as exc:
            log.error("merge of %s failed: %s", batch.terminal_id, exc)
            return machine.batch_refused(
                "storage_unavailable",
                "The server could not store the batch; keep it and push again later.",
                False,
            )
        if isinstance(result, BatchStored):
            stored.append((batch, result))
        return machine.batch_stored(result, self.clock_ms())

    async def _finish(
        self,
        ws: WebSocket,
        out: list[Effect],
        stored: list[tuple[MergeBatch, BatchStored]],
    ) -> None:
        """On the event loop: tell the rest of the server what was stored, then send."""
        for batch, result in stored:
            self.metrics["ops_merged_total"] += len(batch.ops)
            self.metrics["batches_acked_total"] += 1
            if batch.captures and self.forwarder is not None:
                self.forwarder.wake()
            if batch.voids:
                self._voids_due()
            if result.server_ops_written:
                for event in self._sessions.get(batch.terminal_id, ()):
                    event.set()
        limits = self.config.session.protocol_limits()
        for effect in out:
            if isinstance(effect, Send):
                await ws.send_text(protocol.encode(effect.message, limits).decode("utf-8"))
            elif isinstance(effect, Close):
                await ws.close(code=WS_POLICY_VIOLATION, reason=effect.reason[:120])
                return

    # -- REST plumbing -----------------------------------------------------------------------

    def _routes(self) -> list[Route | WebSocketRoute]:
        r = self._wrap
        return [
            WebSocketRoute("/sync", self._sync),
            Route("/health", r(self._health)),
            Route("/metrics", self._metrics),
            Route("/openapi.json", self._openapi),
            Route("/docs", self._docs),
            Route("/v1/enroll", r(self._enroll), methods=["POST"]),
            Route("/v1/enrollment-codes", r(self._create_code), methods=["POST"]),
            Route("/v1/api-keys", r(self._create_key), methods=["POST"]),
            Route("/v1/api-keys", r(self._list_keys), methods=["GET"]),
            Route("/v1/api-keys/{key_id}", r(self._revoke_key), methods=["DELETE"]),
            Route("/v1/merchant", r(self._get_merchant), methods=["GET"]),
            Route("/v1/merchant", r(self._patch_merchant), methods=["PATCH"]),
            Route("/v1/merchant/offline-liability", r(self._accept_liability), methods=["POST"]),
            Route("/v1/merchant/offline-budget", r(self._get_budget), methods=["GET"]),
            Route("/v1/merchant/offline-budget", r(self._put_budget), methods=["PUT"]),
            Route("/v1/maintenance", r(self._get_maintenance), methods=["GET"]),
            Route("/v1/maintenance", r(self._put_maintenance), methods=["PUT"]),
            Route("/v1/terminals", r(self._list_terminals)),
            Route("/v1/terminals/{terminal_id}", r(self._revoke_terminal), methods=["DELETE"]),
            Route("/v1/terminals/{terminal_id}/settings", r(self._get_settings), methods=["GET"]),
            Route("/v1/terminals/{terminal_id}/settings", r(self._put_settings), methods=["PUT"]),
            Route("/v1/terminals/{terminal_id}/z-report", r(self._z_report), methods=["GET"]),
            Route("/v1/terminals/{terminal_id}/z-report", r(self._z_reset), methods=["POST"]),
            Route("/v1/payments", r(self._list_payments)),
            Route("/v1/payments/{payment_id}", r(self._get_payment)),
            Route("/v1/payments/{payment_id}/refunds", r(self._list_refunds), methods=["GET"]),
            Route("/v1/payments/{payment_id}/refunds", r(self._refund), methods=["POST"]),
            Route("/v1/payments/{payment_id}/dispute", r(self._dispute), methods=["POST"]),
            Route("/v1/payments/{payment_id}/resolve", r(self._resolve), methods=["POST"]),
            Route(
                "/v1/payments/{payment_id}/refunds/{refund_id}/resolve",
                r(self._resolve_refund),
                methods=["POST"],
            ),
            Route("/v1/refunds", r(self._list_refunds_by_state)),
            Route("/v1/batches", r(self._list_batches)),
            Route("/v1/batches/close", r(self._close_batches), methods=["POST"]),
            Route("/v1/batches/{batch_id:int}", r(self._get_batch)),
            Route("/v1/reports/reconciliation", r(self._reconciliation)),
        ]

    def _wrap(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                status, body = await handler(request)
            except ApiError as exc:
                return _json(exc.status, {"error": exc.code, "message": str(exc)})
            except Refused as exc:
                return _json(409, {"error": exc.reason, "message": str(exc)})
            except (ConfigError, MoneyError, ProtocolError) as exc:
                return _json(400, {"error": "invalid_request", "message": str(exc)})
            except StorageError as exc:
                log.error("storage failure: %s", exc)
                return _json(503, {"error": "storage_unavailable", "message": str(exc)})
            return _json(status, body)

        return endpoint

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            raw = await read_body(request, self.config.request_body_bytes_max)
        except BodyTooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        try:
            value = canonical.loads(raw) if raw else {}
        except ProtocolError as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return value

    async def _auth(self, request: Request, roles: frozenset[Role] | None = None) -> ApiKey:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(401, "unauthenticated", "send 'Authorization: Bearer <api key>'")
        key = await self.run_store(self.store.get_api_key, hash_secret(header[7:].strip()))
        if key is None:
            raise ApiError(401, "unauthenticated", "unknown or revoked API key")
        if roles is not None and key.role not in roles:
            allowed = ", ".join(sorted(r.value for r in roles))
            raise ApiError(
                403, "forbidden", f"this needs the role {allowed}; your key is a {key.role.value}"
            )
        return key

    # -- REST: system --------------------------------------------------------------------------

    async def _health(self, request: Request) -> tuple[int, Any]:
        version = await self.run_store(self.store.schema_version)
        body: dict[str, Any] = {
            "status": "ok",
            "schema_version": version,
            "forwarder": self.forwarder is not None,
            "sessions_active": self.metrics["sessions_active"],
        }
        failing_ms = self._forwarder_failing_ms()
        if self.forwarder is not None and failing_ms >= self.config.health_forwarder_failing_ms:
            body["status"] = "degraded"
            body["forwarder_failing_s"] = failing_ms // 1000
            body["forwarder_error"] = self.forwarder.stats.last_failure
        return 200, body

    def _forwarder_failing_ms(self) -> int:
        """How long the forwarder has kept failing unexpectedly (0: it is not)."""
        if self.forwarder is None:
            return 0
        limit_ms = self.config.health_forwarder_failing_ms
        return self.forwarder.stats.failing_ms(self.clock_ms(), limit_ms)

    async def _metrics(self, request: Request) -> Response:
        lines: list[str] = []
        for name, value in sorted(self.metrics.items()):
            lines.append(f"syncengine_{name} {value}")
        for name, value in sorted((await self._counts()).items()):
            lines.append(f"syncengine_{name} {value}")
        if self.forwarder is not None:
            stats = self.forwarder.stats
            lines.append(f"syncengine_forward_attempts_total {stats.attempts}")
            for status, n in sorted(stats.outcomes.items()):
                lines.append(f'syncengine_forward_outcomes_total{{status="{status}"}} {n}')
            for kind, n in sorted(stats.errors.items()):
                lines.append(f'syncengine_forward_errors_total{{kind="{kind}"}} {n}')
            failing_s = self._forwarder_failing_ms() // 1000
            lines.append(f"syncengine_forwarder_failing_seconds {failing_s}")
        lines.append(f"syncengine_receipts_sent_total {self.receipts.sent}")
        lines.append(f"syncengine_receipts_failed_total {self.receipts.failed}")
        if self.grouper is not None:
            lines.append(f"syncengine_merge_groups_total {self.grouper.groups}")
            lines.append(f"syncengine_merge_group_frames_max {self.grouper.largest}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _counts(self) -> dict[str, int]:
        """The store's gauges, read at most every ``metrics_counts_max_age_ms``.

        Some of them scan history, so scrapes in between get the last reading; on SQLite
        they are read beside the store thread (``counts_any_thread``), never on it.
        """
        max_age_s = self.config.metrics_counts_max_age_ms / 1000
        async with self._counts_lock:
            cached = self._counts_cache
            if cached is not None and time.monotonic() - cached[0] < max_age_s:
                return cached[1]
            if getattr(self.store, "counts_any_thread", False):
                counts = await asyncio.to_thread(self.store.counts)
            else:
                counts = await self.run_store(self.store.counts)
            self._counts_cache = (time.monotonic(), counts)
            return counts

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def _docs(self, request: Request) -> Response:
        rows = []
        for path, ops in OPENAPI["paths"].items():
            for method, op in ops.items():
                rows.append(
                    f"<tr><td><code>{method.upper()}</code></td><td><code>{path}</code></td>"
                    f"<td>{op.get('summary', '')}</td></tr>"
                )
        html = (
            "<!doctype html><title>syncengine API</title><h1>syncengine sync server API</h1>"
            "<p>Machine-readable spec: <a href='/openapi.json'>/openapi.json</a>. Authenticate "
            "with <code>Authorization: Bearer &lt;api key&gt;</code>.</p>"
            f"<table border=1 cellpadding=4>{''.join(rows)}</table>"
        )
        return HTMLResponse(html)

    # -- REST: enrollment and keys -------------------------------------------------------------

    async def _enroll(self, request: Request) -> tuple[int, Any]:
        body = await self._body(request)
        try:
            message = protocol.EnrollRequest.from_fields(body, protocol.DEFAULT_LIMITS)
        except (KeyError, ProtocolError) as exc:
            raise ApiError(400, "invalid_request", f"malformed enrollment request: {exc}") from None
        assert isinstance(message, protocol.EnrollRequest)
        if set(body) - {"terminal_id", "code", "public_key", "device_class", "v", "type"}:
            raise ApiError(400, "invalid_request", "unknown fields in the enrollment request")
        try:
            DeviceClass(message.device_class)
        except ValueError:
            classes = ", ".join(c.value for c in DeviceClass)
            raise ApiError(
                400, "invalid_request", f"device_class must be one of {classes}"
            ) from None
        public_key = crypto.b64d(message.public_key, chars_max=protocol.B64_CHARS_MAX)
        if len(public_key) != crypto.KEY_BYTES:
            raise ApiError(400, "invalid_request", "public_key must be a raw 32-byte Ed25519 key")
        merchant_currency = await self._currency_of_code(hash_secret(message.code))
        info = await self.run_store(
            self.store.enroll,
            hash_secret(message.code),
            message.terminal_id,
            public_key,
            message.device_class,
            default_settings(merchant_currency),
            self.clock_ms(),
        )
        self.budget_due()
        answer: dict[str, Any] = {
            "terminal_id": info.terminal_id,
            "merchant_id": info.merchant_id,
            "device_class": info.device_class,
            "server_public_key": crypto.b64e(self.server_key.public),
            "sync_path": "/sync",
        }
        processor_key = await self.processor_public_key()
        if processor_key is not None:
            answer["processor_public_key"] = crypto.b64e(processor_key)
        return 201, answer

    async def _currency_of_code(self, code_hash: str) -> str:
        # All merchants of one server share the bootstrap currency unless set otherwise.
        merchant = await self.run_store(self.store.get_merchant, self.config.merchant_id)
        return self.config.currency if merchant is None else merchant.currency

    async def _create_code(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        body = await self._body(request)
        terminal_id = body.get("terminal_id")
        device_class = body.get("device_class")
        if terminal_id is not None:
            terminal_id = _origin(terminal_id)
        if device_class is not None and device_class not in {c.value for c in DeviceClass}:
            raise ApiError(400, "invalid_request", "unknown device_class")
        code = "-".join(secrets.token_hex(3).upper() for _ in range(3))
        now_ms = self.clock_ms()
        expires = now_ms + self.config.enrollment_code_ttl_ms
        await self.run_store(
            self.store.create_enrollment_code,
            hash_secret(code),
            key.merchant_id,
            terminal_id,
            device_class,
            f"key:{key.key_id}",
            now_ms,
            expires,
        )
        return 201, {"code": code, "expires_at_ms": expires, "terminal_id": terminal_id}

    async def _create_key(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, frozenset({Role.OWNER}))
        body = await self._body(request)
        try:
            role = Role(str(body.get("role")))
        except ValueError:
            raise ApiError(
                400, "invalid_request", "role must be owner, manager or cashier"
            ) from None
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > API_KEY_NAME_CHARS_MAX:
            raise ApiError(
                400,
                "invalid_request",
                f"name must be a string of at most {API_KEY_NAME_CHARS_MAX} characters",
            )
        secret = self.new_api_key_secret()
        created = await self.run_store(
            self.store.create_api_key,
            hash_secret(secret),
            hash_secret(secret)[:12],
            key.merchant_id,
            role,
            name,
            self.clock_ms(),
            live_max=API_KEYS_LIVE_MAX,
        )
        await self.run_store(
            self.store.audit, f"key:{key.key_id}", "api_key.create", created.key_id, self.clock_ms()
        )
        return 201, {"api_key": secret, "key_id": created.key_id, "role": role.value, "name": name}

    async def _list_keys(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, frozenset({Role.OWNER}))
        keys = await self.run_store(self.store.list_api_keys, key.merchant_id, API_KEYS_LIST_MAX)
        return 200, {"api_keys": [k.to_json() for k in keys], "your_key_id": key.key_id}

    async def _revoke_key(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, frozenset({Role.OWNER}))
        key_id = request.path_params["key_id"]
        now_ms = self.clock_ms()
        outcome = await self.run_store(
            self.store.revoke_api_key, key.merchant_id, key_id, f"key:{key.key_id}", now_ms
        )
        if outcome == REVOKE_UNKNOWN:
            raise ApiError(404, "not_found", f"no API key {key_id!r} in your account")
        if outcome == REVOKE_ALREADY:
            raise ApiError(409, "already_revoked", f"API key {key_id!r} is already revoked")
        if outcome == REVOKE_LAST_OWNER:
            raise ApiError(
                409,
                "last_owner_key",
                f"{key_id!r} is the account's last live owner key; create another owner "
                "key first (POST /v1/api-keys), then revoke this one",
            )
        return 200, {"key_id": key_id, "revoked_at_ms": now_ms}

    # -- REST: merchant and terminal settings (R2, R3) -----------------------------------------

    async def _get_merchant(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        merchant = await self.run_store(self.store.get_merchant, key.merchant_id)
        assert merchant is not None
        return 200, {
            "merchant_id": merchant.merchant_id,
            "currency": merchant.currency,
            "timezone": merchant.timezone,
            "batch_close_local": merchant.batch_close_local,
            "standalone_allowed": merchant.standalone_allowed,
            "offline_budget": (
                None
                if merchant.offline_budget_minor is None
                else {"minor": merchant.offline_budget_minor, "currency": merchant.currency}
            ),
            "offline_liability": {
                "accepted": merchant.liability_accepted_by is not None,
                "accepted_by": merchant.liability_accepted_by,
                "accepted_at_ms": merchant.liability_accepted_at_ms,
            },
        }

    async def _patch_merchant(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        body = await self._body(request)
        unknown = set(body) - {"timezone", "batch_close_local", "standalone_allowed"}
        if unknown:
            raise ApiError(400, "invalid_request", f"unknown fields {sorted(unknown)}")
        if "timezone" in body:
            zone(str(body["timezone"]))
        if "batch_close_local" in body:
            parse_close_time(str(body["batch_close_local"]))
        standalone = body.get("standalone_allowed")
        if standalone is not None and type(standalone) is not bool:
            raise ApiError(400, "invalid_request", "standalone_allowed must be true or false")
        actor = f"key:{key.key_id}"
        now_ms = self.clock_ms()
        # standalone_allowed false turns offline off on every terminal in the same
        # transaction (R2): a storage failure midway leaves none of it.
        touched = await self.run_store(
            lambda: self.store.update_merchant(
                key.merchant_id,
                timezone=body.get("timezone"),
                batch_close_local=body.get("batch_close_local"),
                standalone_allowed=standalone,
                actor=actor,
                now_ms=now_ms,
            )
        )
        for tid in touched:
            self.notify(tid)
        return await self._get_merchant(request)

    async def _accept_liability(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        body = await self._body(request)
        if body.get("accept") is not True:
            raise ApiError(
                400,
                "invalid_request",
                'send {"accept": true} to accept liability for declined and expired offline '
                "payments and chargebacks",
            )
        now_ms = self.clock_ms()
        actor = f"{key.name or 'key'} ({key.role.value}, key:{key.key_id})"
        await self.run_store(
            lambda: self.store.update_merchant(
                key.merchant_id,
                liability_accepted_by=actor,
                liability_accepted_at_ms=now_ms,
                actor=f"key:{key.key_id}",
                now_ms=now_ms,
            )
        )
        return 200, {"accepted_by": actor, "accepted_at_ms": now_ms}

    async def _get_budget(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        return 200, escrow_json(
            await self.run_store(self.store.escrow_state, key.merchant_id, self.clock_ms())
        )

    async def _put_budget(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        body = await self._body(request)
        if set(body) != {"offline_budget"}:
            raise ApiError(
                400,
                "invalid_request",
                'send {"offline_budget": {"minor": int, "currency": "..."}} or '
                '{"offline_budget": null} to remove the merchant-wide budget',
            )
        raw = body["offline_budget"]
        merchant = await self.run_store(self.store.get_merchant, key.merchant_id)
        assert merchant is not None
        budget_minor: int | None = None
        if raw is not None:
            budget = Money.from_wire(raw)
            if budget.currency != merchant.currency:
                raise ApiError(400, "invalid_request", f"the budget must be in {merchant.currency}")
            if budget.minor < 0:
                raise ApiError(400, "invalid_request", "the budget cannot be negative")
            budget_minor = budget.minor
        await self.run_store(
            self.store.set_offline_budget,
            key.merchant_id,
            budget_minor,
            f"key:{key.key_id}",
            self.clock_ms(),
        )
        if budget_minor is not None:
            await self.rebalance_budget(key.merchant_id)
        return await self._get_budget(request)

    async def _get_maintenance(self, request: Request) -> tuple[int, Any]:
        await self._auth(request)
        # The shared switch as stored (another process may have turned it just now).
        self._apply_maintenance(await self.run_store(self.store.get_maintenance))
        return 200, {"maintenance": self.maintenance}

    async def _put_maintenance(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, frozenset({Role.OWNER}))
        body = await self._body(request)
        enabled = body.get("maintenance")
        if type(enabled) is not bool:
            raise ApiError(400, "invalid_request", 'send {"maintenance": true} or false')
        # Stored (and audited) for every process of the store; the others follow within
        # maintenance_poll_ms, this one at once.
        await self.run_store(
            self.store.set_maintenance, enabled, f"key:{key.key_id}", self.clock_ms()
        )
        self._apply_maintenance(enabled)
        return 200, {"maintenance": self.maintenance}

    async def _list_terminals(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        q = request.query_params
        limit = _limit_param(q.get("limit"), LIST_ROWS_MAX)
        after = q.get("after")
        rows = await self.run_store(self.store.list_terminals, key.merchant_id, after, limit)
        return 200, {
            "terminals": rows,
            "next": rows[-1]["terminal_id"] if len(rows) == limit else None,
        }

    async def _revoke_terminal(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        tid = request.path_params["terminal_id"]
        now_ms = self.clock_ms()
        revoked = await self.run_store(
            self.store.revoke_terminal, key.merchant_id, tid, f"key:{key.key_id}", now_ms
        )
        if revoked is None:
            raise ApiError(404, "not_found", f"no terminal {tid!r} in your account")
        revoked_at, now = revoked
        if not now:
            raise ApiError(409, "already_revoked", f"terminal {tid!r} is already revoked")
        # Its sessions in this process end now; in other processes at their next push.
        self._revoked.add(tid)
        self.notify(tid)
        return 200, {"terminal_id": tid, "revoked_at_ms": revoked_at}

    async def _terminal_of(self, key: ApiKey, terminal_id: str) -> None:
        info = await self.run_store(self.store.load_terminal, terminal_id)
        if info is None or info.merchant_id != key.merchant_id:
            raise ApiError(404, "not_found", f"no terminal {terminal_id!r} in your account")

    async def _get_settings(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        tid = request.path_params["terminal_id"]
        await self._terminal_of(key, tid)
        settings = await self.run_store(self.store.get_terminal_settings, tid)
        merchant = await self.run_store(self.store.get_merchant, key.merchant_id)
        assert settings is not None and merchant is not None
        return 200, settings_json(settings, merchant.currency)

    async def _put_settings(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        tid = request.path_params["terminal_id"]
        await self._terminal_of(key, tid)
        body = await self._body(request)
        current = await self.run_store(self.store.get_terminal_settings, tid)
        merchant = await self.run_store(self.store.get_merchant, key.merchant_id)
        assert current is not None and merchant is not None
        new = apply_settings(current, body, merchant.currency)
        if new.offline_allowed and not merchant.standalone_allowed:
            raise Refused(
                "standalone_not_allowed",
                "Offline payments can only be allowed where standalone mode is allowed; "
                "allow standalone mode for the merchant first.",
            )
        if new.offline_allowed and merchant.liability_accepted_by is None:
            raise Refused(
                "liability_not_accepted",
                "Allowing offline payments needs an owner or manager to accept liability for "
                "declined and expired payments and chargebacks (POST "
                "/v1/merchant/offline-liability).",
            )
        if new.force_offline and not new.offline_allowed:
            raise Refused("offline_not_allowed", "Allow offline payments before forcing them.")
        # Forcing offline is an action: pressed again it is written again, so a terminal
        # that has since left forced offline (its link came back) is forced once more.
        pressed = pressed_settings(body)
        ops = await self.run_store(
            self.store.update_terminal_settings,
            tid,
            new,
            f"key:{key.key_id}",
            self.clock_ms(),
            pressed,
        )
        if ops:
            self.notify(tid)
        if new.offline_allowed != current.offline_allowed:
            self.budget_due()
        out = settings_json(new, merchant.currency)
        out["setting_ops"] = [op.seq for op in ops]
        return 200, out

    # -- REST: payments, refunds, disputes -----------------------------------------------------

    async def _list_payments(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        q = request.query_params
        flt = PaymentFilter(
            merchant_id=key.merchant_id,
            channel=q.get("channel"),
            status=q.get("status"),
            payout_status=q.get("payout_status"),
            terminal_id=q.get("terminal_id"),
            from_ms=_int_param(q.get("from_ms")),
            to_ms=_int_param(q.get("to_ms")),
            limit=_limit_param(q.get("limit"), 100),
            after_payment_id=q.get("after"),
            forwarding=q.get("forwarding"),
            batch_id=_int_param(q.get("batch_id")),
        )
        if flt.forwarding is not None and flt.forwarding not in FORWARDING_STATES:
            raise ApiError(400, "invalid_request", "forwarding is pending, done or error (parked)")
        if flt.channel is not None and flt.channel not in {"integrated", "standalone", "offline"}:
            raise ApiError(400, "invalid_request", "channel is integrated, standalone or offline")
        if flt.payout_status not in (None, "none", "unbatched", "batched"):
            raise ApiError(400, "invalid_request", "payout_status is none, unbatched or batched")
        rows = await self.run_store(self.store.list_payments, flt)
        return 200, {
            "payments": [p.to_json() for p in rows],
            "next": rows[-1].payment_id if len(rows) == flt.limit else None,
        }

    async def _payment_of(self, key: ApiKey, payment_id: str) -> Any:
        payment = await self.run_store(self.store.get_payment, payment_id)
        if payment is None or payment.merchant_id != key.merchant_id:
            raise ApiError(404, "not_found", f"no payment {payment_id!r} in your account")
        return payment

    async def _get_payment(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        return 200, payment.to_json()

    async def _list_refunds(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        refunds = await self.run_store(self.store.refunds_of, payment.payment_id)
        return 200, {"refunds": [_refund_json(r) for r in refunds]}

    async def _refund(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        body = await self._body(request)
        if self.refunds is None:
            raise ApiError(503, "service_unavailable", "no processor is configured")
        amount = Money.from_wire(body.get("amount"))
        refund_id = body.get("refund_id") or f"rf_{secrets.token_hex(8)}"
        _origin(refund_id)
        card_present = body.get("card_present", False) is True
        refund = await self.refunds.refund(
            payment.payment_id,
            refund_id,
            amount,
            f"key:{key.key_id}",
            str(body.get("method", "original_payment")),
            card_present,
        )
        return (201 if refund.state == "done" else 202), _refund_json(refund)

    async def _list_refunds_by_state(self, request: Request) -> tuple[int, Any]:
        """The merchant's refunds in one state: ``parked`` (they need a person) or
        ``pending`` (waiting for the processor), oldest first."""
        key = await self._auth(request)
        state = request.query_params.get("state")
        if state not in REFUND_LIST_STATES:
            raise ApiError(400, "invalid_request", "state is parked (needs a person) or pending")
        limit = _limit_param(request.query_params.get("limit"), 100)
        refunds = await self.run_store(self.store.list_refunds, key.merchant_id, state, limit)
        return 200, {"refunds": [_refund_json(r) for r in refunds]}

    async def _resolve_refund(self, request: Request) -> tuple[int, Any]:
        """Finish a parked refund after comparing the processor's record with ours."""
        key = await self._auth(request, ADMIN_ROLES)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        refund_id = request.path_params["refund_id"]
        refunds = await self.run_store(self.store.refunds_of, payment.payment_id)
        if not any(r.refund_id == refund_id for r in refunds):
            raise ApiError(
                404, "not_found", f"no refund {refund_id!r} of payment {payment.payment_id}"
            )
        action, note = refund_resolution_from_json(await self._body(request))
        if self.refunds is None:
            raise ApiError(503, "service_unavailable", "no processor is configured")
        refund = await self.refunds.resolve(refund_id, action, f"key:{key.key_id}", note)
        return 200, _refund_json(refund)

    async def _dispute(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request, ADMIN_ROLES)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        body = await self._body(request)
        open_ = body.get("open")
        if type(open_) is not bool:
            raise ApiError(400, "invalid_request", 'send {"open": true} or {"open": false}')
        await self.run_store(
            self.store.set_dispute, payment.payment_id, open_, f"key:{key.key_id}", self.clock_ms()
        )
        self.notify(payment.terminal_id)
        return 200, {"payment_id": payment.payment_id, "dispute_open": open_}

    async def _resolve(self, request: Request) -> tuple[int, Any]:
        """Finish a parked payment after comparing the processor's record with ours."""
        key = await self._auth(request, ADMIN_ROLES)
        payment = await self._payment_of(key, request.path_params["payment_id"])
        resolution = resolution_from_json(await self._body(request))
        resolved = await self.run_store(
            self.store.resolve_parked,
            payment.payment_id,
            resolution,
            f"key:{key.key_id}",
            self.clock_ms(),
        )
        self.notify(resolved.terminal_id)
        if resolution.action == "retry":
            if self.forwarder is not None:
                self.forwarder.wake()
        else:
            self._on_final()  # receipts and escrow, as after a processor answer
        return 200, resolved.to_json()

    # -- REST: reports -------------------------------------------------------------------------

    async def _z_report(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        tid = request.path_params["terminal_id"]
        await self._terminal_of(key, tid)
        return 200, await self.run_store(self.store.z_report, tid, False, self.clock_ms())

    async def _z_reset(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        tid = request.path_params["terminal_id"]
        await self._terminal_of(key, tid)
        report = await self.run_store(self.store.z_report, tid, True, self.clock_ms())
        await self.run_store(
            self.store.audit, f"key:{key.key_id}", "z_report.reset", tid, self.clock_ms()
        )
        return 201, report

    async def _list_batches(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        limit = _limit_param(request.query_params.get("limit"), 31)
        batches = await self.run_store(self.store.list_batches, key.merchant_id, limit)
        return 200, {"batches": [b.to_json() for b in batches]}

    async def _get_batch(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        batch = await self.run_store(self.store.get_batch, request.path_params["batch_id"])
        if batch is None or batch.merchant_id != key.merchant_id:
            raise ApiError(404, "not_found", "no such batch in your account")
        q = request.query_params
        flt = PaymentFilter(
            merchant_id=key.merchant_id,
            batch_id=batch.batch_id,
            limit=_limit_param(q.get("limit"), LIST_ROWS_MAX),
            after_payment_id=q.get("after"),
        )
        payments = await self.run_store(self.store.list_payments, flt)
        out = batch.to_json()
        out["payments"] = [p.to_json() for p in payments]
        # A batch holds a day's payments: paged like GET /v1/payments (``after`` = next).
        out["next"] = payments[-1].payment_id if len(payments) == flt.limit else None
        return 200, out

    async def _close_batches(self, request: Request) -> tuple[int, Any]:
        await self._auth(request, ADMIN_ROLES)
        assert self.jobs is not None
        closed = await self.jobs.close_due_batches()
        return 200, {"closed": [b.to_json() for b in closed]}

    async def _reconciliation(self, request: Request) -> tuple[int, Any]:
        key = await self._auth(request)
        day = request.query_params.get("day", "")
        merchant = await self.run_store(self.store.get_merchant, key.merchant_id)
        assert merchant is not None
        try:
            start_ms, end_ms = day_bounds_ms(day, merchant.timezone)
        except ValueError:
            raise ApiError(400, "invalid_request", "day must look like 2026-01-31") from None
        close_ms = close_at_ms(day, merchant.timezone, merchant.batch_close_local)
        sales = await self.run_store(self.store.payments_between, key.merchant_id, start_ms, end_ms)
        batch = await self.run_store(self.store.get_batch_of_day, key.merchant_id, day)
        in_batch = (
            [] if batch is None else await self.run_store(self.store.batch_payments, batch.batch_id)
        )
        # The day of every batch a sale of the day went into (a late one: a later day's).
        # Looked up by id, however old: the latest 1,000 batches missed the old days.
        batch_days = {} if batch is None else {batch.batch_id: batch.business_day}
        for batch_id in sorted({p.batch_id for p in sales if p.batch_id is not None}):
            if batch_id not in batch_days:
                other = await self.run_store(self.store.get_batch, batch_id)
                if other is not None:
                    batch_days[batch_id] = other.business_day
        report = reconcile(
            day, merchant.timezone, merchant.batch_close_local, sales, batch, in_batch, batch_days
        )
        report["batch_close_at_ms"] = close_ms
        return 200, report


# -- helpers -----------------------------------------------------------------------------------


def _json(status: int, body: Any) -> Response:
    return Response(canonical.dumps(body), status_code=status, media_type="application/json")


def _int_param(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{value!r} is not an integer") from None
    if not -canonical.WIRE_INT_MAX <= number <= canonical.WIRE_INT_MAX:
        raise ApiError(
            400, "invalid_request", f"{value!r} is out of range (at most {canonical.WIRE_INT_MAX})"
        )
    return number


def _limit_param(value: str | None, default: int) -> int:
    """A list's ``limit``: 1 to LIST_ROWS_MAX (more was cut silently, and then a full page
    looked like the last one)."""
    limit = _int_param(value)
    if limit is None:
        return default
    if not 1 <= limit <= LIST_ROWS_MAX:
        raise ApiError(400, "invalid_request", f"limit is 1 to {LIST_ROWS_MAX}, not {limit}")
    return limit


def _origin(value: object) -> str:
    from syncengine.core.ops import validate_origin

    try:
        return validate_origin(value)
    except ProtocolError:
        raise ApiError(400, "invalid_request", f"malformed identifier {value!r}") from None


def _refund_json(r: Any) -> dict[str, Any]:
    return {
        "refund_id": r.refund_id,
        "payment_id": r.payment_id,
        "amount": {"minor": r.amount_minor, "currency": r.currency},
        "state": r.state,
        "requested_by": r.requested_by,
        "requested_at_ms": r.requested_at_ms,
        "processed_at_ms": r.processed_at_ms,
        "batch_id": r.batch_id,
        "last_error": r.last_error,
    }


RESOLVE_NOTE_CHARS_MAX = 512  # the note of a resolution (payment or refund)
RESOLVE_USAGE = (
    'send {"action": "retry"}, {"action": "approved", "processor_ref": "..."} or '
    '{"action": "declined", "code": "..."}, with an optional "note"'
)


def resolution_from_json(body: dict[str, Any]) -> Resolution:
    """The body of ``POST /v1/payments/{id}/resolve``, validated strictly."""
    action = body.get("action")
    if action not in RESOLVE_ACTIONS:
        raise ApiError(
            400, "invalid_request", f"action must be retry, approved or declined; {RESOLVE_USAGE}"
        )
    needs = {"retry": set(), "approved": {"processor_ref"}, "declined": {"code"}}[action]
    unknown = set(body) - {"action", "note"} - needs
    if unknown:
        raise ApiError(
            400,
            "invalid_request",
            f"unknown fields {sorted(unknown)} for action {action!r}; {RESOLVE_USAGE}",
        )

    def text(name: str, chars_min: int, chars_max: int) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not chars_min <= len(value) <= chars_max:
            raise ApiError(
                400,
                "invalid_request",
                f"{name} must be a string of {chars_min} to {chars_max} characters",
            )
        return value

    return Resolution(
        action,
        processor_ref=text("processor_ref", 1, 64) if "processor_ref" in needs else None,
        code=text("code", 1, 32) if "code" in needs else None,
        note=text("note", 0, RESOLVE_NOTE_CHARS_MAX) if "note" in body else None,
    )


REFUND_RESOLVE_USAGE = (
    'send {"action": "retry"}, {"action": "done"} or {"action": "refused"}, with an optional "note"'
)


def refund_resolution_from_json(body: dict[str, Any]) -> tuple[str, str | None]:
    """The body of ``POST /v1/payments/{id}/refunds/{refund_id}/resolve``: (action, note)."""
    action = body.get("action")
    if action not in REFUND_RESOLVE_ACTIONS:
        raise ApiError(
            400, "invalid_request", f"action must be retry, done or refused; {REFUND_RESOLVE_USAGE}"
        )
    unknown = set(body) - {"action", "note"}
    if unknown:
        raise ApiError(
            400, "invalid_request", f"unknown fields {sorted(unknown)}; {REFUND_RESOLVE_USAGE}"
        )
    note = body.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > RESOLVE_NOTE_CHARS_MAX):
        raise ApiError(
            400,
            "invalid_request",
            f"note must be a string of at most {RESOLVE_NOTE_CHARS_MAX} characters",
        )
    return str(action), note


def default_settings(currency: str) -> TerminalSettings:
    """A new terminal's settings: offline off (R2), limits at their maxima (R3)."""
    limits = OfflineLimits.default(currency)
    return TerminalSettings(
        offline_allowed=False,
        per_transaction_limit_minor=limits.per_transaction.minor,
        total_limit_minor=limits.total.minor,
        offline_entry_policy="prompt",
        offline_auto_delay_ms=OFFLINE_AUTO_DELAY_MS_DEFAULT,
        force_offline=False,
    )


def settings_json(s: TerminalSettings, currency: str) -> dict[str, Any]:
    """REST form of terminal settings."""
    return {
        "offline_allowed": s.offline_allowed,
        "per_transaction_limit": {"minor": s.per_transaction_limit_minor, "currency": currency},
        "total_limit": {"minor": s.total_limit_minor, "currency": currency},
        "offline_entry_policy": s.offline_entry_policy,
        "offline_auto_delay_ms": s.offline_auto_delay_ms,
        "force_offline": s.force_offline,
    }


def apply_settings(
    current: TerminalSettings, body: dict[str, Any], currency: str
) -> TerminalSettings:
    """A partial settings update, validated (limits never above the maxima, R3)."""
    allowed = {
        "offline_allowed",
        "per_transaction_limit",
        "total_limit",
        "offline_entry_policy",
        "offline_auto_delay_ms",
        "force_offline",
    }
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown settings {sorted(unknown)}")
    s = current
    for name in ("offline_allowed", "force_offline"):
        if name in body:
            if type(body[name]) is not bool:
                raise ApiError(400, "invalid_request", f"{name} must be true or false")
            s = replace(s, **{name: body[name]})
    per_tx = Money(s.per_transaction_limit_minor, currency)
    total = Money(s.total_limit_minor, currency)
    if "per_transaction_limit" in body:
        per_tx = Money.from_wire(body["per_transaction_limit"])
    if "total_limit" in body:
        total = Money.from_wire(body["total_limit"])
    if per_tx.currency != currency or total.currency != currency:
        raise ApiError(
            400, "invalid_request", f"limits must be in the merchant currency {currency}"
        )
    limits = OfflineLimits(per_tx, total)  # ConfigError above the maxima
    s = replace(
        s,
        per_transaction_limit_minor=limits.per_transaction.minor,
        total_limit_minor=limits.total.minor,
    )
    if "offline_entry_policy" in body:
        if body["offline_entry_policy"] not in OFFLINE_ENTRY_POLICIES:
            raise ApiError(400, "invalid_request", "offline_entry_policy is prompt, auto or forced")
        s = replace(s, offline_entry_policy=body["offline_entry_policy"])
    if "offline_auto_delay_ms" in body:
        delay = body["offline_auto_delay_ms"]
        if type(delay) is not int or not 0 < delay <= OFFLINE_AUTO_DELAY_MS_MAX:
            raise ApiError(
                400,
                "invalid_request",
                f"offline_auto_delay_ms must be 1..{OFFLINE_AUTO_DELAY_MS_MAX}",
            )
        s = replace(s, offline_auto_delay_ms=delay)
    return s


__all__ = ["ApiError", "ServerConfig", "SyncEngineError", "SyncServer"]
