"""Voids in the real-process tier: the terminal processes void standalone payments through
the SDK, the server refunds them at the sandbox processor (or refuses them across the
merchant's midnight), and the shared checker judges the run."""

from __future__ import annotations

import collections
import math
import re
import time
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path

from syncengine.core.bodies import VOID_REFUND_PREFIX
from syncengine.sim import facts as f
from syncengine.sim import real
from syncengine.sim.scenario import load

HERE = Path(__file__).parent
DAY_MS = 86_400_000
LEAD_MS = 8 * 60_000  # the merchant's midnight comes at least this long after the start
AFTER_MS = 15 * 60_000  # ... and the workload goes on this long after it


def next_midnight(now_ms: int, zone: str) -> int:
    """The first midnight of ``zone`` after ``now_ms`` (ms since the epoch)."""
    tz = zoneinfo.ZoneInfo(zone)
    day = datetime.fromtimestamp(now_ms / 1000, tz).date() + timedelta(days=1)
    midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
    return int(midnight.astimezone(UTC).timestamp() * 1000)


def merchant_midnight(now_ms: int) -> tuple[str, int]:
    """A time zone whose midnight is the first one after ``now_ms + LEAD_MS`` that is not
    UTC's (the terminals keep UTC days: at UTC's midnight they refuse the void themselves).
    Etc/GMT zones put a midnight on every hour; the others may come earlier."""
    best: tuple[int, str] | None = None
    for zone in sorted(zoneinfo.available_timezones()):
        try:
            at = next_midnight(now_ms + LEAD_MS, zone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            continue
        if at % DAY_MS and (best is None or at < best[0]):
            best = (at, zone)
    assert best is not None
    return best[1], best[0]


def test_merchant_midnight_is_inside_the_window() -> None:
    start = int(datetime(2026, 3, 1, 23, 50, tzinfo=UTC).timestamp() * 1000)
    zone, at = merchant_midnight(start)
    assert start + LEAD_MS <= at <= start + LEAD_MS + 2 * 3_600_000
    assert at % DAY_MS != 0  # not UTC's midnight
    assert datetime.fromtimestamp(at / 1000, zoneinfo.ZoneInfo(zone)).time().hour == 0


def test_real_voids_settle_once_and_the_merchants_midnight_refuses(tmp_path: Path) -> None:
    # ~25-75 scenario minutes at 240x: 10-20 s plus process start-up.
    now_ms = int(time.time() * 1000)
    zone, midnight_ms = merchant_midnight(now_ms)
    minutes = math.ceil((midnight_ms - now_ms + AFTER_MS) / 60_000)
    text = (HERE / "real-voids.toml").read_text()
    text = re.sub(r'(?m)^timezone = "[^"]*"', f'timezone = "{zone}"', text)
    text = re.sub(r'(?m)^duration = "75m"', f'duration = "{minutes}m"', text)
    path = tmp_path / "real-voids.toml"
    path.write_text(text)
    result = real.run(load(path), clock_factor=240)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    c = result.counters
    assert c.get("voided", 0) >= 3, c
    # Spelled out: pytest cuts a long dict short, and this is what a failure needs.
    voids = {k: v for k, v in sorted(c.items()) if "void" in k}
    assert c.get("void_refused:refused_rules", 0) >= 1, f"{zone} midnight {midnight_ms}: {voids}"
    trace = result.facts.trace
    voided = {e.payment_id for e in trace if e.kind == f.VOIDED}
    refused = {e.payment_id for e in trace if e.kind == f.VOID_REFUSED}
    assert len(voided) == c["voided"] and len(refused) == c["void_refused"]
    # The processor: exactly one void:<pid> refund per voided payment, none for the others.
    void_refunds = collections.Counter(
        r.refund_id for r in result.facts.refunds if r.refund_id.startswith(VOID_REFUND_PREFIX)
    )
    assert void_refunds == collections.Counter(VOID_REFUND_PREFIX + pid for pid in voided)
    # The refused ones were captured before the merchant's midnight and voided after it,
    # by the times the server judged (the ops' own stamps; the POS hears "approved" only
    # after the processor answered, which at 240x is seconds of scenario time later).
    ops = result.facts.server_ops
    captured = {
        op.body["payment_id"]: op.body["captured_at_ms"] for op in ops if op.kind == "capture"
    }
    asked = {op.body["payment_id"]: op.body["at_ms"] for op in ops if op.kind == "void_request"}
    for pid in refused:
        assert captured[pid] < midnight_ms <= asked[pid], pid
