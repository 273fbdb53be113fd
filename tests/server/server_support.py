"""Helpers the server tests share (imported by name; not a conftest)."""

from __future__ import annotations

from pathlib import Path

from syncengine.core import protocol
from syncengine.server.app import default_settings, hash_secret
from syncengine.server.merge import (
    Close,
    Effect,
    LoadChain,
    LoadServerOps,
    LoadTerminal,
    MarkSeen,
    Send,
    ServerMachine,
    StoreBatch,
)
from syncengine.server.model import Role
from syncengine.server.store import Store
from syncengine.server.store.sqlite import SqliteStore


def enrolled_store(path: Path, public_key: bytes, now_ms: int) -> SqliteStore:
    """An open SQLite store with merchant ``m1``, an owner key and terminal ``T1``."""
    store = SqliteStore(path)
    store.open()
    store.ensure_merchant("m1", "USD", now_ms)
    store.create_api_key(hash_secret("k"), "k", "m1", Role.OWNER, "t", now_ms)
    store.create_enrollment_code(hash_secret("c"), "m1", None, None, "t", now_ms, now_ms + 1)
    store.enroll(hash_secret("c"), "T1", public_key, "terminal", default_settings("USD"), now_ms)
    return store


def run_effects(
    store: Store, m: ServerMachine, effects: list[Effect], now_ms: int
) -> list[protocol.Message]:
    """Carry out effects like the shell does, store answers fed back; the messages sent.

    Stops at a Close, as the shell does.
    """
    sent: list[protocol.Message] = []
    queue = list(effects)
    while queue:
        e = queue.pop(0)
        if isinstance(e, Send):
            sent.append(e.message)
        elif isinstance(e, Close):
            break
        elif isinstance(e, LoadTerminal):
            queue += m.terminal_loaded(store.load_terminal(e.terminal_id), now_ms)
        elif isinstance(e, LoadChain):
            queue += m.chain_loaded(store.load_chain(e.origin, e.seq_lo, e.seq_hi), now_ms)
        elif isinstance(e, StoreBatch):
            queue += m.batch_stored(store.merge_batch(e.batch), now_ms)
        elif isinstance(e, MarkSeen):
            store.mark_seen(e.terminal_id, now_ms)
            queue += m.seen_marked()
        elif isinstance(e, LoadServerOps):
            ops, more = store.load_ops(e.origin, e.after_seq, e.ops_max)
            queue += m.server_ops_loaded(ops, more, now_ms)
    return sent
