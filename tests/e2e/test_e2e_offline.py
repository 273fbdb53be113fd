"""End to end with real processes: SDK terminals go offline, take payments, come back.

A real ``syncengine serve`` (subprocess), the sandbox processor service and a real SMTP
server on loopback; terminals from the SDK enrolled over the REST API with one-time codes,
each behind a TCP proxy that cuts its link. Checked: every outcome (approved, hard
declines, over-limit refusal, expiry) reaches the terminal, receipts are sent once, refund
rules (R9), the payments view filters, Z-report, batches and reconciliation (R10, R11).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    INSUFFICIENT,
    STOLEN,
    Clock,
    Inbox,
    ServerProcess,
    Till,
    card,
    close_all,
    go_offline,
    open_terminal,
    smtp_server,
    usd,
    wait_until,
)

from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import OfflinePrompt, PaymentForwarded, PaymentResult, ResumePrompt
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox

HOUR_MS = 3_600_000
INSERT = EntryMethod.INSERT


@dataclass
class World:
    server: ServerProcess
    processor: HttpProcessor
    inbox: Inbox
    tmp: Path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    with running_sandbox(tmp_path / "processor") as sandbox, smtp_server() as (inbox, smtp):
        server = ServerProcess(tmp_path / "server", sandbox.url, "--smtp", f"127.0.0.1:{smtp}")
        await server.start()
        try:
            async with HttpProcessor(sandbox.url) as processor:
                yield World(server, processor, inbox, tmp_path)
        finally:
            await server.stop()


async def _settings(server: ServerProcess, terminal_id: str, **body: Any) -> None:
    await server.api("PUT", f"/v1/terminals/{terminal_id}/settings", body)


async def _go_offline(till: Till) -> None:
    """Go offline (:func:`go_offline`); the terminal says so."""
    await go_offline(till)
    assert till.terminal.status().mode == "offline"


def _pid(result: PaymentResult) -> str:
    assert result.payment_id is not None, result
    return result.payment_id


def _forwarded(till: Till) -> dict[str, PaymentForwarded]:
    return {n.payment_id: n for n in till.seen(PaymentForwarded)}


def _local_zone_near_noon() -> tuple[str, datetime]:
    """A fixed-offset zone where it is about noon now, so 13 h ago is 'yesterday'."""
    now = datetime.now(UTC)
    offset_h = 12 - now.hour  # local = UTC + offset_h, in -11..12
    name = "UTC" if offset_h == 0 else f"Etc/GMT{'-' if offset_h > 0 else '+'}{abs(offset_h)}"
    return name, now + timedelta(hours=offset_h)


async def test_offline_round_trip_outcomes_receipts_refunds_reports(world: World) -> None:
    server = world.server
    await server.allow_offline()
    zone, local_now = _local_zone_near_noon()
    await server.api("PATCH", "/v1/merchant", {"timezone": zone, "batch_close_local": "23:59"})
    t1 = await open_terminal(world.tmp, server, "T1")
    late_clock = Clock()
    t2 = await open_terminal(world.tmp, server, "T2", clock=late_clock)
    tills = [t1, t2]
    try:
        for till in tills:
            tid = till.terminal.config.terminal_id
            await _settings(
                server,
                tid,
                offline_allowed=True,
                per_transaction_limit={"minor": 10_000, "currency": "USD"},
                total_limit={"minor": 50_000, "currency": "USD"},
            )
        await wait_until(
            lambda: all(t.terminal.status().offline_allowed for t in tills),
            10,
            "offline_allowed to reach both terminals",
        )
        await wait_until(
            lambda: all(t.terminal.status().network == "connected" for t in tills), 10, "sessions"
        )
        assert t1.terminal.config.merchant_id == "merchant-1"  # from enrollment

        # -- online: integrated and standalone, approved at once ----------------------------
        online = await t1.terminal.take_payment(usd("12.50"), card(), INSERT, "online@example.com")
        assert (online.outcome, online.channel) == ("approved_online", "integrated"), online
        standalone = await t1.terminal.take_payment(usd("7.00"), card(), INSERT, standalone=True)
        assert (standalone.outcome, standalone.channel) == ("approved_online", "standalone")

        # -- offline on T1: approvals, hard declines, over-limit --------------------------------
        await _go_offline(t1)
        ok = await t1.terminal.take_payment(usd("20.00"), card(), INSERT, "ok@example.com")
        poor = await t1.terminal.take_payment(usd("30.00"), card(INSUFFICIENT), INSERT, "poor@x.io")
        stolen = await t1.terminal.take_payment(usd("40.00"), card(STOLEN), INSERT)
        over = await t1.terminal.take_payment(usd("100.01"), card(), INSERT)
        for result in (ok, poor, stolen):
            assert (result.outcome, result.channel) == ("approved_offline", "offline"), result
        assert (over.outcome, over.reason) == ("refused", "over_transaction_limit")
        status = t1.terminal.status()
        assert (status.pending_count, status.pending_amount) == (3, usd("90.00"))
        assert status.max_offline_amount == usd("100.00")

        # -- offline on T2 "yesterday": one payment late (approved), one past its deadline ----
        # T2's clock runs 13 h behind while offline: its first payment is taken yesterday
        # (merchant time) and expires 24 h later, i.e. in 11 h: forwarded late, approved.
        late_clock.offset_ms = -13 * HOUR_MS
        await _go_offline(t2)
        late = await t2.terminal.take_payment(usd("15.00"), card(), INSERT, "late@example.com")
        assert late.outcome == "approved_offline" and late.expires_at_ms is not None
        # Back in real time before the link returns (server ops must not look 13 h ahead).
        late_clock.offset_ms = 0
        t2.proxy.heal()
        await wait_until(lambda: t2.terminal.status().network == "connected", 10, "T2 back")
        await wait_until(lambda: _pid(late) in _forwarded(t2), 15, "T2's late outcome")

        # -- T3 lives 25 h in the past while its link is down: its payment's deadline has
        # passed by the time it reaches the server (expired there, never charged).
        t3 = await open_terminal(
            world.tmp,
            server,
            "T3",
            clock=Clock(-25 * HOUR_MS),
            cut=True,
            offline_allowed_locally=True,
        )
        tills.append(t3)
        await _settings(server, "T3", offline_allowed=True)
        await wait_until(lambda: bool(t3.seen(OfflinePrompt)), 10, "T3's offline prompt")
        t3.terminal.activate_offline()
        doomed = await t3.terminal.take_payment(usd("16.00"), card(), INSERT, "doomed@x.io")
        assert doomed.outcome == "approved_offline", doomed
        t3.clock.offset_ms = 0  # a day later, the link comes back
        t3.proxy.heal()

        # -- reconnect T1: every outcome reaches the terminal --------------------------------
        t1.proxy.heal()
        await wait_until(lambda: bool(t1.seen(ResumePrompt)), 10, "T1's resume prompt")
        offline_ids = {_pid(ok), _pid(poor), _pid(stolen)}
        await wait_until(lambda: offline_ids <= set(_forwarded(t1)), 15, "T1's three outcomes")
        await wait_until(lambda: _pid(doomed) in _forwarded(t3), 15, "T3's expiry")
        got = _forwarded(t1)
        assert (got[_pid(ok)].status, got[_pid(ok)].channel) == ("approved", "offline")
        assert (got[_pid(poor)].status, got[_pid(poor)].code) == (
            "offline_declined",
            "insufficient_funds",
        )
        assert (got[_pid(stolen)].status, got[_pid(stolen)].code) == (
            "offline_declined",
            "stolen_card",
        )
        assert _forwarded(t2)[_pid(late)].status == "approved"
        assert _forwarded(t3)[_pid(doomed)].status == "expired"
        t1.terminal.resume_integrated()
        await wait_until(lambda: t1.terminal.status().pending_count == 0, 5, "T1 drained")
        history = {v.payment_id: v.status.value for v in t1.terminal.history()}
        assert history[_pid(ok)] == "approved" and history[_pid(stolen)] == ("offline_declined")

        # -- the processor: charged once each, the expired payment never --------------------
        ledger = [e for e in await world.processor.ledger() if isinstance(e, LedgerCharge)]
        charged = sorted(e.payment_id for e in ledger)
        assert _pid(doomed) not in charged
        assert len(charged) == len(set(charged)) == 6  # online x2, ok, poor, stolen, late
        assert (await world.processor.audit()).ok

        # -- receipts: once each, only after processing (R8) ---------------------------------
        emails = ["online@example.com", "ok@example.com", "poor@x.io", "late@example.com"]
        await wait_until(
            lambda: all(world.inbox.to(e) for e in emails), 15, "receipts for processed payments"
        )
        assert not world.inbox.to("doomed@x.io")  # expired: not processed, no receipt
        await _check_refunds(server, _pid(ok), _pid(poor), _pid(standalone))
        await _check_reports(server, local_now, _pid(late), _pid(doomed))
        for address in emails:
            assert len(world.inbox.to(address)) == 1, address
    finally:
        await close_all(tills)


async def _refund(server: ServerProcess, payment_id: str, minor: int) -> tuple[int, dict[str, Any]]:
    async with server.http() as http:
        r = await http.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": {"minor": minor, "currency": "USD"}},
        )
    return r.status_code, r.json()


async def _check_refunds(server: ServerProcess, ok_id: str, declined_id: str, sa_id: str) -> None:
    """R9 through the REST API."""
    status, body = await _refund(server, declined_id, 100)
    assert status == 409 and body["error"] == "not_approved", body
    assert (await _refund(server, ok_id, 500))[0] == 201
    status, body = await _refund(server, ok_id, 1_600)  # 5.00 + 16.00 > 20.00
    assert status == 409 and body["error"] == "exceeds_remaining", body
    assert (await _refund(server, ok_id, 1_500))[0] == 201
    status, body = await _refund(server, ok_id, 1)
    assert status == 409 and body["error"] == "fully_refunded", body
    await server.api("POST", f"/v1/payments/{sa_id}/dispute", {"open": True})
    status, body = await _refund(server, sa_id, 100)
    assert status == 409 and body["error"] == "dispute_open", body
    refunds = await server.api("GET", f"/v1/payments/{ok_id}/refunds")
    assert sorted(r["amount"]["minor"] for r in refunds["refunds"]) == [500, 1_500]


async def _check_reports(
    server: ServerProcess, local_now: datetime, late_id: str, doomed_id: str
) -> None:
    """R10 payments view filters, Z-report, R11 batches and reconciliation."""

    def ids(rows: list[dict[str, Any]]) -> set[str]:
        return {str(p["payment_id"]) for p in rows}

    assert len(await server.payments(channel="integrated")) == 1
    assert len(await server.payments(channel="standalone")) == 1
    assert len(await server.payments(channel="offline")) == 5
    assert len(await server.payments(status="offline_declined")) == 2
    assert ids(await server.payments(status="expired")) == {doomed_id}
    assert len(await server.payments(terminal_id="T1")) == 5
    assert len(await server.payments(payout_status="unbatched")) == 4
    z = await server.api("GET", "/v1/terminals/T1/z-report")
    # approved: 12.50 online + 7.00 standalone + 20.00 offline; the 20.00 was refunded
    assert (z["approved_minor"], z["refunded_minor"], z["net_minor"]) == (3_950, 2_000, 1_950), z
    declined = [x for x in z["lines"] if x["status"] == "offline_declined"]
    assert sum(x["count"] for x in declined) == 2 and declined[0]["channel"] == "offline"
    reset = await server.api("POST", "/v1/terminals/T1/z-report")
    assert reset["reset"] is True and reset["z_seq"] == z["z_seq"] + 1
    after = await server.api("GET", "/v1/terminals/T1/z-report")
    assert (after["lines"], after["approved_minor"]) == ([], 0)
    # Yesterday's batch closed at 23:59 yesterday: the late payment taken yesterday was
    # processed today, so it is not in it and the reconciliation explains the gap.
    yesterday = (local_now - timedelta(days=1)).date().isoformat()
    closed = await server.api("POST", "/v1/batches/close")
    assert [b["business_day"] for b in closed["closed"]] == [yesterday], closed
    assert closed["closed"][0]["payments_count"] == 0
    report = await server.api("GET", "/v1/reports/reconciliation", day=yesterday)
    assert report["balanced"] is True, report
    assert {line["payment_id"] for line in report["lines"]} >= {late_id}
    assert report["sales_total_minor"] - report["batch_total_minor"] >= 1_500
