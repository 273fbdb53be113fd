"""Group commit: many terminals' frames merged in one store transaction.

When a herd of terminals reconnects after an outage, each sends its backlog at once; one
transaction (one WAL append, one fsync) per frame makes the commits the bound. The
:class:`GroupCommitter` queues the work of each frame and runs whatever is queued, up to
:data:`GROUP_FRAMES_MAX` frames, inside one transaction on the store thread; every frame's
answer (its acks included) is handed back only after that transaction committed.

Rules:

1. A frame's own failure (a refused batch, a bug) is that frame's: its store calls are
   savepoints inside the group and roll back alone; the others go on.
2. A storage failure (the commit, disk full, I/O) fails the whole group: nothing of it is
   acknowledged, each waiting session gets :class:`GroupFailed` and closes, and its
   terminal pushes again later. The same if the transaction ended early for any reason.
3. Frames of one session never share a group (a session sends its next frame only after
   the answer), so the frames in a group are independent.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from syncengine.core.errors import StorageError

T = TypeVar("T")

GROUP_FRAMES_MAX = 32  # frames merged in one transaction at most

log = logging.getLogger("syncengine.server.group")


class GroupFailed(StorageError):
    """The transaction of a group did not commit: nothing of the frame was stored."""


class _Job(Generic[T]):
    __slots__ = ("future", "work")

    def __init__(self, work: Callable[[], T], future: asyncio.Future[T]) -> None:
        self.work = work
        self.future = future


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():  # the session went away; what was stored stays stored
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class GroupCommitter:
    """Queues frame work and runs it in groups, one transaction per group.

    ``run_store(fn)`` runs ``fn`` on the store thread; ``group()`` is the store's
    transaction around a group; ``alive()`` says whether that transaction is still open.
    """

    def __init__(
        self,
        run_store: Callable[..., Coroutine[Any, Any, Any]],
        group: Callable[[], AbstractContextManager[None]],
        alive: Callable[[], bool],
        frames_max: int = GROUP_FRAMES_MAX,
    ) -> None:
        if frames_max < 1:
            raise ValueError("frames_max must be >= 1")
        self._run_store = run_store
        self._group = group
        self._alive = alive
        self.frames_max = frames_max
        self._jobs: deque[_Job[Any]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.groups = 0  # groups committed (for tests and metrics)
        self.largest = 0  # the most frames one group held

    async def submit(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the store thread inside a group; its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._jobs.append(_Job(work, future))
            start = not self._scheduled
            self._scheduled = True
        if start:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        task: asyncio.Task[Any] = loop.create_task(self._run_store(self._run_group, loop))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a merge group failed outside its frames: %s", task.exception())

    def _run_group(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the store thread: one group, then hand the answers back to the loop."""
        with self._lock:
            jobs = [self._jobs.popleft() for _ in range(min(len(self._jobs), self.frames_max))]
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            with self._group():
                for job in jobs:
                    try:
                        results.append((job.future, True, job.work()))
                    except (StorageError, OSError, sqlite3.Error):
                        raise
                    except Exception as exc:  # this frame's failure only (rule 1)
                        results.append((job.future, False, exc))
                    if not self._alive():
                        raise StorageError("the group's transaction ended early")
            self.groups += 1
            self.largest = max(self.largest, len(jobs))
        except Exception as exc:  # rule 2: nothing of the group is acknowledged
            log.error("a merge group of %d frames did not commit: %s", len(jobs), exc)
            failure = GroupFailed(f"the batch could not be stored: {exc}")
            results = [(job.future, False, failure) for job in jobs]
        for future, ok, value in results:
            loop.call_soon_threadsafe(_settle, future, ok, value)
        with self._lock:
            more = bool(self._jobs)
            if not more:
                self._scheduled = False
        if more:
            loop.call_soon_threadsafe(self._start, loop)
