"""Reading an HTTP request body within a limit (the sync server's REST API, the sandbox).

Starlette's ``Request.body()`` keeps the whole body in memory before anyone can look at its
size, and the ASGI server sets no limit of its own: a body is read here chunk by chunk and
refused as soon as it is larger than the limit, or before a byte is read when its declared
``Content-Length`` already is.
"""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    """The request body is larger than the limit (or its Content-Length says so)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes; :class:`BodyTooLarge` otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
