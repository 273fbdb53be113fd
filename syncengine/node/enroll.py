"""Enrollment over HTTP(S) with the standard library (the SDK's core deps stay small).

``http_enroller(base_url)`` returns an enroller for :meth:`syncengine.node.Terminal.open`:
it POSTs the :class:`~syncengine.core.protocol.EnrollRequest` fields as JSON to
``{base_url}/v1/enroll`` (docs/protocol.md) and returns the server's answer, from which
the terminal keeps the server's Ed25519 key (it verifies ``ServerOps``), the processor's
X25519 key (it seals card data) and its merchant id.

The blocking ``urllib`` call runs on a worker thread so the event loop keeps going.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from syncengine.core import protocol
from syncengine.core.errors import ProtocolError, Refused

ENROLL_TIMEOUT_MS_DEFAULT = 10_000
ENROLL_RESPONSE_BYTES_MAX = 64 * 1024

EnrollAnswer = dict[str, Any]
HttpEnroller = Callable[[protocol.EnrollRequest], Awaitable[EnrollAnswer]]


def http_enroller(base_url: str, *, timeout_ms: int = ENROLL_TIMEOUT_MS_DEFAULT) -> HttpEnroller:
    """An enroller that POSTs to ``{base_url}/v1/enroll`` (``http://`` or ``https://``).

    Raises :class:`Refused` with the server's reason (``enrollment_code_used`` ...) on a
    409, :class:`ProtocolError` on any other failure; the terminal then stays unenrolled
    and ``Terminal.open`` may be retried with the same or a new code.
    """
    url = base_url.rstrip("/") + "/v1/enroll"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"enrollment URL must be http(s)://, got {base_url!r}")

    def post(fields: dict[str, Any]) -> EnrollAnswer:
        data = json.dumps(fields).encode("utf-8")
        request = urllib.request.Request(
            url, data=data, method="POST", headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_ms / 1000) as response:
                raw = response.read(ENROLL_RESPONSE_BYTES_MAX + 1)
        except urllib.error.HTTPError as exc:
            raw = exc.read(ENROLL_RESPONSE_BYTES_MAX)
            answer = _json_or_empty(raw)
            code = str(answer.get("error", f"http_{exc.code}"))
            message = str(answer.get("message", exc.reason))
            if exc.code == 409:
                raise Refused(code, f"enrollment refused: {message}") from None
            raise ProtocolError(f"enrollment failed ({exc.code} {code}): {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ProtocolError(
                f"cannot reach the enrollment service at {url}: {exc}; check the URL and the "
                "network, then open the terminal again"
            ) from None
        if len(raw) > ENROLL_RESPONSE_BYTES_MAX:
            raise ProtocolError("the enrollment answer is too large")
        answer = _json_or_empty(raw)
        if "terminal_id" not in answer:
            raise ProtocolError("the enrollment answer is not a JSON object with terminal_id")
        return answer

    async def enroll(request: protocol.EnrollRequest) -> EnrollAnswer:
        return await asyncio.to_thread(post, request.to_fields())

    return enroll


def _json_or_empty(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
