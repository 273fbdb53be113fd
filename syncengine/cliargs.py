"""Argument types of the ``syncengine`` commands: a bad value is one clear usage error.

Each function takes the option's text and returns its value, or raises
``argparse.ArgumentTypeError`` with what is wrong; argparse then prints the command's
usage line and ``error: argument --port: ...`` and exits with status 2, before anything
starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

PORT_MAX = 65_535
LOG_LEVELS = ("debug", "info", "warning", "error")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = _whole(text)
    if not 0 <= value <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"a port is 0 to {PORT_MAX}, not {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` base URL with a host, e.g. ``http://127.0.0.1:8081``;
    the empty string (meaning: none) passes as it is."""
    if text == "":
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:8081"
        )
    return text


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with a host and a port of 1 to 65535."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:25")
    value = _whole(port_text)
    if not 1 <= value <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"a port is 1 to {PORT_MAX}, not {value}")
    return host.strip("[]"), value


def currency(text: str) -> str:
    """An ISO 4217 code this engine knows (upper case)."""
    from syncengine.core.money import CURRENCY_EXPONENT

    if text not in CURRENCY_EXPONENT:
        known = ", ".join(sorted(CURRENCY_EXPONENT))
        raise argparse.ArgumentTypeError(f"{text!r} is not a known currency code ({known})")
    return text


def log_level(text: str) -> str:
    """One of debug, info, warning, error (any case)."""
    if text.lower() not in LOG_LEVELS or not isinstance(logging.getLevelName(text.upper()), int):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def merchant_id(text: str) -> str:
    """A merchant id: 1 to ``ID_CHARS_MAX`` printable characters, no spaces."""
    from syncengine.core.bodies import ID_CHARS_MAX

    if not 0 < len(text) <= ID_CHARS_MAX or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a merchant id (1 to {ID_CHARS_MAX} printable characters, no spaces)"
        )
    return text


def cannot_start(command: str, data: object, exc: Exception) -> int:
    """Say on one line why ``syncengine COMMAND`` cannot start; the exit status (1).

    A :class:`~syncengine.core.errors.SyncEngineError` says what is wrong itself (a key
    file, a store); an ``OSError`` is about the ``--data`` directory (a file, read-only,
    under /proc...).
    """
    from syncengine.core.errors import SyncEngineError

    why = str(exc) if isinstance(exc, SyncEngineError) else f"cannot use --data {data}: {exc}"
    print(f"syncengine {command}: {why}", file=sys.stderr)
    return 1


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host
