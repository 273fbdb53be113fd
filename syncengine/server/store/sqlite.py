"""The embedded SQLite store: the default backend of ``syncengine serve``.

Rules (docs/design.md, ARCHITECTURE "Storage rules"): WAL journal, ``synchronous=FULL``
(a commit survives power loss once it returned), explicit ``BEGIN IMMEDIATE`` so a
transaction takes the write lock up front instead of failing half-way, and one
:meth:`SqliteStore.atomic` helper that every write goes through. Nested ``atomic()`` uses
savepoints. One connection, used from one thread at a time (:class:`StoreRunner` gives it
a single thread).

Ops are stored as their canonical bytes and their digest; every op read back is rebuilt
and its digest checked, so on-disk corruption is detected rather than served.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from syncengine.core import canonical
from syncengine.core.bodies import Grant, RefundRecord, StatusChange
from syncengine.core.errors import ProtocolError, Refused, StorageError, check
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.core.ops import GENESIS, Op, server_origin
from syncengine.files import lock_exclusive
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

BUSY_TIMEOUT_MS = 10_000
# Rows bound into one multi-row INSERT at most (see _BulkInsert); 100 x 15 columns stays
# far below SQLite's 32,766 bound variables per statement.
INSERT_ROWS_PER_STATEMENT = 100
# Checkpoints (copying the WAL back into the database file, with its own fsync) run on a
# background thread after each commit, so a commit only appends to the WAL. Should that
# thread fall behind, the writer checkpoints by itself once the WAL holds this many pages
# (64 MiB at 4 KiB pages): the WAL stays bounded either way.
WAL_AUTOCHECKPOINT_PAGES = 16_384
# At most this long between two background checkpoints while the store is idle.
CHECKPOINT_IDLE_INTERVAL_S = 1.0
# At least this long between two background checkpoints: many small commits (a herd of
# terminals reconnecting) share one checkpoint and its fsync instead of one each.
CHECKPOINT_MIN_INTERVAL_S = 0.05
# After a checkpoint the WAL file is truncated back to at most this size.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE merchants (
        merchant_id TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        timezone TEXT NOT NULL DEFAULT 'UTC',
        batch_close_local TEXT NOT NULL DEFAULT '23:00',
        standalone_allowed INTEGER NOT NULL DEFAULT 0,
        liability_accepted_by TEXT,
        liability_accepted_at_ms INTEGER,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER
    );
    CREATE TABLE enrollment_codes (
        code_hash TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        terminal_id TEXT,
        device_class TEXT,
        created_by TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        used_at_ms INTEGER,
        used_by_terminal TEXT
    );
    CREATE TABLE terminals (
        terminal_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        public_key BLOB NOT NULL,
        device_class TEXT NOT NULL,
        enrolled_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER,
        head_seq INTEGER NOT NULL DEFAULT 0,
        head_digest TEXT NOT NULL,
        server_seq INTEGER NOT NULL DEFAULT 0,
        server_digest TEXT NOT NULL,
        server_hlc_wall_ms INTEGER NOT NULL DEFAULT 0,
        server_hlc_logical INTEGER NOT NULL DEFAULT 0,
        mode TEXT,
        mode_at_ms INTEGER,
        last_seen_ms INTEGER,
        offline_allowed INTEGER NOT NULL,
        per_transaction_limit_minor INTEGER NOT NULL,
        total_limit_minor INTEGER NOT NULL,
        offline_entry_policy TEXT NOT NULL,
        offline_auto_delay_ms INTEGER NOT NULL,
        force_offline INTEGER NOT NULL,
        fwd_lease_owner TEXT,
        fwd_lease_until_ms INTEGER NOT NULL DEFAULT 0,
        z_seq INTEGER NOT NULL DEFAULT 0,
        z_reset_at_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE ops (
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data BLOB NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (origin, seq)
    ) WITHOUT ROWID;
    CREATE TABLE payments (
        payment_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        capture_seq INTEGER NOT NULL,
        amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
        currency TEXT NOT NULL,
        channel TEXT NOT NULL,
        brand TEXT NOT NULL,
        last4 TEXT NOT NULL,
        entry_method TEXT NOT NULL,
        sealed TEXT NOT NULL,
        captured_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        received_at_ms INTEGER NOT NULL,
        device_class TEXT NOT NULL,
        email TEXT,
        status TEXT NOT NULL DEFAULT 'captured',
        code TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        processor_ref TEXT,
        processed_at_ms INTEGER,
        fwd_state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        batch_id INTEGER,
        refunded_minor INTEGER NOT NULL DEFAULT 0,
        dispute_open INTEGER NOT NULL DEFAULT 0,
        UNIQUE (terminal_id, capture_seq)
    );
    CREATE INDEX payments_fwd ON payments (terminal_id, fwd_state, capture_seq);
    CREATE INDEX payments_merchant_captured ON payments (merchant_id, captured_at_ms);
    CREATE INDEX payments_merchant_processed ON payments (merchant_id, processed_at_ms);
    CREATE TABLE refunds (
        refund_id TEXT PRIMARY KEY,
        payment_id TEXT NOT NULL REFERENCES payments(payment_id),
        amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
        currency TEXT NOT NULL,
        state TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at_ms INTEGER NOT NULL,
        processed_at_ms INTEGER,
        batch_id INTEGER
    );
    CREATE TABLE voids (
        payment_id TEXT PRIMARY KEY,
        terminal_id TEXT NOT NULL,
        requested_at_ms INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        done_at_ms INTEGER
    );
    CREATE TABLE receipts_outbox (
        payment_id TEXT PRIMARY KEY REFERENCES payments(payment_id),
        email TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
        lease_until_ms INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL,
        sent_at_ms INTEGER,
        last_error TEXT
    );
    CREATE TABLE batches (
        batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
        merchant_id TEXT NOT NULL,
        business_day TEXT NOT NULL,
        close_at_ms INTEGER NOT NULL,
        closed_at_ms INTEGER NOT NULL,
        payments_count INTEGER NOT NULL DEFAULT 0,
        sales_minor INTEGER NOT NULL DEFAULT 0,
        refunds_minor INTEGER NOT NULL DEFAULT 0,
        currency TEXT NOT NULL,
        UNIQUE (merchant_id, business_day)
    );
    CREATE TABLE z_reports (
        terminal_id TEXT NOT NULL,
        z_seq INTEGER NOT NULL,
        from_ms INTEGER NOT NULL,
        to_ms INTEGER NOT NULL,
        report TEXT NOT NULL,
        PRIMARY KEY (terminal_id, z_seq)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    # 2: the merchant-wide offline budget (escrow): the budget, and each terminal's
    # cumulative grant (what its last ``grant`` op said)
    """
    ALTER TABLE merchants ADD COLUMN offline_budget_minor INTEGER;
    CREATE TABLE escrow_grants (
        terminal_id TEXT PRIMARY KEY REFERENCES terminals(terminal_id),
        merchant_id TEXT NOT NULL REFERENCES merchants(merchant_id),
        granted_minor INTEGER NOT NULL CHECK (granted_minor >= 0),
        updated_at_ms INTEGER NOT NULL
    );
    CREATE INDEX payments_terminal_channel ON payments (terminal_id, channel, fwd_state)
    """,
    # 3: the sealed card data is kept once, in the capture op (ops.data); the payments row
    # no longer carries a copy of it (it was a third of every row's bytes)
    """
    ALTER TABLE payments DROP COLUMN sealed
    """,
    # 4: a payment enters the processed-time index when it is processed, not at capture
    # (every query on it compares processed_at_ms, which implies NOT NULL); batch contents
    # are found by index instead of a scan of every payment
    """
    DROP INDEX payments_merchant_processed;
    CREATE INDEX payments_merchant_processed ON payments (merchant_id, processed_at_ms)
        WHERE processed_at_ms IS NOT NULL;
    CREATE INDEX payments_batch ON payments (batch_id) WHERE batch_id IS NOT NULL
    """,
    # 5: each terminal's offline totals for the escrow are kept as running sums, updated in
    # the transactions that change them, instead of summing its whole history every few
    # seconds through an index every capture had to update
    """
    ALTER TABLE terminals ADD COLUMN offline_captured_minor INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE terminals ADD COLUMN offline_settled_minor INTEGER NOT NULL DEFAULT 0;
    UPDATE terminals SET
        offline_captured_minor = (SELECT coalesce(sum(p.amount_minor), 0) FROM payments p
            WHERE p.terminal_id = terminals.terminal_id AND p.channel = 'offline'),
        offline_settled_minor = (SELECT coalesce(sum(p.amount_minor), 0) FROM payments p
            WHERE p.terminal_id = terminals.terminal_id AND p.channel = 'offline'
            AND p.status IN ('approved', 'offline_declined', 'expired'));
    DROP INDEX payments_terminal_channel
    """,
    # 6: switches every process of the service shares (the maintenance switch)
    """
    CREATE TABLE service_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL
    )
    """,
    # 7: parked payments (they need a person) are listed from an index that holds them only
    """
    CREATE INDEX payments_parked ON payments (merchant_id, payment_id) WHERE fwd_state='error'
    """,
    # 8: the periodic jobs read what is due from indexes that hold only what may become due
    # (the expiry sweep: never attempted payments with a deadline; receipts, refunds and
    # voids: the pending ones), not by scanning every payment or receipt ever made
    """
    CREATE INDEX payments_expiry ON payments (expires_at_ms)
        WHERE fwd_state='pending' AND attempts=0 AND expires_at_ms IS NOT NULL;
    CREATE INDEX receipts_outbox_pending ON receipts_outbox (created_at_ms)
        WHERE state='pending';
    CREATE INDEX refunds_pending ON refunds (requested_at_ms) WHERE state='pending';
    CREATE INDEX voids_pending ON voids (requested_at_ms) WHERE state='pending'
    """,
    # 9: parked refunds (they need a person) are listed from an index that holds them only
    """
    CREATE INDEX refunds_parked ON refunds (requested_at_ms) WHERE state='parked'
    """,
    # 10: why a refund was parked, on the refund (it was in the audit table only)
    """
    ALTER TABLE refunds ADD COLUMN last_error TEXT
    """,
)

# What the periodic jobs read; each is served by a partial index (migration 8).
EXPIRY_DUE_SQL = (
    "SELECT payment_id, terminal_id FROM payments WHERE fwd_state='pending' "
    "AND attempts=0 AND expires_at_ms IS NOT NULL AND expires_at_ms<=? "
    "ORDER BY expires_at_ms LIMIT ?"
)
RECEIPTS_DUE_SQL = (
    "SELECT o.payment_id, o.email, p.merchant_id, p.amount_minor, p.currency, p.brand, "
    "p.last4, p.status, p.code, p.processed_at_ms, o.attempts FROM receipts_outbox o "
    "JOIN payments p USING (payment_id) WHERE o.state='pending' AND "
    "o.next_attempt_at_ms<=? AND o.lease_until_ms<=? ORDER BY o.created_at_ms LIMIT ?"
)

_PAYMENT_COLUMNS = (
    "payment_id, merchant_id, terminal_id, capture_seq, amount_minor, currency, channel, "
    "brand, last4, entry_method, "
    # The sealed card lives in the capture op only: read it from there.
    "(SELECT json_extract(CAST(o.data AS TEXT), '$[5].card.sealed') FROM ops o "
    "WHERE o.origin = payments.terminal_id AND o.seq = payments.capture_seq), "
    "captured_at_ms, expires_at_ms, received_at_ms, "
    "device_class, email, status, code, message, processor_ref, processed_at_ms, fwd_state, "
    "attempts, next_attempt_at_ms, last_error, batch_id, refunded_minor, dispute_open"
)


class _BulkInsert:
    """``INSERT`` of many rows with multi-row ``VALUES`` lists.

    ``executemany`` binds and steps one row at a time and gives the GIL up and takes it
    back around every row; a multi-row ``VALUES`` list does a whole chunk in one step (on
    the drain path ~2 us an op less, and no GIL hand-off per row). Rows go in chunks of
    :data:`INSERT_ROWS_PER_STATEMENT`, the rest in chunks of half that, a quarter ... down
    to one (100, 50, 25, 12, 6, 3, 1: a herd terminal's 50 rows are one statement): seven
    statement texts per table, all in the connection's statement cache.
    """

    def __init__(self, into: str, width: int, tail: str) -> None:
        row = "(" + ",".join("?" * width) + ")"
        self.sizes = [INSERT_ROWS_PER_STATEMENT]
        while self.sizes[-1] > 1:
            self.sizes.append(self.sizes[-1] // 2)
        self.sql = {
            n: f"INSERT INTO {into} VALUES {','.join([row] * n)} {tail}" for n in self.sizes
        }

    def run(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        start, left = 0, len(rows)
        for size in self.sizes:
            while left >= size:
                chunk = rows[start : start + size]
                conn.execute(self.sql[size], list(itertools.chain.from_iterable(chunk)))
                start, left = start + size, left - size


_INSERT_PAYMENT = _BulkInsert(
    "payments (payment_id, merchant_id, terminal_id, capture_seq, amount_minor, currency, "
    "channel, brand, last4, entry_method, captured_at_ms, expires_at_ms, received_at_ms, "
    "device_class, email)",
    15,
    "ON CONFLICT DO NOTHING",
)
_INSERT_OP = _BulkInsert("ops (origin, seq, kind, data, digest)", 5, "ON CONFLICT DO NOTHING")
_REFUND_COLUMNS = (
    "refund_id, payment_id, amount_minor, currency, state, requested_by, requested_at_ms, "
    "processed_at_ms, batch_id, last_error"
)
_TERMINAL_SETTINGS_COLUMNS = (
    "offline_allowed, per_transaction_limit_minor, total_limit_minor, offline_entry_policy, "
    "offline_auto_delay_ms, force_offline"
)


def _payment(row: tuple[Any, ...]) -> Payment:
    values = list(row)
    values[-1] = bool(values[-1])
    return Payment(*values)


class _Checkpointer:
    """Runs ``wal_checkpoint(PASSIVE)`` on its own connection and thread.

    A passive checkpoint never blocks the writer (it copies what no reader still needs and
    stops), and SQLite makes it crash-safe: the WAL stays authoritative until the database
    file is synced. Running it here takes the database file's writes and fsync out of the
    commit path; SQLite releases the GIL while it works, so it runs beside the writer.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._due = threading.Event()
        self._stop = False
        self.checkpoints = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called after each commit: a checkpoint is due."""
        self._due.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            while not self._stop:
                self._due.wait(CHECKPOINT_IDLE_INTERVAL_S)
                self._due.clear()
                if self._stop:
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error:
                    # Busy or out of space: the writer's own autocheckpoint is the backstop.
                    self.failures += 1
                if not self._stop:
                    time.sleep(CHECKPOINT_MIN_INTERVAL_S)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop = True
        self._due.set()
        self._thread.join()


def lock_single_process(path: Path) -> IO[str]:
    """Take the lock that makes one process the only user of the store at ``path``.

    An exclusive ``flock`` on ``<path>.lock``, held while the returned file stays open
    (closing it, or the process ending, releases it). Raises :class:`StorageError` if
    another process holds it.
    """
    handle = lock_exclusive(path.with_name(path.name + ".lock"))
    if handle is None:
        raise StorageError(
            f"{path} is in use by another server process; a SQLite store is served "
            "by one process (use PostgreSQL for several)"
        )
    return handle


class SqliteStore:
    """The :class:`~syncengine.server.store.Store` on one SQLite file."""

    def __init__(self, path: str | Path, *, background_checkpoints: bool = True) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._depth = 0
        self._lock_handle: IO[str] | None = None
        self._background_checkpoints = background_checkpoints
        self._checkpointer: _Checkpointer | None = None
        self._reader: sqlite3.Connection | None = None  # counts() only, any thread
        self._reader_lock = threading.Lock()

    # -- connection and transactions -------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("the store is not open; call open() first")
        return self._conn

    def open(self) -> None:
        """Open the file, apply the storage rules and pending migrations."""
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_single_process()
        try:
            self._open_locked()
        except BaseException as exc:
            self.close()  # the connection, the checkpointer, the lock
            if isinstance(exc, sqlite3.Error):
                raise StorageError(
                    f"cannot open the store {self.path}: {exc} (is it a server database? "
                    "restore it from a backup, or move it away to start empty)"
                ) from exc
            raise

    def _open_locked(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (sqlite3's implicit
        # transactions would start late, with a deferred lock that can fail mid-way).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn  # closed by close() if anything below fails
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"SQLite refused WAL mode (got {mode}); use a local filesystem")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        if self._background_checkpoints:
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        self._migrate()
        if self._background_checkpoints:
            self._checkpointer = _Checkpointer(self.path)
        # One process serves a SQLite file (the lock above), so every lease in it was held
        # by a process that is gone: free them now rather than wait for them to expire.
        with self.atomic() as c:
            c.execute("UPDATE terminals SET fwd_lease_owner=NULL, fwd_lease_until_ms=0")
            c.execute("UPDATE receipts_outbox SET lease_until_ms=0 WHERE state='pending'")

    def _lock_single_process(self) -> None:
        self._lock_handle = lock_single_process(self.path)

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_handle is not None:
            self._lock_handle.close()  # releases the flock
            self._lock_handle = None

    def pragmas(self) -> dict[str, object]:
        """The connection settings that matter for durability (tests check them)."""
        return {
            name: self.conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE``), or a savepoint when nested.

        Any exception rolls back everything done inside and propagates.
        """
        conn = self.conn
        if self._depth == 0:
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute(f"SAVEPOINT sp{self._depth}")
        self._depth += 1
        try:
            yield conn
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                # rollback() is harmless if SQLite already rolled back (e.g. disk full).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.execute(f"ROLLBACK TO sp{self._depth}")
                conn.execute(f"RELEASE sp{self._depth}")
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"commit failed, nothing was written: {exc}") from exc
            if self._checkpointer is not None:
                self._checkpointer.committed()
        else:
            conn.execute(f"RELEASE sp{self._depth}")

    @contextmanager
    def group(self) -> Iterator[None]:
        """One transaction around many calls (the server's group commit of frames)."""
        with self.atomic():
            yield

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def _migrate(self) -> None:
        conn = self.conn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        with self.atomic():
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > len(MIGRATIONS):
                raise StorageError(
                    f"database schema v{current} is newer than this server "
                    f"(v{len(MIGRATIONS)}); upgrade syncengine"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def schema_version(self) -> int:
        row = self.conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    # -- merchants, keys, enrollment -------------------------------------------------------

    def ensure_merchant(self, merchant_id: str, currency: str, now_ms: int) -> bool:
        Money.zero(currency)  # validates the currency
        with self.atomic() as conn:
            cur = conn.execute(
                "INSERT INTO merchants (merchant_id, currency, created_at_ms) VALUES (?,?,?) "
                "ON CONFLICT DO NOTHING",
                (merchant_id, currency, now_ms),
            )
            return cur.rowcount == 1

    def get_merchant(self, merchant_id: str) -> MerchantInfo | None:
        row = self.conn.execute(
            "SELECT merchant_id, currency, timezone, batch_close_local, standalone_allowed, "
            "liability_accepted_by, liability_accepted_at_ms, offline_budget_minor "
            "FROM merchants WHERE merchant_id=?",
            (merchant_id,),
        ).fetchone()
        if row is None:
            return None
        return MerchantInfo(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])

    def list_merchants(self) -> list[MerchantInfo]:
        ids = [r[0] for r in self.conn.execute("SELECT merchant_id FROM merchants")]
        return [m for m in (self.get_merchant(i) for i in ids) if m is not None]

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
            changes["standalone_allowed"] = int(standalone_allowed)
        if liability_accepted_by is not None:
            changes["liability_accepted_by"] = liability_accepted_by
            changes["liability_accepted_at_ms"] = liability_accepted_at_ms
        touched: list[str] = []
        with self.atomic() as conn:
            before = self.get_merchant(merchant_id)
            if before is None:
                raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
            if standalone_allowed is False:
                touched.extend(self._offline_off_everywhere(merchant_id, actor, now_ms))
            if changes:
                sets = ", ".join(f"{k}=?" for k in changes)
                conn.execute(
                    f"UPDATE merchants SET {sets} WHERE merchant_id=?",
                    (*changes.values(), merchant_id),
                )
                self.audit(actor, "merchant.update", canonical.dumps(changes).decode(), now_ms)
            if standalone_allowed is not None and standalone_allowed != before.standalone_allowed:
                for (terminal_id,) in conn.execute(
                    "SELECT terminal_id FROM terminals WHERE merchant_id=? AND revoked_at_ms IS NULL",
                    (merchant_id,),
                ).fetchall():
                    body = {"key": "standalone_allowed", "value": standalone_allowed}
                    self.append_server_ops(terminal_id, [("setting", body)], now_ms)
                    touched.append(terminal_id)
        return sorted(set(touched))

    def _offline_off_everywhere(self, merchant_id: str, actor: str, now_ms: int) -> list[str]:
        """R2: offline is allowed only where standalone is; in the transaction that turns
        standalone off, offline is turned off on every terminal of the merchant first."""
        rows = self.conn.execute(
            "SELECT terminal_id FROM terminals WHERE merchant_id=? AND offline_allowed=1 "
            "ORDER BY terminal_id",
            (merchant_id,),
        ).fetchall()
        return offline_off(self, [terminal_id for (terminal_id,) in rows], actor, now_ms)

    def count_api_keys(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM api_keys").fetchone()[0])

    def get_maintenance(self) -> bool:
        row = self.conn.execute(
            "SELECT value FROM service_state WHERE name='maintenance'"
        ).fetchone()
        return row is not None and row[0] == "on"

    def set_maintenance(self, enabled: bool, actor: str, now_ms: int) -> None:
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO service_state (name, value, updated_at_ms) VALUES ('maintenance',?,?) "
                "ON CONFLICT (name) DO UPDATE SET value=excluded.value, "
                "updated_at_ms=excluded.updated_at_ms",
                ("on" if enabled else "off", now_ms),
            )
            self.audit(actor, "maintenance", str(enabled), now_ms)

    def create_first_api_key(
        self, key_hash: str, key_id: str, merchant_id: str, role: Role, name: str, now_ms: int
    ) -> bool:
        with self.atomic() as conn:  # BEGIN IMMEDIATE: the write lock is taken up front
            if conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None:
                return False
            self.create_api_key(key_hash, key_id, merchant_id, role, name, now_ms)
            return True

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
        with self.atomic() as conn:  # BEGIN IMMEDIATE: the count and the insert are one
            if live_max is not None:
                refuse_too_many_keys(self.count_live_api_keys(merchant_id), live_max)
            conn.execute(
                "INSERT INTO api_keys (key_hash, key_id, merchant_id, role, name, created_at_ms) "
                "VALUES (?,?,?,?,?,?)",
                (key_hash, key_id, merchant_id, role.value, name, now_ms),
            )
        return ApiKey(key_id, merchant_id, role, name)

    def get_api_key(self, key_hash: str) -> ApiKey | None:
        row = self.conn.execute(
            "SELECT key_id, merchant_id, role, name FROM api_keys "
            "WHERE key_hash=? AND revoked_at_ms IS NULL",
            (key_hash,),
        ).fetchone()
        return None if row is None else ApiKey(row[0], row[1], Role(row[2]), row[3])

    def count_live_api_keys(self, merchant_id: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM api_keys WHERE merchant_id=? AND revoked_at_ms IS NULL",
            (merchant_id,),
        ).fetchone()
        return int(row[0])

    def list_api_keys(self, merchant_id: str, limit: int) -> list[ApiKeyInfo]:
        rows = self.conn.execute(API_KEYS_LIST_SQL.replace("%s", "?"), (merchant_id, limit))
        return [ApiKeyInfo(r[0], Role(r[1]), r[2], int(r[3]), r[4]) for r in rows]

    def revoke_api_key(self, merchant_id: str, key_id: str, actor: str, now_ms: int) -> str:
        with self.atomic() as conn:  # BEGIN IMMEDIATE: one revoke at a time
            row = conn.execute(
                "SELECT role, revoked_at_ms FROM api_keys WHERE merchant_id=? AND key_id=?",
                (merchant_id, key_id),
            ).fetchone()
            if row is None:
                return REVOKE_UNKNOWN
            if row[1] is not None:
                return REVOKE_ALREADY
            if row[0] == Role.OWNER.value:
                owners = conn.execute(
                    "SELECT count(*) FROM api_keys WHERE merchant_id=? AND role=? "
                    "AND revoked_at_ms IS NULL",
                    (merchant_id, Role.OWNER.value),
                ).fetchone()
                if int(owners[0]) <= 1:
                    return REVOKE_LAST_OWNER
            conn.execute(
                "UPDATE api_keys SET revoked_at_ms=? WHERE merchant_id=? AND key_id=?",
                (now_ms, merchant_id, key_id),
            )
            self.audit(actor, "api_key.revoke", key_id, now_ms)
            return REVOKED

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
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO enrollment_codes (code_hash, merchant_id, terminal_id, device_class, "
                "created_by, created_at_ms, expires_at_ms) VALUES (?,?,?,?,?,?,?)",
                (
                    code_hash,
                    merchant_id,
                    terminal_id,
                    device_class,
                    created_by,
                    now_ms,
                    expires_at_ms,
                ),
            )

    def enroll(
        self,
        code_hash: str,
        terminal_id: str,
        public_key: bytes,
        device_class: str,
        settings: TerminalSettings,
        now_ms: int,
    ) -> TerminalInfo:
        with self.atomic() as conn:
            code = conn.execute(
                "SELECT merchant_id, terminal_id, device_class, expires_at_ms, used_at_ms, "
                "used_by_terminal FROM enrollment_codes WHERE code_hash=?",
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
            if existing is not None:
                raise refuse_terminal_exists(terminal_id)
            conn.execute(
                f"INSERT INTO terminals (terminal_id, merchant_id, public_key, device_class, "
                f"enrolled_at_ms, head_digest, server_digest, {_TERMINAL_SETTINGS_COLUMNS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    terminal_id,
                    merchant_id,
                    public_key,
                    device_class,
                    now_ms,
                    GENESIS,
                    GENESIS,
                    *self._settings_row(settings),
                ),
            )
            conn.execute(
                "UPDATE enrollment_codes SET used_at_ms=?, used_by_terminal=? WHERE code_hash=?",
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

    @staticmethod
    def _settings_row(s: TerminalSettings) -> tuple[object, ...]:
        return (
            int(s.offline_allowed),
            s.per_transaction_limit_minor,
            s.total_limit_minor,
            s.offline_entry_policy,
            s.offline_auto_delay_ms,
            int(s.force_offline),
        )

    def load_terminal(self, terminal_id: str) -> TerminalInfo | None:
        row = self.conn.execute(
            "SELECT terminal_id, merchant_id, public_key, device_class, revoked_at_ms, head_seq, "
            "head_digest, server_seq FROM terminals WHERE terminal_id=?",
            (terminal_id,),
        ).fetchone()
        if row is None:
            return None
        return TerminalInfo(
            row[0], row[1], bytes(row[2]), row[3], row[4] is None, row[5], row[6], row[7]
        )

    def list_terminals(
        self, merchant_id: str, after: str | None = None, limit: int = LIST_ROWS_MAX
    ) -> list[dict[str, object]]:
        rows = self.conn.execute(
            "SELECT t.terminal_id, t.device_class, t.enrolled_at_ms, t.revoked_at_ms, t.head_seq, "
            "t.server_seq, t.mode, t.mode_at_ms, t.last_seen_ms, "
            "(SELECT count(*) FROM payments p WHERE p.terminal_id=t.terminal_id "
            " AND p.fwd_state='pending') FROM terminals t WHERE t.merchant_id=? "
            "AND t.terminal_id>? ORDER BY t.terminal_id LIMIT ?",
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

    def revoke_terminal(
        self, merchant_id: str, terminal_id: str, actor: str, now_ms: int
    ) -> tuple[int, bool] | None:
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT revoked_at_ms FROM terminals WHERE terminal_id=? AND merchant_id=?",
                (terminal_id, merchant_id),
            ).fetchone()
            if row is None or row[0] is not None:
                return None if row is None else (int(row[0]), False)
            conn.execute(
                "UPDATE terminals SET revoked_at_ms=? WHERE terminal_id=?", (now_ms, terminal_id)
            )
            self.audit(actor, "terminal.revoke", terminal_id, now_ms)
            return now_ms, True

    def get_terminal_settings(self, terminal_id: str) -> TerminalSettings | None:
        row = self.conn.execute(
            f"SELECT {_TERMINAL_SETTINGS_COLUMNS} FROM terminals WHERE terminal_id=?",
            (terminal_id,),
        ).fetchone()
        if row is None:
            return None
        return TerminalSettings(bool(row[0]), row[1], row[2], row[3], row[4], bool(row[5]))

    def update_terminal_settings(
        self,
        terminal_id: str,
        settings: TerminalSettings,
        actor: str,
        now_ms: int,
        pressed: frozenset[str] = frozenset(),
    ) -> list[Op]:
        with self.atomic() as conn:
            before = self.get_terminal_settings(terminal_id)
            info = self.load_terminal(terminal_id)
            if before is None or info is None:
                raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
            merchant = self.get_merchant(info.merchant_id)
            assert merchant is not None
            changed = settings.setting_changes(
                before, merchant.currency, merchant.standalone_allowed, pressed
            )
            conn.execute(
                "UPDATE terminals SET offline_allowed=?, per_transaction_limit_minor=?, "
                "total_limit_minor=?, offline_entry_policy=?, offline_auto_delay_ms=?, "
                "force_offline=? WHERE terminal_id=?",
                (*self._settings_row(settings), terminal_id),
            )
            for body in changed:
                self.audit(actor, "terminal.setting", f"{terminal_id} {body}", now_ms)
            return self.append_server_ops(terminal_id, [("setting", b) for b in changed], now_ms)

    # -- merchant-wide offline budget (escrow) ---------------------------------------------

    def set_offline_budget(
        self, merchant_id: str, budget_minor: int | None, actor: str, now_ms: int
    ) -> None:
        check(budget_minor is None or budget_minor >= 0, "a budget is not negative")
        with self.atomic() as conn:
            cur = conn.execute(
                "UPDATE merchants SET offline_budget_minor=? WHERE merchant_id=?",
                (budget_minor, merchant_id),
            )
            if cur.rowcount != 1:
                raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
            self.audit(actor, "merchant.offline_budget", str(budget_minor), now_ms)

    def escrow_state(self, merchant_id: str, now_ms: int | None = None) -> EscrowState:
        merchant = self.get_merchant(merchant_id)
        if merchant is None:
            raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
        rows = self.conn.execute(
            "SELECT t.terminal_id, coalesce(g.granted_minor, 0), t.offline_captured_minor, "
            " t.offline_settled_minor, t.revoked_at_ms IS NULL AND t.offline_allowed=1, "
            " t.last_seen_ms, t.revoked_at_ms IS NOT NULL "
            "FROM terminals t LEFT JOIN escrow_grants g ON g.terminal_id=t.terminal_id "
            "WHERE t.merchant_id=? ORDER BY t.terminal_id",
            (merchant_id,),
        ).fetchall()
        terminals = tuple(
            TerminalEscrow(r[0], int(r[1]), int(r[2]), int(r[3]), bool(r[4]), r[5], bool(r[6]))
            for r in rows
        )
        row = self.conn.execute(
            "SELECT value FROM service_state WHERE name='restored_at'"
        ).fetchone()
        held = restore_hold(terminals, None if row is None else int(row[0]), now_ms)
        return EscrowState(
            merchant_id, merchant.currency, merchant.offline_budget_minor, terminals, held
        )

    def mark_restored(self, now_ms: int) -> None:
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO service_state (name, value, updated_at_ms) VALUES ('restored_at',?,?) "
                "ON CONFLICT (name) DO UPDATE SET value=excluded.value, "
                "updated_at_ms=excluded.updated_at_ms",
                (str(now_ms), now_ms),
            )
            self.audit("syncengine restore", "restored", str(now_ms), now_ms)

    def grant_budget(
        self,
        merchant_id: str,
        plan: Callable[[EscrowState], dict[str, int]],
        now_ms: int,
    ) -> list[str]:
        with self.atomic() as conn:
            state = self.escrow_state(merchant_id, now_ms)
            grants = plan(state)
            if not grants:
                return []
            known = {t.terminal_id: t for t in state.terminals}
            for terminal_id, total_minor in sorted(grants.items()):
                before = known.get(terminal_id)
                check(before is not None, f"a grant for a terminal of {merchant_id}")
                assert before is not None
                check(total_minor > before.granted_minor, "a grant only grows")
                conn.execute(
                    "INSERT INTO escrow_grants (terminal_id, merchant_id, granted_minor, "
                    "updated_at_ms) VALUES (?,?,?,?) ON CONFLICT (terminal_id) DO UPDATE SET "
                    "granted_minor=excluded.granted_minor, updated_at_ms=excluded.updated_at_ms",
                    (terminal_id, merchant_id, total_minor, now_ms),
                )
                body = Grant(Money(total_minor, state.currency), now_ms).to_body()
                self.append_server_ops(terminal_id, [("grant", body)], now_ms)
            return sorted(grants)

    # -- merge -----------------------------------------------------------------------------

    def load_chain(self, origin: str, seq_lo: int, seq_hi: int) -> ChainView:
        conn = self.conn
        if origin.startswith("server/"):
            row = conn.execute(
                "SELECT server_seq, server_digest FROM terminals WHERE terminal_id=?",
                (origin.removeprefix("server/"),),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT head_seq, head_digest FROM terminals WHERE terminal_id=?", (origin,)
            ).fetchone()
        head_seq, head_digest = (0, GENESIS) if row is None else (row[0], row[1])
        digests: dict[int, str] = {}
        if seq_lo <= min(seq_hi, head_seq):
            digests = dict(
                conn.execute(
                    "SELECT seq, digest FROM ops WHERE origin=? AND seq BETWEEN ? AND ?",
                    (origin, seq_lo, min(seq_hi, head_seq)),
                ).fetchall()
            )
        return ChainView(head_seq, head_digest, digests)

    def merge_batch(self, batch: MergeBatch) -> BatchStored | HeadMoved:
        check(len(batch.ops) > 0, "a merge batch carries at least one new op")
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT head_seq, head_digest, revoked_at_ms FROM terminals WHERE terminal_id=?",
                (batch.terminal_id,),
            ).fetchone()
            check(row is not None, "merge batches come from enrolled terminals")
            if row[2] is not None:  # revoked while its session lived (here or elsewhere)
                raise Refused("not_enrolled", TERMINAL_REVOKED_TEXT)
            if (row[0], row[1]) != (batch.expected_head_seq, batch.expected_head_digest):
                return HeadMoved(row[0])
            _INSERT_OP.run(
                conn,
                [(op.origin, op.seq, op.kind, op.canonical_bytes(), op.digest) for op in batch.ops],
            )
            if batch.captures:
                before = conn.total_changes
                _INSERT_PAYMENT.run(
                    conn,
                    [
                        (
                            c.payment_id,
                            batch.merchant_id,
                            batch.terminal_id,
                            seq,
                            c.amount.minor,
                            c.amount.currency,
                            c.channel,
                            c.card.brand,
                            c.card.last4,
                            c.card.entry_method,
                            c.captured_at_ms,
                            c.expires_at_ms,
                            batch.received_at_ms,
                            c.device_class,
                            c.email,
                        )
                        for seq, c in batch.captures
                    ],
                )
                if conn.total_changes - before != len(batch.captures):
                    # Rolled back by atomic(): nothing of the batch is stored.
                    raise ProtocolError(
                        "a payment id in this batch is already stored under another op; "
                        "payment ids must be unique"
                    )
            written = 0
            if batch.expired:
                written = len(self._finalize(batch.terminal_id, list(batch.expired), None))
            if batch.voids:
                conn.executemany(
                    "INSERT INTO voids (payment_id, terminal_id, requested_at_ms) VALUES (?,?,?) "
                    "ON CONFLICT DO NOTHING",
                    [(v.payment_id, batch.terminal_id, v.at_ms) for v in batch.voids],
                )
            mode = batch.last_mode
            offline_minor = sum(
                c.amount.minor for _, c in batch.captures if c.channel == OFFLINE_CHANNEL
            )
            conn.execute(
                "UPDATE terminals SET head_seq=?, head_digest=?, last_seen_ms=?, "
                "mode=coalesce(?, mode), mode_at_ms=coalesce(?, mode_at_ms), "
                "offline_captured_minor=offline_captured_minor+? WHERE terminal_id=?",
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

    def mark_seen(self, terminal_id: str, now_ms: int) -> bool:
        with self.atomic() as conn:
            cur = conn.execute(
                "UPDATE terminals SET last_seen_ms=? WHERE terminal_id=? "
                "AND coalesce(last_seen_ms, -1) < (SELECT CAST(value AS INTEGER) "
                "FROM service_state WHERE name='restored_at')",
                (now_ms, terminal_id),
            )
            return cur.rowcount == 1

    def load_ops(self, origin: str, after_seq: int, ops_max: int) -> tuple[list[Op], bool]:
        rows = self.conn.execute(
            "SELECT data, digest FROM ops WHERE origin=? AND seq>? ORDER BY seq LIMIT ?",
            (origin, after_seq, ops_max + 1),
        ).fetchall()
        ops = [op_from_row(bytes(r[0]), r[1]) for r in rows[:ops_max]]
        for i, op in enumerate(ops):
            check(op.seq == after_seq + 1 + i, f"stored chain of {origin} is dense")
        return ops, len(rows) > ops_max

    def append_server_ops(
        self, terminal_id: str, bodies: list[tuple[str, dict[str, object]]], now_ms: int
    ) -> list[Op]:
        if not bodies:
            return []
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT server_seq, server_digest, server_hlc_wall_ms, server_hlc_logical "
                "FROM terminals WHERE terminal_id=?",
                (terminal_id,),
            ).fetchone()
            if row is None:
                raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
            seq, digest, hlc = row[0], row[1], Hlc(row[2], row[3])
            origin = server_origin(terminal_id)
            ops: list[Op] = []
            for kind, body in bodies:
                hlc = next_hlc(hlc, now_ms)
                seq += 1
                op = Op(origin, seq, hlc, kind, dict(body), digest)
                digest = op.digest
                ops.append(op)
            _INSERT_OP.run(
                conn, [(o.origin, o.seq, o.kind, o.canonical_bytes(), o.digest) for o in ops]
            )
            conn.execute(
                "UPDATE terminals SET server_seq=?, server_digest=?, server_hlc_wall_ms=?, "
                "server_hlc_logical=? WHERE terminal_id=?",
                (seq, digest, hlc.wall_ms, hlc.logical, terminal_id),
            )
            return ops

    def _finalize(
        self, terminal_id: str, changes: list[StatusChange], processor_ref: str | None
    ) -> list[StatusChange]:
        """Apply final statuses still pending; returns those applied. Inside a transaction."""
        conn = self.conn
        applied: list[StatusChange] = []
        settled: dict[str, int] = {}  # terminal id -> offline minor units settled here
        for change in changes:
            processed = change.at_ms if change.status != Status.EXPIRED else None
            row = conn.execute(
                "UPDATE payments SET status=?, code=?, message=?, processor_ref=?, "
                "processed_at_ms=?, fwd_state='done' WHERE payment_id=? AND fwd_state='pending' "
                "RETURNING channel, amount_minor, terminal_id",
                (
                    change.status.value,
                    change.code,
                    change.message,
                    processor_ref,
                    processed,
                    change.payment_id,
                ),
            ).fetchone()
            if row is not None:
                if row[0] == OFFLINE_CHANNEL and change.status.value in ESCROW_SETTLED_STATUSES:
                    settled[row[2]] = settled.get(row[2], 0) + int(row[1])
                applied.append(change)
                if change.status.value in RECEIPT_STATUSES:
                    conn.execute(
                        "INSERT INTO receipts_outbox (payment_id, email, created_at_ms) "
                        "SELECT payment_id, email, ? FROM payments "
                        "WHERE payment_id=? AND email IS NOT NULL ON CONFLICT DO NOTHING",
                        (change.at_ms, change.payment_id),
                    )
        if settled:
            conn.executemany(
                "UPDATE terminals SET offline_settled_minor=offline_settled_minor+? "
                "WHERE terminal_id=?",
                [(minor, tid) for tid, minor in settled.items()],
            )
        if applied:
            bodies: list[tuple[str, dict[str, object]]] = [("status", c.to_body()) for c in applied]
            self.append_server_ops(terminal_id, bodies, changes[0].at_ms)
        return applied

    # -- forwarding --------------------------------------------------------------------------

    def claim_terminal(self, owner: str, now_ms: int, lease_ms: int) -> str | None:
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT t.terminal_id FROM terminals t WHERE t.fwd_lease_until_ms <= :now AND "
                "(SELECT p.next_attempt_at_ms FROM payments p WHERE p.terminal_id=t.terminal_id "
                " AND p.fwd_state='pending' ORDER BY p.capture_seq LIMIT 1) <= :now "
                "ORDER BY t.fwd_lease_until_ms LIMIT 1",
                {"now": now_ms},
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE terminals SET fwd_lease_owner=?, fwd_lease_until_ms=? WHERE terminal_id=?",
                (owner, now_ms + lease_ms, row[0]),
            )
            return str(row[0])

    def release_terminal(self, terminal_id: str, owner: str) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE terminals SET fwd_lease_owner=NULL, fwd_lease_until_ms=0 "
                "WHERE terminal_id=? AND fwd_lease_owner=?",
                (terminal_id, owner),
            )

    def release_leases(self, owner: str) -> int:
        with self.atomic() as conn:
            cur = conn.execute(
                "UPDATE terminals SET fwd_lease_owner=NULL, fwd_lease_until_ms=0 "
                "WHERE fwd_lease_owner=?",
                (owner,),
            )
            return cur.rowcount

    def next_pending(self, terminal_id: str) -> Payment | None:
        row = self.conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE terminal_id=? AND fwd_state='pending' "
            "ORDER BY capture_seq LIMIT 1",
            (terminal_id,),
        ).fetchone()
        return None if row is None else _payment(row)

    def begin_attempt(self, payment_id: str, owner: str, now_ms: int, lease_ms: int) -> Attempt:
        with self.atomic() as conn:
            payment = self.get_payment(payment_id)
            if payment is None:
                raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
            if payment.fwd_state != "pending":
                return Attempt(payment, AttemptAction.DONE)
            conn.execute(
                "UPDATE payments SET attempts=attempts+1, status=? WHERE payment_id=?",
                (Status.FORWARDING.value, payment_id),
            )
            conn.execute(
                "UPDATE terminals SET fwd_lease_until_ms=? WHERE terminal_id=? AND fwd_lease_owner=?",
                (now_ms + lease_ms, payment.terminal_id, owner),
            )
            if payment.attempts == 0:
                change = StatusChange(payment_id, Status.FORWARDING, now_ms)
                self.append_server_ops(payment.terminal_id, [("status", change.to_body())], now_ms)
                return Attempt(payment, first_action(payment, now_ms))
            return Attempt(payment, AttemptAction.LOOKUP)

    def record_outcome(self, change: StatusChange, processor_ref: str | None, now_ms: int) -> bool:
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT terminal_id FROM payments WHERE payment_id=?", (change.payment_id,)
            ).fetchone()
            if row is None:
                raise Refused("unknown_payment", f"payment {change.payment_id!r} does not exist")
            return bool(self._finalize(row[0], [change], processor_ref))

    def defer(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE payments SET next_attempt_at_ms=?, last_error=? "
                "WHERE payment_id=? AND fwd_state='pending'",
                (next_attempt_at_ms, error[:ERROR_CHARS_MAX], payment_id),
            )

    def park(self, payment_id: str, error: str) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE payments SET fwd_state='error', last_error=? "
                "WHERE payment_id=? AND fwd_state='pending'",
                (error[:ERROR_CHARS_MAX], payment_id),
            )

    def resolve_parked(
        self, payment_id: str, resolution: Resolution, actor: str, now_ms: int
    ) -> Payment:
        # BEGIN IMMEDIATE holds the write lock: the fwd_state read here is the one changed.
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT terminal_id, fwd_state FROM payments WHERE payment_id=?", (payment_id,)
            ).fetchone()
            check_parked(payment_id, None if row is None else row[1])
            change = resolution_change(payment_id, resolution, now_ms)
            # Pending again; a final status is then written by the forwarder's own path.
            conn.execute(
                "UPDATE payments SET fwd_state='pending', next_attempt_at_ms=0 "
                "WHERE payment_id=? AND fwd_state='error'",
                (payment_id,),
            )
            if change is not None:
                applied = self._finalize(row[0], [change], resolution.processor_ref)
                check(applied == [change], f"parked payment {payment_id} is finalized")
            self.audit(
                actor, "payment.resolve", resolution_audit_detail(payment_id, resolution), now_ms
            )
            payment = self.get_payment(payment_id)
            assert payment is not None
            return payment

    def expire_due(self, now_ms: int, limit: int) -> list[StatusChange]:
        with self.atomic() as conn:
            rows = conn.execute(EXPIRY_DUE_SQL, (now_ms, limit)).fetchall()
            done: list[StatusChange] = []
            for payment_id, terminal_id in rows:
                change = StatusChange(
                    payment_id,
                    Status.EXPIRED,
                    now_ms,
                    "expired",
                    "Not forwarded before its deadline; the card was not charged.",
                )
                done.extend(self._finalize(terminal_id, [change], None))
            return done

    # -- receipts ----------------------------------------------------------------------------

    def claim_receipts(self, now_ms: int, lease_ms: int, limit: int) -> list[ReceiptJob]:
        with self.atomic() as conn:
            rows = conn.execute(RECEIPTS_DUE_SQL, (now_ms, now_ms, limit)).fetchall()
            conn.executemany(
                "UPDATE receipts_outbox SET lease_until_ms=?, attempts=attempts+1 WHERE payment_id=?",
                [(now_ms + lease_ms, r[0]) for r in rows],
            )
            return [
                ReceiptJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10] + 1)
                for r in rows
            ]

    def receipt_sent(self, payment_id: str, now_ms: int) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE receipts_outbox SET state='sent', sent_at_ms=? WHERE payment_id=?",
                (now_ms, payment_id),
            )

    def receipt_failed(self, payment_id: str, next_attempt_at_ms: int, error: str) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE receipts_outbox SET next_attempt_at_ms=?, lease_until_ms=0, last_error=? "
                "WHERE payment_id=? AND state='pending'",
                (next_attempt_at_ms, error[:ERROR_CHARS_MAX], payment_id),
            )

    def receipt_undeliverable(self, payment_id: str, error: str, now_ms: int) -> None:
        with self.atomic() as conn:
            conn.execute(
                "UPDATE receipts_outbox SET state='undeliverable', sent_at_ms=?, "
                "lease_until_ms=0, last_error=? WHERE payment_id=? AND state='pending'",
                (now_ms, error[:ERROR_CHARS_MAX], payment_id),
            )

    def receipt_states(self) -> dict[str, str]:
        """payment id -> outbox state (tests and reports)."""
        return dict(self.conn.execute("SELECT payment_id, state FROM receipts_outbox").fetchall())

    # -- payments, refunds, disputes ---------------------------------------------------------

    def get_payment(self, payment_id: str) -> Payment | None:
        row = self.conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id=?", (payment_id,)
        ).fetchone()
        return None if row is None else _payment(row)

    def list_payments(self, flt: PaymentFilter) -> list[Payment]:
        where, args = payment_filter_sql(flt, "?")
        args.append(max(1, min(flt.limit, LIST_ROWS_MAX)))
        rows = self.conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {where} ORDER BY payment_id LIMIT ?",
            args,
        ).fetchall()
        return [_payment(r) for r in rows]

    def refunds_of(self, payment_id: str) -> list[Refund]:
        rows = self.conn.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE payment_id=? ORDER BY requested_at_ms",
            (payment_id,),
        ).fetchall()
        return [Refund(*r) for r in rows]

    def begin_refund(
        self,
        payment_id: str,
        refund_id: str,
        amount_minor: int,
        actor: str,
        now_ms: int,
        rules: Callable[[Payment, list[Refund]], None] | None = None,
    ) -> Refund:
        """See :meth:`Store.begin_refund`; ``rules`` runs inside the transaction."""
        with self.atomic() as conn:
            row = conn.execute(
                f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE refund_id=?", (refund_id,)
            ).fetchone()
            if row is not None:
                existing = Refund(*row)
                if existing.payment_id != payment_id or existing.amount_minor != amount_minor:
                    raise Refused(
                        "refund_id_reused",
                        f"refund id {refund_id!r} was already used for another refund",
                    )
                return existing
            payment = self.get_payment(payment_id)
            if payment is None:
                raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
            if rules is not None:
                rules(payment, self.refunds_of(payment_id))
            check(
                payment.refunded_minor + amount_minor <= payment.amount_minor,
                "refunds never exceed the payment amount",
            )
            conn.execute(
                f"INSERT INTO refunds ({_REFUND_COLUMNS}) "
                "VALUES (?,?,?,?,'pending',?,?,NULL,NULL,NULL)",
                (refund_id, payment_id, amount_minor, payment.currency, actor, now_ms),
            )
            conn.execute(
                "UPDATE payments SET refunded_minor=refunded_minor+? WHERE payment_id=?",
                (amount_minor, payment_id),
            )
            self.audit(actor, "refund.request", f"{payment_id} {refund_id} {amount_minor}", now_ms)
            return Refund(
                refund_id,
                payment_id,
                amount_minor,
                payment.currency,
                "pending",
                actor,
                now_ms,
                None,
                None,
            )

    def _existing_refund(self, refund_id: str) -> Refund:
        row = self.conn.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE refund_id=?", (refund_id,)
        ).fetchone()
        if row is None:
            raise Refused("unknown_refund", f"refund {refund_id!r} does not exist")
        return Refund(*row)

    def finish_refund(self, refund_id: str, now_ms: int) -> Refund:
        with self.atomic() as conn:
            refund = self._existing_refund(refund_id)
            if refund.state != "pending":
                return refund
            conn.execute(
                "UPDATE refunds SET state='done', processed_at_ms=? WHERE refund_id=?",
                (now_ms, refund_id),
            )
            payment = self.get_payment(refund.payment_id)
            assert payment is not None
            record = RefundRecord(
                refund.payment_id, refund_id, Money(refund.amount_minor, refund.currency), now_ms
            )
            self.append_server_ops(payment.terminal_id, [("refund", record.to_body())], now_ms)
            return self._existing_refund(refund_id)

    def refuse_refund(
        self, refund_id: str, code: str, text: str, actor: str, now_ms: int
    ) -> Refund:
        with self.atomic() as conn:
            refund = self._existing_refund(refund_id)
            if refund.state != "pending":
                return refund
            conn.execute(
                "UPDATE refunds SET state='refused', processed_at_ms=? WHERE refund_id=?",
                (now_ms, refund_id),
            )
            conn.execute(
                "UPDATE payments SET refunded_minor=refunded_minor-? WHERE payment_id=?",
                (refund.amount_minor, refund.payment_id),
            )
            detail = refund_refused_audit_detail(refund.payment_id, refund_id, code, text)
            self.audit(actor, "refund.refused", detail, now_ms)
            void_state = void_refund_refused_state(refund.payment_id, refund_id, code)
            if void_state is not None:
                self._end_void(refund.payment_id, void_state, now_ms, VOID_UNTOLD_SQL)
            return self._existing_refund(refund_id)

    def pending_refunds(self, limit: int) -> list[Refund]:
        rows = self.conn.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE state='pending' "
            "ORDER BY requested_at_ms LIMIT ?",
            (limit,),
        ).fetchall()
        return [Refund(*r) for r in rows]

    def park_refund(self, refund_id: str, reason: str, actor: str, now_ms: int) -> Refund:
        with self.atomic() as conn:
            refund = self._existing_refund(refund_id)
            if refund.state != REFUND_PENDING:
                return refund
            conn.execute(
                "UPDATE refunds SET state='parked', last_error=? WHERE refund_id=?",
                (reason[:ERROR_CHARS_MAX], refund_id),
            )
            self.audit(actor, "refund.parked", f"{refund.payment_id} {refund_id} {reason}", now_ms)
            return self._existing_refund(refund_id)

    def resolve_refund(
        self, refund_id: str, action: str, actor: str, note: str | None, now_ms: int
    ) -> Refund:
        check_refund_resolve_action(action)
        # BEGIN IMMEDIATE holds the write lock: the state read here is the one changed.
        with self.atomic() as conn:
            refund = self._existing_refund(refund_id)
            check_refund_parked(refund_id, refund.state)
            conn.execute("UPDATE refunds SET state='pending' WHERE refund_id=?", (refund_id,))
            return apply_refund_resolution(self, refund, action, actor, note, now_ms)

    def list_refunds(self, merchant_id: str, state: str, limit: int) -> list[Refund]:
        check(state in REFUND_LIST_STATES, f"refunds are listed by state {REFUND_LIST_STATES}")
        columns = ", ".join(f"r.{c.strip()}" for c in _REFUND_COLUMNS.split(","))
        rows = self.conn.execute(
            f"SELECT {columns} FROM refunds r JOIN payments p USING (payment_id) "
            "WHERE r.state=? AND p.merchant_id=? ORDER BY r.requested_at_ms, r.refund_id LIMIT ?",
            (state, merchant_id, max(1, min(limit, LIST_ROWS_MAX))),
        ).fetchall()
        return [Refund(*r) for r in rows]

    def set_dispute(self, payment_id: str, open_: bool, actor: str, now_ms: int) -> None:
        with self.atomic() as conn:
            payment = self.get_payment(payment_id)
            if payment is None:
                raise Refused("unknown_payment", f"payment {payment_id!r} does not exist")
            if payment.dispute_open == open_:
                return
            conn.execute(
                "UPDATE payments SET dispute_open=? WHERE payment_id=?", (int(open_), payment_id)
            )
            body = {"payment_id": payment_id, "open": open_, "at_ms": now_ms}
            self.append_server_ops(payment.terminal_id, [("dispute", body)], now_ms)
            self.audit(actor, "dispute.open" if open_ else "dispute.close", payment_id, now_ms)

    def pending_voids(self, limit: int) -> list[tuple[str, str, int]]:
        rows = self.conn.execute(
            "SELECT payment_id, terminal_id, requested_at_ms FROM voids WHERE state='pending' "
            "ORDER BY requested_at_ms LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def finish_void(self, payment_id: str, state: str, now_ms: int) -> str | None:
        return self._end_void(payment_id, state, now_ms, "state='pending'")

    def _end_void(self, payment_id: str, state: str, now_ms: int, ending: str) -> str | None:
        """End the void of ``payment_id`` as ``state`` if its row matches ``ending`` (an SQL
        condition on ``state``); a refusal gets its status op to the terminal."""
        with self.atomic() as conn:
            cur = conn.execute(
                f"UPDATE voids SET state=?, done_at_ms=? WHERE payment_id=? AND {ending} "
                "RETURNING terminal_id",
                (state, now_ms, payment_id),
            )
            row = cur.fetchone()
            if row is None:
                return None  # not pending (ended before): the terminal was told then
            terminal_id = str(row[0])
            payment = conn.execute(
                "SELECT status, terminal_id FROM payments WHERE payment_id=?", (payment_id,)
            ).fetchone()
            if payment is None:
                return None
            refusal = void_refusal(payment_id, terminal_id, payment[0], payment[1], state, now_ms)
            if refusal is None:
                return None
            self.append_server_ops(terminal_id, [("status", refusal.to_body())], now_ms)
            return terminal_id

    # -- batches and reports -----------------------------------------------------------------

    def close_batch(
        self, merchant_id: str, business_day: str, close_at_ms: int, now_ms: int
    ) -> Batch | None:
        with self.atomic() as conn:
            merchant = self.get_merchant(merchant_id)
            if merchant is None:
                raise Refused("unknown_merchant", f"merchant {merchant_id!r} does not exist")
            cur = conn.execute(
                "INSERT INTO batches (merchant_id, business_day, close_at_ms, closed_at_ms, "
                "currency) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (merchant_id, business_day, close_at_ms, now_ms, merchant.currency),
            )
            if cur.rowcount != 1:
                return None
            batch_id = cur.lastrowid
            conn.execute(
                "UPDATE payments SET batch_id=? WHERE merchant_id=? AND status='approved' "
                "AND batch_id IS NULL AND processed_at_ms<?",
                (batch_id, merchant_id, close_at_ms),
            )
            conn.execute(
                "UPDATE refunds SET batch_id=? WHERE state='done' AND batch_id IS NULL AND "
                "processed_at_ms<? AND payment_id IN "
                "(SELECT payment_id FROM payments WHERE merchant_id=?)",
                (batch_id, close_at_ms, merchant_id),
            )
            count, sales = conn.execute(
                "SELECT count(*), coalesce(sum(amount_minor),0) FROM payments WHERE batch_id=?",
                (batch_id,),
            ).fetchone()
            (refunds,) = conn.execute(
                "SELECT coalesce(sum(amount_minor),0) FROM refunds WHERE batch_id=?", (batch_id,)
            ).fetchone()
            conn.execute(
                "UPDATE batches SET payments_count=?, sales_minor=?, refunds_minor=? "
                "WHERE batch_id=?",
                (count, sales, refunds, batch_id),
            )
            assert batch_id is not None
            batch = self.get_batch(batch_id)
            assert batch is not None
            return batch

    def list_batches(self, merchant_id: str, limit: int) -> list[Batch]:
        rows = self.conn.execute(
            "SELECT batch_id, merchant_id, business_day, close_at_ms, closed_at_ms, "
            "payments_count, sales_minor, refunds_minor, currency FROM batches "
            "WHERE merchant_id=? ORDER BY business_day DESC LIMIT ?",
            (merchant_id, max(1, min(limit, LIST_ROWS_MAX))),
        ).fetchall()
        return [Batch(*r) for r in rows]

    def get_batch(self, batch_id: int) -> Batch | None:
        row = self.conn.execute(
            "SELECT batch_id, merchant_id, business_day, close_at_ms, closed_at_ms, "
            "payments_count, sales_minor, refunds_minor, currency FROM batches WHERE batch_id=?",
            (batch_id,),
        ).fetchone()
        return None if row is None else Batch(*row)

    def get_batch_of_day(self, merchant_id: str, business_day: str) -> Batch | None:
        row = self.conn.execute(
            "SELECT batch_id, merchant_id, business_day, close_at_ms, closed_at_ms, "
            "payments_count, sales_minor, refunds_minor, currency FROM batches "
            "WHERE merchant_id=? AND business_day=?",
            (merchant_id, business_day),
        ).fetchone()
        return None if row is None else Batch(*row)

    def last_closed_day(self, merchant_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT max(business_day) FROM batches WHERE merchant_id=?", (merchant_id,)
        ).fetchone()
        return None if row is None else row[0]

    def payments_between(self, merchant_id: str, from_ms: int, to_ms: int) -> list[Payment]:
        """Payments captured OR processed in [from_ms, to_ms), for reconciliation."""
        rows = self.conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE merchant_id=? AND "
            "((captured_at_ms>=? AND captured_at_ms<?) OR (processed_at_ms>=? AND processed_at_ms<?)) "
            "ORDER BY captured_at_ms, payment_id",
            (merchant_id, from_ms, to_ms, from_ms, to_ms),
        ).fetchall()
        return [_payment(r) for r in rows]

    def batch_payments(self, batch_id: int) -> list[Payment]:
        rows = self.conn.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE batch_id=? ORDER BY payment_id",
            (batch_id,),
        ).fetchall()
        return [_payment(r) for r in rows]

    def z_report(self, terminal_id: str, reset: bool, now_ms: int) -> dict[str, object]:
        with self.atomic() as conn:
            row = conn.execute(
                "SELECT z_seq, z_reset_at_ms FROM terminals WHERE terminal_id=?", (terminal_id,)
            ).fetchone()
            if row is None:
                raise Refused("unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
            z_seq, from_ms = row
            by_status = conn.execute(
                "SELECT status, channel, count(*), coalesce(sum(amount_minor),0), "
                "coalesce(sum(refunded_minor),0), max(currency) FROM payments WHERE terminal_id=? "
                "AND captured_at_ms>=? AND captured_at_ms<? GROUP BY status, channel "
                "ORDER BY status, channel",
                (terminal_id, from_ms, now_ms + 1),
            ).fetchall()
            report = z_report_body(terminal_id, z_seq, from_ms, now_ms, reset, by_status)
            if reset:
                conn.execute(
                    "INSERT INTO z_reports (terminal_id, z_seq, from_ms, to_ms, report) "
                    "VALUES (?,?,?,?,?)",
                    (terminal_id, z_seq + 1, from_ms, now_ms, canonical.dumps(report).decode()),
                )
                conn.execute(
                    "UPDATE terminals SET z_seq=?, z_reset_at_ms=? WHERE terminal_id=?",
                    (z_seq + 1, now_ms + 1, terminal_id),
                )
            return report

    def audit(self, actor: str, action: str, detail: str, now_ms: int) -> None:
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO audit (at_ms, actor, action, detail) VALUES (?,?,?,?)",
                (now_ms, actor, action, detail[:2000]),
            )

    def audit_log(self, limit: int = 100) -> list[tuple[int, str, str, str]]:
        rows = self.conn.execute(
            "SELECT at_ms, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # counts() may run on any thread: it reads through a connection of its own, so the
    # scans it makes (payments by status grows with history) never hold the store thread,
    # and WAL lets it read beside the writer.
    counts_any_thread = True

    def counts(self) -> dict[str, int]:
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
                self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn = self._reader
            out: dict[str, int] = {}
            for status, n in conn.execute("SELECT status, count(*) FROM payments GROUP BY status"):
                out[f"payments_status_{status}"] = n
            out["forwards_pending"] = conn.execute(
                "SELECT count(*) FROM payments WHERE fwd_state='pending'"
            ).fetchone()[0]
            out["forwards_parked"] = conn.execute(
                "SELECT count(*) FROM payments WHERE fwd_state='error'"
            ).fetchone()[0]
            out["receipts_pending"] = conn.execute(
                "SELECT count(*) FROM receipts_outbox WHERE state='pending'"
            ).fetchone()[0]
            out["receipts_sent"] = conn.execute(
                "SELECT count(*) FROM receipts_outbox WHERE state='sent'"
            ).fetchone()[0]
            out["receipts_undeliverable"] = conn.execute(
                "SELECT count(*) FROM receipts_outbox WHERE state='undeliverable'"
            ).fetchone()[0]
            for state, n in conn.execute(
                "SELECT state, count(*) FROM refunds WHERE state IN ('pending', 'parked') "
                "GROUP BY state"
            ):
                out[f"refunds_{state}"] = n
            out.setdefault("refunds_pending", 0)
            out.setdefault("refunds_parked", 0)
            # Every chain is dense from 1: the ops stored are the heads' sum, which costs a
            # row per terminal where count(*) would read every op.
            terminals, ops = conn.execute(
                "SELECT count(*), coalesce(sum(head_seq + server_seq), 0) FROM terminals"
            ).fetchone()
            out["terminals"], out["ops"] = terminals, ops
            return out
