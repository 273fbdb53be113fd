"""``syncengine backup``: a consistent copy of a running server's SQLite database.

The copy is made with SQLite's online backup API in one step, inside one read snapshot:
in WAL mode a reader does not block the server's writes, so the copy is consistent and
always finishes (copied in several steps, it would start over after every write the server
made meanwhile, and might never finish on a busy server). The copy is written to a
temporary file beside the target, checked (``PRAGMA integrity_check``, the server's
schema), fsynced and only then renamed into place; an existing file is never overwritten.
:func:`restore_database` (``syncengine restore``) is the other half.

SQLite only: a PostgreSQL store is backed up with PostgreSQL's own tools
(docs/operations.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from syncengine.core.errors import StorageError
from syncengine.files import fsync_path
from syncengine.server.cli import DB_FILE, DEFAULT_DATA_DIR

BUSY_TIMEOUT_MS = 10_000
SET_ASIDE_TRIES_MAX = 100  # replaced-<time>-2 ... -101: restores within one second
PAGE_PRAGMAS = ("page_count", "page_size")
#: Tables every server database has; a file without them is not one.
SERVER_TABLES = ("schema_version", "terminals", "ops", "payments")

Progress = Callable[[str], None]  # a line for the operator


@dataclass(frozen=True, slots=True)
class DatabaseSummary:
    """What a server database holds, from a read of it."""

    path: Path
    bytes: int
    schema_version: int
    terminals: int
    ops: int
    payments: int

    def describe(self) -> str:
        return (
            f"{self.path}: {self.bytes / 1e6:.1f} MB, schema v{self.schema_version}, "
            f"{self.terminals} terminals, {self.payments} payments, {self.ops} ops"
        )


def check_database(path: Path) -> DatabaseSummary:
    """Open ``path`` read-only and check it is a sound server database.

    Raises :class:`StorageError` saying what is wrong: missing, not SQLite, damaged
    (``integrity_check``), or not a syncengine server database.
    """
    if not path.is_file():
        raise StorageError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: cannot be opened ({exc})") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            verdict = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            tables = {
                str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{path}: not a SQLite database ({exc})") from exc
        if verdict != ["ok"]:
            raise StorageError(f"{path}: damaged: {'; '.join(verdict[:5])}")
        missing = [t for t in SERVER_TABLES if t not in tables]
        if missing:
            raise StorageError(
                f"{path}: not a syncengine server database (no table {', '.join(missing)})"
            )

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0] or 0)

        return DatabaseSummary(
            path,
            path.stat().st_size,
            count("SELECT max(version) FROM schema_version"),
            count("SELECT count(*) FROM terminals"),
            count("SELECT count(*) FROM ops"),
            count("SELECT count(*) FROM payments"),
        )
    finally:
        conn.close()


def backup_database(db: Path, target: Path, progress: Progress | None = None) -> DatabaseSummary:
    """Copy the server database ``db`` to ``target`` (which must not exist), consistently,
    while a server may be running on it; returns what the copy holds."""
    if not db.is_file():
        raise StorageError(f"no server database at {db}; give the server's --data directory")
    if target.exists():
        raise StorageError(f"{target} exists; a backup never overwrites a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(db)
    try:
        source.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if progress is not None:
            pages, size = (source.execute(f"PRAGMA {p}").fetchone()[0] for p in PAGE_PRAGMAS)
            progress(f"copying {pages * size / 1e6:.1f} MB from {db} ...")
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy, pages=-1)  # one step: one snapshot (module docstring)
            # A copy on its own: no WAL beside it to lose when the file is moved.
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StorageError(f"backup of {db} failed: {exc}") from exc
    finally:
        source.close()
    if progress is not None:
        progress("checking the copy ...")
    try:
        summary = check_database(partial)
    except StorageError as exc:
        partial.unlink(missing_ok=True)
        # Named by its source: the temporary copy is gone, and the source is what is wrong.
        raise StorageError(str(exc).replace(str(partial), f"the copy of {db}")) from None
    fsync_path(partial)
    os.rename(partial, target)
    fsync_path(target.parent)
    return replace(summary, path=target)


@dataclass(frozen=True, slots=True)
class Restored:
    """What :func:`restore_database` did."""

    restored: DatabaseSummary
    set_aside: Path | None  # where the database it replaced went (None: there was none)


def restore_database(db: Path, source: Path, now: dt.datetime | None = None) -> Restored:
    """Put the backup ``source`` in place as the server database ``db``.

    Refused while a server runs on ``db`` (it holds the store's lock) and for a backup
    that is damaged, not a server database, or of a newer schema than this version knows.
    The database it replaces is never deleted: it and its WAL files are moved into
    ``<data>/replaced-<UTC time>/``. The restored database is marked restored at ``now``
    (``Store.mark_restored``: budget grants wait for the terminals that held one).
    """
    from syncengine.server.store.sqlite import MIGRATIONS, SqliteStore, lock_single_process

    summary = check_database(source)
    if summary.schema_version > len(MIGRATIONS):
        raise StorageError(
            f"{source}: schema v{summary.schema_version} is newer than this server "
            f"(v{len(MIGRATIONS)}); restore it with that version of syncengine"
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_single_process(db)
    except StorageError:
        raise StorageError(f"{db} is in use by a running server: stop it first") from None
    try:
        set_aside: Path | None = None
        present = [p for p in _db_files(db) if p.exists()]
        now = now or dt.datetime.now(dt.UTC)
        if present:
            stamp = now.strftime("%Y%m%dT%H%M%SZ")
            set_aside = db.parent / f"replaced-{stamp}"
            for n in range(2, SET_ASIDE_TRIES_MAX + 2):  # two restores in one second
                if not set_aside.exists():
                    break
                set_aside = db.parent / f"replaced-{stamp}-{n}"
            set_aside.mkdir()
            for path in present:
                os.rename(path, set_aside / path.name)
        partial = db.with_name(db.name + ".partial")
        shutil.copyfile(source, partial)
        fsync_path(partial)
        os.rename(partial, db)
        fsync_path(db.parent)
    finally:
        lock.close()
    store = SqliteStore(db)  # brings an older backup's schema up to date, as serve would
    store.open()
    try:
        store.mark_restored(int(now.timestamp() * 1000))
    finally:
        store.close()
    return Restored(replace(summary, path=db), set_aside)


def _db_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


# -- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine backup``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        help=f"the server's data directory (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--to",
        default=None,
        metavar="FILE",
        help="the backup file to write (default: <data>/backups/server-<UTC time>.db); "
        "never overwritten",
    )


def run(args: argparse.Namespace) -> int:
    """Back up, with progress on stderr; the backup's path and contents on stdout."""
    data = Path(args.data)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = Path(args.to) if args.to else data / "backups" / f"server-{stamp}.db"

    def progress(line: str) -> None:
        print(f"backup: {line}", file=sys.stderr, flush=True)

    if target.is_dir():
        print(
            f"syncengine backup: {target} is a directory; give --to a file path in it, "
            f"e.g. {target / f'server-{stamp}.db'}",
            file=sys.stderr,
        )
        return 2
    try:
        summary = backup_database(data / DB_FILE, target, progress)
    except StorageError as exc:
        print(f"syncengine backup: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --to under a file, on a read-only disk...
        print(f"syncengine backup: cannot write {target}: {exc}", file=sys.stderr)
        return 2
    print(f"backed up {summary.describe()}")
    print("also keep a copy of server-ed25519.key (once); restore with: syncengine restore")
    return 0
