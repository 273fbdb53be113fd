"""The PostgreSQL store: many ``syncengine serve`` processes over one database (R15).

Theory of operation
-------------------
The processes share nothing but this database; every promise of the store interface
(:mod:`syncengine.server.store`) holds across processes because it is enforced by rows,
locks and constraints, never by memory.

1. **One transaction per method**, on a connection of a ``psycopg_pool.ConnectionPool``,
   at READ COMMITTED. A method called from inside another (e.g. ``append_server_ops`` from
   ``record_outcome``) joins the caller's transaction (the connection is kept per thread).
   A deadlock or serialization failure rolls everything back and the whole method is
   retried (``deadlock_retries_max``); every method is pure database work, so that is safe.
2. **Lock order: the terminal row first.** Every write that appends to ``server/T`` or
   moves one of T's payments takes ``SELECT ... FROM terminals ... FOR UPDATE`` before it
   touches payments, refunds or ops of T; writes over several terminals take them in
   ``terminal_id`` order. The terminal row lock is what makes ``server/T`` seqs dense
   and its hash chain linear with any number of writers, and what serializes two merges of
   one terminal (the chain head is compared after the lock is held).
3. **Merge** inserts ops and payments with ``INSERT ... SELECT FROM unnest(...) ON CONFLICT
   DO NOTHING`` (one statement per table per batch). Equivocation (another op at a stored
   (origin, seq)) is found by the sans-I/O machine from ``load_chain`` digests; a payment
   id stored under another op is found here by counting inserted rows.
4. **Forwarding**: ``claim_terminal`` picks a due terminal with ``FOR UPDATE SKIP LOCKED``
   (processes claiming at the same moment take different terminals instead of queueing)
   and writes a lease (owner, until). The lease, renewed by every ``begin_attempt``, holds
   the terminal while its payments go to the processor; when its holder dies the lease
   runs out and another process takes over. ``begin_attempt`` and ``expire_due`` re-check
   ``attempts`` under the terminal lock, so a payment is never expired after an attempt
   may have charged it. Lease times come from the callers' clocks: keep the hosts' clocks
   within a small fraction of ``lease_ms`` (NTP).
5. **Outcomes reach every process**: appending to ``server/T`` sends
   ``NOTIFY syncengine_server_ops, 'T'`` (delivered at commit). :meth:`PostgresStore.watch`
   runs one listening connection per process and calls back with the terminal id, so the
   process holding T's websocket pushes the ops; after (re)connecting it calls back with
   ``None`` ("anything may have changed"), so a lost listener costs one extra pull, not an
   outcome.
6. **Migrations** are numbered; :meth:`open` applies the missing ones in one transaction
   under an advisory lock, so processes starting together apply each exactly once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool

from syncengine.core import canonical
from syncengine.core.bodies import Grant, RefundRecord, StatusChange
from syncengine.core.errors import ProtocolError, Refused, StorageError, check
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.core.ops import GENESIS, Op, server_origin
from syncengine.server.budget import restore_hold
from syncengine.server.model import (
    REVOKE_ALREADY,
    REVOKE_LAST_OWNER,
    REVOKE_UNKNOWN,
    REVOKED,
    TERMINAL_REVOKED_TEXT,
    ApiKey,
    ApiKeyInfo,
    Attempt,
    AttemptAction,
    Batch,
    BatchStored,
    ChainView,
    EscrowState,
    HeadMoved,
    MerchantInfo,
    MergeBatch,
    Payment,
    PaymentFilter,
    ReceiptJob,
    Refund,
    Resolution,
    Role,
    TerminalEscrow,
    TerminalInfo,
    TerminalSettings,
    next_hlc,
)
from syncengine.server.store import apply_refund_resolution, op_from_row
from syncengine.server.store.rules import (
    API_KEYS_LIST_SQL,
    ERROR_CHARS_MAX,
    ESCROW_SETTLED_STATUSES,
    LIST_ROWS_MAX,
    OFFLINE_CHANNEL,
    RECEIPT_STATUSES,
    REFUND_LIST_STATES,
    REFUND_PENDING,
    VOID_UNTOLD_SQL,
    check_enrollment_code,
    check_parked,
    check_refund_parked,
    check_refund_resolve_action,
    first_action,
    offline_off,
    payment_filter_sql,
    refund_refused_audit_detail,
    refuse_terminal_exists,
    refuse_too_many_keys,
    refuse_unknown_code,
    resolution_audit_detail,
    resolution_change,
    void_refund_refused_state,
    void_refusal,
    z_report_body,
)

log = logging.getLogger("syncengine.server.store.postgres")

F = TypeVar("F", bound=Callable[..., Any])

POOL_CONNECTIONS_MIN = 1
POOL_CONNECTIONS_MAX = 8
POOL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
# What PostgreSQL says when retrying cannot help (libpq's texts); anything else -- refused,
# starting up, shutting down, a timeout -- is retried by the pool for pool_timeout_s.
PERMANENT_CONNECT_FAILURES = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "invalid",
    "unsupported",
    "SSL is not enabled",
    "could not translate host name",
)
STATEMENT_TIMEOUT_MS = 30_000
LOCK_TIMEOUT_MS = 10_000
DEADLOCK_RETRIES_MAX = 5
NOTIFY_CHANNEL = "syncengine_server_ops"
LISTEN_POLL_S = 1.0
LISTEN_RECONNECT_MAX_S = 5.0
MIGRATION_LOCK_KEY = 0x5E_1C_E9_01  # pg_advisory_xact_lock key of schema migrations
BOOTSTRAP_KEY_LOCK_KEY = 0x5E_1C_E9_02  # ... of creating the first owner API key
EXPIRED_MESSAGE = "Not forwarded before its deadline; the card was not charged."

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema (the same tables as the SQLite store, PostgreSQL types)
    """
    CREATE TABLE merchants (
        merchant_id TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        timezone TEXT NOT NULL DEFAULT 'UTC',
        batch_close_local TEXT NOT NULL DEFAULT '23:00',
        standalone_allowed BOOLEAN NOT NULL DEFAULT FALSE,
        liability_accepted_by TEXT,
        liability_accepted_at_ms BIGINT,
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        revoked_at_ms BIGINT
    );
    CREATE TABLE enrollment_codes (
        code_hash TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        terminal_id TEXT,
        device_class TEXT,
        created_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        used_at_ms BIGINT,
        used_by_terminal TEXT
    );
    CREATE TABLE terminals (
        terminal_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        public_key BYTEA NOT NULL,
        device_class TEXT NOT NULL,
        enrolled_at_ms BIGINT NOT NULL,
        revoked_at_ms BIGINT,
        head_seq BIGINT NOT NULL DEFAULT 0,
        head_digest TEXT NOT NULL,
        server_seq BIGINT NOT NULL DEFAULT 0,
        server_digest TEXT NOT NULL,
        server_hlc_wall_ms BIGINT NOT NULL DEFAULT 0,
        server_hlc_logical BIGINT NOT NULL DEFAULT 0,
        mode TEXT,
        mode_at_ms BIGINT,
        last_seen_ms BIGINT,
        offline_allowed BOOLEAN NOT NULL,
        per_transaction_limit_minor BIGINT NOT NULL,
        total_limit_minor BIGINT NOT NULL,
        offline_entry_policy TEXT NOT NULL,
        offline_auto_delay_ms BIGINT NOT NULL,
        force_offline BOOLEAN NOT NULL,
        fwd_lease_owner TEXT,
        fwd_lease_until_ms BIGINT NOT NULL DEFAULT 0,
        z_seq BIGINT NOT NULL DEFAULT 0,
        z_reset_at_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX terminals_merchant ON terminals (merchant_id, terminal_id);
    CREATE TABLE ops (
        origin TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        data BYTEA NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (origin, seq)
    );
    CREATE TABLE payments (
        payment_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        capture_seq BIGINT NOT NULL,
        amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
        currency TEXT NOT NULL,
        channel TEXT NOT NULL,
        brand TEXT NOT NULL,
        last4 TEXT NOT NULL,
        entry_method TEXT NOT NULL,
        sealed TEXT NOT NULL,
        captured_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT,
        received_at_ms BIGINT NOT NULL,
        device_class TEXT NOT NULL,
        email TEXT,
        status TEXT NOT NULL DEFAULT 'captured',
        code TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        processor_ref TEXT,
        processed_at_ms BIGINT,
        fwd_state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        batch_id BIGINT,
        refunded_minor BIGINT NOT NULL DEFAULT 0,
        dispute_open BOOLEAN NOT NULL DEFAULT FALSE,
        last_attempt_owner TEXT,
        UNIQUE (terminal_id, capture_seq)
    );
    CREATE INDEX payments_pending ON payments (terminal_id, capture_seq)
        WHERE fwd_state = 'pending';
    CREATE INDEX payments_expiry ON payments (expires_at_ms)
        WHERE fwd_state = 'pending' AND attempts = 0;
    CREATE INDEX payments_merchant_captured ON payments (merchant_id, captured_at_ms);
    CREATE INDEX payments_merchant_processed ON payments (merchant_id, processed_at_ms);
    CREATE INDEX payments_batch ON payments (batch_id) WHERE batch_id IS NOT NULL;
    CREATE TABLE refunds (
        refund_id TEXT PRIMARY KEY,
        payment_id TEXT NOT NULL REFERENCES payments(payment_id),
        amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
        currency TEXT NOT NULL,
        state TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at_ms BIGINT NOT NULL,
        processed_at_ms BIGINT,
        batch_id BIGINT
    );
    CREATE INDEX refunds_payment ON refunds (payment_id);
    CREATE TABLE voids (
        payment_id TEXT PRIMARY KEY,
        terminal_id TEXT NOT NULL,
        requested_at_ms BIGINT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        done_at_ms BIGINT
    );
    CREATE TABLE receipts_outbox (
        payment_id TEXT PRIMARY KEY REFERENCES payments(payment_id),
        email TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms BIGINT NOT NULL DEFAULT 0,
        lease_until_ms BIGINT NOT NULL DEFAULT 0,
        created_at_ms BIGINT NOT NULL,
        sent_at_ms BIGINT,
        last_error TEXT
    );
    CREATE INDEX receipts_pending ON receipts_outbox (created_at_ms) WHERE state = 'pending';
    CREATE TABLE batches (
        batch_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        business_day TEXT NOT NULL,
        close_at_ms BIGINT NOT NULL,
        closed_at_ms BIGINT NOT NULL,
        payments_count BIGINT NOT NULL DEFAULT 0,
        sales_minor BIGINT NOT NULL DEFAULT 0,
        refunds_minor BIGINT NOT NULL DEFAULT 0,
        currency TEXT NOT NULL,
        UNIQUE (merchant_id, business_day)
    );
    CREATE TABLE z_reports (
        terminal_id TEXT NOT NULL,
        z_seq BIGINT NOT NULL,
        from_ms BIGINT NOT NULL,
        to_ms BIGINT NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (terminal_id, z_seq)
    );
    CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    # 2: the merchant-wide offline budget (escrow): the budget, and each terminal's
    # cumulative grant (what its last ``grant`` op said)
    """
    ALTER TABLE merchants ADD COLUMN offline_budget_minor BIGINT;
    CREATE TABLE escrow_grants (
        terminal_id TEXT PRIMARY KEY REFERENCES terminals(terminal_id),
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        granted_minor BIGINT NOT NULL CHECK (granted_minor >= 0),
        updated_at_ms BIGINT NOT NULL
    );
    CREATE INDEX payments_terminal_channel ON payments (terminal_id, channel, fwd_state);
    """,
    # 3: the sealed card is kept once, in the capture op (the forwarder reads it from
    # there); each terminal's offline escrow totals are running sums kept in the terminal
    # row (under its lock) instead of a per-capture index and a history scan; a capture
    # enters the processed-time index when it is processed
    """
    ALTER TABLE payments DROP COLUMN sealed;
    ALTER TABLE terminals ADD COLUMN offline_captured_minor BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE terminals ADD COLUMN offline_settled_minor BIGINT NOT NULL DEFAULT 0;
    UPDATE terminals t SET
        offline_captured_minor = (SELECT coalesce(sum(p.amount_minor), 0) FROM payments p
            WHERE p.terminal_id = t.terminal_id AND p.channel = 'offline'),
        offline_settled_minor = (SELECT coalesce(sum(p.amount_minor), 0) FROM payments p
            WHERE p.terminal_id = t.terminal_id AND p.channel = 'offline'
            AND p.status IN ('approved', 'offline_declined', 'expired'));
    DROP INDEX payments_terminal_channel;
    DROP INDEX payments_merchant_processed;
    CREATE INDEX payments_merchant_processed ON payments (merchant_id, processed_at_ms)
        WHERE processed_at_ms IS NOT NULL;
    """,
    # 4: switches every process of the service shares (the maintenance switch)
    """
    CREATE TABLE service_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    """,
    # 5: parked payments (they need a person) are listed from an index that holds them only
    """
    CREATE INDEX payments_parked ON payments (merchant_id, payment_id) WHERE fwd_state='error';
    """,
    # 6: the receipt and refund jobs read what is pending from indexes that hold it only
    # (the expiry sweep has had its partial index, payments_expiry, since migration 1)
    """
    CREATE INDEX receipts_outbox_pending ON receipts_outbox (created_at_ms)
        WHERE state='pending';
    CREATE INDEX refunds_pending ON refunds (requested_at_ms) WHERE state='pending';
    CREATE INDEX voids_pending ON voids (requested_at_ms) WHERE state='pending';
    """,
    # 7: parked refunds (they need a person) are listed from an index that holds them only
    """
    CREATE INDEX refunds_parked ON refunds (requested_at_ms) WHERE state='parked';
    """,
    # 8: why a refund was parked, on the refund (it was in the audit table only)
    """
    ALTER TABLE refunds ADD COLUMN last_error TEXT;
    """,
)

_PAYMENT_COLUMNS = (
    "payment_id, merchant_id, terminal_id, capture_seq, amount_minor, currency, channel, "
    "brand, last4, entry_method, "
    # The sealed card lives in the capture op only: read it from there.
    "(SELECT convert_from(o.data, 'UTF8')::jsonb -> 5 -> 'card' ->> 'sealed' FROM ops o "
    "WHERE o.origin = payments.terminal_id AND o.seq = payments.capture_seq), "
    "captured_at_ms, expires_at_ms, received_at_ms, "
    "device_class, email, status, code, message, processor_ref, processed_at_ms, fwd_state, "
    "attempts, next_attempt_at_ms, last_error, batch_id, refunded_minor, dispute_open"
)
# One statement per batch: arrays of columns, unnested server-side.
_INSERT_PAYMENTS = (
    "INSERT INTO payments (payment_id, merchant_id, terminal_id, capture_seq, amount_minor, "
    "currency, channel, brand, last4, entry_method, captured_at_ms, expires_at_ms, "
    "received_at_ms, device_class, email) SELECT * FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], "
    "%s::bigint[], %s::text[], %s::text[]) ON CONFLICT DO NOTHING"
)
_INSERT_OPS = (
    "INSERT INTO ops (origin, seq, kind, data, digest) SELECT * FROM unnest("
    "%s::text[], %s::bigint[], %s::text[], %s::bytea[], %s::text[]) ON CONFLICT DO NOTHING"
)
_REFUND_COLUMNS = (
    "refund_id, payment_id, amount_minor, currency, state, requested_by, requested_at_ms, "
    "processed_at_ms, batch_id, last_error"
)
_BATCH_COLUMNS = (
    "batch_id, merchant_id, business_day, close_at_ms, closed_at_ms, payments_count, "
    "sales_minor, refunds_minor, currency"
)
_TERMINAL_SETTINGS_COLUMNS = (
    "offline_allowed, per_transaction_limit_minor, total_limit_minor, offline_entry_policy, "
    "offline_auto_delay_ms, force_offline"
)
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def _ops_columns(ops: list[Op]) -> tuple[list[Any], ...]:
    return (
        [o.origin for o in ops],
        [o.seq for o in ops],
        [o.kind for o in ops],
        [o.canonical_bytes() for o in ops],
        [o.digest for o in ops],
    )


def _transaction(fn: F) -> F:
    """Run the method in one transaction, joining the caller's if there is one."""

    def wrapper(self: PostgresStore, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._local, "conn", None) is not None:
            return fn(self, *args, **kwargs)
        for attempt in range(1, self.deadlock_retries_max + 1):
            try:
                # Not autocommit: the first statement opens the transaction (no extra
                # BEGIN round trip); the pool commits on a clean exit, else rolls back.
                with self._pool_ref().connection() as conn:
                    self._local.conn = conn
                    try:
                        return fn(self, *args, **kwargs)
                    finally:
                        self._local.conn = None
            except _RETRYABLE as exc:
                # The transaction was rolled back as a whole; nothing of it is stored.
                if attempt == self.deadlock_retries_max:
                    raise StorageError(f"{fn.__name__} kept conflicting: {exc}") from exc
                log.info("%s: %s; retrying (%d)", fn.__name__, type(exc).__name__, attempt)
                time.sleep(0.005 * attempt)
            except psycopg.OperationalError as exc:
                # A connection lost during COMMIT leaves the outcome unknown: say so.
                raise StorageError(
                    f"the PostgreSQL database is unreachable or failed ({exc}); nothing was "
                    "written, unless the connection was lost while committing; try again"
                ) from exc
        raise AssertionError("unreachable")

    return cast(F, functools.update_wrapper(wrapper, fn))


class PostgresStore:
    """The :class:`~syncengine.server.store.Store` on a PostgreSQL database.

    ``url`` is a libpq connection string (``postgresql://user@host:5432/dbname``). Many
    processes may open the same database; see the module docstring for what makes that
    safe.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_connections_min: int = POOL_CONNECTIONS_MIN,
        pool_connections_max: int = POOL_CONNECTIONS_MAX,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        deadlock_retries_max: int = DEADLOCK_RETRIES_MAX,
    ) -> None:
        if not 1 <= pool_connections_min <= pool_connections_max:
            raise ValueError("need 1 <= pool_connections_min <= pool_connections_max")
        self.url = url
        self.pool_connections_min = pool_connections_min
        self.pool_connections_max = pool_connections_max
        self.pool_timeout_s = pool_timeout_s
        self.deadlock_retries_max = max(1, deadlock_retries_max)
        self._pool: ConnectionPool | None = None
        self._local = threading.local()
        self._listeners: list[threading.Thread] = []
        self._closing = threading.Event()

    @property
    def threads_max(self) -> int:
        """How many threads may usefully call the store at once (one per connection)."""
        return self.pool_connections_max

    # -- connection and transactions -------------------------------------------------------

    def _pool_ref(self) -> ConnectionPool:
        if self._pool is None:
            raise StorageError("the store is not open; call open() first")
        return self._pool

    @property
    def _c(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        assert conn is not None, "store SQL runs inside _transaction"
        return conn

    def _connect_kwargs(self) -> dict[str, Any]:
        # Options of the URL (e.g. ``-c search_path=...``) are kept; ours are added.
        options = str(psycopg.conninfo.conninfo_to_dict(self.url).get("options") or "")
        return {
            "autocommit": False,  # one method = one transaction, see _transaction
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": (
                f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={LOCK_TIMEOUT_MS}"
            ).strip(),
            "application_name": "syncengine-serve",
        }

    def open(self) -> None:
        """Open the pool and apply pending migrations (once, whoever starts first)."""
        if self._pool is not None:
            return
        self._closing.clear()
        first_failure = self._try_connect()
        pool = ConnectionPool(
            self.url,
            min_size=self.pool_connections_min,
            max_size=self.pool_connections_max,
            timeout=self.pool_timeout_s,
            kwargs=self._connect_kwargs(),
            # One empty query per checkout (~0.1 ms): a connection a database restart or
            # failover broke is replaced before a transaction starts on it.
            check=ConnectionPool.check_connection,
            open=False,
            name="syncengine",
        )
        try:
            pool.open(wait=True, timeout=self.pool_timeout_s)
        except Exception as exc:  # PoolTimeout is not a psycopg.Error
            pool.close()
            why = f"{exc}; first: {first_failure}" if first_failure else str(exc)
            raise StorageError(
                f"cannot connect to PostgreSQL at {redact_url(self.url)} ({why}); "
                "check that it runs and the URL"
            ) from exc
        self._pool = pool
        self._migrate()

    def _try_connect(self) -> str | None:
        """One connection before the pool's: a cause no retry can change (no such
        database or role, a refused password, a bad option) fails at once, with
        PostgreSQL's own words, instead of after the pool's 30 s of retries. Returns why
        a connection failed that may yet succeed (the server is down or starting)."""
        try:
            with psycopg.connect(self.url, **self._connect_kwargs()):
                return None
        except psycopg.ProgrammingError as exc:  # a malformed URL or option
            raise StorageError(
                f"cannot use the PostgreSQL URL {redact_url(self.url)}: {str(exc).strip()}"
            ) from exc
        except psycopg.OperationalError as exc:
            text = " ".join(str(exc).split())
            if any(marker in text for marker in PERMANENT_CONNECT_FAILURES):
                raise StorageError(
                    f"cannot connect to PostgreSQL at {redact_url(self.url)}: {text}"
                ) from exc
            return text

    def close(self) -> None:
        self._closing.set()
        for thread in self._listeners:
            thread.join(LISTEN_POLL_S * 3)
        self._listeners.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @_transaction
    def _migrate(self) -> None:
        conn = self._c
        # Serialize concurrent starters; the lock ends with this transaction.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0] or 0) if row is not None else 0
        if current > len(MIGRATIONS):
            raise StorageError(
                f"database schema v{current} is newer than this server "
                f"(v{len(MIGRATIONS)}); upgrade syncengine"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[version - 1].encode())  # several statements, no params
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            log.info("applied schema migration %d", version)

    @_transaction
    def schema_version(self) -> int:
        row = self._c.execute("SELECT max(version) FROM schema_version").fetchone()
        return 0 if row is None else int(row[0] or 0)

    def settings(self) -> dict[str, str]:
        """Server settings that matter for correctness (tests check them)."""
        out: dict[str, str] = {}
        with self._pool_ref().connection() as conn:
            for name in ("transaction_isolation", "synchronous_commit", "fsync"):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                out[name] = "" if row is None else str(row[0])
        return out

    # -- cross-process notifications ---------------------------------------------------------

    def watch(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(terminal_id)`` whenever any process appended to ``server/T``.

        Runs on a listener thread of its own connection; ``callback(None)`` after every
        (re)connect means "anything may have changed". The callback must be quick and
        thread-safe (e.g. ``loop.call_soon_threadsafe``).
        """
        thread = threading.Thread(
            target=self._listen, args=(callback,), name="store-listen", daemon=True
        )
        self._listeners.append(thread)
        thread.start()

    def _listen(self, callback: Callable[[str | None], None]) -> None:
        delay_s = 0.1
        while not self._closing.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    delay_s = 0.1
                    _safely(callback, None)
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            _safely(callback, note.payload)
            except psycopg.Error as exc:
                log.warning("listener lost its connection (%s); reconnecting", exc)
                self._closing.wait(delay_s)
                delay_s = min(delay_s * 2, LISTEN_RECONNECT_MAX_S)

    # -- merchants, keys, enrollment -------------------------------------------------------

    @_transaction
    def ensure_merchant(self, merchant_id: str, currency: str, now_ms: int) -> bool:
        Money.zero(currency)  # validates the currency
        cur = self._c.execute(
            "INSERT INTO merchants (merchant_id, currency, created_at_ms) VALUES (%s,%s,%s) "
            "ON CONFLICT DO NOTHING",
            (merchant_id, currency, now_ms),
        )
        return cur.rowcount == 1

    @_transaction
    def get_merchant(self, merchant_id: str) -> MerchantInfo | None:
        row = self._c.execute(
            "SELECT merchant_id, currency, timezone, batch_close_local, standalone_allowed, "
            "liability_accepted_by, liability_accepted_at_ms, offline_budget_minor "
            "FROM merchants WHERE merchant_id=%s",
            (merchant_id,),
        ).fetchone()
        return None if row is None else MerchantInfo(*row)

    @_transaction
    def list_merchants(self) -> list[MerchantInfo]:
        rows = self._c.execute(
            "SELECT merchant_id, currency, timezone, batch_close_local, standalone_allowed, "
            "liability_accepted_by, liability_accepted_at_ms, offline_budget_minor "
            "FROM merchants ORDER BY merchant_id"
        ).fetchall()
        return [MerchantInfo(*r) for r in rows]

    @_transaction
    def update_merchant(
        self,
        merchant_id: str,
        *,
        timezone: str | None = None,
        batch_close_local: str | None = None,
        standalone_allowed: bool | None = None,
        liability_accepted_by: str | None = None,
        liability_accepted_at_ms: int | None = None,
        actor: str,
        now_ms: int,
    ) -> list[str]:
        changes: dict[str, object] = {}
        if timezone is not None:
            changes["timezone"] = timezone
        if batch_close_local is not None:
            changes["batch_close_local"] = batch_close_local
        if standalone_allowed is not None:
            changes["standalone_allowed"] = standalone_allowed
        if liability_accepted_by is not None:
            changes["liability_accepted_by"] = liability_accepted_by
            changes["liability_accepted_at_ms"] = liability_accepted_at_ms
        conn = self._c
        row = conn.execute(
            "SELECT standalone_allowed FROM merchants WHERE merchant_id=%s FOR UPDATE",
            (merchant_id,),
        ).fetchone()
        if row is None:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        touched: list[str] = []
        if standalone_allowed is False:
            touched.extend(self._offline_off_everywhere(merchant_id, actor, now_ms))
        if changes:
            sets = sql.SQL(", ").join(
                sql.SQL("{}={}").format(sql.Identifier(k), sql.Placeholder()) for k in changes
            )
            conn.execute(
                sql.SQL("UPDATE merchants SET {} WHERE merchant_id=%s").format(sets),
                (*changes.values(), merchant_id),
            )
            self.audit(actor, "merchant.update", canonical.dumps(changes).decode(), now_ms)
        if standalone_allowed is not None and standalone_allowed != row[0]:
            for (terminal_id,) in conn.execute(
                "SELECT terminal_id FROM terminals WHERE merchant_id=%s AND revoked_at_ms IS NULL "
                "ORDER BY terminal_id",
                (merchant_id,),
            ).fetchall():
                body = {"key": "standalone_allowed", "value": standalone_allowed}
                self.append_server_ops(terminal_id, [("setting", body)], now_ms)
                touched.append(terminal_id)
        return sorted(set(touched))

    def _offline_off_everywhere(self, merchant_id: str, actor: str, now_ms: int) -> list[str]:
        """R2: offline is allowed only where standalone is; in the transaction that turns
        standalone off, offline is turned off on every terminal of the merchant first."""
        rows = self._c.execute(
            "SELECT terminal_id FROM terminals WHERE merchant_id=%s AND offline_allowed "
            "ORDER BY terminal_id FOR UPDATE",
            (merchant_id,),
        ).fetchall()
        return offline_off(self, [terminal_id for (terminal_id,) in rows], actor, now_ms)

    @_transaction
    def get_maintenance(self) -> bool:
        row = self._c.execute("SELECT value FROM service_state WHERE name='maintenance'").fetchone()
        return row is not None and row[0] == "on"

    @_transaction
    def set_maintenance(self, enabled: bool, actor: str, now_ms: int) -> None:
        self._c.execute(
            "INSERT INTO service_state (name, value, updated_at_ms) VALUES ('maintenance',%s,%s) "
            "ON CONFLICT (name) DO UPDATE SET value=excluded.value, "
            "updated_at_ms=excluded.updated_at_ms",
            ("on" if enabled else "off", now_ms),
        )
        self.audit(actor, "maintenance", str(enabled), now_ms)

    @_transaction
    def count_api_keys(self) -> int:
        row = self._c.execute("SELECT count(*) FROM api_keys").fetchone()
        return 0 if row is None else int(row[0])

    @_transaction
    def create_first_api_key(
        self, key_hash: str, key_id: str, merchant_id: str, role: Role, name: str, now_ms: int
    ) -> bool:
        # Under READ COMMITTED two transactions could both see no key: serialize them.
        self._c.execute("SELECT pg_advisory_xact_lock(%s)", (BOOTSTRAP_KEY_LOCK_KEY,))
        if self._c.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None:
            return False
        self.create_api_key(key_hash, key_id, merchant_id, role, name, now_ms)
        return True

    @_transaction
    def create_api_key(
        self,
        key_hash: str,
        key_id: str,
        merchant_id: str,
        role: Role,
        name: str,
        now_ms: int,
        *,
        live_max: int | None = None,
    ) -> ApiKey:
        if live_max is not None:
            # The merchant's row serializes creations of its keys, so two at once cannot
            # both count one place left.
            self._c.execute(
                "SELECT 1 FROM merchants WHERE merchant_id=%s FOR UPDATE", (merchant_id,)
            )
            refuse_too_many_keys(self.count_live_api_keys(merchant_id), live_max)
        self._c.execute(
            "INSERT INTO api_keys (key_hash, key_id, merchant_id, role, name, created_at_ms) "
            "VALUES (%s,%s,%s,%s,%s,%s)",
            (key_hash, key_id, merchant_id, role.value, name, now_ms),
        )
        return ApiKey(key_id, merchant_id, role, name)

    @_transaction
    def get_api_key(self, key_hash: str) -> ApiKey | None:
        row = self._c.execute(
            "SELECT key_id, merchant_id, role, name FROM api_keys "
            "WHERE key_hash=%s AND revoked_at_ms IS NULL",
            (key_hash,),
        ).fetchone()
        return None if row is None else ApiKey(row[0], row[1], Role(row[2]), row[3])

    @_transaction
    def count_live_api_keys(self, merchant_id: str) -> int:
        row = self._c.execute(
            "SELECT count(*) FROM api_keys WHERE merchant_id=%s AND revoked_at_ms IS NULL",
            (merchant_id,),
        ).fetchone()
        return 0 if row is None else int(row[0])

    @_transaction
    def list_api_keys(self, merchant_id: str, limit: int) -> list[ApiKeyInfo]:
        rows = self._c.execute(API_KEYS_LIST_SQL, (merchant_id, limit)).fetchall()
        return [ApiKeyInfo(r[0], Role(r[1]), r[2], int(r[3]), r[4]) for r in rows]

    @_transaction
    def revoke_api_key(self, merchant_id: str, key_id: str, actor: str, now_ms: int) -> str:
        # The merchant's live owner keys are locked first (in one order), so two revokes of
        # its last two owner keys cannot both see the other one still live.
        owners = self._c.execute(
            "SELECT key_id FROM api_keys WHERE merchant_id=%s AND role=%s "
            "AND revoked_at_ms IS NULL ORDER BY key_id FOR UPDATE",
            (merchant_id, Role.OWNER.value),
        ).fetchall()
        row = self._c.execute(
            "SELECT role, revoked_at_ms FROM api_keys WHERE merchant_id=%s AND key_id=%s "
            "FOR UPDATE",
            (merchant_id, key_id),
        ).fetchone()
        if row is None:
            return REVOKE_UNKNOWN
        if row[1] is not None:
            return REVOKE_ALREADY
        if row[0] == Role.OWNER.value and len(owners) <= 1:
            return REVOKE_LAST_OWNER
        self._c.execute(
            "UPDATE api_keys SET revoked_at_ms=%s WHERE merchant_id=%s AND key_id=%s",
            (now_ms, merchant_id, key_id),
        )
        self.audit(actor, "api_key.revoke", key_id, now_ms)
        return REVOKED

    @_transaction
    def create_enrollment_code(
        self,
        code_hash: str,
        merchant_id: str,
        terminal_id: str | None,
        device_class: str | None,
        created_by: str,
        now_ms: int,
        expires_at_ms: int,
    ) -> None:
        self._c.execute(
            "INSERT INTO enrollment_codes (code_hash, merchant_id, terminal_id, device_class, "
            "created_by, created_at_ms, expires_at_ms) VALUES (%s,%s,%s,%s,%s,%s,%s)",
            (code_hash, merchant_id, terminal_id, device_class, created_by, now_ms, expires_at_ms),
        )

    @_transaction
    def enroll(
        self,
        code_hash: str,
        terminal_id: str,
        public_key: bytes,
        device_class: str,
        settings: TerminalSettings,
        now_ms: int,
    ) -> TerminalInfo:
        conn = self._c
        # FOR UPDATE: two requests with one code serialize here; the second sees it used.
        code = conn.execute(
            "SELECT merchant_id, terminal_id, device_class, expires_at_ms, used_at_ms, "
            "used_by_terminal FROM enrollment_codes WHERE code_hash=%s FOR UPDATE",
            (code_hash,),
        ).fetchone()
        if code is None:
            raise refuse_unknown_code()
        merchant_id, for_terminal, for_class, expires_at_ms, used_at_ms, used_by = code
        existing = self.load_terminal(terminal_id)
        retried = check_enrollment_code(
            for_terminal=for_terminal,
            for_class=for_class,
            expires_at_ms=expires_at_ms,
            used_at_ms=used_at_ms,
            used_by=used_by,
            existing=existing,
            terminal_id=terminal_id,
            public_key=public_key,
            device_class=device_class,
            now_ms=now_ms,
        )
        if retried is not None:
            return retried
        cur = conn.execute(
            f"INSERT INTO terminals (terminal_id, merchant_id, public_key, device_class, "
            f"enrolled_at_ms, head_digest, server_digest, {_TERMINAL_SETTINGS_COLUMNS}) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (
                terminal_id,
                merchant_id,
                public_key,
                device_class,
                now_ms,
                GENESIS,
                GENESIS,
                *_settings_row(settings),
            ),
        )
        if cur.rowcount != 1:  # enrolled before, or by a concurrent request with another code
            raise refuse_terminal_exists(terminal_id)
        conn.execute(
            "UPDATE enrollment_codes SET used_at_ms=%s, used_by_terminal=%s WHERE code_hash=%s",
            (now_ms, terminal_id, code_hash),
        )
        merchant = self.get_merchant(merchant_id)
        check(merchant is not None, "an enrollment code belongs to an existing merchant")
        assert merchant is not None
        bodies = settings.to_setting_bodies(merchant.currency, merchant.standalone_allowed)
        self.append_server_ops(terminal_id, [("setting", b) for b in bodies], now_ms)
        self.audit("enrollment", "terminal.enroll", terminal_id, now_ms)
        info = self.load_terminal(terminal_id)
        assert info is not None
        return info

    @_transaction
    def load_terminal(self, terminal_id: str) -> TerminalInfo | None:
        row = self._c.execute(
            "SELECT terminal_id, merchant_id, public_key, device_class, revoked_at_ms, head_seq, "
            "head_digest, server_seq FROM terminals WHERE terminal_id=%s",
            (terminal_id,),
        ).fetchone()
        if row is None:
            return None
        return TerminalInfo(
            row[0], row[1], bytes(row[2]), row[3], row[4] is None, row[5], row[6], row[7]
        )

    @_transaction
    def list_terminals(
        self, merchant_id: str, after: str | None = None, limit: int = LIST_ROWS_MAX
    ) -> list[dict[str, object]]:
        rows = self._c.execute(
            "SELECT t.terminal_id, t.device_class, t.enrolled_at_ms, t.revoked_at_ms, t.head_seq, "
            "t.server_seq, t.mode, t.mode_at_ms, t.last_seen_ms, "
            "(SELECT count(*) FROM payments p WHERE p.terminal_id=t.terminal_id "
            " AND p.fwd_state='pending') FROM terminals t WHERE t.merchant_id=%s "
            "AND t.terminal_id>%s ORDER BY t.terminal_id LIMIT %s",
            (merchant_id, after or "", max(1, min(limit, LIST_ROWS_MAX))),
        ).fetchall()
        keys = (
            "terminal_id",
            "device_class",
            "enrolled_at_ms",
            "revoked_at_ms",
            "head_seq",
            "server_seq",
            "mode",
            "mode_at_ms",
            "last_seen_ms",
            "pending_forwards",
        )
        return [dict(zip(keys, row, strict=True)) for row in rows]

    @_transaction
    def revoke_terminal(
        self, merchant_id: str, terminal_id: str, actor: str, now_ms: int
    ) -> tuple[int, bool] | None:
        row = self._c.execute(
            "SELECT revoked_at_ms FROM terminals WHERE terminal_id=%s AND merchant_id=%s "
            "FOR UPDATE",
            (terminal_id, merchant_id),
        ).fetchone()
        if row is None or row[0] is not None:
            return None if row is None else (int(row[0]), False)
        self._c.execute(
            "UPDATE terminals SET revoked_at_ms=%s WHERE terminal_id=%s", (now_ms, terminal_id)
        )
        self.audit(actor, "terminal.revoke", terminal_id, now_ms)
        return now_ms, True

    @_transaction
    def get_terminal_settings(self, terminal_id: str) -> TerminalSettings | None:
        row = self._c.execute(
            f"SELECT {_TERMINAL_SETTINGS_COLUMNS} FROM terminals WHERE terminal_id=%s",
            (terminal_id,),
        ).fetchone()
        return None if row is None else TerminalSettings(*row)

    @_transaction
    def update_terminal_settings(
        self,
        terminal_id: str,
        settings: TerminalSettings,
        actor: str,
        now_ms: int,
        pressed: frozenset[str] = frozenset(),
    ) -> list[Op]:
        conn = self._c
        if not self._lock_terminal(terminal_id):
            raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
        before = self.get_terminal_settings(terminal_id)
        info = self.load_terminal(terminal_id)
        assert before is not None and info is not None
        merchant = self.get_merchant(info.merchant_id)
        assert merchant is not None
        changed = settings.setting_changes(
            before, merchant.currency, merchant.standalone_allowed, pressed
        )
        conn.execute(
            "UPDATE terminals SET offline_allowed=%s, per_transaction_limit_minor=%s, "
            "total_limit_minor=%s, offline_entry_policy=%s, offline_auto_delay_ms=%s, "
            "force_offline=%s WHERE terminal_id=%s",
            (*_settings_row(settings), terminal_id),
        )
        for body in changed:
            self.audit(actor, "terminal.setting", f"{terminal_id} {body}", now_ms)
        return self.append_server_ops(terminal_id, [("setting", b) for b in changed], now_ms)

    # -- merchant-wide offline budget (escrow) ---------------------------------------------

    @_transaction
    def set_offline_budget(
        self, merchant_id: str, budget_minor: int | None, actor: str, now_ms: int
    ) -> None:
        check(budget_minor is None or budget_minor >= 0, "a budget is not negative")
        cur = self._c.execute(
            "UPDATE merchants SET offline_budget_minor=%s WHERE merchant_id=%s",
            (budget_minor, merchant_id),
        )
        if cur.rowcount != 1:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        self.audit(actor, "merchant.offline_budget", str(budget_minor), now_ms)

    @_transaction
    def escrow_state(self, merchant_id: str, now_ms: int | None = None) -> EscrowState:
        merchant = self.get_merchant(merchant_id)
        if merchant is None:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        rows = self._c.execute(
            "SELECT t.terminal_id, coalesce(g.granted_minor, 0), t.offline_captured_minor, "
            " t.offline_settled_minor, t.revoked_at_ms IS NULL AND t.offline_allowed, "
            " t.last_seen_ms, t.revoked_at_ms IS NOT NULL "
            "FROM terminals t LEFT JOIN escrow_grants g ON g.terminal_id=t.terminal_id "
            "WHERE t.merchant_id=%s ORDER BY t.terminal_id",
            (merchant_id,),
        ).fetchall()
        terminals = tuple(
            TerminalEscrow(r[0], int(r[1]), int(r[2]), int(r[3]), bool(r[4]), r[5], bool(r[6]))
            for r in rows
        )
        row = self._c.execute("SELECT value FROM service_state WHERE name='restored_at'").fetchone()
        held = restore_hold(terminals, None if row is None else int(row[0]), now_ms)
        return EscrowState(
            merchant_id, merchant.currency, merchant.offline_budget_minor, terminals, held
        )

    @_transaction
    def mark_restored(self, now_ms: int) -> None:
        self._c.execute(
            "INSERT INTO service_state (name, value, updated_at_ms) VALUES ('restored_at',%s,%s) "
            "ON CONFLICT (name) DO UPDATE SET value=excluded.value, "
            "updated_at_ms=excluded.updated_at_ms",
            (str(now_ms), now_ms),
        )
        self.audit("syncengine restore", "restored", str(now_ms), now_ms)

    @_transaction
    def grant_budget(
        self,
        merchant_id: str,
        plan: Callable[[EscrowState], dict[str, int]],
        now_ms: int,
    ) -> list[str]:
        # The merchant row lock: two processes never plan from the same free budget.
        locked = self._c.execute(
            "SELECT 1 FROM merchants WHERE merchant_id=%s FOR UPDATE", (merchant_id,)
        ).fetchone()
        if locked is None:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        state = self.escrow_state(merchant_id, now_ms)
        grants = plan(state)
        known = {t.terminal_id: t for t in state.terminals}
        for terminal_id, total_minor in sorted(grants.items()):  # terminal locks in id order
            before = known.get(terminal_id)
            check(before is not None, f"a grant for a terminal of {merchant_id}")
            assert before is not None
            check(total_minor > before.granted_minor, "a grant only grows")
            self._c.execute(
                "INSERT INTO escrow_grants (terminal_id, merchant_id, granted_minor, "
                "updated_at_ms) VALUES (%s,%s,%s,%s) ON CONFLICT (terminal_id) DO UPDATE SET "
                "granted_minor=excluded.granted_minor, updated_at_ms=excluded.updated_at_ms",
                (terminal_id, merchant_id, total_minor, now_ms),
            )
            body = Grant(Money(total_minor, state.currency), now_ms).to_body()
            self.append_server_ops(terminal_id, [("grant", body)], now_ms)
        return sorted(grants)

    def _lock_terminal_of(self, payment_id: str) -> str | None:
        """Take the row lock of the payment's terminal; its id, or None if unknown."""
        row = self._c.execute(
            "SELECT terminal_id FROM terminals WHERE terminal_id = "
            "(SELECT terminal_id FROM payments WHERE payment_id=%s) FOR UPDATE",
            (payment_id,),
        ).fetchone()
        return None if row is None else str(row[0])

    def _lock_terminal(self, terminal_id: str) -> bool:
        """Take T's row lock (rule 2 of the module docstring); False if T is unknown."""
        row = self._c.execute(
            "SELECT 1 FROM terminals WHERE terminal_id=%s FOR UPDATE", (terminal_id,)
        ).fetchone()
        return row is not None

    # -- merge -----------------------------------------------------------------------------

    @_transaction
    def load_chain(self, origin: str, seq_lo: int, seq_hi: int) -> ChainView:
        conn = self._c
        if origin.startswith("server/"):
            row = conn.execute(
                "SELECT server_seq, server_digest FROM terminals WHERE terminal_id=%s",
                (origin.removeprefix("server/"),),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT head_seq, head_digest FROM terminals WHERE terminal_id=%s", (origin,)
            ).fetchone()
        head_seq, head_digest = (0, GENESIS) if row is None else (int(row[0]), str(row[1]))
        digests: dict[int, str] = {}
        if seq_lo <= min(seq_hi, head_seq):
            rows = conn.execute(
                "SELECT seq, digest FROM ops WHERE origin=%s AND seq BETWEEN %s AND %s",
                (origin, seq_lo, min(seq_hi, head_seq)),
            ).fetchall()
            digests = {int(r[0]): str(r[1]) for r in rows}
        return ChainView(head_seq, head_digest, digests)

    @_transaction
    def merge_batch(self, batch: MergeBatch) -> BatchStored | HeadMoved:
        check(len(batch.ops) > 0, "a merge batch carries at least one new op")
        conn = self._c
        # The row lock serializes two sessions of one terminal, in any processes: the
        # second sees the head the first committed and answers HeadMoved.
        row = conn.execute(
            "SELECT head_seq, head_digest, revoked_at_ms FROM terminals WHERE terminal_id=%s "
            "FOR UPDATE",
            (batch.terminal_id,),
        ).fetchone()
        check(row is not None, "merge batches come from enrolled terminals")
        assert row is not None
        if row[2] is not None:  # revoked while its session lived (in any process)
            raise Refused("not_enrolled", TERMINAL_REVOKED_TEXT)
        if (row[0], row[1]) != (batch.expected_head_seq, batch.expected_head_digest):
            return HeadMoved(int(row[0]))
        conn.execute(_INSERT_OPS, _ops_columns(list(batch.ops)))
        if batch.captures:
            caps = [c for _seq, c in batch.captures]
            cur = conn.execute(
                _INSERT_PAYMENTS,
                (
                    [c.payment_id for c in caps],
                    [batch.merchant_id] * len(caps),
                    [batch.terminal_id] * len(caps),
                    [seq for seq, _c in batch.captures],
                    [c.amount.minor for c in caps],
                    [c.amount.currency for c in caps],
                    [c.channel for c in caps],
                    [c.card.brand for c in caps],
                    [c.card.last4 for c in caps],
                    [c.card.entry_method for c in caps],
                    [c.captured_at_ms for c in caps],
                    [c.expires_at_ms for c in caps],
                    [batch.received_at_ms] * len(caps),
                    [c.device_class for c in caps],
                    [c.email for c in caps],
                ),
            )
            if cur.rowcount != len(caps):
                # Raising rolls the whole transaction back: nothing of the batch is stored.
                raise ProtocolError(
                    "a payment id in this batch is already stored under another op; "
                    "payment ids must be unique"
                )
        written = 0
        if batch.expired:
            written = len(self._finalize(batch.terminal_id, list(batch.expired), None))
        if batch.voids:
            conn.execute(
                "INSERT INTO voids (payment_id, terminal_id, requested_at_ms) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
                "ON CONFLICT DO NOTHING",
                (
                    [v.payment_id for v in batch.voids],
                    [batch.terminal_id] * len(batch.voids),
                    [v.at_ms for v in batch.voids],
                ),
            )
        mode = batch.last_mode
        offline_minor = sum(
            c.amount.minor for _, c in batch.captures if c.channel == OFFLINE_CHANNEL
        )
        conn.execute(
            "UPDATE terminals SET head_seq=%s, head_digest=%s, last_seen_ms=%s, "
            "mode=coalesce(%s, mode), mode_at_ms=coalesce(%s, mode_at_ms), "
            "offline_captured_minor=offline_captured_minor+%s WHERE terminal_id=%s",
            (
                batch.head_seq,
                batch.head_digest,
                batch.received_at_ms,
                None if mode is None else mode.to_mode,
                None if mode is None else mode.at_ms,
                offline_minor,
                batch.terminal_id,
            ),
        )
        return BatchStored(batch.head_seq, batch.head_digest, written)

    @_transaction
    def mark_seen(self, terminal_id: str, now_ms: int) -> bool:
        cur = self._c.execute(
            "UPDATE terminals SET last_seen_ms=%s WHERE terminal_id=%s "
            "AND coalesce(last_seen_ms, -1) < (SELECT CAST(value AS BIGINT) "
            "FROM service_state WHERE name='restored_at')",
            (now_ms, terminal_id),
        )
        return cur.rowcount == 1

    @_transaction
    def load_ops(self, origin: str, after_seq: int, ops_max: int) -> tuple[list[Op], bool]:
        rows = self._c.execute(
            "SELECT data, digest FROM ops WHERE origin=%s AND seq>%s ORDER BY seq LIMIT %s",
            (origin, after_seq, ops_max + 1),
        ).fetchall()
        ops = [op_from_row(bytes(r[0]), r[1]) for r in rows[:ops_max]]
        for i, op in enumerate(ops):
            check(op.seq == after_seq + 1 + i, f"stored chain of {origin} is dense")
        return ops, len(rows) > ops_max

    @_transaction
    def append_server_ops(
        self, terminal_id: str, bodies: list[tuple[str, dict[str, object]]], now_ms: int
    ) -> list[Op]:
        if not bodies:
            return []
        conn = self._c
        # The row lock makes the seqs dense and the chain linear whatever the writers.
        row = conn.execute(
            "SELECT server_seq, server_digest, server_hlc_wall_ms, server_hlc_logical "
            "FROM terminals WHERE terminal_id=%s FOR UPDATE",
            (terminal_id,),
        ).fetchone()
        if row is None:
            raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
        seq, digest, hlc = int(row[0]), str(row[1]), Hlc(int(row[2]), int(row[3]))
        origin = server_origin(terminal_id)
        ops: list[Op] = []
        for kind, body in bodies:
            hlc = next_hlc(hlc, now_ms)
            seq += 1
            op = Op(origin, seq, hlc, kind, dict(body), digest)
            digest = op.digest
            ops.append(op)
        with conn.pipeline():  # three writes, one round trip
            cur = conn.execute(_INSERT_OPS, _ops_columns(ops))
            conn.execute(
                "UPDATE terminals SET server_seq=%s, server_digest=%s, server_hlc_wall_ms=%s, "
                "server_hlc_logical=%s WHERE terminal_id=%s",
                (seq, digest, hlc.wall_ms, hlc.logical, terminal_id),
            )
            # Delivered at commit, to every process listening (one per terminal per commit).
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, terminal_id))
        check(cur.rowcount == len(ops), f"server seqs of {origin} above its head are free")
        return ops

    def _finalize(
        self,
        terminal_id: str,
        changes: list[StatusChange],
        processor_ref: str | None,
        unattempted_only: bool = False,
        locked: bool = False,
    ) -> list[StatusChange]:
        """Apply final statuses still pending (and never attempted, if asked); returns
        those applied. Takes T's row lock first (rule 2) unless the caller holds it."""
        conn = self._c
        if not locked:
            self._lock_terminal(terminal_id)
        applied: list[StatusChange] = []
        settled_minor = 0
        for change in changes:
            processed = change.at_ms if change.status != Status.EXPIRED else None
            cur = conn.execute(
                "UPDATE payments SET status=%s, code=%s, message=%s, processor_ref=%s, "
                "processed_at_ms=%s, fwd_state='done' WHERE payment_id=%s AND terminal_id=%s "
                "AND fwd_state='pending' AND (NOT %s OR attempts=0) "
                "RETURNING email, channel, amount_minor",
                (
                    change.status.value,
                    change.code,
                    change.message,
                    processor_ref,
                    processed,
                    change.payment_id,
                    terminal_id,
                    unattempted_only,
                ),
            )
            row = cur.fetchone()
            if row is None:
                continue
            if row[1] == OFFLINE_CHANNEL and change.status.value in ESCROW_SETTLED_STATUSES:
                settled_minor += int(row[2])
            applied.append(change)
            if change.status.value in RECEIPT_STATUSES and row[0] is not None:
                conn.execute(
                    "INSERT INTO receipts_outbox (payment_id, email, created_at_ms) "
                    "VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                    (change.payment_id, row[0], change.at_ms),
                )
        if settled_minor:  # T's row lock is held (above)
            conn.execute(
                "UPDATE terminals SET offline_settled_minor=offline_settled_minor+%s "
                "WHERE terminal_id=%s",
                (settled_minor, terminal_id),
            )
        if applied:
            bodies: list[tuple[str, dict[str, object]]] = [("status", c.to_body()) for c in applied]
            self.append_server_ops(terminal_id, bodies, changes[0].at_ms)
        return applied

    # -- forwarding --------------------------------------------------------------------------

    @_transaction
    def claim_terminal(self, owner: str, now_ms: int, lease_ms: int) -> str | None:
        conn = self._c
        # Candidates come from the (small) partial index of pending payments; a terminal
        # is due when its *oldest* pending payment is due (capture order). SKIP LOCKED: a
        # row another process is claiming right now is passed over, not waited for.
        row = conn.execute(
            "SELECT t.terminal_id FROM terminals t WHERE t.terminal_id IN "
            " (SELECT DISTINCT p.terminal_id FROM payments p WHERE p.fwd_state='pending' "
            "  AND p.next_attempt_at_ms <= %(now)s) "
            "AND t.fwd_lease_until_ms <= %(now)s AND "
            "(SELECT p.next_attempt_at_ms FROM payments p WHERE p.terminal_id=t.terminal_id "
            " AND p.fwd_state='pending' ORDER BY p.capture_seq LIMIT 1) <= %(now)s "
            "ORDER BY t.fwd_lease_until_ms LIMIT 1 FOR UPDATE OF t SKIP LOCKED",
            {"now": now_ms},
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "UPDATE terminals SET fwd_lease_owner=%s, fwd_lease_until_ms=%s WHERE terminal_id=%s",
            (owner, now_ms + lease_ms, row[0]),
        )
        return str(row[0])

    @_transaction
    def release_terminal(self, terminal_id: str, owner: str) -> None:
        self._c.execute(
            "UPDATE terminals SET fwd_lease_owner=NULL, fwd_lease_until_ms=0 "
            "WHERE terminal_id=%s AND fwd_lease_owner=%s",
            (terminal_id, owner),
        )

    @_transaction
    def release_leases(self, owner: str) -> int:
        cur = self._c.execute(
            "UPDATE terminals SET fwd_lease_owner=NULL, fwd_lease_until_ms=0 "
            "WHERE fwd_lease_owner=%s",
            (owner,),
        )
        return cur.rowcount

    @_transaction
    def next_pending(self, terminal_id: str) -> Payment | None:
        row = self._c.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE terminal_id=%s "
            "AND fwd_state='pending' ORDER BY capture_seq LIMIT 1",
            (terminal_id,),
        ).fetchone()
        return None if row is None else Payment(*row)

    @_transaction
    def begin_attempt(self, payment_id: str, owner: str, now_ms: int, lease_ms: int) -> Attempt:
        conn = self._c
        if self._lock_terminal_of(payment_id) is None:
            raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
        # Read after the lock, in a statement of its own: READ COMMITTED then sees what
        # the previous holder of the lock committed (e.g. an outcome).
        row = conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        assert row is not None
        payment = Payment(*row)
        if payment.fwd_state != "pending":
            return Attempt(payment, AttemptAction.DONE)
        with conn.pipeline():
            conn.execute(
                "UPDATE payments SET attempts=attempts+1, status=%s, last_attempt_owner=%s "
                "WHERE payment_id=%s",
                (Status.FORWARDING.value, owner, payment_id),
            )
            conn.execute(
                "UPDATE terminals SET fwd_lease_until_ms=%s WHERE terminal_id=%s "
                "AND fwd_lease_owner=%s",
                (now_ms + lease_ms, payment.terminal_id, owner),
            )
        if payment.attempts == 0:
            change = StatusChange(payment_id, Status.FORWARDING, now_ms)
            self.append_server_ops(payment.terminal_id, [("status", change.to_body())], now_ms)
            return Attempt(payment, first_action(payment, now_ms))
        return Attempt(payment, AttemptAction.LOOKUP)

    @_transaction
    def record_outcome(self, change: StatusChange, processor_ref: str | None, now_ms: int) -> bool:
        terminal_id = self._lock_terminal_of(change.payment_id)
        if terminal_id is None:
            raise Refused("unknown_payment", f"payment {change.payment_id!r} does not exist")
        return bool(self._finalize(terminal_id, [change], processor_ref, locked=True))

    @_transaction
    def defer(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None:
        self._c.execute(
            "UPDATE payments SET next_attempt_at_ms=%s, last_error=%s "
            "WHERE payment_id=%s AND fwd_state='pending'",
            (next_attempt_at_ms, error[:ERROR_CHARS_MAX], payment_id),
        )

    @_transaction
    def park(self, payment_id: str, error: str) -> None:
        self._c.execute(
            "UPDATE payments SET fwd_state='error', last_error=%s "
            "WHERE payment_id=%s AND fwd_state='pending'",
            (error[:ERROR_CHARS_MAX], payment_id),
        )

    @_transaction
    def resolve_parked(
        self, payment_id: str, resolution: Resolution, actor: str, now_ms: int
    ) -> Payment:
        conn = self._c
        terminal_id = self._lock_terminal_of(payment_id)
        # Read after the lock, in a statement of its own (READ COMMITTED): a resolution
        # that held the lock before is seen, so of two at once only the first wins.
        row = conn.execute(
            "SELECT fwd_state FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        check_parked(payment_id, None if terminal_id is None or row is None else str(row[0]))
        assert terminal_id is not None
        change = resolution_change(payment_id, resolution, now_ms)
        # Pending again; a final status is then written by the forwarder's own path.
        conn.execute(
            "UPDATE payments SET fwd_state='pending', next_attempt_at_ms=0 "
            "WHERE payment_id=%s AND fwd_state='error'",
            (payment_id,),
        )
        if change is not None:
            applied = self._finalize(terminal_id, [change], resolution.processor_ref, locked=True)
            check(applied == [change], f"parked payment {payment_id} is finalized")
        self.audit(
            actor, "payment.resolve", resolution_audit_detail(payment_id, resolution), now_ms
        )
        found = conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        assert found is not None
        return Payment(*found)

    @_transaction
    def expire_due(self, now_ms: int, limit: int) -> list[StatusChange]:
        rows = self._c.execute(
            "SELECT payment_id, terminal_id FROM payments WHERE fwd_state='pending' "
            "AND attempts=0 AND expires_at_ms IS NOT NULL AND expires_at_ms<=%s "
            "ORDER BY expires_at_ms LIMIT %s",
            (now_ms, limit),
        ).fetchall()
        by_terminal: dict[str, list[StatusChange]] = {}
        for payment_id, terminal_id in rows:
            change = StatusChange(payment_id, Status.EXPIRED, now_ms, "expired", EXPIRED_MESSAGE)
            by_terminal.setdefault(terminal_id, []).append(change)
        done: list[StatusChange] = []
        for terminal_id in sorted(by_terminal):  # several terminal locks: in id order
            # attempts=0 is re-checked under the lock: a process may have begun an attempt
            # (and charged) since the SELECT above; such a payment is never expired.
            done.extend(
                self._finalize(terminal_id, by_terminal[terminal_id], None, unattempted_only=True)
            )
        return done

    # -- receipts ----------------------------------------------------------------------------

    @_transaction
    def claim_receipts(self, now_ms: int, lease_ms: int, limit: int) -> list[ReceiptJob]:
        conn = self._c
        rows = conn.execute(
            "SELECT o.payment_id, o.email, p.merchant_id, p.amount_minor, p.currency, p.brand, "
            "p.last4, p.status, p.code, p.processed_at_ms, o.attempts FROM receipts_outbox o "
            "JOIN payments p USING (payment_id) WHERE o.state='pending' AND "
            "o.next_attempt_at_ms<=%s AND o.lease_until_ms<=%s ORDER BY o.created_at_ms "
            "LIMIT %s FOR UPDATE OF o SKIP LOCKED",
            (now_ms, now_ms, limit),
        ).fetchall()
        if rows:
            conn.execute(
                "UPDATE receipts_outbox SET lease_until_ms=%s, attempts=attempts+1 "
                "WHERE payment_id = ANY(%s)",
                (now_ms + lease_ms, [r[0] for r in rows]),
            )
        return [
            ReceiptJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10] + 1)
            for r in rows
        ]

    @_transaction
    def receipt_sent(self, payment_id: str, now_ms: int) -> None:
        self._c.execute(
            "UPDATE receipts_outbox SET state='sent', sent_at_ms=%s WHERE payment_id=%s",
            (now_ms, payment_id),
        )

    @_transaction
    def receipt_failed(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None:
        self._c.execute(
            "UPDATE receipts_outbox SET next_attempt_at_ms=%s, lease_until_ms=0, last_error=%s "
            "WHERE payment_id=%s AND state='pending'",
            (next_attempt_at_ms, error[:ERROR_CHARS_MAX], payment_id),
        )

    @_transaction
    def receipt_undeliverable(self, payment_id: str, error: str, now_ms: int) -> None:
        self._c.execute(
            "UPDATE receipts_outbox SET state='undeliverable', sent_at_ms=%s, "
            "lease_until_ms=0, last_error=%s WHERE payment_id=%s AND state='pending'",
            (now_ms, error[:ERROR_CHARS_MAX], payment_id),
        )

    @_transaction
    def receipt_states(self) -> dict[str, str]:
        """payment id -> outbox state (tests and reports)."""
        rows = self._c.execute("SELECT payment_id, state FROM receipts_outbox").fetchall()
        return {r[0]: r[1] for r in rows}

    # -- payments, refunds, disputes ---------------------------------------------------------

    @_transaction
    def get_payment(self, payment_id: str) -> Payment | None:
        row = self._c.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        return None if row is None else Payment(*row)

    @_transaction
    def list_payments(self, flt: PaymentFilter) -> list[Payment]:
        where, args = payment_filter_sql(flt, "%s")
        args.append(max(1, min(flt.limit, LIST_ROWS_MAX)))
        rows = self._c.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {where} ORDER BY payment_id LIMIT %s",
            args,
        ).fetchall()
        return [Payment(*r) for r in rows]

    @_transaction
    def refunds_of(self, payment_id: str) -> list[Refund]:
        rows = self._c.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE payment_id=%s "
            "ORDER BY requested_at_ms, refund_id",
            (payment_id,),
        ).fetchall()
        return [Refund(*r) for r in rows]

    @_transaction
    def begin_refund(
        self,
        payment_id: str,
        refund_id: str,
        amount_minor: int,
        actor: str,
        now_ms: int,
        rules: Callable[[Payment, list[Refund]], None] | None = None,
    ) -> Refund:
        """See :meth:`Store.begin_refund`; ``rules`` runs inside the transaction, on a
        payment row locked ``FOR UPDATE`` so concurrent refunds never exceed the amount."""
        conn = self._c
        row = conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id=%s FOR UPDATE",
            (payment_id,),
        ).fetchone()
        existing = self._refund(refund_id)
        if existing is not None:
            if existing.payment_id != payment_id or existing.amount_minor != amount_minor:
                raise Refused(
                    "refund_id_reused",
                    f"refund id {refund_id!r} was already used for another refund",
                )
            return existing
        if row is None:
            raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
        payment = Payment(*row)
        if rules is not None:
            rules(payment, self.refunds_of(payment_id))
        check(
            payment.refunded_minor + amount_minor <= payment.amount_minor,
            "refunds never exceed the payment amount",
        )
        cur = conn.execute(
            f"INSERT INTO refunds ({_REFUND_COLUMNS}) "
            "VALUES (%s,%s,%s,%s,'pending',%s,%s,NULL,NULL,NULL) ON CONFLICT DO NOTHING",
            (refund_id, payment_id, amount_minor, payment.currency, actor, now_ms),
        )
        if cur.rowcount != 1:  # the same id, concurrently, for another payment
            raise Refused(
                "refund_id_reused", f"refund id {refund_id!r} was already used for another refund"
            )
        conn.execute(
            "UPDATE payments SET refunded_minor=refunded_minor+%s WHERE payment_id=%s",
            (amount_minor, payment_id),
        )
        self.audit(actor, "refund.request", f"{payment_id} {refund_id} {amount_minor}", now_ms)
        refund = self._refund(refund_id)
        assert refund is not None
        return refund

    def _refund(self, refund_id: str) -> Refund | None:
        row = self._c.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE refund_id=%s", (refund_id,)
        ).fetchone()
        return None if row is None else Refund(*row)

    def _locked_refund(self, refund_id: str) -> tuple[str, Refund]:
        """A refund and its payment's terminal, the terminal row locked first (as every
        writer of that terminal's stream does), then the refund row."""
        found = self._c.execute(
            "SELECT p.terminal_id FROM refunds r JOIN payments p USING (payment_id) "
            "WHERE r.refund_id=%s",
            (refund_id,),
        ).fetchone()
        if found is None:
            raise Refused("unknown_refund", f"refund {refund_id!r} does not exist")
        self._lock_terminal(found[0])
        row = self._c.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE refund_id=%s FOR UPDATE", (refund_id,)
        ).fetchone()
        assert row is not None
        return str(found[0]), Refund(*row)

    @_transaction
    def finish_refund(self, refund_id: str, now_ms: int) -> Refund:
        conn = self._c
        terminal_id, refund = self._locked_refund(refund_id)
        if refund.state != "pending":
            return refund
        conn.execute(
            "UPDATE refunds SET state='done', processed_at_ms=%s WHERE refund_id=%s",
            (now_ms, refund_id),
        )
        record = RefundRecord(
            refund.payment_id, refund_id, Money(refund.amount_minor, refund.currency), now_ms
        )
        self.append_server_ops(terminal_id, [("refund", record.to_body())], now_ms)
        done = self._refund(refund_id)
        assert done is not None
        return done

    @_transaction
    def refuse_refund(
        self, refund_id: str, code: str, text: str, actor: str, now_ms: int
    ) -> Refund:
        conn = self._c
        _, refund = self._locked_refund(refund_id)
        if refund.state != "pending":
            return refund
        conn.execute(
            "UPDATE refunds SET state='refused', processed_at_ms=%s WHERE refund_id=%s",
            (now_ms, refund_id),
        )
        conn.execute(
            "UPDATE payments SET refunded_minor=refunded_minor-%s WHERE payment_id=%s",
            (refund.amount_minor, refund.payment_id),
        )
        detail = refund_refused_audit_detail(refund.payment_id, refund_id, code, text)
        self.audit(actor, "refund.refused", detail, now_ms)
        void_state = void_refund_refused_state(refund.payment_id, refund_id, code)
        if void_state is not None:
            self._end_void(refund.payment_id, void_state, now_ms, VOID_UNTOLD_SQL)
        refused = self._refund(refund_id)
        assert refused is not None
        return refused

    @_transaction
    def pending_refunds(self, limit: int) -> list[Refund]:
        rows = self._c.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE state='pending' "
            "ORDER BY requested_at_ms, refund_id LIMIT %s",
            (limit,),
        ).fetchall()
        return [Refund(*r) for r in rows]

    @_transaction
    def park_refund(self, refund_id: str, reason: str, actor: str, now_ms: int) -> Refund:
        _, refund = self._locked_refund(refund_id)
        if refund.state != REFUND_PENDING:
            return refund
        self._c.execute(
            "UPDATE refunds SET state='parked', last_error=%s WHERE refund_id=%s",
            (reason[:ERROR_CHARS_MAX], refund_id),
        )
        self.audit(actor, "refund.parked", f"{refund.payment_id} {refund_id} {reason}", now_ms)
        parked = self._refund(refund_id)
        assert parked is not None
        return parked

    @_transaction
    def resolve_refund(
        self, refund_id: str, action: str, actor: str, note: str | None, now_ms: int
    ) -> Refund:
        check_refund_resolve_action(action)
        _, refund = self._locked_refund(refund_id)  # locked: the state read is the one changed
        check_refund_parked(refund_id, refund.state)
        self._c.execute("UPDATE refunds SET state='pending' WHERE refund_id=%s", (refund_id,))
        return apply_refund_resolution(self, refund, action, actor, note, now_ms)

    @_transaction
    def list_refunds(self, merchant_id: str, state: str, limit: int) -> list[Refund]:
        check(state in REFUND_LIST_STATES, f"refunds are listed by state {REFUND_LIST_STATES}")
        columns = ", ".join(f"r.{c.strip()}" for c in _REFUND_COLUMNS.split(","))
        rows = self._c.execute(
            f"SELECT {columns} FROM refunds r JOIN payments p USING (payment_id) "
            "WHERE r.state=%s AND p.merchant_id=%s "
            "ORDER BY r.requested_at_ms, r.refund_id LIMIT %s",
            (state, merchant_id, max(1, min(limit, LIST_ROWS_MAX))),
        ).fetchall()
        return [Refund(*r) for r in rows]

    @_transaction
    def set_dispute(self, payment_id: str, open_: bool, actor: str, now_ms: int) -> None:
        conn = self._c
        found = conn.execute(
            "SELECT terminal_id FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        if found is None:
            raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
        self._lock_terminal(found[0])
        cur = conn.execute(
            "UPDATE payments SET dispute_open=%s WHERE payment_id=%s AND dispute_open<>%s",
            (open_, payment_id, open_),
        )
        if cur.rowcount != 1:
            return  # already in that state
        body = {"payment_id": payment_id, "open": open_, "at_ms": now_ms}
        self.append_server_ops(found[0], [("dispute", body)], now_ms)
        self.audit(actor, "dispute.open" if open_ else "dispute.close", payment_id, now_ms)

    @_transaction
    def pending_voids(self, limit: int) -> list[tuple[str, str, int]]:
        rows = self._c.execute(
            "SELECT payment_id, terminal_id, requested_at_ms FROM voids WHERE state='pending' "
            "ORDER BY requested_at_ms, payment_id LIMIT %s",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], int(r[2])) for r in rows]

    @_transaction
    def finish_void(self, payment_id: str, state: str, now_ms: int) -> str | None:
        return self._end_void(payment_id, state, now_ms, "state='pending'")

    def _end_void(self, payment_id: str, state: str, now_ms: int, ending: str) -> str | None:
        """End the void of ``payment_id`` as ``state`` if its row matches ``ending`` (an SQL
        condition on ``state``); a refusal gets its status op to the terminal. Inside the
        caller's transaction."""
        conn = self._c
        row = conn.execute(
            f"UPDATE voids SET state=%s, done_at_ms=%s WHERE payment_id=%s AND {ending} "
            "RETURNING terminal_id",
            (state, now_ms, payment_id),
        ).fetchone()
        if row is None:
            return None  # not pending (ended before): the terminal was told then
        terminal_id = str(row[0])
        payment = conn.execute(
            "SELECT status, terminal_id FROM payments WHERE payment_id=%s", (payment_id,)
        ).fetchone()
        if payment is None:
            return None
        refusal = void_refusal(
            payment_id, terminal_id, str(payment[0]), str(payment[1]), state, now_ms
        )
        if refusal is None:
            return None
        self.append_server_ops(terminal_id, [("status", refusal.to_body())], now_ms)
        return terminal_id

    # -- batches and reports -----------------------------------------------------------------

    @_transaction
    def close_batch(
        self, merchant_id: str, business_day: str, close_at_ms: int, now_ms: int
    ) -> Batch | None:
        conn = self._c
        merchant = self.get_merchant(merchant_id)
        if merchant is None:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        # A concurrent close of the same day waits on the unique key, then does nothing.
        row = conn.execute(
            "INSERT INTO batches (merchant_id, business_day, close_at_ms, closed_at_ms, "
            "currency) VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING batch_id",
            (merchant_id, business_day, close_at_ms, now_ms, merchant.currency),
        ).fetchone()
        if row is None:
            return None
        batch_id = int(row[0])
        conn.execute(
            "UPDATE payments SET batch_id=%s WHERE merchant_id=%s AND status='approved' "
            "AND batch_id IS NULL AND processed_at_ms<%s",
            (batch_id, merchant_id, close_at_ms),
        )
        conn.execute(
            "UPDATE refunds SET batch_id=%s WHERE state='done' AND batch_id IS NULL AND "
            "processed_at_ms<%s AND payment_id IN "
            "(SELECT payment_id FROM payments WHERE merchant_id=%s)",
            (batch_id, close_at_ms, merchant_id),
        )
        conn.execute(
            "UPDATE batches SET "
            "payments_count=(SELECT count(*) FROM payments WHERE batch_id=%(b)s), "
            "sales_minor=(SELECT coalesce(sum(amount_minor),0) FROM payments WHERE batch_id=%(b)s), "
            "refunds_minor=(SELECT coalesce(sum(amount_minor),0) FROM refunds WHERE batch_id=%(b)s) "
            "WHERE batch_id=%(b)s",
            {"b": batch_id},
        )
        batch = self.get_batch(batch_id)
        assert batch is not None
        return batch

    @_transaction
    def list_batches(self, merchant_id: str, limit: int) -> list[Batch]:
        rows = self._c.execute(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE merchant_id=%s "
            "ORDER BY business_day DESC LIMIT %s",
            (merchant_id, max(1, min(limit, LIST_ROWS_MAX))),
        ).fetchall()
        return [Batch(*r) for r in rows]

    @_transaction
    def get_batch(self, batch_id: int) -> Batch | None:
        row = self._c.execute(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE batch_id=%s", (batch_id,)
        ).fetchone()
        return None if row is None else Batch(*row)

    @_transaction
    def get_batch_of_day(self, merchant_id: str, business_day: str) -> Batch | None:
        row = self._c.execute(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE merchant_id=%s AND business_day=%s",
            (merchant_id, business_day),
        ).fetchone()
        return None if row is None else Batch(*row)

    @_transaction
    def last_closed_day(self, merchant_id: str) -> str | None:
        row = self._c.execute(
            "SELECT max(business_day) FROM batches WHERE merchant_id=%s", (merchant_id,)
        ).fetchone()
        return None if row is None else row[0]

    @_transaction
    def payments_between(self, merchant_id: str, from_ms: int, to_ms: int) -> list[Payment]:
        """Payments captured OR processed in [from_ms, to_ms), for reconciliation."""
        rows = self._c.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE merchant_id=%(m)s AND "
            "((captured_at_ms>=%(lo)s AND captured_at_ms<%(hi)s) OR "
            " (processed_at_ms>=%(lo)s AND processed_at_ms<%(hi)s)) "
            "ORDER BY captured_at_ms, payment_id",
            {"m": merchant_id, "lo": from_ms, "hi": to_ms},
        ).fetchall()
        return [Payment(*r) for r in rows]

    @_transaction
    def batch_payments(self, batch_id: int) -> list[Payment]:
        rows = self._c.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE batch_id=%s ORDER BY payment_id",
            (batch_id,),
        ).fetchall()
        return [Payment(*r) for r in rows]

    @_transaction
    def z_report(self, terminal_id: str, reset: bool, now_ms: int) -> dict[str, object]:
        conn = self._c
        lock = " FOR UPDATE" if reset else ""
        row = conn.execute(
            f"SELECT z_seq, z_reset_at_ms FROM terminals WHERE terminal_id=%s{lock}",
            (terminal_id,),
        ).fetchone()
        if row is None:
            raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
        z_seq, from_ms = int(row[0]), int(row[1])
        by_status = conn.execute(
            "SELECT status, channel, count(*), coalesce(sum(amount_minor),0)::bigint, "
            "coalesce(sum(refunded_minor),0)::bigint, max(currency) FROM payments "
            "WHERE terminal_id=%s AND captured_at_ms>=%s AND captured_at_ms<%s "
            "GROUP BY status, channel ORDER BY status, channel",
            (terminal_id, from_ms, now_ms + 1),
        ).fetchall()
        report = z_report_body(terminal_id, z_seq, from_ms, now_ms, reset, by_status)
        if reset:
            conn.execute(
                "INSERT INTO z_reports (terminal_id, z_seq, from_ms, to_ms, report) "
                "VALUES (%s,%s,%s,%s,%s)",
                (terminal_id, z_seq + 1, from_ms, now_ms, canonical.dumps(report).decode()),
            )
            conn.execute(
                "UPDATE terminals SET z_seq=%s, z_reset_at_ms=%s WHERE terminal_id=%s",
                (z_seq + 1, now_ms + 1, terminal_id),
            )
        return report

    @_transaction
    def audit(self, actor: str, action: str, detail: str, now_ms: int) -> None:
        self._c.execute(
            "INSERT INTO audit (at_ms, actor, action, detail) VALUES (%s,%s,%s,%s)",
            (now_ms, actor, action, detail[:2000]),
        )

    @_transaction
    def audit_log(self, limit: int = 100) -> list[tuple[int, str, str, str]]:
        rows = self._c.execute(
            "SELECT at_ms, actor, action, detail FROM audit ORDER BY id DESC LIMIT %s", (limit,)
        ).fetchall()
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    @_transaction
    def counts(self) -> dict[str, int]:
        conn = self._c
        out: dict[str, int] = {}
        for status, n in conn.execute("SELECT status, count(*) FROM payments GROUP BY status"):
            out[f"payments_status_{status}"] = int(n)
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE fwd_state='pending'), "
            "count(*) FILTER (WHERE fwd_state='error') FROM payments"
        ).fetchone()
        assert row is not None
        out["forwards_pending"], out["forwards_parked"] = int(row[0]), int(row[1])
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state='pending'), "
            "count(*) FILTER (WHERE state='sent'), "
            "count(*) FILTER (WHERE state='undeliverable') FROM receipts_outbox"
        ).fetchone()
        assert row is not None
        out["receipts_pending"], out["receipts_sent"] = int(row[0]), int(row[1])
        out["receipts_undeliverable"] = int(row[2])
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state='pending'), "
            "count(*) FILTER (WHERE state='parked') FROM refunds "
            "WHERE state IN ('pending', 'parked')"
        ).fetchone()
        assert row is not None
        out["refunds_pending"], out["refunds_parked"] = int(row[0]), int(row[1])
        # Every chain is dense from 1: the ops stored are the heads' sum (a row per
        # terminal, where count(*) would read every op).
        row = conn.execute(
            "SELECT count(*), coalesce(sum(head_seq + server_seq), 0) FROM terminals"
        ).fetchone()
        assert row is not None
        out["terminals"], out["ops"] = int(row[0]), int(row[1])
        return out


def _settings_row(s: TerminalSettings) -> tuple[object, ...]:
    return (
        s.offline_allowed,
        s.per_transaction_limit_minor,
        s.total_limit_minor,
        s.offline_entry_policy,
        s.offline_auto_delay_ms,
        s.force_offline,
    )


def _safely(callback: Callable[[str | None], None], terminal_id: str | None) -> None:
    """Call a watcher; its failure (e.g. its event loop closed) must not kill the listener."""
    try:
        callback(terminal_id)
    except Exception as exc:
        log.debug("store watcher failed: %s", exc)


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **info)
