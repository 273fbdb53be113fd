"""The SQLite store: durability settings, one atomic helper, disk full, tamper evidence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncengine.core.errors import InvariantViolation, StorageError
from syncengine.core.hlc import Hlc
from syncengine.core.ops import Op, make_next
from syncengine.node.store import REQUIRED_SETTINGS, Store, connection_settings


def mode_ops(count: int, origin: str = "T1") -> list[Op]:
    ops: list[Op] = []
    prev: Op | None = None
    for i in range(count):
        body = {"from": "online", "to": "prompting", "reason": f"r{i}", "at_ms": i}
        prev = make_next(prev, origin, Hlc(1_000 + i, 0), "mode", body)
        ops.append(prev)
    return ops


def test_every_connection_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.reader()
    assert len(store.connections()) == 2
    for conn in store.connections():
        assert connection_settings(conn) == REQUIRED_SETTINGS
    store.close()


def test_ops_round_trip_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ops = mode_ops(5)
    store.write(tuple(ops[:2]), {"acked_seq": 1})
    store.write(tuple(ops[2:]), {})
    store.close()
    again = Store(tmp_path / "s.db")
    assert again.load_ops() == ops
    assert again.get_meta("acked_seq") == "1"
    again.close()


def test_atomic_rolls_back_on_any_exception_and_nests_with_savepoints(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ops = mode_ops(3)
    with store.atomic():
        store.write((ops[0],), {"a": 1})  # nested: a savepoint
        with pytest.raises(RuntimeError), store.atomic():
            store.write((ops[1],), {"b": 2})
            raise RuntimeError("inner fails")
    assert store.load_ops() == [ops[0]]
    assert store.get_meta("a") == "1" and store.get_meta("b") is None
    with pytest.raises(ValueError), store.atomic():
        store.write((ops[1],), {})
        raise ValueError("outer fails")
    assert store.load_ops() == [ops[0]]
    assert not store.conn.in_transaction
    store.close()


def test_a_duplicate_op_is_refused_not_overwritten(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ops = mode_ops(1)
    store.write((ops[0],), {})
    with pytest.raises(StorageError):
        store.write((ops[0],), {})
    assert store.load_ops() == ops
    store.close()


def test_disk_full_is_a_clear_storage_error_and_keeps_earlier_data(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ops = mode_ops(400)
    store.write(tuple(ops[:10]), {})
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match="storage is full"):
        store.write(tuple(ops[10:]), {})
    assert not store.conn.in_transaction
    assert store.load_ops() == ops[:10]
    store.close()
    again = Store(tmp_path / "s.db")
    assert again.load_ops() == ops[:10]
    again.close()


def test_a_tampered_row_is_detected_on_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.write(tuple(mode_ops(2)), {})
    store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("UPDATE ops SET wire = replace(wire, 'r1', 'r9') WHERE seq = 2")
    conn.commit()
    conn.close()
    again = Store(tmp_path / "s.db")
    with pytest.raises(InvariantViolation):
        again.load_ops()
    again.close()
