"""The store contract: every promise of :mod:`syncengine.server.store`, on every backend.

Each test runs on SQLite (a file in ``tmp_path``) and on PostgreSQL (a fresh schema of a
database created for the session). Where a promise is about concurrency, PostgreSQL gets
several threads and two store instances (two "processes" sharing the database); SQLite
gets what the server gives it: one process, one store thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import pytest
from server_support import run_effects

from syncengine.core import crypto, protocol
from syncengine.core.bodies import (
    VOID_REFUSED_CODE_PREFIX,
    Capture,
    CardInfo,
    StatusChange,
    VoidRequest,
)
from syncengine.core.errors import (
    ConfigError,
    InvariantViolation,
    ProtocolError,
    Refused,
    StorageError,
)
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.core.ops import GENESIS, Op, make_next, server_origin
from syncengine.server.app import default_settings, hash_secret
from syncengine.server.merge import (
    Effect,
    ServerMachine,
)
from syncengine.server.model import (
    REVOKE_ALREADY,
    REVOKE_LAST_OWNER,
    REVOKE_UNKNOWN,
    REVOKED,
    AttemptAction,
    BatchStored,
    HeadMoved,
    MergeBatch,
    PaymentFilter,
    Resolution,
    Role,
)
from syncengine.server.store import Store
from syncengine.server.store import postgres as pg_module
from syncengine.server.store import sqlite as sqlite_module
from syncengine.server.store.rules import (
    RESOLVED_NOT_MADE_CODE,
    RESOLVED_NOT_MADE_TEXT,
    payment_filter_sql,
)

NOW_MS = 1_790_000_000_000
HOUR_MS = 3_600_000
LEASE_MS = 30_000
T = TypeVar("T")


# -- backends ------------------------------------------------------------------------------


@dataclass
class Backend:
    """A store under test, and how to get a second instance of the same database."""

    name: str
    store: Store
    threads: int  # how many threads the server would give this store
    make_another: Callable[[], Store]
    opened: list[Store] = field(default_factory=list)

    def another(self) -> Store:
        """A second store on the same data (a second process), or the same store (SQLite
        is served by one process)."""
        other = self.make_another()
        if other is not self.store:
            other.open()
            self.opened.append(other)
        return other

    def parallel(self, fn: Callable[..., T], calls: list[tuple[Any, ...]]) -> list[T]:
        """Run ``fn(*args)`` for each of ``calls`` like the server's StoreRunner would:
        ``threads`` at a time."""
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(lambda args: fn(*args), calls))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    store: Any  # a Store
    if request.param == "sqlite":
        store = sqlite_module.SqliteStore(tmp_path / "server.db")
        b = Backend("sqlite", store, 1, lambda: store)
    else:
        url: str = request.getfixturevalue("pg_url")
        store = pg_module.PostgresStore(url)
        b = Backend("postgres", store, 8, lambda: pg_module.PostgresStore(url))
    store.open()
    store.ensure_merchant("m1", "USD", NOW_MS)
    store.create_api_key(hash_secret("owner"), "owner", "m1", Role.OWNER, "test", NOW_MS)
    try:
        yield b
    finally:
        for other in b.opened:
            other.close()
        store.close()


# -- a terminal writing straight into the store ----------------------------------------------


SEALED = crypto.b64e(b"\x07" * 64)


@dataclass
class Till:
    """An enrolled terminal whose captures are merged with ``merge_batch`` directly."""

    store: Store
    terminal_id: str
    key: crypto.Ed25519KeyPair = field(
        default_factory=lambda: crypto.Ed25519KeyPair.from_private(os.urandom(32))
    )
    ops: list[Op] = field(default_factory=list)
    acked: int = 0

    def __post_init__(self) -> None:
        code = hash_secret(f"code-{self.terminal_id}")
        self.store.create_enrollment_code(code, "m1", None, None, "test", NOW_MS, NOW_MS + HOUR_MS)
        self.store.enroll(
            code, self.terminal_id, self.key.public, "terminal", default_settings("USD"), NOW_MS
        )

    def capture_op(
        self, payment_id: str, amount_minor: int = 1_000, *, email: str | None = None, **kw: Any
    ) -> tuple[Op, Capture]:
        at_ms = NOW_MS - HOUR_MS + len(self.ops)
        capture = Capture(
            payment_id=payment_id,
            merchant_id="m1",
            amount=Money(amount_minor, "USD"),
            channel=kw.get("channel", "offline"),
            card=CardInfo("visa", "4242", "tap", SEALED),
            captured_at_ms=at_ms,
            expires_at_ms=kw.get("expires_at_ms", NOW_MS + 23 * HOUR_MS),
            device_class="terminal",
            email=email,
        )
        previous = self.ops[-1] if self.ops else None
        op = make_next(previous, self.terminal_id, Hlc(at_ms, 0), "capture", capture.to_body())
        self.ops.append(op)
        return op, capture

    def batch(self, pairs: list[tuple[Op, Capture]], head: Op | None = None) -> MergeBatch:
        return MergeBatch(
            terminal_id=self.terminal_id,
            merchant_id="m1",
            expected_head_seq=0 if head is None else head.seq,
            expected_head_digest=GENESIS if head is None else head.digest,
            ops=tuple(op for op, _ in pairs),
            captures=tuple((op.seq, c) for op, c in pairs),
            expired=(),
            voids=(),
            last_mode=None,
            received_at_ms=NOW_MS,
        )

    def pay(self, *payment_ids: str, amount_minor: int = 1_000, **kw: Any) -> list[str]:
        """Capture and merge payments; returns their ids."""
        head = self.ops[-1] if self.ops else None
        pairs = [self.capture_op(p, amount_minor, **kw) for p in payment_ids]
        result = self.store.merge_batch(self.batch(pairs, head))
        assert isinstance(result, BatchStored), result
        return list(payment_ids)


def _offline_allowed(till: Till) -> Till:
    """The terminal's ``offline_allowed`` setting on (R2): the budget grants to it."""
    settings = till.store.get_terminal_settings(till.terminal_id)
    assert settings is not None
    allowed = settings.__class__(True, *dataclasses.astuple(settings)[1:])
    till.store.update_terminal_settings(till.terminal_id, allowed, "k", NOW_MS)
    return till


def _server_ops(store: Store, terminal_id: str) -> list[Op]:
    ops, more = store.load_ops(server_origin(terminal_id), 0, 10_000)
    assert not more
    return ops


def _statuses(store: Store, terminal_id: str, payment_id: str) -> list[str]:
    return [
        op.body["status"]
        for op in _server_ops(store, terminal_id)
        if op.kind == "status" and op.body["payment_id"] == payment_id
    ]


def _assert_chain(ops: list[Op]) -> None:
    """Dense seqs from 1, each op linked to the digest of the one before."""
    assert [op.seq for op in ops] == list(range(1, len(ops) + 1))
    for before, after in itertools.pairwise([None, *ops]):
        assert after is not None
        assert after.prev == (GENESIS if before is None else before.digest)


# -- lifecycle and migrations ----------------------------------------------------------------


def test_migrations_are_versioned_and_applied_once(backend: Backend) -> None:
    module = sqlite_module if backend.name == "sqlite" else pg_module
    store = backend.store
    assert store.schema_version() == len(module.MIGRATIONS) >= 1
    store.close()
    store.close()  # idempotent
    store.open()  # re-opening applies nothing twice and keeps the data
    assert store.schema_version() == len(module.MIGRATIONS)
    assert store.get_merchant("m1") is not None
    assert store.ensure_merchant("m1", "USD", NOW_MS) is False


def test_postgres_processes_starting_together_migrate_once(pg_url: str) -> None:
    stores = [pg_module.PostgresStore(pg_url, pool_connections_max=2) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: s.open(), stores))
    try:
        assert {s.schema_version() for s in stores} == {len(pg_module.MIGRATIONS)}
        assert stores[0].settings()["transaction_isolation"] == "read committed"
    finally:
        for s in stores:
            s.close()


def test_the_maintenance_switch_is_shared_by_every_process(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    assert store.get_maintenance() is False  # off until someone turns it on
    store.set_maintenance(True, "key:k1", NOW_MS)
    assert other.get_maintenance() is True  # another process sees it
    other.set_maintenance(False, "key:k2", NOW_MS + 1)
    assert store.get_maintenance() is False
    store.set_maintenance(False, "key:k1", NOW_MS + 2)  # idempotent
    assert store.get_maintenance() is False


def test_a_first_api_key_is_created_once(backend: Backend, tmp_path: Path) -> None:
    # The fixture created an owner key: a "first" key is refused from now on.
    store = backend.store
    assert store.count_api_keys() == 1
    assert not store.create_first_api_key("h0", "k0", "m1", Role.OWNER, "late", NOW_MS)
    assert store.count_api_keys() == 1
    if backend.name == "sqlite":  # and on an empty database, the first call creates it
        empty = sqlite_module.SqliteStore(tmp_path / "empty.db")
        empty.open()
        try:
            empty.ensure_merchant("m1", "USD", NOW_MS)
            assert empty.create_first_api_key("h1", "k1", "m1", Role.OWNER, "boot", NOW_MS)
            assert not empty.create_first_api_key("h2", "k2", "m1", Role.OWNER, "boot", NOW_MS)
            assert empty.count_api_keys() == 1
        finally:
            empty.close()


def test_api_keys_are_listed_without_secrets_and_revoked_once(backend: Backend) -> None:
    store = backend.store
    store.ensure_merchant("m2", "USD", NOW_MS)
    store.create_api_key("h-cash", "cash", "m1", Role.CASHIER, "Till 1", NOW_MS + 1)
    store.create_api_key("h-own2", "own2", "m1", Role.OWNER, "Deputy", NOW_MS + 2)
    store.create_api_key("h-other", "other", "m2", Role.OWNER, "Elsewhere", NOW_MS)
    listed = store.list_api_keys("m1", 10)
    assert [(k.key_id, k.role, k.name, k.revoked_at_ms) for k in listed] == [
        ("owner", Role.OWNER, "test", None),
        ("cash", Role.CASHIER, "Till 1", None),
        ("own2", Role.OWNER, "Deputy", None),
    ]
    assert store.count_live_api_keys("m1") == 3
    # Another merchant's key is unknown here, and stays live.
    assert store.revoke_api_key("m1", "other", "key:owner", NOW_MS + 5) == REVOKE_UNKNOWN
    assert store.get_api_key("h-other") is not None
    assert store.revoke_api_key("m1", "cash", "key:owner", NOW_MS + 5) == REVOKED
    assert store.get_api_key("h-cash") is None  # refused at once
    assert store.revoke_api_key("m1", "cash", "key:owner", NOW_MS + 6) == REVOKE_ALREADY
    assert store.revoke_api_key("m1", "owner", "key:own2", NOW_MS + 7) == REVOKED
    # own2 is now the last live owner key: kept, whoever asks.
    assert store.revoke_api_key("m1", "own2", "key:own2", NOW_MS + 8) == REVOKE_LAST_OWNER
    assert store.get_api_key("h-own2") is not None
    listed = store.list_api_keys("m1", 10)
    assert [(k.key_id, k.revoked_at_ms) for k in listed] == [
        ("own2", None),
        ("owner", NOW_MS + 7),  # revoked ones after the live, most recent first
        ("cash", NOW_MS + 5),
    ]
    assert [k.key_id for k in store.list_api_keys("m1", 2)] == ["own2", "owner"]
    assert store.count_live_api_keys("m1") == 1
    assert ("key:owner", "api_key.revoke", "cash") in [
        a[1:] for a in cast(Any, store).audit_log(100)
    ]
    assert ("key:own2", "api_key.revoke", "owner") in [
        a[1:] for a in cast(Any, store).audit_log(100)
    ]


def test_live_keys_are_bounded_even_when_created_at_once(backend: Backend) -> None:
    store = backend.store  # it holds one live key (the fixture's owner key)
    stores = [store, backend.another()]

    def create(i: int) -> str:
        try:
            stores[i % 2].create_api_key(
                f"h{i}", f"k{i}", "m1", Role.CASHIER, "", NOW_MS, live_max=4
            )
        except Refused as exc:
            return exc.reason
        return "created"

    outcomes = backend.parallel(create, [(i,) for i in range(8)])
    assert sorted(outcomes) == ["created"] * 3 + ["too_many_keys"] * 5, outcomes
    assert store.count_live_api_keys("m1") == 4
    revoked = next(k.key_id for k in store.list_api_keys("m1", 10) if k.role == Role.CASHIER)
    assert store.revoke_api_key("m1", revoked, "test", NOW_MS) == REVOKED
    assert create(9) == "created"  # a revoked key no longer counts


def test_two_owners_revoking_each_other_at_once_keep_one(backend: Backend) -> None:
    # Each revoke alone is allowed (another owner key is live); together they would leave
    # none. Repeated, so an interleaving that lets both through has many chances to show.
    store = backend.store
    stores = [store, backend.another()]  # two processes, with PostgreSQL
    survivor = "owner"  # the fixture's owner key
    for round_ in range(10):
        a, b = f"a{round_}", f"b{round_}"
        store.create_api_key(f"h-{a}", a, "m1", Role.OWNER, "A", NOW_MS)
        store.create_api_key(f"h-{b}", b, "m1", Role.OWNER, "B", NOW_MS)
        assert store.revoke_api_key("m1", survivor, "test", NOW_MS) == REVOKED
        outcomes = backend.parallel(
            lambda i, key_id: stores[i].revoke_api_key("m1", key_id, "test", NOW_MS),
            [(0, a), (1, b)],
        )
        assert sorted(outcomes) == [REVOKE_LAST_OWNER, REVOKED], outcomes
        live = [k.key_id for k in store.list_api_keys("m1", 100) if k.revoked_at_ms is None]
        assert len(live) == 1 and live[0] in (a, b), live
        survivor = live[0]


def test_postgres_processes_starting_together_create_one_first_key(pg_url: str) -> None:
    stores = [pg_module.PostgresStore(pg_url, pool_connections_max=2) for _ in range(4)]
    for s in stores:
        s.open()
    stores[0].ensure_merchant("m1", "USD", NOW_MS)
    try:
        with ThreadPoolExecutor(8) as pool:
            created = list(
                pool.map(
                    lambda i: stores[i % 4].create_first_api_key(
                        f"hash-{i}", f"key-{i}", "m1", Role.OWNER, "bootstrap", NOW_MS
                    ),
                    range(8),
                )
            )
        assert created.count(True) == 1, created
        assert stores[0].count_api_keys() == 1
    finally:
        for s in stores:
            s.close()


def test_postgres_upgrade_keeps_every_card_and_escrow_total(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v2 database (card copied into payments, escrow summed on read) migrates without
    losing a card, and the escrow's running totals start from what it held."""
    monkeypatch.setattr(pg_module, "MIGRATIONS", pg_module.MIGRATIONS[:2])
    old = pg_module.PostgresStore(pg_url)
    old.open()
    old.ensure_merchant("m1", "USD", NOW_MS)
    till = Till(old, "T1")
    ops = [till.capture_op(f"u{i}", 100 + i)[0] for i in range(3)]
    old.close()
    monkeypatch.undo()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for op in ops:
            conn.execute(
                "INSERT INTO ops (origin, seq, kind, data, digest) VALUES (%s,%s,%s,%s,%s)",
                (op.origin, op.seq, op.kind, op.canonical_bytes(), op.digest),
            )
            b = op.body
            conn.execute(
                "INSERT INTO payments (payment_id, merchant_id, terminal_id, capture_seq, "
                "amount_minor, currency, channel, brand, last4, entry_method, sealed, "
                "captured_at_ms, expires_at_ms, received_at_ms, device_class, email) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (
                    b["payment_id"],
                    "m1",
                    "T1",
                    op.seq,
                    b["amount"]["minor"],
                    "USD",
                    "offline",
                    "visa",
                    "4242",
                    "tap",
                    SEALED,
                    b["captured_at_ms"],
                    b["expires_at_ms"],
                    NOW_MS,
                    "terminal",
                    None,
                ),
            )
    new = pg_module.PostgresStore(pg_url)
    new.open()
    try:
        assert new.schema_version() == len(pg_module.MIGRATIONS)
        for op in ops:
            payment = new.get_payment(op.body["payment_id"])
            assert payment is not None and payment.sealed == SEALED
        (share,) = new.escrow_state("m1").terminals
        assert (share.used_minor, share.released_minor) == (100 + 101 + 102, 0)
    finally:
        new.close()


# -- merge -------------------------------------------------------------------------------------


def test_merge_is_idempotent_and_head_moved_changes_nothing(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    pairs = [till.capture_op(f"p{i}") for i in range(5)]
    first = till.batch(pairs[:3])
    assert isinstance(store.merge_batch(first), BatchStored)
    # The same batch again (a replay) and a batch planned against the old head: no change.
    assert store.merge_batch(first) == HeadMoved(3)
    assert store.merge_batch(till.batch(pairs[:4])) == HeadMoved(3)
    stored = store.merge_batch(till.batch(pairs[3:], head=pairs[2][0]))
    assert stored == BatchStored(5, pairs[4][0].digest, 0)
    ops, more = store.load_ops("T1", 0, 100)
    assert [op.digest for op in ops] == [op.digest for op, _ in pairs] and not more
    assert store.load_ops("T1", 2, 2) == (ops[2:4], True)
    view = store.load_chain("T1", 2, 9)
    assert (view.head_seq, view.head_digest) == (5, pairs[4][0].digest)
    assert view.digests == {op.seq: op.digest for op, _ in pairs[1:]}
    assert len(store.list_payments(PaymentFilter("m1"))) == 5
    info = store.load_terminal("T1")
    assert info is not None and info.head_seq == 5


def _rewrite_op_row(
    backend: Backend, request: pytest.FixtureRequest, seq: int, data: bytes
) -> None:
    """Change a stored op's bytes behind the store's back (a torn or tampered row)."""
    if backend.name == "sqlite":
        assert isinstance(backend.store, sqlite_module.SqliteStore)
        with backend.store.atomic() as conn:
            conn.execute("UPDATE ops SET data=? WHERE origin='T1' AND seq=?", (data, seq))
    else:
        with psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True) as conn:
            conn.execute("UPDATE ops SET data=%s WHERE origin='T1' AND seq=%s", (data, seq))


def test_a_stored_op_that_was_changed_is_refused_on_read(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    store = backend.store
    till = Till(store, "T1")
    till.pay("p0", "p1", "p2")
    ops, _ = store.load_ops("T1", 0, 10)
    assert [op.digest for op in ops] == [op.digest for op in till.ops]
    assert ops == till.ops  # equal by canonical bytes
    # Another amount, still a well-formed op: its digest no longer matches the row's.
    changed = ops[1].canonical_bytes().replace(b'"minor":1000', b'"minor":9000')
    assert changed != ops[1].canonical_bytes()
    _rewrite_op_row(backend, request, 2, changed)
    with pytest.raises(StorageError, match="T1#2 does not match its digest"):
        store.load_ops("T1", 0, 10)
    assert store.load_ops("T1", 2, 10) == ([ops[2]], False)  # the rows after it still read
    # Not an op at all, or not JSON we accept (a float): corruption, said as such.
    for garbage in (b'{"not":"an op"}', changed.replace(b"9000", b"9000.5"), b"\xff"):
        _rewrite_op_row(backend, request, 2, garbage)
        with pytest.raises(StorageError, match="corruption"):
            store.load_ops("T1", 1, 10)


def test_merge_refuses_a_payment_id_stored_under_another_op(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    till.pay("dup")
    head = till.ops[-1]
    again = till.batch([till.capture_op("fresh"), till.capture_op("dup")], head=head)
    with pytest.raises(ProtocolError, match="already stored"):
        store.merge_batch(again)
    # Nothing of the refused batch was stored.
    assert store.load_chain("T1", 1, 10).head_seq == 1
    assert store.get_payment("fresh") is None
    assert store.load_ops("T1", 1, 10) == ([], False)


def test_concurrent_merges_of_one_terminal_store_exactly_one(backend: Backend) -> None:
    till = Till(backend.store, "T1")
    pairs = [till.capture_op(f"p{i}") for i in range(4)]
    stores = [backend.store, backend.another()]
    batches = [till.batch(pairs[:2]), till.batch(pairs[:4]), till.batch(pairs[:3])] * 2
    results = backend.parallel(
        lambda s, b: s.merge_batch(b), [(stores[i % 2], b) for i, b in enumerate(batches)]
    )
    assert sum(isinstance(r, BatchStored) for r in results) == 1
    head = backend.store.load_chain("T1", 1, 1).head_seq
    assert head in (2, 3, 4)
    assert len(backend.store.list_payments(PaymentFilter("m1"))) == head


def _machine_run(store: Store, m: ServerMachine, effects: list[Effect]) -> list[protocol.Message]:
    """Carry out effects like the shell does; return the messages sent."""
    return run_effects(store, m, effects, NOW_MS)


def _session(store: Store, till: Till) -> ServerMachine:
    nonce = os.urandom(32)
    m = ServerMachine(crypto.Signer(b"\x02" * 32), nonce)
    _machine_run(store, m, m.receive(protocol.Hello(till.terminal_id, "t"), NOW_MS))
    sig = crypto.sign(till.key.private, crypto.challenge_message(nonce, till.terminal_id))
    sent = _machine_run(
        store, m, m.receive(protocol.Auth(till.terminal_id, crypto.b64e(sig)), NOW_MS)
    )
    assert isinstance(sent[0], protocol.Welcome), sent
    return m


def _push(till: Till, ops: list[Op]) -> protocol.Push:
    last = ops[-1]
    message = crypto.chain_head_message(till.terminal_id, last.seq, last.digest)
    return protocol.Push(tuple(ops), crypto.b64e(crypto.sign(till.key.private, message)))


def test_replayed_and_equivocating_pushes_through_the_machine(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    pairs = [till.capture_op(f"p{i}") for i in range(6)]
    ops = [op for op, _ in pairs]
    m = _session(store, till)
    for chunk, acked in ((ops[:4], 4), (ops[2:6], 6), (ops[:6], 6), (ops[1:3], 6)):
        sent = _machine_run(store, m, m.receive(_push(till, chunk), NOW_MS))  # overlaps, replays
        assert isinstance(sent[-1], protocol.Ack) and sent[-1].seq == acked, sent
    assert len(store.list_payments(PaymentFilter("m1"))) == 6
    # Another op at a stored (origin, seq): equivocation, refused; nothing changes.
    fork = make_next(
        ops[1],
        "T1",
        Hlc(NOW_MS, 9),
        "mode",
        {"from": "online", "to": "offline", "reason": "x", "at_ms": 1},
    )
    m2 = _session(store, till)
    sent = _machine_run(store, m2, m2.receive(_push(till, [fork]), NOW_MS))
    assert any(isinstance(s, protocol.Error) for s in sent), sent
    assert store.load_chain("T1", 3, 3).digests == {3: ops[2].digest}
    assert [op.digest for op in store.load_ops("T1", 0, 10)[0]] == [op.digest for op in ops]


# -- server streams ----------------------------------------------------------------------------


def test_server_seqs_stay_dense_with_concurrent_writers(backend: Backend) -> None:
    Till(backend.store, "T1")  # enrollment wrote the initial setting ops
    base = len(_server_ops(backend.store, "T1"))
    stores = [backend.store, backend.another()]
    writers = 16
    per_writer = 5

    def write(i: int) -> None:
        store = stores[i % 2]
        for j in range(per_writer):
            body = {"payment_id": f"d{i}-{j}", "open": True, "at_ms": NOW_MS}
            store.append_server_ops("T1", [("dispute", body), ("dispute", body)], NOW_MS + j)

    backend.parallel(write, [(i,) for i in range(writers)])
    ops = _server_ops(backend.store, "T1")
    assert len(ops) == base + writers * per_writer * 2
    _assert_chain(ops)
    hlcs = [op.hlc for op in ops]
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)
    info = backend.store.load_terminal("T1")
    assert info is not None and info.server_seq == len(ops)
    with pytest.raises(Refused):
        backend.store.append_server_ops("nope", [("dispute", {})], NOW_MS)


# -- forwarding --------------------------------------------------------------------------------


def test_claims_are_exclusive_across_store_instances(backend: Backend) -> None:
    for t in ("T1", "T2", "T3"):
        Till(backend.store, t).pay(f"{t}-a", f"{t}-b")
    a, b = backend.store, backend.another()
    claimed = [a.claim_terminal("A", NOW_MS, LEASE_MS), b.claim_terminal("B", NOW_MS, LEASE_MS)]
    claimed.append(a.claim_terminal("A", NOW_MS, LEASE_MS))
    assert sorted(c for c in claimed if c) == ["T1", "T2", "T3"]
    assert b.claim_terminal("B", NOW_MS + LEASE_MS - 1, LEASE_MS) is None  # all leased
    b.release_terminal(str(claimed[0]), "B")  # not B's lease: no effect
    assert b.claim_terminal("B", NOW_MS + 1, LEASE_MS) is None
    a.release_terminal(str(claimed[0]), "A")
    assert b.claim_terminal("B", NOW_MS + 1, LEASE_MS) == claimed[0]
    # A lease whose holder died runs out; then another owner takes the terminal.
    assert a.claim_terminal("A", NOW_MS + LEASE_MS, LEASE_MS) in {claimed[1], claimed[2]}


def test_release_leases_gives_back_only_that_owners_terminals(backend: Backend) -> None:
    for t in ("T1", "T2"):
        Till(backend.store, t).pay(f"{t}-a")
    a, b = backend.store, backend.another()
    mine = a.claim_terminal("A/0", NOW_MS, LEASE_MS)
    theirs = a.claim_terminal("A/1", NOW_MS, LEASE_MS)
    assert {mine, theirs} == {"T1", "T2"}
    assert b.claim_terminal("B", NOW_MS + 1, LEASE_MS) is None  # both leased
    assert b.release_leases("A/0") == 1
    assert b.release_leases("A/0") == 0  # nothing left to give back
    assert b.claim_terminal("B", NOW_MS + 1, LEASE_MS) == mine  # at once, not after the lease
    assert b.claim_terminal("B", NOW_MS + 1, LEASE_MS) is None  # A/1 still holds its own


def test_concurrent_claimers_never_share_a_terminal(backend: Backend) -> None:
    terminals = [f"T{i}" for i in range(12)]
    for t in terminals:
        Till(backend.store, t).pay(f"{t}-a")
    stores = [backend.store, backend.another()]
    got: list[str] = []
    lock = threading.Lock()

    def claimer(i: int) -> None:
        while True:
            t = stores[i % 2].claim_terminal(f"owner-{i}", NOW_MS, LEASE_MS)
            if t is None:
                return
            with lock:
                got.append(t)

    backend.parallel(claimer, [(i,) for i in range(8)])
    assert sorted(got) == sorted(terminals)  # each exactly once


def test_claim_follows_capture_order_and_backoff(backend: Backend) -> None:
    store = backend.store
    Till(store, "T1").pay("first", "second")
    assert store.next_pending("T1").payment_id == "first"  # type: ignore[union-attr]
    store.defer("first", NOW_MS + 5_000, "unavailable: try later")
    # The oldest payment is not due: the terminal is not claimed (nothing overtakes it).
    assert store.claim_terminal("A", NOW_MS, LEASE_MS) is None
    assert store.claim_terminal("A", NOW_MS + 5_000, LEASE_MS) == "T1"
    payment = store.get_payment("first")
    assert payment is not None and payment.last_error == "unavailable: try later"


def test_attempts_then_outcome_recorded_exactly_once(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    Till(store, "T1").pay("p1", email="a@example.com")
    assert store.claim_terminal("A", NOW_MS, LEASE_MS) == "T1"
    first = store.begin_attempt("p1", "A", NOW_MS + 1_000, LEASE_MS)
    assert first.action is AttemptAction.CHARGE and first.payment.attempts == 0
    # The first attempt extends the lease and says "forwarding" on server/T.
    assert store.claim_terminal("B", NOW_MS + LEASE_MS, LEASE_MS) is None
    assert _statuses(store, "T1", "p1") == ["forwarding"]
    second = other.begin_attempt("p1", "B", NOW_MS + 1, LEASE_MS)
    assert second.action is AttemptAction.LOOKUP  # an earlier attempt may have charged
    change = StatusChange("p1", Status.APPROVED, NOW_MS + 2, "approved", "ok")
    results = backend.parallel(
        lambda s: s.record_outcome(change, "ref-1", NOW_MS + 2), [(s,) for s in (store, other) * 3]
    )
    assert results.count(True) == 1
    assert _statuses(store, "T1", "p1") == ["forwarding", "approved"]
    payment = store.get_payment("p1")
    assert payment is not None
    assert (payment.status, payment.fwd_state, payment.processor_ref) == (
        "approved",
        "done",
        "ref-1",
    )
    assert payment.processed_at_ms == NOW_MS + 2 and payment.attempts == 2
    assert store.begin_attempt("p1", "A", NOW_MS + 3, LEASE_MS).action is AttemptAction.DONE
    declined = StatusChange("p1", Status.OFFLINE_DECLINED, NOW_MS + 4, "declined", "no")
    assert store.record_outcome(declined, None, NOW_MS + 4) is False  # final stays final
    assert store.next_pending("T1") is None
    with pytest.raises(Refused):
        store.begin_attempt("unknown", "A", NOW_MS, LEASE_MS)


def test_park_stops_forwarding(backend: Backend) -> None:
    store = backend.store
    Till(store, "T1").pay("p1")
    store.begin_attempt("p1", "A", NOW_MS, LEASE_MS)
    store.park("p1", "idempotency conflict")
    payment = store.get_payment("p1")
    assert payment is not None and payment.fwd_state == "error"
    assert store.claim_terminal("A", NOW_MS, LEASE_MS) is None
    assert store.counts()["forwards_parked"] == 1


# -- resolving parked payments -----------------------------------------------------------------


def _park(store: Store, *payment_ids: str) -> None:
    """Attempt and park the payments, as the forwarder does on an idempotency conflict."""
    for pid in payment_ids:
        assert store.begin_attempt(pid, "A", NOW_MS, LEASE_MS).action is AttemptAction.CHARGE
        store.park(pid, "idempotency conflict: key used for another request")


def test_parked_payments_are_listed_by_their_forwarding_state(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    for pid in ("p1", "p2", "p3", "p4", "p5"):
        till.pay(pid)
    _park(store, "p2", "p4", "p5")

    def listed(**kw: Any) -> list[str]:
        return [p.payment_id for p in store.list_payments(PaymentFilter("m1", **kw))]

    assert listed(forwarding="error") == ["p2", "p4", "p5"]
    assert listed(forwarding="pending") == ["p1", "p3"]
    assert listed(forwarding="done") == []
    assert listed(forwarding="error", limit=2) == ["p2", "p4"]
    assert listed(forwarding="error", after_payment_id="p4") == ["p5"]
    assert listed(forwarding="error", terminal_id="T2") == []
    assert listed() == ["p1", "p2", "p3", "p4", "p5"]
    assert [
        p.payment_id for p in store.list_payments(PaymentFilter("m2", forwarding="error"))
    ] == []


def test_the_parked_list_reads_the_parked_index_on_sqlite(tmp_path: Path) -> None:
    store = sqlite_module.SqliteStore(tmp_path / "s.db")
    store.open()
    try:
        where, args = payment_filter_sql(PaymentFilter("m1", forwarding="error"), "?")
        plan = store.conn.execute(
            f"EXPLAIN QUERY PLAN SELECT payment_id FROM payments WHERE {where} "
            "ORDER BY payment_id LIMIT 10",
            args,
        ).fetchall()
        assert any("payments_parked" in str(row[-1]) for row in plan), plan
    finally:
        store.close()


def _resolutions(store: Store) -> list[tuple[int, str, str, dict[str, Any]]]:
    """The audit rows of resolutions, oldest first (``audit_log`` is on both backends)."""
    rows = cast(Any, store).audit_log(1_000)
    return [
        (at, actor, action, json.loads(detail))
        for at, actor, action, detail in reversed(rows)
        if action == "payment.resolve"
    ]


def test_resolve_retry_forwards_again_under_the_same_key(backend: Backend) -> None:
    store = backend.store
    Till(store, "T1").pay("p1", "p2")
    _park(store, "p1")
    store.defer("p2", NOW_MS + HOUR_MS, "unavailable")  # p1 is not held up by p2
    assert store.claim_terminal("A", NOW_MS, LEASE_MS) is None  # parked: not forwarded
    retry = Resolution("retry", note="conflicting record voided at the processor")
    payment = store.resolve_parked("p1", retry, "key:k1", NOW_MS + 5)
    assert (payment.fwd_state, payment.next_attempt_at_ms, payment.attempts) == ("pending", 0, 1)
    assert payment.status == "forwarding" and store.counts()["forwards_parked"] == 0
    assert store.claim_terminal("A", NOW_MS + 10, LEASE_MS) == "T1"
    assert store.next_pending("T1") == payment
    # Attempted before: the forwarder looks the same key up before charging (never a new key).
    assert store.begin_attempt("p1", "A", NOW_MS + 10, LEASE_MS).action is AttemptAction.LOOKUP
    assert _statuses(store, "T1", "p1") == ["forwarding"]  # no status op for a retry
    assert _resolutions(store) == [
        (
            NOW_MS + 5,
            "key:k1",
            "payment.resolve",
            {
                "payment_id": "p1",
                "action": "retry",
                "note": "conflicting record voided at the processor",
            },
        )
    ]


def test_resolve_approved_or_declined_finalizes_like_an_answer(backend: Backend) -> None:
    """Same status op, escrow release and receipt outbox as a processor answer."""
    store = backend.store
    Till(store, "T1").pay("ok", "no", "quiet", email="c@example.com")
    _park(store, "ok", "no", "quiet")

    def released() -> int:
        (share,) = store.escrow_state("m1").terminals
        return share.released_minor

    approved = store.resolve_parked(
        "ok", Resolution("approved", processor_ref="ch_0000000042"), "key:k1", NOW_MS + 1
    )
    assert (approved.status, approved.fwd_state, approved.processor_ref) == (
        "approved",
        "done",
        "ch_0000000042",
    )
    assert approved.code == "approved" and approved.processed_at_ms == NOW_MS + 1
    assert released() == 1_000
    declined = store.resolve_parked(
        "no", Resolution("declined", code="do_not_honor", note="see case 7"), "key:k2", NOW_MS + 2
    )
    assert (declined.status, declined.code, declined.fwd_state) == (
        "offline_declined",
        "do_not_honor",
        "done",
    )
    assert declined.processor_ref is None and released() == 2_000
    assert _statuses(store, "T1", "ok") == ["forwarding", "approved"]
    assert _statuses(store, "T1", "no") == ["forwarding", "offline_declined"]
    (op,) = [
        o
        for o in _server_ops(store, "T1")
        if o.kind == "status" and o.body["payment_id"] == "no" and o.body["status"] != "forwarding"
    ]
    assert op.body["code"] == "do_not_honor" and op.body["at_ms"] == NOW_MS + 2
    assert store.receipt_states() == {"ok": "pending", "no": "pending"}
    assert store.counts()["forwards_parked"] == 1  # "quiet" is still parked
    assert [(r[1], r[3]) for r in _resolutions(store)] == [
        ("key:k1", {"payment_id": "ok", "action": "approved", "processor_ref": "ch_0000000042"}),
        (
            "key:k2",
            {
                "payment_id": "no",
                "action": "declined",
                "code": "do_not_honor",
                "note": "see case 7",
            },
        ),
    ]


def test_resolve_refuses_what_is_not_parked_and_changes_nothing(backend: Backend) -> None:
    store = backend.store
    Till(store, "T1").pay("pending", "done", "parked")
    assert store.record_outcome(StatusChange("done", Status.APPROVED, NOW_MS), "r", NOW_MS)
    _park(store, "parked")
    retry = Resolution("retry")
    with pytest.raises(Refused, match=r"payment pending is not parked \(state: pending\)") as e:
        store.resolve_parked("pending", retry, "key:k1", NOW_MS)
    assert e.value.reason == "not_parked"
    with pytest.raises(Refused, match=r"payment done is not parked \(state: done\)"):
        store.resolve_parked("done", Resolution("declined", code="x"), "key:k1", NOW_MS)
    with pytest.raises(Refused) as unknown:
        store.resolve_parked("nope", retry, "key:k1", NOW_MS)
    assert unknown.value.reason == "unknown_payment"
    # An approval without the processor's reference is not a resolution.
    with pytest.raises(ConfigError):
        store.resolve_parked("parked", Resolution("approved"), "key:k1", NOW_MS)
    parked = store.get_payment("parked")
    assert parked is not None and parked.fwd_state == "error"
    assert store.get_payment("done").status == "approved"  # type: ignore[union-attr]
    assert _resolutions(store) == []


def test_two_operators_resolving_at_once_one_wins(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    Till(store, "T1").pay("p1", email="c@example.com")
    _park(store, "p1")
    choices = [
        Resolution("approved", processor_ref="ch_1"),
        Resolution("declined", code="do_not_honor"),
        Resolution("retry"),
    ]

    def resolve(i: int) -> str:
        try:
            s = (store, other)[i % 2]
            s.resolve_parked("p1", choices[i % 3], f"key:k{i}", NOW_MS + i)
        except Refused as exc:
            return exc.reason
        return "won"

    outcomes = backend.parallel(resolve, [(i,) for i in range(12)])
    assert sorted(outcomes) == ["not_parked"] * 11 + ["won"]
    (winner,) = _resolutions(store)
    statuses = _statuses(store, "T1", "p1")
    payment = store.get_payment("p1")
    assert payment is not None
    if winner[3]["action"] == "retry":
        assert statuses == ["forwarding"] and payment.fwd_state == "pending"
        assert store.receipt_states() == {}
    else:
        assert len(statuses) == 2 and payment.fwd_state == "done"  # one final status
        assert store.receipt_states() == {"p1": "pending"}


# -- expiry ------------------------------------------------------------------------------------


def test_expiry_never_touches_an_attempted_payment(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    till.pay("late", "attempted", "fresh", expires_at_ms=NOW_MS + HOUR_MS)
    store.begin_attempt("attempted", "A", NOW_MS, LEASE_MS)  # may have charged
    after = NOW_MS + HOUR_MS
    expired = store.expire_due(after, 100)
    assert sorted(c.payment_id for c in expired) == ["fresh", "late"]
    assert store.expire_due(after, 100) == []  # once
    assert _statuses(store, "T1", "late") == ["expired"]
    late = store.get_payment("late")
    assert late is not None and (late.status, late.processed_at_ms) == ("expired", None)
    attempted = store.get_payment("attempted")
    assert attempted is not None and attempted.fwd_state == "pending"


def test_first_attempt_after_the_deadline_only_looks_up(backend: Backend) -> None:
    """Never a charge after the deadline, but a lookup first: a restored server cannot know
    whether it charged the payment before (the forwarder expires it if nothing is found)."""
    store = backend.store
    Till(store, "T1").pay("p1", "p2", expires_at_ms=NOW_MS + 10)
    attempt = store.begin_attempt("p1", "A", NOW_MS + 10, LEASE_MS)
    assert attempt.action is AttemptAction.LOOKUP
    assert _statuses(store, "T1", "p1") == ["forwarding"]
    payment = store.get_payment("p1")
    assert payment is not None and (payment.attempts, payment.fwd_state) == (1, "pending")
    assert store.begin_attempt("p2", "A", NOW_MS + 9, LEASE_MS).action is AttemptAction.CHARGE


def test_expiry_racing_attempts_never_expires_a_charged_payment(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    ids = Till(store, "T1").pay(*(f"p{i}" for i in range(20)), expires_at_ms=NOW_MS + 100)
    # Attempts with a clock just before the deadline race the sweep just after it.
    attempted: list[str] = []

    def attempt_all() -> None:
        for pid in ids:
            if (
                other.begin_attempt(pid, "A", NOW_MS + 99, LEASE_MS).action
                is not AttemptAction.DONE
            ):
                attempted.append(pid)

    backend.parallel(lambda f: f(), [(attempt_all,), (lambda: store.expire_due(NOW_MS + 100, 5),)])
    store.expire_due(NOW_MS + 100, 100)
    for pid in ids:
        payment = store.get_payment(pid)
        assert payment is not None
        if pid in attempted:
            assert payment.status == "forwarding" and payment.fwd_state == "pending", pid
        else:
            assert payment.status == "expired", pid


# -- receipts ----------------------------------------------------------------------------------


def test_receipts_outbox_claimed_and_sent_once(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    till = Till(store, "T1")
    till.pay("ok", "no", "none", email="c@example.com")
    till.pay("quiet")  # no email: no receipt
    for pid, status in (
        ("ok", Status.APPROVED),
        ("no", Status.OFFLINE_DECLINED),
        ("quiet", Status.APPROVED),
    ):
        store.begin_attempt(pid, "A", NOW_MS, LEASE_MS)
        store.record_outcome(StatusChange(pid, status, NOW_MS), None, NOW_MS)
    store.expire_due(NOW_MS + 24 * HOUR_MS, 10)  # "none" expires: no receipt
    assert store.receipt_states() == {"ok": "pending", "no": "pending"}
    jobs = backend.parallel(
        lambda s: s.claim_receipts(NOW_MS, LEASE_MS, 10), [(s,) for s in (store, other) * 2]
    )
    claimed = [j.payment_id for batch in jobs for j in batch]
    assert sorted(claimed) == ["no", "ok"]  # each claimed by one claimer only
    job = next(j for batch in jobs for j in batch if j.payment_id == "ok")
    assert (job.email, job.status, job.amount_minor, job.attempts) == (
        "c@example.com",
        "approved",
        1_000,
        1,
    )
    store.receipt_sent("ok", NOW_MS + 1)
    store.receipt_failed("no", NOW_MS + 5_000, "smtp down")
    assert store.claim_receipts(NOW_MS + 1, LEASE_MS, 10) == []  # "no" waits for its retry
    again = store.claim_receipts(NOW_MS + 5_000, LEASE_MS, 10)
    assert [(j.payment_id, j.attempts) for j in again] == [("no", 2)]
    assert store.receipt_states() == {"ok": "sent", "no": "pending"}
    assert store.counts()["receipts_sent"] == 1
    # Ended unsent (refused for good, or too many attempts): never claimed again.
    store.receipt_undeliverable("no", "refused: 550 no such user", NOW_MS + 6_000)
    store.receipt_undeliverable("ok", "late", NOW_MS + 6_000)  # sent: stays sent
    assert store.receipt_states() == {"ok": "sent", "no": "undeliverable"}
    assert store.claim_receipts(NOW_MS + HOUR_MS, LEASE_MS, 10) == []
    counts = store.counts()
    assert (counts["receipts_pending"], counts["receipts_undeliverable"]) == (0, 1)


# -- refunds, disputes, voids ------------------------------------------------------------------


def _approved(store: Store, till: Till, pid: str, amount_minor: int = 1_000) -> None:
    till.pay(pid, amount_minor=amount_minor)
    store.begin_attempt(pid, "A", NOW_MS, LEASE_MS)
    assert store.record_outcome(StatusChange(pid, Status.APPROVED, NOW_MS), "r", NOW_MS)


def _refunded(store: Store, payment_id: str) -> int:
    payment = store.get_payment(payment_id)
    assert payment is not None
    return payment.refunded_minor


def test_a_refund_the_processor_refuses_ends_refused_and_frees_its_amount(
    backend: Backend,
) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "p1", 1_000)
    ops_before = len(_server_ops(store, "T1"))
    refund = store.begin_refund("p1", "r1", 600, "key:x", NOW_MS)
    assert refund.state == "pending" and _refunded(store, "p1") == 600
    refused = store.refuse_refund(
        "r1", "charge_not_found", "no such charge", "processor", NOW_MS + 1
    )
    assert (refused.state, refused.processed_at_ms) == ("refused", NOW_MS + 1)
    assert _refunded(store, "p1") == 0
    assert [r.refund_id for r in store.pending_refunds(10)] == []
    assert len(_server_ops(store, "T1")) == ops_before  # the terminal is told nothing
    actions = [(a, d) for _, _, a, d in cast(Any, store).audit_log(10)]
    assert ("refund.refused", "p1 r1 charge_not_found: no such charge") in actions
    # final: neither a second refusal nor a late confirmation changes it
    assert store.refuse_refund("r1", "again", "x", "processor", NOW_MS + 2).state == "refused"
    assert store.finish_refund("r1", NOW_MS + 3).state == "refused"
    assert _refunded(store, "p1") == 0
    # the whole amount is refundable again, under a new id
    assert store.begin_refund("p1", "r2", 1_000, "key:x", NOW_MS + 4).state == "pending"
    assert store.finish_refund("r2", NOW_MS + 5).state == "done"
    assert store.refuse_refund("r2", "late", "x", "processor", NOW_MS + 6).state == "done"
    with pytest.raises(Refused):
        store.refuse_refund("nope", "x", "x", "processor", NOW_MS)


def _refund_audit(store: Store) -> list[tuple[str, str, str]]:
    """(actor, action, detail) of the refund audit rows, oldest first."""
    rows = cast(Any, store).audit_log(1_000)
    return [(actor, a, d) for _, actor, a, d in reversed(rows) if a.startswith("refund.")]


def test_a_parked_refund_waits_for_a_person_and_keeps_its_amount(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "p1", 1_000)
    ops_before = len(_server_ops(store, "T1"))
    for rid, amount in (("r1", 300), ("r2", 200), ("r3", 100)):
        store.begin_refund("p1", rid, amount, "key:x", NOW_MS)
        assert store.refunds_of("p1")[-1].last_error is None  # pending: no reason yet
        parked = store.park_refund(rid, "idempotency_conflict: used", "processor", NOW_MS + 1)
        assert parked.state == "parked"
        assert parked.last_error == "idempotency_conflict: used"  # why, on the refund
    # Not retried, still counted (nothing can be refunded twice), listed for a person.
    assert store.pending_refunds(10) == []
    assert _refunded(store, "p1") == 600
    assert [r.refund_id for r in store.list_refunds("m1", "parked", 10)] == ["r1", "r2", "r3"]
    assert [r.refund_id for r in store.list_refunds("m1", "parked", 2)] == ["r1", "r2"]
    assert store.list_refunds("other", "parked", 10) == []
    assert store.list_refunds("m1", "pending", 10) == []
    counts = store.counts()
    assert (counts["refunds_parked"], counts["refunds_pending"]) == (3, 0)
    # Parking is for pending refunds only; a parked one is not parked again.
    again = store.park_refund("r1", "again", "processor", NOW_MS + 2)
    assert again.state == "parked" and again.last_error == "idempotency_conflict: used"
    with pytest.raises(Refused) as unknown:
        store.park_refund("nope", "x", "processor", NOW_MS)
    assert unknown.value.reason == "unknown_refund"
    # A person decides: retry (pending again), done (with its op), refused (amount freed).
    with pytest.raises(ConfigError):
        store.resolve_refund("r1", "approved", "key:m", None, NOW_MS + 3)
    retried = store.resolve_refund("r1", "retry", "key:m", "fixed there", NOW_MS + 3)
    assert retried.state == "pending"
    assert [r.refund_id for r in store.pending_refunds(10)] == ["r1"]
    assert [r.refund_id for r in store.list_refunds("m1", "pending", 10)] == ["r1"]
    done = store.resolve_refund("r2", "done", "key:m", None, NOW_MS + 4)
    assert (done.state, done.processed_at_ms) == ("done", NOW_MS + 4)
    refund_ops = [op for op in _server_ops(store, "T1")[ops_before:] if op.kind == "refund"]
    assert [op.body["refund_id"] for op in refund_ops] == ["r2"]
    refused = store.resolve_refund("r3", "refused", "key:m", "not at the processor", NOW_MS + 5)
    assert refused.state == "refused"
    assert _refunded(store, "p1") == 500  # r1 (pending) + r2 (done); r3 freed
    # Only a parked refund is resolved: the second of two people is refused.
    for rid, state in (("r1", "pending"), ("r2", "done"), ("r3", "refused")):
        with pytest.raises(Refused) as err:
            store.resolve_refund(rid, "refused", "key:late", None, NOW_MS + 6)
        assert err.value.reason == "not_parked" and f"(state: {state})" in str(err.value)
    with pytest.raises(Refused) as err:
        store.resolve_refund("nope", "retry", "key:m", None, NOW_MS)
    assert err.value.reason == "unknown_refund"
    assert _refunded(store, "p1") == 500
    audit = _refund_audit(store)
    assert ("processor", "refund.parked", "p1 r1 idempotency_conflict: used") in audit
    resolutions = [(actor, json.loads(d)) for actor, a, d in audit if a == "refund.resolve"]
    assert resolutions == [
        (
            "key:m",
            {"payment_id": "p1", "refund_id": "r1", "action": "retry", "note": "fixed there"},
        ),
        ("key:m", {"payment_id": "p1", "refund_id": "r2", "action": "done"}),
        (
            "key:m",
            {
                "payment_id": "p1",
                "refund_id": "r3",
                "action": "refused",
                "note": "not at the processor",
            },
        ),
    ]
    assert (
        "key:m",
        "refund.refused",
        f"p1 r3 {RESOLVED_NOT_MADE_CODE}: {RESOLVED_NOT_MADE_TEXT}",
    ) in audit
    counts = store.counts()
    assert (counts["refunds_parked"], counts["refunds_pending"]) == (0, 1)


def test_refunds_never_exceed_the_amount_even_concurrently(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    till = Till(store, "T1")
    _approved(store, till, "p1", 1_000)

    def rules(payment: Any, refunds: Any) -> None:
        if payment.refunded_minor + 300 > payment.amount_minor:
            raise Refused("refund_exceeds_amount", "too much")

    def refund(i: int) -> str:
        try:
            (store, other)[i % 2].begin_refund("p1", f"r{i}", 300, "key:x", NOW_MS, rules)
        except Refused as exc:
            return exc.reason
        return "ok"

    outcomes = backend.parallel(refund, [(i,) for i in range(6)])
    assert outcomes.count("ok") == 3 and outcomes.count("refund_exceeds_amount") == 3
    payment = store.get_payment("p1")
    assert payment is not None and payment.refunded_minor == 900
    ok_ids = sorted(r.refund_id for r in store.refunds_of("p1"))
    assert len(ok_ids) == 3 and {r.state for r in store.refunds_of("p1")} == {"pending"}
    # Re-sending a refund id with the same payment and amount returns it; otherwise refused.
    assert store.begin_refund("p1", ok_ids[0], 300, "key:x", NOW_MS).refund_id == ok_ids[0]
    with pytest.raises(Refused, match="already used"):
        store.begin_refund("p1", ok_ids[0], 100, "key:x", NOW_MS)
    with pytest.raises(InvariantViolation):
        store.begin_refund("p1", "r-too-much", 200, "key:x", NOW_MS)  # no rules: invariant
    with pytest.raises(Refused):
        store.begin_refund("nope", "r-x", 1, "key:x", NOW_MS)
    assert [r.refund_id for r in store.pending_refunds(10)] == sorted(
        ok_ids, key=lambda r: (NOW_MS, r)
    )
    done = backend.parallel(
        lambda s: s.finish_refund(ok_ids[0], NOW_MS + 5), [(s,) for s in (store, other) * 2]
    )
    assert {d.state for d in done} == {"done"}
    refund_ops = [op for op in _server_ops(store, "T1") if op.kind == "refund"]
    assert [op.body["refund_id"] for op in refund_ops] == [ok_ids[0]]  # appended once
    with pytest.raises(Refused):
        store.finish_refund("nope", NOW_MS)


def test_disputes_and_voids(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "p1")
    store.set_dispute("p1", True, "key:x", NOW_MS)
    store.set_dispute("p1", True, "key:x", NOW_MS)  # no change: no op
    store.set_dispute("p1", False, "key:x", NOW_MS + 1)
    disputes = [op.body["open"] for op in _server_ops(store, "T1") if op.kind == "dispute"]
    assert disputes == [True, False]
    payment = store.get_payment("p1")
    assert payment is not None and payment.dispute_open is False
    # A void request travels in a merge batch and is handled once.
    head = till.ops[-1]
    void = make_next(
        head, "T1", Hlc(NOW_MS, 1), "void_request", {"payment_id": "p1", "at_ms": NOW_MS}
    )
    till.ops.append(void)

    batch = MergeBatch(
        "T1",
        "m1",
        head.seq,
        head.digest,
        (void,),
        (),
        (),
        (VoidRequest("p1", NOW_MS),),
        None,
        NOW_MS,
    )
    assert isinstance(store.merge_batch(batch), BatchStored)
    assert store.pending_voids(10) == [("p1", "T1", NOW_MS)]
    ops_before = len(_server_ops(store, "T1"))
    assert store.finish_void("p1", "voided", NOW_MS + 1) is None  # its refund op tells it
    assert store.pending_voids(10) == []
    assert len(_server_ops(store, "T1")) == ops_before


def _void_requested(store: Store, till: Till, pid: str) -> None:
    head = till.ops[-1]
    void = make_next(
        head, "T1", Hlc(NOW_MS, head.seq), "void_request", {"payment_id": pid, "at_ms": NOW_MS}
    )
    till.ops.append(void)
    request = (VoidRequest(pid, NOW_MS),)
    batch = MergeBatch("T1", "m1", head.seq, head.digest, (void,), (), (), request, None, NOW_MS)
    assert isinstance(store.merge_batch(batch), BatchStored)


def test_a_refused_void_is_told_to_its_terminal_once(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "p1")
    _void_requested(store, till, "p1")
    assert store.finish_void("p1", "refused_rules", NOW_MS + 5) == "T1"
    last = _server_ops(store, "T1")[-1]
    assert last.kind == "status"
    assert last.body["payment_id"] == "p1"
    assert last.body["status"] == "approved"  # repeated: it moves nothing
    assert last.body["code"] == VOID_REFUSED_CODE_PREFIX + "refused_rules"
    assert "time zone" in last.body["message"]
    assert _statuses(store, "T1", "p1")[-2:] == ["approved", "approved"]
    payment = store.get_payment("p1")
    assert payment is not None and payment.status == "approved" and payment.code == ""
    # ended: a second end (another process, a retried job) writes nothing
    ops = len(_server_ops(store, "T1"))
    assert store.finish_void("p1", "refused_rules", NOW_MS + 6) is None
    assert store.finish_void("p1", "voided", NOW_MS + 6) is None
    assert len(_server_ops(store, "T1")) == ops


def test_a_void_whose_refund_ends_refused_is_told_to_its_terminal(backend: Backend) -> None:
    """A void is recorded made while its refund waits (processor down) or is parked; the
    terminal hears it made only from the refund op. If that refund ends refused instead
    (by the processor on a retry, or by a person), the terminal is told the refusal."""
    store = backend.store
    till = Till(store, "T1")
    for pid in ("p1", "p2", "p3"):
        _approved(store, till, pid)
        _void_requested(store, till, pid)
        store.begin_refund(pid, f"void:{pid}", 1_000, "terminal:T1", NOW_MS + 1)
        assert store.finish_void(pid, "voided", NOW_MS + 2) is None  # its refund op will tell
    store.park_refund("void:p2", "idempotency_conflict: used", "processor", NOW_MS + 3)
    ops_before = len(_server_ops(store, "T1"))

    store.refuse_refund(
        "void:p1", "charge_not_found", "no charge: none held", "processor", NOW_MS + 4
    )
    store.resolve_refund("void:p2", "refused", "key:m", None, NOW_MS + 5)
    store.finish_refund("void:p3", NOW_MS + 6)  # made: its refund op, no refusal
    new = _server_ops(store, "T1")[ops_before:]
    assert [(op.kind, op.body["payment_id"], op.body.get("code")) for op in new] == [
        ("status", "p1", VOID_REFUSED_CODE_PREFIX + "refused_charge_not_found"),
        ("status", "p2", VOID_REFUSED_CODE_PREFIX + "refused_not_made"),
        ("refund", "p3", None),
    ]
    assert all(op.body["status"] == "approved" for op in new if op.kind == "status")
    # Told once: a later end of those voids or refunds writes nothing more.
    assert store.finish_void("p1", "voided", NOW_MS + 7) is None
    assert store.refuse_refund("void:p1", "again", "x", "processor", NOW_MS + 7).state == "refused"
    assert len(_server_ops(store, "T1")) == ops_before + 3
    # An ordinary refund that ends refused is no void's: no status op.
    _approved(store, till, "p4")
    ops_before = len(_server_ops(store, "T1"))
    store.begin_refund("p4", "r4", 500, "key:x", NOW_MS + 8)
    store.refuse_refund("r4", "charge_not_found", "no charge", "processor", NOW_MS + 9)
    assert len(_server_ops(store, "T1")) == ops_before


def test_a_void_of_a_payment_the_server_does_not_hold_writes_no_status(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "p1")
    _void_requested(store, till, "ghost")
    ops = len(_server_ops(store, "T1"))
    assert store.finish_void("ghost", "refused_unknown", NOW_MS + 5) is None
    assert store.pending_voids(10) == []
    assert len(_server_ops(store, "T1")) == ops


# -- batches and reports -----------------------------------------------------------------------


def test_batches_hold_what_was_processed_before_the_close(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    till = Till(store, "T1")
    _approved(store, till, "early", 1_000)
    refund = store.begin_refund("early", "r1", 400, "key:x", NOW_MS)
    store.finish_refund(refund.refund_id, NOW_MS + 1)
    till.pay("late", amount_minor=2_000)
    store.begin_attempt("late", "A", NOW_MS, LEASE_MS)
    store.record_outcome(StatusChange("late", Status.APPROVED, NOW_MS + 10), None, NOW_MS + 10)
    closes = backend.parallel(
        lambda s: s.close_batch("m1", "2026-09-21", NOW_MS + 5, NOW_MS + 20),
        [(s,) for s in (store, other) * 2],
    )
    batches = [b for b in closes if b is not None]
    assert len(batches) == 1  # one close per merchant and day, whoever runs the job
    batch = batches[0]
    assert (batch.payments_count, batch.sales_minor, batch.refunds_minor) == (1, 1_000, 400)
    assert [p.payment_id for p in store.batch_payments(batch.batch_id)] == ["early"]
    in_batch = store.list_payments(PaymentFilter("m1", batch_id=batch.batch_id))
    assert [p.payment_id for p in in_batch] == ["early"]
    assert store.get_batch(batch.batch_id) == batch
    assert store.list_batches("m1", 10) == [batch]
    assert store.last_closed_day("m1") == "2026-09-21"
    nxt = store.close_batch("m1", "2026-09-22", NOW_MS + 50, NOW_MS + 60)
    assert nxt is not None and nxt.payments_count == 1 and nxt.sales_minor == 2_000
    in_next = store.list_payments(PaymentFilter("m1", batch_id=nxt.batch_id))
    assert [p.payment_id for p in in_next] == ["late"]
    assert store.get_batch_of_day("m1", "2026-09-21") == batch
    assert store.get_batch_of_day("m1", "2026-09-22") == nxt
    assert store.get_batch_of_day("m1", "2026-09-23") is None
    assert store.get_batch_of_day("m2", "2026-09-21") is None
    unbatched = store.list_payments(PaymentFilter("m1", payout_status="unbatched"))
    assert unbatched == []
    between = store.payments_between("m1", NOW_MS + 10, NOW_MS + 11)
    assert [p.payment_id for p in between] == ["late"]
    with pytest.raises(Refused):
        store.close_batch("nope", "2026-09-21", NOW_MS, NOW_MS)


def test_terminals_are_listed_in_pages(backend: Backend) -> None:
    store = backend.store
    for terminal_id in ("T3", "T1", "T2"):
        Till(store, terminal_id)
    assert [t["terminal_id"] for t in store.list_terminals("m1")] == ["T1", "T2", "T3"]
    assert [t["terminal_id"] for t in store.list_terminals("m1", limit=2)] == ["T1", "T2"]
    assert [t["terminal_id"] for t in store.list_terminals("m1", "T2", 2)] == ["T3"]
    assert store.list_terminals("m1", "T3", 2) == []
    assert store.list_terminals("m2") == []


def test_a_revoked_terminal_can_no_longer_store_anything(backend: Backend) -> None:
    """Revoked (lost, stolen, out of use): refused at load (no new session) and at the
    merge (a session still open, in any process); stored once, audited, only for the
    merchant's own terminal; the budget no longer waits for it after a restore."""
    store = backend.store
    till = Till(store, "T1")
    till.pay("before")
    assert store.revoke_terminal("m2", "T1", "key:k", NOW_MS + 1) is None  # not m2's
    assert store.revoke_terminal("m1", "T9", "key:k", NOW_MS + 1) is None  # no such
    assert store.revoke_terminal("m1", "T1", "key:k", NOW_MS + 2) == (NOW_MS + 2, True)
    assert store.revoke_terminal("m1", "T1", "key:k", NOW_MS + 3) == (NOW_MS + 2, False)
    info = store.load_terminal("T1")
    assert info is not None and not info.active
    head = till.ops[-1]
    pair = till.capture_op("after")
    with pytest.raises(Refused) as refused:
        store.merge_batch(till.batch([pair], head))
    assert refused.value.reason == "not_enrolled" and "revoked" in str(refused.value)
    assert store.get_payment("after") is None and store.get_payment("before") is not None
    [row] = store.list_terminals("m1")
    assert row["revoked_at_ms"] == NOW_MS + 2
    assert [t.revoked for t in store.escrow_state("m1").terminals] == [True]
    assert ("key:k", "terminal.revoke", "T1") in [a[1:] for a in cast(Any, store).audit_log(10)]


def test_standalone_off_turns_offline_off_everywhere_in_one_transaction(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R2: offline only where standalone is. The terminals' offline setting and the
    merchant's standalone one change together: a storage failure midway changes none."""
    store = backend.store
    store.update_merchant("m1", standalone_allowed=True, actor="k", now_ms=NOW_MS)
    for terminal_id in ("T1", "T2"):
        _offline_allowed(Till(store, terminal_id))
    Till(store, "T3")  # offline never allowed here
    ops_before = {t: len(_server_ops(store, t)) for t in ("T1", "T2", "T3")}
    audit = store.audit

    def failing_audit(actor: str, action: str, detail: str, now_ms: int) -> None:
        if action == "merchant.update":
            raise StorageError("disk I/O error")
        audit(actor, action, detail, now_ms)

    monkeypatch.setattr(store, "audit", failing_audit)
    with pytest.raises(StorageError):
        store.update_merchant("m1", standalone_allowed=False, actor="k", now_ms=NOW_MS + 1)
    monkeypatch.undo()
    for terminal_id in ("T1", "T2"):
        settings = store.get_terminal_settings(terminal_id)
        assert settings is not None and settings.offline_allowed is True
    assert {t: len(_server_ops(store, t)) for t in ops_before} == ops_before
    merchant = store.get_merchant("m1")
    assert merchant is not None and merchant.standalone_allowed is True

    touched = store.update_merchant("m1", standalone_allowed=False, actor="k", now_ms=NOW_MS + 2)
    assert touched == ["T1", "T2", "T3"]
    for terminal_id in ("T1", "T2", "T3"):
        settings = store.get_terminal_settings(terminal_id)
        assert settings is not None
        assert (settings.offline_allowed, settings.force_offline) == (False, False)
        new = [op.body for op in _server_ops(store, terminal_id)[ops_before[terminal_id] :]]
        offline_off = [{"key": "offline_allowed", "value": False}] if terminal_id != "T3" else []
        assert new == [*offline_off, {"key": "standalone_allowed", "value": False}]


def test_reports_views_and_settings(backend: Backend) -> None:
    store = backend.store
    till = Till(store, "T1")
    _approved(store, till, "a1", 1_500)
    till.pay("c1", amount_minor=700)
    z = store.z_report("T1", False, NOW_MS + 1)
    assert z["approved_minor"] == 1_500 and z["z_seq"] == 0
    reset = store.z_report("T1", True, NOW_MS + 1)
    assert reset["z_seq"] == 1 and store.z_report("T1", False, NOW_MS + 2)["lines"] == []
    flt = PaymentFilter("m1", status="approved", terminal_id="T1", channel="offline")
    assert [p.payment_id for p in store.list_payments(flt)] == ["a1"]
    page = store.list_payments(PaymentFilter("m1", limit=1, after_payment_id="a1"))
    assert [p.payment_id for p in page] == ["c1"]
    counts = store.counts()
    assert counts["payments_status_approved"] == 1 and counts["forwards_pending"] == 1
    assert counts["terminals"] == 1
    [row] = store.list_terminals("m1")
    assert row["terminal_id"] == "T1" and row["pending_forwards"] == 1
    # Settings: changed ones become ops on server/T; standalone is merchant-wide.
    settings = store.get_terminal_settings("T1")
    assert settings is not None and settings.offline_allowed is False
    changed = store.update_terminal_settings(
        "T1",
        default_settings("USD").__class__(True, 1_000, 9_000, "auto", 5_000, False),
        "k",
        NOW_MS,
    )
    assert {op.body["key"] for op in changed} >= {"offline_allowed", "total_limit"}
    same = store.get_terminal_settings("T1")
    assert same is not None
    assert store.update_terminal_settings("T1", same, "k", NOW_MS) == []
    pressed = store.update_terminal_settings("T1", same, "k", NOW_MS, frozenset({"force_offline"}))
    assert [op.body for op in pressed] == [{"key": "force_offline", "value": False}]
    assert store.update_merchant("m1", standalone_allowed=True, actor="k", now_ms=NOW_MS) == ["T1"]
    merchant = store.get_merchant("m1")
    assert merchant is not None and merchant.standalone_allowed is True
    assert store.update_merchant("m1", timezone="Europe/Paris", actor="k", now_ms=NOW_MS) == []
    assert [m.timezone for m in store.list_merchants()] == ["Europe/Paris"]
    _assert_chain(_server_ops(store, "T1"))
    with pytest.raises(Refused):
        store.z_report("nope", False, NOW_MS)


def test_enrollment_codes_are_one_time(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    store.create_enrollment_code(hash_secret("c1"), "m1", None, None, "k", NOW_MS, NOW_MS + 10)
    keys = [crypto.Ed25519KeyPair.from_private(bytes([i]) * 32) for i in (1, 2)]

    def enroll(i: int) -> str:
        try:
            (store, other)[i % 2].enroll(
                hash_secret("c1"),
                f"T{i}",
                keys[i % 2].public,
                "terminal",
                default_settings("USD"),
                NOW_MS,
            )
        except Refused as exc:
            return exc.reason
        return "ok"

    outcomes = backend.parallel(enroll, [(i,) for i in range(4)])
    assert outcomes.count("ok") == 1
    winner = f"T{outcomes.index('ok')}"
    info = store.load_terminal(winner)
    assert info is not None and info.active and info.server_seq == 6  # the setting ops
    # A retried enrollment (lost response) returns the terminal again.
    again = store.enroll(
        hash_secret("c1"), winner, info.public_key, "terminal", default_settings("USD"), NOW_MS
    )
    assert again == info
    with pytest.raises(Refused, match="not valid"):
        store.enroll(
            hash_secret("x"), "T9", keys[0].public, "terminal", default_settings("USD"), NOW_MS
        )
    key = store.get_api_key(hash_secret("owner"))
    assert key is not None and key.role is Role.OWNER and store.count_api_keys() == 1
    store.audit("k", "test.action", "detail", NOW_MS)


# -- merchant-wide offline budget (escrow) -----------------------------------------------------


def test_grants_from_concurrent_processes_never_exceed_the_budget(backend: Backend) -> None:
    store, other = backend.store, backend.another()
    for tid in ("T1", "T2"):
        _offline_allowed(Till(store, tid))
    store.set_offline_budget("m1", 1_000, "k", NOW_MS)

    def plan(state: Any) -> dict[str, int]:
        free = state.budget_minor - sum(t.granted_minor for t in state.terminals)
        grants: dict[str, int] = {}
        for t in state.terminals:
            if t.eligible and free >= 150:
                grants[t.terminal_id] = t.granted_minor + 150
                free -= 150
        return grants

    backend.parallel(
        lambda s: s.grant_budget("m1", plan, NOW_MS), [(s,) for s in (store, other) * 4]
    )
    state = store.escrow_state("m1")
    assert state.budget_minor == 1_000
    assert sum(t.granted_minor for t in state.terminals) == 900  # 6 grants of 150, not more
    for t in state.terminals:
        grants = [op for op in _server_ops(store, t.terminal_id) if op.kind == "grant"]
        assert grants[-1].body["total"]["minor"] == t.granted_minor
        _assert_chain(_server_ops(store, t.terminal_id))
    with pytest.raises(Refused):
        store.set_offline_budget("nope", 1, "k", NOW_MS)


def test_a_restored_database_holds_grants_until_the_terminals_are_back(
    backend: Backend,
) -> None:
    """mark_restored: grant_budget writes nothing while a terminal that holds a grant has not
    pushed since the restore, grants again once it has (or once the hold ran out)."""
    from syncengine.server.budget import RESTORE_HOLD_MS, plan_grants

    store = backend.store
    tills = {tid: _offline_allowed(Till(store, tid)) for tid in ("T1", "T2")}
    store.set_offline_budget("m1", 10_000, "k", NOW_MS)
    assert store.grant_budget("m1", plan_grants, NOW_MS) == ["T1", "T2"]
    restored = NOW_MS - 1  # T1's push below is merged at NOW_MS: after the restore
    store.mark_restored(restored)
    assert store.escrow_state("m1").held_by == ()  # a plain read holds nothing
    assert store.escrow_state("m1", NOW_MS).held_by == ("T1", "T2")
    store.set_offline_budget("m1", 20_000, "k", NOW_MS)  # more room to hand out: held
    assert store.grant_budget("m1", plan_grants, NOW_MS) == []
    tills["T1"].pay("r1")
    assert store.escrow_state("m1", NOW_MS).held_by == ("T2",)
    assert store.grant_budget("m1", plan_grants, NOW_MS) == []
    tills["T2"].pay("r2")
    assert store.escrow_state("m1", NOW_MS).held_by == ()
    assert store.grant_budget("m1", plan_grants, NOW_MS) == ["T1", "T2"]
    store.mark_restored(NOW_MS + 5)  # restored again: held again, until the hold runs out
    assert store.grant_budget("m1", plan_grants, NOW_MS + 10) == []
    later = NOW_MS + 5 + RESTORE_HOLD_MS
    assert store.escrow_state("m1", later).held_by == ()


def test_a_push_of_nothing_new_counts_as_back_only_while_a_restore_hold_waits(
    backend: Backend,
) -> None:
    """mark_seen: a terminal that pushed only what the store holds lifts its restore hold
    (the budget grants again), and writes nothing when no hold waits for it."""
    from syncengine.server.budget import plan_grants

    store = backend.store
    for tid in ("T1", "T2"):
        _offline_allowed(Till(store, tid))
    store.set_offline_budget("m1", 10_000, "k", NOW_MS)
    assert store.grant_budget("m1", plan_grants, NOW_MS) == ["T1", "T2"]
    assert store.mark_seen("T1", NOW_MS) is False  # never restored: nothing to record

    def seen(tid: str) -> int | None:
        return {t.terminal_id: t.last_seen_ms for t in store.escrow_state("m1").terminals}[tid]

    assert seen("T1") is None
    store.mark_restored(NOW_MS + 10)
    assert store.escrow_state("m1", NOW_MS + 20).held_by == ("T1", "T2")
    assert store.mark_seen("T1", NOW_MS + 20) is True
    assert seen("T1") == NOW_MS + 20
    assert store.mark_seen("T1", NOW_MS + 30) is False  # back already: no second write
    assert seen("T1") == NOW_MS + 20
    assert store.escrow_state("m1", NOW_MS + 30).held_by == ("T2",)
    store.set_offline_budget("m1", 20_000, "k", NOW_MS + 30)
    assert store.grant_budget("m1", plan_grants, NOW_MS + 30) == []  # T2 still away
    assert store.mark_seen("T2", NOW_MS + 40) is True
    assert store.escrow_state("m1", NOW_MS + 40).held_by == ()
    assert store.grant_budget("m1", plan_grants, NOW_MS + 40) == ["T1", "T2"]
    assert store.mark_seen("nope", NOW_MS + 40) is False


def test_the_sealed_card_is_read_back_from_the_capture_op(backend: Backend) -> None:
    """The card is stored once (in the op); every payment read, the forwarder's included,
    carries exactly the bytes the terminal sealed."""
    store = backend.store
    till = Till(store, "T1")
    till.pay("s1", "s2")
    for pid in ("s1", "s2"):
        payment = store.get_payment(pid)
        assert payment is not None and payment.sealed == SEALED
    pending = store.next_pending("T1")
    assert pending is not None and pending.payment_id == "s1" and pending.sealed == SEALED
    listed = store.list_payments(PaymentFilter(merchant_id="m1"))
    assert [p.sealed for p in listed] == [SEALED, SEALED]


def test_escrow_used_and_released_follow_captures_and_final_statuses(backend: Backend) -> None:
    """used = every offline capture held; released = those of them with a final status
    (approved, offline_declined, expired); other channels and other terminals count apart."""
    store = backend.store
    t1, t2 = Till(store, "T1"), Till(store, "T2")
    t1.pay("a", "b", "c", amount_minor=1_000)
    t1.pay("d", amount_minor=700, expires_at_ms=NOW_MS + 10)
    t1.pay("i", amount_minor=5_000, channel="integrated")
    t2.pay("e", amount_minor=300)

    def shares() -> dict[str, tuple[int, int]]:
        state = store.escrow_state("m1")
        return {t.terminal_id: (t.used_minor, t.released_minor) for t in state.terminals}

    assert shares() == {"T1": (3_700, 0), "T2": (300, 0)}
    assert store.record_outcome(StatusChange("a", Status.APPROVED, NOW_MS), "r", NOW_MS)
    assert store.record_outcome(StatusChange("b", Status.OFFLINE_DECLINED, NOW_MS), None, NOW_MS)
    assert store.record_outcome(StatusChange("i", Status.APPROVED, NOW_MS), "r2", NOW_MS)
    # A second outcome for a final payment changes nothing, the totals included.
    assert not store.record_outcome(
        StatusChange("a", Status.OFFLINE_DECLINED, NOW_MS), None, NOW_MS
    )
    assert shares() == {"T1": (3_700, 2_000), "T2": (300, 0)}
    expired = store.expire_due(NOW_MS + 20, 100)
    assert [c.payment_id for c in expired] == ["d"]
    assert shares() == {"T1": (3_700, 2_700), "T2": (300, 0)}


# -- PostgreSQL only: notifications across processes ---------------------------------------


def test_postgres_restore_marks_a_database_restored_with_its_own_tools(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``syncengine restore --store URL``: the PostgreSQL database was restored with pg
    tools; the command only marks it, so budget grants wait for the terminals."""
    from syncengine.cli import main
    from syncengine.server.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    store.open()
    try:
        store.ensure_merchant("m1", "USD", NOW_MS)
        Till(store, "T1")
        store.set_offline_budget("m1", 10_000, "k", NOW_MS)
        assert store.grant_budget("m1", lambda state: {"T1": 500}, NOW_MS) == ["T1"]
        assert main(["restore", "--store", pg_url]) == 0
        assert "marked" in capsys.readouterr().out
        soon = int(time.time() * 1000) + 1_000
        assert store.escrow_state("m1", soon).held_by == ("T1",)
    finally:
        store.close()


def test_postgres_watchers_hear_every_process_append(pg_url: str) -> None:
    writer, reader = pg_module.PostgresStore(pg_url), pg_module.PostgresStore(pg_url)
    writer.open()
    reader.open()
    heard: list[str | None] = []
    ready = threading.Event()
    got = threading.Event()

    def on_change(terminal_id: str | None) -> None:
        heard.append(terminal_id)
        (ready if terminal_id is None else got).set()

    try:
        writer.ensure_merchant("m1", "USD", NOW_MS)
        Till(writer, "T1")
        reader.watch(on_change)
        assert ready.wait(10)  # "anything may have changed" once listening
        started = time.monotonic()
        body = {"payment_id": "x", "open": True, "at_ms": NOW_MS}
        writer.append_server_ops("T1", [("dispute", body)], NOW_MS)
        assert got.wait(5)
        assert time.monotonic() - started < 1.0
        assert heard == [None, "T1"]
    finally:
        reader.close()  # stops the listener thread
        writer.close()


def test_postgres_store_survives_its_connections_being_killed(pg_url: str) -> None:
    store = pg_module.PostgresStore(pg_url, pool_connections_min=2, pool_connections_max=2)
    store.open()
    woken = threading.Semaphore(0)
    store.watch(lambda terminal_id: woken.release() if terminal_id is None else None)
    try:
        assert woken.acquire(timeout=10)
        store.ensure_merchant("m1", "USD", NOW_MS)
        # A database restart or failover, as the server sees it: every connection dies.
        # Only this test's database: other servers on this PostgreSQL are left alone.
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND (application_name = 'syncengine-serve' OR query ILIKE 'LISTEN%%')"
            )
        # The next calls get fresh connections; nothing fails, nothing is lost.
        for _ in range(4):
            assert store.get_merchant("m1") is not None
        assert woken.acquire(timeout=10)  # the listener reconnected and said "maybe all"
    finally:
        store.close()
