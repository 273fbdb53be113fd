"""``syncengine owner-key``: the way back in when every owner key is lost (both backends).

Real processes: the command runs as a user would run it, against a store a real server
made (SQLite) or beside a store held open by another process (PostgreSQL).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from server_kit import running_server

from syncengine.server.app import hash_secret
from syncengine.server.cli import DB_FILE
from syncengine.server.model import Role
from syncengine.server.store import postgres as pg_module
from syncengine.server.store.sqlite import SqliteStore, lock_single_process

COMMAND_TIMEOUT_S = 60.0
NOW_MS = 1_790_000_000_000


def _owner_key(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncengine.cli", "owner-key", *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def _secret(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sk_"), done.stdout  # the secret alone
    return lines[0]


async def test_a_new_owner_key_opens_the_api_of_a_sqlite_server(tmp_path: Path) -> None:
    async with running_server(tmp_path, merchant_id="shop-7") as running:
        lost = running.owner_key  # as if the file and every copy were gone
    (tmp_path / "owner-api-key.txt").unlink()
    done = _owner_key("--data", str(tmp_path), "--merchant-id", "shop-7", "--name", "Back in")
    secret = _secret(done)
    assert "revoke lost ones" in done.stderr
    # (the test kit reads a key from this file at start; the new secret is all we have)
    (tmp_path / "owner-api-key.txt").write_text(secret + "\n")
    async with running_server(tmp_path, merchant_id="shop-7") as running:
        async with running.http(secret) as owner:
            keys = (await owner.get("/v1/api-keys")).json()["api_keys"]
            assert sorted((k["role"], k["name"]) for k in keys) == [
                ("owner", "Back in"),
                ("owner", "bootstrap owner"),
            ]
            lost_id = hash_secret(lost)[:12]
            assert (await owner.delete(f"/v1/api-keys/{lost_id}")).status_code == 200
        async with running.http(lost) as old:
            assert (await old.get("/v1/payments")).status_code == 401
        audit = await running.server.run_store(cast(Any, running.server.store).audit_log, 100)
        made = [a for a in audit if a[2] == "api_key.create" and "owner-key command" in a[3]]
        assert len(made) == 1 and made[0][1].startswith("cli:")


def test_refusals_say_why_and_change_nothing(tmp_path: Path) -> None:
    # No database there: nothing is created.
    done = _owner_key("--data", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no server database" in done.stderr
    assert done.stdout == "" and not (tmp_path / "nowhere").exists()
    store = SqliteStore(tmp_path / DB_FILE)
    store.open()
    store.ensure_merchant("m1", "USD", NOW_MS)
    store.close()
    done = _owner_key("--data", str(tmp_path), "--merchant-id", "m2")
    assert done.returncode == 2 and "no merchant 'm2'" in done.stderr and done.stdout == ""
    done = _owner_key("--data", str(tmp_path), "--merchant-id", "m1", "--name", "x" * 65)
    assert done.returncode == 2 and "at most 64" in done.stderr
    held = lock_single_process(tmp_path / DB_FILE)  # a server serves it
    try:
        done = _owner_key("--data", str(tmp_path), "--merchant-id", "m1")
    finally:
        held.close()
    assert done.returncode == 1 and "in use by another server process" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    store.open()
    try:
        assert store.count_api_keys() == 0
    finally:
        store.close()


def test_a_new_owner_key_beside_a_running_postgresql_store(pg_url: str) -> None:
    serving = pg_module.PostgresStore(pg_url)  # another process has the store open
    serving.open()
    try:
        serving.ensure_merchant("m1", "USD", NOW_MS)
        secret = _secret(_owner_key("--store", pg_url, "--merchant-id", "m1"))
        key = serving.get_api_key(hash_secret(secret))
        assert key is not None and key.role == Role.OWNER and key.merchant_id == "m1"
        assert key.name == "recovery owner key"
        assert any(a[2] == "api_key.create" for a in serving.audit_log())
    finally:
        serving.close()
