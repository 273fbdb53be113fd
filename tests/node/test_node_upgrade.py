"""R12: an SDK upgrade that migrates the terminal database is refused while payments exist
only on the terminal (seed 004, Square: don't reinstall while offline payments are pending)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncengine.core.errors import StorageError
from syncengine.core.hlc import Hlc
from syncengine.core.ops import make_next
from syncengine.node import store as store_module
from syncengine.node.store import Store


def old_database(path: Path, own_ops: int, acked: int) -> None:
    """A terminal database as the previous SDK (schema 1) left it."""
    store = Store(path)
    store.set_meta({"terminal_id": "T1", "acked_seq": acked})
    prev = None
    ops = []
    for i in range(own_ops):
        body = {"from": "online", "to": "offline", "reason": f"r{i}", "at_ms": i}
        prev = make_next(prev, "T1", Hlc(1_000 + i), "mode", body)
        ops.append(prev)
    store.write(tuple(ops), {})
    store.close()


def add_column(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE meta ADD COLUMN note TEXT")


@pytest.fixture
def next_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the installed SDK is one schema ahead, with a migration from 1."""
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(store_module, "MIGRATIONS", {1: add_column})


def test_upgrade_is_refused_while_ops_are_unacknowledged(tmp_path: Path, next_sdk: None) -> None:
    path = tmp_path / "terminal.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "SCHEMA_VERSION", 1)
        old_database(path, own_ops=3, acked=1)
    with pytest.raises(StorageError, match=r"2 op.*refused.*previous SDK"):
        Store(path)
    # Nothing changed: the old SDK still opens it and finds every op.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "SCHEMA_VERSION", 1)
        again = Store(path)
        assert [op.seq for op in again.load_ops()] == [1, 2, 3]
        assert again.get_meta("schema_version") == "1"
        again.close()


def test_upgrade_runs_once_everything_is_acknowledged(tmp_path: Path, next_sdk: None) -> None:
    path = tmp_path / "terminal.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "SCHEMA_VERSION", 1)
        old_database(path, own_ops=3, acked=3)
    upgraded = Store(path)
    assert upgraded.get_meta("schema_version") == "2"
    columns = [r[1] for r in upgraded.conn.execute("PRAGMA table_info(meta)")]
    assert "note" in columns
    assert len(upgraded.load_ops()) == 3
    upgraded.close()


def test_a_database_from_a_newer_sdk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "terminal.db"
    store = Store(path)
    store.set_meta({"schema_version": 9})
    store.close()
    with pytest.raises(StorageError, match="newer than this SDK"):
        Store(path)
