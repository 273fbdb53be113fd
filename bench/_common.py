"""Shared pieces of the benchmarks: progress lines, fixtures of stored payments, a proxy.

Fixtures are built with the real :class:`TerminalMachine` (the same validation, sealing,
op hashing and chain as ``take_payment``), but without one fsync per payment: the ops of
a whole fixture are written in one durable transaction. What is then measured -- a drain,
a herd, a reconnect -- runs the real SDK, the real protocol and the real server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from syncengine.core import crypto
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.money import Money
from syncengine.core.ops import Op
from syncengine.core.policy.acceptance import Brand, EntryMethod, Region
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.offline_mode import OfflineSettings
from syncengine.node.machine import (
    ActivateOffline,
    CardRead,
    Committed,
    ConnectFailed,
    Effect,
    Persist,
    TakePayment,
    TerminalConfig,
    TerminalMachine,
)
from syncengine.node.store import Store

PAN = "4111111111111111"
MERCHANT_ID = "M1"
CURRENCY = "USD"
AMOUNT_MINOR_MAX = 40  # small amounts: 100,000 of them stay under the total offline limit
PROGRESS_EVERY_PAYMENTS = 20_000

_started = time.perf_counter()


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the table or the JSON)."""
    elapsed_s = time.perf_counter() - _started
    print(f"[bench {elapsed_s:7.1f}s] {message}", file=sys.stderr, flush=True)


def bench_dir() -> str | None:
    """Where temporary databases go (``BENCH_DIR``; default: the system temp dir)."""
    return os.environ.get("BENCH_DIR")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def terminal_config(
    terminal_id: str, processor_public_key: bytes, server_public_key: bytes | None = None
) -> TerminalConfig:
    """A register-class terminal allowed to go offline, with fast reconnects for benches."""
    return TerminalConfig(
        terminal_id=terminal_id,
        merchant_id=MERCHANT_ID,
        device_class=DeviceClass.TERMINAL,
        currency=CURRENCY,
        region=Region.US,
        processor_public_key=processor_public_key,
        server_public_key=server_public_key,
        offline=OfflineSettings(True, True, "bench@example.com", 1),
        reconnect_base_ms=20,
        reconnect_cap_ms=100,
    )


def card() -> CardRead:
    return CardRead(crypto.CardData(PAN, 12, 2030), Brand.VISA)


@dataclass(frozen=True, slots=True)
class Fixture:
    """A terminal's key and the ops its database holds after ``payments`` offline captures."""

    terminal_id: str
    signing_key: bytes
    ops: tuple[Op, ...]
    meta: dict[str, int | str]
    payments: int

    @property
    def public_key(self) -> bytes:
        return crypto.ed25519_public_from_private(self.signing_key)

    def capture_bodies(self) -> Iterator[dict[str, Any]]:
        """The content of every capture, as the peer carries it."""
        for op in self.ops:
            if op.kind == "capture":
                yield op.body


class OfflineTerminalModel:
    """A :class:`TerminalMachine` driven offline with no I/O; its writes are collected."""

    def __init__(self, config: TerminalConfig, machine: TerminalMachine, now_ms: int) -> None:
        self.config = config
        self.machine = machine
        self.now_ms = now_ms
        self.ops: list[Op] = []
        self.meta: dict[str, int | str] = {}
        self._card = card()

    @classmethod
    def fresh(cls, config: TerminalConfig, signing_key: bytes, now_ms: int) -> OfflineTerminalModel:
        machine = TerminalMachine(config, signing_key, lambda n: 0, now_ms)
        model = cls(config, machine, now_ms)
        model.go_offline()
        return model

    def _perform(self, effects: list[Effect]) -> None:
        while effects:
            persist = effects[-1] if isinstance(effects[-1], Persist) else None
            if persist is None:
                return
            self.ops.extend(persist.ops)
            self.meta.update(persist.meta)
            effects = self.machine.handle(Committed(self.now_ms))

    def go_offline(self) -> None:
        """Lose the link, then accept the "Activate offline payments" prompt."""
        self.now_ms += 1
        self._perform(self.machine.handle(ConnectFailed(self.now_ms, "network", "bench")))
        if self.machine.mode != "offline":
            self.now_ms += 1
            self._perform(self.machine.handle(ActivateOffline(self.now_ms)))
        assert self.machine.mode == "offline", self.machine.mode

    def take(self, count: int, first_index: int = 0) -> None:
        """Take ``count`` offline payments (index-based, reproducible amounts)."""
        for i in range(first_index, first_index + count):
            self.now_ms += 1
            event = TakePayment(
                self.now_ms,
                new_payment_id(self.now_ms, os.urandom(PAYMENT_ID_RANDOM_BYTES)),
                Money(1 + i % AMOUNT_MINOR_MAX, CURRENCY),
                self._card,
                EntryMethod.TAP,
                os.urandom(crypto.KEY_BYTES),
                os.urandom(crypto.NONCE_BYTES),
            )
            self._perform(self.machine.handle(event))
            if (i + 1) % PROGRESS_EVERY_PAYMENTS == 0:
                progress(f"  fixture {self.config.terminal_id}: {i + 1} payments built")


# Fixtures built with ``keep=True`` in this process, by (terminal id, payments): the peer
# syncs the very payments ours synced (same ids, same sealed card bytes), and building a
# fixture (a real capture each, with its sealing) is not done twice per run.
_KEPT: dict[tuple[str, int], Fixture] = {}


def build_fixture(
    terminal_id: str,
    payments: int,
    processor_public_key: bytes,
    now_ms: int | None = None,
    *,
    keep: bool = False,
) -> Fixture:
    """A terminal that went offline and took ``payments`` payments, ending ``now``.

    With ``keep``, the fixture is also kept for :func:`capture_bodies_of` (for the peer).
    """
    start_ms = (wall_clock_ms() if now_ms is None else now_ms) - payments - 10
    key = os.urandom(crypto.KEY_BYTES)
    model = OfflineTerminalModel.fresh(
        terminal_config(terminal_id, processor_public_key), key, start_ms
    )
    model.take(payments)
    fixture = Fixture(terminal_id, key, tuple(model.ops), dict(model.meta), payments)
    if keep:
        _KEPT[(terminal_id, payments)] = fixture
    return fixture


def capture_bodies_of(terminal_id: str, payments: int) -> list[dict[str, Any]]:
    """The capture bodies of the fixture kept for (``terminal_id``, ``payments``) in this
    run, else of a new one (the peer run alone builds its own)."""
    fixture = _KEPT.get((terminal_id, payments))
    if fixture is None:
        processor_public_key = crypto.x25519_public_from_private(os.urandom(crypto.KEY_BYTES))
        fixture = build_fixture(terminal_id, payments, processor_public_key)
    return list(fixture.capture_bodies())


def herd_terminal_id(index: int) -> str:
    """The id of the herd's (and the drain's, index 0) terminal number ``index``."""
    return f"H{index:04d}"


def write_fixture(path: Path, fixture: Fixture, enrolled: bool) -> None:
    """Write the fixture as the terminal's SQLite database (one durable transaction)."""
    store = Store(path)
    try:
        meta: dict[str, int | str] = {
            "terminal_id": fixture.terminal_id,
            "merchant_id": MERCHANT_ID,
            "signing_key": crypto.b64e(fixture.signing_key),
            "enrollment": "enrolled" if enrolled else "pending",
            **fixture.meta,
        }
        store.write(fixture.ops, meta)
    finally:
        store.close()


def add_offline_payments(
    path: Path, config: TerminalConfig, count: int, first_index: int
) -> list[Op]:
    """Reopen a terminal database, take ``count`` more offline payments, store them."""
    store = Store(path)
    try:
        key = crypto.b64d(store.get_meta("signing_key") or "")
        machine = TerminalMachine.restore(
            config,
            key,
            lambda n: 0,
            wall_clock_ms(),
            store.load_ops(),
            int(store.get_meta("acked_seq") or 0),
            store.get_meta("offline_mode") or "",
        )
        model = OfflineTerminalModel(config, machine, wall_clock_ms())
        if machine.mode != "offline":
            model.go_offline()
        model.take(count, first_index)
        store.write(tuple(model.ops), model.meta)
        return model.ops
    finally:
        store.close()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def read_vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of process ``pid`` (VmHWM in /proc/PID/status), in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LinkProxy:
    """A TCP proxy on loopback that can cut the link (a network outage) and restore it.

    While cut, open connections are closed and new ones are accepted and closed at once,
    so a terminal sees its link drop and its reconnects fail, as on a real outage.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/sync") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def stop(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


# --- the real sync server in a subprocess ----------------------------------------------------

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RunningServer:
    """``syncengine serve`` running in a subprocess on loopback."""

    pid: int
    port: int
    owner_key: str
    data_dir: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    def peak_rss_mb(self) -> float:
        return read_vm_hwm_mb(self.pid)


@contextlib.contextmanager
def running_sync_server(data_dir: Path) -> Iterator[RunningServer]:
    """Start ``syncengine serve`` (SQLite store, no processor) and stop it on exit.

    Without a processor nothing is forwarded: what the benchmarks time is the merge, i.e.
    the server holding every op durably and acknowledging it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "syncengine.cli",
        "serve",
        "--data",
        str(data_dir),
        "--port",
        "0",
        "--merchant-id",
        MERCHANT_ID,
        "--currency",
        CURRENCY,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = 0
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while port == 0:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("syncengine serve did not start; run it by hand to see why")
            if line.startswith("sync server listening on "):
                port = int(line.split()[4].rsplit(":", 1)[1])
        key_file = data_dir / "owner-api-key.txt"
        while not key_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server wrote no owner key to {key_file}")
            time.sleep(0.01)
        yield RunningServer(proc.pid, port, key_file.read_text().strip(), data_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def allow_offline_payments(http: httpx.AsyncClient) -> None:
    """Merchant settings that let terminals take offline payments (R2)."""
    r = await http.patch("/v1/merchant", json={"standalone_allowed": True})
    r.raise_for_status()
    r = await http.post("/v1/merchant/offline-liability", json={"accept": True})
    r.raise_for_status()


async def enroll(http: httpx.AsyncClient, terminal_id: str, public_key: bytes) -> bytes:
    """Enroll a terminal (one-time code, then ``/v1/enroll``); returns the server's key."""
    r = await http.post("/v1/enrollment-codes", json={"terminal_id": terminal_id})
    r.raise_for_status()
    code = r.json()["code"]
    r = await http.post(
        "/v1/enroll",
        json={
            "terminal_id": terminal_id,
            "code": code,
            "public_key": crypto.b64e(public_key),
            "device_class": DeviceClass.TERMINAL.value,
        },
    )
    r.raise_for_status()
    r2 = await http.put(f"/v1/terminals/{terminal_id}/settings", json={"offline_allowed": True})
    r2.raise_for_status()
    return crypto.b64d(r.json()["server_public_key"])


def owner_http(server: RunningServer) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {server.owner_key}"}
    return httpx.AsyncClient(base_url=server.http_url, headers=headers, timeout=HTTP_TIMEOUT_S)


def experiment_main(
    prog: str, run: Callable[[int], dict[str, Any]], rounds_default: int, argv: list[str] | None
) -> int:
    """The command line of an experiment: ``--rounds N`` (at least 1); figures as JSON."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--rounds", type=int, default=rounds_default)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print(json.dumps(run(args.rounds), indent=2))
    return 0
