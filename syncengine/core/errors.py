"""One exception hierarchy for the whole of syncengine.

- :class:`SyncEngineError` is the root; catch it to catch everything we raise on purpose.
- :class:`InvalidState` means the caller misused an API (wrong order, wrong mode).
- :class:`ProtocolError` means a peer sent something malformed, oversized, unknown,
  tampered or replayed. Nothing has changed when it is raised.
- :class:`Refused` means a business rule said no (a limit, a card rule, a safeguard);
  ``reason`` is a stable machine code, ``str(exc)`` a message for a person.
- :class:`StorageError` means durable storage failed (disk full, corruption).
- :class:`InvariantViolation` is an internal bug. Nothing catches it on purpose; unlike
  ``assert`` it survives ``python -O``.
"""

from __future__ import annotations


class SyncEngineError(Exception):
    """Root of every exception syncengine raises on purpose."""


class InvalidState(SyncEngineError):
    """The caller used an API in a state where it is not allowed."""


class ConfigError(SyncEngineError):
    """A setting is out of its allowed range or malformed."""


class MoneyError(SyncEngineError):
    """An amount is malformed, or currencies were mixed."""


class ClockError(SyncEngineError):
    """A timestamp is outside the allowed drift bound."""


class ProtocolError(SyncEngineError):
    """A peer sent something malformed, oversized, unknown, tampered or replayed."""


class MessageTooLarge(ProtocolError):
    """A frame or batch is larger than its named limit."""


class ChainError(ProtocolError):
    """An op does not chain to its predecessor, or a signature does not verify."""


class Equivocation(ProtocolError):
    """Two different ops were seen under the same (origin, seq)."""


class CryptoError(SyncEngineError):
    """Sealing, opening, signing or verifying failed."""


class Refused(SyncEngineError):
    """A business rule refused the request.

    ``reason`` is a stable code (e.g. ``over_transaction_limit``) that programs may match;
    the message says what happened and what to do next.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StorageError(SyncEngineError):
    """Durable storage failed; nothing was half-written."""


class InvariantViolation(SyncEngineError):
    """An internal invariant does not hold: a bug. Never caught on purpose."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` unless ``condition`` holds (survives ``-O``)."""
    if not condition:
        raise InvariantViolation(message)
