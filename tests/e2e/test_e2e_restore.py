"""A server restored from a backup: the terminals send it again what it lost.

Second test: the same with the processor in place, so payments were forwarded (and
outcomes written to the terminal's server stream) between the backup and the restore.

A real ``syncengine serve`` (subprocess) on SQLite, backed up while it runs with
``syncengine backup`` (SQLite's online backup API), stopped, its database replaced by the
backup with ``syncengine restore`` and started again. The SDK terminal, which
trims nothing, learns from the server's Welcome that the server holds less of its log than
it had acknowledged, and pushes the difference again. The processor is there for the
enrollment only (it delivers its public key); the server then runs without one, so it
writes nothing to the terminal's server stream between the backup and the restore (the
second test has it write there: see docs/operations.md, "Restore").
"""

from __future__ import annotations

import asyncio
import sys
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
from syncengine.node.machine import ForwardingFailed, OutageAlert, ResumePrompt
from syncengine.node.sdk import Terminal
from syncengine.processor.client import HttpProcessor
from syncengine.processor.sandbox import LedgerCharge
from syncengine.processor.testing import running_sandbox


async def _offline_payments(till: Till, count: int, cents: int) -> list[str]:
    await wait_until(lambda: till.terminal.status().network == "connected", 10, "the link up")
    await go_offline(till)
    ids: list[str] = []
    for i in range(count):
        result = await till.terminal.take_payment(
            usd(f"{cents + i}.00"), card(), EntryMethod.INSERT
        )
        assert result.outcome == "approved_offline" and result.payment_id, result
        ids.append(result.payment_id)
    till.proxy.heal()
    await wait_until(lambda: bool(till.seen(ResumePrompt)), 10, "the resume prompt")
    till.terminal.resume_integrated()
    return ids


async def _offline_terminal(tmp: Path, server: ServerProcess, terminal_id: str) -> Till:
    """Enrolled, connected and allowed to take offline payments (R2)."""
    await server.allow_offline()
    till = await open_terminal(tmp, server, terminal_id)
    await server.api("PUT", f"/v1/terminals/{terminal_id}/settings", {"offline_allowed": True})
    await wait_until(lambda: till.terminal.status().offline_allowed, 10, "offline_allowed")
    return till


async def _server_ids(server: ServerProcess) -> set[str]:
    return {p["payment_id"] for p in await server.payments()}


async def _command(*argv: str) -> str:
    """Run ``syncengine ARGV`` as a process, as an operator would; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncengine.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (argv, out, err)
    return out.decode()


async def _backup(server: ServerProcess, target: Path) -> None:
    out = await _command("backup", "--data", str(server.data), "--to", str(target))
    assert f"backed up {target}" in out, out


async def _restore(server: ServerProcess, backup: Path) -> None:
    out = await _command("restore", "--data", str(server.data), "--from", str(backup))
    assert "restored" in out and "kept in" in out, out


async def test_a_server_restored_from_a_backup_gets_the_lost_payments_again(
    tmp_path: Path,
) -> None:
    tills: list[Till] = []
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url)
        await server.start()
        try:
            tills.append(await _offline_terminal(tmp_path, server, "R1"))
        finally:
            await server.stop()
    till = tills[0]
    server.processor_url = ""  # from now on nothing is forwarded
    await server.start()
    try:
        before = await _offline_payments(till, 4, 10)
        await wait_until(lambda: till.terminal.status().unsynced_ops == 0, 15, "first drain")
        assert await _server_ids(server) == set(before)
        backup = tmp_path / "server-backup.db"
        await _backup(server, backup)  # while the server runs

        after = await _offline_payments(till, 3, 20)
        await wait_until(lambda: till.terminal.status().unsynced_ops == 0, 15, "second drain")
        assert await _server_ids(server) == set(before + after)

        await server.stop()
        await _restore(server, backup)
        till.notices.clear()
        till.proxy.cut()  # the terminal waits until the restored server was looked at
        await server.start()
        assert await _server_ids(server) == set(before)  # the restored server lost `after`
        till.proxy.heal()

        async def healed() -> bool:
            return await _server_ids(server) == set(before + after)

        await wait_until(healed, 20, "the terminal to send the lost payments again")
        await wait_until(lambda: till.terminal.status().unsynced_ops == 0, 10, "acks")
        behind = [n for n in till.seen(ForwardingFailed) if n.code == "server_behind"]
        assert len(behind) == 1, till.notices
        payments = {p["payment_id"]: p for p in await server.payments()}
        for i, pid in enumerate(after):
            assert payments[pid]["amount"]["minor"] == (20 + i) * 100
            assert payments[pid]["channel"] == "offline"
    finally:
        await close_all(tills)
        await server.stop()


async def test_after_a_restore_forwarded_payments_are_not_charged_twice_and_the_stream_is_rewritten(
    tmp_path: Path,
) -> None:
    """Payments forwarded after the backup are forwarded again under the same idempotency
    key: the processor holds one charge each. The terminal holds outcomes the restored
    server lacks: it finds where the two streams part, keeps its own copy of the rest in
    its archive (the outcomes still count, after a reopen too) and takes the server's new
    ops from there, so settings and outcomes keep arriving."""
    tills: list[Till] = []
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url)
        await server.start()
        try:
            till = await _offline_terminal(tmp_path, server, "R2")
            tills.append(till)
            before = await _offline_payments(till, 2, 10)
            await wait_until(lambda: till.terminal.status().pending_count == 0, 20, "outcomes")
            backup = tmp_path / "server-backup.db"
            machine = till.terminal.machine
            at_backup = machine.replica.head(machine.server_origin)[0]
            await _backup(server, backup)

            after = await _offline_payments(till, 3, 20)
            await wait_until(lambda: till.terminal.status().pending_count == 0, 20, "outcomes")
            statuses = {p["payment_id"]: p["status"] for p in await server.payments()}
            assert statuses == dict.fromkeys(before + after, "approved")
            held = machine.replica.head(machine.server_origin)[0]
            assert held > at_backup  # the outcomes of `after` (and what led to them)

            await server.stop()
            await _restore(server, backup)
            till.notices.clear()
            till.proxy.cut()  # the terminal waits until the restored server was looked at
            await server.start()
            assert await _server_ids(server) == set(before)
            till.proxy.heal()

            async def all_approved() -> bool:
                got = {p["payment_id"]: p["status"] for p in await server.payments()}
                return got == dict.fromkeys(before + after, "approved")

            await wait_until(all_approved, 30, "the lost payments forwarded again")
            async with HttpProcessor(sandbox.url) as processor:
                charges = [e for e in await processor.ledger() if isinstance(e, LedgerCharge)]
            assert sorted(c.payment_id for c in charges) == sorted(before + after)
            await wait_until(
                lambda: bool(till.seen(ForwardingFailed)) and machine.archived_ops > 0,
                10,
                "the rewritten stream taken",
            )
            codes = {n.code for n in till.seen(ForwardingFailed)}
            assert {"server_behind", "server_stream_behind", "server_stream_rewritten"} <= codes
            # What the terminal held above the server's copy (the ops about `after` written
            # after the backup) is in the archive; the views still have them.
            assert machine.archived_ops == held - at_backup, (machine.archived_ops, held)
            views = {v.payment_id: v.status.value for v in till.terminal.history()}
            assert views == dict.fromkeys(before + after, "approved")

            # The server's new ops reach the terminal again: a setting written now arrives.
            limit = {"minor": 12_345, "currency": "USD"}
            await server.api("PUT", "/v1/terminals/R2/settings", {"per_transaction_limit": limit})
            await wait_until(
                lambda: machine.setting("per_transaction_limit", None) == limit,
                10,
                "the setting written after the restore",
            )
            assert not any("does not chain" in a.message for a in till.seen(OutageAlert))
            assert not any(n.code == "status_conflict" for n in till.seen(ForwardingFailed))

            # Reopened, the terminal folds the archive in again: nothing moved backwards.
            config = machine.config
            await till.terminal.close()
            again = await Terminal.open(tmp_path / "R2.db", config, till.proxy.ws_url)
            try:
                assert again.machine.archived_ops == held - at_backup
                reopened = {v.payment_id: v.status.value for v in again.history()}
                assert reopened == dict.fromkeys(before + after, "approved")
                assert again.machine.setting("per_transaction_limit", None) == limit
            finally:
                await again.close()
        finally:
            await close_all(tills)
            await server.stop()


async def test_after_a_restore_a_terminal_with_nothing_to_send_lifts_the_budget_hold(
    tmp_path: Path,
) -> None:
    """The restored server forgot grants written after the backup, so it grants nothing
    until each terminal holding a grant is back (docs/operations.md, "Restore"). B2 was
    connected: its link loss and return are mode changes it pushes. B1's app was closed
    before the restore and opens after it with nothing new to send (no mode change, no
    payment): it sends its last op again, which the server takes as B1 being back. Without
    that the budget would wait up to 24 h for B1's next payment."""
    tills: list[Till] = []
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url)
        await server.start()
        try:
            tills += [await _offline_terminal(tmp_path, server, tid) for tid in ("B1", "B2")]
            await server.api(
                "PUT",
                "/v1/merchant/offline-budget",
                {"offline_budget": {"minor": 10_000, "currency": "USD"}},
            )

            def granted(till: Till) -> int:
                grant = till.terminal.machine.grant_total
                return 0 if grant is None else grant.minor

            await wait_until(lambda: all(granted(t) == 4_000 for t in tills), 10, "grants")
            await wait_until(
                lambda: all(t.terminal.status().unsynced_ops == 0 for t in tills), 10, "acks"
            )
            await _backup(server, tmp_path / "server-backup.db")
            b1, b2 = tills
            config = b1.terminal.machine.config
            b1_head = b1.terminal.machine.replica.head("B1")
            await b1.terminal.close()  # the app is closed: no link loss recorded

            await server.stop()
            await _restore(server, tmp_path / "server-backup.db")
            await server.start()
            budget = await server.api("GET", "/v1/merchant/offline-budget")
            assert budget["restore_hold"] == ["B1", "B2"], budget
            await wait_until(lambda: b2.terminal.status().network == "connected", 10, "B2 back")

            async def held() -> list[str]:
                view = await server.api("GET", "/v1/merchant/offline-budget")
                return list(view["restore_hold"])

            async def only_b1_held() -> bool:
                return await held() == ["B1"]

            await wait_until(only_b1_held, 10, "B2's push")
            await server.api(  # more room: nobody gets it while B1 may hold rights
                "PUT",
                "/v1/merchant/offline-budget",
                {"offline_budget": {"minor": 20_000, "currency": "USD"}},
            )
            assert (await held()) == ["B1"]
            assert granted(b2) == 4_000

            b1.terminal = await Terminal.open(
                tmp_path / "B1.db", config, b1.proxy.ws_url, clock_ms=b1.clock, tick_interval_ms=50
            )
            b1.terminal.subscribe(b1.notices.append)
            await b1.terminal.start()

            async def none_held() -> bool:
                return await held() == []

            await wait_until(none_held, 10, "B1's word that it is back")
            assert b1.terminal.machine.replica.head("B1") == b1_head  # it had nothing new
            await wait_until(
                lambda: granted(b1) > 4_000 and granted(b2) > 4_000, 15, "the larger grants"
            )
        finally:
            await close_all(tills)
            await server.stop()
