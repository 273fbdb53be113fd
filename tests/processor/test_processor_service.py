"""The sandbox service over real HTTP: a uvicorn server on loopback, HttpProcessor as client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from syncengine.core.crypto import CardData, b64e, card_aad, seal_card, x25519_public_from_private
from syncengine.core.errors import Refused, StorageError
from syncengine.core.money import Money
from syncengine.processor.api import (
    ChargeRequest,
    IdempotencyConflict,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundRequest,
    RequestRefused,
)
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.service import LedgerStore, SandboxService
from syncengine.processor.testing import RunningSandbox, running_sandbox
from syncengine.processor.wire import charge_request_to_wire

CAPTURED_AT_MS = 1_700_000_000_000


def make_request(
    public_key: bytes, payment_id: str, pan: str = "4242424242424242", minor: int = 2_500
) -> ChargeRequest:
    envelope = seal_card(
        public_key,
        CardData(pan, 1, 2031, "A CUSTOMER"),
        ephemeral_private=os.urandom(32),
        nonce=os.urandom(12),
        aad=card_aad(payment_id),
    )
    return ChargeRequest(
        payment_id, "m-1", "t-1", Money(minor, "CAD"), b64e(envelope), "offline", CAPTURED_AT_MS
    )


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RunningSandbox]:
    with running_sandbox(tmp_path / "processor") as running:
        yield running


@pytest.fixture
async def processor(sandbox: RunningSandbox) -> AsyncIterator[HttpProcessor]:
    async with HttpProcessor(sandbox.url, timeout_s=5.0) as client:
        yield client


async def charges_in_ledger(processor: HttpProcessor, payment_id: str) -> int:
    entries = await processor.ledger()
    return sum(1 for e in entries if isinstance(e, LedgerCharge) and e.payment_id == payment_id)


@pytest.mark.parametrize(
    ("pan", "outcome", "code"),
    [
        ("4242424242424242", "approved", "approved"),
        ("5555555555554444", "approved", "approved"),
        ("378282246310005", "approved", "approved"),
        ("6011111111111117", "approved", "approved"),
        ("4000000000009995", "declined", "insufficient_funds"),
        ("4000000000009979", "declined", "stolen_card"),
        ("4000000000000069", "declined", "expired_card"),
    ],
)
async def test_test_cards_over_http(
    sandbox: RunningSandbox, processor: HttpProcessor, pan: str, outcome: str, code: str
) -> None:
    result = await processor.charge(make_request(sandbox.public_key, "pay-1", pan))
    assert (result.payment_id, result.outcome, result.code) == ("pay-1", outcome, code)
    assert await processor.lookup("pay-1") == result
    assert await charges_in_ledger(processor, "pay-1") == 1


async def test_transient_card_is_unavailable_and_charges_nothing(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    with pytest.raises(ProcessorUnavailable, match="processing_error"):
        await processor.charge(make_request(sandbox.public_key, "pay-1", "4000000000000119"))
    assert await processor.lookup("pay-1") is None
    assert await processor.ledger() == []


async def test_card_sealed_to_another_key_is_declined(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    other = bytes(range(32))
    result = await processor.charge(make_request(x25519_public_from_private(other), "pay-1"))
    assert (result.outcome, result.code) == ("declined", "invalid_card_data")


async def test_public_key_is_served(sandbox: RunningSandbox, processor: HttpProcessor) -> None:
    assert await processor.public_key() == sandbox.public_key
    assert len(sandbox.public_key) == 32


async def test_same_key_twice_charges_once(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    request = make_request(sandbox.public_key, "pay-1")
    first = await processor.charge(request)
    results = await asyncio.gather(*(processor.charge(request) for _ in range(5)))
    assert all(r == first for r in results)
    assert await charges_in_ledger(processor, "pay-1") == 1
    audit = await processor.audit()
    assert audit.ok and audit.approved_minor_by_currency == {"CAD": 2_500}


async def test_different_request_under_a_used_key_conflicts(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    await processor.charge(make_request(sandbox.public_key, "pay-1", minor=100))
    with pytest.raises(IdempotencyConflict):
        await processor.charge(make_request(sandbox.public_key, "pay-1", minor=200))
    assert await charges_in_ledger(processor, "pay-1") == 1


async def test_outage_is_unavailable_and_charges_nothing(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    await processor.set_faults(outage=True)
    request = make_request(sandbox.public_key, "pay-1")
    with pytest.raises(ProcessorUnavailable):
        await processor.charge(request)
    with pytest.raises(ProcessorUnavailable):
        await processor.lookup("pay-1")
    await processor.set_faults(outage=False)
    assert await processor.ledger() == []
    assert (await processor.charge(request)).outcome == "approved"


@pytest.mark.parametrize("mode", ["504", "drop"])
async def test_outcome_unknown_commits_and_lookup_resolves_it(
    sandbox: RunningSandbox, processor: HttpProcessor, mode: str
) -> None:
    faults = await processor.set_faults(outcome_unknown_next=1, outcome_unknown_mode=mode)
    assert faults.outcome_unknown_next == 1
    request = make_request(sandbox.public_key, "pay-1")
    with pytest.raises(OutcomeUnknown) as info:
        await processor.charge(request)
    if mode == "drop":  # the connection was cut after the status line, not a clean answer
        assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    found = await processor.lookup("pay-1")
    assert found is not None and found.outcome == "approved"
    assert await processor.charge(request) == found  # the retry under the same key
    assert await charges_in_ledger(processor, "pay-1") == 1


async def test_timeout_after_sending_is_outcome_unknown(sandbox: RunningSandbox) -> None:
    async with HttpProcessor(sandbox.url, timeout_s=0.2) as impatient:
        await impatient.set_faults(latency_ms=500)
        with pytest.raises(OutcomeUnknown):
            await impatient.charge(make_request(sandbox.public_key, "pay-1"))
        await impatient.set_faults(latency_ms=0)
    async with HttpProcessor(sandbox.url) as patient:
        for _ in range(50):  # the slow request lands 0.5 s after it was sent
            if await patient.lookup("pay-1") is not None:
                break
            await asyncio.sleep(0.05)
        assert await charges_in_ledger(patient, "pay-1") == 1


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with HttpProcessor(f"http://127.0.0.1:{port}", timeout_s=1.0) as processor:
            with pytest.raises(ProcessorUnavailable):
                await processor.charge(make_request(bytes(range(9, 41)), "pay-1"))
            with pytest.raises(ProcessorUnavailable):
                await processor.lookup("pay-1")


async def test_refund_rules_over_http(sandbox: RunningSandbox, processor: HttpProcessor) -> None:
    await processor.charge(make_request(sandbox.public_key, "pay-1", minor=1_000))
    await processor.charge(make_request(sandbox.public_key, "pay-2", "4000000000009995"))
    first = await processor.refund(RefundRequest("pay-1", "r-1", Money(700, "CAD")))
    assert first.amount == Money(700, "CAD")
    assert await processor.refund(RefundRequest("pay-1", "r-1", Money(700, "CAD"))) == first
    with pytest.raises(IdempotencyConflict):
        await processor.refund(RefundRequest("pay-1", "r-1", Money(600, "CAD")))
    cases = {
        "refund_exceeds_amount": RefundRequest("pay-1", "r-2", Money(301, "CAD")),
        "charge_not_approved": RefundRequest("pay-2", "r-3", Money(1, "CAD")),
        "charge_not_found": RefundRequest("pay-9", "r-4", Money(1, "CAD")),
        "currency_mismatch": RefundRequest("pay-1", "r-5", Money(1, "USD")),
    }
    for reason, request in cases.items():
        with pytest.raises(Refused) as info:
            await processor.refund(request)
        assert info.value.reason == reason
    await processor.refund(RefundRequest("pay-1", "r-6", Money(300, "CAD")))
    audit = await processor.audit()
    assert audit.ok and audit.refunds_count == 2


async def test_restart_keeps_ledger_and_key(tmp_path: Path) -> None:
    data = tmp_path / "processor"
    with running_sandbox(data) as first:
        request = make_request(first.public_key, "pay-1")
        async with HttpProcessor(first.url) as processor:
            result = await processor.charge(request)
            await processor.refund(RefundRequest("pay-1", "r-1", Money(5, "CAD")))
    assert stat.S_IMODE((data / "processor.key").stat().st_mode) == 0o600
    with running_sandbox(data) as second:
        assert second.public_key == first.public_key
        async with HttpProcessor(second.url) as processor:
            assert await processor.lookup("pay-1") == result
            assert await processor.charge(request) == result
            with pytest.raises(Refused, match="left to refund"):
                await processor.refund(RefundRequest("pay-1", "r-2", Money(2_496, "CAD")))
            assert len(await processor.ledger()) == 2


def test_ledger_database_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    try:
        assert store.pragmas() == ("wal", 2)
    finally:
        store.close()


def test_a_ledger_is_served_by_one_sandbox_at_a_time(tmp_path: Path) -> None:
    # Entries are numbered in memory: a second sandbox on the file would hold a stale view.
    first = SandboxService(tmp_path)
    try:
        with pytest.raises(StorageError, match="in use by another sandbox processor"):
            SandboxService(tmp_path)
    finally:
        first.close()
    second = SandboxService(tmp_path)  # closed, the first let go of it
    assert second.public_key == first.public_key
    second.close()


async def test_failed_ledger_write_charges_nothing(
    sandbox: RunningSandbox, processor: HttpProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(entries: object) -> None:
        raise StorageError("database or disk is full")

    monkeypatch.setattr(sandbox.service._store, "append", disk_full)
    request = make_request(sandbox.public_key, "pay-1")
    with pytest.raises(ProcessorUnavailable, match="disk is full"):
        await processor.charge(request)
    monkeypatch.undo()
    assert await processor.lookup("pay-1") is None
    assert (await processor.charge(request)).outcome == "approved"
    assert await charges_in_ledger(processor, "pay-1") == 1


async def test_sigkill_loses_no_acknowledged_charge(tmp_path: Path) -> None:
    data = tmp_path / "processor"

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "syncengine.cli",
                "processor",
                "--data",
                str(data),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("sandbox processor listening on "), line
        assert proc.stdout.readline().startswith("public key (X25519, base64url): ")
        return proc, line.rsplit(" ", 1)[1].strip()

    async def wait_ready(url: str) -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                try:
                    if (await http.get(f"{url}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("processor did not become ready")

    proc, url = start()
    try:
        await wait_ready(url)
        async with HttpProcessor(url) as processor:
            key = await processor.public_key()
            results = [await processor.charge(make_request(key, f"p{i}")) for i in range(5)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, url = start()
    try:
        await wait_ready(url)
        async with HttpProcessor(url) as processor:
            assert await processor.public_key() == key
            assert [await processor.lookup(f"p{i}") for i in range(5)] == results
            assert (await processor.audit()).charges_count == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# --- validation -------------------------------------------------------------------------


def valid_body(sandbox: RunningSandbox) -> dict[str, object]:
    return charge_request_to_wire(make_request(sandbox.public_key, "pay-1"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amount": {"minor": 10.5, "currency": "CAD"}}, "floats"),
        ({"amount": {"minor": 0, "currency": "CAD"}}, "positive"),
        ({"amount": {"minor": 1, "currency": "XXX"}}, "currency"),
        ({"amount": "12.50"}, "money"),
        ({"payment_id": ""}, "payment_id"),
        ({"payment_id": 7}, "payment_id"),
        ({"merchant_id": "m" * 129}, "merchant_id"),
        ({"channel": "keyed"}, "channel"),
        ({"captured_at_ms": True}, "captured_at_ms"),
        ({"captured_at_ms": -1}, "captured_at_ms"),
        ({"sealed_card": None}, "sealed_card"),
        ({"extra": 1}, "unknown field"),
        ({"channel": None, "drop": "channel"}, "missing"),
    ],
)
async def test_malformed_charge_bodies_are_400(
    sandbox: RunningSandbox, change: dict[str, object], message: str
) -> None:
    body = {**valid_body(sandbox), **change}
    if "drop" in change:
        del body["drop"], body[str(change["drop"])]
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        response = await http.post("/v1/charges", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert message in response.json()["message"]
    assert sandbox.service.core.entry_count == 0


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/v1/charges", b"not json", 400),
        ("/v1/charges", b"[]", 400),
        ("/v1/charges", b'{"a": NaN}', 400),
        ("/v1/charges", b"\xff\xfe", 400),
        ("/v1/charges", b"{" + b" " * 20_000 + b"}", 413),
        ("/v1/refunds", b'{"payment_id": "p", "refund_id": "r"}', 400),
        (
            "/v1/refunds",
            b'{"payment_id": "p", "refund_id": "r", "amount": {"minor": -1, "currency": "CAD"}}',
            400,
        ),
        ("/v1/faults", b'{"latency_ms": -1}', 400),
        ("/v1/faults", b'{"outage": "yes"}', 400),
        ("/v1/faults", b'{"chaos": true}', 400),
    ],
)
async def test_malformed_bodies_are_refused(
    sandbox: RunningSandbox, path: str, content: bytes, status: int
) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        response = await http.post(path, content=content)
    assert response.status_code == status, response.text
    assert response.json()["message"]
    assert (await asyncio.to_thread(lambda: sandbox.service.core.faults.latency_ms)) == 0


async def test_client_maps_400_to_request_refused(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    # A refused request is not an outage: the caller parks it rather than retry it.
    with pytest.raises(RequestRefused, match="processor refused the request"):
        await processor.set_faults(latency_ms=-1)
    faults = await processor.set_faults(refuse_next=1)
    assert faults.refuse_next == 1
    request = make_request(sandbox.public_key, "p-refused")
    with pytest.raises(RequestRefused, match="refused as a request"):
        await processor.charge(request)
    assert (await processor.charge(request)).outcome == "approved"  # once only
    assert [e.payment_id for e in await processor.ledger()] == ["p-refused"]


async def test_health_and_ledger_paging(sandbox: RunningSandbox, processor: HttpProcessor) -> None:
    for i in range(3):
        await processor.charge(make_request(sandbox.public_key, f"p{i}"))
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok", "ledger_entries": 3}
        page = (await http.get("/v1/ledger?after=1")).json()
        assert [e["position"] for e in page["entries"]] == [2, 3]
        assert page["next_after"] is None and page["audit"]["ok"] is True
        assert (await http.get("/v1/ledger?after=-1")).status_code == 400
        assert (await http.get("/v1/charges/nope")).status_code == 404


async def test_payment_ids_with_slashes_and_unicode_round_trip(
    sandbox: RunningSandbox, processor: HttpProcessor
) -> None:
    for payment_id in ["t-1/0001", "café 42", "a?b#c%2F"]:
        result = await processor.charge(make_request(sandbox.public_key, payment_id))
        assert await processor.lookup(payment_id) == result
