"""Canonical JSON: the same value always encodes to the same bytes.

Rules: UTF-8, keys sorted, no insignificant whitespace, no floats (money is integer minor
units, times are integer milliseconds), no NaN. A float, a non-string key, a value nested
deeper than :data:`DEPTH_MAX`, or an unsupported type raises :class:`ProtocolError`.
"""

from __future__ import annotations

import json
from typing import Any

from syncengine.core.errors import ProtocolError

DEPTH_MAX = 16

JsonValue = Any  # str | int | bool | None | list[JsonValue] | dict[str, JsonValue]


def validate(value: object, depth: int = 0) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is canonical-JSON-safe."""
    if depth > DEPTH_MAX:
        raise ProtocolError(f"value nested deeper than {DEPTH_MAX} levels")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise ProtocolError("floats are not allowed; use integer minor units or milliseconds")
    if isinstance(value, list):
        for item in value:
            validate(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"object keys must be strings, got {type(key).__name__}")
            validate(item, depth + 1)
        return
    raise ProtocolError(f"unsupported value type {type(value).__name__}")


def dumps(value: JsonValue) -> bytes:
    """Encode ``value`` canonically. The caller validates first when input is untrusted."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_float(text: str) -> float:
    raise ProtocolError(f"floats are not allowed (got {text})")


def _no_constant(text: str) -> float:
    raise ProtocolError(f"{text} is not allowed")


def loads(data: bytes) -> JsonValue:
    """Decode JSON bytes, refusing floats, NaN/Infinity and invalid UTF-8."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_float=_no_float, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    validate(value)
    return value
