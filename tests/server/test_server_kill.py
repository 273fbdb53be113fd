"""End to end with real processes: SIGKILL the server mid-forwarding, restart it, and audit
the processor's ledger: no payment lost, none charged twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from server_kit import Running, TestTerminal, free_socket, healthy, wait_for

from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox
from syncengine.server.reports import now_utc_ms

PAYMENTS = 120


@pytest.fixture
async def processor(tmp_path: Path) -> AsyncIterator[tuple[HttpProcessor, str]]:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as client:
            yield client, sandbox.url


def _start(data: Path, port: int, processor_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncengine.cli",
            "serve",
            "--data",
            str(data),
            "--port",
            str(port),
            "--processor",
            processor_url,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _statuses(running: Running) -> dict[str, str]:
    async with running.http() as http:
        r = await http.get("/v1/payments", params={"limit": 1000})
        return {p["payment_id"]: p["status"] for p in r.json()["payments"]}


async def test_sigkill_mid_forwarding_loses_nothing_and_charges_once(
    tmp_path: Path, processor: tuple[HttpProcessor, str]
) -> None:
    client, processor_url = processor
    await client.set_faults(latency_ms=15, outcome_unknown_ppm=50_000)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "server"
    proc = _start(data, port, processor_url)
    try:
        await wait_for(lambda: healthy(url), timeout_s=20)
        running = Running(None, url, (data / "owner-api-key.txt").read_text().strip())  # type: ignore[arg-type]
        t = TestTerminal("T1", processor_public=await client.public_key())
        await t.enroll(running)
        await t.connect(running)
        now = now_utc_ms()
        for i in range(PAYMENTS):
            t.capture(f"p{i:04d}", 100 + i, now - 60_000 + i)
        await t.push_all(batch_ops_max=50)
        await t.close()

        async def some_forwarded() -> bool:
            return sum(s == "approved" for s in (await _statuses(running)).values()) >= 10

        await wait_for(some_forwarded, timeout_s=20)
        os.kill(proc.pid, signal.SIGKILL)  # mid-forwarding: many payments still pending
        proc.wait(10)
        before = await client.ledger()
        assert 0 < len(before) < PAYMENTS

        proc = _start(data, port, processor_url)
        await wait_for(lambda: healthy(url), timeout_s=20)

        async def all_approved() -> bool:
            statuses = await _statuses(running)
            return len(statuses) == PAYMENTS and set(statuses.values()) == {"approved"}

        await wait_for(all_approved, timeout_s=40, interval_s=0.2)
        audit = await client.audit()
        assert audit.ok, audit
        assert audit.charges_count == PAYMENTS and not audit.duplicate_charges
        charged = sorted(e.payment_id for e in await client.ledger() if isinstance(e, LedgerCharge))
        assert charged == [f"p{i:04d}" for i in range(PAYMENTS)]
        # The terminal's view after reconnecting: every outcome, once.
        await t.connect(running)
        ops = await t.pull()
        finals = [op.body["payment_id"] for op in ops if op.body.get("status") == "approved"]
        assert sorted(finals) == charged
        await t.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.sleep(0)
