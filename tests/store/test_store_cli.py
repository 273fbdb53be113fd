"""The commands against PostgreSQL: a cause no retry can change fails at once, with its
reason; a restore mark is refused on a database that holds no store (real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from syncengine.server.store.postgres import PERMANENT_CONNECT_FAILURES

COMMAND_TIMEOUT_S = 60.0
FAST_S = 10.0  # far below the pool's 30 s of retries


def _command(*argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "syncengine.cli", *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    return done, time.monotonic() - started


def test_a_database_that_does_not_exist_fails_at_once_with_postgresqls_words(
    pg_database: str, tmp_path: Path
) -> None:
    missing = psycopg.conninfo.make_conninfo(pg_database, dbname="syncengine_no_such_db")
    done, took = _command("serve", "--data", str(tmp_path), "--port", "0", "--store", missing)
    assert done.returncode == 1, done.stderr
    assert 'database "syncengine_no_such_db" does not exist' in done.stderr
    assert "Traceback" not in done.stderr and took < FAST_S, (took, done.stderr)
    assert "does not exist" in PERMANENT_CONNECT_FAILURES


def test_restore_refuses_to_mark_a_database_without_a_store(pg_url: str) -> None:
    # Marking an empty database "restored" created a whole empty store and said it was
    # done: the dump was never restored into it.
    done, _ = _command("restore", "--store", pg_url)
    assert done.returncode == 2, done.stderr
    assert "holds no syncengine store" in done.stderr and "pg_restore" in done.stderr
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    assert row is not None and row[0] is False  # nothing was created
    done, _ = _command("restore", "--store", "sqlite:///x.db")
    assert done.returncode != 0 and "--store takes a PostgreSQL URL" in done.stderr
