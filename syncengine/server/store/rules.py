"""Rules the store backends share: decided once here, applied inside each backend's
transaction so they are checked on a fresh read. Pure functions, no SQL."""

from __future__ import annotations

from typing import Any

from syncengine.core.errors import Refused
from syncengine.server.model import PaymentFilter, TerminalInfo

RECEIPT_STATUSES = ("approved", "offline_declined")  # a processed payment gets a receipt
OFFLINE_CHANNEL = "offline"
# An offline payment in one of these statuses no longer holds escrowed budget: the
# terminal's running ``offline_settled_minor`` grows by its amount when it reaches one.
ESCROW_SETTLED_STATUSES = frozenset({"approved", "offline_declined", "expired"})


def check_enrollment_code(
    *,
    for_terminal: str | None,
    for_class: str | None,
    expires_at_ms: int,
    used_at_ms: int | None,
    used_by: str | None,
    existing: TerminalInfo | None,
    terminal_id: str,
    public_key: bytes,
    device_class: str,
    now_ms: int,
) -> TerminalInfo | None:
    """Decide whether a one-time code enrolls ``terminal_id`` now.

    Returns the already-enrolled terminal when this is a retry of the request that used
    the code (its answer was lost), ``None`` when the enrollment may proceed, and raises
    :class:`Refused` with a reason otherwise.
    """
    if used_at_ms is not None:
        if used_by == terminal_id and existing is not None and existing.public_key == public_key:
            return existing  # a retried enrollment whose response was lost
        raise Refused(
            "enrollment_code_used",
            "This enrollment code was already used; ask a manager for a new code.",
        )
    if now_ms >= expires_at_ms:
        raise Refused(
            "enrollment_code_expired",
            "This enrollment code has expired; ask a manager for a new code.",
        )
    if for_terminal is not None and for_terminal != terminal_id:
        raise Refused(
            "enrollment_code_other_terminal",
            f"This code was created for terminal {for_terminal!r}, not {terminal_id!r}.",
        )
    if for_class is not None and for_class != device_class:
        raise Refused(
            "enrollment_code_other_device_class",
            f"This code was created for a {for_class}, not a {device_class}.",
        )
    return None


def refuse_unknown_code() -> Refused:
    return Refused(
        "enrollment_code_invalid",
        "This enrollment code is not valid; ask a manager for a new code.",
    )


def refuse_terminal_exists(terminal_id: str) -> Refused:
    return Refused(
        "terminal_exists",
        f"Terminal {terminal_id!r} is already enrolled; pick another terminal id.",
    )


def payment_filter_sql(flt: PaymentFilter, placeholder: str) -> tuple[str, list[object]]:
    """The WHERE clause and arguments of a payments-view query (R10), for either backend.

    ``placeholder`` is the driver's parameter marker (``?`` for sqlite3, ``%s`` for
    psycopg). The row limit is left to the caller.
    """
    p = placeholder
    where = [f"merchant_id={p}"]
    args: list[object] = [flt.merchant_id]
    for column, value in (
        ("channel", flt.channel),
        ("status", flt.status),
        ("terminal_id", flt.terminal_id),
    ):
        if value is not None:
            where.append(f"{column}={p}")
            args.append(value)
    if flt.from_ms is not None:
        where.append(f"captured_at_ms>={p}")
        args.append(flt.from_ms)
    if flt.to_ms is not None:
        where.append(f"captured_at_ms<{p}")
        args.append(flt.to_ms)
    if flt.payout_status == "none":
        where.append("status<>'approved'")
    elif flt.payout_status == "unbatched":
        where.append("status='approved' AND batch_id IS NULL")
    elif flt.payout_status == "batched":
        where.append("batch_id IS NOT NULL")
    if flt.after_payment_id is not None:
        where.append(f"payment_id>{p}")
        args.append(flt.after_payment_id)
    return " AND ".join(where), args


def z_report_body(
    terminal_id: str,
    z_seq: int,
    from_ms: int,
    now_ms: int,
    reset: bool,
    by_status: list[tuple[Any, ...]],
) -> dict[str, object]:
    """Assemble a Z-report from ``(status, channel, count, amount, refunded, currency)`` rows."""
    lines = [
        {
            "status": s,
            "channel": ch,
            "count": int(n),
            "amount_minor": int(total),
            "refunded_minor": int(refunded),
            "currency": cur,
        }
        for s, ch, n, total, refunded, cur in by_status
    ]
    approved = sum(int(x["amount_minor"]) for x in lines if x["status"] == "approved")
    refunded_total = sum(int(x["refunded_minor"]) for x in lines)
    return {
        "terminal_id": terminal_id,
        "z_seq": z_seq + 1 if reset else z_seq,
        "from_ms": from_ms,
        "to_ms": now_ms,
        "lines": lines,
        "approved_minor": approved,
        "refunded_minor": refunded_total,
        "net_minor": approved - refunded_total,
        "reset": reset,
    }
