"""The simulator's shell around the real :class:`~syncengine.node.machine.TerminalMachine`.

It does what ``syncengine.node.client`` does for real, in virtual time: performs the
machine's effects in order (``Persist`` into the store, then ``Committed``; ``Send`` onto the
simulated network; ``ConnectAt`` as a scheduled connection attempt), feeds it ticks, and
records what the POS was told into the trace. A crash drops the machine and everything
not durable; a boot rebuilds the machine from the store with ``TerminalMachine.restore``.

The store is the real SQLite ``syncengine.node.store.Store`` (:class:`SqliteTerminalStore`);
a crash closes its connection without any cleanup, a boot reopens it from disk.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from syncengine.core import protocol
from syncengine.core.crypto import CardData
from syncengine.core.errors import InvalidState, ProtocolError, Refused, StorageError
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.money import Money
from syncengine.core.ops import Op
from syncengine.core.policy.acceptance import DEFAULT_RULES, Brand, EntryMethod, Region, Rule
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.limits import OfflineLimits
from syncengine.core.policy.offline_mode import EntryPolicy, OfflineModePolicy, OfflineSettings
from syncengine.node import machine as m
from syncengine.node.store import Store
from syncengine.sim import facts as f
from syncengine.sim.adapters import Attempt, TerminalView
from syncengine.sim.facts import TerminalFacts, Trace

TICK_MS_DEFAULT = 1_000
#: The simulated terminals compact their replica this often (the SDK: 512 ops), so that
#: every run reads compacted ops back: after a restore, in a stream comparison, on a push.
SIM_COMPACT_SLACK_OPS = 4


class SqliteTerminalStore:
    """The real :class:`syncengine.node.store.Store` (SQLite, WAL, synchronous=FULL) in a
    run directory, plus the simulator's disk-full switch (``SQLITE_FULL`` is simulated by
    refusing the write before it starts, which is what SQLite guarantees: nothing of a
    failed transaction is kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.disk_full = False
        self.writes_count = 0
        self.store: Store | None = None
        # The acknowledged seq as of the last durable commit, while a later write of it
        # went without fsync (a one-tuple: the value may be None); a power cut restores it.
        self._before_volatile: tuple[str | None] | None = None

    def open(self, terminal_id: str) -> tuple[Iterator[Op], int, str, list[Op]]:
        """Open (or reopen after a crash) and read back the log (a page at a time, the
        terminal's own ops first, as the SDK does), acked seq, mode and the archive of
        rewritten server ops."""
        self.store = Store(self.path)
        ops = self.store.iter_log(terminal_id)
        acked = int(self.store.get_meta("acked_seq") or 0)
        mode = self.store.get_meta("offline_mode") or ""
        return ops, acked, mode, self.store.load_archived_ops()

    def read_ops(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        """The machine's compacted ops read back (see ``TerminalMachine``, 6.)."""
        if self.store is None:
            raise StorageError("store is closed")
        return self.store.read_ops(origin, after_seq, end_seq)

    def drop(self, power_cut: bool = False) -> bool:
        """A crash: the process dies; committed transactions are on disk, nothing else.

        ``power_cut``: the device loses power, so what was committed without fsync since
        the last durable commit is gone too (the acknowledged seq goes back). Returns
        whether something was lost that way.
        """
        lost = False
        if self.store is not None:
            if power_cut and self._before_volatile is not None:
                (value,) = self._before_volatile
                if value is None:
                    self.store.delete_meta("acked_seq")
                else:
                    self.store.set_meta({"acked_seq": value})
                lost = True
            for conn in self.store.connections():
                conn.close()
        self.store = None
        self._before_volatile = None
        return lost

    def persist(
        self,
        ops: tuple[Op, ...],
        meta: Mapping[str, int | str],
        durable: bool = True,
        archive: tuple[str, int] | None = None,
    ) -> None:
        if self.store is None:
            raise StorageError("store is closed")
        if self.disk_full and ops:
            raise StorageError("database or disk is full (simulated SQLITE_FULL)")
        if not durable and self._before_volatile is None:
            self._before_volatile = (self.store.get_meta("acked_seq"),)
        self.store.write(ops, meta, durable, archive)
        if durable:  # this fsync carries every earlier commit with it
            self._before_volatile = None
        self.writes_count += 1

    def read_back(self) -> list[Op]:
        """The log as a fresh process would read it."""
        probe = Store(self.path)
        try:
            return probe.load_ops()
        finally:
            probe.close()

    def files(self) -> list[Path]:
        return [p for p in self.path.parent.glob(self.path.name + "*") if p.is_file()]


@dataclass(frozen=True, slots=True)
class TerminalSetup:
    """Everything fixed about one simulated terminal."""

    terminal_id: str
    merchant_id: str
    device_class: str
    currency: str
    region: str
    offline_allowed: bool
    offline_entry: str  # "prompt" | "auto" (the portal does "forced")
    auto_after_ms: int
    auto_on_provider_outage: bool
    per_transaction_limit_minor: int
    total_limit_minor: int
    rules: tuple[str, ...]
    processor_public_key: bytes
    signing_key: bytes
    server_public_key: bytes | None = None  # verifies the server's ServerOps signatures


def terminal_config(s: TerminalSetup) -> m.TerminalConfig:
    """The TerminalMachine configuration of a simulated terminal (both tiers use it)."""
    limits = OfflineLimits(
        Money(s.per_transaction_limit_minor, s.currency), Money(s.total_limit_minor, s.currency)
    )
    rules = DEFAULT_RULES if not s.rules else frozenset(Rule(r) for r in s.rules)
    offline = OfflineSettings(
        allowed=s.offline_allowed,
        standalone_allowed=s.offline_allowed,
        liability_accepted_by="sim-owner" if s.offline_allowed else None,
        liability_accepted_at_ms=0 if s.offline_allowed else None,
    )
    entry = EntryPolicy.AUTO if s.offline_entry == "auto" else EntryPolicy.PROMPT
    if s.offline_entry == "forced":
        entry = EntryPolicy.FORCED
    policy = OfflineModePolicy(entry, s.auto_after_ms, s.auto_on_provider_outage)
    return m.TerminalConfig(
        terminal_id=s.terminal_id,
        merchant_id=s.merchant_id,
        device_class=DeviceClass(s.device_class),
        currency=s.currency,
        region=Region(s.region),
        processor_public_key=s.processor_public_key,
        server_public_key=s.server_public_key,
        offline=offline,
        policy=policy,
        rules=rules,
        limits=limits,
    )


class MachineTerminal:
    """A :class:`~syncengine.sim.adapters.SimTerminal` over the real TerminalMachine."""

    def __init__(
        self,
        setup: TerminalSetup,
        rng: random.Random,
        trace: Trace,
        store_path: Path,
        send: Callable[[str, bytes], None],
        connect_at: Callable[[str, int], None],
        close_link: Callable[[str], None],
    ) -> None:
        self.terminal_id = setup.terminal_id
        self.setup = setup
        self.rng = rng
        self.trace = trace
        self._send = send
        self._connect_at = connect_at
        self._close_link = close_link
        self.store = SqliteTerminalStore(store_path)
        self.machine: m.TerminalMachine | None = None
        self.prompting = False
        self.resume_prompted = False
        self._payment_counter = 0
        self._now_ms = 0
        self._armed: tuple[bool, Callable[[], None]] | None = None
        # called with the payment id when the POS is told a standalone payment is approved
        self.on_standalone_approved: Callable[[str], None] = lambda payment_id: None

    def arm_crash(self, write_first: bool, fire: Callable[[], None]) -> None:
        """Crash in the middle of the next durable write (``write_first``: after its bytes
        reached the store, before the machine heard ``Committed``)."""
        self._armed = (write_first, fire)

    # -- lifecycle -----------------------------------------------------------------------

    def _config(self) -> m.TerminalConfig:
        return terminal_config(self.setup)

    def boot(self, now_ms: int) -> None:
        self._now_ms = now_ms
        jitter: Callable[[int], int] = lambda n: self.rng.randint(0, n)  # noqa: E731
        ops, acked, mode_snapshot, archived = self.store.open(self.terminal_id)
        self.machine = m.TerminalMachine.restore(
            self._config(),
            self.setup.signing_key,
            jitter,
            now_ms,
            ops,
            acked,
            mode_snapshot,
            archived=archived,
            reader=self.store.read_ops,
            # Far below the SDK's default: the runs then read compacted ops back often.
            compact_slack_ops=SIM_COMPACT_SLACK_OPS,
        )
        self.prompting = False
        self._perform(now_ms, self.machine.start(now_ms))

    def crash(self, power_cut: bool = False) -> bool:
        """The terminal dies (``power_cut``: loses power); True if the power cut took back
        a write made without fsync."""
        lost = self.store.drop(power_cut)
        self.machine = None
        self.prompting = False
        self._armed = None
        return lost

    @property
    def up(self) -> bool:
        return self.machine is not None

    # -- events --------------------------------------------------------------------------

    def _handle(self, now_ms: int, event: m.Event) -> None:
        if self.machine is None:
            return
        self._now_ms = now_ms
        try:
            effects = self.machine.handle(event)
        except ProtocolError as exc:
            self.trace.add(now_ms, "protocol_error", self.terminal_id, detail=str(exc)[:200])
            effects = [m.CloseLink("protocol error")]
            effects += self.machine.handle(m.Disconnected(now_ms, "network", "protocol error"))
        self._perform(now_ms, effects)

    def _perform(self, now_ms: int, effects: list[m.Effect]) -> None:
        for effect in effects:
            if self.machine is None:
                return
            if isinstance(effect, m.Persist) and effect.ops and self._armed is not None:
                write_first, fire = self._armed
                self._armed = None
                if write_first and not self.store.disk_full:
                    self.store.persist(  # nobody told
                        effect.ops, effect.meta, effect.durable, effect.archive
                    )
                fire()
                return
            if isinstance(effect, m.Persist):
                try:
                    self.store.persist(effect.ops, effect.meta, effect.durable, effect.archive)
                except StorageError as exc:
                    self._perform(now_ms, self.machine.handle(m.CommitFailed(now_ms, str(exc))))
                else:
                    self._perform(now_ms, self.machine.handle(m.Committed(now_ms)))
            elif isinstance(effect, m.Send):
                self._send(self.terminal_id, protocol.encode(effect.message))
            elif isinstance(effect, m.ConnectAt):
                self._connect_at(self.terminal_id, effect.at_ms)
            elif isinstance(effect, m.CloseLink):
                self._close_link(self.terminal_id)
            elif isinstance(effect, m.PaymentDecided):
                self._decided(now_ms, effect.result)
            else:
                self._notice(now_ms, effect.notice)

    def _decided(self, now_ms: int, result: m.PaymentResult) -> None:
        pid = result.payment_id or ""
        kind = {
            "approved_offline": f.APPROVED_OFFLINE,
            "approved_online": f.APPROVED_ONLINE,
            "declined": f.DECLINED_ONLINE,
            "refused": f.REFUSED,
        }.get(result.outcome, "pending")
        self.trace.add(now_ms, kind, self.terminal_id, pid, result.amount.minor, result.reason)
        if kind == f.APPROVED_OFFLINE and self.machine is not None:
            outstanding = self.machine.status(now_ms).pending_amount.minor
            self.trace.add(now_ms, f.OUTSTANDING, self.terminal_id, pid, outstanding)
        if kind == f.APPROVED_ONLINE and result.channel == "standalone" and pid:
            self.on_standalone_approved(pid)

    def _notice(self, now_ms: int, notice: m.Notice) -> None:
        if isinstance(notice, m.StatusChanged):
            self.trace.add(
                now_ms, f.MODE, self.terminal_id, detail=f"{notice.mode}/{notice.network}"
            )
            if notice.mode != "prompting":
                self.prompting = False
        elif isinstance(notice, m.OfflinePrompt):
            self.prompting = True
        elif isinstance(notice, m.ResumePrompt):
            self.resume_prompted = True
        elif isinstance(notice, m.PaymentForwarded):
            self.trace.add(
                now_ms, "forwarded", self.terminal_id, notice.payment_id, 0, notice.status
            )
        elif isinstance(notice, m.VoidDecided):
            r = notice.result
            amount = 0 if r.amount is None else r.amount.minor
            if r.outcome == "requested":
                self.trace.add(now_ms, f.VOID_REQUESTED, self.terminal_id, r.payment_id, amount)
            else:
                self.trace.add(
                    now_ms,
                    f.VOID_DECLINED_LOCALLY,
                    self.terminal_id,
                    r.payment_id,
                    amount,
                    r.reason,
                )
        elif isinstance(notice, m.PaymentVoided):
            self.trace.add(
                now_ms, f.VOIDED, self.terminal_id, notice.payment_id, notice.amount.minor
            )
        elif isinstance(notice, m.VoidRefused):
            self.trace.add(
                now_ms,
                f.VOID_REFUSED,
                self.terminal_id,
                notice.payment_id,
                notice.amount.minor,
                notice.reason,
            )
        elif isinstance(notice, m.ForwardingFailed):
            self.trace.add(now_ms, f.NOTICE, self.terminal_id, detail=notice.code)

    def tick(self, now_ms: int) -> None:
        self._handle(now_ms, m.Tick(now_ms))

    def connected(self, now_ms: int) -> None:
        self._handle(now_ms, m.Connected(now_ms))

    def connect_failed(self, now_ms: int, outage: str) -> None:
        self._handle(
            now_ms, m.ConnectFailed(now_ms, "provider" if outage == "provider" else "network")
        )

    def disconnected(self, now_ms: int, outage: str) -> None:
        self._handle(
            now_ms, m.Disconnected(now_ms, "provider" if outage == "provider" else "network")
        )

    def receive(self, now_ms: int, frame: bytes) -> None:
        try:
            message = protocol.decode(frame)
        except ProtocolError as exc:
            self.trace.add(now_ms, "protocol_error", self.terminal_id, detail=str(exc)[:200])
            return
        self._handle(now_ms, m.Received(now_ms, message))

    def operator_activate(self, now_ms: int) -> None:
        if self.machine is None:
            return
        # A stale prompt (the link came back first): the operator's tap does nothing.
        with contextlib.suppress(Refused, InvalidState):
            self._handle(now_ms, m.ActivateOffline(now_ms))

    def set_disk_full(self, full: bool) -> None:
        self.store.disk_full = full

    def take_payment(self, now_ms: int, attempt: Attempt) -> None:
        """Feed a TakePayment; the outcome is traced when the machine decides it."""
        if self.machine is None:
            self.trace.add(
                now_ms, f.REFUSED, self.terminal_id, "", attempt.amount_minor, "terminal_down"
            )
            return
        self._payment_counter += 1
        pid = new_payment_id(now_ms, self.rng.randbytes(PAYMENT_ID_RANDOM_BYTES))
        card = m.CardRead(
            CardData(attempt.pan, attempt.exp_month, attempt.exp_year),
            Brand(attempt.brand),
            frozenset(Brand(b) for b in attempt.co_brands),
        )
        event = m.TakePayment(
            now_ms,
            pid,
            Money(attempt.amount_minor, attempt.currency),
            card,
            EntryMethod(attempt.entry_method),
            self.rng.randbytes(32),
            self.rng.randbytes(12),
            attempt.email,
            attempt.standalone,
        )
        self.trace.add(now_ms, f.ATTEMPT, self.terminal_id, pid, attempt.amount_minor)
        try:
            self._handle(now_ms, event)
        except Refused as exc:
            self.trace.add(
                now_ms, f.REFUSED, self.terminal_id, pid, attempt.amount_minor, exc.reason
            )

    def void_payment(self, now_ms: int, payment_id: str) -> None:
        """The operator voids a payment; what the POS is told is traced (``void_*``)."""
        if self.machine is None:
            self.trace.add(
                now_ms, f.VOID_DECLINED_LOCALLY, self.terminal_id, payment_id, 0, "terminal_down"
            )
            return
        self._handle(now_ms, m.VoidPayment(now_ms, payment_id))

    # -- reading -------------------------------------------------------------------------

    def view(self, now_ms: int) -> TerminalView:
        if self.machine is None:
            return TerminalView("down", 0, 0, False)
        status = self.machine.status(now_ms)
        return TerminalView(
            status.mode, status.pending_amount.minor, status.pending_count, self.prompting
        )

    def facts(self) -> TerminalFacts:
        s = self.setup
        return TerminalFacts(
            s.terminal_id,
            s.device_class,
            s.per_transaction_limit_minor,
            s.total_limit_minor,
            self.store.read_back(),
            "" if self.machine is None else self.machine.status(self._now_ms).mode,
            self.store.files(),
            [],
        )
