"""The peer: the same drain and herd workloads synced as Yjs documents with pycrdt.

What a developer would build with the obvious alternative, given its best shot:

- one ``pycrdt.Doc`` per terminal; payments live in a ``Map`` named ``payments`` keyed by
  payment id, each value the very capture body our terminal writes (same content, same
  bytes of sealed card data); run after ours in one ``syncengine bench``, these are the
  very payments ours synced (the fixtures are built once, see
  ``bench._common.capture_bodies_of``); a whole offline backlog is one Yjs update;
- the y-websocket sync protocol (pycrdt's ``create_sync_message`` /
  ``handle_sync_message``): on connect both sides send SyncStep1 (their state vector),
  each answers with SyncStep2 = ``get_update(peer_state)``, i.e. only what the other side
  lacks -- the same delta sync as ours;
- the receiving server runs in a subprocess (like ours), keeps each Doc in memory, applies
  the update and persists it durably before it acknowledges: one SQLite transaction per
  update, WAL, ``synchronous=FULL``, on a single writer thread (as pycrdt-websocket's
  SQLite store does). Only then does it send an ACK (a message type we add: Yjs itself has
  no acknowledgement, and a payment terminal must not forget a payment before the server
  holds it durably). Frames are not size-limited (Yjs sends a backlog as one frame).
- the client's permessage-deflate settings are our terminal's (zlib level 1), so neither
  side pays more for compression than the other.

It does not verify signatures or hash chains, forward anything or check limits: it is the
floor of what such a sync costs, not a feature-for-feature equal.

Run alone: ``python -m bench.bench_peer [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pycrdt import (
    Doc,
    Map,
    YMessageType,
    YSyncMessageType,
    create_sync_message,
    handle_sync_message,
    read_message,
    write_message,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve

from bench._common import (
    bench_dir,
    capture_bodies_of,
    herd_terminal_id,
    process_cpu_s,
    progress,
    read_vm_hwm_mb,
)
from syncengine.node.client import deflate_extension
from syncengine.node.store import connect as durable_connect

DRAIN_PAYMENTS_FULL = 10_000
DRAIN_PAYMENTS_QUICK = 10_000
HERD_TERMINALS_FULL = 200
HERD_TERMINALS_QUICK = 200
HERD_PAYMENTS_EACH = 50
ACK = 100  # our added message type: "your update is durable"; followed by the state vector
SERVER_STOP_TIMEOUT_S = 20.0
SYNC_TIMEOUT_S = 300.0
CONNECT_ATTEMPTS_MAX = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    doc TEXT NOT NULL,
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    blob BLOB NOT NULL,
    at_ms INTEGER NOT NULL
)
"""


# --- the server -----------------------------------------------------------------------------


class PeerServer:
    """y-websocket-style server: a Doc per path, durable SQLite log of updates, ACKs."""

    def __init__(self, db_path: Path) -> None:
        self.conn = durable_connect(db_path)  # WAL + synchronous=FULL, as ours
        self.conn.execute(_SCHEMA)
        self.docs: dict[str, Doc[Any]] = {}
        # One writer thread, like aiosqlite: the event loop never waits on fsync.
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _persist(self, name: str, update: bytes) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "INSERT INTO updates (doc, blob, at_ms) VALUES (?, ?, ?)",
                (name, update, time.time_ns() // 1_000_000),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    async def handler(self, ws: ServerConnection) -> None:
        name = ws.request.path if ws.request is not None else "/"
        doc = self.docs.setdefault(name, Doc())
        loop = asyncio.get_running_loop()
        await ws.send(create_sync_message(doc))
        async for frame in ws:
            message = frame if isinstance(frame, bytes) else frame.encode()
            if message[0] != YMessageType.SYNC:
                continue
            sync = message[1:]
            if sync[0] == YSyncMessageType.SYNC_STEP1:
                reply = handle_sync_message(sync, doc)
                if reply is not None:
                    await ws.send(reply)
                continue
            update = read_message(sync[1:])
            if update == b"\x00\x00":
                await ws.send(bytes([ACK]) + write_message(doc.get_state()))
                continue
            doc.apply_update(update)
            await loop.run_in_executor(self._writer, self._persist, name, update)
            await ws.send(bytes([ACK]) + write_message(doc.get_state()))

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.conn.close()


async def _serve_forever(db_path: Path) -> None:
    server = PeerServer(db_path)
    try:
        async with serve(server.handler, "127.0.0.1", 0, max_size=None) as listening:
            port = next(iter(listening.sockets)).getsockname()[1]
            print(f"port {port}", flush=True)
            await asyncio.get_running_loop().create_future()  # until killed
    finally:
        server.close()


@contextmanager
def running_peer_server(db_path: Path) -> Iterator[tuple[int, int]]:
    """Start the peer server in a subprocess; yield (pid, port); stop it on exit."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_peer", "serve", str(db_path)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=root,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the peer server did not start (said {line!r})")
        yield proc.pid, int(line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the client -----------------------------------------------------------------------------


def doc_with_payments(bodies: Iterable[dict[str, Any]]) -> Doc[Any]:
    """A terminal's Doc holding ``bodies`` in its ``payments`` map (one transaction)."""
    doc: Doc[Any] = Doc()
    payments = doc.get("payments", type=Map)
    with doc.transaction():
        for body in bodies:
            payments[body["payment_id"]] = body
    return doc


def _covers(acked_state: bytes, doc: Doc[Any]) -> bool:
    """True when the server's acknowledged state includes everything ``doc`` holds."""
    return doc.get_update(acked_state) == Doc().get_update()


async def sync_doc(url: str, doc: Doc[Any]) -> None:
    """Sync ``doc`` with the server until the server acknowledges it durably."""
    for attempt in range(CONNECT_ATTEMPTS_MAX):
        try:
            ws = await ws_connect(
                url,
                max_size=None,
                ping_interval=None,
                open_timeout=30,
                # The same permessage-deflate settings as our terminal's (zlib level 1):
                # the transport costs both sides the same.
                extensions=[deflate_extension()],
            )
            break
        except OSError:
            if attempt == CONNECT_ATTEMPTS_MAX - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    async with ws:
        await ws.send(create_sync_message(doc))
        async for frame in ws:
            message = frame if isinstance(frame, bytes) else frame.encode()
            if message[0] == ACK:
                if _covers(read_message(message[1:]), doc):
                    return
                continue
            if message[0] != YMessageType.SYNC:
                continue
            reply = handle_sync_message(message[1:], doc)
            if reply is not None:  # the server's SyncStep1: send what it lacks
                await ws.send(reply)
    raise RuntimeError("the peer server closed the connection before acknowledging")


# --- the workloads --------------------------------------------------------------------------


def drain(payments: int, directory: Path) -> dict[str, float]:
    """One terminal Doc with ``payments`` payments syncs to an empty server."""
    progress(f"peer drain: building {payments} payments")
    # The payments our drain synced, when it ran before in this process.
    doc = doc_with_payments(capture_bodies_of(herd_terminal_id(0), payments))
    with running_peer_server(directory / "peer-drain.db") as (pid, port):
        progress(f"peer drain: syncing {payments} payments to the pycrdt server")
        server_cpu_s = process_cpu_s(pid)
        client_cpu_s = time.process_time()
        started = time.perf_counter()
        url = f"ws://127.0.0.1:{port}/{herd_terminal_id(0)}"
        asyncio.run(asyncio.wait_for(sync_doc(url, doc), SYNC_TIMEOUT_S))
        elapsed_s = time.perf_counter() - started
        client_cpu_s = time.process_time() - client_cpu_s
        server_cpu_s = process_cpu_s(pid) - server_cpu_s
        rss_mb = read_vm_hwm_mb(pid)
    return {
        "peer_drain_seconds": elapsed_s,
        "peer_drain_ops_per_s": payments / elapsed_s,
        "peer_drain_server_peak_rss_mb": rss_mb,
        "peer_drain_server_cpu_us_per_op": server_cpu_s * 1e6 / payments,
        "peer_drain_client_cpu_us_per_op": client_cpu_s * 1e6 / payments,
    }


def herd(terminals: int, payments_each: int, directory: Path) -> dict[str, float]:
    """``terminals`` Docs of ``payments_each`` payments reconnect at once."""
    progress(f"peer herd: building {terminals} x {payments_each} payments")
    docs = [
        (
            herd_terminal_id(i),
            doc_with_payments(capture_bodies_of(herd_terminal_id(i), payments_each)),
        )
        for i in range(terminals)
    ]
    with running_peer_server(directory / "peer-herd.db") as (pid, port):
        progress(f"peer herd: {terminals} terminals reconnect at once")

        async def all_at_once() -> None:
            await asyncio.gather(
                *(sync_doc(f"ws://127.0.0.1:{port}/{name}", doc) for name, doc in docs)
            )

        started = time.perf_counter()
        asyncio.run(asyncio.wait_for(all_at_once(), SYNC_TIMEOUT_S))
        elapsed_s = time.perf_counter() - started
        rss_mb = read_vm_hwm_mb(pid)
    return {
        "peer_herd_seconds": elapsed_s,
        "peer_herd_terminals": float(terminals),
        "peer_herd_peak_rss_mb": rss_mb,
    }


def run_drain(payments: int) -> dict[str, float]:
    """One peer drain of ``payments`` to a fresh server (see :func:`drain`)."""
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        return drain(payments, Path(tmp))


def run_herd(terminals: int, payments_each: int) -> dict[str, float]:
    """One peer herd of ``terminals`` x ``payments_each`` (see :func:`herd`)."""
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        return herd(terminals, payments_each, Path(tmp))


def run(
    quick: bool,
    *,
    drain_payments: int | None = None,
    herd_terminals: int | None = None,
    herd_payments_each: int = HERD_PAYMENTS_EACH,
) -> dict[str, float]:
    """Peer drain and herd figures (see the module docstring)."""
    payments = drain_payments or (DRAIN_PAYMENTS_QUICK if quick else DRAIN_PAYMENTS_FULL)
    terminals = herd_terminals or (HERD_TERMINALS_QUICK if quick else HERD_TERMINALS_FULL)
    figures = run_drain(payments)
    figures.update(run_herd(terminals, herd_payments_each))
    return figures


def _check_durable_settings(conn: sqlite3.Connection) -> None:
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2), (mode, sync)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_peer")
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve"])
    parser.add_argument("db", nargs="?", help="database path (serve)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        conn = durable_connect(Path(args.db))
        _check_durable_settings(conn)
        conn.close()
        asyncio.run(_serve_forever(Path(args.db)))
        return 0
    for name, value in run(args.quick).items():
        print(f"{name:>32}: {value:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
