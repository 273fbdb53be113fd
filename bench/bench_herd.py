"""Benchmark: a thundering herd -- many terminals with stored payments reconnect at once.

Setup (not timed): the real sync server (``syncengine serve``, SQLite) runs in a subprocess;
``terminals`` terminals are enrolled over its REST API, and each gets a database holding
``payments_each`` offline payments (built by the real TerminalMachine, see ``_common``).
All of them are opened with the real SDK (:class:`syncengine.node.Terminal`) in this
process.

Timed: ``start()`` on every terminal at once -> every terminal connected, authenticated,
pushed its backlog and got it acknowledged as durably stored by the server. The server's
peak memory is its VmHWM from /proc/PID/status.

Run alone: ``python -m bench.bench_herd [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench._common import (
    allow_offline_payments,
    bench_dir,
    build_fixture,
    enroll,
    herd_terminal_id,
    owner_http,
    process_cpu_s,
    progress,
    running_sync_server,
    terminal_config,
    write_fixture,
)
from syncengine.core import crypto
from syncengine.node import Terminal

HERD_TERMINALS_FULL = 200
HERD_TERMINALS_QUICK = 200
DRAIN_PAYMENTS = 10_000
HERD_PAYMENTS_EACH = 50
HERD_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.002
ENROLL_CONCURRENCY = 16  # setup only: enrollment requests in flight at once


async def _herd(
    directory: Path, terminals: int, payments_each: int, label: str = "herd"
) -> dict[str, float]:
    processor_public = crypto.x25519_public_from_private(os.urandom(32))
    with running_sync_server(directory / "server") as server:
        progress(
            f"{label}: enrolling {terminals} terminals and building {payments_each} payments each"
        )
        gate = asyncio.Semaphore(ENROLL_CONCURRENCY)
        # Built before any request: building is CPU work that blocks the event loop, and
        # interleaved with the requests it held a request assigned to a pooled connection
        # for seconds, until the server had closed that idle connection (a ReadError with
        # 1,000 terminals).
        fixtures = [
            build_fixture(herd_terminal_id(i), payments_each, processor_public, keep=True)
            for i in range(terminals)
        ]

        async def prepare(i: int) -> Terminal:
            terminal_id = herd_terminal_id(i)
            fixture = fixtures[i]
            async with gate:
                server_public = await enroll(http, terminal_id, fixture.public_key)
            path = directory / f"{terminal_id}.db"
            write_fixture(path, fixture, enrolled=True)
            config = terminal_config(terminal_id, processor_public, server_public)
            return await Terminal.open(path, config, server.ws_url)

        async with owner_http(server) as http:
            await allow_offline_payments(http)
            opened = list(await asyncio.gather(*(prepare(i) for i in range(terminals))))
        try:
            baseline_mb = server.peak_rss_mb()
            progress(f"{label}: {terminals} terminals reconnect at once")
            server_cpu_s = process_cpu_s(server.pid)
            client_cpu_s = time.process_time()
            started = time.perf_counter()
            await asyncio.gather(*(t.start() for t in opened))
            waiting = list(opened)
            deadline = started + HERD_TIMEOUT_S
            while waiting:
                waiting = [t for t in waiting if t.machine.unacked_payments() > 0]
                if time.perf_counter() > deadline:
                    raise TimeoutError(
                        f"{len(waiting)} terminals not merged after {HERD_TIMEOUT_S}s"
                    )
                await asyncio.sleep(POLL_INTERVAL_S)
            elapsed_s = time.perf_counter() - started
            client_cpu_s = time.process_time() - client_cpu_s
            server_cpu_s = process_cpu_s(server.pid) - server_cpu_s
            peak_mb = server.peak_rss_mb()
            progress(f"{label}: all merged in {elapsed_s:.2f}s; server peak RSS {peak_mb:.0f} MiB")
        finally:
            await asyncio.gather(*(t.close() for t in opened), return_exceptions=True)
    return {
        "herd_seconds": elapsed_s,
        "herd_terminals": float(terminals),
        "herd_payments": float(terminals * payments_each),
        "herd_ops_per_s": terminals * payments_each / elapsed_s,
        "herd_peak_rss_mb": peak_mb,
        "herd_server_rss_before_mb": baseline_mb,
        # CPU per payment, all threads: the server's, and the terminals' (this process).
        "herd_server_cpu_us_per_op": server_cpu_s * 1e6 / (terminals * payments_each),
        "herd_client_cpu_us_per_op": client_cpu_s * 1e6 / (terminals * payments_each),
    }


def run(
    quick: bool, *, terminals: int | None = None, payments_each: int = HERD_PAYMENTS_EACH
) -> dict[str, float]:
    """Herd figures: seconds until all merged, the server's peak RSS (MiB)."""
    count = terminals or (HERD_TERMINALS_QUICK if quick else HERD_TERMINALS_FULL)
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        return asyncio.run(_herd(Path(tmp), count, payments_each))


def run_drain(payments: int = DRAIN_PAYMENTS) -> dict[str, float]:
    """End-to-end drain: ONE terminal (real SDK) with ``payments`` stored reconnects to the
    real server over a loopback websocket -- the same setup as the pycrdt peer's drain."""
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        figures = asyncio.run(_herd(Path(tmp), 1, payments, label="drain (end to end)"))
    return {
        "drain_e2e_seconds": figures["herd_seconds"],
        "drain_e2e_ops_per_s": figures["herd_ops_per_s"],
        "drain_e2e_server_peak_rss_mb": figures["herd_peak_rss_mb"],
        "drain_e2e_server_cpu_us_per_op": figures["herd_server_cpu_us_per_op"],
        "drain_e2e_client_cpu_us_per_op": figures["herd_client_cpu_us_per_op"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_herd")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--terminals", type=int, default=None)
    args = parser.parse_args(argv)
    for name, value in run(args.quick, terminals=args.terminals).items():
        print(f"{name:>28}: {value:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
