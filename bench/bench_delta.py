"""Benchmark: the cost of a reconnect must not grow with history.

Two terminals share one real sync server (``syncengine serve``, SQLite, in a subprocess):
one whose log already holds ``small`` payments, one with ``large`` (1,000 and 100,000 in a
full run). Both histories are first drained to the server (setup, not timed). Then, in
alternating rounds, each terminal:

1. loses its link (a loopback proxy in front of the server cuts it: a real outage, seen
   by the real SDK), and the operator activates offline payments;
2. takes ``new_payments`` (10) offline payments with ``take_payment`` (durable each);
3. gets its link back. Timed: from the moment the terminal's connection is open
   (``network`` becomes ``handshaking``) until the server has acknowledged every new op
   as durably stored -- handshake, challenge signature, Welcome with the server's vector,
   push of only the missing ops, merge, ack.

The figure is the median of the rounds; the ratio large/small should stay near 1.

Run alone: ``python -m bench.bench_delta [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import (
    LinkProxy,
    RunningServer,
    allow_offline_payments,
    bench_dir,
    build_fixture,
    card,
    enroll,
    owner_http,
    progress,
    running_sync_server,
    terminal_config,
    write_fixture,
)
from syncengine.core import crypto
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node import Terminal
from syncengine.node.machine import Notice, StatusChanged

HISTORY_SMALL = 1_000
HISTORY_LARGE_FULL = 100_000
HISTORY_LARGE_QUICK = 10_000
NEW_PAYMENTS = 10
ROUNDS_FULL = 9
ROUNDS_QUICK = 3
DRAIN_TIMEOUT_S = 600.0
ROUND_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.0005


@dataclass
class Subject:
    """One terminal behind its own proxy, and what was measured on it."""

    history: int
    terminal: Terminal
    proxy: LinkProxy
    samples_ms: list[float] = field(default_factory=list)
    connected_at: float | None = None

    def on_notice(self, notice: Notice) -> None:
        if isinstance(notice, StatusChanged) and notice.network == "handshaking":
            self.connected_at = time.perf_counter()


async def _wait(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s}s")
        await asyncio.sleep(POLL_INTERVAL_S)


async def _subject(
    directory: Path, server: RunningServer, terminal_id: str, history: int
) -> Subject:
    processor_public = crypto.x25519_public_from_private(os.urandom(32))
    progress(f"delta: building a history of {history} payments for {terminal_id}")
    fixture = build_fixture(terminal_id, history, processor_public)
    async with owner_http(server) as http:
        server_public = await enroll(http, terminal_id, fixture.public_key)
    path = directory / f"{terminal_id}.db"
    write_fixture(path, fixture, enrolled=True)
    proxy = LinkProxy("127.0.0.1", server.port)
    await proxy.start()
    config = terminal_config(terminal_id, processor_public, server_public)
    terminal = await Terminal.open(path, config, proxy.url())
    subject = Subject(history, terminal, proxy)
    terminal.subscribe(subject.on_notice)
    progress(f"delta: draining the history of {terminal_id} to the server (setup)")
    started = time.perf_counter()
    await terminal.start()
    await _wait(lambda: terminal.machine.unsynced_ops() == 0, DRAIN_TIMEOUT_S, "history drain")
    elapsed = time.perf_counter() - started
    progress(f"delta: {terminal_id} history on the server ({history / elapsed:,.0f} ops/s)")
    return subject


async def _round(subject: Subject, index: int) -> None:
    terminal = subject.terminal
    await subject.proxy.cut()
    await _wait(lambda: terminal.status().mode == "prompting", ROUND_TIMEOUT_S, "outage seen")
    terminal.activate_offline()
    for i in range(NEW_PAYMENTS):
        amount = Money(1 + (index * NEW_PAYMENTS + i) % 40, "USD")
        result = await terminal.take_payment(amount, card(), EntryMethod.TAP)
        assert result.outcome == "approved_offline", result
    assert terminal.machine.unsynced_ops() >= NEW_PAYMENTS
    subject.connected_at = None
    subject.proxy.restore()
    await _wait(
        lambda: subject.connected_at is not None and terminal.machine.unsynced_ops() == 0,
        ROUND_TIMEOUT_S,
        "reconnect",
    )
    done = time.perf_counter()
    assert subject.connected_at is not None
    subject.samples_ms.append((done - subject.connected_at) * 1000)
    # Let the terminal settle back online before the next outage.
    await _wait(lambda: terminal.status().mode in ("online", "forwarding"), ROUND_TIMEOUT_S, "back")


async def _delta(directory: Path, small: int, large: int, rounds: int) -> dict[str, float]:
    with running_sync_server(directory / "server") as server:
        async with owner_http(server) as http:
            await allow_offline_payments(http)
        subjects = [
            await _subject(directory, server, "D-SMALL", small),
            await _subject(directory, server, "D-LARGE", large),
        ]
        try:
            progress(f"delta: {rounds} rounds of {NEW_PAYMENTS} new payments per terminal")
            for index in range(rounds):
                for subject in subjects:  # alternate, so drift hits both alike
                    await _round(subject, index)
            rss_mb = server.peak_rss_mb()
        finally:
            for subject in subjects:
                await subject.terminal.close()
                await subject.proxy.stop()
    small_ms = statistics.median(subjects[0].samples_ms)
    large_ms = statistics.median(subjects[1].samples_ms)
    progress(f"delta: reconnect {small_ms:.1f} ms at {small}, {large_ms:.1f} ms at {large}")
    return {
        "delta_history_small": float(small),
        "delta_history_large": float(large),
        "delta_reconnect_small_ms": small_ms,
        "delta_reconnect_large_ms": large_ms,
        "delta_cost_ratio_100k_vs_1k": large_ms / small_ms,
        "delta_server_peak_rss_mb": rss_mb,
    }


def run(
    quick: bool,
    *,
    small: int = HISTORY_SMALL,
    large: int | None = None,
    rounds: int | None = None,
) -> dict[str, float]:
    """Reconnect cost with a small and a large history, and their ratio.

    ``delta_cost_ratio_100k_vs_1k`` is large/small; in ``--quick`` the large history is
    10,000 (``delta_history_large`` says which sizes were used).
    """
    big = large or (HISTORY_LARGE_QUICK if quick else HISTORY_LARGE_FULL)
    count = rounds or (ROUNDS_QUICK if quick else ROUNDS_FULL)
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        return asyncio.run(_delta(Path(tmp), small, big, count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_delta")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", type=int, default=None)
    args = parser.parse_args(argv)
    for name, value in run(args.quick, large=args.large).items():
        print(f"{name:>28}: {value:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
