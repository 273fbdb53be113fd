"""ServerMachine driven sans I/O over a real SQLite store: merge laws and refusals."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import enrolled_store, run_effects

from syncengine.core import crypto, protocol
from syncengine.core.hlc import Hlc
from syncengine.core.ops import Op, make_next
from syncengine.server.merge import (
    Effect,
    ServerMachine,
)
from syncengine.server.store.sqlite import MIGRATIONS, SqliteStore

NOW_MS = 1_790_000_000_000
KEY = crypto.Ed25519KeyPair.from_private(b"\x01" * 32)


def _store(path: Path) -> SqliteStore:
    return enrolled_store(path, KEY.public, NOW_MS)


def _chain(n: int) -> list[Op]:
    ops: list[Op] = []
    prev: Op | None = None
    for i in range(n):
        body = {"from": "online", "to": "offline", "reason": f"r{i}", "at_ms": i}
        prev = make_next(prev, "T1", Hlc(NOW_MS + i, 0), "mode", body)
        ops.append(prev)
    return ops


def _push(ops: list[Op]) -> protocol.Push:
    last = ops[-1]
    sig = crypto.sign(KEY.private, crypto.chain_head_message("T1", last.seq, last.digest))
    return protocol.Push(tuple(ops), crypto.b64e(sig))


def _run(store: SqliteStore, m: ServerMachine, effects: list[Effect]) -> list[protocol.Message]:
    """Carry out effects like the shell does; return the messages sent."""
    return run_effects(store, m, effects, NOW_MS)


def _session(store: SqliteStore) -> ServerMachine:
    nonce = os.urandom(32)
    m = ServerMachine(crypto.Signer(KEY.private), nonce)
    _run(store, m, m.receive(protocol.Hello("T1", "t"), NOW_MS))
    sig = crypto.sign(KEY.private, crypto.challenge_message(nonce, "T1"))
    sent = _run(store, m, m.receive(protocol.Auth("T1", crypto.b64e(sig)), NOW_MS))
    assert isinstance(sent[0], protocol.Welcome)
    return m


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 29), max_size=6),
    order=st.randoms(use_true_random=False),
    replays=st.integers(0, 3),
)
def test_duplicated_reordered_replayed_batches_converge(
    tmp_path_factory: object, cuts: list[int], order: object, replays: int
) -> None:
    import random

    assert isinstance(order, random.Random)
    path = Path(str(tmp_path_factory.mktemp("m"))) / "s.db"  # type: ignore[attr-defined]
    store = _store(path)
    try:
        chain = _chain(30)
        bounds = sorted({0, 30, *cuts})
        batches = [chain[a:b] for a, b in itertools.pairwise(bounds)]
        deliveries = batches + [order.choice(batches) for _ in range(replays)]
        order.shuffle(deliveries)
        acked = 0
        for _ in range(len(deliveries) + 1):  # resend until everything is acked
            m = _session(store)
            for batch in deliveries:
                for msg in _run(store, m, m.receive(_push(batch), NOW_MS)):
                    assert not (isinstance(msg, protocol.Error) and msg.fatal), msg
                    if isinstance(msg, protocol.Ack):
                        assert msg.seq >= acked  # acks never go back
                        acked = msg.seq
            if acked == 30:
                break
            deliveries = [b for b in batches if b[-1].seq > acked]
        assert acked == 30
        stored, more = store.load_ops("T1", 0, 100)
        assert stored == chain and not more
    finally:
        store.close()


def test_storage_rules_and_versioned_migrations(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.db")
    pragmas = store.pragmas()
    assert str(pragmas["journal_mode"]).lower() == "wal"
    assert pragmas["synchronous"] == 2  # FULL
    assert pragmas["foreign_keys"] == 1
    assert store.schema_version() == len(MIGRATIONS)
    store.close()
    again = SqliteStore(tmp_path / "s.db")
    again.open()  # reopening applies nothing twice
    assert again.schema_version() == len(MIGRATIONS)
    second = SqliteStore(tmp_path / "s.db")
    try:
        second.open()
        raise AssertionError("a second process must not open the same SQLite store")
    except Exception as exc:  # StorageError
        assert "another server process" in str(exc)
    again.close()


def test_unauthenticated_push_changes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.db")
    m = ServerMachine(crypto.Signer(KEY.private), os.urandom(32))
    sent = _run(store, m, m.receive(_push(_chain(2)), NOW_MS))
    assert isinstance(sent[0], protocol.Error) and sent[0].code == "unexpected_message"
    assert m.closed
    assert store.load_ops("T1", 0, 10) == ([], False)
    store.close()


def test_a_first_pull_above_the_server_stream_is_counted_as_lost_server_data(
    tmp_path: Path,
) -> None:
    """A terminal that holds more of server/T than the server (restored from a backup)
    says so in its first Pull; the session counts it for the shell's log and metric.
    A later Pull above the head at auth is normal (ops written during the session)."""
    store = _store(tmp_path / "s.db")
    head = store.append_server_ops("T1", [("setting", {"key": "a", "value": 1})], NOW_MS)[0].seq
    m = _session(store)
    sent = _run(store, m, m.receive(protocol.Pull({"server/T1": head}), NOW_MS))
    assert isinstance(sent[0], protocol.ServerOps) and m.stats.server_stream_behind == 0
    store.append_server_ops("T1", [("setting", {"key": "b", "value": 2})], NOW_MS)
    _run(store, m, m.receive(protocol.Pull({"server/T1": head + 1}), NOW_MS))
    assert m.stats.server_stream_behind == 0

    behind = _session(store)
    _run(store, behind, behind.receive(protocol.Pull({"server/T1": head + 6}), NOW_MS))
    assert behind.stats.server_stream_behind == 5
    store.close()


def test_a_push_of_nothing_new_tells_the_store_once_a_session_that_the_terminal_is_back(
    tmp_path: Path,
) -> None:
    """A verified push of ops the store holds: acked, and the first of a session is a
    ``MarkSeen`` (a restore hold waits for it); a badly signed one is refused first."""
    from syncengine.server.merge import LoadChain, MarkSeen, Send

    store = _store(tmp_path / "s.db")
    chain = _chain(3)
    m = _session(store)
    assert _run(store, m, m.receive(_push(chain), NOW_MS)) == [protocol.Ack("T1", 3)]
    store.mark_restored(NOW_MS + 1)
    restored_seen = store.conn.execute("SELECT last_seen_ms FROM terminals").fetchone()[0]
    assert restored_seen == NOW_MS  # the merge above, before the restore

    m = _session(store)
    forged = protocol.Push((chain[-1],), crypto.b64e(b"\x00" * 64))
    sent = _run(store, m, m.receive(forged, NOW_MS + 2))
    assert isinstance(sent[0], protocol.Error) and sent[0].code == "bad_signature"
    assert store.conn.execute("SELECT last_seen_ms FROM terminals").fetchone()[0] == NOW_MS

    m = _session(store)
    effects = m.receive(_push([chain[-1]]), NOW_MS + 2)
    assert len(effects) == 1 and isinstance(effects[0], LoadChain)
    view = store.load_chain("T1", effects[0].seq_lo, effects[0].seq_hi)
    effects = m.chain_loaded(view, NOW_MS + 2)
    assert effects == [MarkSeen("T1")] and m.busy
    assert store.mark_seen("T1", NOW_MS + 2) is True
    assert m.seen_marked() == [Send(protocol.Ack("T1", 3))] and not m.busy
    # The next duplicate of the session is only acked.
    effects = m.receive(_push(chain[1:]), NOW_MS + 3)
    assert isinstance(effects[0], LoadChain)
    view = store.load_chain("T1", effects[0].seq_lo, effects[0].seq_hi)
    assert m.chain_loaded(view, NOW_MS + 3) == [Send(protocol.Ack("T1", 3))]
    assert store.conn.execute("SELECT last_seen_ms FROM terminals").fetchone()[0] == NOW_MS + 2
    assert m.stats.ops_duplicate == 3 and m.stats.ops_merged == 0
    store.close()
