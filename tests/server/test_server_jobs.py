"""Scheduled jobs: receipts over real SMTP (aiosmtpd), batch close, reconciliation, expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from server_kit import (
    DECLINE_PAN,
    FakeClock,
    Running,
    TestTerminal,
    connected_terminal,
    free_socket,
    running_server,
    wait_for,
)

from syncengine.processor.client import HttpProcessor
from syncengine.processor.testing import running_sandbox
from syncengine.server.jobs import JobsConfig
from syncengine.server.receipts import ReceiptConfig
from syncengine.server.reports import due_closes

HOUR_MS = 3_600_000
NO_TIMERS = JobsConfig(
    expiry_sweep_interval_ms=3_600_000,
    batch_check_interval_ms=3_600_000,
    receipts_interval_ms=3_600_000,
    refunds_interval_ms=3_600_000,
)


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


class Inbox:
    """An aiosmtpd handler keeping every message it accepted, and its envelope's
    recipients (who the relay delivers to)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


def _free_port() -> int:
    sock = free_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[HttpProcessor]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            yield client


async def _final(running: Running, ids: set[str]) -> bool:
    async with running.http() as http:
        r = await http.get("/v1/payments", params={"limit": 1000})
        got = {p["payment_id"]: p["status"] for p in r.json()["payments"]}
    return ids <= set(got) and all(got[i] not in ("captured", "forwarding") for i in ids)


async def test_receipts_sent_once_after_processing_only(
    tmp_path: Path, processor: HttpProcessor, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    receipts = ReceiptConfig(smtp_host="127.0.0.1", smtp_port=port, sender="shop@example.com")
    async with running_server(
        tmp_path / "server", processor, clock=clock, receipts=receipts, jobs=NO_TIMERS
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        now = clock()
        t.capture("ok", 1_250, now - 60_000, email="ann@example.com")
        t.capture("no", 990, now - 50_000, email="bob@example.com", pan=DECLINE_PAN)
        t.capture("exp", 700, now - 40_000, email="cy@example.com", expires_at_ms=now - 1)
        t.capture("anon", 300, now - 30_000)
        await t.push_all()
        await wait_for(lambda: _final(running, {"ok", "no", "exp", "anon"}))
        jobs = running.server.jobs
        assert jobs is not None
        await wait_for(_truthy(lambda: len(inbox.messages) >= 2))
        await asyncio.sleep(0.1)
        assert await jobs.send_receipts() == 0  # nothing left: sent exactly once
        by_to = {m["To"]: m for m in inbox.messages}
        assert sorted(by_to) == ["ann@example.com", "bob@example.com"]  # expired: none
        assert len(inbox.messages) == 2
        assert "approved" in by_to["ann@example.com"]["Subject"]
        assert "12.50 USD" in by_to["ann@example.com"]["Subject"]
        assert "declined" in by_to["bob@example.com"]["Subject"]
        assert by_to["ann@example.com"]["Message-ID"] == "<receipt.ok@syncengine>"
        await t.close()


async def test_a_receipt_goes_to_one_address_only(
    tmp_path: Path, processor: HttpProcessor, smtp: tuple[Inbox, int]
) -> None:
    # The terminal checks an email for an "@" and no spaces: "a@x,b@y" passes. Sent with
    # it as the To: header, the receipt went to both; now it is refused for good.
    inbox, port = smtp
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    receipts = ReceiptConfig(smtp_host="127.0.0.1", smtp_port=port, sender="shop@example.com")
    async with running_server(
        tmp_path / "server", processor, clock=clock, receipts=receipts, jobs=NO_TIMERS
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        now = clock()
        t.capture("two", 1_000, now - 3_000, email="ann@example.com,eve@example.net")
        t.capture("semi", 1_000, now - 2_000, email="ann@example.com;eve@example.net")
        t.capture("one", 1_000, now - 1_000, email="ann@example.com")
        await t.push_all()
        await wait_for(lambda: _final(running, {"two", "semi", "one"}))
        store = running.server.store
        await wait_for(_truthy(lambda: store.receipt_states().get("one") == "sent"))
        jobs = running.server.jobs
        assert jobs is not None
        assert await jobs.send_receipts() == 0
        assert store.receipt_states() == {
            "two": "undeliverable",
            "semi": "undeliverable",
            "one": "sent",
        }
        assert inbox.recipients == [["ann@example.com"]]
        await t.close()


async def test_receipt_retried_when_smtp_is_down(tmp_path: Path, processor: HttpProcessor) -> None:
    inbox = Inbox()
    port = _free_port()  # nothing listens there yet: the relay is down
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    receipts = ReceiptConfig(smtp_host="127.0.0.1", smtp_port=port, retry_base_ms=1_000)
    async with running_server(
        tmp_path / "server", processor, clock=clock, receipts=receipts, jobs=NO_TIMERS
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("ok", 1_000, clock() - 1_000, email="ann@example.com")
        await t.push_all()
        await wait_for(lambda: _final(running, {"ok"}))
        jobs = running.server.jobs
        assert jobs is not None
        await asyncio.sleep(0.2)
        assert await jobs.send_receipts() == 0
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            assert await jobs.send_receipts() == 0  # backoff not elapsed yet
            clock.advance(60_000)
            assert await jobs.send_receipts() == 1
            assert await jobs.send_receipts() == 0
        finally:
            controller.stop()
        assert len(inbox.messages) == 1
        await t.close()


class Picky(Inbox):
    """A relay that refuses some recipients: for good (550) or for now (451)."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("gone@"):
            return "550 5.1.1 no such user"
        if address.startswith("busy@"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_receipt_retries_end(tmp_path: Path, processor: HttpProcessor) -> None:
    """A receipt the relay refuses for good ends undeliverable at once; one it keeps
    refusing for now ends so after attempts_max sends; neither is tried again."""
    inbox = Picky()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    receipts = ReceiptConfig(
        smtp_host="127.0.0.1", smtp_port=port, retry_base_ms=1_000, attempts_max=3
    )
    try:
        async with running_server(
            tmp_path / "server", processor, clock=clock, receipts=receipts, jobs=NO_TIMERS
        ) as running:
            t = await connected_terminal(running, await processor.public_key())
            now = clock()
            t.capture("gone", 1_000, now - 3_000, email="gone@example.com")
            t.capture("busy", 1_000, now - 2_000, email="busy@example.com")
            t.capture("ok", 1_000, now - 1_000, email="ann@example.com")
            await t.push_all()
            await wait_for(lambda: _final(running, {"gone", "busy", "ok"}))
            jobs = running.server.jobs
            assert jobs is not None
            store = running.server.store
            await wait_for(_truthy(lambda: store.receipt_states().get("ok") == "sent"))
            states = store.receipt_states()
            assert states["gone"] == "undeliverable" and states["busy"] == "pending"
            for _ in range(5):  # the backoff comes due each time; the third send ends it
                clock.advance(600_000)
                await jobs.send_receipts()
            assert store.receipt_states() == {
                "gone": "undeliverable",
                "busy": "undeliverable",
                "ok": "sent",
            }
            assert [m["To"] for m in inbox.messages] == ["ann@example.com"]
            async with running.http() as http:
                metrics = (await http.get("/metrics")).text
            assert "syncengine_receipts_undeliverable 2" in metrics
            assert "syncengine_receipts_pending 0" in metrics
            assert running.server.receipts.failed == 4  # gone once, busy three times
            await t.close()
    finally:
        controller.stop()


async def test_batches_and_reconciliation_explain_late_offline_payments(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    async with running_server(
        tmp_path / "server", processor, clock=clock, jobs=NO_TIMERS
    ) as running:
        t = await connected_terminal(running, await processor.public_key())
        t.capture("prev", 4_000, _ms("2026-09-21T20:00:00"))  # taken the day before
        t.capture("a", 1_000, _ms("2026-09-22T09:00:00"))
        t.capture("c", 3_000, _ms("2026-09-22T09:40:00"), pan=DECLINE_PAN)
        await t.push_all()
        await wait_for(lambda: _final(running, {"prev", "a", "c"}))
        late = TestTerminal("T2", processor_public=await processor.public_key())
        await late.enroll(running)
        late.capture("b", 2_000, _ms("2026-09-22T09:30:00"))  # stays offline past the close

        clock.now_ms = _ms("2026-09-22T23:30:00")
        async with running.http() as http:
            r = await http.post("/v1/batches/close")
            closed = r.json()["closed"]
            assert [b["business_day"] for b in closed] == ["2026-09-22"]
            assert closed[0]["sales"]["minor"] == 5_000  # a + prev
            day_batch = closed[0]["batch_id"]
            assert (await http.post("/v1/batches/close")).json()["closed"] == []  # idempotent

        clock.now_ms = _ms("2026-09-23T01:00:00")
        await late.connect(running)
        await late.push_all()
        await wait_for(lambda: _final(running, {"b"}))
        clock.now_ms = _ms("2026-09-23T23:30:00")
        async with running.http() as http:
            closed = (await http.post("/v1/batches/close")).json()["closed"]
            assert [(b["business_day"], b["sales"]["minor"]) for b in closed] == [
                ("2026-09-23", 2_000)
            ]
            r = await http.get("/v1/payments", params={"payout_status": "batched"})
            assert sorted(p["payment_id"] for p in r.json()["payments"]) == ["a", "b", "prev"]
            report = (
                await http.get("/v1/reports/reconciliation", params={"day": "2026-09-22"})
            ).json()
            batch = (await http.get(f"/v1/batches/{day_batch}")).json()
            assert sorted(p["payment_id"] for p in batch["payments"]) == ["a", "prev"]
            assert batch["next"] is None
            # A batch's payments are paged like the payments view.
            url = f"/v1/batches/{day_batch}"
            first = (await http.get(url, params={"limit": 1})).json()
            assert [p["payment_id"] for p in first["payments"]] == ["a"]
            assert first["next"] == "a" and first["batch_id"] == day_batch
            second = (await http.get(url, params={"limit": 1, "after": "a"})).json()
            assert [p["payment_id"] for p in second["payments"]] == ["prev"]
            last = (await http.get(url, params={"limit": 1, "after": "prev"})).json()
            assert last["payments"] == [] and last["next"] is None
            r = await http.get(url, params={"limit": 1001})
            assert r.status_code == 400 and "limit" in r.json()["message"]
            r = await http.get("/v1/payments", params={"batch_id": day_batch})
            assert [p["payment_id"] for p in r.json()["payments"]] == ["a", "prev"]
        assert report["sales_total_minor"] == 6_000  # a + b + c were taken that day
        assert report["batch_total_minor"] == 5_000  # a + prev settled in its batch
        assert report["balanced"] is True
        lines = {line["payment_id"]: line for line in report["lines"]}
        assert set(lines) == {"prev", "b", "c"}
        assert lines["prev"]["effect_minor"] == 4_000
        assert "taken on 2026-09-21" in lines["prev"]["reason"]
        assert lines["b"]["effect_minor"] == -2_000
        assert "batch of 2026-09-23" in lines["b"]["reason"]
        assert lines["c"]["effect_minor"] == -3_000
        assert "declined" in lines["c"]["reason"]
        await t.close()
        await late.close()


async def test_a_forwarding_server_has_no_expiry_sweep(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """With a processor, a late payment is expired only by the forwarder after a lookup (a
    restored server may have charged it): the sweep is not scheduled and expires nothing."""
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    async with running_server(
        tmp_path / "server", processor, clock=clock, jobs=NO_TIMERS, run_background=False
    ) as running:
        t = TestTerminal("T1", processor_public=await processor.public_key())
        await t.enroll(running)
        await t.connect(running)
        t.capture("p1", 1_000, clock(), expires_at_ms=clock() + HOUR_MS)
        await t.push_all()
        jobs = running.server.jobs
        assert jobs is not None
        clock.advance(2 * HOUR_MS)
        assert await jobs.expire_sweep() == 0
        payment = await running.server.run_store(running.server.store.get_payment, "p1")
        assert payment is not None and payment.status == "captured"
        jobs.start()
        try:
            assert jobs.scheduler is not None
            scheduled = {job.id for job in jobs.scheduler.get_jobs()}
            assert "expire_sweep" not in scheduled and "send_receipts" in scheduled, scheduled
        finally:
            jobs.stop()
        await t.close()


async def test_expiry_sweep_expires_stored_payments_never_forwarded(tmp_path: Path) -> None:
    clock = FakeClock(_ms("2026-09-22T10:00:00"))
    async with running_server(tmp_path, None, clock=clock, jobs=NO_TIMERS) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        t.capture("p1", 1_000, clock(), expires_at_ms=clock() + HOUR_MS)
        t.capture("p2", 1_000, clock(), channel="integrated")
        await t.push_all()
        ops_before = len(await t.pull())
        jobs = running.server.jobs
        assert jobs is not None
        assert await jobs.expire_sweep() == 0
        clock.advance(HOUR_MS)
        assert await jobs.expire_sweep() == 1
        assert await jobs.expire_sweep() == 0
        pushed = await t.recv_until(_server_ops())
        assert [(op.body["payment_id"], op.body["status"]) for op in pushed.ops] == [
            ("p1", "expired")
        ]
        assert pushed.ops[0].seq == ops_before + 1
        await t.close()


def test_due_closes_catch_up_after_downtime_in_order() -> None:
    now = _ms("2026-09-25T23:10:00")
    assert due_closes("UTC", "23:00", now, "2026-09-22") == [
        ("2026-09-23", _ms("2026-09-23T23:00:00")),
        ("2026-09-24", _ms("2026-09-24T23:00:00")),
        ("2026-09-25", _ms("2026-09-25T23:00:00")),
    ]
    early = _ms("2026-09-25T22:59:00")
    assert due_closes("UTC", "23:00", early, "2026-09-24") == []
    assert due_closes("UTC", "23:00", early, None) == [("2026-09-24", _ms("2026-09-24T23:00:00"))]
    # Merchant-local: 23:00 in Sydney is 13:00 UTC (AEST, UTC+10, before DST starts).
    assert due_closes("Australia/Sydney", "23:00", _ms("2026-06-10T13:30:00"), None) == [
        ("2026-06-10", _ms("2026-06-10T13:00:00"))
    ]


def _truthy(fn: Any) -> Any:
    async def check() -> bool:
        return bool(fn())

    return check


def _server_ops() -> Any:
    from syncengine.core.protocol import ServerOps

    return ServerOps
