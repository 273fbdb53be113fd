"""Resolving parked payments over REST (``POST /v1/payments/{id}/resolve``), end to end:
a real server, the sandbox processor over HTTP, a terminal on the websocket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from server_kit import (
    DECLINE_PAN,
    FakeClock,
    Running,
    TestTerminal,
    api_key,
    connected_terminal,
    running_server,
    wait_for,
)

from syncengine.core.money import Money
from syncengine.processor.api import ChargeRequest, RefundRequest
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerRefund
from syncengine.processor.testing import running_sandbox
from syncengine.server.app import hash_secret
from syncengine.server.forwarder import ForwarderConfig


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[HttpProcessor]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            yield client


async def _payment(running: Running, payment_id: str) -> dict[str, Any]:
    async with running.http() as http:
        r = await http.get(f"/v1/payments/{payment_id}")
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())


async def _taken_elsewhere(processor: HttpProcessor, t: TestTerminal, payment_id: str) -> str:
    """Charge the processor under ``payment_id`` with another request (another amount),
    so that our own charge of it is an idempotency conflict. Returns that charge's ref."""
    body = next(op.body for op in t.ops if op.body.get("payment_id") == payment_id)
    result = await processor.charge(
        ChargeRequest(
            payment_id=payment_id,
            merchant_id=body["merchant_id"],
            terminal_id=t.terminal_id,
            amount=Money(body["amount"]["minor"] + 1, body["amount"]["currency"]),
            sealed_card=body["card"]["sealed"],
            channel=body["channel"],
            captured_at_ms=body["captured_at_ms"],
        )
    )
    return result.processor_ref


def _resolutions(running: Running) -> list[tuple[str, dict[str, Any]]]:
    rows = cast(Any, running.server.store).audit_log(1_000)
    return [(actor, json.loads(d)) for _, actor, action, d in rows if action == "payment.resolve"]


async def test_resolve_parked_payments_over_rest(tmp_path: Path, processor: HttpProcessor) -> None:
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("ok", 1_000, clock() - 3_000, email="a@example.com")
        t.capture("no", 2_000, clock() - 2_000, email="b@example.com")
        ref = await _taken_elsewhere(processor, t, "ok")
        await _taken_elsewhere(processor, t, "no")
        await t.push_all()

        async def parked(*ids: str) -> bool:
            states = [(await _payment(running, p))["forwarding"]["state"] for p in ids]
            return states == ["error"] * len(ids)

        await wait_for(lambda: parked("ok", "no"))
        async with running.http() as http:
            assert "syncengine_forwards_parked 2" in (await http.get("/metrics")).text
            r = await http.get("/v1/payments", params={"forwarding": "error"})
            assert [p["payment_id"] for p in r.json()["payments"]] == ["no", "ok"]
            r = await http.get("/v1/payments", params={"forwarding": "parked"})
            assert r.status_code == 400 and "forwarding is pending, done or error" in r.text

        # A payment the forwarder could not charge (outage), then parked by it.
        await processor.set_faults(outage=True)
        t.capture("again", 3_000, clock() - 1_000)
        await t.push_all()

        async def attempted() -> bool:
            return bool((await _payment(running, "again"))["forwarding"]["attempts"] >= 1)

        await wait_for(attempted)
        store = running.server.store
        await running.server.run_store(store.park, "again", "idempotency conflict: test")
        assert await parked("again")
        await processor.set_faults(outage=False)

        cashier, manager = await api_key(running, "cashier"), await api_key(running, "manager")
        async with running.http(cashier) as http:
            r = await http.post("/v1/payments/ok/resolve", json={"action": "retry"})
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
        async with running.http(manager) as http:
            bad: list[tuple[Any, str]] = [
                ({}, "action must be retry, approved or declined"),
                ({"action": "void"}, "action must be retry, approved or declined"),
                ({"action": "retry", "why": "x"}, "unknown fields ['why']"),
                ({"action": "retry", "processor_ref": "ch_1"}, "unknown fields ['processor_ref']"),
                ({"action": "approved"}, "processor_ref must be a string of 1 to 64"),
                ({"action": "approved", "processor_ref": "r" * 65}, "processor_ref must be"),
                ({"action": "approved", "processor_ref": 7}, "processor_ref must be"),
                ({"action": "declined", "code": ""}, "code must be a string of 1 to 32"),
                ({"action": "declined", "code": "c" * 33}, "code must be"),
                ({"action": "retry", "note": "n" * 513}, "note must be a string of 0 to 512"),
                ({"action": "retry", "note": None}, "note must be"),
            ]
            for body, message in bad:
                r = await http.post("/v1/payments/ok/resolve", json=body)
                assert r.status_code == 400, (body, r.text)
                assert r.json()["error"] == "invalid_request" and message in r.json()["message"]
            r = await http.post("/v1/payments/ok/resolve", content=b"[1]")
            assert r.status_code == 400 and r.json()["error"] == "invalid_json"
            r = await http.post("/v1/payments/nope/resolve", json={"action": "retry"})
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            assert await parked("ok", "no", "again")  # nothing was changed by the refusals

            # approved: finalized as if the processor had answered so.
            r = await http.post(
                "/v1/payments/ok/resolve",
                json={"action": "approved", "processor_ref": ref, "note": "ledger checked"},
            )
            assert r.status_code == 200, r.text
            assert r.json() == await _payment(running, "ok")
            assert (r.json()["status"], r.json()["forwarding"]["state"]) == ("approved", "done")
            assert r.json()["processed_at_ms"] == clock()
            # declined
            r = await http.post(
                "/v1/payments/no/resolve", json={"action": "declined", "code": "do_not_honor"}
            )
            assert r.status_code == 200, r.text
            assert (r.json()["status"], r.json()["code"]) == ("offline_declined", "do_not_honor")
            # retry: forwarded again under the same key, and charged this time.
        async with running.http() as http:  # the owner may, too
            r = await http.post(
                "/v1/payments/again/resolve", json={"action": "retry", "note": "fixed"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["forwarding"]["state"] == "pending"

        async def approved() -> bool:
            clock.advance(1_000)
            return bool((await _payment(running, "again"))["status"] == "approved")

        await wait_for(approved)
        assert (await _payment(running, "again"))["forwarding"]["attempts"] == 2  # lookup, charge
        async with running.http(manager) as http:
            r = await http.post("/v1/payments/again/resolve", json={"action": "retry"})
            assert r.status_code == 409 and r.json()["error"] == "not_parked"
            assert r.json()["message"].startswith("payment again is not parked (state: done)")
            assert "syncengine_forwards_parked 0" in (await http.get("/metrics")).text
            spec = (await http.get("/openapi.json")).json()
            assert "post" in spec["paths"]["/v1/payments/{payment_id}/resolve"]

        audit = await processor.audit()
        assert audit.charges_count == 3 and not audit.duplicate_charges  # never a second key
        assert running.server.store.receipt_states() == {"ok": "pending", "no": "pending"}
        owner = await running.server.run_store(store.get_api_key, hash_secret(running.owner_key))
        manager_key = await running.server.run_store(store.get_api_key, hash_secret(manager))
        assert owner is not None and manager_key is not None
        assert sorted(_resolutions(running), key=lambda r: str(r[1]["payment_id"])) == [
            (f"key:{owner.key_id}", {"payment_id": "again", "action": "retry", "note": "fixed"}),
            (
                f"key:{manager_key.key_id}",
                {"payment_id": "no", "action": "declined", "code": "do_not_honor"},
            ),
            (
                f"key:{manager_key.key_id}",
                {
                    "payment_id": "ok",
                    "action": "approved",
                    "processor_ref": ref,
                    "note": "ledger checked",
                },
            ),
        ]
        # The terminal hears every outcome as a status op, as from the processor's answer.
        ops = await t.pull()
        final = {
            op.body["payment_id"]: (op.body["status"], op.body["code"])
            for op in ops
            if op.kind == "status" and op.body["status"] != "forwarding"
        }
        assert final == {
            "ok": ("approved", "approved"),
            "no": ("offline_declined", "do_not_honor"),
            "again": ("approved", "approved"),
        }
        await t.close()


async def test_a_retry_never_adopts_the_record_that_parked_the_payment(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """Retried while the processor still holds another request under the key: the
    forwarder's lookup finds that record, sees it is for another amount, and parks the
    payment again instead of taking its outcome as ours."""
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("p1", 1_000, clock() - 3_000)
        await _taken_elsewhere(processor, t, "p1")  # charged for 10.01 under our key
        await t.push_all()

        async def state() -> tuple[str, int]:
            forwarding = (await _payment(running, "p1"))["forwarding"]
            return str(forwarding["state"]), int(forwarding["attempts"])

        async def parked() -> bool:
            return (await state())[0] == "error"

        await wait_for(parked)
        async with running.http() as http:
            r = await http.post("/v1/payments/p1/resolve", json={"action": "retry"})
            assert r.status_code == 200, r.text

        async def parked_again() -> bool:
            clock.advance(1_000)
            return await state() == ("error", 2)  # the first charge, then the lookup

        await wait_for(parked_again)
        payment = await _payment(running, "p1")
        assert payment["status"] == "forwarding"  # no outcome was adopted
        stored = running.server.store.get_payment("p1")
        assert stored is not None and stored.last_error is not None
        assert "is for 10.01 USD, not 10.00 USD" in stored.last_error
        audit = await processor.audit()
        assert audit.charges_count == 1 and not audit.duplicate_charges
        await t.close()


async def test_a_refund_the_processor_refuses_ends_refused(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """A payment finished by hand as approved that the processor declined (an operator's
    mistake): its refund is refused there (charge not approved). The refund ends refused,
    its amount is refundable again, and the refund job goes on with the rest."""
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("p1", 1_000, clock() - 3_000, pan=DECLINE_PAN)
        await _taken_elsewhere(processor, t, "p1")  # declined, under our key
        await t.push_all()

        async def parked() -> bool:
            return bool((await _payment(running, "p1"))["forwarding"]["state"] == "error")

        await wait_for(parked)
        async with running.http() as http:
            r = await http.post(
                "/v1/payments/p1/resolve",
                json={"action": "approved", "processor_ref": "ch_typo"},
            )
            assert r.status_code == 200, r.text
            body = {"amount": {"minor": 1_000, "currency": "USD"}, "refund_id": "rf-1"}
            r = await http.post("/v1/payments/p1/refunds", json=body)
            assert (r.status_code, r.json()["error"]) == (409, "charge_not_approved"), r.text
            r = await http.get("/v1/payments/p1/refunds")
            assert [(x["refund_id"], x["state"]) for x in r.json()["refunds"]] == [
                ("rf-1", "refused")
            ]
            assert (await _payment(running, "p1"))["refunded"]["minor"] == 0
        assert running.server.jobs is not None
        assert await running.server.jobs.retry_refunds() == 0  # nothing pending, no failure
        await t.close()


async def test_metrics_read_the_store_gauges_at_most_every_max_age(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_server(
        tmp_path / "server", clock=clock, metrics_counts_max_age_ms=60_000
    ) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)

        async def gauge(name: str) -> str:
            async with running.http() as http:
                text = (await http.get("/metrics")).text
            return next(line for line in text.splitlines() if line.startswith(name + " "))

        assert await gauge("syncengine_forwards_pending") == "syncengine_forwards_pending 0"
        t.capture("p1", 1_000, clock() - 1_000)
        await t.push_all()
        # within the max age: the last reading; the counters of this process are live
        assert await gauge("syncengine_forwards_pending") == "syncengine_forwards_pending 0"
        assert await gauge("syncengine_ops_merged_total") == "syncengine_ops_merged_total 1"
        running.server._counts_cache = None  # the age is over
        assert await gauge("syncengine_forwards_pending") == "syncengine_forwards_pending 1"
        await t.close()


async def test_parked_refunds_are_resolved_over_rest(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """A refund id the processor already holds for another refund is parked (not retried
    every 30 s forever), listed, kept counted, and finished by a person's decision."""
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("paid", 1_000, clock() - 1_000)
        await t.push_all()

        async def approved() -> bool:
            return bool((await _payment(running, "paid"))["status"] == "approved")

        await wait_for(approved)
        # Another system refunded under the ids we are about to use, other amounts.
        for rid, amount in (("r1", 50), ("r2", 60), ("r3", 70)):
            await processor.refund(RefundRequest("paid", rid, Money(amount, "USD")))
        manager = await api_key(running, "manager")
        cashier = await api_key(running, "cashier")

        def money(minor: int) -> dict[str, Any]:
            return {"minor": minor, "currency": "USD"}

        async with running.http(cashier) as http:
            for rid, amount in (("r1", 300), ("r2", 200), ("r3", 100)):
                r = await http.post(
                    "/v1/payments/paid/refunds", json={"amount": money(amount), "refund_id": rid}
                )
                assert r.status_code == 202, r.text
                assert r.json()["state"] == "parked"
            # Still counted: 400 of 1,000 remain, not 1,000.
            r = await http.post("/v1/payments/paid/refunds", json={"amount": money(401)})
            assert r.status_code == 409 and r.json()["error"] == "exceeds_remaining"
            r = await http.get("/v1/refunds", params={"state": "parked"})
            assert [x["refund_id"] for x in r.json()["refunds"]] == ["r1", "r2", "r3"]
            r = await http.get("/v1/refunds", params={"state": "done"})
            assert r.status_code == 400 and "state is parked" in r.json()["message"]
            assert "syncengine_refunds_parked 3" in (await http.get("/metrics")).text
            r = await http.post("/v1/payments/paid/refunds/r1/resolve", json={"action": "retry"})
            assert r.status_code == 403 and r.json()["error"] == "forbidden"

        # The refund job leaves them alone: no call to the processor, still parked.
        before = (await processor.audit()).refunds_count
        assert running.server.refunds is not None
        assert await running.server.refunds.retry_pending() == 0
        assert (await processor.audit()).refunds_count == before

        async with running.http(manager) as http:
            bad: list[tuple[Any, str]] = [
                ({}, "action must be retry, done or refused"),
                ({"action": "approved"}, "action must be retry, done or refused"),
                ({"action": "done", "why": "x"}, "unknown fields ['why']"),
                ({"action": "done", "note": "n" * 513}, "note must be a string of at most 512"),
                ({"action": "done", "note": 7}, "note must be"),
            ]
            for body, message in bad:
                r = await http.post("/v1/payments/paid/refunds/r1/resolve", json=body)
                assert r.status_code == 400, (body, r.text)
                assert message in r.json()["message"], (body, r.text)
            r = await http.post("/v1/payments/paid/refunds/nope/resolve", json={"action": "done"})
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            r = await http.post("/v1/payments/nope/refunds/r1/resolve", json={"action": "done"})
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            # retry: asked again under the same id; the processor still holds another
            # refund under it, so it is parked again (and the processor refunded nothing).
            r = await http.post(
                "/v1/payments/paid/refunds/r1/resolve", json={"action": "retry", "note": "try"}
            )
            assert r.status_code == 200 and r.json()["state"] == "parked", r.text
            # done: the processor's record shows it made (the terminal hears a refund op).
            r = await http.post("/v1/payments/paid/refunds/r2/resolve", json={"action": "done"})
            assert r.status_code == 200 and r.json()["state"] == "done", r.text
            # refused: it was not made; its amount is refundable again.
            r = await http.post(
                "/v1/payments/paid/refunds/r3/resolve",
                json={"action": "refused", "note": "another merchant's refund"},
            )
            assert r.status_code == 200 and r.json()["state"] == "refused", r.text
            r = await http.post("/v1/payments/paid/refunds/r3/resolve", json={"action": "done"})
            assert r.status_code == 409 and r.json()["error"] == "not_parked"
            assert (await _payment(running, "paid"))["refunded"] == money(500)
            r = await http.get("/v1/refunds", params={"state": "parked"})
            assert [x["refund_id"] for x in r.json()["refunds"]] == ["r1"]
            spec = (await http.get("/openapi.json")).json()
            assert "post" in spec["paths"]["/v1/payments/{payment_id}/refunds/{refund_id}/resolve"]
            assert "get" in spec["paths"]["/v1/refunds"]

        ops = await t.pull()
        assert [op.body["refund_id"] for op in ops if op.kind == "refund"] == ["r2"]
        rows = cast(Any, running.server.store).audit_log(1_000)
        decided = [
            json.loads(d)["refund_id"] for _, _, a, d in reversed(rows) if a == "refund.resolve"
        ]
        assert decided == ["r1", "r2", "r3"]
        await t.close()


async def test_a_refund_refused_as_a_request_is_parked_then_retried_by_a_person(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """The processor refuses the refund request itself (HTTP 400): the same request would
    be refused again, so it is parked (was: pending, retried every 30 s for ever)."""
    clock = FakeClock()
    fast = ForwarderConfig(poll_interval_ms=50)
    async with running_server(
        tmp_path / "server", processor, clock=clock, forwarder=fast
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("paid", 1_000, clock() - 1_000)
        await t.push_all()

        async def approved() -> bool:
            return bool((await _payment(running, "paid"))["status"] == "approved")

        await wait_for(approved)
        await processor.set_faults(refuse_next=1)
        manager = await api_key(running, "manager")
        async with running.http(manager) as http:
            body = {"amount": {"minor": 300, "currency": "USD"}, "refund_id": "r1"}
            r = await http.post("/v1/payments/paid/refunds", json=body)
            assert r.status_code == 202 and r.json()["state"] == "parked", r.text
            assert r.json()["last_error"].startswith("request_refused: ")  # why, for a person
            r = await http.get("/v1/refunds", params={"state": "pending"})
            assert r.json()["refunds"] == []  # not left for the retry job
            r = await http.post("/v1/payments/paid/refunds/r1/resolve", json={"action": "retry"})
            assert r.status_code == 200 and r.json()["state"] == "done", r.text
        refunds = [e for e in await processor.ledger() if isinstance(e, LedgerRefund)]
        assert [(e.refund_id, e.amount.minor) for e in refunds] == [("r1", 300)]
        await t.close()
