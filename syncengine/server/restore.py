"""``syncengine restore``: put a backup in place as the server's database.

See :func:`syncengine.server.backup.restore_database` and docs/operations.md, "Restore
from a backup", for what comes back by itself once the server runs again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from syncengine.core.errors import StorageError
from syncengine.server.backup import restore_database
from syncengine.server.cli import DB_FILE, DEFAULT_DATA_DIR, SERVER_KEY_FILE, open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine restore``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        help=f"the server's data directory (default {DEFAULT_DATA_DIR}); stop its server first",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="the backup file (made by syncengine backup)",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="PostgreSQL: restore the database with its own tools first, then run this with "
        "its URL (and no --from) to mark it restored, before the servers start",
    )


def run(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.store is None):
        print(
            "syncengine restore: give --from FILE (SQLite) or --store URL (PostgreSQL, "
            "after restoring it with its own tools)",
            file=sys.stderr,
        )
        return 2
    if args.store is not None:
        return _mark_postgres(args.store)
    data = Path(args.data)
    if not (data / SERVER_KEY_FILE).is_file():
        # A typo, or the parent of the server's directory: the restore would "succeed"
        # where no server reads it, or under a new key that no terminal knows.
        print(
            f"syncengine restore: {data} has no {SERVER_KEY_FILE}, so it is not a server's "
            "data directory: give the --data the server runs with (or, rebuilding a lost "
            f"machine, first put your copy of {SERVER_KEY_FILE} there: terminals know only "
            "that key)",
            file=sys.stderr,
        )
        return 2
    try:
        done = restore_database(data / DB_FILE, Path(args.source))
    except StorageError as exc:
        print(f"syncengine restore: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"syncengine restore: cannot restore into {data}: {exc}", file=sys.stderr)
        return 2
    print(f"restored {done.restored.describe()}")
    if done.set_aside is not None:
        print(f"the database it replaced is kept in {done.set_aside}")
    _next_steps()
    return 0


def _mark_postgres(url: str) -> int:
    import psycopg

    from syncengine.server.store.postgres import PostgresStore, redact_url

    open_store(url, "restore")  # refuses what is not a PostgreSQL URL
    try:  # before open(), which would create an empty store's schema
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    except psycopg.Error as exc:
        print(
            f"syncengine restore: cannot connect to {redact_url(url)}: {str(exc).strip()}",
            file=sys.stderr,
        )
        return 2
    if row is None or not row[0]:
        print(
            f"syncengine restore: {redact_url(url)} holds no syncengine store: restore the "
            "backup into it with PostgreSQL's tools first (pg_restore), then run this",
            file=sys.stderr,
        )
        return 2
    store = PostgresStore(url)
    try:
        store.open()
        store.mark_restored(int(time.time() * 1000))
    except StorageError as exc:
        print(f"syncengine restore: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"marked {redact_url(url)} restored")
    _next_steps()
    return 0


def _next_steps() -> None:
    print(
        "start the server again: terminals send what the backup lacks on their next session "
        "and take what the server writes from then on in place of what it lost; budget "
        "grants wait until every terminal that held one has been back (24 h at most); set "
        "again the settings and budget changed since the backup "
        "(docs/operations.md, 'Restore from a backup')"
    )
