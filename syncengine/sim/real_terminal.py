"""One real terminal process of the real-process tier (``python -m syncengine.sim.real_terminal
CONFIG.json``).

It runs the node SDK (:class:`syncengine.node.Terminal`) against a real ``syncengine serve``
(through the tier's TCP proxy) and takes payments per the scenario's workload on a
compressed scenario clock: scenario time = ``start_ms + (now - t0) * clock_factor``. What
the POS is told goes to a JSON-lines log (``flush`` after each line, so a SIGKILL loses
nothing written before it); an attempt is logged with its payment id *before* the payment
is stored (the id's random bytes are drawn here and fed to the SDK when it asks for them,
right after it read the clock, so the id is known at that moment), so a payment stored by
a process killed mid-capture is still known to come from a customer.

The orchestrator (:mod:`syncengine.sim.real`) SIGKILLs and restarts it; a restart reopens
the same database (no second enrollment) and continues the workload.

Voids (``[workload] void_fraction``, ``void_after``) are decided as the in-memory tier
decides them: for every standalone payment the POS is told ``approved_online``, one draw
from the terminal's own void stream (``seed:voids:<id>``; after a restart
``seed:voids:<id>:<boot>``) says whether the operator voids it, ``void_after`` later in
scenario time, through :meth:`Terminal.void_payment`. The answer is logged as
``void_requested`` or ``void_declined_locally`` (with the reason), the ``PaymentVoided`` /
``VoidRefused`` notices as ``voided`` / ``void_refused``. A void still waiting in a process
that is killed is lost with it (the operator walked away).

Faults of the terminal's own device are applied here, from the scenario's fault list
(:func:`device_changes`, in the order the in-memory tier applies them):

- ``clock_skew``: the clock handed to the SDK reads scenario time + ``offset``; the log's
  own timestamps stay on the true scenario clock (they are merged with the other
  processes' traces);
- ``disk_full``: the store's connection gets ``PRAGMA max_page_count`` = its page count at
  the window's start (writes that need a new page fail with ``SQLITE_FULL``, which the SDK
  reports as a storage failure), and its previous limit back at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from syncengine.core import crypto, protocol
from syncengine.core.crypto import CardData
from syncengine.core.errors import InvalidState, StorageError, SyncEngineError
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import Brand, EntryMethod
from syncengine.node.machine import CardRead, Notice, OfflinePrompt, PaymentVoided, VoidRefused
from syncengine.node.sdk import Terminal
from syncengine.sim import facts as f
from syncengine.sim.runner import make_attempt
from syncengine.sim.scenario import FaultSpec, load
from syncengine.sim.terminal import TerminalSetup, terminal_config

#: Faults of the terminal's own device, applied by this process (not by the orchestrator).
DEVICE_KINDS = frozenset({"clock_skew", "disk_full"})


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """A device fault starting or ending, ``at_ms`` scenario ms after the start."""

    at_ms: int
    kind: str  # "clock_skew" | "disk_full"
    start: bool
    value: int = 0  # clock_skew: the offset it sets (ms)


@dataclass(frozen=True, slots=True)
class DeviceState:
    skew_ms: int = 0
    disk_full: bool = False


def device_changes(faults: Sequence[FaultSpec], terminal_id: str) -> list[DeviceChange]:
    """The device fault changes of ``terminal_id``, in the in-memory tier's order.

    As there (:mod:`syncengine.sim.faults`): a start sets the state (a ``clock_skew`` its
    offset, ``disk_full`` full), any end clears it (skew 0, disk not full), so of
    overlapping faults the one started last rules until the first end. At the same
    millisecond starts come before ends, starts in the scenario's fault order. A
    ``clock_skew`` without ``duration`` lasts to the end.
    """
    starts: list[DeviceChange] = []
    ends: list[DeviceChange] = []
    for fault in faults:
        if fault.kind not in DEVICE_KINDS or not fault.hits(terminal_id):
            continue
        value = fault.offset_ms if fault.kind == "clock_skew" else 0
        starts.append(DeviceChange(fault.at_ms, fault.kind, True, value))
        if fault.duration_ms > 0:
            ends.append(DeviceChange(fault.at_ms + fault.duration_ms, fault.kind, False))
    return sorted(starts + ends, key=lambda c: (c.at_ms, not c.start))


def device_state(changes: Sequence[DeviceChange], elapsed_ms: int) -> DeviceState:
    """The device's state ``elapsed_ms`` scenario ms after the start (changes at exactly
    that time applied: a fault covers ``[at, at + duration)``)."""
    skew_ms, full = 0, False
    for c in changes:
        if c.at_ms > elapsed_ms:
            break
        if c.kind == "clock_skew":
            skew_ms = c.value if c.start else 0
        else:
            full = c.start
    return DeviceState(skew_ms, full)


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.scenario = load(cfg["scenario"])
        self.tid: str = cfg["terminal_id"]
        self.factor: float = cfg["clock_factor"]
        self.t0: float = cfg["t0"]
        self.start_ms: int = cfg["start_ms"]
        self.rng = random.Random(f"{cfg['seed']}:real:{self.tid}:{cfg['boot']}")
        # The in-memory tier's void stream (``seed:voids:<id>``); a restart draws afresh.
        boot = f":{cfg['boot']}" if cfg["boot"] else ""
        self.void_rng = random.Random(f"{cfg['seed']}:voids:{self.tid}{boot}")
        self._voids: set[asyncio.Task[None]] = set()  # voids under way (kept referenced)
        self.pans: set[str] = set()
        self.log: IO[str] = open(cfg["log"], "a", encoding="utf-8")  # noqa: SIM115
        self.pan_log: IO[str] = open(cfg["pans"], "a", encoding="utf-8")  # noqa: SIM115
        self._next_id: tuple[bytes, int] | None = None  # (random bytes, amount) to hand out
        self._pid = ""  # the id of the payment being taken, once the SDK asked for it
        self._last_now_ms = 0
        self.terminal: Terminal | None = None
        self.changes = device_changes(self.scenario.faults, self.tid)
        # Skew steps for the clock: (elapsed ms, skew from then on).
        self._skew_at = [c.at_ms for c in self.changes if c.kind == "clock_skew"]
        self._skew = [device_state(self.changes, at).skew_ms for at in self._skew_at]
        self._page_limit: int | None = None  # the store's own max_page_count while full

    def now_ms(self) -> int:
        """True scenario time (the log's timestamps, the workload's schedule)."""
        return self.start_ms + int((time.time() - self.t0) * 1000 * self.factor)

    def skew_ms(self, elapsed_ms: int) -> int:
        i = bisect_right(self._skew_at, elapsed_ms)
        return self._skew[i - 1] if i else 0

    def device_ms(self) -> int:
        """The terminal's clock as the SDK reads it: scenario time plus any clock skew."""
        now = self.now_ms()
        self._last_now_ms = now + self.skew_ms(now - self.start_ms)
        return self._last_now_ms

    def random_bytes(self, n: int) -> bytes:
        if n == PAYMENT_ID_RANDOM_BYTES and self._next_id is not None:
            # The SDK read the clock (now_ms) just before asking for the id's random bytes,
            # with no await in between: the id is known here, before anything is stored.
            raw, amount_minor = self._next_id
            self._next_id = None
            self._pid = new_payment_id(self._last_now_ms, raw)
            self.trace(f.ATTEMPT, self._pid, amount_minor)
            return raw
        return os.urandom(n)

    def trace(self, kind: str, pid: str = "", value: int = 0, detail: str = "") -> None:
        event = {"at": self.now_ms(), "kind": kind, "t": self.tid, "pid": pid}
        event |= {"value": value, "detail": detail}
        self.log.write(json.dumps(event) + "\n")
        self.log.flush()

    async def enroll(self, request: protocol.EnrollRequest) -> None:
        async with httpx.AsyncClient(base_url=self.cfg["api_url"], timeout=10) as client:
            response = await client.post("/v1/enroll", json=request.to_fields())
            response.raise_for_status()

    def on_notice(self, notice: Notice) -> None:
        if isinstance(notice, OfflinePrompt):
            delay_s = self.scenario.merchant.operator_delay_ms / 1000 / self.factor
            asyncio.get_running_loop().call_later(delay_s, self._operator)
        elif isinstance(notice, PaymentVoided):
            self.trace(f.VOIDED, notice.payment_id, notice.amount.minor)
        elif isinstance(notice, VoidRefused):
            self.trace(f.VOID_REFUSED, notice.payment_id, notice.amount.minor, notice.reason)
        self.trace(f.MODE, detail=type(notice).__name__)

    def _operator(self) -> None:
        if self.terminal is not None:
            with contextlib.suppress(SyncEngineError):  # a stale prompt: the link came back
                self.terminal.activate_offline()

    async def run(self) -> None:
        m = self.scenario.merchant
        spec = next(t for t in self.scenario.terminals if t.id == self.tid)
        setup = TerminalSetup(
            terminal_id=self.tid,
            merchant_id=self.cfg["merchant_id"],
            device_class=spec.device_class,
            currency=m.currency,
            region=m.region,
            offline_allowed=m.offline_allowed,
            offline_entry=m.offline_entry,
            auto_after_ms=m.auto_after_ms,
            auto_on_provider_outage=m.auto_on_provider_outage,
            per_transaction_limit_minor=m.per_transaction_limit_minor,
            total_limit_minor=m.total_limit_minor,
            rules=m.rules,
            processor_public_key=crypto.b64d(self.cfg["processor_public_key"]),
            signing_key=b"",
            server_public_key=crypto.b64d(self.cfg["server_public_key"]),
        )
        config = terminal_config(setup)
        self.terminal = await Terminal.open(
            self.cfg["db"],
            config,
            self.cfg["ws_url"],
            enrollment_code=self.cfg.get("code"),
            enroll=self.enroll,
            clock_ms=self.device_ms,
            random_bytes=self.random_bytes,
        )
        self.terminal.subscribe(self.on_notice)
        self.trace(f.RESTART)
        disk = asyncio.ensure_future(self.disk_faults())
        print("enrolled", flush=True)
        await self.terminal.start()
        await self.workload()
        await asyncio.gather(disk, asyncio.Event().wait())  # sync until SIGTERM / SIGKILL

    async def disk_faults(self) -> None:
        """Apply this terminal's ``disk_full`` windows to its store, on the SDK's loop (its
        writes run there too, so none is caught half-way)."""
        elapsed = self.now_ms() - self.start_ms
        self.set_disk_full(device_state(self.changes, elapsed).disk_full)  # after a restart
        times = sorted({c.at_ms for c in self.changes if c.kind == "disk_full"})
        for at in (t for t in times if t > elapsed):
            await asyncio.sleep(max(0.0, (self.start_ms + at - self.now_ms()) / 1000 / self.factor))
            self.set_disk_full(device_state(self.changes, at).disk_full)

    def set_disk_full(self, full: bool) -> None:
        assert self.terminal is not None
        conn = self.terminal.store.conn
        if full and self._page_limit is None:
            self._page_limit = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count = {pages}")
        elif not full and self._page_limit is not None:
            conn.execute(f"PRAGMA max_page_count = {self._page_limit}")
            self._page_limit = None

    async def workload(self) -> None:
        wl = self.scenario.workload
        stop_ms = self.start_ms + (
            wl.stop_ms if wl.stop_ms is not None else self.scenario.duration_ms
        )
        rate = wl.payments_per_hour
        if rate <= 0:
            return
        while True:
            gap_ms = int(self.rng.expovariate(rate / 3_600_000)) + 1
            await asyncio.sleep(gap_ms / 1000 / self.factor)
            if self.now_ms() >= stop_ms:
                return
            if self.now_ms() >= self.start_ms + wl.start_ms:
                await self.take_one()

    async def take_one(self) -> None:
        assert self.terminal is not None
        attempt = make_attempt(self.scenario, self.rng, self.pans)
        self.pan_log.write(attempt.pan + "\n")
        self.pan_log.flush()
        self._next_id = (self.rng.randbytes(PAYMENT_ID_RANDOM_BYTES), attempt.amount_minor)
        self._pid = ""
        card = CardRead(
            CardData(attempt.pan, attempt.exp_month, attempt.exp_year),
            Brand(attempt.brand),
            frozenset(Brand(b) for b in attempt.co_brands),
        )
        result, refused = None, ""
        try:
            result = await self.terminal.take_payment(
                Money(attempt.amount_minor, attempt.currency),
                card,
                EntryMethod(attempt.entry_method),
                attempt.email,
                standalone=attempt.standalone,
            )
        except StorageError:
            refused = "storage_failed"
        except (SyncEngineError, TimeoutError) as exc:
            refused = type(exc).__name__
        finally:
            if self._next_id is not None:  # answered without asking for an id (closed)
                self._next_id = None
                self.trace(f.ATTEMPT, "", attempt.amount_minor)
        pid = self._pid
        if result is None:
            self.trace(f.REFUSED, pid, attempt.amount_minor, refused)
            return
        kind = {
            "approved_offline": f.APPROVED_OFFLINE,
            "approved_online": f.APPROVED_ONLINE,
            "declined": f.DECLINED_ONLINE,
            "refused": f.REFUSED,
        }.get(result.outcome, "pending")
        self.trace(kind, result.payment_id or pid, attempt.amount_minor, result.reason or "")
        if kind == f.APPROVED_OFFLINE:
            outstanding = self.terminal.status().pending_amount.minor
            self.trace(f.OUTSTANDING, pid, outstanding)
        if kind == f.APPROVED_ONLINE and result.channel == "standalone" and result.payment_id:
            self.maybe_void(result.payment_id)

    def maybe_void(self, payment_id: str) -> None:
        """A standalone payment was approved at the till: the operator voids a share of
        them ``void_after`` later (one draw from the void stream per payment, as in the
        in-memory tier)."""
        if not self.wants_void():
            return
        after_ms = self.scenario.workload.void_after_ms
        task = asyncio.ensure_future(self.void_later(payment_id, after_ms))
        self._voids.add(task)
        task.add_done_callback(self._voids.discard)

    def wants_void(self) -> bool:
        """The operator's decision for the next approved standalone payment (the in-memory
        tier's ``_maybe_void``: no draw at all without ``void_fraction``)."""
        fraction = self.scenario.workload.void_fraction
        return fraction > 0 and self.void_rng.random() < fraction

    async def void_later(self, payment_id: str, after_ms: int) -> None:
        await asyncio.sleep(after_ms / 1000 / self.factor)
        await self.void_one(payment_id)

    async def void_one(self, payment_id: str) -> None:
        """Void ``payment_id`` through the SDK; what the POS is told is logged."""
        assert self.terminal is not None
        try:
            result = await self.terminal.void_payment(payment_id)
        except StorageError:
            self.trace(f.VOID_DECLINED_LOCALLY, payment_id, 0, "storage_failed")
            return
        except InvalidState:  # closed: the process is going down
            self.trace(f.VOID_DECLINED_LOCALLY, payment_id, 0, "terminal_down")
            return
        amount = 0 if result.amount is None else result.amount.minor
        if result.outcome == "requested":
            self.trace(f.VOID_REQUESTED, payment_id, amount)
        else:
            self.trace(f.VOID_DECLINED_LOCALLY, payment_id, amount, result.reason)


async def _main(cfg: dict[str, Any]) -> None:
    driver = Driver(cfg)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(driver.run())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        if driver.terminal is not None:
            await driver.terminal.close()


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[1]).read_text())
    cfg = dict(cfg, boot=int(argv[2]) if len(argv) > 2 else 0)
    asyncio.run(_main(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
