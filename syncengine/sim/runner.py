"""The deterministic runner: one process, virtual time, one seed.

Theory of operation
-------------------
1. :func:`run` builds a :class:`World` from a scenario and a seed: the real
   TerminalMachine of each terminal (through :class:`~syncengine.sim.terminal.MachineTerminal`),
   a sync server, the real sandbox processor ledger, the simulated network and the fault
   injector. Every random choice comes from ``random.Random`` objects derived from the one
   seed by name (``seed:net``, ``seed:workload``...), so adding a fault does not reshuffle
   the workload.
2. Time is virtual (:class:`~syncengine.sim.clock.EventQueue`). The run lasts the
   scenario's ``duration``, then keeps going without new payments until every fault has
   ended plus ``settle`` (the liveness window), so that "every payment final after the
   network heals" can be judged.
3. At the end the world is read back into :class:`~syncengine.sim.facts.RunFacts` (the
   stores, the ledger, the trace) and handed to the checker. The result carries the
   counters, the violations, and samples for the report's timeline.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from syncengine.core import protocol
from syncengine.core.crypto import Ed25519KeyPair, luhn_ok
from syncengine.core.policy.limits import limit_maxima
from syncengine.processor.sandbox import TEST_CARDS
from syncengine.sim import checker
from syncengine.sim import facts as f
from syncengine.sim.adapters import Attempt
from syncengine.sim.clock import EventQueue
from syncengine.sim.faults import DISRUPTIVE_KINDS, FaultInjector
from syncengine.sim.network import Network
from syncengine.sim.processor import SimProcessor
from syncengine.sim.scenario import FaultSpec, Scenario
from syncengine.sim.server import EnrolledTerminal, RealServer, scenario_settings
from syncengine.sim.terminal import MachineTerminal, TerminalSetup

TICK_MS_DEFAULT = 5_000  # terminals are ticked at their heartbeat interval
SERVER_TICK_MS_DEFAULT = 2_000
SAMPLES_COUNT_MAX = 600  # timeline points per terminal in the report
CONNECT_MS = 50  # a TCP + TLS connect on a good link
SERVER_CLOSE_MS = 500  # a closing server's last frames arrive before the socket goes
PROGRESS_EVERY_S = 10.0  # wall time between two progress calls of a long run
PROGRESS_STEP_MS = 60_000  # virtual time run between two looks at the wall clock

#: ``progress(elapsed_ms, total_ms, payments)``: see :func:`run`.
Progress = Callable[[int, int, int], None]

#: Card numbers by brand that the sandbox approves (Luhn-valid; see docs/processor.md).
APPROVE_PANS: dict[str, str] = {
    "visa": "4242424242424242",
    "mastercard": "5555555555554444",
    "amex": "378282246310005",
    "discover": "6011111111111117",
}
DECLINE_PANS = sorted(pan for pan, rule in TEST_CARDS.items() if rule.kind == "decline")


def _luhn_complete(prefix: str) -> str:
    for digit in "0123456789":
        if luhn_ok(prefix + digit):
            return prefix + digit
    raise AssertionError("unreachable: one check digit always fits")


@dataclass
class Sample:
    """One point of the timeline for one terminal."""

    at_ms: int
    terminal: str
    mode: str
    link_up: bool
    outstanding_minor: int
    pending_count: int


def make_attempt(scenario: Scenario, r: random.Random, pans: set[str]) -> Attempt:
    """The next customer of ``scenario``'s workload, drawn from ``r`` (both tiers use it)."""
    wl = scenario.workload
    amount = r.randint(wl.amount_min_minor, wl.amount_max_minor)
    kind = r.choices(sorted(wl.cards), [wl.cards[k] for k in sorted(wl.cards)])[0]
    entry = r.choices(sorted(wl.entry), [wl.entry[k] for k in sorted(wl.entry)])[0]
    brand, co = kind, cast(tuple[str, ...], ())
    if kind == "eftpos_visa":
        brand, co = "eftpos", ("visa",)
    declined = r.random() < wl.decline_rate
    if declined:
        pan = r.choice(DECLINE_PANS)
    elif brand in APPROVE_PANS:
        pan = APPROVE_PANS[brand]
    else:
        pan = _luhn_complete("6" + "".join(str(r.randrange(10)) for _ in range(14)))
    pans.add(pan)
    email = f"customer{r.randrange(10**6)}@example.com" if r.random() < wl.emails else None
    # drawn only when asked for, so workloads without standalone payments keep their stream
    standalone = wl.standalone > 0 and r.random() < wl.standalone
    return Attempt(
        amount, scenario.merchant.currency, brand, co, entry, pan, 12, 2030, email, standalone
    )


@dataclass
class RunResult:
    """What one run produced: counters, violations, and material for the report."""

    scenario: Scenario
    seed: int
    counters: dict[str, int]
    violations: list[str]
    invariants: list[checker.InvariantResult]
    expect_failures: list[str]
    facts: f.RunFacts
    samples: list[Sample] = field(default_factory=list)
    fault_windows: list[tuple[str, int, int, str]] = field(default_factory=list)
    wall_s: float = 0.0
    events_count: int = 0
    network: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.expect_failures

    def to_json(self) -> dict[str, Any]:
        c = self.counters
        return {
            "name": self.scenario.name,
            "seed": self.seed,
            "ok": self.ok,
            **{
                k: c.get(k, 0)
                for k in (
                    "captured",
                    "approved",
                    "declined",
                    "expired",
                    "pending",
                    "refused",
                    "lost",
                    "duplicate_charges",
                    "limit_breaches",
                    "budget_breaches",
                    "attempts",
                    "approved_online",
                    "approved_offline",
                    "declined_online",
                    "voids_requested",
                    "voided",
                    "void_refused",
                    "void_declined_locally",
                )
            },
            "violations": list(self.violations) + list(self.expect_failures),
            "virtual_ms": self.facts.end_ms - self.facts.start_ms,
            "wall_s": round(self.wall_s, 3),
        }


class World:
    """Everything one run touches, wired together on one event queue."""

    def __init__(self, scenario: Scenario, seed: int, data_dir: Path) -> None:
        self.scenario = scenario
        self.data_dir = data_dir
        self.seed = seed
        self.queue = EventQueue()
        self.trace = f.Trace()

        def rng(name: str) -> random.Random:
            return random.Random(f"{seed}:{name}")

        self.net_rng, self.fault_rng, self.work_rng = rng("net"), rng("faults"), rng("workload")
        keys = rng("keys")
        self.network = Network(self.queue, self.net_rng)
        self.network.on_reset = self._reset
        self.processor = SimProcessor(keys.randbytes(32), rng("processor"))
        merchant = scenario.merchant
        self.server = RealServer(
            self.processor,
            self.trace,
            merchant.id,
            merchant.currency,
            data_dir,
            rng("server"),
            rng("server-key").randbytes(32),
            timezone=merchant.timezone,
            offline_budget_minor=merchant.offline_budget_minor,
        )
        self.server.on_close = self._server_closed
        self.skew_ms: dict[str, int] = {}
        self.connected: set[str] = set()
        self.provider_outage = False
        self.server_up = True
        self._budget_pending: int | None = None  # a budget change waiting for the server
        self.terminals: dict[str, MachineTerminal] = {}
        self.pans: set[str] = set()
        self.bug_total_limit = any(ft.bug == "ignore_total_limit" for ft in scenario.faults)
        self.samples: list[Sample] = []
        self.fault_windows: list[tuple[str, int, int, str]] = []
        self._disruptions: dict[int, FaultSpec] = {}
        self.healed_at_ms: int | None = self.queue.start_ms
        self._operator_pending: set[str] = set()
        self.arrivals_count = 0  # customers so far (progress lines)
        total_max = limit_maxima(merchant.currency)[1].minor
        for spec in scenario.terminals:
            setup = TerminalSetup(
                terminal_id=spec.id,
                merchant_id=merchant.id,
                device_class=spec.device_class,
                currency=merchant.currency,
                region=merchant.region,
                offline_allowed=merchant.offline_allowed,
                offline_entry=merchant.offline_entry,
                auto_after_ms=merchant.auto_after_ms,
                auto_on_provider_outage=merchant.auto_on_provider_outage,
                per_transaction_limit_minor=merchant.per_transaction_limit_minor,
                total_limit_minor=total_max if self.bug_total_limit else merchant.total_limit_minor,
                rules=merchant.rules,
                processor_public_key=self.processor.public_key,
                signing_key=keys.randbytes(32),
                server_public_key=self.server.public_key,
            )
            self.terminals[spec.id] = MachineTerminal(
                setup,
                rng(f"terminal:{spec.id}"),
                self.trace,
                data_dir / f"terminal-{spec.id}.db",
                self._t_send,
                self._connect_at,
                self._close,
            )
            self.terminals[spec.id].on_standalone_approved = functools.partial(
                self._maybe_void, spec.id, rng(f"voids:{spec.id}")
            )
            self.skew_ms[spec.id] = 0

    # -- time as each component sees it ----------------------------------------------------

    def tnow(self, tid: str) -> int:
        return self.queue.now_ms + self.skew_ms.get(tid, 0)

    # -- connections -------------------------------------------------------------------------

    def _connect_at(self, tid: str, at_ms: int) -> None:
        real_at = at_ms - self.skew_ms.get(tid, 0)
        self.queue.schedule(
            max(real_at, self.queue.now_ms) + CONNECT_MS, lambda: self._connect(tid), "connect"
        )

    def _connect(self, tid: str) -> None:
        term = self.terminals[tid]
        if not term.up or tid in self.connected:
            return
        if not self.network.is_up(tid):
            term.connect_failed(self.tnow(tid), "network")
        elif not self.server_up:
            term.connect_failed(self.tnow(tid), "provider")
        else:
            self.network.new_epoch(tid)
            self.connected.add(tid)
            self.server.open_session(self.queue.now_ms, tid)
            term.connected(self.tnow(tid))

    def _close(self, tid: str) -> None:
        """The terminal closed its connection (it already knows)."""
        if tid in self.connected:
            self.connected.discard(tid)
            self.network.new_epoch(tid)
            self.server.close_session(tid)

    def _reset(self, tid: str) -> None:
        """The connection died under both ends (a dropped frame)."""
        if tid in self.connected:
            self.connected.discard(tid)
            self.server.close_session(tid)
            term = self.terminals[tid]
            if term.up:
                term.disconnected(self.tnow(tid), "network")

    def _server_closed(self, tid: str) -> None:
        """The server closed the session (after a fatal error frame): the socket goes
        down once the frames already sent had time to arrive."""
        epoch = self.network.epoch(tid)

        def close() -> None:
            if self.network.epoch(tid) == epoch:
                self._reset(tid)

        self.queue.after(SERVER_CLOSE_MS, close, "server-close")

    def _t_send(self, tid: str, frame: bytes) -> None:
        if tid not in self.connected:
            return
        self.network.send(tid, "up", frame, lambda fr: self._server_receive(tid, fr))

    def _server_receive(self, tid: str, frame: bytes) -> None:
        if not self.server_up:
            return
        self.server.receive(self.queue.now_ms, tid, frame)
        self._flush_server()

    def _flush_server(self) -> None:
        for tid, frame in self.server.outgoing():
            if tid not in self.connected:
                continue
            if b'"type":"ack"' in frame:
                msg = protocol.decode(frame)
                if isinstance(msg, protocol.Ack):
                    self.trace.add(self.queue.now_ms, f.ACK, tid, value=msg.seq, detail=msg.origin)
            self.network.send(tid, "down", frame, functools.partial(self._t_receive, tid))

    def _t_receive(self, tid: str, frame: bytes) -> None:
        term = self.terminals[tid]
        if term.up and tid in self.connected:
            term.receive(self.tnow(tid), frame)

    # -- components going down and up --------------------------------------------------------

    def crash_terminal(self, tid: str, power_cut: bool = False) -> bool:
        """Kill terminal ``tid`` (``power_cut``: it loses power, see ``reboot``)."""
        term = self.terminals[tid]
        if not term.up:
            return False
        lost = term.crash(power_cut)
        self.trace.add(self.queue.now_ms, f.CRASH, tid, detail=f.POWER_CUT_ACK_LOST if lost else "")
        self._close(tid)
        return True

    def boot_terminal(self, tid: str) -> None:
        self.trace.add(self.queue.now_ms, f.RESTART, tid)
        self.terminals[tid].boot(self.tnow(tid))

    def setup_server(self) -> None:
        """Enroll every terminal with the scenario's settings, as an owner would."""
        m = self.scenario.merchant
        settings = scenario_settings(
            m.offline_allowed,
            m.offline_entry,
            m.auto_after_ms,
            m.per_transaction_limit_minor,
            # planted bug: the limit is configured nowhere (the checker still holds it)
            limit_maxima(m.currency)[1].minor if self.bug_total_limit else m.total_limit_minor,
        )
        self.server.setup(
            self.queue.now_ms,
            [
                EnrolledTerminal(
                    tid,
                    term.setup.device_class,
                    Ed25519KeyPair.from_private(term.setup.signing_key).public,
                    settings,
                )
                for tid, term in self.terminals.items()
            ],
            m.offline_allowed,
        )

    def crash_server(self) -> bool:
        """Kill the server process now. False if it was already down."""
        if not self.server_up:
            return False
        self.server_up = False
        self.server.crash(self.queue.now_ms)
        self.trace.add(self.queue.now_ms, f.CRASH, "", detail="server")
        for tid in sorted(self.connected):
            self._close(tid)
            self.terminals[tid].disconnected(self.tnow(tid), "provider")
        return True

    def boot_server(self) -> None:
        self.server_up = True
        self.server.boot(self.queue.now_ms)
        self.trace.add(self.queue.now_ms, f.RESTART, "", detail="server")
        if self._budget_pending is not None:
            self.set_budget(self._budget_pending)

    def force_offline(self, tid: str, on: bool) -> None:
        """The portal's force-offline switch, written through the real server."""
        self.trace.add(self.queue.now_ms, f.FAULT, tid, value=int(on), detail="portal")
        self.server.force_offline(self.queue.now_ms, tid, on)
        self._flush_server()

    def set_budget(self, budget_minor: int) -> None:
        """The owner's ``PUT /v1/merchant/offline-budget``; while the server is down the
        owner tries again, and it takes effect when the server is back."""
        if not self.server_up or not self.server.set_offline_budget(
            self.queue.now_ms, budget_minor
        ):
            self._budget_pending = budget_minor
            return
        self._budget_pending = None
        self.trace.add(self.queue.now_ms, f.BUDGET, "", value=budget_minor, detail="portal")
        self._flush_server()

    def set_provider_outage(self, on: bool) -> None:
        self.provider_outage = on
        self.server.unavailable = on

    def plant_bug(self, name: str, on: bool) -> None:
        for target in (self.processor.bugs, self.server.bugs):
            (target.add if on else target.discard)(name)

    def fault_started(self, fault: FaultSpec) -> None:
        self.trace.add(self.queue.now_ms, f.FAULT, value=1, detail=fault.kind)
        if fault.kind in DISRUPTIVE_KINDS:
            self._disruptions[id(fault)] = fault
            self.healed_at_ms = None
        end = self.queue.now_ms + max(fault.duration_ms, 1_000)
        self.fault_windows.append(
            (fault.kind, self.queue.now_ms, end, ",".join(fault.targets or ()))
        )

    def fault_ended(self, fault: FaultSpec) -> None:
        self.trace.add(self.queue.now_ms, f.FAULT, value=0, detail=fault.kind)
        self._disruptions.pop(id(fault), None)
        if not self._disruptions and self.healed_at_ms is None:
            self.healed_at_ms = self.queue.now_ms

    # -- periodic work -----------------------------------------------------------------------

    def tick_terminals(self) -> None:
        for tid, term in self.terminals.items():
            if not term.up:
                continue
            term.tick(self.tnow(tid))
            if term.prompting and tid not in self._operator_pending:
                self._operator_pending.add(tid)
                self.queue.after(
                    self.scenario.merchant.operator_delay_ms,
                    functools.partial(self._operator, tid),
                    "operator",
                )
        self.queue.after(TICK_MS_DEFAULT, self.tick_terminals, "tick")

    def _operator(self, tid: str) -> None:
        self._operator_pending.discard(tid)
        term = self.terminals[tid]
        if term.up and term.prompting:
            term.operator_activate(self.tnow(tid))

    def tick_server(self) -> None:
        if self.server_up:
            self.server.tick(self.queue.now_ms)
            self._flush_server()
        self.queue.after(SERVER_TICK_MS_DEFAULT, self.tick_server, "server-tick")

    def sample(self, every_ms: int) -> None:
        now = self.queue.now_ms
        for tid, term in self.terminals.items():
            view = term.view(self.tnow(tid))
            self.samples.append(
                Sample(
                    now,
                    tid,
                    view.mode,
                    tid in self.connected,
                    view.outstanding_minor,
                    view.pending_count,
                )
            )
        self.queue.after(every_ms, lambda: self.sample(every_ms), "sample")

    # -- workload ----------------------------------------------------------------------------

    def _attempt(self) -> Attempt:
        return make_attempt(self.scenario, self.work_rng, self.pans)

    def arrival(self, tid: str) -> None:
        wl = self.scenario.workload
        stop = self.queue.start_ms + (
            wl.stop_ms if wl.stop_ms is not None else self.scenario.duration_ms
        )
        if self.queue.now_ms >= stop:
            return
        self.arrivals_count += 1
        attempt = self._attempt()
        self.terminals[tid].take_payment(self.tnow(tid), attempt)
        self.schedule_arrival(tid)

    def _maybe_void(self, tid: str, r: random.Random, payment_id: str) -> None:
        """A standalone payment was approved at the till: the operator voids a share of
        them ``void_after`` later (drawn from the terminal's own void stream)."""
        wl = self.scenario.workload
        if wl.void_fraction <= 0 or r.random() >= wl.void_fraction:
            return

        def void() -> None:
            self.terminals[tid].void_payment(self.tnow(tid), payment_id)

        self.queue.after(wl.void_after_ms, void, "void")

    def schedule_arrival(self, tid: str) -> None:
        """The terminal's next customer: Poisson arrivals inside the workload's window
        [``start``, ``stop``), so the first one comes a random gap after ``start``."""
        wl = self.scenario.workload
        if wl.payments_per_hour <= 0:
            return
        gap_ms = int(self.work_rng.expovariate(wl.payments_per_hour / 3_600_000)) + 1
        opens_ms = self.queue.start_ms + wl.start_ms
        self.queue.schedule(
            max(self.queue.now_ms, opens_ms) + gap_ms, lambda: self.arrival(tid), "arrival"
        )

    # -- facts -------------------------------------------------------------------------------

    def close(self) -> None:
        for term in self.terminals.values():
            term.store.drop()
        self.server.close()

    def facts(self) -> f.RunFacts:
        sc = self.scenario
        out = f.RunFacts(
            sc.name,
            self.seed,
            self.queue.start_ms,
            self.queue.now_ms,
            sc.merchant.currency,
            sc.settle_ms,
        )
        out.offline_budget_minor = sc.merchant.offline_budget_minor
        out.restore_hold = self.server.restore_hold(self.queue.now_ms)
        for tid, term in self.terminals.items():
            tf = term.facts()
            tf.total_limit_minor = sc.merchant.total_limit_minor  # what the checker holds it to
            out.terminals[tid] = tf
        out.server_ops = self.server.stored_ops()
        out.server_files = self.server.files()
        out.ledger = self.processor.ledger()
        out.refunds = self.processor.refunds()
        out.timezone = sc.merchant.timezone
        out.trace = self.trace.events
        out.pans = set(self.pans)
        out.healed_at_ms = self.healed_at_ms
        out.down_at_end = {t for t in self.terminals if not self.network.is_up(t)}
        return out


def _scratch_root() -> Path | None:
    # Stores are real SQLite files with synchronous=FULL; on tmpfs an fsync costs nothing,
    # which is what lets a 30-hour scenario run in seconds. Durability across a simulated
    # crash does not depend on fsync (the process "dies", the OS keeps the page cache).
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def run(
    scenario: Scenario,
    seed: int | None = None,
    keep_dir: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run ``scenario`` with ``seed`` (default: the scenario's) and check it.

    ``keep_dir``: keep every terminal's and the server's database there, in a folder
    named after the scenario and seed; otherwise they live in a temporary directory.
    ``progress``: called as ``progress(elapsed_ms, total_ms, payments)`` (virtual time
    reached, the run's virtual length, customers so far) at most every
    ``PROGRESS_EVERY_S`` of wall time, for long runs; it does not change the run.
    """
    seed = scenario.seed if seed is None else seed
    if keep_dir is not None:
        data_dir = keep_dir / f"{scenario.name}-seed{seed}"
        if data_dir.exists():
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True)
        return _run(scenario, seed, data_dir, progress)
    with tempfile.TemporaryDirectory(prefix="syncengine-sim-", dir=_scratch_root()) as tmp:
        return _run(scenario, seed, Path(tmp), progress)


def _run(scenario: Scenario, seed: int, data_dir: Path, progress: Progress | None) -> RunResult:
    started = time.perf_counter()
    world = World(scenario, seed, data_dir)
    q = world.queue
    world.setup_server()
    for tid in world.terminals:
        world.boot_terminal(tid)
        world.schedule_arrival(tid)
    FaultInjector(world).schedule(scenario.faults)
    end_ms = scenario.end_ms
    every_ms = max(TICK_MS_DEFAULT, end_ms // SAMPLES_COUNT_MAX)
    q.after(0, world.tick_terminals, "tick")
    q.after(0, world.tick_server, "server-tick")
    q.after(0, lambda: world.sample(every_ms), "sample")
    # Run in steps of virtual time to report progress between them: events never run
    # between two steps (each step ends at a moment, the next takes what is due after it),
    # so the run is the same event for event as one run_until to the end.
    end_at, last_report = q.start_ms + end_ms, started
    while q.now_ms < end_at:
        q.run_until(min(q.now_ms + PROGRESS_STEP_MS, end_at))
        wall = time.perf_counter()
        if progress is not None and q.now_ms < end_at and wall - last_report >= PROGRESS_EVERY_S:
            last_report = wall
            progress(q.elapsed_ms, end_ms, world.arrivals_count)
    facts = world.facts()
    world.close()
    report = checker.check(facts)
    expect_failures = checker.check_expect(scenario.expect, report.counters)
    return RunResult(
        scenario,
        seed,
        report.counters,
        report.violations,
        report.invariants,
        expect_failures,
        facts,
        world.samples,
        world.fault_windows,
        time.perf_counter() - started,
        q.executed_count,
        {
            "sent": world.network.stats.sent,
            "delivered": world.network.stats.delivered,
            "dropped": world.network.stats.dropped,
            "duplicated": world.network.stats.duplicated,
            "reordered": world.network.stats.reordered,
            "cut": world.network.stats.cut,
        },
    )
