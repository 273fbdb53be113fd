"""What the simulator needs from a terminal, the server and the processor.

The runner talks only to these small protocols. Each is implemented by wrapping the real
sans-I/O machine plus its real store (``syncengine.node``, ``syncengine.server``,
``syncengine.processor.sandbox``); nothing is a stand-in.

Conventions: every call takes the virtual time ``now_ms`` as the component sees it (a
terminal with a skewed clock gets the skewed time). Frames are bytes in the sync
protocol's encoding (:mod:`syncengine.core.protocol`), so the network can drop, duplicate
and reorder them without knowing what they are. ``crash()`` throws away everything that is
not durable, without any chance to clean up; ``boot()`` reopens from durable state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from syncengine.core.ops import Op
from syncengine.sim.facts import TerminalFacts

# result kinds of :meth:`SimTerminal.take_payment`
APPROVED_OFFLINE = "approved_offline"
APPROVED_ONLINE = "approved_online"
DECLINED_ONLINE = "declined_online"
REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Attempt:
    """A customer at the till: the workload generator's description of one payment."""

    amount_minor: int
    currency: str
    brand: str
    co_brands: tuple[str, ...]
    entry_method: str
    pan: str
    exp_month: int
    exp_year: int
    email: str | None
    standalone: bool = False  # the POS takes it as a standalone payment (voidable)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What the POS was told. ``payment_id`` is set for anything stored or charged."""

    kind: str
    payment_id: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TerminalView:
    """What the terminal shows (the ``status`` of the SDK), sampled for the timeline."""

    mode: str
    outstanding_minor: int
    pending_count: int
    prompting: bool


class SimTerminal(Protocol):
    """A terminal: TerminalMachine + replica store behind one adapter.

    Outcomes of ``take_payment`` are written to the trace when the machine decides them
    (at once for offline/refused, when the status arrives for online payments).
    """

    terminal_id: str

    @property
    def up(self) -> bool: ...

    def boot(self, now_ms: int) -> None: ...

    def crash(self, power_cut: bool = False) -> bool: ...

    def arm_crash(self, write_first: bool, fire: Callable[[], None]) -> None: ...

    def tick(self, now_ms: int) -> None: ...

    def connected(self, now_ms: int) -> None: ...

    def connect_failed(self, now_ms: int, outage: str) -> None: ...

    def disconnected(self, now_ms: int, outage: str) -> None: ...

    def receive(self, now_ms: int, frame: bytes) -> None: ...

    def operator_activate(self, now_ms: int) -> None: ...

    def take_payment(self, now_ms: int, attempt: Attempt) -> None: ...

    def set_disk_full(self, full: bool) -> None: ...

    def view(self, now_ms: int) -> TerminalView: ...

    def facts(self) -> TerminalFacts: ...


class SimServer(Protocol):
    """The sync server: ServerMachine + store + forwarder behind one adapter
    (:class:`syncengine.sim.server.RealServer`).

    Frames it wants to send are collected and taken with :meth:`outgoing` after each call.
    """

    unavailable: bool  # provider outage: reachable, answers service_unavailable
    bugs: set[str]
    on_close: Callable[[str], None]  # the server closed a terminal's session

    def boot(self, now_ms: int) -> None: ...

    def crash(self, now_ms: int = 0) -> None: ...

    def arm_crash(self, fire: Callable[[], None]) -> None: ...

    def backup(self, target: Path) -> Path: ...

    def restore(self, backup: Path) -> None: ...

    def open_session(self, now_ms: int, terminal_id: str) -> None: ...

    def close_session(self, terminal_id: str) -> None: ...

    def receive(self, now_ms: int, terminal_id: str, frame: bytes) -> None: ...

    def outgoing(self) -> list[tuple[str, bytes]]: ...

    def tick(self, now_ms: int) -> None: ...

    def force_offline(self, now_ms: int, terminal_id: str, on: bool) -> None: ...

    def stored_ops(self) -> list[Op]: ...

    def restore_hold(self, now_ms: int) -> tuple[str, ...] | None: ...

    def files(self) -> list[Path]: ...
