"""Three real ``syncengine serve`` processes over one PostgreSQL database (R15).

Terminals are spread across the processes: each pushes its payments through one process
and listens for outcomes on another. One process is killed with SIGKILL while it holds a
forwarding lease; the others take over its terminals once the lease runs out. Then:

- the processor's ledger (audited by the sandbox client) shows every payment charged
  exactly once, under its payment id;
- every terminal received every outcome once, as a dense, correctly chained ``server/T``,
  whichever process wrote it and whichever process the terminal was connected to;
- an outcome pushed live reached its terminal within ``DELIVERY_BOUND_MS`` of being written.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import websockets
from server_kit import Running, TestTerminal, free_socket, healthy, wait_for

from syncengine.core import protocol
from syncengine.core.ops import GENESIS, Op
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox
from syncengine.server.reports import now_utc_ms

PROCESSES = 3
TERMINALS = 6
PAYMENTS_PER_TERMINAL = 40
LEASE_MS = 2_000  # short, so the survivors take over the killed process's terminals soon
DELIVERY_BOUND_MS = 3_000  # NOTIFY is immediate; the bound leaves room for a busy CI box
DRAIN_TIMEOUT_S = 60
REOPEN_ROUNDS_MAX = 300  # a listener's reconnect tries every live process this many times
REOPEN_PAUSE_S = 0.1


def _serve(data: Path, port: int, processor_url: str, store_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncengine.cli",
            "serve",
            "--data",
            str(data),
            "--port",
            str(port),
            "--processor",
            processor_url,
            "--store",
            store_url,
            "--forward-lease-ms",
            str(LEASE_MS),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class Cluster:
    """The server processes, their URLs, and the owner key they share (one database)."""

    data: Path
    ports: list[int]
    processor_url: str
    store_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    owner_key: str = ""

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def running(self, i: int) -> Running:
        return Running(None, self.urls[i], self.owner_key)  # type: ignore[arg-type]

    def alive(self, i: int) -> bool:
        return self.procs[i].poll() is None

    async def start(self, i: int) -> None:
        proc = _serve(self.data, self.ports[i], self.processor_url, self.store_url)
        if i < len(self.procs):
            self.procs[i] = proc  # a restart
        else:
            self.procs.append(proc)
        await wait_for(lambda: healthy(self.urls[i]), timeout_s=30)

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.procs[[p.pid for p in self.procs].index(pid)].wait(10)


@asynccontextmanager
async def running_cluster(
    n: int, data: Path, processor_url: str, store_url: str
) -> AsyncIterator[Cluster]:
    """N ``syncengine serve`` processes over one database; the first starts alone (it
    creates the server key and migrates), the others join it."""
    ports = []
    for _ in range(n):
        sock = free_socket()
        ports.append(sock.getsockname()[1])
        sock.close()
    c = Cluster(data, ports, processor_url, store_url)
    try:
        await c.start(0)
        for i in range(1, n):
            await c.start(i)
        c.owner_key = (data / "owner-api-key.txt").read_text().strip()
        yield c
    finally:
        for proc in c.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in c.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[str]:
    with running_sandbox(tmp_path / "processor") as running:
        yield running.url


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str, sandbox: str) -> AsyncIterator[Cluster]:
    # The data directory is shared: the server key and the first owner key file.
    async with running_cluster(PROCESSES, tmp_path / "server", sandbox, pg_url) as c:
        yield c


@dataclass
class Listener:
    """A second session of a terminal that only pulls and receives ``server/T``."""

    terminal: TestTerminal
    connected_to: int
    received: list[tuple[Op, int, int]] = field(default_factory=list)  # op, at_ms, process
    pulled: set[tuple[str, int]] = field(default_factory=set)  # (origin, seq) from a Pull
    reconnects: int = 0

    @property
    def last_seq(self) -> int:
        return self.received[-1][0].seq if self.received else 0

    def take(self, ops: tuple[Op, ...] | list[Op], pulled: bool) -> None:
        now_ms = now_utc_ms()
        for op in ops:
            if op.seq > self.last_seq:  # a pull after a reconnect may overlap
                self.received.append((op, now_ms, self.connected_to))
                if pulled:
                    self.pulled.add((op.origin, op.seq))

    async def open(self, cluster: Cluster, i: int) -> None:
        self.connected_to = i
        await self.terminal.connect(cluster.running(i))
        self.take(await self.terminal.pull(self.last_seq), pulled=True)

    async def run(self, cluster: Cluster) -> None:
        while True:
            try:
                message = await self.terminal.recv(timeout_s=3600)
                if isinstance(message, protocol.ServerOps):
                    self.take(message.ops, pulled=False)
            except (websockets.ConnectionClosed, OSError):
                # Its process died: reconnect to a live one and pull what was missed.
                self.reconnects += 1
                await self.reopen(cluster)

    async def reopen(self, cluster: Cluster) -> None:
        """Connect to a live process and pull. One restarting is alive before it listens
        (and a live one may die meanwhile): try them all again until one answers."""
        for _ in range(REOPEN_ROUNDS_MAX):
            for j in range(len(cluster.procs)):
                if not cluster.alive(j):
                    continue
                try:
                    await self.open(cluster, j)
                    return
                except (websockets.ConnectionClosed, websockets.InvalidHandshake, OSError):
                    continue
            await asyncio.sleep(REOPEN_PAUSE_S)
        raise AssertionError(f"{self.terminal.terminal_id}: no live process took it back")

    def finals(self) -> list[str]:
        return [
            op.body["payment_id"]
            for op, _at, _p in self.received
            if op.kind == "status" and op.body["status"] == "approved"
        ]


def _undelivered(pg_url: str, listeners: list[Listener], expected: list[str]) -> str:
    """What a listener still lacks, and what the database says of it, for a timeout."""
    lines = []
    with psycopg.connect(pg_url) as conn:
        for li in listeners:
            tid = li.terminal.terminal_id
            missing = sorted(set(e for e in expected if e.startswith(tid + "-")) - set(li.finals()))
            if not missing:
                continue
            rows = conn.execute(
                "SELECT payment_id, status, fwd_state, attempts FROM payments "
                "WHERE payment_id = ANY(%s) ORDER BY payment_id",
                (missing[:5],),
            ).fetchall()
            head = conn.execute(
                "SELECT server_seq, fwd_lease_owner, fwd_lease_until_ms FROM terminals "
                "WHERE terminal_id=%s",
                (tid,),
            ).fetchone()
            lines.append(
                f"{tid}: {len(missing)} missing, received up to #{li.last_seq} of {head}, "
                f"on process {li.connected_to} (reconnects {li.reconnects}): {rows}"
            )
    return "\n".join(lines)


def _raise_if_failed(tasks: list[asyncio.Task[None]]) -> None:
    """A listener that stopped would only show as a timeout: say why it stopped."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise AssertionError("a listener stopped") from task.exception()


def _lease_holders(pg_url: str) -> dict[str, int]:
    """terminal id -> pid of the process holding its live forwarding lease right now."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT terminal_id, fwd_lease_owner FROM terminals WHERE fwd_lease_until_ms > %s "
            "AND fwd_lease_owner IS NOT NULL",
            (now_utc_ms(),),
        ).fetchall()
    return {r[0]: int(str(r[1]).split("-")[1]) for r in rows}


def _pending_of(pg_url: str, terminal_ids: list[str]) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT payment_id FROM payments WHERE fwd_state='pending' AND terminal_id = ANY(%s)",
            (terminal_ids,),
        ).fetchall()
    return [r[0] for r in rows]


def _writers(pg_url: str) -> dict[str, int]:
    """payment id -> pid of the process whose attempt is recorded last."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT payment_id, last_attempt_owner FROM payments").fetchall()
    return {r[0]: int(str(r[1]).split("-")[1]) for r in rows if r[1]}


def _approved_count(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM payments WHERE status='approved'").fetchone()
    return 0 if row is None else int(row[0])


async def test_three_processes_sigkill_one_every_payment_charged_once(
    cluster: Cluster, sandbox: str, pg_url: str
) -> None:
    async with HttpProcessor(sandbox) as client:
        await client.set_faults(latency_ms=40, outcome_unknown_ppm=30_000)
        processor_public = await client.public_key()
        terminals = [
            TestTerminal(f"T{i}", processor_public=processor_public) for i in range(TERMINALS)
        ]
        for i, t in enumerate(terminals):
            await t.enroll(cluster.running(i % PROCESSES))
        # Listen on process i+1 before pushing through process i: outcomes must cross.
        listeners = []
        for i, t in enumerate(terminals):
            twin = TestTerminal(t.terminal_id, key=t.key, server_public=t.server_public)
            listener = Listener(twin, (i + 1) % PROCESSES)
            await listener.open(cluster, (i + 1) % PROCESSES)
            listeners.append(listener)
        tasks = [asyncio.create_task(listener.run(cluster)) for listener in listeners]
        now = now_utc_ms()
        expected: list[str] = []
        for i, t in enumerate(terminals):
            for k in range(PAYMENTS_PER_TERMINAL):
                t.capture(f"{t.terminal_id}-p{k:03d}", 100 + k, now - 60_000 + k)
                expected.append(f"{t.terminal_id}-p{k:03d}")
            await t.connect(cluster.running(i % PROCESSES))
            await t.push_all(batch_ops_max=20)
            await t.close()

        # SIGKILL a process while it holds a forwarding lease (mid-forwarding).
        async def someone_leases() -> bool:
            return _approved_count(pg_url) >= 10 and bool(_lease_holders(pg_url))

        await wait_for(someone_leases, timeout_s=30, interval_s=0.02)
        pids = [p.pid for p in cluster.procs]
        leases = _lease_holders(pg_url)
        victim_pid = next(pid for pid in leases.values() if pid in pids)
        cluster.kill(victim_pid)
        killed_at = time.monotonic()
        orphaned = _pending_of(pg_url, [t for t, pid in leases.items() if pid == victim_pid])
        assert orphaned, "killed too late: the victim had nothing left to forward"

        async def all_delivered() -> bool:
            _raise_if_failed(tasks)
            return all(len(li.finals()) == PAYMENTS_PER_TERMINAL for li in listeners)

        try:
            await wait_for(all_delivered, timeout_s=DRAIN_TIMEOUT_S, interval_s=0.1)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        drained_s = time.monotonic() - killed_at

        # The processor charged each payment exactly once, under its own id.
        audit = await client.audit()
        assert audit.ok, audit
        assert audit.charges_count == len(expected) and not audit.duplicate_charges
        charged = sorted(e.payment_id for e in await client.ledger() if isinstance(e, LedgerCharge))
        assert charged == sorted(expected)

    # Every terminal got every outcome once, on a dense chain, wherever it was connected.
    writers = _writers(pg_url)
    crossed = 0
    delays_ms: list[int] = []
    for li in listeners:
        ops = [op for op, _at, _p in li.received]
        assert [op.seq for op in ops] == list(range(1, len(ops) + 1))
        assert all(
            b.prev == (GENESIS if a is None else a.digest)
            for a, b in zip([None, *ops], ops, strict=False)
        )
        assert sorted(li.finals()) == sorted(
            e for e in expected if e.startswith(li.terminal.terminal_id + "-")
        )
        for op, at_ms, process in li.received:
            if op.kind != "status" or op.body["status"] != "approved":
                continue
            if (op.origin, op.seq) in li.pulled:
                continue  # caught up by a pull after (re)connecting, not pushed live
            delays_ms.append(at_ms - op.hlc.wall_ms)
            if writers.get(op.body["payment_id"]) != cluster.procs[process].pid:
                crossed += 1
    assert crossed > 0, "no outcome crossed processes; the test proves nothing"
    # The survivors finished what the victim held when it died.
    assert {writers[p] for p in orphaned} - {victim_pid}, "the survivors took nothing over"
    assert delays_ms and max(delays_ms) <= DELIVERY_BOUND_MS, sorted(delays_ms)[-5:]
    assert any(li.reconnects for li in listeners) or victim_pid not in [
        cluster.procs[li.connected_to].pid for li in listeners
    ]
    assert drained_s < DRAIN_TIMEOUT_S


@pytest.mark.slow
async def test_four_processes_two_kills_a_restart_and_a_processor_outage(
    tmp_path: Path, pg_url: str, sandbox: str
) -> None:
    """Longer: 4 processes, 12 terminals x 50 payments, lost answers (10 %) dropped by the
    connection, two lease holders SIGKILLed at different times (the first restarted), and
    a processor outage in between. Still every payment is charged exactly once."""
    terminals_n, per_terminal = 12, 50
    async with (
        running_cluster(4, tmp_path / "server", sandbox, pg_url) as cluster,
        HttpProcessor(sandbox) as client,
    ):
        await client.set_faults(
            latency_ms=30, outcome_unknown_ppm=100_000, outcome_unknown_mode="drop"
        )
        public = await client.public_key()
        terminals = [TestTerminal(f"T{i:02d}", processor_public=public) for i in range(terminals_n)]
        listeners = []
        for i, t in enumerate(terminals):
            await t.enroll(cluster.running(i % 4))
            twin = TestTerminal(t.terminal_id, key=t.key, server_public=t.server_public)
            listener = Listener(twin, (i + 1) % 4)
            await listener.open(cluster, (i + 1) % 4)
            listeners.append(listener)
        tasks = [asyncio.create_task(li.run(cluster)) for li in listeners]
        now = now_utc_ms()
        expected = []
        for i, t in enumerate(terminals):
            for k in range(per_terminal):
                t.capture(f"{t.terminal_id}-p{k:03d}", 100 + k, now - 60_000 + k)
                expected.append(f"{t.terminal_id}-p{k:03d}")
            await t.connect(cluster.running(i % 4))
            await t.push_all(batch_ops_max=25)
            await t.close()

        async def approved_at_least(n: int) -> bool:
            return _approved_count(pg_url) >= n and bool(_lease_holders(pg_url))

        pids = [p.pid for p in cluster.procs]
        await wait_for(lambda: approved_at_least(60), timeout_s=60, interval_s=0.02)
        first = next(pid for pid in _lease_holders(pg_url).values() if pid in pids)
        cluster.kill(first)
        await client.set_faults(outage=True)
        await asyncio.sleep(2)
        await client.set_faults(outage=False)
        await wait_for(lambda: approved_at_least(300), timeout_s=60, interval_s=0.02)
        alive = [p.pid for p in cluster.procs if p.poll() is None]
        second = next(pid for pid in _lease_holders(pg_url).values() if pid in alive)
        cluster.kill(second)
        await cluster.start(pids.index(first))  # the first one comes back

        async def all_delivered() -> bool:
            _raise_if_failed(tasks)
            return all(len(li.finals()) == per_terminal for li in listeners)

        try:
            await wait_for(all_delivered, timeout_s=120, interval_s=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_undelivered(pg_url, listeners, expected)}") from exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        audit = await client.audit()
        assert audit.ok, audit
        assert audit.charges_count == len(expected) and not audit.duplicate_charges
        charged = sorted(e.payment_id for e in await client.ledger() if isinstance(e, LedgerCharge))
        assert charged == sorted(expected)
    for li in listeners:
        ops = [op for op, _at, _p in li.received]
        assert [op.seq for op in ops] == list(range(1, len(ops) + 1))
        assert sorted(li.finals()) == sorted(
            e for e in expected if e.startswith(li.terminal.terminal_id + "-")
        )
