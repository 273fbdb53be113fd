"""The SQLite store's storage layout: the card data kept once, checkpoints off the commit path."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from server_support import enrolled_store, run_effects

import syncengine.server.store.sqlite as sqlite_store
from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, CardInfo
from syncengine.core.hlc import Hlc
from syncengine.core.money import Money
from syncengine.core.ops import Op, make_next
from syncengine.server.merge import Effect, ServerMachine
from syncengine.server.store.sqlite import SqliteStore

NOW_MS = 1_790_000_000_000
KEY = crypto.Ed25519KeyPair.from_private(b"\x02" * 32)
CHECKPOINT_WAIT_S = 10.0


def _open(path: Path) -> SqliteStore:
    return enrolled_store(path, KEY.public, NOW_MS)


def _captures(n: int) -> list[Op]:
    ops: list[Op] = []
    prev: Op | None = None
    for i in range(n):
        sealed = crypto.b64e(os.urandom(120))
        body = Capture(
            payment_id=f"p{i}",
            merchant_id="m1",
            amount=Money(100 + i, "USD"),
            channel="offline",
            card=CardInfo("visa", "4242", "tap", sealed),
            captured_at_ms=NOW_MS - 1_000 + i,
            expires_at_ms=NOW_MS + 3_600_000,
            device_class="terminal",
        ).to_body()
        prev = make_next(prev, "T1", Hlc(NOW_MS - 1_000 + i, 0), "capture", body)
        ops.append(prev)
    return ops


def _merge(store: SqliteStore, ops: list[Op]) -> None:
    nonce = os.urandom(32)
    m = ServerMachine(crypto.Signer(KEY.private), nonce)
    last = ops[-1]
    sig = crypto.sign(KEY.private, crypto.chain_head_message("T1", last.seq, last.digest))
    effects: list[Effect] = m.receive(protocol.Hello("T1", "t"), NOW_MS)
    challenge = crypto.sign(KEY.private, crypto.challenge_message(nonce, "T1"))
    auth = protocol.Auth("T1", crypto.b64e(challenge))
    push = protocol.Push(tuple(ops), crypto.b64e(sig))
    sent = run_effects(store, m, effects, NOW_MS)
    for step in (auth, push):
        sent += run_effects(store, m, m.receive(step, NOW_MS), NOW_MS)
    assert not m.closed, sent
    acks = [s for s in sent if isinstance(s, protocol.Ack)]
    assert acks and acks[-1].seq == ops[-1].seq, sent


def test_sealed_card_is_stored_once_and_read_back_from_the_capture_op(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.db")
    ops = _captures(5)
    _merge(store, ops)
    columns = {r[1] for r in store.conn.execute("PRAGMA table_info(payments)")}
    assert "sealed" not in columns
    for op in ops:
        payment = store.get_payment(op.body["payment_id"])
        assert payment is not None
        assert payment.sealed == op.body["card"]["sealed"]
        assert payment.capture_seq == op.seq
    # What the forwarder is handed: the first pending payment, with its card.
    pending = store.next_pending("T1")
    assert pending is not None and pending.sealed == ops[0].body["card"]["sealed"]
    store.close()


def test_upgrade_drops_the_copy_and_loses_no_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written by the previous schema (v2, card copied into payments) opens,
    migrates, and every payment still yields its card."""
    path = tmp_path / "old.db"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:2])
    old = _open(path)
    assert old.schema_version() == 2
    ops = _captures(3)
    with old.atomic() as conn:
        for op in ops:
            conn.execute(
                "INSERT INTO ops (origin, seq, kind, data, digest) VALUES (?,?,?,?,?)",
                (op.origin, op.seq, op.kind, op.canonical_bytes(), op.digest),
            )
            b = op.body
            conn.execute(
                "INSERT INTO payments (payment_id, merchant_id, terminal_id, capture_seq, "
                "amount_minor, currency, channel, brand, last4, entry_method, sealed, "
                "captured_at_ms, expires_at_ms, received_at_ms, device_class, email) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    b["payment_id"],
                    "m1",
                    "T1",
                    op.seq,
                    b["amount"]["minor"],
                    "USD",
                    b["channel"],
                    "visa",
                    "4242",
                    "tap",
                    b["card"]["sealed"],
                    b["captured_at_ms"],
                    b["expires_at_ms"],
                    NOW_MS,
                    "terminal",
                    None,
                ),
            )
    old.close()
    monkeypatch.undo()
    new = SqliteStore(path)
    new.open()
    assert new.schema_version() == len(sqlite_store.MIGRATIONS)
    for op in ops:
        payment = new.get_payment(op.body["payment_id"])
        assert payment is not None and payment.sealed == op.body["card"]["sealed"]
    # The escrow's running totals start from what the old database held.
    (share,) = new.escrow_state("m1").terminals
    assert share.used_minor == sum(op.body["amount"]["minor"] for op in ops)
    assert share.released_minor == 0
    new.close()


def _wal_frames(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        # (busy, frames in the WAL, frames checkpointed); PASSIVE never blocks anyone.
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1]) - int(row[2])
    finally:
        conn.close()


def test_checkpoints_run_in_the_background_and_stop_with_the_store(tmp_path: Path) -> None:
    store = _open(tmp_path / "s.db")
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
        sqlite_store.WAL_AUTOCHECKPOINT_PAGES
    )
    checkpointer = store._checkpointer
    assert checkpointer is not None
    before = checkpointer.checkpoints
    _merge(store, _captures(50))
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while checkpointer.checkpoints <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.checkpoints > before, "no background checkpoint after commits"
    assert checkpointer.failures == 0
    store.close()
    assert not checkpointer._thread.is_alive()
    # Everything committed is in the database file or its WAL, readable by a new reader.
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("SELECT count(*) FROM payments").fetchone()[0] == 50
    conn.close()
    assert _wal_frames(tmp_path / "s.db") == 0


def test_without_background_checkpoints_sqlite_checkpoints_itself(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", background_checkpoints=False)
    store.open()
    assert store._checkpointer is None
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # default
    store.close()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 50, 127, 128, 129, 255, 300])
def test_bulk_insert_writes_every_row_once_in_order(count: int) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT NOT NULL)")
    bulk = sqlite_store._BulkInsert("t (i, s)", 2, "")
    rows = [(i, f"row{i}") for i in range(count)]
    bulk.run(conn, rows)
    assert conn.execute("SELECT i, s FROM t ORDER BY rowid").fetchall() == rows
    # Every statement it may use binds at most INSERT_ROWS_PER_STATEMENT rows.
    assert max(bulk.sizes) == sqlite_store.INSERT_ROWS_PER_STATEMENT and min(bulk.sizes) == 1


def test_counts_read_beside_the_writer_and_count_ops_from_the_heads(tmp_path: Path) -> None:
    import threading

    store = _open(tmp_path / "server.db")
    try:
        _merge(store, _captures(7))
        counts = store.counts()
        ops = store.conn.execute("SELECT count(*) FROM ops").fetchone()[0]
        assert counts["ops"] == ops and ops >= 7
        assert counts["payments_status_captured"] == 7 and counts["forwards_pending"] == 7
        assert counts["terminals"] == 1
        # A write transaction is open on the store's connection (the store thread is in
        # the middle of a merge): counts() on another thread does not wait for it, and
        # reads what was committed.
        result: dict[str, int] = {}
        with store.atomic() as conn:
            conn.execute("UPDATE payments SET fwd_state='error' WHERE payment_id='p0'")
            reader = threading.Thread(target=lambda: result.update(store.counts()))
            reader.start()
            reader.join(5)
            assert not reader.is_alive()
        assert result["forwards_parked"] == 0  # not committed when it read
        assert store.counts()["forwards_parked"] == 1
    finally:
        store.close()


def test_the_periodic_jobs_read_what_is_due_from_partial_indexes(tmp_path: Path) -> None:
    """The expiry sweep and the receipt outbox do not scan every payment or receipt."""
    store = _open(tmp_path / "server.db")
    try:
        for sql, args, index in (
            (sqlite_store.EXPIRY_DUE_SQL, (NOW_MS, 100), "payments_expiry"),
            (sqlite_store.RECEIPTS_DUE_SQL, (NOW_MS, NOW_MS, 100), "receipts_outbox_pending"),
            (
                "SELECT refund_id FROM refunds WHERE state='pending' "
                "ORDER BY requested_at_ms LIMIT ?",
                (100,),
                "refunds_pending",
            ),
            (
                "SELECT payment_id FROM voids WHERE state='pending' "
                "ORDER BY requested_at_ms LIMIT ?",
                (100,),
                "voids_pending",
            ),
        ):
            plan = store.conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
            assert any(index in str(row[-1]) for row in plan), plan
            assert not any(str(row[-1]).startswith("SCAN payments") for row in plan), plan
    finally:
        store.close()
