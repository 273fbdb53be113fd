"""The SQLite store: durability settings, one atomic helper, disk full, tamper evidence."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
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


def test_a_write_without_fsync_takes_meta_only_and_restores_synchronous_full(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    ops = mode_ops(2)
    store.write((ops[0],), {"acked_seq": 0})
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    store.write((), {"acked_seq": 1}, durable=False)
    assert statements[0] == "PRAGMA synchronous = NORMAL"
    assert statements[-1] == "PRAGMA synchronous = FULL"
    assert "COMMIT" in statements
    assert connection_settings(store.conn) == REQUIRED_SETTINGS
    assert store.get_meta("acked_seq") == "1"
    # ops are never written without fsync: refused, nothing kept
    with pytest.raises(InvariantViolation, match="durably"):
        store.write((ops[1],), {"acked_seq": 2}, durable=False)
    assert store.load_ops() == [ops[0]] and store.get_meta("acked_seq") == "1"
    assert connection_settings(store.conn) == REQUIRED_SETTINGS
    # inside an outer transaction the write is part of it: no switch of the setting
    statements.clear()
    with store.atomic():
        store.write((), {"acked_seq": 2}, durable=False)
        with pytest.raises(InvariantViolation, match="durably"):
            store.write((ops[1],), {}, durable=False)  # refused there too
    assert not any(s.startswith("PRAGMA") for s in statements)
    store.conn.set_trace_callback(None)
    store.close()
    again = Store(tmp_path / "s.db")
    assert again.get_meta("acked_seq") == "2"
    again.close()


_FSYNC_CHILD = """
import sys
from syncengine.node.store import Store
store = Store(sys.argv[1])
durable = sys.argv[2] == "durable"
for i in range(int(sys.argv[3])):
    store.write((), {"acked_seq": i}, durable=durable)
"""


def _fsyncs(tmp_path: Path, name: str, mode: str, writes: int) -> int:
    trace = tmp_path / f"{name}.strace"
    command = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync"]
    command += [sys.executable, "-c", _FSYNC_CHILD, str(tmp_path / f"{name}.db"), mode]
    subprocess.run([*command, str(writes)], check=True, cwd=Path(__file__).resolve().parents[2])
    return sum(1 for line in trace.read_text().splitlines() if "sync(" in line)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count fsyncs")
def test_only_durable_writes_fsync(tmp_path: Path) -> None:
    """Counted at the system call: each durable commit fsyncs, a write with durable=False
    does not (the opening, schema and closing checkpoint cost the same in all three)."""
    base = _fsyncs(tmp_path, "base", "durable", 0)
    durable = _fsyncs(tmp_path, "durable", "durable", 20)
    volatile = _fsyncs(tmp_path, "volatile", "volatile", 20)
    assert durable - base >= 20
    assert volatile - base <= 1


def test_archive_moves_a_suffix_in_the_same_transaction_and_keeps_each_op_once(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    old: list[Op] = []
    for i in range(5):
        body = {"key": f"o{i}", "value": i}
        old.append(
            make_next(old[-1] if old else None, "server/T1", Hlc(1_000 + i), "setting", body)
        )
    store.write(tuple(old), {})
    # The server rewrote its stream from #3: #3..#5 move aside, its new #3.. take the seqs.
    new = old[:2]
    for i in range(3):
        body = {"key": f"n{i}", "value": i}
        new.append(make_next(new[-1], "server/T1", Hlc(9_000 + i), "setting", body))
    store.write(tuple(new[2:]), {"k": "v"}, archive=("server/T1", 3))
    assert [op.digest for op in store.load_ops()] == [op.digest for op in new]
    assert [op.digest for op in store.load_archived_ops()] == [op.digest for op in old[2:]]
    assert store.get_meta("k") == "v"
    # A failed write archives nothing (the same transaction).
    with pytest.raises(StorageError, match="Nothing was half-written"):
        store.write(tuple(new[:1]), {}, archive=("server/T1", 5))  # #1 is stored: refused
    assert len(store.load_ops()) == 5 and len(store.load_archived_ops()) == 3
    # Archived twice (a second rewrite over what was taken back): kept once.
    store.write((), {}, archive=("server/T1", 3))
    store.write(tuple(old[2:]), {})
    store.write((), {}, archive=("server/T1", 3))
    assert len(store.load_archived_ops()) == 6
    assert store.load_ops() == new[:2]
    store.close()
    reopened = Store(tmp_path / "s.db")
    assert len(reopened.load_archived_ops()) == 6
    reopened.conn.execute("UPDATE archived_ops SET wire = replace(wire, 'o3', 'o9')")
    with pytest.raises(InvariantViolation):
        reopened.load_archived_ops()  # a tampered archived row is refused like a log row
    reopened.close()
