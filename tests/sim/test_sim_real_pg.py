"""The real-process tier on PostgreSQL: ``--store URL --servers N``.

The run creates its own database on the PostgreSQL server of the URL (the real one on this
machine, ``SYNCENGINE_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)
and drops it at the end. If PostgreSQL cannot be reached it tries to start the local
cluster (``pg_ctlcluster``); if that fails too, the test is skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from syncengine.sim import cli, real
from syncengine.sim.scenario import load

HERE = Path(__file__).parent
ADMIN_URL = os.environ.get("SYNCENGINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CONNECT_TIMEOUT_S = 3


def _unreachable() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc).strip()


def _postgres_or_skip() -> None:
    why = _unreachable()
    if why is not None and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").is_dir():
        for version in sorted(os.listdir("/etc/postgresql")):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        for _ in range(50):
            why = _unreachable()
            if why is None:
                break
            time.sleep(0.2)
    if why is not None:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL} and could not be started: {why}")


def _databases() -> set[str]:
    with psycopg.connect(ADMIN_URL, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()}


def test_real_two_servers_on_postgres_one_sigkilled() -> None:
    _postgres_or_skip()
    scenario = load(HERE / "real-pg-smoke.toml")
    db_name = real.database_name(scenario.name, scenario.seed, unique=True)
    # 10 scenario minutes at 20x: ~35 s with process start-up.
    result = real.run(scenario, clock_factor=20, store_url=ADMIN_URL, servers=2)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert result.counters["captured"] > 0
    assert result.counters["approved_offline"] > 0
    crashes = [e for e in result.facts.trace if e.kind == "crash" and e.detail == "server"]
    restarts = [e for e in result.facts.trace if e.kind == "restart" and e.detail == "server"]
    assert len(crashes) == 1 and [e.value for e in restarts] == [crashes[0].value]
    assert crashes[0].value in (0, 1)
    # The killed server's terminal reconnected to the live one while it was down.
    assert result.network["rerouted"] >= 1
    # The server's ops were read from PostgreSQL (no SQLite file), then the database dropped.
    assert result.facts.server_ops and not result.facts.server_files
    assert result.facts.server_blobs  # its tables, searched for card numbers
    assert result.facts.ledger
    assert db_name not in _databases()


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(["run", str(HERE / "real-smoke.toml"), *argv]))


def test_servers_without_store_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--real", "--servers", "2") == 2
    assert "--servers 2 needs --store" in capsys.readouterr().err
    with pytest.raises(ValueError, match="need a shared PostgreSQL store"):
        real.run(load(HERE / "real-smoke.toml"), servers=2)


def test_store_without_real_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--store", ADMIN_URL) == 2
    assert "add --real" in capsys.readouterr().err


def test_database_name_is_scenario_and_seed() -> None:
    assert real.database_name("real-smoke", 7, unique=False) == "sim_real_smoke_seed7"
    name = real.database_name("x" * 100, 7, unique=True)
    assert len(name) <= 63 and name.endswith(f"_seed7_{os.getpid()}")
