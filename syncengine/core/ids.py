"""Payment ids that sort by the time they were taken.

A payment id is ``"pay_"``, then the capture time in milliseconds as 12 lowercase hex
digits (48 bits, taken modulo ``2**48``), then 10 random bytes as 20 hex digits: 36
characters in all, the same length as the earlier fully random ids.

Why the time comes first: the server keeps payments in indexes keyed by their id (the
``payments`` table's primary key among them). Ids taken close together in time are
neighbours in every such index, so a drain of many payments appends near the end of the
index instead of touching a random page per insert. The 80 random bits keep the ids of
different terminals (and of payments taken in the same millisecond) apart. A terminal
whose clock is wrong only loses that locality: its ids are still unique.

Pure: the caller passes the time and the random bytes in.
"""

from __future__ import annotations

PAYMENT_ID_PREFIX = "pay_"
"""What every payment id made by the terminal SDK starts with."""

PAYMENT_ID_TIME_HEX = 12
"""Hex digits of the time part: 48 bits of milliseconds (wraps after about 8,900 years)."""

PAYMENT_ID_RANDOM_BYTES = 10
"""Random bytes after the time part: 80 bits, written as 20 hex digits."""

PAYMENT_ID_CHARS = len(PAYMENT_ID_PREFIX) + PAYMENT_ID_TIME_HEX + 2 * PAYMENT_ID_RANDOM_BYTES
"""Length of a payment id (36)."""

_TIME_MODULUS = 1 << (4 * PAYMENT_ID_TIME_HEX)


def new_payment_id(now_ms: int, random: bytes) -> str:
    """The payment id of a payment taken at ``now_ms`` (Unix ms) with ``random`` bytes.

    ``"pay_" + f"{now_ms mod 2**48:012x}" + random.hex()``. Ids of later times sort after
    ids of earlier ones (as plain strings, whatever the random bytes, until the 48-bit
    time wraps in the year 10889), so ids taken close
    together are neighbours in every index keyed by them; the 80 random bits keep the ids
    of different terminals apart; a terminal clock that is wrong costs locality, never
    uniqueness.

    Raises :class:`ValueError` if ``random`` is not exactly
    :data:`PAYMENT_ID_RANDOM_BYTES` long or ``now_ms`` is negative.
    """
    if len(random) != PAYMENT_ID_RANDOM_BYTES:
        raise ValueError(
            f"a payment id needs {PAYMENT_ID_RANDOM_BYTES} random bytes, got {len(random)}"
        )
    if now_ms < 0:
        raise ValueError(f"a payment id needs a time at or after the epoch, got {now_ms} ms")
    return f"{PAYMENT_ID_PREFIX}{now_ms % _TIME_MODULUS:0{PAYMENT_ID_TIME_HEX}x}{random.hex()}"
