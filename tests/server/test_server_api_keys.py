"""API keys over the REST API: listed without secrets, revoked at once, bounded (R13);
request bodies bounded before they are read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from server_kit import running_server

from syncengine.server import app as app_module

ANSWER_TIMEOUT_S = 5.0


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


async def test_a_body_above_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # /v1/enroll needs no key: the limit is all that stands before the body is buffered.
    async with running_server(tmp_path) as running:
        host, port = running.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # A declared size of 100 MB and nothing sent: answered at once, not awaited.
            writer.write(
                b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n"
            )
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT_S)
            assert status.startswith(b"HTTP/1.1 413"), status
        finally:
            writer.close()

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for _ in range(64):
                yield b" " * 16_384  # 1 MiB in all, against a 64 KiB limit

        async with running.http() as http:
            r = await http.post("/v1/api-keys", content=chunks())
            assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
            assert "larger than 65536 bytes" in r.json()["message"]
            # Within the limit, the body is read and judged as before.
            r = await http.post("/v1/api-keys", content=b"[1]")
            assert r.status_code == 400 and r.json()["error"] == "invalid_json"
            assert len((await http.get("/v1/api-keys")).json()["api_keys"]) == 1
