"""Rules the store backends share: decided once here, applied inside each backend's
transaction so they are checked on a fresh read. Pure functions, no SQL."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from syncengine.core import canonical
from syncengine.core.bodies import VOID_REFUND_PREFIX, VOID_REFUSED_CODE_PREFIX, StatusChange
from syncengine.core.errors import ConfigError, Refused
from syncengine.core.lifecycle import FINAL, Status
from syncengine.core.ops import Op
from syncengine.server.model import (
    AttemptAction,
    Payment,
    PaymentFilter,
    Resolution,
    TerminalInfo,
    TerminalSettings,
)

RECEIPT_STATUSES = ("approved", "offline_declined")  # a processed payment gets a receipt
LIST_ROWS_MAX = 1_000  # rows a list call returns at most (GET /v1/payments, refunds, batches)
OFFLINE_CHANNEL = "offline"
# An offline payment in one of these statuses no longer holds escrowed budget: the
# terminal's running ``offline_settled_minor`` grows by its amount when it reaches one.
ESCROW_SETTLED_STATUSES = frozenset({"approved", "offline_declined", "expired"})


def first_action(payment: Payment, now_ms: int) -> AttemptAction:
    """What a payment's first attempt does: charge it, or, once its deadline has passed,
    only look it up. A late payment is never charged, but the server cannot tell that no
    processor call was ever made for it (a server restored from a backup forgot the calls
    it made after the backup), so it adopts a charge the processor holds under its id and
    is expired only when there is none."""
    if payment.expires_at_ms is not None and now_ms >= payment.expires_at_ms:
        return AttemptAction.LOOKUP
    return AttemptAction.CHARGE


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


FORWARDING_STATES = ("pending", "done", "error")
FORWARDING_PARKED = "error"


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
        ("fwd_state", flt.forwarding),
        ("batch_id", flt.batch_id),
    ):
        if value is None:
            continue
        if column == "fwd_state" and value == FORWARDING_PARKED:
            # A literal: any planner (PostgreSQL's generic plans too) can then use the
            # partial index of parked payments.
            where.append(f"fwd_state='{FORWARDING_PARKED}'")
            continue
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


# -- resolving parked payments -----------------------------------------------------------------

RESOLVED_APPROVED_MESSAGE = "Approved by the processor (confirmed from its record by an operator)."
RESOLVED_DECLINED_MESSAGE = "Declined by the processor (confirmed from its record by an operator)."


def check_parked(payment_id: str, fwd_state: str | None) -> None:
    """Only a parked payment (``fwd_state='error'``) can be resolved; read under the lock."""
    if fwd_state is None:
        raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
    if fwd_state != "error":
        raise Refused(
            "not_parked",
            f"payment {payment_id} is not parked (state: {fwd_state}); "
            "only a parked payment can be resolved",
        )


def resolution_change(payment_id: str, resolution: Resolution, now_ms: int) -> StatusChange | None:
    """The final status an ``approved``/``declined`` resolution writes (exactly what the
    forwarder writes for such an answer); None for ``retry``."""
    if resolution.action == "retry":
        return None
    if resolution.action == "approved" and resolution.processor_ref:
        return StatusChange(
            payment_id, Status.APPROVED, now_ms, "approved", RESOLVED_APPROVED_MESSAGE
        )
    if resolution.action == "declined" and resolution.code:
        return StatusChange(
            payment_id,
            Status.OFFLINE_DECLINED,
            now_ms,
            resolution.code[:64],
            RESOLVED_DECLINED_MESSAGE,
        )
    raise ConfigError(
        f"resolution {resolution.action!r} is retry, approved (with processor_ref) or "
        "declined (with code)"
    )


def resolution_audit_detail(payment_id: str, resolution: Resolution) -> str:
    """The audit row's detail of a resolution: what was decided, and the person's note."""
    detail: dict[str, object] = {"payment_id": payment_id, "action": resolution.action}
    if resolution.processor_ref is not None:
        detail["processor_ref"] = resolution.processor_ref
    if resolution.code is not None:
        detail["code"] = resolution.code
    if resolution.note is not None:
        detail["note"] = resolution.note
    return canonical.dumps(detail).decode()


# -- parked refunds ------------------------------------------------------------------------

REFUND_PENDING = "pending"
REFUND_PARKED = "parked"  # the processor holds another request under its id: needs a person
REFUND_LIST_STATES = (REFUND_PENDING, REFUND_PARKED)  # what GET /v1/refunds?state= lists
REFUND_RESOLVE_ACTIONS = ("retry", "done", "refused")


# Why a parked refund a person ends refused: the code and text given to refuse_refund (a
# void of it ends ``refused_not_made``).
RESOLVED_NOT_MADE_CODE = "not_made"
RESOLVED_NOT_MADE_TEXT = "resolved by a person (not made at the processor)"


def check_refund_parked(refund_id: str, state: str) -> None:
    """Only a parked refund can be resolved; ``state`` read under the lock."""
    if state != REFUND_PARKED:
        raise Refused(
            "not_parked",
            f"refund {refund_id} is not parked (state: {state}); "
            "only a parked refund can be resolved",
        )


def check_refund_resolve_action(action: str) -> None:
    if action not in REFUND_RESOLVE_ACTIONS:
        raise ConfigError(
            f"a refund resolution is one of {', '.join(REFUND_RESOLVE_ACTIONS)}, not {action!r}"
        )


def refund_resolution_audit_detail(
    payment_id: str, refund_id: str, action: str, note: str | None
) -> str:
    """The audit row's detail of a refund resolution: what was decided, and the note."""
    detail: dict[str, object] = {
        "payment_id": payment_id,
        "refund_id": refund_id,
        "action": action,
    }
    if note is not None:
        detail["note"] = note
    return canonical.dumps(detail).decode()


def refund_refused_audit_detail(payment_id: str, refund_id: str, code: str, text: str) -> str:
    """The audit detail of a refund that ended refused, with why (code and text)."""
    return f"{payment_id} {refund_id} {code}: {text}"


# The stored ``last_error`` of a payment's forwarding or a receipt: its first characters.
ERROR_CHARS_MAX = 512

# -- void refusals -----------------------------------------------------------------------

VOID_DONE = "voided"
VOID_STATE_CHARS_MAX = 64
# A void whose terminal has not heard its end: waiting, or recorded made while its refund
# was still pending or parked (the terminal hears a void made from the refund op only).
VOID_UNTOLD_SQL = "state IN ('pending', 'voided')"

#: GET /v1/api-keys: live keys oldest first, then revoked ones most recently revoked first
#: (``%s`` placeholders: merchant id, limit; SQLite swaps them for ``?``).
API_KEYS_LIST_SQL = (
    "SELECT key_id, role, name, created_at_ms, revoked_at_ms FROM api_keys "
    "WHERE merchant_id=%s ORDER BY (revoked_at_ms IS NOT NULL), "
    "coalesce(-revoked_at_ms, created_at_ms), key_id LIMIT %s"
)


def void_refund_refused_state(payment_id: str, refund_id: str, code: str) -> str | None:
    """How a void ends when its refund (``void:<payment_id>``) ends refused: the refusal's
    code as ``refused_<code>``; ``None`` for other refunds.

    The void may have been recorded ``voided`` already (its refund was pending or parked
    then); the terminal had not heard it (it hears a void made from the refund op, which a
    refused refund never gets), so it is told the refusal now."""
    if refund_id != VOID_REFUND_PREFIX + payment_id:
        return None
    word = code.strip().replace(" ", "_") or "processor"
    return f"refused_{word}"[:VOID_STATE_CHARS_MAX]


def void_refusal(
    payment_id: str, terminal_id: str, status: str, owner: str, state: str, now_ms: int
) -> StatusChange | None:
    """The status op that tells a terminal the server did not make its void, or ``None``.

    ``state`` is how the void ended; ``status``/``owner`` are the payment's status and
    terminal as stored. Only a refusal of a payment of that terminal that has its final
    status gets an op (it repeats that status, so it moves nothing; see
    ``VOID_REFUSED_CODE_PREFIX``); a void that was made, or a request for a payment the
    server does not hold for that terminal, gets none.
    """
    if state == VOID_DONE or owner != terminal_id:
        return None
    try:
        final = Status(status)
    except ValueError:
        return None
    if final not in FINAL:
        return None
    if state == "refused_rules":
        why = "it is not a standalone payment of the same business day in the merchant's time zone"
    elif state == "not_charged":
        why = "it was not charged"
    else:
        why = f"the processor refused the refund ({state.removeprefix('refused_')})"
    message = f"The server did not void this payment: {why}. Refund it from the POS or the portal if it must be."
    return StatusChange(payment_id, final, now_ms, VOID_REFUSED_CODE_PREFIX + state, message)


def refuse_too_many_keys(live: int, live_max: int) -> None:
    """POST /v1/api-keys: at most ``live_max`` live keys an account."""
    if live >= live_max:
        raise Refused(
            "too_many_keys",
            f"{live} live API keys (at most {live_max}); revoke unused ones first "
            "(DELETE /v1/api-keys/{key_id})",
        )


class _TerminalSettingsStore(Protocol):
    def get_terminal_settings(self, terminal_id: str) -> TerminalSettings | None: ...

    def update_terminal_settings(
        self, terminal_id: str, settings: TerminalSettings, actor: str, now_ms: int
    ) -> list[Op]: ...


def offline_off(
    store: _TerminalSettingsStore, terminal_ids: list[str], actor: str, now_ms: int
) -> list[str]:
    """Turn offline payments (and a forced offline) off on ``terminal_ids``, inside the
    caller's transaction: R2, offline only where standalone is, when standalone goes off."""
    for terminal_id in terminal_ids:
        settings = store.get_terminal_settings(terminal_id)
        assert settings is not None
        off = dataclasses.replace(settings, offline_allowed=False, force_offline=False)
        store.update_terminal_settings(terminal_id, off, actor, now_ms)
    return terminal_ids
