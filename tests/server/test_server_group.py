"""Group commit over a real SQLite store: one transaction for many frames, answers only
after the commit, a frame's failure its own, a storage failure everyone's."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from syncengine.server.group import GroupCommitter, GroupFailed
from syncengine.server.store import StoreRunner
from syncengine.server.store.sqlite import SqliteStore

NOW_MS = 1_790_000_000_000


def _audit_rows(path: Path) -> list[str]:
    """What another connection sees: only committed rows."""
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT detail FROM audit ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "s.db")
    s.open()
    return s


async def test_frames_queued_together_share_one_commit_and_answer_after_it(
    store: SqliteStore,
) -> None:
    runner = StoreRunner(store)
    grouper = GroupCommitter(runner, store.group, store.in_transaction)
    gate = threading.Event()
    seen_at_answer: dict[str, list[str]] = {}

    async def frame(name: str) -> None:
        def work() -> str:
            if name == "first":
                gate.wait(5)  # hold the store thread so that the others queue up
            store.audit("t", "merge", name, NOW_MS)
            return name

        result = await grouper.submit(work)
        seen_at_answer[result] = _audit_rows(store.path)

    first = asyncio.create_task(frame("first"))
    await asyncio.sleep(0.05)
    others = [asyncio.create_task(frame(f"f{i}")) for i in range(5)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, *others)
    # Every answer came after the commit of the frame's group: its row was visible.
    for name, rows in seen_at_answer.items():
        assert name in rows
    assert grouper.largest == 5  # the five queued frames went in one transaction
    assert grouper.groups == 2
    runner.shutdown()
    store.close()


async def test_a_failing_frame_fails_alone(store: SqliteStore) -> None:
    runner = StoreRunner(store)
    grouper = GroupCommitter(runner, store.group, store.in_transaction)
    gate = threading.Event()

    def hold() -> str:
        gate.wait(5)
        return "held"

    def good(name: str) -> str:
        store.audit("t", "merge", name, NOW_MS)
        return name

    def bad() -> str:
        with store.atomic():  # a savepoint inside the group, rolled back alone
            store.audit("t", "merge", "bad", NOW_MS)
            raise ValueError("this frame is broken")

    held = asyncio.create_task(grouper.submit(hold))
    await asyncio.sleep(0.05)
    tasks = [
        asyncio.create_task(grouper.submit(lambda: good("a"))),
        asyncio.create_task(grouper.submit(bad)),
        asyncio.create_task(grouper.submit(lambda: good("b"))),
    ]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(held, *tasks, return_exceptions=True)
    assert results[0] == "held" and results[1] == "a" and results[3] == "b"
    assert isinstance(results[2], ValueError)
    assert _audit_rows(store.path) == ["a", "b"]
    runner.shutdown()
    store.close()


async def test_when_the_transaction_is_lost_no_frame_of_the_group_is_answered(
    store: SqliteStore,
) -> None:
    runner = StoreRunner(store)
    grouper = GroupCommitter(runner, store.group, store.in_transaction)
    gate = threading.Event()

    def hold() -> str:
        gate.wait(5)
        return "held"

    def good(name: str) -> str:
        store.audit("t", "merge", name, NOW_MS)
        return name

    def lose_transaction() -> str:
        store.conn.execute("ROLLBACK")  # as SQLite does on some I/O errors
        return "lost"

    held = asyncio.create_task(grouper.submit(hold))
    await asyncio.sleep(0.05)
    tasks = [
        asyncio.create_task(grouper.submit(lambda: good("a"))),
        asyncio.create_task(grouper.submit(lose_transaction)),
        asyncio.create_task(grouper.submit(lambda: good("b"))),
    ]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(held, *tasks, return_exceptions=True)
    assert results[0] == "held"
    assert all(isinstance(r, GroupFailed) for r in results[1:]), results
    assert _audit_rows(store.path) == []  # "a" was rolled back with the group
    # The store works on: the next frame gets its own group.
    assert await grouper.submit(lambda: good("c")) == "c"
    assert _audit_rows(store.path) == ["c"]
    runner.shutdown()
    store.close()


def test_frames_max_is_a_positive_bound(store: SqliteStore) -> None:
    runner = StoreRunner(store)
    with pytest.raises(ValueError):
        GroupCommitter(runner, store.group, store.in_transaction, frames_max=0)
    runner.shutdown()
    store.close()
