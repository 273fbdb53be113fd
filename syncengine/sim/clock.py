"""Virtual time: a clock that only moves when the next event is taken from the queue.

Events at the same millisecond run in the order they were scheduled (a sequence number
breaks ties), so a run depends on nothing but its seed. Nothing here reads a real clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from syncengine.core.errors import InvalidState

EPOCH_MS_DEFAULT = 1_767_225_600_000  # 2026-01-01T00:00:00Z: virtual runs start here
EVENTS_PENDING_MAX = 1_000_000  # a queue this long is a runaway scheduling loop


@dataclass(order=True)
class _Entry:
    at_ms: int
    seq: int
    label: str = field(compare=False)
    action: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Handle:
    """Returned by :meth:`EventQueue.schedule`; :meth:`cancel` makes the event a no-op."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry

    def cancel(self) -> None:
        self._entry.cancelled = True


class EventQueue:
    """A virtual clock plus a priority queue of actions keyed by ``(at_ms, seq)``."""

    def __init__(self, start_ms: int = EPOCH_MS_DEFAULT) -> None:
        self.start_ms = start_ms
        self.now_ms = start_ms
        self._heap: list[_Entry] = []
        self._seq = 0
        self.executed_count = 0

    @property
    def elapsed_ms(self) -> int:
        """Virtual milliseconds since the run started."""
        return self.now_ms - self.start_ms

    def schedule(self, at_ms: int, action: Callable[[], None], label: str = "") -> Handle:
        """Run ``action`` at virtual time ``at_ms`` (now, if that is in the past)."""
        if len(self._heap) >= EVENTS_PENDING_MAX:
            raise InvalidState(f"more than {EVENTS_PENDING_MAX} events pending: a runaway loop")
        self._seq += 1
        entry = _Entry(max(at_ms, self.now_ms), self._seq, label, action)
        heapq.heappush(self._heap, entry)
        return Handle(entry)

    def after(self, delay_ms: int, action: Callable[[], None], label: str = "") -> Handle:
        """Run ``action`` ``delay_ms`` after now."""
        return self.schedule(self.now_ms + max(0, delay_ms), action, label)

    def run_until(self, end_ms: int) -> None:
        """Run every event due before or at ``end_ms``; leave the clock at ``end_ms``."""
        while self._heap and self._heap[0].at_ms <= end_ms:
            entry = heapq.heappop(self._heap)
            if entry.cancelled:
                continue
            self.now_ms = entry.at_ms
            self.executed_count += 1
            entry.action()
        self.now_ms = max(self.now_ms, end_ms)

    def pending_count(self) -> int:
        return sum(1 for e in self._heap if not e.cancelled)
