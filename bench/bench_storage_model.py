"""Experiment: what would another storage model save on the drain path? SQLite only.

The same 10,000 captures as ``bench_drain`` (20 batches of 500), their rows built
beforehand, are written in four layouts, each batch one ``BEGIN IMMEDIATE`` ... ``COMMIT``
under WAL + ``synchronous=FULL`` on a database made by the real :class:`SqliteStore`
migrations:

- ``ops+payments``: today's layout -- one ``ops`` row per op and one ``payments`` row per
  capture with all its indexes (what ``SqliteStore.merge_batch`` writes);
- ``segment+payments``: the batch's ops as one row (their canonical bytes and digests) and
  the ``payments`` rows as today;
- ``segment+payments-unique``: as above without ``UNIQUE (terminal_id, capture_seq)``;
- ``segment+bare-payments``: as above and no secondary index on ``payments`` at all (the
  floor of any layout that keeps one indexed row per payment).

Layouts alternate (in both orders) for ``--rounds`` rounds; the medians of CPU and wall
time per op are printed as JSON. Not part of ``syncengine bench`` (no target): run
``.venv/bin/python -m bench.bench_storage_model [--rounds N]``.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import bench_dir, experiment_main, progress
from bench.bench_drain import PAYMENTS, _terminal_ops
from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, parse_body
from syncengine.server.store.sqlite import _INSERT_OP, _INSERT_PAYMENT, SqliteStore

LAYOUTS = (
    "ops+payments",
    "segment+payments",
    "segment+payments-unique",
    "segment+bare-payments",
)
ROUNDS_DEFAULT = 20
SEGMENTS_TABLE = (
    "CREATE TABLE op_segments (origin TEXT NOT NULL, first_seq INTEGER NOT NULL, "
    "last_seq INTEGER NOT NULL, data BLOB NOT NULL, digests BLOB NOT NULL, "
    "PRIMARY KEY (origin, first_seq)) WITHOUT ROWID"
)
UNIQUE_CLAUSE = ",\n        UNIQUE (terminal_id, capture_seq)"

Batch = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], tuple[Any, ...]]


def _batches(payments: int) -> list[Batch]:
    """(op rows, payment rows, segment row) of each pushed batch, as merge_batch makes them."""
    key = crypto.Ed25519KeyPair.from_private(os.urandom(32))
    out: list[Batch] = []
    for frame in _terminal_ops(payments, key):
        message = protocol.decode(frame)
        assert isinstance(message, protocol.Push)
        ops = [(o.origin, o.seq, o.kind, o.canonical_bytes(), o.digest) for o in message.ops]
        rows = []
        for op in message.ops:
            c = parse_body(op)
            assert isinstance(c, Capture)
            card = c.card
            rows.append(
                (
                    *(c.payment_id, "m1", "T1", op.seq, c.amount.minor, c.amount.currency),
                    *(c.channel, card.brand, card.last4, card.entry_method, c.captured_at_ms),
                    *(c.expires_at_ms, 1, c.device_class, c.email),
                )
            )
        first, last = message.ops[0], message.ops[-1]
        segment = (
            first.origin,
            first.seq,
            last.seq,
            b"\n".join(row[3] for row in ops),
            bytes.fromhex("".join(row[4] for row in ops)),
        )
        out.append((ops, rows, segment))
    return out


def _database(path: Path, layout: str) -> sqlite3.Connection:
    store = SqliteStore(path)
    store.open()
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SEGMENTS_TABLE)
    if layout in ("segment+payments-unique", "segment+bare-payments"):
        table = conn.execute("SELECT sql FROM sqlite_master WHERE name='payments'").fetchone()[0]
        indexes = [
            r[0]
            for r in conn.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name='payments' AND type='index' "
                "AND sql IS NOT NULL"
            )
        ]
        assert UNIQUE_CLAUSE in table, "the payments table changed: update this experiment"
        table = table.replace(UNIQUE_CLAUSE, "")
        if layout == "segment+bare-payments":
            indexes = []
        conn.executescript(
            "PRAGMA foreign_keys=OFF; DROP TABLE payments; " + ";".join([table, *indexes]) + ";"
        )
    return conn


def _write(conn: sqlite3.Connection, layout: str, batches: list[Batch]) -> tuple[float, float]:
    """Seconds of CPU and of wall time to write every batch."""
    cpu, wall = time.process_time(), time.perf_counter()
    for ops, rows, segment in batches:
        conn.execute("BEGIN IMMEDIATE")
        if layout == "ops+payments":
            _INSERT_OP.run(conn, ops)
        else:
            conn.execute("INSERT INTO op_segments VALUES (?,?,?,?,?)", segment)
        _INSERT_PAYMENT.run(conn, rows)
        conn.execute("COMMIT")
    return time.process_time() - cpu, time.perf_counter() - wall


def run(rounds: int = ROUNDS_DEFAULT, payments: int = PAYMENTS) -> dict[str, Any]:
    progress(f"storage model: building {payments} captures")
    batches = _batches(payments)
    cpu: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    wall: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        for r in range(rounds):
            order = LAYOUTS if r % 2 else tuple(reversed(LAYOUTS))
            for i, layout in enumerate(order):
                conn = _database(Path(tmp) / f"r{r}-{i}.db", layout)
                spent_cpu, spent_wall = _write(conn, layout, batches)
                stored = conn.execute("SELECT count(*) FROM payments").fetchone()[0]
                conn.close()
                assert stored == payments, (layout, stored, payments)
                cpu[layout].append(spent_cpu * 1e6 / payments)
                wall[layout].append(spent_wall * 1e6 / payments)
            progress(f"storage model: round {r + 1} of {rounds}")
    return {
        "payments": payments,
        "batch_ops": len(batches[0][0]),
        "rounds": rounds,
        "cpu_us_per_op_median": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
        "wall_us_per_op_median": {k: round(statistics.median(v), 2) for k, v in wall.items()},
    }


def main(argv: list[str] | None = None) -> int:
    return experiment_main("python -m bench.bench_storage_model", run, ROUNDS_DEFAULT, argv)


if __name__ == "__main__":
    raise SystemExit(main())
