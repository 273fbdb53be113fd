"""The real-process tier (``syncengine scenario run --real``): the same scenario, real processes.

Theory of operation
-------------------
1. Processes: the sandbox processor (``syncengine processor``), the sync server
   (``syncengine serve --processor URL``) and one terminal process per scenario terminal
   (:mod:`syncengine.sim.real_terminal`, the node SDK). All on loopback, all in one run
   directory (kept with ``--keep``).
2. Setup is done as an owner would, over the REST API with the bootstrap owner key: allow
   standalone mode, accept liability, one enrollment code per terminal (the terminal
   enrolls itself), then the scenario's settings per terminal.
3. Time: terminals run on a compressed scenario clock (``clock_factor`` scenario seconds
   per real second); fault times are scaled the same way. The server and processor run on
   real time (their timers are short: poll 1 s, backoff up to 60 s).
4. Faults: every terminal reaches the server through its own asyncio TCP proxy.
   ``partition`` cuts it (live connections are aborted, new ones refused); ``delay`` and
   ``reorder`` delay traffic; ``duplicate`` re-sends whole websocket frames from the
   terminal (the proxy parses frame headers); ``drop`` aborts connections.
   ``crash``/``reboot`` SIGKILL a terminal and restart it after ``duration``;
   ``server_crash`` SIGKILLs the server (restart after ``duration``); processor faults use
   the sandbox's ``/v1/faults``; ``force_offline`` is a settings PUT; ``provider_outage`` is
   the provider's maintenance switch (``PUT /v1/maintenance`` on every server process, and
   ``--maintenance`` for one restarted inside the outage). ``clock_skew`` and ``disk_full``
   are faults of a terminal's own device: its process applies them itself from the
   scenario (:mod:`syncengine.sim.real_terminal`: a skewed SDK clock, a ``max_page_count``
   on its store), here they are only traced as windows. ``bug`` (a planted bug inside a
   process) is skipped and counted in the result.
5. At the end every process is stopped, and the facts are read back from disk (terminal
   stores, server store) and from the processor's ledger (charges and refunds): the same
   :func:`syncengine.sim.checker.check` judges them. The tier cannot see acks or durable
   commits inside the server, so ``ack_after_durable`` is judged by the simulator only.
6. PostgreSQL (``store_url``, ``--store``): a fresh database named after the scenario and
   seed is created from that server URL and dropped at the end (unless kept). ``servers``
   (``--servers N``) processes share it and one ``--data`` directory: the first starts
   alone (it writes the server key and the owner key file), the others join. Terminals
   are spread over the servers round robin; a proxy whose server is down routes the next
   connection to a live one. ``server_crash`` SIGKILLs one server chosen from the seed.
   The server's ops are read back through :class:`PostgresStore`, and its tables (binary
   ``COPY``) are searched for card numbers as the SQLite file is.
7. Progress: while the scenario's time runs, ``progress`` (if given) is called at most
   every ``runner.PROGRESS_EVERY_S`` of wall time, as the simulated tier does; the
   payments so far are the lines of the terminal processes' card-number logs (one per
   customer). Without it the run sleeps to the scenario's end in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from syncengine.core import crypto
from syncengine.core.bodies import StatusChange, parse_body
from syncengine.core.errors import StorageError
from syncengine.core.lifecycle import FINAL
from syncengine.core.ops import SERVER_PREFIX, Op, server_origin
from syncengine.node.store import Store as NodeStore
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import PPM, LedgerCharge, LedgerRefund
from syncengine.server.store.postgres import PostgresStore, redact_url
from syncengine.server.store.sqlite import SqliteStore
from syncengine.sim import checker, runner
from syncengine.sim import facts as f
from syncengine.sim.faults import DISRUPTIVE_KINDS
from syncengine.sim.runner import RunResult
from syncengine.sim.scenario import FaultSpec, Scenario

CLOCK_FACTOR_DEFAULT = 60.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LOAD_OPS_PAGE_MAX = 1_000
SERVERS_MAX = 16
# Forwarding lease of each server with --store: a SIGKILLed server holds its terminals
# this long (real time) before a live one takes them over.
FORWARD_LEASE_MS = 2_000
PG_CONNECT_TIMEOUT_S = 5
PG_NAME_BYTES_MAX = 63
PROXY_CHUNK_BYTES = 65_536
DUPLICATE_FRAMES_MAX = 10_000
REAL_SUPPORTED = frozenset(
    {
        "partition",
        "crash",
        "reboot",
        "server_crash",
        "server_restore",  # SQLite only: with --store the database's own tooling restores
        "duplicate",
        "delay",
        "reorder",
        "drop",
        "processor_outage",
        "processor_slow",
        "outcome_unknown",
        "force_offline",
        "budget_change",
        "provider_outage",
        "clock_skew",  # applied by the terminal processes themselves
        "disk_full",  # applied by the terminal processes themselves
    }
)
BUDGET_PUT_WAIT_S = 60.0  # a budget change waits this long (real seconds) for a server
PROXY_STATS = ("connections", "refused", "duplicated", "cut", "rerouted")
_LISTEN_RE = re.compile(rb"listening on http://[^:]+:(\d+)")
# Shortest real-time sleep between two looks at the wall clock for progress (a
# PROGRESS_EVERY_S patched to 0 must not spin next to the run's processes).
PROGRESS_POLL_MIN_S = 0.25


# -- processes --------------------------------------------------------------------------------


class Proc:
    """A child process whose first lines tell where it listens."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self._drainer: asyncio.Future[None] | None = None

    async def start(self, ready: bytes = b"listening on") -> None:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=handle, start_new_session=True
        )
        handle.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(left, 0.01))
            if not line:
                raise RuntimeError(f"{self.name} exited before it was ready; see {self.log}")
            if match := _LISTEN_RE.search(line):
                self.port = int(match.group(1))
            if ready in line:
                break
        self._drainer = asyncio.ensure_future(self._drain(self.proc.stdout))

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await stream.readline():
                pass

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def wait_dead(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# -- the TCP proxy ----------------------------------------------------------------------------


@dataclass
class LinkFaults:
    cut: bool = False
    delay_s: float = 0.0
    delay_p: float = 0.0
    duplicate_p: float = 0.0
    drop_p: float = 0.0


class Proxy:
    """Loopback TCP proxy between one terminal and the server (whose port may change)."""

    def __init__(self, upstream_port: Any, rng: random.Random) -> None:
        self.upstream_port = upstream_port  # callable -> current server port
        self.rng = rng
        self.faults = LinkFaults()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.stats: dict[str, int] = dict.fromkeys(PROXY_STATS, 0)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def cut_all(self) -> None:
        for writer in list(self._conns):
            writer.transport.abort()
            self.stats["cut"] += 1
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.faults.cut:
            self.stats["refused"] += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port())
        except OSError:
            self.stats["refused"] += 1
            writer.transport.abort()
            return
        self.stats["connections"] += 1
        self._conns |= {writer, up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer, frames=True),
            self._pump(up_reader, writer, frames=False),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._conns.discard(w)
            w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: bool
    ) -> None:
        buffer = b""
        upgraded = False
        while True:
            data = await reader.read(PROXY_CHUNK_BYTES)
            if not data:
                writer.transport.abort()
                return
            ft = self.faults
            if ft.drop_p and self.rng.random() < ft.drop_p:
                writer.transport.abort()
                return
            if ft.delay_p and self.rng.random() < ft.delay_p:
                await asyncio.sleep(ft.delay_s * self.rng.random())
            out = data
            if frames and ft.duplicate_p:
                buffer += data
                if not upgraded:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        writer.write(data)
                        buffer = buffer if len(buffer) < PROXY_CHUNK_BYTES else b""
                        continue
                    buffer = buffer[end + 4 :]
                    upgraded = True
                out, buffer = self._frames(data, buffer)
            elif frames:
                upgraded = upgraded or b"\r\n\r\n" in data
            writer.write(out)
            await writer.drain()

    def _frames(self, data: bytes, buffer: bytes) -> tuple[bytes, bytes]:
        """Pass ``data`` on, plus a copy of each complete client frame picked by chance."""
        extra = b""
        for _ in range(DUPLICATE_FRAMES_MAX):
            size = _frame_size(buffer)
            if size is None:
                break
            frame, buffer = buffer[:size], buffer[size:]
            opcode = frame[0] & 0x0F
            if opcode in (1, 2) and frame[0] & 0x80 and self.rng.random() < self.faults.duplicate_p:
                extra += frame
                self.stats["duplicated"] += 1
        return data + extra, buffer


def _frame_size(buf: bytes) -> int | None:
    """Size of the first complete websocket frame in ``buf`` (client frames are masked)."""
    if len(buf) < 2:
        return None
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = int.from_bytes(buf[2:10], "big"), 10
    if buf[1] & 0x80:
        pos += 4
    return pos + length if len(buf) >= pos + length else None


# -- the run ----------------------------------------------------------------------------------


class _LineCount:
    """Complete lines written so far to some files that only grow (each is read on from
    where the last count stopped; a file not there yet counts 0)."""

    def __init__(self, paths: list[Path]) -> None:
        self.offsets = dict.fromkeys(paths, 0)
        self.lines = 0

    def count(self) -> int:
        for path, offset in self.offsets.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except FileNotFoundError:
                continue
            self.lines += data.count(b"\n")
            self.offsets[path] = offset + data.rfind(b"\n") + 1
        return self.lines


@dataclass
class _Run:
    scenario: Scenario
    seed: int
    run_dir: Path
    factor: float
    store_url: str | None = None  # the run's own PostgreSQL database; None: SQLite
    servers_n: int = 1
    python: str = sys.executable
    trace: f.Trace = field(default_factory=f.Trace)
    skipped: list[str] = field(default_factory=list)
    disruptions: set[int] = field(default_factory=set)
    healed_at_ms: int | None = None
    fault_windows: list[tuple[str, int, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}:real")
        self.t0 = 0.0
        self.start_ms = 0
        self.processor: Proc | None = None
        self.servers: dict[int, Proc] = {}
        self.down: set[int] = set()  # servers killed and not yet restarted
        self.provider_outages = 0  # provider_outage faults in effect now
        self.home: dict[str, int] = {}  # terminal -> the server its proxy routes to
        self._round_robin = 0
        self.terminals: dict[str, Proc] = {}
        self.boots: dict[str, int] = {}
        self.proxies: dict[str, Proxy] = {}
        self.owner_key = ""
        self.tasks: list[asyncio.Task[None]] = []

    # -- time ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        return self.start_ms + int((time.time() - self.t0) * 1000 * self.factor)

    def elapsed_ms(self) -> int:
        """Scenario time since the terminals' clock started."""
        return self.now_ms() - self.start_ms

    def real_s(self, scenario_ms: int) -> float:
        return scenario_ms / 1000 / self.factor

    # -- processes -----------------------------------------------------------------------

    def _cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "syncengine.cli", *args]

    async def start_server(self, i: int = 0) -> None:
        assert self.processor is not None
        m = self.scenario.merchant
        name = "server" if self.servers_n == 1 else f"server-{i}"
        argv = self._cli(
            "serve",
            "--data",
            str(self.run_dir / "server"),  # shared: one server key, one owner key file
            "--port",
            "0",
            "--processor",
            f"http://127.0.0.1:{self.processor.port}",
            "--merchant-id",
            m.id,
            "--currency",
            m.currency,
            "--log-level",
            "warning",
        )
        if self.store_url is not None:
            argv += ["--store", self.store_url, "--forward-lease-ms", str(FORWARD_LEASE_MS)]
        if self.provider_outages > 0:  # restarted inside a provider outage: still in it
            argv.append("--maintenance")
        server = Proc(name, argv, self.run_dir / f"{name}.log")
        self.down.add(i)  # until healthy
        self.servers[i] = server  # known at once: a failed start is still killed
        await server.start(b"owner API key file")
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2) as client:
            while True:  # the store opens (and the owner key is written) at startup
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"http://127.0.0.1:{server.port}/health")
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(f"{name} did not become healthy; see {server.log}")
                await asyncio.sleep(0.05)
        self.down.discard(i)

    async def _server_restore(self, fault: FaultSpec, end_ms: int) -> None:
        """``syncengine backup`` of the running server now; at ``end_ms`` the server is
        killed, ``syncengine restore`` puts the backup in place and it starts again."""
        data = str(self.run_dir / "server")
        backup = self.run_dir / f"server-backup-{fault.at_ms}.db"
        await self._command("backup", "--data", data, "--to", str(backup))
        await self._sleep_until(end_ms)
        killed = self.live_servers()
        for i in killed:
            self.down.add(i)
            self.servers[i].kill()
            await self.servers[i].wait_dead()
            self.trace.add(self.now_ms(), f.CRASH, "", value=i, detail="server")
        await self._command("restore", "--data", data, "--from", str(backup))
        self.trace.add(self.now_ms(), f.RESTORED, "", detail=backup.name)
        for i in killed:
            await self.start_server(i)
            self.trace.add(self.now_ms(), f.RESTART, "", value=i, detail="server")

    async def _command(self, *args: str) -> None:
        """Run ``syncengine ARGS`` as an operator would; raise with its output if it fails."""
        proc = await asyncio.create_subprocess_exec(
            *self._cli(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"syncengine {args[0]} failed: {out.decode(errors='replace')}")

    def live_servers(self) -> list[int]:
        return [i for i in sorted(self.servers) if i not in self.down]

    def api(self) -> httpx.AsyncClient:
        live = self.live_servers()
        port = self.servers[live[0] if live else 0].port
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {self.owner_key}"},
            timeout=10,
        )

    async def setup(self) -> None:
        d = self.run_dir
        self.processor = Proc(
            "processor",
            self._cli("processor", "--data", str(d / "processor"), "--port", "0"),
            d / "processor.log",
        )
        await self.processor.start(b"ledger and key in")
        await self.start_server(0)  # alone: it writes the server key and the owner key file
        await asyncio.gather(*(self.start_server(i) for i in range(1, self.servers_n)))
        self.owner_key = (d / "server" / "owner-api-key.txt").read_text().strip()
        m = self.scenario.merchant
        async with self.api() as api:
            if m.offline_allowed:
                r = await api.patch("/v1/merchant", json={"standalone_allowed": True})
                r.raise_for_status()
                r = await api.post("/v1/merchant/offline-liability", json={"accept": True})
                r.raise_for_status()
            if m.timezone != "UTC":
                r = await api.patch("/v1/merchant", json={"timezone": m.timezone})
                r.raise_for_status()
            if m.offline_budget_minor is not None:
                budget = {"minor": m.offline_budget_minor, "currency": m.currency}
                r = await api.put("/v1/merchant/offline-budget", json={"offline_budget": budget})
                r.raise_for_status()
        sandbox = HttpProcessor(f"http://127.0.0.1:{self.processor.port}")
        processor_key = await sandbox.public_key()
        await sandbox.aclose()
        server_key = crypto.Ed25519KeyPair.from_private(
            (d / "server" / "server-ed25519.key").read_bytes()
        )
        self.t0 = time.time()
        self.start_ms = int(self.t0 * 1000)
        for n, spec in enumerate(self.scenario.terminals):
            self.home[spec.id] = n % self.servers_n
            proxy = Proxy(
                functools.partial(self._server_port, spec.id),
                random.Random(f"{self.seed}:proxy:{spec.id}"),
            )
            await proxy.start()
            self.proxies[spec.id] = proxy
            async with self.api() as api:
                r = await api.post(
                    "/v1/enrollment-codes",
                    json={"terminal_id": spec.id, "device_class": spec.device_class},
                )
                r.raise_for_status()
                code = r.json()["code"]
            cfg = {
                "scenario": str(Path(self.scenario.path).resolve()),
                "terminal_id": spec.id,
                "merchant_id": m.id,
                "seed": self.seed,
                "clock_factor": self.factor,
                "t0": self.t0,
                "start_ms": self.start_ms,
                "ws_url": f"ws://127.0.0.1:{proxy.port}/sync",
                "api_url": f"http://127.0.0.1:{self._server_port(spec.id)}",
                "code": code,
                "db": str(d / f"terminal-{spec.id}.db"),
                "log": str(d / f"trace-{spec.id}.jsonl"),
                "pans": str(d / f"pans-{spec.id}.txt"),
                "processor_public_key": crypto.b64e(processor_key),
                "server_public_key": crypto.b64e(server_key.public),
            }
            (d / f"terminal-{spec.id}.json").write_text(json.dumps(cfg))
            await self.start_terminal(spec.id)
            await self.put_settings(spec.id, self._settings())

    def _server_port(self, tid: str) -> int:
        """The port of ``tid``'s server; if it is down, of the next live one (round robin)."""
        live = self.live_servers()
        if self.home[tid] in self.down and live:
            self.home[tid] = live[self._round_robin % len(live)]
            self._round_robin += 1
            self.proxies[tid].stats["rerouted"] += 1
        return self.servers[self.home[tid]].port

    def _settings(self) -> dict[str, Any]:
        m = self.scenario.merchant
        cur = m.currency
        return {
            "offline_allowed": m.offline_allowed,
            "per_transaction_limit": {"minor": m.per_transaction_limit_minor, "currency": cur},
            "total_limit": {"minor": m.total_limit_minor, "currency": cur},
            "offline_entry_policy": m.offline_entry,
            "offline_auto_delay_ms": max(1, min(m.auto_after_ms, 3_600_000)),
        }

    async def set_maintenance(self, enabled: bool) -> None:
        """PUT /v1/maintenance on every live server process."""
        for i in self.live_servers():
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{self.servers[i].port}",
                headers={"Authorization": f"Bearer {self.owner_key}"},
                timeout=10,
            ) as api:
                r = await api.put("/v1/maintenance", json={"maintenance": enabled})
                r.raise_for_status()

    async def put_settings(self, tid: str, body: dict[str, Any]) -> None:
        async with self.api() as api:
            r = await api.put(f"/v1/terminals/{tid}/settings", json=body)
            r.raise_for_status()

    async def put_budget(self, budget_minor: int) -> None:
        """The owner's ``PUT /v1/merchant/offline-budget``, tried again while no server
        answers (crashed, being restored) for at most :data:`BUDGET_PUT_WAIT_S`. Traced at
        the moment the request that succeeded was sent (the raise cannot act before)."""
        body = {
            "offline_budget": {"minor": budget_minor, "currency": self.scenario.merchant.currency}
        }
        deadline = time.monotonic() + BUDGET_PUT_WAIT_S
        while True:
            sent_ms = self.now_ms()
            try:
                async with self.api() as api:
                    r = await api.put("/v1/merchant/offline-budget", json=body)
                if r.status_code < 500:
                    r.raise_for_status()
                    self.trace.add(sent_ms, f.BUDGET, "", value=budget_minor, detail="portal")
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no server took the budget change in {BUDGET_PUT_WAIT_S} s")
            await asyncio.sleep(0.2)

    async def start_terminal(self, tid: str) -> None:
        boot = self.boots.get(tid, -1) + 1
        self.boots[tid] = boot
        d = self.run_dir
        proc = Proc(
            f"terminal {tid}",
            [
                self.python,
                "-m",
                "syncengine.sim.real_terminal",
                str(d / f"terminal-{tid}.json"),
                str(boot),
            ],
            d / f"terminal-{tid}.log",
        )
        await proc.start(b"enrolled")
        self.terminals[tid] = proc

    # -- faults --------------------------------------------------------------------------

    def schedule(self) -> None:
        if self.scenario.merchant.offline_budget_minor is not None and any(
            fault.kind == "server_restore" for fault in self.scenario.faults
        ):
            # Judged from the final statuses in the server's store at the end; a restore
            # loses the first ones (and when the budget was released), so not with one.
            self.skipped.append("offline_budget")
        for fault in self.scenario.faults:
            if fault.kind not in REAL_SUPPORTED or (
                fault.kind == "server_restore" and self.store_url is not None
            ):
                self.skipped.append(fault.kind)
                continue
            self.tasks.append(asyncio.ensure_future(self._fault(fault)))

    async def _sleep_until(self, scenario_ms: int) -> None:
        await asyncio.sleep(max(0.0, self.real_s(scenario_ms - self.elapsed_ms())))

    async def wait_end(self, progress: runner.Progress | None, started: float) -> None:
        """Sleep until the scenario's end (settle included). With ``progress``, wake up
        to call it at most every ``runner.PROGRESS_EVERY_S`` of wall time since
        ``started`` (a ``time.perf_counter()``), never at the end: as the simulated tier."""
        end_ms = self.scenario.end_ms
        if progress is None:
            await self._sleep_until(end_ms)
            return
        payments = _LineCount([self.run_dir / f"pans-{t.id}.txt" for t in self.scenario.terminals])
        last_report = started
        while True:
            due_s = last_report + runner.PROGRESS_EVERY_S - time.perf_counter()
            wait_s = max(due_s, PROGRESS_POLL_MIN_S)
            if self.real_s(end_ms - self.elapsed_ms()) <= wait_s:
                await self._sleep_until(end_ms)  # the last stretch: nothing more to say
                return
            await asyncio.sleep(wait_s)
            wall, elapsed = time.perf_counter(), self.elapsed_ms()
            elapsed -= elapsed % 1000  # whole scenario seconds: "4m59s", not "4m59s810ms"
            if elapsed < end_ms and wall - last_report >= runner.PROGRESS_EVERY_S:
                last_report = wall
                progress(elapsed, end_ms, payments.count())

    def _targets(self, fault: FaultSpec) -> list[str]:
        return [t.id for t in self.scenario.terminals if fault.hits(t.id)]

    def _started(self, fault: FaultSpec) -> None:
        self.trace.add(self.now_ms(), f.FAULT, value=1, detail=fault.kind)
        if fault.kind in DISRUPTIVE_KINDS:
            self.disruptions.add(id(fault))
            self.healed_at_ms = None

    def _ended(self, fault: FaultSpec, started_ms: int) -> None:
        now = self.now_ms()
        self.trace.add(now, f.FAULT, value=0, detail=fault.kind)
        self.fault_windows.append((fault.kind, started_ms, now, ",".join(fault.targets or ())))
        self.disruptions.discard(id(fault))
        if not self.disruptions and self.healed_at_ms is None:
            self.healed_at_ms = now

    async def _fault(self, fault: FaultSpec) -> None:
        await self._sleep_until(fault.at_ms)
        started = self.now_ms()
        self._started(fault)
        kind, targets = fault.kind, self._targets(fault)
        proxies = [self.proxies[t] for t in targets]
        end_ms = fault.at_ms + fault.duration_ms
        if kind == "partition":
            for p in proxies:
                p.faults.cut = True
                p.cut_all()
            await self._sleep_until(end_ms)
            for p in proxies:
                p.faults.cut = False
        elif kind in ("delay", "reorder", "duplicate", "drop"):
            for p in proxies:
                if kind == "duplicate":
                    p.faults.duplicate_p = fault.probability
                elif kind == "drop":
                    p.faults.drop_p = fault.probability / 10  # per chunk, not per frame
                else:
                    p.faults.delay_p = fault.probability
                    p.faults.delay_s = self.real_s(fault.latency_ms or 3_000)
            await self._sleep_until(end_ms)
            for p in proxies:
                p.faults = LinkFaults(cut=p.faults.cut)
        elif kind in ("crash", "reboot"):
            for tid in targets:
                self.terminals[tid].kill()
                self.trace.add(self.now_ms(), f.CRASH, tid)
            await asyncio.gather(*(self.terminals[t].wait_dead() for t in targets))
            await asyncio.sleep(self.real_s(fault.duration_ms or 10_000))
            for tid in targets:
                await self.start_terminal(tid)
        elif kind == "server_crash":
            live = self.live_servers()
            if live:
                # Which server dies is drawn from the seed (and the fault's time) alone.
                i = random.Random(f"{self.seed}:server_crash:{fault.at_ms}").choice(live)
                self.down.add(i)
                self.servers[i].kill()
                await self.servers[i].wait_dead()
                self.trace.add(self.now_ms(), f.CRASH, "", value=i, detail="server")
                await asyncio.sleep(self.real_s(fault.duration_ms or 30_000))
                await self.start_server(i)
                self.trace.add(self.now_ms(), f.RESTART, "", value=i, detail="server")
        elif kind == "server_restore":
            await self._server_restore(fault, end_ms)
        elif kind in ("processor_outage", "processor_slow", "outcome_unknown"):
            assert self.processor is not None
            sandbox = HttpProcessor(f"http://127.0.0.1:{self.processor.port}")
            table: dict[str, dict[str, Any]] = {
                "processor_outage": {"outage": True},
                "processor_slow": {
                    "latency_ms": int(self.real_s(fault.latency_ms or 20_000) * 1000)
                },
                "outcome_unknown": {"outcome_unknown_ppm": int(fault.probability * PPM)},
            }
            on = table[kind]
            off = {"outage": False, "latency_ms": 0, "outcome_unknown_ppm": 0}
            await sandbox.set_faults(**on)
            await self._sleep_until(end_ms)
            await sandbox.set_faults(**{k: off[k] for k in on})
            await sandbox.aclose()
        elif kind == "budget_change":
            await self.put_budget(fault.budget_minor)
        elif kind == "force_offline":
            for tid in targets:
                await self.put_settings(tid, {"force_offline": True})
            await self._sleep_until(end_ms)
            for tid in targets:
                await self.put_settings(tid, {"force_offline": False})
        elif kind == "provider_outage":
            # The provider's maintenance switch (stored, shared by every server process;
            # set on each so that each applies it at once): /sync answers
            # service_unavailable and live sessions are closed.
            self.provider_outages += 1
            await self.set_maintenance(True)
            await self._sleep_until(end_ms)
            self.provider_outages -= 1
            if self.provider_outages == 0:
                await self.set_maintenance(False)
        elif kind in ("clock_skew", "disk_full"):
            # The terminal processes apply these from the scenario on their own clock: here
            # only the window is recorded (a clock_skew without duration: at its start).
            await self._sleep_until(end_ms)
        self._ended(fault, started)

    # -- facts ---------------------------------------------------------------------------

    async def stop_all(self) -> tuple[list[f.Charge], list[f.RefundEntry]]:
        """Stop every process; the processor's ledger: its charges and its refunds."""
        for proc in self.terminals.values():
            await proc.stop()
        for proxy in self.proxies.values():
            await proxy.close()
        await asyncio.gather(*(server.stop() for server in self.servers.values()))
        charges: list[f.Charge] = []
        refunds: list[f.RefundEntry] = []
        if self.processor is not None:
            sandbox = HttpProcessor(f"http://127.0.0.1:{self.processor.port}")
            for e in await sandbox.ledger():
                if isinstance(e, LedgerRefund):
                    refunds.append(
                        f.RefundEntry(e.refund_id, e.payment_id, e.amount.minor, e.at_ms)
                    )
                if isinstance(e, LedgerCharge):
                    charges.append(
                        f.Charge(
                            e.payment_id,
                            e.amount.minor,
                            e.amount.currency,
                            e.outcome,
                            e.at_ms,
                            e.terminal_id,
                            e.captured_at_ms,
                        )
                    )
            await sandbox.aclose()
            await self.processor.stop()
        return charges, refunds

    def facts(self, ledger: list[f.Charge], refunds: list[f.RefundEntry]) -> f.RunFacts:
        sc, d = self.scenario, self.run_dir
        out = f.RunFacts(
            sc.name, self.seed, self.start_ms, self.now_ms(), sc.merchant.currency, sc.settle_ms
        )
        events: list[f.TraceEvent] = list(self.trace.events)
        for spec in sc.terminals:
            path = d / f"terminal-{spec.id}.db"
            store = NodeStore(path)
            try:
                ops = store.load_ops()
            finally:
                store.close()
            out.terminals[spec.id] = f.TerminalFacts(
                spec.id,
                spec.device_class,
                sc.merchant.per_transaction_limit_minor,
                sc.merchant.total_limit_minor,
                ops,
                "",
                [p for p in d.glob(path.name + "*") if p.is_file()],
            )
            for line in (d / f"trace-{spec.id}.jsonl").read_text().splitlines():
                e = json.loads(line)
                events.append(
                    f.TraceEvent(e["at"], e["kind"], e["t"], e["pid"], e["value"], e["detail"])
                )
            pans = d / f"pans-{spec.id}.txt"
            if pans.exists():
                out.pans |= set(pans.read_text().split())
        tids = [t.id for t in sc.terminals]
        budget = sc.merchant.offline_budget_minor is not None and (
            "offline_budget" not in self.skipped
        )
        server: SqliteStore | PostgresStore
        if self.store_url is None:
            server = SqliteStore(d / "server" / "server.db")
            out.server_files = [p for p in (d / "server").glob("server.db*") if p.is_file()]
        else:
            server = PostgresStore(self.store_url)
            out.server_blobs = _pg_tables(self.store_url)
        out.server_ops, hold = _read_server(server, tids, sc.merchant.id if budget else None)
        if budget:
            out.offline_budget_minor = sc.merchant.offline_budget_minor
            events += self._releases(out.server_ops)
            out.restore_hold = hold
        out.ledger = ledger
        out.refunds = refunds
        out.timezone = self.scenario.merchant.timezone
        out.trace = sorted(events, key=lambda e: e.at_ms)
        out.healed_at_ms = self.healed_at_ms
        return out

    def _releases(self, server_ops: list[Op]) -> list[f.TraceEvent]:
        """A RELEASED event per final status in the server's store, at the scenario time of
        the op's stamp (written in the transaction that released the payment's rights,
        before the budget loop could grant them again)."""
        out: list[f.TraceEvent] = []
        for op in server_ops:
            if op.kind != "status":
                continue
            body = parse_body(op)
            assert isinstance(body, StatusChange)
            if body.status in FINAL:
                at = self.start_ms + int((op.hlc.wall_ms - self.t0 * 1000) * self.factor)
                tid = op.origin.removeprefix(SERVER_PREFIX)
                out.append(f.TraceEvent(at, f.RELEASED, tid, body.payment_id, 0, body.status.value))
        return out


def _read_server(
    store: SqliteStore | PostgresStore, terminal_ids: list[str], merchant_id: str | None
) -> tuple[list[Op], tuple[str, ...] | None]:
    """The terminals' ops and their server streams, as stored; with ``merchant_id``, the
    terminals its budget still waits for after a restore (the servers stamp with the wall
    clock: only the terminals' clocks run fast)."""
    store.open()
    try:
        hold = None
        if merchant_id is not None:
            hold = store.escrow_state(merchant_id, int(time.time() * 1000)).held_by
        out: list[Op] = []
        for tid in terminal_ids:
            for origin in (tid, server_origin(tid)):
                after = 0
                while True:
                    ops, more = store.load_ops(origin, after, LOAD_OPS_PAGE_MAX)
                    out += ops
                    if not ops or not more:
                        break
                    after = ops[-1].seq
        return out, hold
    finally:
        store.close()


def _pg_tables(url: str) -> list[bytes]:
    """Every table of the server's database, raw (binary ``COPY``: bytea as stored)."""
    out: list[bytes] = []
    with psycopg.connect(url, connect_timeout=PG_CONNECT_TIMEOUT_S) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " ORDER BY table_name"
        ).fetchall()
        for (table,) in tables:
            query = sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(sql.Identifier(table))
            with conn.cursor() as cur, cur.copy(query) as copy:
                out.append(b"".join(bytes(chunk) for chunk in copy))
    return out


def database_name(scenario: str, seed: int, unique: bool) -> str:
    """The run's database: ``sim_<scenario>_seed<N>`` (+ ``_<pid>`` if ``unique``)."""
    suffix = f"_seed{seed}" + (f"_{os.getpid()}" if unique else "")
    stem = re.sub(r"[^a-z0-9_]", "_", f"sim_{scenario}".lower())
    return stem[: PG_NAME_BYTES_MAX - len(suffix)] + suffix


def _with_dbname(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **info)


def _admin(url: str, statement: sql.Composed) -> None:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S) as conn:
            conn.execute(statement)
    except psycopg.Error as exc:
        raise StorageError(f"PostgreSQL at {redact_url(url)}: {str(exc).strip()}") from exc


def create_database(url: str, name: str) -> str:
    """Create database ``name`` (dropped first if it exists) on the server of ``url``
    (connecting to ``url``'s own database); return the URL of the new database."""
    ident = sql.Identifier(name)
    _admin(url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    _admin(url, sql.SQL("CREATE DATABASE {}").format(ident))
    return _with_dbname(url, name)


def drop_database(url: str, name: str) -> None:
    _admin(url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _run_async(run: _Run, progress: runner.Progress | None, started: float) -> f.RunFacts:
    try:
        await run.setup()
        run.healed_at_ms = run.start_ms
        run.schedule()
        await run.wait_end(progress, started)
        for task in run.tasks:
            task.cancel()
        await asyncio.gather(*run.tasks, return_exceptions=True)
        ledger, refunds = await run.stop_all()
    except BaseException:
        for proc in [*run.terminals.values(), *run.servers.values(), run.processor]:
            if proc is not None:
                proc.kill()
                await proc.wait_dead()
        raise
    return run.facts(ledger, refunds)


def run(
    scenario: Scenario,
    seed: int | None = None,
    keep_dir: Path | None = None,
    clock_factor: float = CLOCK_FACTOR_DEFAULT,
    store_url: str | None = None,
    servers: int = 1,
    progress: runner.Progress | None = None,
) -> RunResult:
    """Run ``scenario`` with real processes and check it with the shared checker.

    ``store_url``: a PostgreSQL URL; the run creates its own database on that server
    (connecting to the URL's database), and drops it at the end unless ``keep_dir`` is
    given. ``servers``: how many server processes share it (more than 1 needs
    ``store_url``).
    ``progress``: as :func:`syncengine.sim.runner.run`'s, called as
    ``progress(elapsed_ms, total_ms, payments)`` (scenario time reached, in whole
    seconds; the scenario's length with its settle; customers so far) at most every
    ``runner.PROGRESS_EVERY_S`` of wall time and never at the end; it does not change the
    run. The real tier counts customers as the lines of the terminal processes'
    card-number logs (each writes one per customer, before the payment), so a customer
    being served may already count.
    """
    seed = scenario.seed if seed is None else seed
    if not scenario.path or not Path(scenario.path).is_file():
        raise ValueError("the real tier needs a scenario file (terminal processes load it)")
    if not 1 <= servers <= SERVERS_MAX:
        raise ValueError(f"servers must be 1..{SERVERS_MAX}, not {servers}")
    if servers > 1 and store_url is None:
        raise ValueError(
            f"{servers} servers need a shared PostgreSQL store (--store URL); "
            "SQLite serves one process"
        )
    started = time.perf_counter()
    if keep_dir is not None:
        run_dir = keep_dir / f"{scenario.name}-seed{seed}-real"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="syncengine-real-")
        run_dir = Path(cleanup.name)
    db_name = None
    try:
        run_store = None
        if store_url is not None:
            name = database_name(scenario.name, seed, unique=keep_dir is None)
            run_store = create_database(store_url, name)
            db_name = name  # created: dropped at the end
            (run_dir / "store-url.txt").write_text(run_store + "\n")
        r = _Run(scenario, seed, run_dir, clock_factor, run_store, servers)
        facts = asyncio.run(_run_async(r, progress, started))
        report = checker.check(facts)
        expect_failures = checker.check_expect(scenario.expect, report.counters)
        if r.skipped:
            report.counters["faults_skipped"] = len(r.skipped)
        return RunResult(
            scenario,
            seed,
            report.counters,
            report.violations,
            report.invariants,
            expect_failures,
            facts,
            [],
            r.fault_windows,
            time.perf_counter() - started,
            0,
            {k: sum(p.stats[k] for p in r.proxies.values()) for k in PROXY_STATS},
        )
    finally:
        if store_url is not None and db_name is not None and keep_dir is None:
            try:
                drop_database(store_url, db_name)
            except StorageError as exc:  # do not hide the run's own error
                print(f"warning: database {db_name} left behind: {exc}", file=sys.stderr)
        if cleanup is not None:
            cleanup.cleanup()
