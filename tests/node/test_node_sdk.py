"""The Terminal facade against a real websocket server on loopback and real SQLite files."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from node_support import PAN, FakeSyncServer, make_config, usd, visa, wait_for

from syncengine.core import crypto
from syncengine.core.errors import InvalidState, Refused, StorageError
from syncengine.core.ids import PAYMENT_ID_RANDOM_BYTES, new_payment_id
from syncengine.core.lifecycle import Status
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.core.policy.offline_mode import EntryPolicy, OfflineModePolicy
from syncengine.node import Terminal, sdk
from syncengine.node import machine as machine_module
from syncengine.node.machine import (
    ExpiryWarning,
    Notice,
    OfflinePrompt,
    OutageAlert,
    PaymentForwarded,
    PaymentResult,
    ResumePrompt,
    StatusChanged,
    TerminalMachine,
)


@pytest.fixture
async def server() -> AsyncIterator[FakeSyncServer]:
    srv = FakeSyncServer()
    await srv.start()
    yield srv
    await srv.stop()


async def open_terminal(
    tmp_path: Path, server: FakeSyncServer, name: str = "t.db", **config: Any
) -> Terminal:
    terminal = await Terminal.open(
        tmp_path / name,
        make_config(**config),
        server.url,
        enrollment_code="123456",
        enroll=server.enroll,
        tick_interval_ms=20,
        open_timeout_ms=500,
    )
    await terminal.start()
    return terminal


async def go_offline(terminal: Terminal, server: FakeSyncServer) -> None:
    """Take the server away and activate offline payments at the prompt."""
    await server.stop()
    await wait_for(lambda: terminal.status().mode == "prompting")
    terminal.activate_offline()
    assert terminal.status().mode == "offline"


async def test_online_payment_is_approved_by_the_server(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    result = await terminal.take_payment(usd("12.50"), visa(), EntryMethod.TAP)
    assert result.outcome == "approved_online"
    assert result.channel == "integrated" and result.expires_at_ms is None
    record = server.terminals["T1"]
    assert [op.kind for op in record.ops][-1] == "capture"
    assert terminal.history()[-1].status == Status.APPROVED
    await terminal.close()


async def test_online_decline_is_reported_with_its_code(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    server.decline_minor.add(666)
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    result = await terminal.take_payment(usd("6.66"), visa(), EntryMethod.INSERT)
    assert (result.outcome, result.reason) == ("declined", "insufficient_funds")
    await terminal.close()


async def test_online_payment_without_an_outcome_is_pending_not_approved(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    server.auto_forward = False
    terminal = await open_terminal(tmp_path, server, online_outcome_timeout_ms=200)
    await wait_for(lambda: terminal.status().network == "connected")
    result = await terminal.take_payment(usd("10.00"), visa(), EntryMethod.TAP)
    assert result.outcome == "pending"
    assert result.payment_id is not None
    # The outcome arrives later as a notice.
    seen: list[Notice] = []
    terminal.subscribe(seen.append)
    await server.send_status("T1", result.payment_id, Status.APPROVED, "approved")
    await wait_for(lambda: any(isinstance(n, PaymentForwarded) for n in seen))
    await terminal.close()


async def test_link_failing_mid_payment_reports_pending(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    server.auto_forward = False
    terminal = await open_terminal(tmp_path, server, online_outcome_timeout_ms=5_000)
    await wait_for(lambda: terminal.status().network == "connected")
    import asyncio

    task = asyncio.create_task(terminal.take_payment(usd("10.00"), visa(), EntryMethod.TAP))
    await wait_for(lambda: server.pushes >= 1)
    await server.stop()
    result = await asyncio.wait_for(task, 3)
    assert (result.outcome, result.reason) == ("pending", "link_lost")
    await terminal.close()


async def test_offline_round_trip_prompt_store_forward(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    seen: list[Notice] = []
    terminal.subscribe(seen.append)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    assert any(isinstance(n, OfflinePrompt) for n in seen)
    assert any(isinstance(n, OutageAlert) and n.outage == "network" for n in seen)

    refused = await terminal.take_payment(usd("5000.01"), visa(), EntryMethod.TAP)
    assert (refused.outcome, refused.reason) == ("refused", "over_transaction_limit")
    manual = await terminal.take_payment(usd("1.00"), visa(), EntryMethod.MANUAL)
    assert (manual.outcome, manual.reason) == ("refused", "manual_entry_not_allowed")

    results = [await terminal.take_payment(usd("20.00"), visa(), EntryMethod.TAP) for _ in range(3)]
    assert all(r.outcome == "approved_offline" and r.channel == "offline" for r in results)
    status = terminal.status()
    assert (status.pending_count, status.pending_amount) == (3, usd("60.00"))
    assert status.max_offline_amount == usd("5000.00")
    assert status.offline_window_left_ms is not None and status.first_expiry_left_ms is not None

    await server.start()  # same port: the terminal reconnects by itself
    await wait_for(lambda: terminal.status().pending_count == 0)
    await wait_for(lambda: terminal.status().mode == "online")
    forwarded = [n for n in seen if isinstance(n, PaymentForwarded)]
    assert {n.payment_id for n in forwarded} == {r.payment_id for r in results}
    assert any(isinstance(n, ResumePrompt) for n in seen)
    assert any(isinstance(n, StatusChanged) for n in seen)
    captures = [op for op in server.terminals["T1"].ops if op.kind == "capture"]
    assert [op.body["payment_id"] for op in captures] == [r.payment_id for r in results]
    modes = [op.body["to"] for op in server.terminals["T1"].ops if op.kind == "mode"]
    assert modes[:3] == ["prompting", "offline", "forwarding"]
    await terminal.close()


async def test_refusals_while_offline_is_not_activated_or_not_allowed(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await server.stop()
    await wait_for(lambda: terminal.status().mode == "prompting")
    result = await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    assert result.reason == "offline_not_activated"
    await terminal.close()

    from syncengine.core.policy.offline_mode import OfflineSettings

    other = await open_terminal(
        tmp_path, server, "u.db", terminal_id="T2", offline=OfflineSettings()
    )
    await wait_for(lambda: other.status().network == "network_outage")
    result = await other.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    assert result.reason == "offline_not_allowed"
    with pytest.raises(Refused) as refused:
        other.activate_offline()
    assert refused.value.reason == "offline_mode_not_allowed"
    await other.close()


async def test_provider_outage_by_http_503_is_told_apart_and_may_go_offline(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    server.http_status = 503
    policy = OfflineModePolicy(auto_on_provider_outage=True)
    terminal = await open_terminal(tmp_path, server, policy=policy)
    seen: list[Notice] = []
    terminal.subscribe(seen.append)
    await wait_for(lambda: terminal.status().network == "provider_outage")
    assert terminal.status().mode == "offline"
    result = await terminal.take_payment(usd("3.00"), visa(), EntryMethod.INSERT)
    assert result.outcome == "approved_offline"
    await terminal.close()


async def test_provider_outage_by_error_frame(tmp_path: Path, server: FakeSyncServer) -> None:
    server.unavailable = True
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "provider_outage")
    assert terminal.status().mode == "prompting"
    await terminal.close()


async def test_network_outage_when_nothing_listens(tmp_path: Path, server: FakeSyncServer) -> None:
    await server.stop()
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "network_outage")
    await terminal.close()


async def test_silent_server_is_detected_by_heartbeat(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server, heartbeat_timeout_ms=400)
    await wait_for(lambda: terminal.status().network == "connected")
    server.silent = True
    await wait_for(lambda: terminal.status().network == "network_outage", timeout_s=3)
    await terminal.close()


async def test_auto_entry_after_delay(tmp_path: Path, server: FakeSyncServer) -> None:
    policy = OfflineModePolicy(entry=EntryPolicy.AUTO, auto_after_ms=1_000)
    terminal = await open_terminal(tmp_path, server, policy=policy)
    await wait_for(lambda: terminal.status().network == "connected")
    await server.stop()
    await wait_for(lambda: terminal.status().mode == "outage_detected")
    await wait_for(lambda: terminal.status().mode == "offline", timeout_s=3)
    await terminal.close()


async def test_card_number_is_never_stored_in_clear(tmp_path: Path, server: FakeSyncServer) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    await go_offline(terminal, server)
    await terminal.take_payment(usd("2.00"), visa(), EntryMethod.TAP)
    await terminal.close()
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert PAN.encode() not in data, path
        assert PAN.encode("utf-16-le") not in data


async def test_safeguards_refuse_then_flush_lets_logout_through(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    await terminal.take_payment(usd("9.00"), visa(), EntryMethod.TAP)
    with pytest.raises(Refused) as refused:
        await terminal.logout(flush_timeout_ms=100)
    assert refused.value.reason == "payments_pending"
    with pytest.raises(Refused):
        await terminal.switch_location("L2", flush_timeout_ms=50)
    with pytest.raises(Refused):
        await terminal.factory_reset()
    await server.start()
    await terminal.logout(flush_timeout_ms=3_000)  # the flush completes, then it proceeds
    await terminal.factory_reset()
    assert not (tmp_path / "t.db").exists()
    # The reset let go of the database: a new terminal can be set up on the same path.
    fresh = await open_terminal(tmp_path, server)
    assert fresh.history() == []
    await fresh.close()


async def test_disk_full_refuses_the_payment_and_keeps_earlier_ones(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    kept = [await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP) for _ in range(3)]
    pages = terminal.store.conn.execute("PRAGMA page_count").fetchone()[0]
    terminal.store.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match="full"):
        for _ in range(200):  # fill the last free page
            await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    stored_before = terminal.status().pending_count
    with pytest.raises(StorageError):
        await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    assert terminal.status().pending_count == stored_before  # nothing half-applied
    await terminal.close()
    reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    ids = {v.payment_id for v in reopened.history()}
    assert {r.payment_id for r in kept} <= ids
    assert len(ids) == stored_before
    await reopened.close()


async def test_reopen_gives_back_offline_mode_and_payments(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    result = await terminal.take_payment(usd("4.00"), visa(), EntryMethod.TAP)
    await terminal.close()
    reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    assert reopened.status().mode == "offline"
    assert [v.payment_id for v in reopened.history()] == [result.payment_id]
    again = await reopened.take_payment(usd("4.00"), visa(), EntryMethod.TAP)
    assert again.outcome == "approved_offline"
    assert again.expires_at_ms == result.expires_at_ms  # same outage, same deadline
    await reopened.close()


async def test_z_report_totals_and_reset(tmp_path: Path, server: FakeSyncServer) -> None:
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await terminal.take_payment(usd("10.00"), visa(), EntryMethod.TAP)
    await go_offline(terminal, server)
    await terminal.take_payment(usd("2.50"), visa(), EntryMethod.TAP)
    report = terminal.reset_z_report()
    assert (report.count, report.total) == (2, usd("12.50"))
    assert report.by_channel == {"integrated": usd("10.00"), "offline": usd("2.50")}
    assert report.by_status == {"approved": usd("10.00"), "captured": usd("2.50")}
    await terminal.take_payment(usd("1.00"), visa(), EntryMethod.TAP)
    assert (terminal.z_report().count, terminal.z_report().total) == (1, usd("1.00"))
    await terminal.close()


async def test_expiry_warning_carries_the_amount_at_risk(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    now = [1_700_000_000_000]
    terminal = await Terminal.open(
        tmp_path / "t.db",
        make_config(),
        server.url,
        enrollment_code="1",
        enroll=server.enroll,
        clock_ms=lambda: now[0],
        tick_interval_ms=10,
        open_timeout_ms=300,
    )
    seen: list[Notice] = []
    terminal.subscribe(seen.append)
    await terminal.start()
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    await terminal.take_payment(usd("7.00"), visa(), EntryMethod.TAP)
    await terminal.take_payment(usd("3.00"), visa(), EntryMethod.TAP)
    now[0] += 13 * 3_600_000  # past 50 % of the 24 h expiry window
    await wait_for(lambda: any(isinstance(n, ExpiryWarning) for n in seen))
    warning = next(n for n in seen if isinstance(n, ExpiryWarning))
    assert (warning.percent, warning.amount_at_risk, warning.count_at_risk) == (
        50,
        usd("10.00"),
        2,
    )
    assert len(terminal.machine._warned) == 1
    # Both are forwarded: nothing is at risk, and the warning's record goes with them (it
    # was kept for ever, and scanned on every tick).
    await server.start()

    def reconnected() -> bool:
        now[0] += 1_000  # the reconnect delay runs on this clock
        return terminal.status().network == "connected"

    await wait_for(reconnected)
    for view in terminal.history():
        await server.send_status("T1", view.payment_id, Status.APPROVED, "approved")
    await wait_for(lambda: terminal.machine.unacked_payments() == 0)
    await wait_for(lambda: all(v.status == Status.APPROVED for v in terminal.history()))
    assert terminal.machine._warned == set()
    await terminal.close()


async def test_payment_ids_start_with_the_capture_time_and_sort_by_it(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    now = [1_700_000_000_000]
    drawn: list[bytes] = []

    def random_bytes(n: int) -> bytes:
        out = os.urandom(n)
        drawn.append(out)
        return out

    terminal = await Terminal.open(
        tmp_path / "t.db",
        make_config(),
        server.url,
        enrollment_code="1",
        enroll=server.enroll,
        clock_ms=lambda: now[0],
        random_bytes=random_bytes,
        tick_interval_ms=10,
        open_timeout_ms=300,
    )
    await terminal.start()
    await wait_for(lambda: terminal.status().network == "connected")
    ids = []
    for amount in ("4.00", "5.00"):
        now[0] += 1
        drawn.clear()
        result = await terminal.take_payment(usd(amount), visa(), EntryMethod.TAP)
        assert result.outcome == "approved_online" and result.payment_id is not None
        # The clock once, then the id's random bytes, then the card key and nonce.
        sizes = [PAYMENT_ID_RANDOM_BYTES, crypto.KEY_BYTES, crypto.NONCE_BYTES]
        assert [len(b) for b in drawn[:3]] == sizes
        assert result.payment_id == new_payment_id(now[0], drawn[0])
        ids.append(result.payment_id)
    assert all(re.fullmatch(r"pay_[0-9a-f]{32}", pid) for pid in ids)
    assert ids[0][4:16] == f"{1_700_000_000_001:012x}"
    assert ids[0] < ids[1]
    captures = [op.body for op in server.terminals["T1"].ops if op.kind == "capture"]
    assert [(c["payment_id"], c["captured_at_ms"]) for c in captures] == [
        (ids[0], 1_700_000_000_001),
        (ids[1], 1_700_000_000_002),
    ]
    await terminal.close()


async def _offline_payments_then_closed(
    tmp_path: Path, server: FakeSyncServer, count: int
) -> list[PaymentResult]:
    """A terminal that took ``count`` offline payments and was closed (to be reopened)."""
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    taken = [
        await terminal.take_payment(usd("2.00"), visa(), EntryMethod.TAP) for _ in range(count)
    ]
    await terminal.close()
    return taken


async def test_reopen_reads_the_log_with_the_collector_paused_and_restores_it(
    tmp_path: Path, server: FakeSyncServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = await _offline_payments_then_closed(tmp_path, server, 3)
    seen: list[bool] = []
    restore = TerminalMachine.restore.__func__  # type: ignore[attr-defined]

    def watching_restore(cls: type[TerminalMachine], *args: Any, **kw: Any) -> TerminalMachine:
        seen.append(gc.isenabled())
        machine: TerminalMachine = restore(cls, *args, **kw)
        return machine

    monkeypatch.setattr(TerminalMachine, "restore", classmethod(watching_restore))
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
            assert gc.isenabled() is enabled  # as it was before the open
            assert {r.payment_id for r in taken} <= {v.payment_id for v in reopened.history()}
            await reopened.close()
    finally:
        gc.enable()
    assert seen == [False, False]  # paused while the log was read back, both times


async def test_reopen_reads_the_log_off_the_event_loop(
    tmp_path: Path, server: FakeSyncServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (taken,) = await _offline_payments_then_closed(tmp_path, server, 1)
    restore = TerminalMachine.restore.__func__  # type: ignore[attr-defined]
    loop_thread = threading.get_ident()
    readers: list[int] = []
    ticks: list[int] = []
    release = threading.Event()

    def slow_restore(cls: type[TerminalMachine], *args: Any, **kw: Any) -> TerminalMachine:
        readers.append(threading.get_ident())
        # Held until the loop has run another task: impossible if this ran on the loop.
        assert release.wait(10), "the event loop did not run while the log was read"
        machine: TerminalMachine = restore(cls, *args, **kw)
        return machine

    async def ticker() -> None:
        while True:
            ticks.append(1)
            if len(ticks) >= 3:
                release.set()
            await asyncio.sleep(0.001)

    monkeypatch.setattr(TerminalMachine, "restore", classmethod(slow_restore))
    running = asyncio.ensure_future(ticker())
    try:
        reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    finally:
        running.cancel()
    assert readers and loop_thread not in readers
    assert len(ticks) >= 3
    assert taken.payment_id in {v.payment_id for v in reopened.history()}
    await reopened.close()


def test_overlapping_reads_keep_the_collector_paused_until_the_last_ends() -> None:
    # Two opens reading their logs in two threads: the first to start ends first.
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with sdk._collector_paused():
            first_in.set()
            assert second_in.wait(10)
        first_out.set()

    def second() -> None:
        assert first_in.wait(10)
        with sdk._collector_paused():
            second_in.set()
            assert first_out.wait(10)
            seen["after the first ended"] = gc.isenabled()

    gc.enable()
    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen == {"after the first ended": False}  # still paused for the second
        assert gc.isenabled()  # as found, once both ended
    finally:
        gc.enable()


async def test_a_database_opens_in_one_terminal_at_a_time(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    first = await open_terminal(tmp_path, server)
    await wait_for(lambda: first.status().network == "connected")
    await go_offline(first, server)
    taken = await first.take_payment(usd("4.00"), visa(), EntryMethod.TAP)
    with pytest.raises(InvalidState, match=r"t\.db is already open"):
        await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    # The refused open changed nothing: the first goes on taking payments.
    again = await first.take_payment(usd("5.00"), visa(), EntryMethod.TAP)
    assert again.outcome == "approved_offline"
    await first.close()
    await first.close()  # closing twice is harmless
    reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    assert [v.payment_id for v in reopened.history()] == [taken.payment_id, again.payment_id]
    await reopened.close()


async def test_an_open_that_fails_leaves_the_database_free(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    terminal = await open_terminal(tmp_path, server)
    await terminal.close()
    with pytest.raises(InvalidState, match="belongs to terminal T1"):
        await Terminal.open(tmp_path / "t.db", make_config("T2"), server.url)
    reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    await reopened.close()


async def test_terminals_opened_at_once_leave_the_collector_as_found(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    paths = []
    for i in range(4):
        directory = tmp_path / f"t{i}"
        directory.mkdir()
        terminal = await open_terminal(directory, server)
        await terminal.close()
        paths.append(directory / "t.db")
    gc.enable()
    opened = await asyncio.gather(*(Terminal.open(p, make_config(), server.url) for p in paths))
    assert gc.isenabled()
    for terminal in opened:
        await terminal.close()


async def test_reconnect_delays_follow_a_fast_clock(tmp_path: Path, server: FakeSyncServer) -> None:
    """A clock 60 times fast (a simulation): the reconnect backoff (capped at 30 s on that
    clock, half a real second) is waited out on it. Waited out in real seconds (0.5 to 1,
    1 to 2, 2 to 4, 4 to 8), the server back after 6 s met a terminal asleep for seconds more."""
    start = sdk.wall_clock_ms()

    def fast() -> int:
        return start + (sdk.wall_clock_ms() - start) * 60

    terminal = await Terminal.open(
        tmp_path / "t.db",
        make_config(reconnect_base_ms=500, reconnect_cap_ms=30_000),  # the defaults
        server.url,
        enrollment_code="123456",
        enroll=server.enroll,
        clock_ms=fast,
        tick_interval_ms=20,
        open_timeout_ms=500,
    )
    await terminal.start()
    try:
        await wait_for(lambda: terminal.status().network == "connected")
        await server.stop()
        await wait_for(lambda: terminal.status().network != "connected")
        await asyncio.sleep(6)  # 6 minutes on its clock: the backoff has reached its cap
        await server.start()
        back = asyncio.get_running_loop().time()
        await wait_for(lambda: terminal.status().network == "connected", timeout_s=10)
        assert asyncio.get_running_loop().time() - back < 1.5
    finally:
        await terminal.close()


async def test_acknowledged_ops_leave_memory_and_are_read_back(
    tmp_path: Path, server: FakeSyncServer
) -> None:
    """A terminal's memory does not grow with its history: once the server acknowledged
    them, its ops leave memory (the payments' views stay, without the sealed card) and are
    read back from the database when needed; reopening reads the log a page at a time."""
    slack = machine_module.COMPACT_SLACK_OPS_DEFAULT
    terminal = await open_terminal(tmp_path, server)
    await wait_for(lambda: terminal.status().network == "connected")
    await go_offline(terminal, server)
    count = slack + 100
    taken = [
        await terminal.take_payment(usd("0.01"), visa(), EntryMethod.TAP) for _ in range(count)
    ]
    assert all(r.outcome == "approved_offline" for r in taken)
    replica = terminal.machine.replica
    assert replica.in_memory("T1") > count  # not acknowledged: each may have to be sent
    await server.start()
    await wait_for(lambda: terminal.machine.unsynced_ops() == 0, timeout_s=30)
    assert terminal.status().pending_count == 0
    assert replica.in_memory("T1") <= slack + 1
    captures = [op for op in server.terminals["T1"].ops if op.kind == "capture"]
    ids = [r.payment_id for r in taken]
    assert [op.body["payment_id"] for op in captures] == ids
    assert [v.payment_id for v in terminal.history()] == ids
    assert {v.capture.card.sealed for v in terminal.history()} == {""}
    # What left memory is read back as it was stored.
    assert replica.ops_of("T1") == server.terminals["T1"].ops[: replica.head("T1")[0]]
    await terminal.close()

    reopened = await Terminal.open(tmp_path / "t.db", make_config(), server.url)
    again = reopened.machine.replica
    assert again.head("T1") == replica.head("T1") and again.in_memory("T1") <= slack + 1
    assert [v.payment_id for v in reopened.history()] == ids
    assert [v.status for v in reopened.history()] == [v.status for v in terminal.history()]
    await reopened.close()
