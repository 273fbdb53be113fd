"""The real-process tier: real server, sandbox processor and terminal processes on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from pathlib import Path

import pytest

from syncengine.core.bodies import Capture, parse_body
from syncengine.sim import checker, real, runner
from syncengine.sim import facts as f
from syncengine.sim.scenario import load

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_real_smoke_partition_sigkill_terminal_and_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10 scenario minutes at 20x: ~30 s with process start-up. Progress every 2 s of
    # wall time (it was never reported by the real tier).
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 2.0)
    sc = load(HERE / "real-smoke.toml")
    calls: list[tuple[float, int, int, int]] = []
    result = real.run(
        sc, clock_factor=20, progress=lambda *a: calls.append((time.perf_counter(), *a))
    )
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert result.counters["captured"] > 0
    assert result.counters["approved_offline"] > 0
    kinds = {(e.kind, e.detail) for e in result.facts.trace}
    assert ("crash", "server") in kinds and ("restart", "server") in kinds
    assert result.facts.ledger and result.facts.server_ops
    assert len(calls) >= 5, calls  # ~30 s / 2 s
    walls, elapsed, totals, payments = (list(column) for column in zip(*calls, strict=True))
    assert all(b - a > 1.99 for a, b in itertools.pairwise(walls))
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0 and elapsed[-1] < sc.end_ms
    assert set(totals) == {sc.end_ms}  # the whole scenario, settle included
    assert payments == sorted(payments) and payments[-1] > 0


def test_real_progress_without_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait to the scenario's end alone (no process): without ``progress`` one sleep to
    the end; with it, calls spaced by PROGRESS_EVERY_S of wall time, payments counted as
    the complete lines of the terminals' card-number logs, none at the end."""
    sc = load(HERE / "real-smoke.toml")  # 10 scenario minutes: 1 s at 600x
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.3)

    def started_run() -> real._Run:
        r = real._Run(sc, 1, tmp_path, 600.0)
        r.t0 = time.time()
        r.start_ms = int(r.t0 * 1000)
        return r

    r = started_run()
    asyncio.run(r.wait_end(None, time.perf_counter()))
    assert sc.end_ms <= r.elapsed_ms() < sc.end_ms + 300 * 600

    (tmp_path / "pans-T1.txt").write_text("4242424242424242\n5555555555554444\n")
    (tmp_path / "pans-T2.txt").write_text("4242424242424242\n3782822463")  # mid-line
    calls: list[tuple[float, int, int, int]] = []
    r = started_run()
    long_ago = time.perf_counter() - 10  # the first report is due at once
    asyncio.run(r.wait_end(lambda *a: calls.append((time.perf_counter(), *a)), long_ago))
    assert r.elapsed_ms() >= sc.end_ms
    assert 2 <= len(calls) <= 4, calls  # ~1 s / 0.3 s, the first one at once
    walls = [c[0] for c in calls]
    assert all(b - a > 0.29 for a, b in itertools.pairwise(walls))
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert all(0 <= c[1] < sc.end_ms and c[2] == sc.end_ms and c[3] == 3 for c in calls)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decline-after-reconnect", "duplicate-reorder"])
def test_real_shipped_scenario(name: str) -> None:
    result = real.run(load(ROOT / "scenarios" / f"{name}.toml"), clock_factor=120)
    assert result.ok, "\n".join(result.violations + result.expect_failures)


def test_real_provider_outage_is_the_maintenance_switch() -> None:
    """provider_outage runs in the real tier: every server answers service_unavailable,
    terminals switch offline at once (auto_on_provider_outage), a server restarted inside
    the outage stays in it, and afterwards everything is forwarded once."""
    result = real.run(load(HERE / "real-provider.toml"), clock_factor=20)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    # Offline approvals come from the provider outage alone: the network is never cut and
    # the server's 20 s crash is far shorter than the 2 min auto delay of a network outage.
    assert result.counters["approved_offline"] > 0
    kinds = {(e.kind, e.detail) for e in result.facts.trace}
    assert ("fault", "provider_outage") in kinds
    assert ("restart", "server") in kinds


def test_real_clock_skew_and_disk_full_in_the_terminal_processes() -> None:
    """clock_skew and disk_full are applied by the terminal processes: T1's captures carry
    its slow clock (ids included), T2's store refuses captures while its disk is full and
    takes them again afterwards; nothing is skipped and the checker is satisfied."""
    # 6 + 2 scenario minutes at 60x: ~8 s plus process start-up.
    result = real.run(load(HERE / "real-device.toml"), clock_factor=60)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    windows = {w[0]: w for w in result.fault_windows}
    assert set(windows) == {"clock_skew", "disk_full"}
    _, full_from, full_to, _ = windows["disk_full"]
    trace = result.facts.trace
    attempts = {e.payment_id: e.at_ms for e in trace if e.kind == f.ATTEMPT and e.payment_id}
    # T2: refused as a storage failure inside the window, captures again after it.
    refused = [e for e in trace if e.terminal == "T2" and e.detail == "storage_failed"]
    slack = 3_000  # the window is stamped by another process (tens of real ms at 60x)
    assert refused and all(full_from - slack <= e.at_ms <= full_to + slack for e in refused)
    approved = (f.APPROVED_ONLINE, f.APPROVED_OFFLINE)
    assert any(e.terminal == "T2" and e.kind in approved and e.at_ms > full_to for e in trace)
    # T1: every capture (and its id) carries the skewed clock; T2's carry the true one.
    captures = [
        (tid, body)
        for tid, tf in result.facts.terminals.items()
        for op in tf.ops
        if op.kind == "capture" and op.origin == tid
        for body in [parse_body(op)]
        if isinstance(body, Capture)
    ]
    assert {tid for tid, _ in captures} == {"T1", "T2"}
    for tid, body in captures:
        offset = body.captured_at_ms - attempts[body.payment_id]
        want = -7 * 60_000 if tid == "T1" else 0
        assert abs(offset - want) < 2_000, (tid, body.payment_id, offset)
        assert body.payment_id.startswith(f"pay_{body.captured_at_ms:012x}")


def test_real_server_restore_from_a_backup() -> None:
    """server_restore with real processes: ``syncengine backup`` while the server runs,
    then kill, ``syncengine restore`` and start. The terminal processes push again what the
    restored server lacks and take its rewritten stream: the checker finds every payment
    on the server once, charged once, and each terminal's copy of its server stream equal
    to the server's (same_content)."""
    # 14 + 3 scenario minutes at 60x: ~17 s plus process start-up.
    result = real.run(load(HERE / "real-restore.toml"), clock_factor=60)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    kinds = {(e.kind, e.detail) for e in result.facts.trace}
    assert (f.RESTORED, "server-backup-240000.db") in kinds
    assert ("restart", "server") in kinds
    assert result.counters["captured"] > 0 and result.facts.server_ops


def test_real_merchant_budget() -> None:
    """The merchant-wide budget with real processes: set with the REST API, split by the
    server's budget loop, enforced by the SDK in the terminal processes; the checker
    replays every offline approval against the final statuses the server stamped."""
    # 12 scenario minutes at 40x (~18 s) and a 4 minute settle, plus process start-up.
    result = real.run(load(HERE / "real-budget.toml"), clock_factor=40)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    assert result.facts.offline_budget_minor == 12_000
    assert result.facts.restore_hold == ()  # read from the server's store: never restored
    assert any(e.kind == f.RELEASED for e in result.facts.trace)
    # The raise (PUT /v1/merchant/offline-budget at 6m) reached the SDK in the processes.
    assert [e.value for e in result.facts.trace if e.kind == f.BUDGET] == [40_000]
    peak = result.counters["budget_peak_minor"]
    assert 12_000 < peak <= 40_000
    # The same facts held to a budget below the peak: the check catches it.
    lower = dataclasses.replace(
        result.facts,
        offline_budget_minor=peak - 1,
        trace=[e for e in result.facts.trace if e.kind != f.BUDGET],
    )
    report = checker.check(lower)
    assert report.counters["budget_breaches"] > 0
    assert not next(i for i in report.invariants if i.name == "merchant_budget").ok
