"""A simulated network between each terminal and the sync server.

Theory of operation
-------------------
1. Every terminal has one link to the server. A link is *up* unless a ``partition`` fault
   cuts it. A connection over a link has an *epoch*; cutting the link or crashing either
   end starts a new epoch, and frames still in flight for an old epoch are dropped (a TCP
   connection that died takes its unread bytes with it).
2. Each frame is delivered after ``latency_ms`` plus a random jitter. Message faults
   (``drop``, ``duplicate``, ``reorder``, ``delay``) act on each frame with their
   probability, for the terminals they target. A ``drop`` loses the frame *and* resets
   the connection, as TCP would (a frame is never silently lost inside a live
   connection); ``duplicate`` and ``reorder`` model replays and middleboxes. ``reorder`` adds a random extra delay of up
   to ``reorder_window_ms``, so later frames overtake earlier ones.
3. Every random choice comes from the one ``random.Random`` the runner passes in, in a
   fixed order, so the same seed gives the same deliveries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from syncengine.sim.clock import EventQueue

LATENCY_MS_DEFAULT = 20
JITTER_MS_DEFAULT = 30
REORDER_WINDOW_MS_DEFAULT = 3_000
DELAY_MS_DEFAULT = 5_000
FRAMES_IN_FLIGHT_MAX = 100_000

MESSAGE_FAULT_KINDS = frozenset({"drop", "duplicate", "reorder", "delay"})


@dataclass
class MessageFault:
    """A message fault in force: ``kind`` with ``probability`` on ``targets`` (None: all)."""

    kind: str
    probability: float
    targets: frozenset[str] | None
    delay_ms: int = DELAY_MS_DEFAULT

    def hits(self, terminal_id: str) -> bool:
        return self.targets is None or terminal_id in self.targets


@dataclass
class NetworkStats:
    """Counters shown in the report."""

    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    cut: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)


class Network:
    """Links terminal <-> server with partitions, epochs and per-frame faults."""

    def __init__(
        self,
        queue: EventQueue,
        rng: random.Random,
        latency_ms: int = LATENCY_MS_DEFAULT,
        jitter_ms: int = JITTER_MS_DEFAULT,
        reorder_window_ms: int = REORDER_WINDOW_MS_DEFAULT,
    ) -> None:
        self.queue = queue
        self.rng = rng
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.reorder_window_ms = reorder_window_ms
        self._partitioned: dict[str, int] = {}  # terminal -> number of partitions in force
        self._epoch: dict[str, int] = {}
        self.faults: list[MessageFault] = []
        self.stats = NetworkStats()
        self._in_flight = 0
        self.on_reset: Callable[[str], None] = lambda terminal_id: None

    # -- links ---------------------------------------------------------------------------

    def is_up(self, terminal_id: str) -> bool:
        return self._partitioned.get(terminal_id, 0) == 0

    def partition(self, terminal_id: str) -> None:
        """Cut the terminal's link (nested partitions stack)."""
        self._partitioned[terminal_id] = self._partitioned.get(terminal_id, 0) + 1
        self.new_epoch(terminal_id)

    def heal(self, terminal_id: str) -> None:
        self._partitioned[terminal_id] = max(0, self._partitioned.get(terminal_id, 0) - 1)

    def epoch(self, terminal_id: str) -> int:
        return self._epoch.get(terminal_id, 0)

    def new_epoch(self, terminal_id: str) -> int:
        """Break the current connection: frames in flight on it are lost."""
        self._epoch[terminal_id] = self.epoch(terminal_id) + 1
        return self._epoch[terminal_id]

    # -- frames --------------------------------------------------------------------------

    def send(
        self,
        terminal_id: str,
        direction: str,
        frame: bytes,
        deliver: Callable[[bytes], None],
    ) -> None:
        """Send ``frame`` on the terminal's current connection; ``deliver`` runs on arrival."""
        self.stats.sent += 1
        if not self.is_up(terminal_id) or self._in_flight >= FRAMES_IN_FLIGHT_MAX:
            self.stats.cut += 1
            return
        epoch = self.epoch(terminal_id)
        copies = 1
        extra_ms = 0
        for fault in self.faults:
            if not fault.hits(terminal_id) or self.rng.random() >= fault.probability:
                continue
            self.stats.per_kind[fault.kind] = self.stats.per_kind.get(fault.kind, 0) + 1
            if fault.kind == "drop":
                # Over TCP a frame is not lost alone: the connection that could not
                # deliver it dies, and both ends learn it (RST or timeout).
                self.stats.dropped += 1
                self.new_epoch(terminal_id)
                self.queue.after(self.latency_ms, lambda: self.on_reset(terminal_id), "reset")
                return
            if fault.kind == "duplicate":
                copies += 1
                self.stats.duplicated += 1
            elif fault.kind == "reorder":
                extra_ms += self.rng.randrange(self.reorder_window_ms)
                self.stats.reordered += 1
            elif fault.kind == "delay":
                extra_ms += fault.delay_ms
        for copy in range(copies):
            delay_ms = self.latency_ms + self.rng.randrange(self.jitter_ms + 1) + extra_ms
            if copy:
                delay_ms += self.rng.randrange(self.reorder_window_ms)
            self._in_flight += 1
            self.queue.after(
                delay_ms,
                lambda: self._arrive(terminal_id, epoch, frame, deliver),
                f"net:{direction}:{terminal_id}",
            )

    def _arrive(
        self, terminal_id: str, epoch: int, frame: bytes, deliver: Callable[[bytes], None]
    ) -> None:
        self._in_flight -= 1
        if epoch != self.epoch(terminal_id) or not self.is_up(terminal_id):
            self.stats.cut += 1
            return
        self.stats.delivered += 1
        deliver(frame)
