"""Business days, batch close times and the reconciliation report (R10, R11).

Rules
-----
1. A merchant's *business day* D is the merchant-local calendar day. The *sales* of D are
   the payments captured during D (whatever happened to them later).
2. The *batch* of D closes at D's merchant-local close time (``batch_close_local``) and
   holds every payment processed (approved) before that instant and not in an earlier
   batch. A late-forwarded offline payment therefore lands in the batch of the day it was
   processed, not the day it was taken.
3. The reconciliation report of D lists, payment by payment, every difference between
   D's sales total and D's batch total, with the reason, so that
   ``sales_total + sum(differences) == batch_total`` (checked, ``balanced``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from syncengine.core.errors import ConfigError
from syncengine.server.model import Batch, Payment

CATCHUP_DAYS_MAX = 31


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` or :class:`ConfigError`."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/Paris"
        ) from None


def parse_close_time(text: str) -> tuple[int, int]:
    """``"HH:MM"`` -> (hour, minute), or :class:`ConfigError`."""
    try:
        hour_s, minute_s = text.split(":")
        hour, minute = int(hour_s), int(minute_s)
    except ValueError:
        raise ConfigError(f"batch close time {text!r} must look like 23:00") from None
    if not (0 <= hour <= 23 and 0 <= minute <= 59 and len(hour_s) == 2 and len(minute_s) == 2):
        raise ConfigError(f"batch close time {text!r} must be HH:MM between 00:00 and 23:59")
    return hour, minute


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def day_of(ms: int, tz: str) -> str:
    """The merchant-local business day (YYYY-MM-DD) of an instant."""
    return datetime.fromtimestamp(ms / 1000, tz=zone(tz)).date().isoformat()


def day_bounds_ms(day: str, tz: str) -> tuple[int, int]:
    """[start, end) of the merchant-local day, in ms since the epoch."""
    d = date.fromisoformat(day)
    z = zone(tz)
    start = datetime(d.year, d.month, d.day, tzinfo=z)
    nxt = d + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=z)
    return _ms(start), _ms(end)


def close_at_ms(day: str, tz: str, close_local: str) -> int:
    """The instant the batch of ``day`` closes."""
    hour, minute = parse_close_time(close_local)
    d = date.fromisoformat(day)
    return _ms(datetime(d.year, d.month, d.day, hour, minute, tzinfo=zone(tz)))


def due_closes(
    tz: str,
    close_local: str,
    now_ms: int,
    last_closed_day: str | None,
    catchup_days_max: int = CATCHUP_DAYS_MAX,
) -> list[tuple[str, int]]:
    """Batches to close now, oldest first: (business day, close instant).

    After downtime every missed day is closed in order, at most ``catchup_days_max``; with
    no batch closed yet only the latest due day is.
    """
    today = date.fromisoformat(day_of(now_ms, tz))
    latest = today if close_at_ms(today.isoformat(), tz, close_local) <= now_ms else None
    if latest is None:
        latest = today - timedelta(days=1)
    if last_closed_day is None:
        first = latest
    else:
        first = max(
            date.fromisoformat(last_closed_day) + timedelta(days=1),
            latest - timedelta(days=catchup_days_max - 1),
        )
    out: list[tuple[str, int]] = []
    day = first
    while day <= latest:
        out.append((day.isoformat(), close_at_ms(day.isoformat(), tz, close_local)))
        day += timedelta(days=1)
    return out


def _fmt_ms(ms: int | None, tz: str) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=zone(tz)).isoformat(timespec="seconds")


def reconcile(
    day: str,
    tz: str,
    close_local: str,
    sales: Iterable[Payment],
    batch: Batch | None,
    batch_payments: Iterable[Payment],
    batch_days: dict[int, str],
) -> dict[str, Any]:
    """The reconciliation report of ``day``. See the module docstring, rule 3.

    ``sales``: payments captured during the day; ``batch_payments``: the payments of the
    day's batch (empty if it is not closed yet); ``batch_days``: batch id -> business day.
    """
    start_ms, end_ms = day_bounds_ms(day, tz)
    close_ms = close_at_ms(day, tz, close_local)
    sales_list = [p for p in sales if start_ms <= p.captured_at_ms < end_ms]
    in_batch = {p.payment_id: p for p in batch_payments}
    batch_id = None if batch is None else batch.batch_id
    lines: list[dict[str, Any]] = []
    currency = None
    sales_total = 0
    for p in sales_list:
        currency = p.currency
        sales_total += p.amount_minor
        if p.payment_id in in_batch:
            continue
        lines.append(_line(p, -p.amount_minor, _why_missing(p, batch_id, close_ms, tz, batch_days)))
    for p in in_batch.values():
        currency = p.currency
        if start_ms <= p.captured_at_ms < end_ms:
            continue
        captured_day = day_of(p.captured_at_ms, tz)
        reason = (
            f"taken on {captured_day} ({p.channel}) but processed on "
            f"{_fmt_ms(p.processed_at_ms, tz)}, after that day's batch closed: it settles "
            "in this batch"
        )
        lines.append(_line(p, p.amount_minor, reason))
    batch_total = 0 if batch is None else batch.sales_minor
    difference = sum(int(line["effect_minor"]) for line in lines)
    return {
        "business_day": day,
        "timezone": tz,
        "batch_close_at": _fmt_ms(close_ms, tz),
        "batch_id": batch_id,
        "batch_closed": batch is not None,
        "currency": currency if batch is None else batch.currency,
        "sales_total_minor": sales_total,
        "batch_total_minor": batch_total,
        "difference_minor": batch_total - sales_total,
        "explained_minor": difference,
        "balanced": sales_total + difference == batch_total,
        "lines": sorted(lines, key=lambda line: (line["captured_at_ms"], line["payment_id"])),
    }


def _line(p: Payment, effect_minor: int, reason: str) -> dict[str, Any]:
    return {
        "payment_id": p.payment_id,
        "terminal_id": p.terminal_id,
        "channel": p.channel,
        "amount_minor": p.amount_minor,
        "status": p.status,
        "captured_at_ms": p.captured_at_ms,
        "processed_at_ms": p.processed_at_ms,
        "batch_id": p.batch_id,
        "effect_minor": effect_minor,
        "reason": reason,
    }


def _why_missing(
    p: Payment, batch_id: int | None, close_ms: int, tz: str, batch_days: dict[int, str]
) -> str:
    if p.status == "offline_declined":
        return (
            f"declined by the card issuer when it was forwarded ({p.code}): a loss, never settled"
        )
    if p.status == "expired":
        return "expired before it could be forwarded: the card was never charged"
    if p.status != "approved":
        return f"not processed yet (status {p.status}): it will settle in a later batch"
    processed = _fmt_ms(p.processed_at_ms, tz)
    if batch_id is None and p.batch_id is None:
        return f"processed on {processed}; this day's batch is not closed yet"
    if p.batch_id is None:
        return (
            f"processed on {processed}, after the batch closed at {_fmt_ms(close_ms, tz)}: "
            "it will settle in the next batch"
        )
    later = batch_days.get(p.batch_id, f"batch {p.batch_id}")
    return (
        f"forwarded late: processed on {processed}, after the batch closed at "
        f"{_fmt_ms(close_ms, tz)}, so it settles in the batch of {later}"
    )


def now_utc_ms() -> int:
    """The server's clock in ms (the one place the server shell reads wall time)."""
    return _ms(datetime.now(tz=UTC))
