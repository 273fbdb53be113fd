"""Benchmark: take_payment offline beside the bare cost of one durable SQLite commit.

Run: ``.venv/bin/python -m bench.bench_capture [--quick]`` or ``python bench/bench_capture.py``.
Both figures are measured in the same run on the same filesystem: an offline capture
(validate, seal the card, build and hash the op, one WAL + ``synchronous=FULL`` commit) and
a bare commit of one row of the same size. Target: capture p50 <= 3.5 x bare commit p50.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncengine.core import crypto
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import Brand, EntryMethod, Region
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.offline_mode import OfflineSettings
from syncengine.node import Terminal
from syncengine.node.machine import CardRead, TerminalConfig
from syncengine.node.store import connect

CAPTURES_QUICK = 200
CAPTURES_FULL = 2_000
TARGET_RATIO_MAX = 3.5
UNREACHABLE_URL = "ws://127.0.0.1:9/sync"  # nothing listens: a network outage


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _captures(directory: Path, count: int) -> tuple[list[float], int]:
    config = TerminalConfig(
        terminal_id="BENCH",
        merchant_id="M1",
        device_class=DeviceClass.TERMINAL,
        currency="USD",
        region=Region.US,
        processor_public_key=crypto.x25519_public_from_private(os.urandom(32)),
        offline=OfflineSettings(True, True, "bench", 1),
    )

    async def enroll(request: object) -> None:
        return None

    terminal = await Terminal.open(
        directory / "terminal.db", config, UNREACHABLE_URL, enrollment_code="1", enroll=enroll
    )
    await terminal.start()
    while terminal.status().mode != "prompting":
        await asyncio.sleep(0.005)
    terminal.activate_offline()
    card = CardRead(crypto.CardData("4111111111111111", 12, 2030), Brand.VISA)
    amount = Money(100, "USD")
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        result = await terminal.take_payment(amount, card, EntryMethod.TAP)
        samples.append((time.perf_counter() - start) * 1000)
        assert result.outcome == "approved_offline", result
    row = terminal.store.conn.execute("SELECT length(wire) FROM ops ORDER BY seq DESC").fetchone()
    await terminal.close()
    return samples, int(row[0])


def _bare_commits(directory: Path, count: int, row_bytes: int) -> list[float]:
    conn = connect(directory / "bare.db")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    payload = "x" * row_bytes
    samples: list[float] = []
    for i in range(count):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (i, payload))
        conn.execute("COMMIT")
        samples.append((time.perf_counter() - start) * 1000)
    conn.close()
    return samples


def run(quick: bool) -> dict[str, float]:
    """Measure and return capture p50/p99 (ms), captures/s, bare commit p50 (ms), ratio."""
    count = CAPTURES_QUICK if quick else CAPTURES_FULL
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        captures, row_bytes = asyncio.run(_captures(directory, count))
        elapsed_s = sum(captures) / 1000 or (time.perf_counter() - started)
        bare = _bare_commits(directory, count, row_bytes)
    capture_p50 = statistics.median(captures)
    bare_p50 = statistics.median(bare)
    return {
        "capture_p50_ms": capture_p50,
        "capture_p99_ms": _percentile(captures, 0.99),
        "captures_per_s": count / elapsed_s,
        "bare_commit_ms": bare_p50,
        "capture_vs_commit_ratio": capture_p50 / bare_p50,
    }


def main() -> None:
    figures = run(quick="--quick" in sys.argv)
    for name, value in figures.items():
        print(f"{name:>24}: {value:10.3f}")
    verdict = "meets" if figures["capture_vs_commit_ratio"] <= TARGET_RATIO_MAX else "MISSES"
    print(f"{verdict} the target of p50 <= {TARGET_RATIO_MAX} x bare commit")


if __name__ == "__main__":
    main()
