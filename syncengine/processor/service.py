"""The sandbox processor as an HTTP service: a thin Starlette shell over :class:`SandboxCore`.

Theory of operation
-------------------
1. **State lives in the core; durability in SQLite.** Every call to the core is followed,
   before the answer is sent, by one transaction that appends the ledger entries the call
   made (``SandboxCore.entries_since``). The core call and that write run with no ``await``
   between them, so on the single event loop no other request interleaves.
2. **If the write fails**, the core is rebuilt from the database, so memory never holds a
   charge the disk does not, and the caller gets 503 (nothing was charged).
3. **The private key** is created on first start in ``<data>/processor.key`` (mode 0600,
   fsynced) and never leaves the process; ``GET /v1/public-key`` serves the public half.
4. **Faults** (``POST /v1/faults``) are not persisted: a restart is a healthy processor.
   An "outcome unknown" charge is committed and then answered with 504 and no result, or
   (mode ``drop``) the connection is closed after the status line.

Endpoints: see docs/processor.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from syncengine.core import canonical
from syncengine.core.crypto import KEY_BYTES, b64e
from syncengine.core.errors import ConfigError, ProtocolError, Refused, StorageError
from syncengine.files import load_or_create_key_file, lock_exclusive
from syncengine.httpbody import BodyTooLarge, read_body
from syncengine.processor import wire
from syncengine.processor.api import (
    IdempotencyConflict,
    OutcomeUnknown,
    ProcessorUnavailable,
    RequestRefused,
)
from syncengine.processor.sandbox import (
    LedgerEntry,
    SandboxCore,
    entry_from_wire,
    entry_to_wire,
)

REQUEST_BYTES_MAX = 16 * 1024  # a charge body is well under 1 KiB
LEDGER_PAGE_ENTRIES_MAX = 5_000  # entries per GET /v1/ledger page
KEY_FILE = "processor.key"
DB_FILE = "ledger.sqlite3"


# --- storage ----------------------------------------------------------------------------


def load_or_create_key(data_dir: Path, make_key: Callable[[], bytes] | None = None) -> bytes:
    """Read ``<data_dir>/processor.key`` or create it (32 random bytes, mode 0600).

    Written once and durably (:func:`syncengine.files.load_or_create_key_file`): two
    processes starting at once agree on one key, and a crash while it is written leaves
    no partial key behind.
    """
    return load_or_create_key_file(
        data_dir / KEY_FILE, KEY_BYTES, make_key or (lambda: os.urandom(KEY_BYTES))
    )


class LedgerStore:
    """The ledger in SQLite: one row per entry, canonical JSON, WAL + synchronous=FULL."""

    def __init__(self, path: Path) -> None:
        # One process per ledger: the service numbers entries in memory, so a second one
        # on the same file would hold a stale view (and could approve a key twice).
        lock = lock_exclusive(path.with_name(path.name + ".lock"))
        if lock is None:
            raise StorageError(f"{path} is in use by another sandbox processor; run one per --data")
        self._lock = lock
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entries "
                "(position INTEGER PRIMARY KEY, body TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            lock.close()
            raise StorageError(
                f"cannot open the sandbox ledger {path}: {exc} (is it a ledger? move it away "
                "to start an empty one)"
            ) from exc

    def pragmas(self) -> tuple[str, int]:
        """(journal_mode, synchronous) as SQLite reports them; tests assert WAL and 2."""
        mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return str(mode), int(sync)

    def load(self) -> list[LedgerEntry]:
        """Every entry in position order, validated."""
        try:
            rows = self._db.execute(
                "SELECT position, body FROM entries ORDER BY position"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the sandbox ledger: {exc}") from exc
        entries = []
        for position, body in rows:
            entry = entry_from_wire(canonical.loads(body.encode("utf-8")))
            if entry.position != position:
                raise StorageError(f"ledger row {position} holds entry {entry.position}")
            entries.append(entry)
        return entries

    def append(self, entries: Sequence[LedgerEntry]) -> None:
        """Append entries in one transaction (all or none)."""
        if not entries:
            return
        rows = [(e.position, canonical.dumps(entry_to_wire(e)).decode()) for e in entries]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO entries (position, body) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                # rollback() is a no-op if the error already ended the transaction.
                self._db.rollback()
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"could not write the sandbox ledger: {exc}") from exc

    def close(self) -> None:
        """Close the database and let go of its lock."""
        self._db.close()
        self._lock.close()


# --- responses --------------------------------------------------------------------------


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class _DroppedResponse(Response):
    """Send the status line and headers, then end without the promised body.

    The server closes the connection; the client sees the response cut short after its
    request was processed, like a network failure at the worst moment.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200, headers={"content-length": "64"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})


# --- the service ------------------------------------------------------------------------


class SandboxService:
    """The sandbox processor's HTTP service over a data directory; ``app`` is the ASGI app.

    ``clock_ms`` and ``chance`` default to the wall clock and ``random.random``; tests may
    inject others. ``request_bytes_max`` bounds every request body.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        clock_ms: Callable[[], int] | None = None,
        chance: Callable[[], float] | None = None,
        request_bytes_max: int = REQUEST_BYTES_MAX,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._key = load_or_create_key(data_dir)
        self._store = LedgerStore(data_dir / DB_FILE)
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._chance = chance or random.random
        self._request_bytes_max = request_bytes_max
        self.core = self._load_core()
        self.app = Starlette(
            routes=[
                Route("/v1/charges", self._charge, methods=["POST"]),
                Route("/v1/charges/{payment_id:path}", self._lookup, methods=["GET"]),
                Route("/v1/refunds", self._refund, methods=["POST"]),
                Route("/v1/public-key", self._public_key, methods=["GET"]),
                Route("/v1/ledger", self._ledger, methods=["GET"]),
                Route("/v1/faults", self._get_faults, methods=["GET"]),
                Route("/v1/faults", self._set_faults, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ]
        )

    @property
    def public_key(self) -> bytes:
        """The processor's raw X25519 public key (terminals seal cards to it)."""
        return self.core.public_key

    def close(self) -> None:
        """Close the ledger database."""
        self._store.close()

    def _load_core(self, faults: Any = None) -> SandboxCore:
        core = SandboxCore(self._key, entries=self._store.load(), chance=self._chance)
        if faults is not None:
            core.set_faults(faults)
        return core

    def _commit(self, count_before: int) -> None:
        """Persist what the last core call appended, or roll memory back to the disk."""
        try:
            self._store.append(self.core.entries_since(count_before))
        except StorageError:
            self.core = self._load_core(self.core.faults)
            raise

    async def _body(self, request: Request) -> Any:
        try:
            return canonical.loads(await read_body(request, self._request_bytes_max))
        except BodyTooLarge:
            raise _TooLarge() from None

    async def _delay(self) -> None:
        if self.core.faults.latency_ms:
            await asyncio.sleep(self.core.faults.latency_ms / 1000)

    async def _guarded(
        self, request: Request, handler: Callable[[Any], Response], *, delayed: bool = True
    ) -> Response:
        """Read and decode the body, then map our exceptions to HTTP answers."""
        try:
            body = await self._body(request)
            if delayed:
                await self._delay()
            return handler(body)
        except _TooLarge:
            return _error(413, "too_large", f"body above {self._request_bytes_max} bytes")
        except (ProtocolError, RequestRefused) as exc:
            return _error(400, "bad_request", str(exc))
        except IdempotencyConflict as exc:
            return _error(409, "idempotency_conflict", str(exc))
        except (ProcessorUnavailable, StorageError) as exc:
            return _error(503, "processor_unavailable", str(exc))
        except Refused as exc:
            status = 404 if exc.reason == "charge_not_found" else 422
            return _error(status, exc.reason, str(exc))

    # --- endpoints

    async def _charge(self, request: Request) -> Response:
        return await self._guarded(request, self._charge_now)

    def _charge_now(self, body: Any) -> Response:
        charge = wire.charge_request_from_wire(body)
        before = self.core.entry_count
        try:
            result = self.core.charge(charge, self._clock_ms())
        except OutcomeUnknown as exc:
            self._commit(before)
            if self.core.faults.outcome_unknown_mode == "drop":
                return _DroppedResponse()
            return _error(504, "outcome_unknown", str(exc))
        self._commit(before)
        status = 200 if result.outcome == "approved" else 402
        return JSONResponse(wire.charge_result_to_wire(result), status_code=status)

    async def _lookup(self, request: Request) -> Response:
        payment_id = request.path_params["payment_id"]
        try:
            wire.text(payment_id, "payment_id", wire.ID_CHARS_MAX)
            await self._delay()
            result = self.core.lookup(payment_id)
        except ProtocolError as exc:
            return _error(400, "bad_request", str(exc))
        except ProcessorUnavailable as exc:
            return _error(503, "processor_unavailable", str(exc))
        if result is None:
            return _error(404, "charge_not_found", f"no charge for payment {payment_id!r}")
        return JSONResponse(wire.charge_result_to_wire(result))

    async def _refund(self, request: Request) -> Response:
        return await self._guarded(request, self._refund_now)

    def _refund_now(self, body: Any) -> Response:
        refund = wire.refund_request_from_wire(body)
        before = self.core.entry_count
        result = self.core.refund(refund, self._clock_ms())
        self._commit(before)
        return JSONResponse(wire.refund_result_to_wire(result))

    async def _public_key(self, request: Request) -> Response:
        return JSONResponse({"algorithm": "X25519", "public_key": b64e(self.public_key)})

    async def _ledger(self, request: Request) -> Response:
        after_text = request.query_params.get("after", "0")
        if not after_text.isdigit() or len(after_text) > 12:
            return _error(400, "bad_request", "after must be a ledger position (an integer)")
        after = int(after_text)
        page = self.core.entries_since(after)[:LEDGER_PAGE_ENTRIES_MAX]
        last = page[-1].position if page else after
        return JSONResponse(
            {
                "entries": [entry_to_wire(e) for e in page],
                "next_after": last if last < self.core.entry_count else None,
                "audit": self.core.audit().to_wire(),
            }
        )

    async def _get_faults(self, request: Request) -> Response:
        return JSONResponse(self.core.faults.to_wire())

    async def _set_faults(self, request: Request) -> Response:
        return await self._guarded(request, self._set_faults_now, delayed=False)

    def _set_faults_now(self, body: Any) -> Response:
        try:
            self.core.set_faults(self.core.faults.updated(body))
        except ConfigError as exc:
            return _error(400, "bad_request", str(exc))
        return JSONResponse(self.core.faults.to_wire())

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "ledger_entries": self.core.entry_count})


class _TooLarge(Exception):
    """A request body above ``request_bytes_max``."""
