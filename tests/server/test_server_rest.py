"""REST API: roles and offline gating (R2, R3), refunds (R9), Z-report, health, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets
from server_kit import (
    DECLINE_PAN,
    FakeClock,
    TestTerminal,
    api_key,
    connected_terminal,
    running_server,
    wait_for,
)

from syncengine.core import protocol
from syncengine.processor.client import HttpProcessor
from syncengine.processor.testing import running_sandbox
from syncengine.server.forwarder import ForwarderConfig

DAY_MS = 86_400_000


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[HttpProcessor]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            yield client


async def test_offline_needs_standalone_liability_and_an_admin(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        cashier, manager = await api_key(running, "cashier"), await api_key(running, "manager")
        on = {"offline_allowed": True}
        async with running.http(cashier) as http:
            r = await http.put("/v1/terminals/T1/settings", json=on)
            assert r.status_code == 403
            assert (
                await http.post("/v1/merchant/offline-liability", json={"accept": True})
            ).status_code == 403
        async with running.http(manager) as http:
            r = await http.put("/v1/terminals/T1/settings", json=on)
            assert r.status_code == 409 and r.json()["error"] == "standalone_not_allowed"
            await http.patch("/v1/merchant", json={"standalone_allowed": True})
            r = await http.put("/v1/terminals/T1/settings", json=on)
            assert r.status_code == 409 and r.json()["error"] == "liability_not_accepted"
            r = await http.post("/v1/merchant/offline-liability", json={"accept": True})
            assert r.status_code == 200
            merchant = (await http.get("/v1/merchant")).json()
            assert merchant["offline_liability"]["accepted"] is True
            assert "Manager (manager" in merchant["offline_liability"]["accepted_by"]
            assert merchant["offline_liability"]["accepted_at_ms"] > 0
            r = await http.put("/v1/terminals/T1/settings", json=on)
            assert r.status_code == 200 and r.json()["offline_allowed"] is True
            # R3: limits only below the maxima.
            too_high = {"per_transaction_limit": {"minor": 500_001, "currency": "USD"}}
            r = await http.put("/v1/terminals/T1/settings", json=too_high)
            assert r.status_code == 400 and "maximum" in r.json()["message"]
            # Switching standalone off switches offline off too (R2).
            await http.patch("/v1/merchant", json={"standalone_allowed": False})
            r = await http.get("/v1/terminals/T1/settings")
            assert r.json()["offline_allowed"] is False
        await t.connect(running)
        ops = await t.pull()
        offline = [op.body["value"] for op in ops if op.body.get("key") == "offline_allowed"]
        assert offline == [False, True, False]  # every change reached the terminal, in order
        await t.close()


async def test_terminals_are_listed_in_pages(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        for terminal_id in ("T2", "T3", "T1"):
            await TestTerminal(terminal_id).enroll(running)
        async with running.http() as http:
            whole = (await http.get("/v1/terminals")).json()
            assert [t["terminal_id"] for t in whole["terminals"]] == ["T1", "T2", "T3"]
            assert whole["next"] is None
            first = (await http.get("/v1/terminals", params={"limit": 2})).json()
            assert [t["terminal_id"] for t in first["terminals"]] == ["T1", "T2"]
            assert first["next"] == "T2"
            rest = (await http.get("/v1/terminals", params={"limit": 2, "after": "T2"})).json()
            assert [t["terminal_id"] for t in rest["terminals"]] == ["T3"]
            assert rest["next"] is None
            for bad in ("0", "1001", "x"):
                r = await http.get("/v1/terminals", params={"limit": bad})
                assert r.status_code == 400, bad


async def test_a_revoked_terminal_is_disconnected_and_refused(tmp_path: Path) -> None:
    """DELETE /v1/terminals/{id} (owner or manager): its live session ends at once with
    not_enrolled, and it cannot connect again; audited; once only."""
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        cashier, manager = await api_key(running, "cashier"), await api_key(running, "manager")
        async with running.http(cashier) as http:
            assert (await http.delete("/v1/terminals/T1")).status_code == 403
        async with running.http(manager) as http:
            assert (await http.delete("/v1/terminals/T9")).status_code == 404
            r = await http.delete("/v1/terminals/T1")
            assert r.status_code == 200 and r.json()["terminal_id"] == "T1"
            assert r.json()["revoked_at_ms"] > 0
            again = await http.delete("/v1/terminals/T1")
            assert again.status_code == 409 and again.json()["error"] == "already_revoked"
            listed = (await http.get("/v1/terminals")).json()["terminals"]
            assert listed[0]["revoked_at_ms"] == r.json()["revoked_at_ms"]
        ended = await t.recv()
        assert isinstance(ended, protocol.Error) and ended.fatal
        assert ended.code == "not_enrolled" and "revoked" in ended.message
        await t.close()
        t.ws = await websockets.connect(running.ws_url)
        await t.send(protocol.Hello("T1", "test-kit"))
        refused = await t.recv()
        assert isinstance(refused, protocol.Error) and refused.code == "not_enrolled"
        await t.close()

        # Revoked by another process (straight in the shared store: this one's sessions
        # are not woken): the session's next push is refused and nothing is stored.
        t2 = TestTerminal("T2")
        await t2.enroll(running)
        await t2.connect(running)
        store = running.server.store
        assert store.revoke_terminal(t2.merchant_id, "T2", "key:other", 1) == (1, True)
        t2.capture("after-revoke", 1_000, 1_000)
        answer = await t2.push(t2.ops)
        assert isinstance(answer, protocol.Error) and answer.fatal
        assert answer.code == "not_enrolled"
        assert store.get_payment("after-revoke") is None
        await t2.close()


async def test_refund_rules_r9(tmp_path: Path, processor: HttpProcessor) -> None:
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        await processor.set_faults(outage=True)
        t.capture("paid", 1_000, clock() - 1_000)
        t.capture("declined", 500, clock() - 900, pan=DECLINE_PAN)
        await t.push_all()
        cashier = await api_key(running, "cashier")

        def refund(amount: int, rid: str | None = None) -> dict[str, object]:
            body: dict[str, object] = {"amount": {"minor": amount, "currency": "USD"}}
            if rid:
                body["refund_id"] = rid
            return body

        async with running.http(cashier) as http:
            r = await http.post("/v1/payments/paid/refunds", json=refund(100))
            assert r.status_code == 409 and r.json()["error"] == "not_processed"
        await processor.set_faults(outage=False)

        async def processed() -> bool:
            clock.advance(1_000)  # time passes: retries come due
            async with running.http() as http:
                pays = (await http.get("/v1/payments")).json()["payments"]
            return {p["status"] for p in pays} == {"approved", "offline_declined"}

        await wait_for(processed)
        async with running.http(cashier) as http:
            r = await http.post("/v1/payments/paid/refunds", json=refund(300, "r1"))
            assert r.status_code == 201, r.text
            r = await http.post("/v1/payments/paid/refunds", json=refund(300, "r1"))
            assert r.status_code == 201  # same refund id: the same refund, not a second one
            r = await http.post("/v1/payments/paid/refunds", json=refund(800))
            assert r.status_code == 409 and r.json()["error"] == "exceeds_remaining"
            r = await http.post("/v1/payments/declined/refunds", json=refund(100))
            assert r.status_code == 409 and r.json()["error"] == "not_approved"
        async with running.http() as http:
            assert (
                await http.post("/v1/payments/paid/dispute", json={"open": True})
            ).status_code == 200
            r = await http.post("/v1/payments/paid/refunds", json=refund(100))
            assert r.status_code == 409 and r.json()["error"] == "dispute_open"
            await http.post("/v1/payments/paid/dispute", json={"open": False})
            r = await http.post("/v1/payments/paid/refunds", json=refund(700, "r2"))
            assert r.status_code == 201
            r = await http.post("/v1/payments/paid/refunds", json=refund(1))
            assert r.status_code == 409 and r.json()["error"] == "fully_refunded"
            payment = (await http.get("/v1/payments/paid")).json()
            assert payment["refunded"] == {"minor": 1_000, "currency": "USD"}
        audit = await processor.audit()
        assert audit.ok and audit.refunds_count == 2
        ops = await t.pull()
        refunds = [op.body["refund_id"] for op in ops if op.kind == "refund"]
        disputes = [op.body["open"] for op in ops if op.kind == "dispute"]
        assert refunds == ["r1", "r2"] and disputes == [True, False]
        await t.close()


async def test_refund_window_is_90_days(tmp_path: Path, processor: HttpProcessor) -> None:
    clock = FakeClock()
    async with running_server(tmp_path / "server", processor, clock=clock) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("old", 1_000, clock() - 1_000)
        await t.push_all()

        async def approved() -> bool:
            async with running.http() as http:
                return bool((await http.get("/v1/payments/old")).json()["status"] == "approved")

        await wait_for(approved)
        clock.advance(91 * DAY_MS)
        async with running.http() as http:
            r = await http.post(
                "/v1/payments/old/refunds", json={"amount": {"minor": 1, "currency": "USD"}}
            )
            assert r.status_code == 409 and r.json()["error"] == "refund_window_passed"
        await t.close()


async def test_payments_view_filters_z_report_health_metrics_openapi(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_server(tmp_path, clock=clock) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        t.capture("off", 1_000, clock() - 3_000)
        t.capture("std", 2_000, clock() - 2_000, channel="standalone")
        t.capture("int", 4_000, clock() - 1_000, channel="integrated")
        assert isinstance(await t.push(t.ops), protocol.Ack)
        async with running.http() as http:
            r = await http.get("/v1/payments", params={"channel": "standalone"})
            assert [p["payment_id"] for p in r.json()["payments"]] == ["std"]
            r = await http.get("/v1/payments", params={"from_ms": clock() - 2_000})
            assert sorted(p["payment_id"] for p in r.json()["payments"]) == ["int", "std"]
            r = await http.get("/v1/payments", params={"status": "captured", "terminal_id": "T1"})
            assert len(r.json()["payments"]) == 3
            r = await http.get("/v1/payments", params={"payout_status": "none"})
            assert len(r.json()["payments"]) == 3
            assert "sealed" not in r.text  # card data never leaves the server
            z = (await http.get("/v1/terminals/T1/z-report")).json()
            assert sum(line["count"] for line in z["lines"]) == 3
            z = (await http.post("/v1/terminals/T1/z-report")).json()
            assert z["z_seq"] == 1 and z["reset"] is True
            clock.advance(10)
            z = (await http.get("/v1/terminals/T1/z-report")).json()
            assert z["lines"] == []  # reset: a new period
            assert (await http.get("/health")).json()["status"] == "ok"
            metrics = (await http.get("/metrics")).text
            assert "syncengine_ops_merged_total 3" in metrics
            assert "syncengine_payments_status_captured 3" in metrics
            spec = (await http.get("/openapi.json")).json()
            assert "/v1/payments/{payment_id}/refunds" in spec["paths"]
            assert (await http.get("/docs")).status_code == 200
            r = await http.get("/v1/payments", headers={"authorization": "Bearer nope"})
            assert r.status_code == 401
        await t.close()


async def test_list_parameters_out_of_range_are_refused_not_cut(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running, running.http() as http:
        for path in ("/v1/payments", "/v1/refunds?state=pending", "/v1/batches"):
            join = "&" if "?" in path else "?"
            for limit in ("0", "1001", "5000", "-3"):
                r = await http.get(f"{path}{join}limit={limit}")
                assert r.status_code == 400, (path, limit, r.text)
                assert f"limit is 1 to 1000, not {int(limit)}" in r.json()["message"]
            assert (await http.get(f"{path}{join}limit=1000")).status_code == 200
        # Larger than a database integer: a clear 400, where it was a 500.
        for query in ("from_ms=100000000000000000000", "to_ms=-100000000000000000000"):
            r = await http.get(f"/v1/payments?{query}")
            assert r.status_code == 400 and "out of range" in r.json()["message"], r.text
