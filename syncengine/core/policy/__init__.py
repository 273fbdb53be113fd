"""Pure offline-payment policy: limits, expiry windows, card acceptance, safeguards and the
offline-mode state machine.

Everything here is data plus pure functions. Times are integer milliseconds passed in by the
caller (``*_ms``); nothing reads a clock or performs I/O. Refusals raise
:class:`~syncengine.core.errors.Refused` with a stable ``reason`` code and a message a
cashier understands; bad settings raise :class:`~syncengine.core.errors.ConfigError`.
"""
