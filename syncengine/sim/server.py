"""The real sync server in virtual time: ServerMachine + SQLite store + forwarder + jobs.

This is the :class:`~syncengine.sim.adapters.SimServer` the runner uses. Nothing of the
server's logic is re-implemented here; the adapter only does what the asyncio shell
(``syncengine.server.app``) does, synchronously and on the simulator's clock:

- one real :class:`~syncengine.server.merge.ServerMachine` per connection, whose effects
  are carried out in order against the real :class:`SqliteStore` (``LoadTerminal``,
  ``LoadChain``, ``StoreBatch``, ``MarkSeen``, ``LoadServerOps``), exactly as
  ``SyncServer._execute``;
- the real :class:`~syncengine.server.forwarder.Forwarder`: its coroutines
  (``drain_terminal`` -> ``forward_one``) are stepped to completion without an event loop,
  because the store runner and the processor answer at once (virtual time does not move
  inside a call). The worker loop's ``claim_terminal`` polling is done by :meth:`tick`,
  as ``concurrency_max`` workers would, and a stored capture wakes it as ``wake()`` does;
- the real :class:`~syncengine.server.jobs.Jobs` refund job (``retry_refunds``: pending refunds,
  then terminals' void requests through the real :class:`~syncengine.server.refunds.Refunds`)
  every ``refunds_interval_ms`` and right after a stored batch holds a void request, as
  ``SyncServer`` does. A job that raises is traced (``job_failed``) and runs again later,
  as under the scheduler. A forwarding server has no expiry sweep: the forwarder expires a
  late payment after looking it up at the processor, as ``SyncServer``'s does;
- with ``[merchant] offline_budget``, the budget loop (``SyncServer.rebalance_budget``:
  the real ``plan_grants`` in ``Store.grant_budget``) at setup and every 5 s after work.

``crash()`` drops every machine, the forwarder and the connection: what was committed to
SQLite survives, the rest is gone. ``arm_crash()`` kills the server inside its next
processor call (or its next charge, or refund), after the call reached the processor and
before its outcome is recorded
(:class:`ServerDied` unwinds the server's code and every store call after it is refused,
so no ``finally`` of the dead process writes anything). ``boot()`` reopens the store from
disk, as a restarted ``syncengine serve`` would.

Enrollment and settings go through the store like the REST API does: the merchant allows
standalone mode and an owner accepts liability (R2), each terminal is enrolled with a
one-time code and its scenario settings, and :meth:`force_offline` is the portal action
``PUT /v1/terminals/{id}/settings {"force_offline": true}``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from syncengine.core import protocol
from syncengine.core.bodies import StatusChange, parse_body
from syncengine.core.crypto import Ed25519KeyPair, Signer
from syncengine.core.errors import ProtocolError, Refused, StorageError, check
from syncengine.core.ops import Op, server_origin
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundRequest,
    RefundResult,
)
from syncengine.server import merge as sm
from syncengine.server.backup import backup_database, restore_database
from syncengine.server.budget import plan_grants
from syncengine.server.forwarder import Forwarder, ForwarderConfig
from syncengine.server.jobs import Jobs, JobsConfig
from syncengine.server.model import (
    OFFLINE_AUTO_DELAY_MS_MAX,
    BatchStored,
    EscrowState,
    TerminalSettings,
    pressed_settings,
)
from syncengine.server.receipts import ReceiptConfig, ReceiptSender
from syncengine.server.refunds import Refunds
from syncengine.server.store import StoreRunner
from syncengine.server.store.sqlite import SqliteStore
from syncengine.sim import facts as f
from syncengine.sim.facts import Trace
from syncengine.sim.processor import SimProcessor

# The simulator injects faults on purpose; the server's warnings about them (a refund left
# pending by a processor outage...) would only clutter a run's output: they are traced.
# (A NullHandler keeps Python's last-resort stderr handler out; root handlers still get them.)
logging.getLogger("syncengine.server").addHandler(logging.NullHandler())

P = ParamSpec("P")
T = TypeVar("T")

DB_FILE = "server.db"
ENROLL_CODE_TTL_MS = 24 * 3_600_000
LOAD_OPS_PAGE_MAX = 1_000
CLAIMS_PER_PASS_MAX = 64  # bound on forwarding claims per tick (each drains a terminal)
SETUP_ACTOR = "sim-owner"
BUDGET_INTERVAL_MS = 5_000  # ServerConfig.budget_interval_ms


class ServerDied(BaseException):
    """The server process died (mid-forward crash). A BaseException, like the SIGKILL it
    stands for: no ``except Exception`` in the server code may swallow it."""


@dataclass(frozen=True, slots=True)
class EnrolledTerminal:
    """What the server is told about a terminal when it is enrolled."""

    terminal_id: str
    device_class: str
    public_key: bytes
    settings: TerminalSettings


def scenario_settings(
    offline_allowed: bool,
    offline_entry: str,
    auto_after_ms: int,
    per_transaction_limit_minor: int,
    total_limit_minor: int,
) -> TerminalSettings:
    """The portal settings matching a scenario's ``[merchant]`` (``forced`` is a later
    portal action, :meth:`RealServer.force_offline`)."""
    return TerminalSettings(
        offline_allowed=offline_allowed,
        per_transaction_limit_minor=per_transaction_limit_minor,
        total_limit_minor=total_limit_minor,
        offline_entry_policy=offline_entry,
        offline_auto_delay_ms=max(1, min(auto_after_ms, OFFLINE_AUTO_DELAY_MS_MAX)),
        force_offline=False,
    )


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never really suspends (every await answers at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a server coroutine suspended; the simulator cannot step it")


class _ImmediateRunner(StoreRunner):
    """The ``StoreRunner`` of the simulator: calls the store on the spot, no threads."""

    def __init__(self, store: SqliteStore, alive: Callable[[], bool]) -> None:
        # No super().__init__(): no thread pool; every call runs where it is awaited.
        self.store = store
        self._alive = alive

    def shutdown(self) -> None:
        return None

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if not self._alive():
            raise ServerDied("the server process is dead")
        return fn(*args, **kwargs)


class _ProcessorPort:
    """The async :class:`~syncengine.processor.api.Processor` over the SimProcessor."""

    def __init__(self, server: RealServer) -> None:
        self.server = server

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        srv = self.server
        try:
            result = srv.processor.charge(srv.now_ms, request)
        except OutcomeUnknown:
            self._traced(request.terminal_id, request.payment_id, "unknown")
            srv.die_if_armed("charge")  # the charge may have committed: the hard case
            raise
        except ProcessorUnavailable:
            self._traced(request.terminal_id, request.payment_id, "unavailable")
            raise
        self._traced(request.terminal_id, request.payment_id, result.outcome)
        srv.die_if_armed("charge")
        return result

    async def lookup(self, payment_id: str) -> ChargeResult | None:
        srv = self.server
        result = srv.processor.lookup(srv.now_ms, payment_id)
        self._traced("", payment_id, "lookup" if result is None else result.outcome)
        return result

    def _traced(self, terminal_id: str, payment_id: str, outcome: str) -> None:
        self.server.trace.add(self.server.now_ms, f.FORWARD, terminal_id, payment_id, 0, outcome)

    async def refund(self, request: RefundRequest) -> RefundResult:
        srv = self.server
        try:
            result = srv.processor.refund(srv.now_ms, request)
        except OutcomeUnknown:
            self._traced("", request.payment_id, "refund unknown")
            srv.die_if_armed("refund")
            raise
        except ProcessorUnavailable:
            self._traced("", request.payment_id, "refund unavailable")
            raise
        self._traced("", request.payment_id, f"refund {request.refund_id}")
        srv.die_if_armed("refund")  # refunded at the processor, not recorded
        return result

    async def public_key(self) -> bytes:
        return self.server.processor.public_key


class RealServer:
    """A :class:`~syncengine.sim.adapters.SimServer` running the shipped server code."""

    def __init__(
        self,
        processor: SimProcessor,
        trace: Trace,
        merchant_id: str,
        currency: str,
        data_dir: Path,
        rng: random.Random,
        server_key: bytes,
        forwarder_config: ForwarderConfig | None = None,
        jobs_config: JobsConfig | None = None,
        timezone: str = "UTC",
        offline_budget_minor: int | None = None,
    ) -> None:
        self.processor = processor
        self.offline_budget_minor = offline_budget_minor
        self.trace = trace
        self.merchant_id = merchant_id
        self.currency = currency
        self.path = data_dir / DB_FILE
        self.rng = rng
        self.key = Ed25519KeyPair.from_private(server_key)
        self._signer = Signer(self.key.private)  # shared by every session
        self.forwarder_config = forwarder_config or ForwarderConfig()
        self.jobs_config = jobs_config or JobsConfig()
        self.timezone = timezone
        self.unavailable = False
        self.bugs: set[str] = set()
        self.now_ms = 0
        self.up = False
        self.boots_count = 0
        self.store: SqliteStore | None = None
        self.forwarder: Forwarder | None = None
        self.jobs: Jobs | None = None
        self.refunds: Refunds | None = None
        self.sessions: dict[str, sm.ServerMachine] = {}
        self.out: list[tuple[str, bytes]] = []
        self.on_close: Callable[[str], None] = lambda terminal_id: None
        self._dirty: set[str] = set()
        self._traced_seq: dict[str, int] = {}
        self._next_refunds_ms = 0
        self._die_fire: Callable[[], None] | None = None
        self._die_call = ""
        self._wake = False
        self._voids_due = False
        self._next_budget_ms = 0
        self._budget_max = offline_budget_minor or 0  # for the planted bug ignore_lower_budget

    @property
    def public_key(self) -> bytes:
        return self.key.public

    # -- lifecycle -----------------------------------------------------------------------

    def setup(self, now_ms: int, terminals: Iterable[EnrolledTerminal], offline: bool) -> None:
        """First start: the merchant, liability acceptance and enrollment, via the store."""
        self.boot(now_ms)
        store = self._store()
        store.ensure_merchant(self.merchant_id, self.currency, now_ms)
        if self.timezone != "UTC":
            store.update_merchant(
                self.merchant_id, timezone=self.timezone, actor=SETUP_ACTOR, now_ms=now_ms
            )
        if offline:
            store.update_merchant(
                self.merchant_id,
                standalone_allowed=True,
                liability_accepted_by=SETUP_ACTOR,
                liability_accepted_at_ms=now_ms,
                actor=SETUP_ACTOR,
                now_ms=now_ms,
            )
        for term in terminals:
            code_hash = hashlib.sha256(f"code:{term.terminal_id}".encode()).hexdigest()
            store.create_enrollment_code(
                code_hash,
                self.merchant_id,
                term.terminal_id,
                term.device_class,
                SETUP_ACTOR,
                now_ms,
                now_ms + ENROLL_CODE_TTL_MS,
            )
            store.enroll(
                code_hash,
                term.terminal_id,
                term.public_key,
                term.device_class,
                term.settings,
                now_ms,
            )
            self._traced_seq[term.terminal_id] = 0
            self._dirty.add(term.terminal_id)
        if self.offline_budget_minor is not None:
            # PUT /v1/merchant/offline-budget; the first grants go out at once.
            store.set_offline_budget(
                self.merchant_id, self.offline_budget_minor, SETUP_ACTOR, now_ms
            )
            self._budget_pass()
        self._scan()

    def boot(self, now_ms: int) -> None:
        """(Re)start: open the store from disk, new forwarder and jobs, no sessions."""
        self.now_ms = now_ms
        self.boots_count += 1
        store = SqliteStore(self.path)
        store.open()
        self.store = store
        self.up = True
        alive: Callable[[], bool] = lambda: self.up and self.store is store  # noqa: E731
        runner = _ImmediateRunner(store, alive)
        clock: Callable[[], int] = lambda: self.now_ms  # noqa: E731
        self.forwarder = Forwarder(
            store,
            runner,
            _ProcessorPort(self),
            clock,
            f"sim-server-{self.boots_count}",
            self.forwarder_config,
            notify=self._dirty.add,
            rng=random.Random(self.rng.random()),
        )
        receipts = ReceiptSender(store, runner, ReceiptConfig(), clock)
        self.refunds = Refunds(store, runner, _ProcessorPort(self), clock, self._dirty.add)
        self.jobs = Jobs(
            store,
            runner,
            clock,
            self.forwarder,
            receipts,
            self.refunds,
            self._dirty.add,
            self.jobs_config,
        )
        self._next_refunds_ms = now_ms
        self._next_budget_ms = now_ms
        self.sessions.clear()
        self._wake = True
        self._voids_due = False

    def arm_crash(self, fire: Callable[[], None], call: str = "") -> None:
        """Die inside the next processor call (of kind ``call``: ``charge``, ``refund``; ""
        any): the call reaches the processor, its outcome is never recorded. ``fire`` is
        called (outside the server's code) to bury it."""
        self._die_fire = fire
        self._die_call = call

    def disarm_crash(self) -> None:
        self._die_fire = None
        self._die_call = ""

    def crash(self, now_ms: int = 0) -> None:
        """Kill the process: drop every session, the forwarder and the connection."""
        self.now_ms = now_ms
        self._die_fire = None
        self.up = False
        if self.store is not None:
            self.store.close()  # the OS closes the file; committed transactions stay
        self.store = None
        self.forwarder = None
        self.jobs = None
        self.refunds = None
        self.sessions.clear()
        self.out.clear()
        self._dirty.clear()

    def backup(self, target: Path) -> Path:
        """``syncengine backup`` of the database, online (the server may be running)."""
        backup_database(self.path, target)
        return target

    def restore(self, backup: Path) -> None:
        """``syncengine restore`` of ``backup`` while the server is down; the next boot
        opens it. What the server traced past the restored streams is traced again when
        written again."""
        check(not self.up, "restore only while the server is down")
        stamp = dt.datetime.fromtimestamp(self.now_ms / 1000, dt.UTC)
        restore_database(self.path, backup, now=stamp)
        self.trace.add(self.now_ms, f.RESTORED, "", detail=backup.name)
        probe = SqliteStore(self.path)
        probe.open()
        try:
            for tid in sorted(self._traced_seq):
                info = probe.load_terminal(tid)
                head, server_seq = (0, 0) if info is None else (info.head_seq, info.server_seq)
                self.trace.add(self.now_ms, f.DURABLE, "", value=head, detail=tid)
                self._traced_seq[tid] = min(self._traced_seq[tid], server_seq)
        finally:
            probe.close()

    def die_if_armed(self, call: str) -> None:
        if self._die_fire is not None and self._die_call in ("", call):
            self.up = False
            self.trace.add(
                self.now_ms,
                f.FORWARD,
                "",
                "",
                0,
                "server died mid-" + ("forward" if call == "charge" else call),
            )
            raise ServerDied("killed between the processor call and recording its outcome")

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run server work; if the process died inside it, bury it once the stack unwound."""
        try:
            work()
        except ServerDied:
            fire, self._die_fire = self._die_fire, None
            if fire is not None:
                fire()

    def _store(self) -> SqliteStore:
        if self.store is None:
            raise StorageError("the simulated server is down")
        return self.store

    # -- sessions ------------------------------------------------------------------------

    def open_session(self, now_ms: int, terminal_id: str) -> None:
        if not self.up:
            return
        self.sessions[terminal_id] = sm.ServerMachine(
            self._signer, self.rng.randbytes(32), expire_late_captures=False
        )

    def close_session(self, terminal_id: str) -> None:
        self.sessions.pop(terminal_id, None)

    def outgoing(self) -> list[tuple[str, bytes]]:
        out, self.out = self.out, []
        return out

    def receive(self, now_ms: int, terminal_id: str, frame: bytes) -> None:
        self.now_ms = now_ms
        machine = self.sessions.get(terminal_id)
        if machine is None or not self.up:
            return
        if self.unavailable:
            # A provider outage: the load balancer answers in the server's place.
            self._send(terminal_id, protocol.Error("service_unavailable", "provider outage", True))
            return

        def work() -> None:
            self._execute(terminal_id, machine, machine.receive_frame(frame, now_ms))
            self.after_work()

        self._guarded(work)

    def _send(self, terminal_id: str, message: protocol.Message) -> None:
        self.out.append((terminal_id, protocol.encode(message)))

    def _execute(self, tid: str, machine: sm.ServerMachine, effects: list[sm.Effect]) -> None:
        """``SyncServer._execute``, synchronously."""
        store = self._store()
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            now = self.now_ms
            if isinstance(effect, sm.Send):
                self._send(tid, effect.message)
            elif isinstance(effect, sm.Close):
                self.sessions.pop(tid, None)
                self.on_close(tid)
                return
            elif isinstance(effect, sm.LoadTerminal):
                queue += machine.terminal_loaded(store.load_terminal(effect.terminal_id), now)
            elif isinstance(effect, sm.LoadChain):
                view = store.load_chain(effect.origin, effect.seq_lo, effect.seq_hi)
                queue += machine.chain_loaded(view, now)
            elif isinstance(effect, sm.StoreBatch):
                queue += self._store_batch(tid, machine, effect)
            elif isinstance(effect, sm.MarkSeen):
                # PLANTED BUG ignore_back_push: a push of nothing new is only acked.
                with contextlib.suppress(StorageError, OSError):  # as SyncServer: the hold
                    if "ignore_back_push" not in self.bugs:  # waits for the next push
                        store.mark_seen(effect.terminal_id, now)
                queue += machine.seen_marked()
            elif isinstance(effect, sm.LoadServerOps):
                ops, more = store.load_ops(effect.origin, effect.after_seq, effect.ops_max)
                queue += machine.server_ops_loaded(ops, more, now)

    def _store_batch(
        self, tid: str, machine: sm.ServerMachine, effect: sm.StoreBatch
    ) -> list[sm.Effect]:
        batch = effect.batch
        if "ack_before_store" in self.bugs:
            # PLANTED BUG: acknowledge before the merge is durable.
            self.trace.add(self.now_ms, f.ACK, tid, value=batch.head_seq, detail=tid)
            self._send(tid, protocol.Ack(tid, batch.head_seq))
        try:
            result = self._store().merge_batch(batch)
        except ProtocolError as exc:
            return machine.batch_refused("payment_id_reused", str(exc), True)
        except Refused as exc:  # revoked while this session lived
            return machine.batch_refused(exc.reason, str(exc), True)
        except (StorageError, OSError):
            return machine.batch_refused(
                "storage_unavailable",
                "The server could not store the batch; keep it and push again later.",
                False,
            )
        if isinstance(result, BatchStored):
            self.trace.add(self.now_ms, f.DURABLE, tid, value=result.head_seq, detail=tid)
            if batch.captures:
                self._wake = True
            if batch.voids:
                self._voids_due = True
            if result.server_ops_written:
                self._dirty.add(tid)
        return machine.batch_stored(result, self.now_ms)

    # -- background work -----------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        self.now_ms = now_ms
        if self.up:
            self._guarded(self._tick)

    def _tick(self) -> None:
        if self.now_ms >= self._next_refunds_ms:
            self._voids_due = True
        self._wake = True
        self.after_work()

    def after_work(self) -> None:
        """Run the forwarder if woken, the refund job if due, then push new server ops to
        live sessions."""
        if not self.up:
            return
        if self._wake:
            self._wake = False
            self._forward_pass()
        if self._voids_due and self.up:
            self._voids_due = False
            self._refund_job()
        if (
            self.offline_budget_minor is not None
            and self.now_ms >= self._next_budget_ms
            and self.up
        ):
            self._budget_pass()
        self._scan()

    def _budget_pass(self) -> None:
        """``SyncServer.rebalance_budget`` (its budget loop runs every
        ``budget_interval_ms``): grants :func:`plan_grants` asks for, to the sessions."""
        self._next_budget_ms = self.now_ms + BUDGET_INTERVAL_MS
        bugs = set(self.bugs)

        def plan(state: EscrowState) -> dict[str, int]:
            if "double_budget" in bugs and state.budget_minor is not None:
                # PLANTED BUG: the real planner, handed twice the merchant's budget.
                state = replace(state, budget_minor=2 * state.budget_minor)
            if "ignore_lower_budget" in bugs and state.budget_minor is not None:
                # PLANTED BUG: the real planner, handed the highest budget ever set.
                state = replace(state, budget_minor=max(state.budget_minor, self._budget_max))
            if "no_restore_hold" in bugs:
                # PLANTED BUG: the real planner, told no terminal holds it after a restore.
                state = replace(state, held_by=())
            return plan_grants(state)

        touched = self._store().grant_budget(self.merchant_id, plan, self.now_ms)
        self._dirty.update(touched)

    def _refund_job(self) -> None:
        """``Jobs.retry_refunds``: finish pending refunds, then act on void requests."""
        assert self.jobs is not None and self.refunds is not None
        self._next_refunds_ms = self.now_ms + self.jobs_config.refunds_interval_ms
        try:
            if "void_day_in_utc" in self.bugs:
                # PLANTED BUG: the void job reads the business day in UTC, not in the
                # merchant's time zone.
                run_now(self.refunds.process_voids(lambda merchant_id: "UTC"))
            run_now(self.jobs.retry_refunds())
        except Exception as exc:  # the scheduler logs a failed job and runs it again later
            self.trace.add(self.now_ms, "job_failed", "", "", 0, f"retry_refunds: {exc}"[:200])

    def _forward_pass(self) -> None:
        """What the forwarder's workers do between two polls: claim, drain, release."""
        store, fwd = self._store(), self.forwarder
        assert fwd is not None
        cfg = self.forwarder_config
        for _ in range(CLAIMS_PER_PASS_MAX):
            terminal_id = store.claim_terminal(fwd.owner, self.now_ms, cfg.lease_ms)
            if terminal_id is None:
                return
            run_now(fwd.drain_terminal(terminal_id))
            self._dirty.add(terminal_id)

    def _scan(self) -> None:
        """Trace new status ops of changed streams and offer them to live sessions."""
        if not self.up:
            return
        store = self._store()
        for tid in sorted(self._dirty):
            after = self._traced_seq.get(tid, 0)
            while True:
                ops, more = store.load_ops(server_origin(tid), after, LOAD_OPS_PAGE_MAX)
                for op in ops:
                    after = op.seq
                    if op.kind == "status":
                        body = parse_body(op)
                        assert isinstance(body, StatusChange)
                        self.trace.add(
                            self.now_ms, f.STATUS, tid, body.payment_id, 0, body.status.value
                        )
                        if body.status.value == "expired":
                            self.trace.add(
                                self.now_ms, f.FORWARD, tid, body.payment_id, 0, "expired"
                            )
                if not more:
                    break
            self._traced_seq[tid] = after
            machine = self.sessions.get(tid)
            if machine is not None and not machine.closed:
                self._execute(tid, machine, machine.server_ops_available(self.now_ms))
        self._dirty.clear()

    # -- portal --------------------------------------------------------------------------

    def force_offline(self, now_ms: int, terminal_id: str, on: bool) -> None:
        """The portal's ``force_offline`` switch (an owner's PUT of the terminal settings)."""
        self.update_settings(now_ms, terminal_id, force_offline=on)

    def set_offline_budget(self, now_ms: int, budget_minor: int) -> bool:
        """``PUT /v1/merchant/offline-budget``: stored, and the budget loop runs at once
        (``SyncServer.rebalance_budget``). False, changing nothing, while the server is down."""
        self.now_ms = now_ms
        if not self.up:
            return False
        self._store().set_offline_budget(self.merchant_id, budget_minor, SETUP_ACTOR, now_ms)
        self.offline_budget_minor = budget_minor
        self._budget_max = max(self._budget_max, budget_minor)
        self._budget_pass()
        return True

    def update_settings(self, now_ms: int, terminal_id: str, **changes: Any) -> None:
        """``PUT /v1/terminals/{id}/settings``: new ``setting`` ops reach live sessions."""
        self.now_ms = now_ms
        if not self.up:
            return
        store = self._store()
        current = store.get_terminal_settings(terminal_id)
        assert current is not None
        new = replace(current, **changes)
        pressed = pressed_settings(changes)
        if store.update_terminal_settings(terminal_id, new, SETUP_ACTOR, now_ms, pressed):
            self._dirty.add(terminal_id)
        self._guarded(self.after_work)

    # -- facts ---------------------------------------------------------------------------

    def restore_hold(self, now_ms: int) -> tuple[str, ...] | None:
        """The terminals the budget waits for after a restore (None: no budget, or down)."""
        if self.offline_budget_minor is None or self.store is None:
            return None
        return self.store.escrow_state(self.merchant_id, now_ms).held_by

    def stored_ops(self) -> list[Op]:
        """Every op in the server store, read back from disk by a fresh connection."""
        probe = SqliteStore(self.path) if self.store is None else self.store
        opened = self.store is None
        if opened:
            probe.open()
        try:
            out: list[Op] = []
            for tid in sorted(self._traced_seq):
                for origin in (tid, server_origin(tid)):
                    after = 0
                    while True:
                        ops, more = probe.load_ops(origin, after, LOAD_OPS_PAGE_MAX)
                        out += ops
                        if not ops or not more:
                            break
                        after = ops[-1].seq
            return out
        finally:
            if opened:
                probe.close()

    def files(self) -> list[Path]:
        return [p for p in self.path.parent.glob(self.path.name + "*") if p.is_file()]

    def blobs(self) -> list[bytes]:
        return []

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        self.up = False
