"""An HTTP client for the sandbox processor service that implements :class:`Processor`.

How failures map (the forwarder depends on this; see the contract in ``api.py``):

=====================================================  =========================================
What happened                                          Raised / returned
=====================================================  =========================================
200 / 402                                              ``ChargeResult`` (approved / declined)
409                                                    :class:`IdempotencyConflict`
503, connection refused, connect or pool timeout       :class:`ProcessorUnavailable` (not sent)
504, 5xx, read/write timeout, connection cut after     :class:`OutcomeUnknown` (may be charged)
the request was sent, an unreadable success body
400 / 413                                              :class:`ProtocolError` (our bug)
refund 404 / 422                                       :class:`Refused` with the service's reason
=====================================================  =========================================

``lookup`` and ``public_key`` only read, so every transport failure there is
:class:`ProcessorUnavailable`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from syncengine.core import canonical
from syncengine.core.crypto import KEY_BYTES, b64d
from syncengine.core.errors import ProtocolError, Refused
from syncengine.processor import wire
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    IdempotencyConflict,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundRequest,
    RefundResult,
    RequestRefused,
)
from syncengine.processor.sandbox import Audit, Faults, LedgerEntry, audit_entries, entry_from_wire

TIMEOUT_S = 10.0  # whole request, read included
CONNECT_TIMEOUT_S = 2.0
RESPONSE_BYTES_MAX = 1024 * 1024
LEDGER_PAGES_MAX = 1_000


class HttpProcessor:
    """The :class:`~syncengine.processor.api.Processor` protocol over HTTP.

    ``base_url`` is e.g. ``http://127.0.0.1:8081``. ``timeout_s`` bounds each request;
    ``connect_timeout_s`` bounds connecting (a connect timeout means nothing was sent).
    Use as ``async with HttpProcessor(url) as processor: ...`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        response_bytes_max: int = RESPONSE_BYTES_MAX,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        timeout = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self._response_bytes_max = response_bytes_max

    async def __aenter__(self) -> HttpProcessor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # --- transport

    async def _send(self, method: str, path: str, body: Any, *, writes: bool) -> httpx.Response:
        """Send one request. ``writes``: a failure after sending is OutcomeUnknown."""
        content = None if body is None else canonical.dumps(body)
        headers = {"content-type": "application/json"} if content is not None else None
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ProcessorUnavailable(f"processor unreachable: {exc!r}") from exc
        except httpx.TransportError as exc:
            if writes:
                raise OutcomeUnknown(f"no answer after sending {method} {path}: {exc!r}") from exc
            raise ProcessorUnavailable(f"processor failed to answer: {exc!r}") from exc
        if len(response.content) > self._response_bytes_max:
            raise self._unknown_or_unavailable(writes, f"answer above {self._response_bytes_max} B")
        return response

    @staticmethod
    def _unknown_or_unavailable(writes: bool, what: str) -> Exception:
        if writes:
            return OutcomeUnknown(f"processor answer lost: {what}; resolve by lookup")
        return ProcessorUnavailable(f"processor failed: {what}; retry later")

    def _check_status(self, response: httpx.Response, *, writes: bool) -> None:
        status = response.status_code
        if status == 409:
            raise IdempotencyConflict(_message(response))
        if status == 503:
            raise ProcessorUnavailable(_message(response))
        if status in (400, 413):
            raise RequestRefused(f"processor refused the request: {_message(response)}")
        if status >= 500:
            raise self._unknown_or_unavailable(writes, f"HTTP {status} {_message(response)}")

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        return canonical.loads(response.content)

    # --- Processor

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        """Charge once under ``request.payment_id``; see the module docstring for errors."""
        body = wire.charge_request_to_wire(request)
        response = await self._send("POST", "/v1/charges", body, writes=True)
        self._check_status(response, writes=True)
        if response.status_code not in (200, 402):
            raise OutcomeUnknown(f"unexpected HTTP {response.status_code} to a charge")
        try:
            result = wire.charge_result_from_wire(self._json(response))
        except ProtocolError as exc:
            raise OutcomeUnknown(f"unreadable charge answer: {exc}") from exc
        expected = "approved" if response.status_code == 200 else "declined"
        if result.payment_id != request.payment_id or result.outcome != expected:
            raise OutcomeUnknown("charge answer does not match the request; resolve by lookup")
        return result

    async def lookup(self, payment_id: str) -> ChargeResult | None:
        """The processor's recorded answer for ``payment_id``, or None if never charged."""
        path = f"/v1/charges/{quote(payment_id, safe='')}"
        response = await self._send("GET", path, None, writes=False)
        if response.status_code == 404:
            return None
        self._check_status(response, writes=False)
        try:
            result = wire.charge_result_from_wire(self._json(response))
        except ProtocolError as exc:
            raise ProcessorUnavailable(f"unreadable lookup answer: {exc}") from exc
        if response.status_code != 200 or result.payment_id != payment_id:
            raise ProcessorUnavailable(f"unexpected lookup answer (HTTP {response.status_code})")
        return result

    async def refund(self, request: RefundRequest) -> RefundResult:
        """Refund once under ``request.refund_id``; refusals raise :class:`Refused`."""
        body = wire.refund_request_to_wire(request)
        response = await self._send("POST", "/v1/refunds", body, writes=True)
        self._check_status(response, writes=True)
        if response.status_code in (404, 422):
            raise Refused(_error_code(response), _message(response))
        if response.status_code != 200:
            raise OutcomeUnknown(f"unexpected HTTP {response.status_code} to a refund")
        try:
            result = wire.refund_result_from_wire(self._json(response))
        except ProtocolError as exc:
            raise OutcomeUnknown(f"unreadable refund answer: {exc}") from exc
        if (result.payment_id, result.refund_id) != (request.payment_id, request.refund_id):
            raise OutcomeUnknown("refund answer does not match the request")
        return result

    async def public_key(self) -> bytes:
        """The processor's raw X25519 public key (32 bytes)."""
        response = await self._send("GET", "/v1/public-key", None, writes=False)
        self._check_status(response, writes=False)
        try:
            body = wire.object_with(
                self._json(response), frozenset({"algorithm", "public_key"}), "key"
            )
            key = b64d(wire.text(body["public_key"], "public_key", 64))
        except ProtocolError as exc:
            raise ProcessorUnavailable(f"unreadable public key answer: {exc}") from exc
        if body["algorithm"] != "X25519" or len(key) != KEY_BYTES:
            raise ProcessorUnavailable("the processor's public key is not a 32-byte X25519 key")
        return key

    # --- sandbox administration (not part of the Processor protocol)

    async def set_faults(self, **changes: Any) -> Faults:
        """Change the sandbox's fault switches, e.g. ``set_faults(outage=True)``."""
        response = await self._send("POST", "/v1/faults", changes, writes=False)
        self._check_status(response, writes=False)
        return Faults(**self._json(response))

    async def ledger(self) -> list[LedgerEntry]:
        """Every ledger entry, read page by page (at most ``LEDGER_PAGES_MAX`` pages)."""
        entries: list[LedgerEntry] = []
        after: int | None = 0
        for _page in range(LEDGER_PAGES_MAX):
            if after is None:
                return entries
            response = await self._send("GET", f"/v1/ledger?after={after}", None, writes=False)
            self._check_status(response, writes=False)
            body = self._json(response)
            entries.extend(entry_from_wire(e) for e in body["entries"])
            after = body["next_after"]
        raise ProcessorUnavailable(f"ledger longer than {LEDGER_PAGES_MAX} pages")

    async def audit(self) -> Audit:
        """Audit the sandbox's ledger here, from its entries (trusting no server summary)."""
        return audit_entries(await self.ledger())


def _error_code(response: httpx.Response) -> str:
    try:
        body = canonical.loads(response.content)
        return str(body["error"])[: wire.ID_CHARS_MAX]
    except (ProtocolError, KeyError, TypeError):
        return f"http_{response.status_code}"


def _message(response: httpx.Response) -> str:
    try:
        body = canonical.loads(response.content)
        return str(body["message"])[: wire.TEXT_CHARS_MAX]
    except (ProtocolError, KeyError, TypeError):
        return f"HTTP {response.status_code}"
