"""Fixtures of the store tests: a fresh PostgreSQL database per test session.

The database is the real PostgreSQL on this machine (``SYNCENGINE_TEST_PG``, default
``postgresql://postgres@127.0.0.1:5432/postgres``). The session creates a database with a
unique name, gives each test its own schema in it, and drops the database at the end. If
PostgreSQL cannot be reached it tries to start the local cluster (``pg_ctlcluster``); if
that fails too, PostgreSQL tests are skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

# The server test kit (real server on loopback, a terminal made of core parts).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

ADMIN_URL = os.environ.get("SYNCENGINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CONNECT_TIMEOUT_S = 3


def _reachable() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc).strip()


def _start_local_cluster() -> None:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    for _ in range(50):
        if _reachable() is None:
            return
        time.sleep(0.2)


def with_options(url: str, **params: str) -> str:
    """``url`` with libpq parameters replaced (``dbname``, ``options`` ...)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info.update(params)
    return psycopg.conninfo.make_conninfo("", **info)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a database created for this session (dropped afterwards)."""
    why = _reachable()
    if why is not None:
        _start_local_cluster()
        why = _reachable()
    if why is not None:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL} and could not be started: {why}")
    name = f"syncengine_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_options(ADMIN_URL, dbname=name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A fresh, empty schema of the session database, as the URL's ``search_path``."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return with_options(pg_database, options=f"-c search_path={schema}")
