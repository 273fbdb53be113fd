"""API keys over the REST API: listed without secrets, revoked at once, bounded (R13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from server_kit import running_server

from syncengine.server import app as app_module


async def test_an_owner_lists_and_revokes_keys_and_a_revoked_key_is_refused(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as running, running.http() as owner:
        made = (await owner.post("/v1/api-keys", json={"role": "cashier", "name": "Till"})).json()
        cashier_secret, cashier_id = made["api_key"], made["key_id"]
        async with running.http(cashier_secret) as cashier:
            assert (await cashier.get("/v1/payments")).status_code == 200
            # Only an owner sees or revokes keys.
            assert (await cashier.get("/v1/api-keys")).status_code == 403
            assert (await cashier.delete(f"/v1/api-keys/{cashier_id}")).status_code == 403

            listed = (await owner.get("/v1/api-keys")).json()
            # (made at one instant of the test's clock: listed in key id order)
            assert sorted(
                (k["role"], k["name"], k["revoked_at_ms"]) for k in listed["api_keys"]
            ) == [("cashier", "Till", None), ("owner", "bootstrap owner", None)]
            owner_ids = [k["key_id"] for k in listed["api_keys"] if k["role"] == "owner"]
            assert listed["your_key_id"] == owner_ids[0]
            text = str(listed)
            assert cashier_secret not in text and cashier_secret[3:] not in text

            r = await owner.delete(f"/v1/api-keys/{cashier_id}")
            assert r.status_code == 200 and r.json()["key_id"] == cashier_id
            # Refused from the next request on: nothing is cached.
            r = await cashier.get("/v1/payments")
            assert r.status_code == 401 and r.json()["error"] == "unauthenticated"

        r = await owner.delete(f"/v1/api-keys/{cashier_id}")
        assert r.status_code == 409 and r.json()["error"] == "already_revoked"
        r = await owner.delete("/v1/api-keys/nope")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        listed = (await owner.get("/v1/api-keys")).json()["api_keys"]
        assert [k["key_id"] for k in listed if k["revoked_at_ms"] is not None] == [cashier_id]
        audit = await running.server.run_store(cast(Any, running.server.store).audit_log, 100)
        assert any(a[2] == "api_key.revoke" and a[3] == cashier_id for a in audit)


async def test_the_last_owner_key_is_kept_and_a_second_owner_can_replace_it(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as running, running.http() as first:
        first_id = (await first.get("/v1/api-keys")).json()["your_key_id"]
        r = await first.delete(f"/v1/api-keys/{first_id}")
        assert r.status_code == 409 and r.json()["error"] == "last_owner_key"
        assert "create another owner key first" in r.json()["message"]
        made = (await first.post("/v1/api-keys", json={"role": "owner", "name": "New"})).json()
        async with running.http(made["api_key"]) as second:
            assert (await second.delete(f"/v1/api-keys/{first_id}")).status_code == 200
            assert (await first.get("/v1/api-keys")).status_code == 401
            r = await second.delete(f"/v1/api-keys/{made['key_id']}")
            assert r.status_code == 409 and r.json()["error"] == "last_owner_key"


@pytest.mark.parametrize(
    "body",
    [{"role": "cashier", "name": "x" * 65}, {"role": "cashier", "name": 7}, {"role": "boss"}],
)
async def test_a_bad_key_request_is_refused_and_creates_nothing(
    tmp_path: Path, body: dict[str, object]
) -> None:
    async with running_server(tmp_path) as running, running.http() as owner:
        r = await owner.post("/v1/api-keys", json=body)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
        assert len((await owner.get("/v1/api-keys")).json()["api_keys"]) == 1


async def test_live_keys_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "API_KEYS_LIVE_MAX", 3)
    async with running_server(tmp_path) as running, running.http() as owner:
        ids = []
        for name in ("a", "b"):
            r = await owner.post("/v1/api-keys", json={"role": "cashier", "name": name})
            assert r.status_code == 201
            ids.append(r.json()["key_id"])
        r = await owner.post("/v1/api-keys", json={"role": "cashier", "name": "c"})
        assert r.status_code == 409 and r.json()["error"] == "too_many_keys"
        assert "revoke unused ones" in r.json()["message"]
        assert (await owner.delete(f"/v1/api-keys/{ids[0]}")).status_code == 200
        r = await owner.post("/v1/api-keys", json={"role": "cashier", "name": "c"})
        assert r.status_code == 201  # a revoked key no longer counts


async def test_the_api_reference_lists_the_key_routes(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running, running.http() as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert set(paths["/v1/api-keys"]) == {"get", "post"}
        assert set(paths["/v1/api-keys/{key_id}"]) == {"delete"}
