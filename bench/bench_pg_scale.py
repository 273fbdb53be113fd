"""Benchmark: 1 vs 2 vs 4 ``syncengine serve`` processes over one PostgreSQL database.

Two phases per process count N, each against real processes on loopback:

1. **herd** -- N processes without a processor (store only). ``terminals`` terminals,
   spread round-robin over the processes, connect at once and push their stored captures
   (``payments`` each, 100 ops per frame); timed until the last one is acknowledged as
   durably stored. Reports merged ops per second.
2. **drain** -- the same database, N processes restarted *with* the sandbox processor
   (``--latency-ms`` per processor call). Timed from start until every payment is approved.
   Reports forwarded payments per second. Every forwarder has ``concurrency_max`` (8)
   workers, so forwarding is bounded by processor latency x workers until the CPU is.

The SQLite store (one process, the default) is measured the same way beside it. The load
generator runs on the same machine as the servers and the database: on a small box the
figures are a floor, not a ceiling. Not a test: ``python bench/bench_pg_scale.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import websockets
from psycopg import sql

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, CardInfo
from syncengine.core.hlc import Hlc
from syncengine.core.money import Money
from syncengine.core.ops import Op, make_next
from syncengine.processor.client import HttpProcessor
from syncengine.processor.testing import running_sandbox

ADMIN_URL = os.environ.get("SYNCENGINE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BATCH_OPS = 100
START_TIMEOUT_S = 30.0
APPROVE_PAN = "4242424242424242"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _database() -> Iterator[str]:
    name = f"syncengine_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo("", **info)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def _servers(n: int, data: Path, store: str | None, processor: str | None) -> Iterator[list[str]]:
    """N ``syncengine serve`` processes; the first starts alone (keys, migrations)."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(n):
            port = _free_port()
            cmd = [sys.executable, "-m", "syncengine.cli", "serve", "--data", str(data)]
            cmd += ["--port", str(port), "--log-level", "warning"]
            if store:
                cmd += ["--store", store]
            if processor:
                cmd += ["--processor", processor]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
            if i == 0:
                _wait_healthy(urls[0])
        for url in urls[1:]:
            _wait_healthy(url)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not start; run syncengine serve by hand to see why")


class BenchTerminal:
    """A terminal made of core parts: key, chain of captures, one websocket session."""

    def __init__(self, terminal_id: str, payments: int, processor_public: bytes) -> None:
        self.terminal_id = terminal_id
        self.key = crypto.Ed25519KeyPair.from_private(os.urandom(32))
        now_ms = int(time.time() * 1000)
        self.frames: list[bytes] = []
        ops: list[Op] = []
        previous: Op | None = None
        for k in range(payments):
            pid = f"{terminal_id}-{k:05d}"
            sealed = crypto.seal_card(
                processor_public,
                crypto.CardData(APPROVE_PAN, 12, 2030),
                ephemeral_private=os.urandom(32),
                nonce=os.urandom(12),
                aad=crypto.card_aad(pid),
            )
            at_ms = now_ms - 600_000 + k
            body = Capture(
                payment_id=pid,
                merchant_id="merchant-1",
                amount=Money(100 + k, "USD"),
                channel="offline",
                card=CardInfo("visa", APPROVE_PAN[-4:], "tap", crypto.b64e(sealed)),
                captured_at_ms=at_ms,
                expires_at_ms=at_ms + 24 * 3_600_000,
                device_class="terminal",
            ).to_body()
            previous = make_next(previous, terminal_id, Hlc(at_ms, k), "capture", body)
            ops.append(previous)
        for start in range(0, len(ops), BATCH_OPS):
            chunk = ops[start : start + BATCH_OPS]
            last = chunk[-1]
            head = crypto.chain_head_message(terminal_id, last.seq, last.digest)
            signature = crypto.b64e(crypto.sign(self.key.private, head))
            self.frames.append(protocol.encode(protocol.Push(tuple(chunk), signature)))

    async def enroll(self, http: httpx.AsyncClient) -> None:
        r = await http.post("/v1/enrollment-codes", json={"terminal_id": self.terminal_id})
        r.raise_for_status()
        r = await http.post(
            "/v1/enroll",
            json={
                "terminal_id": self.terminal_id,
                "code": r.json()["code"],
                "public_key": crypto.b64e(self.key.public),
                "device_class": "terminal",
            },
        )
        r.raise_for_status()

    async def push_all(self, ws_url: str) -> None:
        async with websockets.connect(ws_url, max_size=2**22) as ws:
            await ws.send(protocol.encode(protocol.Hello(self.terminal_id, "bench")).decode())
            challenge = protocol.decode(await ws.recv())
            assert isinstance(challenge, protocol.Challenge), challenge
            nonce = crypto.b64d(challenge.nonce)
            signature = crypto.sign(
                self.key.private, crypto.challenge_message(nonce, self.terminal_id)
            )
            auth = protocol.Auth(self.terminal_id, crypto.b64e(signature))
            await ws.send(protocol.encode(auth).decode())
            assert isinstance(protocol.decode(await ws.recv()), protocol.Welcome)
            for frame in self.frames:
                await ws.send(frame.decode())
                while True:
                    answer = protocol.decode(await ws.recv())
                    if isinstance(answer, protocol.Ack):
                        break
                    if isinstance(answer, protocol.Error):
                        raise RuntimeError(f"push refused: {answer}")


def _count(store: str | None, data: Path, status: str) -> int:
    if store:
        with psycopg.connect(store) as conn:
            row = conn.execute("SELECT count(*) FROM payments WHERE status=%s", (status,))
            return int(row.fetchone()[0])  # type: ignore[index]
    import sqlite3

    with sqlite3.connect(data / "server.db") as conn:
        q = "SELECT count(*) FROM payments WHERE status=?"
        return int(conn.execute(q, (status,)).fetchone()[0])


async def _run_one(
    n: int, store: str | None, data: Path, args: argparse.Namespace
) -> dict[str, Any]:
    with running_sandbox(data / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            await client.set_faults(latency_ms=args.latency_ms)
            public = await client.public_key()
        terminals = [
            BenchTerminal(f"T{i:04d}", args.payments, public) for i in range(args.terminals)
        ]
        total = args.terminals * args.payments
        with _servers(n, data / "server", store, None) as urls:
            key = (data / "server" / "owner-api-key.txt").read_text().strip()
            headers = {"authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=urls[0], headers=headers, timeout=30) as http:
                for t in terminals:
                    await t.enroll(http)
            ws = [u.replace("http://", "ws://") + "/sync" for u in urls]
            started = time.perf_counter()
            await asyncio.gather(*(t.push_all(ws[i % n]) for i, t in enumerate(terminals)))
            herd_s = time.perf_counter() - started
        assert _count(store, data / "server", "captured") == total
        with _servers(n, data / "server", store, sandbox.url):
            started = time.perf_counter()
            while _count(store, data / "server", "approved") < total:
                if time.perf_counter() - started > args.timeout_s:
                    raise RuntimeError("drain did not finish in time")
                await asyncio.sleep(0.05)
            drain_s = time.perf_counter() - started
    return {
        "store": "postgresql" if store else "sqlite",
        "processes": n,
        "terminals": args.terminals,
        "payments": total,
        "herd_s": round(herd_s, 2),
        "herd_ops_per_s": round(total / herd_s),
        "drain_s": round(drain_s, 2),
        "drain_payments_per_s": round(total / drain_s),
    }


def pg_unreachable() -> str | None:
    """None if the PostgreSQL of ``SYNCENGINE_BENCH_PG`` answers, else why not."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        from syncengine.server.store.postgres import redact_url

        # redacted: the reason is printed in the table and the JSON that get saved
        return f"PostgreSQL not reachable at {redact_url(ADMIN_URL)}: {str(exc).strip()}"
    return None


async def _run_all(
    processes: list[int], sqlite: bool, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pg-", dir=os.environ.get("BENCH_DIR")) as tmp:
        if sqlite:
            rows.append(await _run_one(1, None, Path(tmp) / "sqlite", args))
        for n in processes:
            with _database() as url:
                rows.append(await _run_one(n, url, Path(tmp) / f"pg{n}", args))
    return rows


def run(
    processes: tuple[int, ...] = (1, 2, 4),
    terminals: int = 48,
    payments: int = 100,
    latency_ms: int = 20,
    sqlite: bool = True,
) -> dict[str, Any]:
    """Figures for ``syncengine bench``: ``<store><N>_herd_ops_per_s`` and
    ``<store><N>_drain_payments_per_s`` (store ``pg`` or ``sqlite``, N processes)."""
    args = argparse.Namespace(
        terminals=terminals, payments=payments, latency_ms=latency_ms, timeout_s=300.0
    )
    rows = asyncio.run(_run_all(list(processes), sqlite, args))
    figures: dict[str, Any] = {"scale_payments": terminals * payments}
    for r in rows:
        prefix = f"{'pg' if r['store'] == 'postgresql' else 'sqlite'}{r['processes']}"
        figures[f"{prefix}_herd_ops_per_s"] = r["herd_ops_per_s"]
        figures[f"{prefix}_drain_payments_per_s"] = r["drain_payments_per_s"]
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--terminals", type=int, default=48)
    parser.add_argument("--payments", type=int, default=100, help="stored payments per terminal")
    parser.add_argument("--latency-ms", type=int, default=20, help="processor latency per call")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite baseline")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = await _run_all(args.processes, not args.no_sqlite, args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'store':<11}{'procs':>6}{'payments':>9}{'herd s':>8}{'ops/s':>8}{'drain s':>9}{'pay/s':>7}"
    )
    for r in rows:
        print(
            f"{r['store']:<11}{r['processes']:>6}{r['payments']:>9}{r['herd_s']:>8}"
            f"{r['herd_ops_per_s']:>8}{r['drain_s']:>9}{r['drain_payments_per_s']:>7}"
        )


if __name__ == "__main__":
    asyncio.run(main())
