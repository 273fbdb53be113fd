"""Benchmark: ops merged per second when one terminal drains 10,000 stored payments.

It drives the real merge path in-process: protocol decode of each ``Push`` frame (one hash
per op), :class:`~syncengine.server.merge.ServerMachine` (one Ed25519 verify per batch,
chain check), and :meth:`SqliteStore.merge_batch` (``executemany`` in one transaction per
batch, WAL, ``synchronous=FULL``). Beside it, in the same run and on the same disk, the
bare SQLite rate: the same rows inserted with ``executemany`` in batches of the same size,
nothing else. Not a test: run ``python bench/bench_drain.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, CardInfo
from syncengine.core.hlc import Hlc
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.money import Money
from syncengine.core.ops import Op, make_next
from syncengine.server.app import default_settings, hash_secret
from syncengine.server.merge import (
    LoadChain,
    LoadTerminal,
    Send,
    ServerMachine,
    StoreBatch,
)
from syncengine.server.model import Role
from syncengine.server.store.sqlite import SqliteStore

PAYMENTS = 10_000
QUICK_PAYMENTS = 2_000
ROUNDS = 5  # the median of these is reported
QUICK_ROUNDS = 3
BATCH_OPS = protocol.BATCH_OPS_MAX_DEFAULT
NOW_MS = 1_790_000_000_000


def _terminal_ops(n: int, key: crypto.Ed25519KeyPair) -> list[bytes]:
    """Push frames of ``n`` captures, ``BATCH_OPS`` per frame, each with a signed head."""
    sealed = crypto.b64e(os.urandom(crypto.SEALED_HEADER_BYTES + 256 + crypto.TAG_BYTES))
    ops: list[Op] = []
    prev: Op | None = None
    for i in range(n):
        body = Capture(
            payment_id=new_payment_id(NOW_MS - 3_600_000 + i, os.urandom(PAYMENT_ID_RANDOM_BYTES)),
            merchant_id="m1",
            amount=Money(1_000 + i % 5_000, "USD"),
            channel="offline",
            card=CardInfo("visa", "4242", "tap", sealed),
            captured_at_ms=NOW_MS - 3_600_000 + i,
            expires_at_ms=NOW_MS + 3_600_000,
            device_class="terminal",
            email=None,
        ).to_body()
        prev = make_next(prev, "T1", Hlc(NOW_MS - 3_600_000 + i, 0), "capture", body)
        ops.append(prev)
    frames = []
    for start in range(0, n, BATCH_OPS):
        batch = ops[start : start + BATCH_OPS]
        last = batch[-1]
        sig = crypto.sign(key.private, crypto.chain_head_message("T1", last.seq, last.digest))
        frames.append(protocol.encode(protocol.Push(tuple(batch), crypto.b64e(sig))))
    return frames


def _setup_store(path: Path, key: crypto.Ed25519KeyPair) -> SqliteStore:
    store = SqliteStore(path)
    store.open()
    store.ensure_merchant("m1", "USD", NOW_MS)
    store.create_api_key(hash_secret("k"), "k", "m1", Role.OWNER, "bench", NOW_MS)
    store.create_enrollment_code(hash_secret("c"), "m1", None, None, "bench", NOW_MS, NOW_MS + 1)
    store.enroll(hash_secret("c"), "T1", key.public, "terminal", default_settings("USD"), NOW_MS)
    return store


def _drain(
    store: SqliteStore, frames: list[bytes] | list[protocol.Message], key: crypto.Ed25519KeyPair
) -> int:
    """One session: handshake, then every push (frame or decoded); returns ops acked."""
    nonce = os.urandom(32)
    m = ServerMachine(crypto.Signer(os.urandom(32)), nonce)
    effects = m.receive(protocol.Hello("T1", "bench"), NOW_MS)
    assert isinstance(effects[0], LoadTerminal)
    m.terminal_loaded(store.load_terminal("T1"), NOW_MS)
    sig = crypto.sign(key.private, crypto.challenge_message(nonce, "T1"))
    m.receive(protocol.Auth("T1", crypto.b64e(sig)), NOW_MS)
    acked = 0
    for frame in frames:
        if isinstance(frame, bytes):
            effects = m.receive_frame(frame, NOW_MS)
        else:
            effects = m.receive(frame, NOW_MS)
        while effects:
            effect = effects.pop(0)
            if isinstance(effect, LoadChain):
                view = store.load_chain(effect.origin, effect.seq_lo, effect.seq_hi)
                effects += m.chain_loaded(view, NOW_MS)
            elif isinstance(effect, StoreBatch):
                effects += m.batch_stored(store.merge_batch(effect.batch), NOW_MS)
            elif isinstance(effect, Send) and isinstance(effect.message, protocol.Ack):
                acked = effect.message.seq
            else:
                raise AssertionError(f"unexpected effect {effect}")
    return acked


def _bare(path: Path, frames: list[bytes]) -> tuple[int, float]:
    """The same op and payment rows, inserted with nothing but executemany."""
    decoded = [protocol.decode(f) for f in frames]
    batches = []
    for msg in decoded:
        assert isinstance(msg, protocol.Push)
        batches.append(
            (
                [(op.origin, op.seq, op.kind, op.canonical_bytes(), op.digest) for op in msg.ops],
                # The card data is in the op row already (as in our store): not twice.
                [(op.body["payment_id"], "m1", "T1", op.seq) for op in msg.ops],
            )
        )
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE ops (origin TEXT, seq INTEGER, kind TEXT, data BLOB, digest TEXT, "
        "PRIMARY KEY (origin, seq)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE payments (payment_id TEXT PRIMARY KEY, merchant_id TEXT, terminal_id TEXT, "
        "capture_seq INTEGER)"
    )
    rows = 0
    start = time.perf_counter()
    for op_rows, pay_rows in batches:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO ops VALUES (?,?,?,?,?)", op_rows)
        conn.executemany("INSERT INTO payments VALUES (?,?,?,?)", pay_rows)
        conn.execute("COMMIT")
        rows += len(op_rows)
    elapsed = time.perf_counter() - start
    conn.close()
    return rows, elapsed


def _one_round(
    tmp: Path, frames: list[bytes], key: crypto.Ed25519KeyPair, n: int, i: int
) -> tuple[float, float, float, float, int]:
    """One round: (drain s, merge-after-decode s, decode-only s, bare s, bare rows)."""
    store = _setup_store(tmp / f"server-{i}.db", key)
    start = time.perf_counter()
    acked = _drain(store, frames, key)
    drain_s = time.perf_counter() - start
    assert acked == n, (acked, n)
    assert store.counts()["payments_status_captured"] == n
    store.close()
    # The same drain with frames decoded beforehand: what merge costs after the codec.
    store = _setup_store(tmp / f"server-decoded-{i}.db", key)
    decoded = [protocol.decode(f) for f in frames]
    start = time.perf_counter()
    assert _drain(store, decoded, key) == n
    merge_s = time.perf_counter() - start
    store.close()
    start = time.perf_counter()
    for f in frames:
        protocol.decode(f)
    decode_s = time.perf_counter() - start
    rows, bare_s = _bare(tmp / f"bare-{i}.db", frames)
    return drain_s, merge_s, decode_s, bare_s, rows


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns the figures (ops/s and the ratio to bare SQLite).

    A round is short (a fifth of a second) and this machine is shared, so the rounds are
    repeated, ours and the bare insert alternating, and the medians are reported, with
    every round's figure beside them.
    """
    n = QUICK_PAYMENTS if quick else PAYMENTS
    rounds = QUICK_ROUNDS if quick else ROUNDS
    key = crypto.Ed25519KeyPair.from_private(os.urandom(32))
    frames = _terminal_ops(n, key)
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            # Every round starts from the same state: the previous round's files gone and
            # the kernel's dirty pages written back (else their writeback competes with
            # this round's fsyncs, and each round measures a busier disk than the last).
            for old in Path(tmp).iterdir():
                old.unlink()
            os.sync()
            samples.append(_one_round(Path(tmp), frames, key, n, i))
    drain_rates = [n / s[0] for s in samples]
    bare_rates = [s[4] / s[3] for s in samples]
    drain_rate = statistics.median(drain_rates)
    bare_rate = statistics.median(bare_rates)
    return {
        "payments": n,
        "batch_ops": BATCH_OPS,
        "batches": len(frames),
        "rounds": rounds,
        "drain_seconds": round(n / drain_rate, 4),
        "drain_ops_per_s": round(drain_rate),
        "drain_ops_per_s_rounds": [round(r) for r in drain_rates],
        "merge_after_decode_ops_per_s": round(statistics.median(n / s[1] for s in samples)),
        "decode_only_ops_per_s": round(statistics.median(n / s[2] for s in samples)),
        "bare_insert_seconds": round(statistics.median(s[3] for s in samples), 4),
        "bare_insert_rows_per_s": round(bare_rate),
        "bare_insert_rows_per_s_rounds": [round(r) for r in bare_rates],
        "drain_vs_bare_ratio": round(drain_rate / bare_rate, 3),
        "target_drain_ops_per_s": 50_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PAYMENTS} payments only")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
