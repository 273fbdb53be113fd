"""Experiment: the floor of a log-first server on the drain path. In process, SQLite.

The end-to-end target (drain at twice the pycrdt peer's rate) is out of reach on today's
design (BENCHMARKS.md): the server spends about twice the peer's CPU an op, and the
decoder and storage experiments (``bench_typed_decode``, ``bench_storage_model``) bound
what each lever saves alone. This one measures the other design a planner would weigh: a
server that stores each verified push as it came and builds the payment rows afterwards
(a log first, the index later). On the same 10,000-capture frames as ``bench_drain``:

- ``today``: the product's merge path, as ``bench_drain`` drives it (``protocol.decode``,
  :class:`ServerMachine`, :meth:`SqliteStore.merge_batch`): an ``ops`` row and a
  ``payments`` row with its indexes per capture, one durable commit per push;
- ``log_first``: the push's ops cut out as raw JSON, each checked by the product's typed
  capture decoder (in C), hashed over its bytes as sent (no canonical re-encoding: equal
  to today's digests because the terminal sends canonical bytes, which is checked; in a
  product the digest would be defined over the bytes as sent), the chain and the one head
  signature checked, then the push stored as one segment row and the head moved, one
  durable commit -- what such a server does before its ack;
- ``materialize``: the rest of log-first, off the ack path: every segment's payment rows
  built from its ops and inserted with today's indexes, one transaction per segment.

The paths alternate for ``--rounds`` rounds (in both orders); medians of CPU and wall time
per op are printed as JSON. Not part of ``syncengine bench`` (no target):
``.venv/bin/python -m bench.bench_log_floor [--rounds N]``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bench._common import bench_dir, experiment_main, progress
from bench.bench_drain import PAYMENTS, _drain, _setup_store, _terminal_ops
from syncengine.core import crypto, protocol, push_codec
from syncengine.core.ops import GENESIS, OP_FORMAT_VERSION
from syncengine.server.store.sqlite import _INSERT_PAYMENT

ROUNDS_DEFAULT = 10
PATHS = ("today", "log_first", "materialize")
_SCHEMA = (
    "CREATE TABLE op_segments (origin TEXT NOT NULL, first_seq INTEGER NOT NULL, "
    "last_seq INTEGER NOT NULL, data BLOB NOT NULL, digests BLOB NOT NULL, "
    "PRIMARY KEY (origin, first_seq)) WITHOUT ROWID",
    "CREATE TABLE heads (origin TEXT PRIMARY KEY, seq INTEGER NOT NULL, digest TEXT NOT NULL)",
)
_VERSION_PREFIX = b"[%d," % OP_FORMAT_VERSION
_RECEIVED_AT_MS = 1


def _log_first(conn: sqlite3.Connection, frames: list[bytes], public: bytes) -> list[str]:
    """Verify and store every push as one segment row; returns the digests of its ops."""
    verifier = Ed25519PublicKey.from_public_bytes(public)
    decode_op = push_codec._CAPTURE_OP_DECODER.decode
    sha256 = hashlib.sha256
    prefix = _VERSION_PREFIX
    head_seq, head = 0, GENESIS
    digests: list[str] = []
    for frame in frames:
        push = push_codec._RAW_DECODER.decode(frame)
        raws = [bytes(item) for item in push.ops]
        batch: list[str] = []
        for raw in raws:
            origin, seq, _hlc, _kind, _body, prev = decode_op(raw)
            if seq != head_seq + 1 or prev != head:
                raise AssertionError(f"chain broken at {origin}/{seq}")
            head_seq, head = seq, sha256(prefix + raw[1:]).hexdigest()
            batch.append(head)
        verifier.verify(
            crypto.b64d(push.head_signature), crypto.chain_head_message("T1", head_seq, head)
        )
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO op_segments VALUES (?,?,?,?,?)",
            ("T1", head_seq - len(raws) + 1, head_seq, b"\n".join(raws), "".join(batch)),
        )
        conn.execute(
            "INSERT INTO heads VALUES ('T1', ?, ?) ON CONFLICT (origin) DO UPDATE "
            "SET seq=excluded.seq, digest=excluded.digest",
            (head_seq, head),
        )
        conn.execute("COMMIT")
        digests += batch
    return digests


def _materialize(conn: sqlite3.Connection) -> int:
    """Build and insert the payment rows of every stored segment; returns rows written."""
    decode_op = push_codec._CAPTURE_OP_DECODER.decode
    written = 0
    segments = conn.execute("SELECT data FROM op_segments ORDER BY first_seq").fetchall()
    for (data,) in segments:
        rows = []
        for raw in bytes(data).split(b"\n"):
            _origin, seq, _hlc, _kind, c, _prev = decode_op(raw)
            card = c.card
            rows.append(
                (
                    *(c.payment_id, "m1", "T1", seq, c.amount.minor, c.amount.currency),
                    *(c.channel, card.brand, card.last4, card.entry_method, c.captured_at_ms),
                    *(c.expires_at_ms, _RECEIVED_AT_MS, c.device_class, c.email),
                )
            )
        conn.execute("BEGIN IMMEDIATE")
        _INSERT_PAYMENT.run(conn, rows)
        conn.execute("COMMIT")
        written += len(rows)
    return written


def _today_digests(frames: list[bytes]) -> list[str]:
    digests = []
    for frame in frames:
        message = protocol.decode(frame)
        assert isinstance(message, protocol.Push)
        digests += [op.digest for op in message.ops]
    return digests


def run(rounds: int = ROUNDS_DEFAULT, payments: int = PAYMENTS) -> dict[str, Any]:
    progress(f"log floor: building {payments} captures")
    key = crypto.Ed25519KeyPair.from_private(os.urandom(32))
    frames = _terminal_ops(payments, key)
    cpu: dict[str, list[float]] = {path: [] for path in PATHS}
    wall: dict[str, list[float]] = {path: [] for path in PATHS}

    def timed(path: str, started_cpu: float, started_wall: float) -> None:
        cpu[path].append((time.process_time() - started_cpu) * 1e6 / payments)
        wall[path].append((time.perf_counter() - started_wall) * 1e6 / payments)

    with tempfile.TemporaryDirectory(dir=bench_dir()) as tmp:
        for r in range(rounds):
            for old in Path(tmp).iterdir():
                old.unlink()
            os.sync()
            for path in ("today", "log_first") if r % 2 else ("log_first", "today"):
                # Both on a database made by the real migrations, the terminal enrolled.
                store = _setup_store(Path(tmp) / f"{path}-{r}.db", key)
                if path == "today":
                    started_cpu, started_wall = time.process_time(), time.perf_counter()
                    if _drain(store, frames, key) != payments:
                        raise AssertionError("today's path did not ack every op")
                    timed("today", started_cpu, started_wall)
                    store.close()
                    continue
                conn = store.conn
                for statement in _SCHEMA:
                    conn.execute(statement)
                started_cpu, started_wall = time.process_time(), time.perf_counter()
                digests = _log_first(conn, frames, key.public)
                timed("log_first", started_cpu, started_wall)
                if r == 0 and digests != _today_digests(frames):
                    raise AssertionError("log_first hashed other bytes than today's path")
                started_cpu, started_wall = time.process_time(), time.perf_counter()
                if _materialize(conn) != payments:
                    raise AssertionError("materialize did not write every payment")
                timed("materialize", started_cpu, started_wall)
                store.close()
            progress(f"log floor: round {r + 1} of {rounds}")
    cpu_med = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
    wall_med = {k: round(statistics.median(v), 2) for k, v in wall.items()}
    return {
        "payments": payments,
        "batches": len(frames),
        "rounds": rounds,
        "cpu_us_per_op_median": cpu_med,
        "wall_us_per_op_median": wall_med,
        "log_first_vs_today_cpu": round(cpu_med["log_first"] / cpu_med["today"], 3),
        "log_first_plus_materialize_vs_today_cpu": round(
            (cpu_med["log_first"] + cpu_med["materialize"]) / cpu_med["today"], 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    return experiment_main("python -m bench.bench_log_floor", run, ROUNDS_DEFAULT, argv)


if __name__ == "__main__":
    raise SystemExit(main())
