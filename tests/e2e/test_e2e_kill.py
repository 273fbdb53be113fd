"""SIGKILL the real server process mid-forwarding, restart it, audit the processor ledger.

Two SDK terminals take offline payments while their links are cut; when the links return
the server forwards them (the sandbox is slowed and loses some answers, so unknown outcomes
must be resolved by lookup). The server is killed with SIGKILL while forwarding, restarted
on the same data directory and port, and the terminals reconnect by themselves. Then: every
payment charged exactly once, none lost, every outcome back on its terminal.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import (
    ServerProcess,
    Till,
    card,
    close_all,
    go_offline,
    open_terminal,
    usd,
    wait_until,
)

from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import PaymentForwarded
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox

PAYMENTS_PER_TERMINAL = 60


async def _offline_payments(till: Till, count: int) -> list[str]:
    await go_offline(till)
    ids: list[str] = []
    for i in range(count):
        result = await till.terminal.take_payment(
            usd(f"{1 + i}.{i % 100:02d}"), card(), EntryMethod.INSERT
        )
        assert result.outcome == "approved_offline" and result.payment_id is not None, result
        ids.append(result.payment_id)
    return ids


def _finals(till: Till) -> dict[str, str]:
    return {n.payment_id: n.status for n in till.seen(PaymentForwarded)}


async def test_sigkill_mid_forwarding_loses_nothing_and_charges_once(tmp_path: Path) -> None:
    with running_sandbox(tmp_path / "processor") as sandbox:
        async with HttpProcessor(sandbox.url) as processor:
            server = ServerProcess(tmp_path / "server", sandbox.url)
            await server.start()
            tills: list[Till] = []
            try:
                await server.allow_offline()
                for tid in ("K1", "K2"):
                    tills.append(await open_terminal(tmp_path, server, tid))
                    await server.api(
                        "PUT", f"/v1/terminals/{tid}/settings", {"offline_allowed": True}
                    )
                await wait_until(
                    lambda: all(t.terminal.status().offline_allowed for t in tills), 10, "settings"
                )
                taken = [
                    p for t in tills for p in await _offline_payments(t, PAYMENTS_PER_TERMINAL)
                ]
                total = len(taken)
                await processor.set_faults(latency_ms=20, outcome_unknown_ppm=100_000)
                for till in tills:
                    till.proxy.heal()

                async def charged_count() -> int:
                    return sum(isinstance(e, LedgerCharge) for e in await processor.ledger())

                async def some_charged() -> bool:
                    return await charged_count() >= total // 5

                await wait_until(some_charged, 20, "forwarding to be under way")
                await server.kill()  # mid-forwarding: most payments still pending
                before = await charged_count()
                assert 0 < before < total, before

                await server.start()  # same data, same port: the terminals reconnect
                await wait_until(
                    lambda: sum(len(_finals(t)) for t in tills) == total,
                    40,
                    "every outcome back on its terminal",
                )
                ledger = [e for e in await processor.ledger() if isinstance(e, LedgerCharge)]
                charged = sorted(e.payment_id for e in ledger)
                assert charged == sorted(taken), "each payment charged exactly once"
                audit = await processor.audit()
                assert audit.ok and not audit.duplicate_charges, audit
                finals = {p: s for t in tills for p, s in _finals(t).items()}
                assert set(finals) == set(taken) and set(finals.values()) == {"approved"}
                statuses = {p["payment_id"]: p["status"] for p in await server.payments()}
                assert statuses == dict.fromkeys(taken, "approved")
                for till in tills:
                    assert till.terminal.status().pending_count == 0
            finally:
                await close_all(tills)
                await server.stop()
