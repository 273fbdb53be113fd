"""Shared strategies and builders for core tests."""

from __future__ import annotations

from typing import Any

from syncengine.core.hlc import Hlc
from syncengine.core.ops import Op, make_next, server_origin


def chain(origin: str, length: int, start_ms: int = 1_000) -> list[Op]:
    """A valid hash chain of ``length`` ops for ``origin``."""
    ops: list[Op] = []
    prev: Op | None = None
    kind = "status" if origin.startswith("server/") else "mode"
    for i in range(length):
        body: dict[str, Any]
        if kind == "mode":
            body = {"from": "online", "to": "offline", "reason": f"r{i}", "at_ms": start_ms + i}
        else:
            body = {
                "payment_id": f"p{i}",
                "status": "forwarding",
                "at_ms": start_ms + i,
                "code": "",
                "message": "",
            }
        prev = make_next(prev, origin, Hlc(start_ms + i, 0), kind, body)
        ops.append(prev)
    return ops


def universe() -> list[Op]:
    """Ops of three origins: two terminals and one server stream."""
    return chain("T1", 6) + chain("T2", 4, 5_000) + chain(server_origin("T1"), 5, 9_000)
