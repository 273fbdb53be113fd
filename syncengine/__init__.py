"""syncengine: an offline-first sync engine for card payment terminals."""

__version__ = "0.1.0"
