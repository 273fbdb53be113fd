"""The terminal's durable replica store on SQLite.

Rules (docs/design.md, ARCHITECTURE "Storage rules"):

1. Every connection is opened by :func:`connect`, which sets WAL, ``synchronous=FULL``,
   foreign keys and a busy timeout, and checks they took (:func:`connection_settings`).
   ``isolation_level=None``: the sqlite3 module never opens transactions behind our back.
2. Every write goes through :meth:`Store.atomic`: ``BEGIN IMMEDIATE`` (take the write lock
   up front, so a reader never gets upgraded into a deadlock), ``SAVEPOINT`` when nested,
   ``ROLLBACK`` on any exception. With WAL + ``synchronous=FULL`` a COMMIT returns only
   after the WAL is fsynced, so what was committed survives a crash or power loss.
   The one exception is bookkeeping the server can tell again (the acknowledged seq):
   :meth:`Store.write` with ``durable=False`` commits it with ``synchronous=NORMAL``
   (no fsync; it survives a crash of the process, a power cut may take it back) and
   refuses ops. The next durable commit syncs the WAL, this write's frames with it.
3. Ops are stored as their wire form (canonical JSON) with their digest; reading back
   re-derives the digest and refuses a row that does not match (torn or tampered data is
   an error, never silently used). A crash mid-transaction leaves no trace of it.
4. SQLite errors become :class:`StorageError` with a message that says what to do; a full
   disk (``SQLITE_FULL``) is named as such. Nothing committed earlier is affected.
5. Card numbers never reach this module: captures carry only the sealed envelope, brand
   and last4.

The terminal's Ed25519 private key is kept in the ``meta`` table. Production terminals
should keep it in the device's secure element / OS keystore instead and pass a signer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from syncengine.core import canonical
from syncengine.core.errors import InvariantViolation, StorageError, check
from syncengine.core.ops import Op

BUSY_TIMEOUT_MS_DEFAULT = 5_000
SCHEMA_VERSION = 1
# from-version -> the step to the next version, run inside one transaction (R12: only
# when the server holds every own op).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}
META_VALUE_CHARS_MAX = 64 * 1024
LOG_PAGE_OPS = 4_096  # ops read at a time when the log is read back whole (iter_log)

REQUIRED_SETTINGS: dict[str, object] = {
    "journal_mode": "wal",
    "synchronous": 2,  # FULL
    "foreign_keys": 1,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ops (
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL CHECK (seq >= 1),
    kind TEXT NOT NULL,
    digest TEXT NOT NULL,
    wire TEXT NOT NULL,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS archived_ops (
    digest TEXT NOT NULL UNIQUE,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    wire TEXT NOT NULL
);
"""
# ``archived_ops`` (added without a schema bump: it is created on open, and an SDK that
# predates it never writes or reads it) keeps the terminal's copy of server ops the server
# lost and then rewrote (a restore from a backup): they left ``ops`` so the server's new
# ops can take their seqs, and the views are still built from them (docs/operations.md).


def connect(path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS_DEFAULT) -> sqlite3.Connection:
    """Open a connection with the required settings, or raise :class:`StorageError`."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise _storage_error(exc, "opening the terminal database") from exc
    if str(mode).lower() != "wal":
        conn.close()
        raise StorageError(f"the database at {path} cannot use WAL journaling (got {mode})")
    check(connection_settings(conn) == REQUIRED_SETTINGS, "connection settings took")
    return conn


def connection_settings(conn: sqlite3.Connection) -> dict[str, object]:
    """The durability settings of ``conn`` as SQLite reports them."""
    return {
        "journal_mode": str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower(),
        "synchronous": int(conn.execute("PRAGMA synchronous").fetchone()[0]),
        "foreign_keys": int(conn.execute("PRAGMA foreign_keys").fetchone()[0]),
    }


def _storage_error(exc: sqlite3.Error, doing: str) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return StorageError(
            f"storage is full while {doing}; nothing was written. Free space on the "
            "terminal (or service it) and try again; earlier payments are safe."
        )
    return StorageError(f"storage failed while {doing}: {exc}. Nothing was half-written.")


class Store:
    """One terminal's SQLite database: its ops and a few ``meta`` values."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS_DEFAULT) -> None:
        self.path = Path(path)
        self.conn = connect(self.path, busy_timeout_ms)
        self._connections: list[sqlite3.Connection] = [self.conn]
        self._depth = 0
        self._sync_full = True  # connect() set and checked synchronous=FULL
        with self.atomic():
            self._create_schema()
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta({"schema_version": SCHEMA_VERSION})
        elif int(version) > SCHEMA_VERSION:
            raise StorageError(
                f"database schema {version} is newer than this SDK ({SCHEMA_VERSION}); "
                "install the SDK version that wrote it"
            )
        elif int(version) < SCHEMA_VERSION:
            self._migrate(int(version))

    def unacked_own_ops(self) -> int:
        """Own ops the server has not acknowledged (payments that exist only here)."""
        terminal_id = self.get_meta("terminal_id")
        if terminal_id is None:
            return 0
        row = self.conn.execute(
            "SELECT coalesce(max(seq), 0) FROM ops WHERE origin=?", (terminal_id,)
        ).fetchone()
        return max(0, int(row[0]) - int(self.get_meta("acked_seq") or 0))

    def _migrate(self, version: int) -> None:
        """Apply SDK upgrade migrations, refusing while payments exist only on this terminal.

        R12 (seed 004, Square: do not delete or reinstall the app while offline payments
        are pending): a migration that went wrong would lose them, so it runs only when the
        server holds every op. The old SDK can still forward them: open the terminal with
        it, let it sync (``Terminal.flush``), then upgrade.
        """
        pending = self.unacked_own_ops()
        if pending:
            raise StorageError(
                f"this terminal holds {pending} op(s) the server has not acknowledged, "
                f"including any offline payments; the upgrade from schema {version} to "
                f"{SCHEMA_VERSION} is refused so nothing can be lost. Start the previous SDK "
                "version, reconnect and let it forward (flush), then upgrade."
            )
        with self.atomic():
            for step in range(version, SCHEMA_VERSION):
                migration = MIGRATIONS.get(step)
                if migration is None:
                    raise StorageError(f"no migration from terminal schema {step}; reinstall")
                migration(self.conn)
            self._set_meta({"schema_version": SCHEMA_VERSION})

    def _create_schema(self) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)

    def reader(self) -> sqlite3.Connection:
        """A second connection (same settings) for readers such as reports."""
        conn = connect(self.path)
        self._connections.append(conn)
        return conn

    def connections(self) -> list[sqlite3.Connection]:
        """Every connection this store opened (a test checks their settings)."""
        return list(self._connections)

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """One transaction: BEGIN IMMEDIATE, or a SAVEPOINT when nested; rollback on error.

        Any exception inside rolls back everything of this level and propagates; SQLite
        errors propagate as :class:`StorageError`.
        """
        depth = self._depth
        name = f"sp{depth}"
        try:
            self.conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
        except sqlite3.Error as exc:
            raise _storage_error(exc, "starting a transaction") from exc
        self._depth += 1
        try:
            yield
        except BaseException as exc:
            self._depth = depth
            self._rollback(depth, name)
            if isinstance(exc, sqlite3.Error):
                raise _storage_error(exc, "writing") from exc
            raise
        self._depth = depth
        try:
            self.conn.execute("COMMIT" if depth == 0 else f"RELEASE {name}")
        except sqlite3.Error as exc:
            self._rollback(depth, name)
            raise _storage_error(exc, "committing") from exc

    def _rollback(self, depth: int, name: str) -> None:
        # A failed statement (SQLITE_FULL, I/O error) may already have ended the
        # transaction; rolling back what no longer exists must not hide the first error.
        try:
            if depth == 0:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            else:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
        except sqlite3.Error:
            pass

    # -- ops and meta ----------------------------------------------------------------------

    def write(
        self,
        ops: Iterator[Op] | tuple[Op, ...],
        meta: Mapping[str, int | str],
        durable: bool = True,
        archive: tuple[str, int] | None = None,
    ) -> None:
        """Append ``ops`` and set ``meta`` in one transaction, durable (fsynced) by default.

        ``archive=(origin, seq)`` first moves ``origin``'s ops from ``seq`` up out of the
        log into ``archived_ops`` (same transaction), so ``ops`` may reuse those seqs.

        ``durable=False`` (meta only; ops are refused): the commit skips the fsync
        (``synchronous=NORMAL`` for this transaction, then ``FULL`` again), for bookkeeping
        the server tells again on the next connection. Inside an outer transaction the
        write is part of it and as durable as it.
        """
        if not durable:
            ops = tuple(ops)
            check(not ops and archive is None, "ops are always written durably")
        if not self._sync_full:  # a failed switch back: never commit ops without fsync
            self._set_synchronous("FULL")
        if durable or self._depth:
            with self.atomic():
                if archive is not None:
                    self._archive(*archive)
                self._insert_ops(ops)
                self._set_meta(meta)
            return
        self._set_synchronous("NORMAL")
        try:
            with self.atomic():
                self._set_meta(meta)
        finally:
            self._set_synchronous("FULL")

    def _set_synchronous(self, level: str) -> None:
        self._sync_full = False
        try:
            self.conn.execute(f"PRAGMA synchronous = {level}")
        except sqlite3.Error as exc:
            raise _storage_error(exc, "setting synchronous") from exc
        self._sync_full = level == "FULL"

    def _insert_ops(self, ops: Iterator[Op] | tuple[Op, ...]) -> None:
        rows = [
            (op.origin, op.seq, op.kind, op.digest, canonical.dumps(op.to_wire()).decode())
            for op in ops
        ]
        if rows:
            # A plain INSERT: an (origin, seq) already stored is a bug, never overwritten.
            self.conn.executemany(
                "INSERT INTO ops (origin, seq, kind, digest, wire) VALUES (?, ?, ?, ?, ?)", rows
            )

    def _archive(self, origin: str, seq: int) -> None:
        check(seq >= 1, "the archive starts at a seq >= 1")
        # OR IGNORE: an op archived by an earlier rewrite is kept once (digests are unique).
        self.conn.execute(
            "INSERT OR IGNORE INTO archived_ops (digest, origin, seq, wire) "
            "SELECT digest, origin, seq, wire FROM ops WHERE origin = ? AND seq >= ? "
            "ORDER BY seq",
            (origin, seq),
        )
        self.conn.execute("DELETE FROM ops WHERE origin = ? AND seq >= ?", (origin, seq))

    def load_archived_ops(self) -> list[Op]:
        """The archived ops (see ``write(archive=...)``), in the order they were archived."""
        return self._load("archived_ops ORDER BY rowid", "reading the archive")

    def load_ops(self) -> list[Op]:
        """Every stored op, by origin then seq, each verified against its stored digest."""
        return self._load("ops ORDER BY origin, seq", "reading the log")

    def read_ops(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        """``origin``'s stored ops with ``after_seq < seq <= end_seq``, by seq, each verified
        against its stored digest: what a compacted replica reads back
        (:class:`syncengine.core.replica.OpReader`)."""
        return self._page(origin, after_seq, end_seq - after_seq)

    def _page(self, origin: str, after_seq: int, limit: int) -> list[Op]:
        try:
            rows = self.conn.execute(
                "SELECT origin, seq, digest, wire FROM ops WHERE origin = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (origin, after_seq, max(limit, 0)),
            ).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc, "reading the log") from exc
        return [_verified(*row) for row in rows]

    def iter_log(self, first_origin: str) -> Iterator[Op]:
        """Every stored op, ``first_origin``'s first, then each other origin's; each origin
        by seq, read ``LOG_PAGE_OPS`` at a time (a long history is never all in memory)."""
        try:
            origins = [r[0] for r in self.conn.execute("SELECT DISTINCT origin FROM ops")]
        except sqlite3.Error as exc:
            raise _storage_error(exc, "reading the log") from exc
        for origin in sorted(origins, key=lambda o: (o != first_origin, o)):
            after = 0
            while page := self._page(origin, after, LOG_PAGE_OPS):
                yield from page
                after = page[-1].seq

    def _load(self, table_order: str, doing: str) -> list[Op]:
        try:
            rows = self.conn.execute(
                f"SELECT origin, seq, digest, wire FROM {table_order}"  # two constants below
            ).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc, doing) from exc
        return [_verified(*row) for row in rows]

    def get_meta(self, key: str) -> str | None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise _storage_error(exc, "reading settings") from exc
        return None if row is None else str(row[0])

    def set_meta(self, values: Mapping[str, int | str]) -> None:
        with self.atomic():
            self._set_meta(values)

    def _set_meta(self, values: Mapping[str, int | str]) -> None:
        for key, value in values.items():
            text = str(value)
            check(len(text) <= META_VALUE_CHARS_MAX, "meta values are bounded")
            self.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, text),
            )

    def delete_meta(self, *keys: str) -> None:
        with self.atomic():
            for key in keys:
                self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))


def _verified(origin: str, seq: int, digest: str, wire: str) -> Op:
    """A stored op read back, refused unless it matches its stored digest and key."""
    # canonical.loads yields only JSON types: the body is not walked again.
    op = Op.from_wire(canonical.loads(wire.encode()), _from_json=True)
    if op.digest != digest or op.origin != origin or op.seq != seq:
        raise InvariantViolation(f"stored op {origin}#{seq} does not match its digest")
    return op
