"""End to end: a void of a same-day standalone payment on the terminal (R9).

A real ``syncengine serve`` (subprocess) and the sandbox processor service on loopback; an
SDK terminal enrolled over the REST API. The terminal voids a standalone payment approved
online the same day: the server turns the ``void_request`` into a full refund at the
processor (checked in the processor's ledger) and the terminal learns it (``refund`` op ->
``PaymentVoided``, history, Z-report). Voids the terminal must refuse write nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import Clock, ServerProcess, card, close_all, open_terminal, usd, wait_until

from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import DAY_MS, PaymentVoided, VoidDecided, VoidRefused
from syncengine.processor.api import RefundRequest
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerRefund
from syncengine.processor.testing import running_sandbox

INSERT = EntryMethod.INSERT
HOUR_MS = 3_600_000
MINUTE_MS = 60_000


@dataclass
class World:
    server: ServerProcess
    processor: HttpProcessor
    tmp: Path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url)
        await server.start()
        try:
            async with HttpProcessor(sandbox.url) as processor:
                yield World(server, processor, tmp_path)
        finally:
            await server.stop()


async def test_a_same_day_standalone_void_becomes_a_full_refund(world: World) -> None:
    server = world.server
    await server.api("PATCH", "/v1/merchant", {"standalone_allowed": True, "timezone": "UTC"})
    till = await open_terminal(world.tmp, server, "T1")
    terminal = till.terminal
    try:
        await wait_until(lambda: terminal.status().network == "connected", 10, "the session")
        sale = await terminal.take_payment(usd("7.00"), card(), INSERT, standalone=True)
        assert (sale.outcome, sale.channel) == ("approved_online", "standalone"), sale
        integrated = await terminal.take_payment(usd("5.00"), card(), INSERT)
        assert (integrated.outcome, integrated.channel) == ("approved_online", "integrated")
        assert sale.payment_id is not None and integrated.payment_id is not None

        # an integrated payment is refunded from the POS, not voided on the terminal
        no = await terminal.void_payment(integrated.payment_id)
        assert (no.outcome, no.reason) == ("refused", "not_standalone"), no
        assert (await terminal.void_payment("pay_unknown")).reason == "not_found"

        result = await terminal.void_payment(sale.payment_id)
        assert (result.outcome, result.amount) == ("requested", usd("7.00")), result
        assert any(isinstance(n, VoidDecided) for n in till.notices)
        assert await terminal.flush(10_000)

        # the server voids it at once: a full refund at the processor under void:<id>
        async def refunded_at_processor() -> bool:
            ledger = await world.processor.ledger()
            return any(isinstance(e, LedgerRefund) for e in ledger)

        await wait_until(refunded_at_processor, 20, "the void's refund at the processor")
        refunds = [e for e in await world.processor.ledger() if isinstance(e, LedgerRefund)]
        assert [(r.payment_id, r.refund_id, r.amount) for r in refunds] == [
            (sale.payment_id, f"void:{sale.payment_id}", usd("7.00"))
        ]
        on_server = await server.api("GET", f"/v1/payments/{sale.payment_id}/refunds")
        assert [r["amount"]["minor"] for r in on_server["refunds"]] == [700]

        # ... and the terminal learns it
        await wait_until(lambda: bool(till.seen(PaymentVoided)), 15, "PaymentVoided")
        (voided,) = till.seen(PaymentVoided)
        assert (voided.payment_id, voided.amount) == (sale.payment_id, usd("7.00"))
        view = next(v for v in terminal.history() if v.payment_id == sale.payment_id)
        assert (view.void_state, view.voided) == ("voided", usd("7.00"))
        z = terminal.z_report()
        assert (z.gross, z.voided, z.void_count) == (usd("12.00"), usd("7.00"), 1)
        assert z.total == usd("5.00") and z.by_channel["standalone"] == usd("0.00")
        again = await terminal.void_payment(sale.payment_id)
        assert again.reason == "already_voided"

        # another day's standalone payment: refused on the terminal, nothing sent
        other = await terminal.take_payment(usd("3.00"), card(), INSERT, standalone=True)
        assert other.outcome == "approved_online" and other.payment_id is not None
        till.clock.offset_ms += DAY_MS  # the next business day on the terminal
        late = await terminal.void_payment(other.payment_id)
        assert (late.outcome, late.reason) == ("refused", "not_same_day"), late
        view = next(v for v in terminal.history() if v.payment_id == other.payment_id)
        assert view.void_state == ""
        assert terminal.machine.unsynced_ops() == 0
        ledger = await world.processor.ledger()
        assert len([e for e in ledger if isinstance(e, LedgerRefund)]) == 1
    finally:
        await close_all([till])


def _merchant_midnight_ahead(now_ms: int) -> tuple[str, int]:
    """A fixed-offset time zone whose midnight is the next whole UTC hour after ``now_ms``,
    and the ms from ``now_ms`` to just past that midnight."""
    next_hour = (now_ms // HOUR_MS + 1) * HOUR_MS
    utc_hour = (next_hour // HOUR_MS) % 24
    east = (24 - utc_hour) % 24  # local = UTC + east: midnight at that UTC hour
    if east > 14:
        east -= 24
    # The Etc/GMT names count the other way: Etc/GMT-13 is 13 hours east of UTC.
    name = "Etc/GMT" if east == 0 else f"Etc/GMT{'-' if east > 0 else '+'}{abs(east)}"
    return name, next_hour - now_ms + 2 * MINUTE_MS


async def test_a_void_the_server_refuses_reaches_the_terminal(world: World) -> None:
    """Same day on the terminal, another day in the merchant's time zone: the server has the
    last word, refunds nothing, and the terminal ends the void as refused (VoidRefused)."""
    server = world.server
    now_ms = Clock()()
    tz, cross_ms = _merchant_midnight_ahead(now_ms)
    await server.api("PATCH", "/v1/merchant", {"standalone_allowed": True, "timezone": tz})
    # the terminal's business day is centred on now, so the hour ahead stays on its day
    noon_offset = 12 * 60 - (now_ms % (24 * HOUR_MS)) // MINUTE_MS
    till = await open_terminal(world.tmp, server, "T1", utc_offset_minutes=noon_offset)
    terminal = till.terminal
    try:
        await wait_until(lambda: terminal.status().network == "connected", 10, "the session")
        sale = await terminal.take_payment(usd("7.00"), card(), INSERT, standalone=True)
        assert (sale.outcome, sale.channel) == ("approved_online", "standalone"), sale
        assert sale.payment_id is not None
        till.clock.offset_ms += cross_ms  # past the merchant's midnight, same terminal day
        result = await terminal.void_payment(sale.payment_id)
        assert result.outcome == "requested", result

        await wait_until(lambda: bool(till.seen(VoidRefused)), 20, "VoidRefused")
        (refused,) = till.seen(VoidRefused)
        assert (refused.payment_id, refused.amount) == (sale.payment_id, usd("7.00"))
        assert refused.reason == "refused_rules" and "time zone" in refused.message
        view = next(v for v in terminal.history() if v.payment_id == sale.payment_id)
        assert (view.void_state, view.status.value, view.voided) == (
            "refused",
            "approved",
            usd("0.00"),
        )
        assert not till.seen(PaymentVoided)
        again = await terminal.void_payment(sale.payment_id)
        assert (again.outcome, again.reason) == ("refused", "void_refused"), again
        z = terminal.z_report()
        assert (z.gross, z.voided, z.void_count) == (usd("7.00"), usd("0.00"), 0)

        # nothing was refunded anywhere; the payment keeps its outcome on the server
        ledger = await world.processor.ledger()
        assert not [e for e in ledger if isinstance(e, LedgerRefund)]
        payment = await server.api("GET", f"/v1/payments/{sale.payment_id}")
        assert payment["status"] == "approved"
        refunds = await server.api("GET", f"/v1/payments/{sale.payment_id}/refunds")
        assert refunds["refunds"] == []
    finally:
        await close_all([till])


async def test_a_void_whose_refund_is_parked_waits_for_a_person(world: World) -> None:
    """The processor already holds another refund under ``void:<id>``: the server parks the
    void's refund (no retry without end), the terminal keeps the void requested, and when a
    person resolves the refund as not made the terminal hears the refusal."""
    server = world.server
    await server.api("PATCH", "/v1/merchant", {"standalone_allowed": True, "timezone": "UTC"})
    till = await open_terminal(world.tmp, server, "T1")
    terminal = till.terminal
    try:
        await wait_until(lambda: terminal.status().network == "connected", 10, "the session")
        sale = await terminal.take_payment(usd("7.00"), card(), INSERT, standalone=True)
        assert sale.outcome == "approved_online" and sale.payment_id is not None
        pid = sale.payment_id
        # Something else refunded 1.00 at the processor under the id our void will use.
        await world.processor.refund(RefundRequest(pid, f"void:{pid}", usd("1.00")))

        assert (await terminal.void_payment(pid)).outcome == "requested"
        assert await terminal.flush(10_000)

        async def parked() -> bool:
            listed = await server.api("GET", "/v1/refunds", state="parked")
            return [r["refund_id"] for r in listed["refunds"]] == [f"void:{pid}"]

        await wait_until(parked, 20, "the void's refund parked")
        view = next(v for v in terminal.history() if v.payment_id == pid)
        assert view.void_state == "requested"
        assert not till.seen(PaymentVoided) and not till.seen(VoidRefused)

        resolved = await server.api(
            "POST",
            f"/v1/payments/{pid}/refunds/void:{pid}/resolve",
            {"action": "refused", "note": "the processor's refund is another system's"},
        )
        assert resolved["state"] == "refused"
        await wait_until(lambda: bool(till.seen(VoidRefused)), 15, "VoidRefused")
        (refused,) = till.seen(VoidRefused)
        assert (refused.payment_id, refused.reason) == (pid, "refused_not_made")
        view = next(v for v in terminal.history() if v.payment_id == pid)
        assert (view.void_state, view.voided) == ("refused", usd("0.00"))
        # Only the other system's refund is at the processor; nothing refunded by us.
        refunds = [e for e in await world.processor.ledger() if isinstance(e, LedgerRefund)]
        assert [(r.refund_id, r.amount) for r in refunds] == [(f"void:{pid}", usd("1.00"))]
        payment = await server.api("GET", f"/v1/payments/{pid}")
        assert payment["refunded"] == {"minor": 0, "currency": "USD"}
    finally:
        await close_all([till])
