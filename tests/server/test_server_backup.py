"""``syncengine backup`` and ``syncengine restore`` on real SQLite files.

The backup is taken while a store is open on the database (holding the single-process
lock, its WAL in use) and a writer thread keeps appending; the restore is refused while the
store is open and never deletes the database it replaces. The end-to-end use against a
running ``syncengine serve`` is in tests/e2e/test_e2e_restore.py.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from pathlib import Path

import pytest
from server_support import enrolled_store

from syncengine.cli import main
from syncengine.core import crypto
from syncengine.server.backup import restore_database
from syncengine.server.cli import SERVER_KEY_FILE
from syncengine.server.store.sqlite import MIGRATIONS, SqliteStore

NOW_MS = 1_790_000_000_000
KEY = crypto.Ed25519KeyPair.from_private(b"\x02" * 32)


def _settings(i: int) -> list[tuple[str, dict[str, object]]]:
    return [("setting", {"key": f"k{i}", "value": i})]


def _server_ops(path: Path) -> int:
    store = SqliteStore(path)
    store.open()
    try:
        ops, _more = store.load_ops("server/T1", 0, 100_000)
        return len(ops)
    finally:
        store.close()


def test_a_backup_of_a_database_in_use_is_consistent_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "server"
    store = enrolled_store(data / "server.db", KEY.public, NOW_MS)
    base = len(store.load_ops("server/T1", 0, 1000)[0])  # what enrolling wrote
    for i in range(200):
        store.append_server_ops("T1", _settings(i), NOW_MS)
    stop = threading.Event()
    written = [0]

    def writer() -> None:  # keeps the WAL busy while the copy is made
        with sqlite3.connect(data / "server.db") as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO schema_version (version) SELECT max(version) FROM schema_version"
                )
                conn.commit()
                written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        target = tmp_path / "b" / "copy.db"
        assert main(["backup", "--data", str(data), "--to", str(target)]) == 0
    finally:
        stop.set()
        thread.join()
    out, err = capsys.readouterr()
    assert "backup: copying" in err and "backup: checking the copy" in err
    assert f"backed up {target}" in out and f"{base + 200} ops" in out
    assert written[0] > 0
    copy = sqlite3.connect(target)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    copy.close()
    assert not list(target.parent.glob("*.partial"))

    # never overwrites: refused with a clear message, the file as it was
    before = target.read_bytes()
    assert main(["backup", "--data", str(data), "--to", str(target)]) == 2
    assert "exists; a backup never overwrites" in capsys.readouterr().err
    assert target.read_bytes() == before
    store.close()
    assert _server_ops(target) == base + 200

    assert main(["backup", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no server database at" in capsys.readouterr().err


def test_restore_is_refused_while_the_server_runs_and_keeps_what_it_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "server"
    store = enrolled_store(data / "server.db", KEY.public, NOW_MS)
    base = len(store.load_ops("server/T1", 0, 1000)[0])  # what enrolling wrote
    store.append_server_ops("T1", _settings(0), NOW_MS)
    backup = tmp_path / "backup.db"
    assert main(["backup", "--data", str(data), "--to", str(backup)]) == 0
    for i in range(1, 6):
        store.append_server_ops("T1", _settings(i), NOW_MS)
    restore = ["restore", "--data", str(data), "--from", str(backup)]
    (data / SERVER_KEY_FILE).write_bytes(b"\x01" * 32)  # a server's directory

    assert main(restore) == 2  # the store holds the lock
    assert "in use by a running server: stop it first" in capsys.readouterr().err
    assert not list(data.glob("replaced-*"))
    store.close()
    assert _server_ops(data / "server.db") == base + 6

    assert main(restore) == 0
    out = capsys.readouterr().out
    assert "restored" in out and "kept in" in out
    assert _server_ops(data / "server.db") == base + 1  # what the backup held
    [kept] = list(data.glob("replaced-*"))
    assert _server_ops(kept / "server.db") == base + 6  # nothing was deleted
    with sqlite3.connect(data / "server.db") as conn:  # marked: budget grants wait
        (row,) = conn.execute("SELECT value FROM service_state WHERE name='restored_at'")
    assert int(row[0]) > NOW_MS
    assert "budget grants wait" in out


def test_restore_takes_a_backup_file_or_a_postgresql_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["restore", "--data", str(tmp_path)]) == 2
    assert "give --from FILE (SQLite) or --store URL" in capsys.readouterr().err
    both = ["restore", "--from", "x.db", "--store", "postgresql://127.0.0.1:1/none"]
    assert main(both) == 2
    assert "give --from FILE" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["not sqlite", "not ours", "newer schema", "missing"])
def test_restore_refuses_a_backup_that_is_not_a_sound_server_database(
    tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "server"
    enrolled_store(data / "server.db", KEY.public, NOW_MS).close()
    (data / SERVER_KEY_FILE).write_bytes(b"\x01" * 32)
    original = (data / "server.db").read_bytes()
    bad = tmp_path / "bad.db"
    if what == "not sqlite":
        bad.write_bytes(b"these are not the pages you are looking for" * 100)
    elif what == "not ours":
        with sqlite3.connect(bad) as conn:
            conn.execute("CREATE TABLE t (x)")
    elif what == "newer schema":
        assert main(["backup", "--data", str(data), "--to", str(bad)]) == 0
        with sqlite3.connect(bad) as conn:
            conn.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    assert main(["restore", "--data", str(data), "--from", str(bad)]) == 2
    err = capsys.readouterr().err
    expected = {
        "not sqlite": "not a SQLite database",
        "not ours": "not a syncengine server database",
        "newer schema": "is newer than this server",
        "missing": "no such file",
    }[what]
    assert expected in err, err
    assert (data / "server.db").read_bytes() == original
    assert not list(data.glob("replaced-*"))


def test_restore_refuses_a_directory_that_is_not_a_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo, or the parent of the server's directory: the restore "succeeded" where no
    # server would read it (or under a new key no terminal knows).
    data = tmp_path / "server"
    enrolled_store(data / "server.db", KEY.public, NOW_MS).close()
    backup = tmp_path / "backup.db"
    assert main(["backup", "--data", str(data), "--to", str(backup)]) == 0
    for wrong in (tmp_path / "typo", tmp_path):
        assert main(["restore", "--data", str(wrong), "--from", str(backup)]) == 2
        assert f"has no {SERVER_KEY_FILE}" in capsys.readouterr().err
        assert not (wrong / "server.db").exists() or wrong == data
    assert not (tmp_path / "typo").exists()


def test_two_restores_in_one_second_keep_both_replaced_databases(tmp_path: Path) -> None:
    data = tmp_path / "server"
    enrolled_store(data / "server.db", KEY.public, NOW_MS).close()
    (data / SERVER_KEY_FILE).write_bytes(b"\x01" * 32)
    backup = tmp_path / "backup.db"
    assert main(["backup", "--data", str(data), "--to", str(backup)]) == 0
    at = dt.datetime(2026, 12, 5, 1, 2, 3, tzinfo=dt.UTC)
    for _ in range(3):
        restore_database(data / "server.db", backup, now=at)
    kept = sorted(p.name for p in data.glob("replaced-*"))
    assert kept == [
        "replaced-20261205T010203Z",
        "replaced-20261205T010203Z-2",
        "replaced-20261205T010203Z-3",
    ]
    assert all((data / name / "server.db").is_file() for name in kept)


def test_backup_to_a_directory_or_an_unwritable_place_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "server"
    enrolled_store(data / "server.db", KEY.public, NOW_MS).close()
    folder = tmp_path / "backups"
    folder.mkdir()
    assert main(["backup", "--data", str(data), "--to", str(folder)]) == 2
    assert f"{folder} is a directory; give --to a file path in it" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["backup", "--data", str(data), "--to", str(a_file / "x.db")]) == 2
    assert f"cannot write {a_file / 'x.db'}" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "server.db").write_bytes(b"")
    assert main(["backup", "--data", str(empty), "--to", str(tmp_path / "e.db")]) == 2
    err = capsys.readouterr().err
    assert f"the copy of {empty / 'server.db'}" in err and ".partial" not in err, err
