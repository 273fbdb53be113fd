"""Rules the store backends share: decided once here, applied inside each backend's
transaction so they are checked on a fresh read. Pure functions, no SQL."""

from __future__ import annotations

from syncengine.core.errors import Refused
from syncengine.server.model import TerminalInfo


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
