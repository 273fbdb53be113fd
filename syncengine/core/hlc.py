"""Hybrid logical clock (Kulkarni et al.) with the physical time injected.

A timestamp is ``(wall_ms, logical)``; it orders events consistently with causality even
when wall clocks disagree. A remote timestamp more than ``max_drift_ms`` ahead of our own
physical clock is refused with :class:`ClockError` rather than dragging our clock forward
without limit (a terminal with a badly skewed clock must not poison the fleet).
"""

from __future__ import annotations

from dataclasses import dataclass

from syncengine.core.canonical import WIRE_INT_MAX
from syncengine.core.errors import ClockError

MAX_DRIFT_MS_DEFAULT = 5 * 60 * 1000
LOGICAL_MAX = 2**31 - 1  # bound: the logical counter cannot grow without limit


@dataclass(frozen=True, slots=True, order=True)
class Hlc:
    """A hybrid logical timestamp; compares as the tuple ``(wall_ms, logical)``."""

    wall_ms: int
    logical: int = 0

    def __post_init__(self) -> None:
        if type(self.wall_ms) is not int or type(self.logical) is not int:
            raise ClockError("Hlc fields must be integers")
        if not 0 <= self.wall_ms <= WIRE_INT_MAX or not 0 <= self.logical <= LOGICAL_MAX:
            raise ClockError(f"Hlc out of range: {self.wall_ms}.{self.logical}")

    def to_wire(self) -> list[int]:
        return [self.wall_ms, self.logical]

    @classmethod
    def from_wire(cls, value: object) -> Hlc:
        if not isinstance(value, list) or len(value) != 2:
            raise ClockError(f"malformed hlc {value!r}")
        wall_ms, logical = value
        if type(wall_ms) is not int or type(logical) is not int:
            raise ClockError(f"malformed hlc {value!r}")
        if cls is Hlc and 0 <= wall_ms <= WIRE_INT_MAX and 0 <= logical <= LOGICAL_MAX:
            # The checks of __post_init__ hold: skip it and the frozen __setattr__ (this
            # runs once per op decoded). Anything else gets __post_init__'s own error.
            stamp: Hlc = _new(cls)
            _set_wall_ms(stamp, wall_ms)
            _set_logical(stamp, logical)
            return stamp
        return cls(wall_ms, logical)

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.logical}"


# Hlc is a frozen slotted dataclass: its slot descriptors set a field despite ``frozen``.
_new = object.__new__
_set_wall_ms = Hlc.__dict__["wall_ms"].__set__
_set_logical = Hlc.__dict__["logical"].__set__

ZERO = Hlc(0, 0)


class HybridClock:
    """A hybrid logical clock. Pass the current physical time into every call."""

    def __init__(self, max_drift_ms: int = MAX_DRIFT_MS_DEFAULT, last: Hlc = ZERO) -> None:
        if max_drift_ms <= 0:
            raise ClockError("max_drift_ms must be positive")
        self.max_drift_ms = max_drift_ms
        self.last = last

    def now(self, physical_ms: int) -> Hlc:
        """A timestamp for a local event, strictly greater than every earlier one."""
        if physical_ms > self.last.wall_ms:
            self.last = Hlc(physical_ms, 0)
        else:
            self.last = self._bump(self.last.wall_ms, self.last.logical + 1)
        return self.last

    def observe(self, remote: Hlc, physical_ms: int) -> Hlc:
        """Merge a received timestamp; refuse one too far ahead of ``physical_ms``."""
        if remote.wall_ms - physical_ms > self.max_drift_ms:
            raise ClockError(
                f"remote clock is {remote.wall_ms - physical_ms} ms ahead of ours "
                f"(bound {self.max_drift_ms} ms); check the device's time setting"
            )
        wall = max(self.last.wall_ms, remote.wall_ms, physical_ms)
        if wall == self.last.wall_ms == remote.wall_ms:
            logical = max(self.last.logical, remote.logical) + 1
        elif wall == self.last.wall_ms:
            logical = self.last.logical + 1
        elif wall == remote.wall_ms:
            logical = remote.logical + 1
        else:
            logical = 0
        self.last = self._bump(wall, logical)
        return self.last

    @staticmethod
    def _bump(wall_ms: int, logical: int) -> Hlc:
        if logical > LOGICAL_MAX:
            # More than 2**31 events within one millisecond: advance the wall part.
            return Hlc(wall_ms + 1, 0)
        return Hlc(wall_ms, logical)
