"""Experiment: a terminal's memory and open time with a long, acknowledged history.

Builds one terminal database of ``--payments`` offline payments (50,000 by default), all
acknowledged by the server (``acked_seq`` at the head), then opens it in a fresh child
process each way, alternating for ``--rounds`` rounds:

- ``compacted``: as the SDK opens it (:meth:`syncengine.node.Terminal.open`): the log read
  a page at a time, acknowledged ops leaving memory (``TerminalMachine``, 8. Memory);
- ``whole``: the same log with every op kept in memory (``TerminalMachine.restore``
  without a reader), how the SDK held it before.

Each child prints the open's wall time, the resident memory the open added, its peak
resident set (VmHWM) and the ops left in memory. The medians are printed per way with the
ratios compacted / whole, beside the database's own size (what the log takes on disk).

Run: ``python -m bench.bench_terminal_memory [--payments N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import bench_dir, build_fixture, progress, terminal_config, write_fixture
from syncengine.core import crypto
from syncengine.node import Terminal
from syncengine.node.machine import TerminalMachine
from syncengine.node.store import Store

PAYMENTS_DEFAULT = 50_000
ROUNDS_DEFAULT = 2
TERMINAL_ID = "T-MEM"
WAYS = ("compacted", "whole")


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def _open(way: str, path: Path, processor_public: bytes) -> dict[str, float]:
    config = terminal_config(TERMINAL_ID, processor_public, os.urandom(32))
    before = _rss_mb()
    started = time.perf_counter()
    if way == "compacted":
        terminal = await Terminal.open(path, config, "ws://127.0.0.1:9/sync")
        machine = terminal.machine
    else:
        store = Store(path)
        machine = TerminalMachine.restore(
            config,
            crypto.b64d(store.get_meta("signing_key") or ""),
            lambda n: 0,
            int(time.time() * 1000),
            store.load_ops(),
            int(store.get_meta("acked_seq") or 0),
            store.get_meta("offline_mode") or "",
            archived=store.load_archived_ops(),
        )
    elapsed = time.perf_counter() - started
    figures = {
        "open_s": elapsed,
        "rss_added_mb": _rss_mb() - before,
        "peak_rss_mb": _hwm_mb(),
        "ops_in_memory": float(
            machine.replica.in_memory(TERMINAL_ID)
            + machine.replica.in_memory(machine.server_origin)
        ),
        "payments": float(len(machine.history())),
    }
    if way == "compacted":
        await terminal.close()
    else:
        store.close()
    return figures


def _child(way: str, path: Path, processor_public: bytes) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.bench_terminal_memory", "--child", way, str(path)]
    command.append(processor_public.hex())
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {way} open failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(payments: int = PAYMENTS_DEFAULT, rounds: int = ROUNDS_DEFAULT) -> dict[str, float]:
    """The medians of each way and the ratios compacted / whole."""
    processor_public = crypto.x25519_public_from_private(os.urandom(crypto.KEY_BYTES))
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        path = Path(tmp) / "terminal.db"
        progress(f"terminal memory: building {payments:,} acknowledged payments")
        write_fixture(path, build_fixture(TERMINAL_ID, payments, processor_public), True)
        store = Store(path)
        try:
            (head,) = store.conn.execute(
                "SELECT max(seq) FROM ops WHERE origin = ?", (TERMINAL_ID,)
            ).fetchone()
            store.set_meta({"acked_seq": int(head)})
        finally:
            store.close()
        db_mb = sum(p.stat().st_size for p in Path(tmp).glob("terminal.db*")) / 2**20
        samples: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for index in range(rounds):
            for way in WAYS:
                progress(f"terminal memory: round {index + 1}/{rounds}, {way}")
                samples[way].append(_child(way, path, processor_public))
    out: dict[str, float] = {"payments": float(payments), "database_mb": db_mb}
    for way in WAYS:
        for name in samples[way][0]:
            out[f"{way}_{name}"] = statistics.median(s[name] for s in samples[way])
    for name in ("open_s", "rss_added_mb", "peak_rss_mb"):
        out[f"ratio_{name}"] = out[f"compacted_{name}"] / out[f"whole_{name}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_terminal_memory")
    parser.add_argument("--payments", type=int, default=PAYMENTS_DEFAULT)
    parser.add_argument("--rounds", type=int, default=ROUNDS_DEFAULT)
    parser.add_argument("--child", nargs=3, metavar=("WAY", "PATH", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        way, path, key = args.child
        figures = asyncio.run(_open(way, Path(path), bytes.fromhex(key)))
        print(json.dumps(figures))
        return 0
    if args.payments < 1 or args.rounds < 1:
        parser.error("--payments and --rounds must be at least 1")
    for name, value in run(args.payments, args.rounds).items():
        print(f"{name:>28}: {value:14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
