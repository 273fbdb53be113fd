"""Forwarding to the real sandbox processor: outcomes, order, retries, unknown outcomes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from server_kit import (
    DECLINE_PAN,
    Running,
    TestTerminal,
    running_server,
    wait_for,
)

from syncengine.core.bodies import Capture
from syncengine.core.errors import StorageError
from syncengine.core.money import Money
from syncengine.processor.api import ChargeRequest
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox
from syncengine.server.forwarder import ForwarderConfig, ForwarderStats, backoff_ms
from syncengine.server.reports import now_utc_ms

DAY_MS = 24 * 3_600_000
FAST = ForwarderConfig(backoff_base_ms=20, backoff_cap_ms=200, poll_interval_ms=50)


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[HttpProcessor]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            yield client


async def _statuses(running: Running) -> dict[str, str]:
    async with running.http() as http:
        r = await http.get("/v1/payments", params={"limit": 1000})
        return {p["payment_id"]: p["status"] for p in r.json()["payments"]}


async def _all_final(running: Running, n: int) -> bool:
    statuses = await _statuses(running)
    final = {"approved", "offline_declined", "expired"}
    return len(statuses) == n and all(s in final for s in statuses.values())


async def _terminal(running: Running, processor: HttpProcessor, tid: str = "T1") -> TestTerminal:
    t = TestTerminal(tid, processor_public=await processor.public_key())
    await t.enroll(running)
    await t.connect(running)
    return t


async def test_outcomes_in_capture_order_each_charged_once(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=FAST
    ) as running:
        t = await _terminal(running, processor)
        now = now_utc_ms()
        t.capture("p1", 1_000, now - 5_000)
        t.capture("p2", 2_000, now - 4_000, pan=DECLINE_PAN)
        t.capture("p3", 3_000, now - 3_000, expires_at_ms=now - 1)  # deadline passed
        t.capture("p4", 4_000, now - 2_000, channel="integrated")
        await t.push_all()
        await wait_for(lambda: _all_final(running, 4))
        assert await _statuses(running) == {
            "p1": "approved",
            "p2": "offline_declined",
            "p3": "expired",
            "p4": "approved",
        }
        ledger = [e for e in await processor.ledger() if isinstance(e, LedgerCharge)]
        assert [e.payment_id for e in ledger] == ["p1", "p2", "p4"]  # capture order, p3 never
        assert ledger[1].code == "insufficient_funds"
        audit = await processor.audit()
        assert audit.ok and audit.charges_count == 3
        # The terminal learns every outcome as signed server ops.
        ops = await t.pull()
        final = {
            op.body["payment_id"]: op.body["status"]
            for op in ops
            if op.kind == "status" and op.body["status"] != "forwarding"
        }
        assert final == {
            "p1": "approved",
            "p2": "offline_declined",
            "p3": "expired",
            "p4": "approved",
        }
        async with running.http() as http:
            p2 = (await http.get("/v1/payments/p2")).json()
            assert p2["code"] == "insufficient_funds"
            assert p2["forwarding"]["attempts"] == 1  # a hard decline is never retried
        await t.close()


async def test_outage_and_lost_answers_never_charge_twice(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=FAST
    ) as running:
        await processor.set_faults(outage=True)
        t = await _terminal(running, processor)
        now = now_utc_ms()
        for i in range(6):
            t.capture(f"p{i}", 100 + i, now - 10_000 + i)
        await t.push_all()
        await asyncio.sleep(0.4)  # several failed attempts with backoff
        assert set((await _statuses(running)).values()) <= {"captured", "forwarding"}
        await processor.set_faults(outage=False, outcome_unknown_next=3)
        await wait_for(lambda: _all_final(running, 6))
        assert set((await _statuses(running)).values()) == {"approved"}
        audit = await processor.audit()
        assert audit.ok, audit
        assert audit.charges_count == 6 and not audit.duplicate_charges
        ledger = [e.payment_id for e in await processor.ledger() if isinstance(e, LedgerCharge)]
        assert ledger == [f"p{i}" for i in range(6)]
        stats = running.server.forwarder.stats if running.server.forwarder else None
        assert stats is not None and stats.errors.get("outcome_unknown", 0) >= 1
        await t.close()


async def test_deadline_passing_during_an_outage_expires_without_charging(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=FAST
    ) as running:
        await processor.set_faults(outage=True)
        t = await _terminal(running, processor)
        now = now_utc_ms()
        t.capture("late", 500, now - 1_000, expires_at_ms=now + 300)
        await t.push_all()
        await asyncio.sleep(0.5)
        await processor.set_faults(outage=False)
        await wait_for(lambda: _all_final(running, 1))
        assert await _statuses(running) == {"late": "expired"}
        assert (await processor.audit()).charges_count == 0
        await t.close()


def test_backoff_is_exponential_and_capped() -> None:
    config = ForwarderConfig(backoff_base_ms=500, backoff_cap_ms=60_000, backoff_jitter_percent=10)
    assert [backoff_ms(n, config, 0.0) for n in (1, 2, 3, 4)] == [500, 1_000, 2_000, 4_000]
    assert backoff_ms(50, config, 0.0) == 60_000
    assert backoff_ms(50, config, 1.0) == 66_000


@pytest.mark.parametrize(("lookup_first_after_ms", "charges"), [(None, 1), (10 * DAY_MS, 2)])
async def test_an_old_payment_is_looked_up_before_it_is_charged(
    tmp_path: Path, processor: HttpProcessor, lookup_first_after_ms: int | None, charges: int
) -> None:
    """A payment the processor charged but the server has no record of (a server
    restored from a backup; here charged straight at the sandbox) reaches the server
    13 h after its capture, and the processor has pruned the key
    (``idempotency_window_ms``). Looked up first (the default, 12 h), its charge is
    adopted; charged under its key alone (a 10-day setting), it is charged twice."""
    config = FAST
    if lookup_first_after_ms is not None:
        config = dataclasses.replace(FAST, lookup_first_after_ms=lookup_first_after_ms)
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=config
    ) as running:
        t = await _terminal(running, processor)
        captured = now_utc_ms() - 13 * 3_600_000
        op = t.capture("old-1", 4_200, captured, channel="integrated")
        card = Capture.from_body(op.body).card
        first = await processor.charge(
            ChargeRequest(
                "old-1",
                t.merchant_id,
                t.terminal_id,
                Money(4_200, "USD"),
                card.sealed,
                "integrated",
                captured,
            )
        )
        assert first.outcome == "approved"
        await processor.set_faults(idempotency_window_ms=1)
        await asyncio.sleep(0.01)
        await t.push_all()
        await wait_for(lambda: _all_final(running, 1))
        assert (await _statuses(running)) == {"old-1": "approved"}
        audit = await processor.audit()
        assert audit.charges_count == charges
        assert audit.duplicate_charges == ({} if charges == 1 else {"old-1": 2})
        await t.close()


async def test_a_late_payment_the_processor_charged_is_approved_not_expired(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """Two offline payments reach the server after their deadline. The processor holds a
    charge for one (made by a server that was then restored from a backup taken before
    it; here charged straight at the sandbox): it is adopted as approved, not reported as
    a loss. The other is expired. Neither is charged by this server."""
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=FAST
    ) as running:
        t = await _terminal(running, processor)
        captured = now_utc_ms() - 2 * 3_600_000
        deadline = captured + 3_600_000
        op = t.capture("charged", 1_500, captured, expires_at_ms=deadline)
        t.capture("never", 2_500, captured + 1, expires_at_ms=deadline)
        card = Capture.from_body(op.body).card
        request = ChargeRequest(
            "charged",
            t.merchant_id,
            t.terminal_id,
            Money(1_500, "USD"),
            card.sealed,
            "offline",
            captured,
        )
        assert (await processor.charge(request)).outcome == "approved"
        await t.push_all()
        await wait_for(lambda: _all_final(running, 2))
        assert await _statuses(running) == {"charged": "approved", "never": "expired"}
        audit = await processor.audit()
        assert audit.ok and audit.charges_count == 1 and not audit.duplicate_charges
        pushed = [op for op in await t.pull() if op.kind == "status"]
        assert [(op.body["payment_id"], op.body["status"]) for op in pushed] == [
            ("charged", "forwarding"),
            ("charged", "approved"),
            ("never", "forwarding"),
            ("never", "expired"),
        ]
        await t.close()


async def _health(running: Running) -> dict[str, object]:
    async with running.http() as http:
        r = await http.get("/health")
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, dict)
        return body


async def test_a_forwarder_failing_every_round_shows_on_health_and_metrics(
    tmp_path: Path,
) -> None:
    """An unexpected error in every forwarding round (here: the processor client was
    closed under the server, so each call raises) leaves payments pending; after
    ``health_forwarder_failing_ms`` /health says ``degraded`` with the error, and
    /metrics counts the seconds."""
    with running_sandbox(tmp_path / "processor") as sandbox:
        processor = HttpProcessor(sandbox.url)
        async with running_server(
            tmp_path / "server",
            processor,
            clock=now_utc_ms,
            forwarder=FAST,
            health_forwarder_failing_ms=300,
        ) as running:
            t = await _terminal(running, processor)
            t.capture("p1", 700, now_utc_ms(), channel="integrated")
            await t.push_all()
            await wait_for(lambda: _all_final(running, 1))
            healthy = await _health(running)
            assert healthy["status"] == "ok" and "forwarder_error" not in healthy, healthy

            await processor.aclose()
            t.capture("p2", 800, now_utc_ms(), channel="integrated")
            await t.push_all()

            async def degraded() -> bool:
                return (await _health(running))["status"] == "degraded"

            await wait_for(degraded, 10)
            body = await _health(running)
            assert str(body["forwarder_error"]).startswith("RuntimeError"), body
            assert isinstance(body["forwarder_failing_s"], int), body
            assert (await _statuses(running))["p2"] in ("captured", "forwarding")
            async with running.http() as http:
                metrics = (await http.get("/metrics")).text
            line = next(x for x in metrics.splitlines() if "forwarder_failing_seconds" in x)
            assert int(line.split()[1]) >= 0
            failed = next(x for x in metrics.splitlines() if 'kind="internal"' in x)
            assert int(failed.split()[1]) >= 2  # it kept trying
            await t.close()


def test_forwarder_stats_report_failing_until_an_attempt_goes_through() -> None:
    stats = ForwarderStats()
    assert stats.failing_ms(1_000, 5_000) == 0
    stats.round_failed(RuntimeError("boom"), 1_000)
    stats.round_failed(ValueError("again"), 3_500)
    assert stats.failing_ms(4_000, 5_000) == 3_000  # since the first failure
    assert stats.last_failure == "ValueError: again"
    assert stats.errors == {"internal": 2}
    assert stats.failing_ms(8_500, 5_000) == 0  # no failure for 5 s: nothing was left to do
    stats.attempt_done()
    assert stats.failing_ms(4_000, 5_000) == 0
    stats.round_failed(RuntimeError("x" * 1_000), 10_000)
    assert len(stats.last_failure) == 300
    assert stats.failing_ms(10_000, 5_000) == 0  # it has just begun


async def test_a_claim_whose_commit_was_lost_does_not_hold_the_terminal_for_a_lease(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    """A claim that committed but whose answer was lost with its connection (what a
    database failover does to a COMMIT in flight) leaves a lease the worker does not know
    it holds. The worker gives its leases back after the failed round, so the payment is
    forwarded at once instead of after the 60 s lease."""
    config = dataclasses.replace(FAST, lease_ms=60_000)
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=config
    ) as running:
        store = running.server.store
        real_claim = store.claim_terminal
        lost: list[str] = []

        def claim_then_lose_the_answer(owner: str, now_ms: int, lease_ms: int) -> str | None:
            terminal_id = real_claim(owner, now_ms, lease_ms)
            if terminal_id is not None and not lost:
                lost.append(owner)
                raise StorageError("connection lost while committing (injected)")
            return terminal_id

        store.claim_terminal = claim_then_lose_the_answer  # type: ignore[method-assign]
        t = await _terminal(running, processor)
        t.capture("p1", 900, now_utc_ms(), channel="integrated")
        await t.push_all()
        await wait_for(lambda: _all_final(running, 1), 10)
        assert lost and (await _statuses(running)) == {"p1": "approved"}
        forwarder = running.server.forwarder
        assert forwarder is not None and forwarder.stats.errors == {"internal": 1}
        assert (await processor.audit()).charges_count == 1
        await t.close()


async def test_a_refused_request_is_parked_and_the_terminals_later_payments_go_on(
    tmp_path: Path, processor: HttpProcessor
) -> None:
    # The processor refuses the first charge as a request (HTTP 400): sent again it would
    # be refused again, so it is parked for a person -- retried for ever, it held every
    # later payment of the terminal behind it (they go in capture order).
    async with running_server(
        tmp_path / "server", processor, clock=now_utc_ms, forwarder=FAST
    ) as running:
        await processor.set_faults(refuse_next=1)
        t = await _terminal(running, processor)
        now = now_utc_ms()
        for i in range(3):
            t.capture(f"p{i}", 100 + i, now - 10_000 + i)
        await t.push_all()

        async def settled() -> bool:
            statuses = await _statuses(running)
            return statuses.get("p1") == "approved" and statuses.get("p2") == "approved"

        await wait_for(settled)
        async with running.http() as http:
            p0 = (await http.get("/v1/payments/p0")).json()
            assert p0["status"] in ("captured", "forwarding")
            assert p0["forwarding"]["state"] == "error" and p0["forwarding"]["attempts"] == 1
            assert "request refused" in p0["forwarding"]["last_error"]
            assert "sandbox fault" in p0["forwarding"]["last_error"]
            # The person sees why, fixes it at the processor, and forwards it again.
            r = await http.post("/v1/payments/p0/resolve", json={"action": "retry"})
            assert r.status_code == 200, r.text
        await wait_for(lambda: _all_final(running, 3))
        assert set((await _statuses(running)).values()) == {"approved"}
        ledger = [e.payment_id for e in await processor.ledger() if isinstance(e, LedgerCharge)]
        assert sorted(ledger) == ["p0", "p1", "p2"]  # each once; p0 last, after its retry
        assert ledger[-1] == "p0"
        stats = running.server.forwarder.stats if running.server.forwarder else None
        assert stats is not None and stats.errors.get("request_refused") == 1
        await t.close()
