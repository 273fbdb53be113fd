"""The per-op decode shortcuts refuse exactly what the plain checks refuse.

``Op.from_wire``, ``Hlc.from_wire`` and ``Money.from_wire`` build their frozen objects
without the dataclass ``__init__``, and ``validate_origin`` remembers origins it already
accepted. Each is compared here with a reference written the plain way (the code as it
was before the shortcuts), on valid and invalid input alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core import canonical
from syncengine.core.errors import ClockError, MoneyError, ProtocolError
from syncengine.core.hlc import LOGICAL_MAX, Hlc
from syncengine.core.money import AMOUNT_MINOR_MAX, CURRENCY_EXPONENT, Money, money_or_none
from syncengine.core.ops import (
    _ORIGIN_ALLOWED,
    GENESIS,
    KINDS,
    ORIGIN_CACHE_MAX,
    ORIGIN_CHARS_MAX,
    SERVER_KINDS,
    TERMINAL_KINDS,
    Op,
    _valid_origins,
    validate_origin,
)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> object:
    """What ``fn`` gives: its result, or the exception's type name and message."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # compared between the two ways, whatever it is
        return (type(exc).__name__, str(exc))


@pytest.fixture
def empty_origin_cache() -> Iterator[None]:
    _valid_origins.clear()
    yield
    _valid_origins.clear()


# -- references: the plain checks -------------------------------------------------------


def origin_is_valid(origin: object) -> bool:
    return (
        isinstance(origin, str)
        and 0 < len(origin) <= ORIGIN_CHARS_MAX
        and set(origin) <= _ORIGIN_ALLOWED
    )


def reference_hlc(value: object) -> Hlc:
    if not isinstance(value, list) or len(value) != 2:
        raise ClockError(f"malformed hlc {value!r}")
    wall_ms, logical = value
    if type(wall_ms) is not int or type(logical) is not int:
        raise ClockError(f"malformed hlc {value!r}")
    return Hlc(wall_ms, logical)  # __init__ and __post_init__


def reference_money(value: object) -> Money:
    if type(value) is not dict or len(value) != 2:
        raise MoneyError(f"malformed money {value!r}")
    minor, currency = value.get("minor"), value.get("currency")
    if type(minor) is not int or not isinstance(currency, str):
        raise MoneyError(f"malformed money {value!r}")
    return Money(minor, currency)  # __init__ and __post_init__


def reference_op(value: object) -> Op:
    if not isinstance(value, list) or len(value) != 6:
        raise ProtocolError("an op is a list of 6 fields")
    origin, seq, hlc, kind, body, prev = value
    if not isinstance(kind, str) or not isinstance(body, dict):
        raise ProtocolError("malformed op kind or body")
    try:
        stamp = reference_hlc(hlc)
    except Exception as exc:
        raise ProtocolError(f"malformed op hlc: {exc}") from None
    if not isinstance(prev, str):
        raise ProtocolError("malformed op prev")
    if not origin_is_valid(origin):
        raise ProtocolError(f"malformed origin {origin!r}")
    if type(seq) is not int:
        raise ProtocolError(f"op seq must be an integer, got {seq!r}")
    return Op(origin, seq, stamp, kind, body, prev)  # __init__ and __post_init__


class Str(str):
    """A ``str`` subclass; no ``__weakref__``, as ``test_bodies_fast.Str`` explains."""

    __slots__ = ()


class Lying(str):
    """Equal to, and hashed like, ``"T1"``, whatever its own characters."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("T1")


# -- Hlc and Money -----------------------------------------------------------------------

_ints = st.one_of(
    st.integers(-5, 5),
    st.integers(-(2**70), 2**70),
    st.sampled_from([LOGICAL_MAX, LOGICAL_MAX + 1, AMOUNT_MINOR_MAX, AMOUNT_MINOR_MAX + 1]),
    st.sampled_from([-AMOUNT_MINOR_MAX, -AMOUNT_MINOR_MAX - 1]),
)
_scalars = st.one_of(_ints, st.booleans(), st.floats(allow_nan=False), st.none(), st.text())


@settings(max_examples=500)
@given(
    st.one_of(
        st.lists(_ints, min_size=2, max_size=2),
        st.lists(_scalars, max_size=3),
        _scalars,
        st.tuples(_ints, _ints),
    )
)
def test_hlc_from_wire_agrees_with_the_constructor(value: object) -> None:
    fast = outcome(Hlc.from_wire, value)
    assert fast == outcome(reference_hlc, value)
    if isinstance(fast, Hlc):
        assert type(fast) is Hlc and fast.to_wire() == value
        assert fast == Hlc(fast.wall_ms, fast.logical)
        assert hash(fast) == hash(Hlc(fast.wall_ms, fast.logical))


_currencies = st.one_of(
    st.sampled_from(sorted(CURRENCY_EXPONENT)),
    st.sampled_from(["", "usd", "ZZZ", "EURO"]),
    st.builds(Str, st.sampled_from(["USD", "ZZZ"])),
    st.integers(),
    st.none(),
)


@settings(max_examples=500)
@given(
    st.one_of(
        st.builds(lambda m, c: {"minor": m, "currency": c}, _scalars, _currencies),
        st.dictionaries(st.sampled_from(["minor", "currency", "x"]), _scalars, max_size=3),
        _scalars,
    )
)
def test_money_from_wire_agrees_with_the_constructor(value: object) -> None:
    fast = outcome(Money.from_wire, value)
    assert fast == outcome(reference_money, value)
    if isinstance(fast, Money):
        assert type(fast) is Money and fast.to_wire() == value


@given(_scalars, _currencies)
def test_money_or_none_accepts_only_what_money_accepts(minor: object, currency: object) -> None:
    fast = money_or_none(minor, currency)
    plain = outcome(Money, minor, currency)
    if fast is not None:
        assert fast == plain and type(fast.minor) is int and type(fast.currency) is str
    elif type(minor) is int and type(currency) is str:
        assert not isinstance(plain, Money)  # declined only what Money refuses


def test_money_or_none_refuses_bools_floats_and_foreign_currencies() -> None:
    assert money_or_none(True, "USD") is None
    assert money_or_none(1.0, "USD") is None
    assert money_or_none(1, "ZZZ") is None
    assert money_or_none(AMOUNT_MINOR_MAX + 1, "USD") is None
    assert money_or_none(-AMOUNT_MINOR_MAX - 1, "USD") is None
    assert money_or_none(AMOUNT_MINOR_MAX, "USD") == Money(AMOUNT_MINOR_MAX, "USD")
    assert money_or_none(-5, "JPY") == Money(-5, "JPY")


# -- Op.from_wire ------------------------------------------------------------------------

_origins = st.one_of(
    st.sampled_from(["T1", "T2", "server/T1", "a-b_c.d:e/f", "x" * ORIGIN_CHARS_MAX]),
    st.sampled_from(["", "x" * (ORIGIN_CHARS_MAX + 1), "T 1", "T1\n", "t\u00e9", "server/"]),
    st.text(max_size=70),
    st.builds(Str, st.sampled_from(["T1", "bad origin"])),
    st.integers(),
    st.none(),
)
_bodies = st.one_of(
    st.just({"payment_id": "p", "at_ms": 5}),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5))),
    st.just({"x": 1.5}),
    st.just({"x": "y" * 9_000}),
    st.lists(st.integers(), max_size=2),
)


_junk_fields: dict[int, st.SearchStrategy[Any]] = {
    0: _origins,
    1: st.one_of(st.integers(-2, 2**70), st.booleans(), st.floats(allow_nan=False)),
    2: st.one_of(
        st.lists(_ints, min_size=2, max_size=2),
        st.lists(_scalars, max_size=3),
        st.tuples(_ints, _ints),
        _scalars,
    ),
    3: st.one_of(st.sampled_from(sorted(KINDS)), st.text(max_size=8), st.integers()),
    4: _bodies,
    5: st.one_of(st.just(GENESIS), st.just("a" * 63), st.text(max_size=70), st.none()),
}


@st.composite
def wire_ops(draw: st.DrawFn) -> list[Any]:
    """A valid wire op, then none, one or two of its six fields replaced."""
    server = draw(st.booleans())
    terminal = draw(st.sampled_from(["T1", "T2", "a-b_c.d:e", "x" * ORIGIN_CHARS_MAX]))
    wire: list[Any] = [
        f"server/{terminal}"[:ORIGIN_CHARS_MAX] if server else terminal,
        draw(st.integers(1, 2**70)),
        [draw(st.integers(0, 2**62)), draw(st.integers(0, LOGICAL_MAX))],
        draw(st.sampled_from(sorted(SERVER_KINDS if server else TERMINAL_KINDS))),
        draw(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)))),
        draw(st.one_of(st.just(GENESIS), st.text("0123456789abcdef", min_size=64, max_size=64))),
    ]
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        field = draw(st.integers(0, 5))
        wire[field] = draw(_junk_fields[field])
    return wire


@settings(max_examples=1000)
@given(wire_ops(), st.booleans())
def test_op_from_wire_agrees_with_the_plain_checks(wire: list[Any], warm: bool) -> None:
    if warm:
        validate_origin("T1")
        validate_origin("server/T1")
    fast = outcome(Op.from_wire, wire)
    assert fast == outcome(reference_op, wire)
    if isinstance(fast, Op):
        origin, seq, hlc, kind, body, prev = wire
        assert type(fast.hlc) is Hlc and fast.hlc.to_wire() == list(hlc)
        assert (fast.origin, fast.seq, fast.kind, fast.body, fast.prev) == (
            origin,
            seq,
            kind,
            body,
            prev,
        )
        expected = canonical.reference_dumps([1, origin, seq, list(hlc), kind, body, prev])
        assert fast.canonical_bytes() == expected
        assert fast.digest == Op(origin, seq, Hlc(*hlc), kind, body, prev).digest


@settings(max_examples=300)
@given(wire_ops())
def test_op_from_wire_from_json_agrees_on_what_canonical_loads_yields(wire: list[Any]) -> None:
    try:
        value = canonical.loads(canonical.reference_dumps(wire))
    except (ProtocolError, ValueError, TypeError):
        return  # not JSON (a float, say): never reaches from_wire(_from_json=True)
    fast = outcome(Op.from_wire, value, _from_json=True)
    assert fast == outcome(reference_op, value)


# -- the origin cache --------------------------------------------------------------------


@settings(max_examples=500)
@given(st.lists(_origins, max_size=6))
def test_validate_origin_is_the_same_before_and_after_caching(origins: list[object]) -> None:
    for origin in origins + origins:  # the second round finds the first round cached
        result = outcome(validate_origin, origin)
        if origin_is_valid(origin):
            assert result is origin
        else:
            assert result == ("ProtocolError", f"malformed origin {origin!r}")


@pytest.mark.usefixtures("empty_origin_cache")
@pytest.mark.parametrize(
    "bad",
    [
        "",
        "T1 ",
        " T1",
        "T1\n",
        "T\u00e91",
        "x" * (ORIGIN_CHARS_MAX + 1),
        "T1" * 33,
        Lying("not an origin!"),
        1,
        None,
        b"T1",
    ],
)
def test_an_invalid_origin_is_refused_after_valid_ones_are_cached(bad: object) -> None:
    for origin in ("T1", "T2", "server/T1", "x" * ORIGIN_CHARS_MAX):
        validate_origin(origin)
    assert "T1" in _valid_origins
    with pytest.raises(ProtocolError, match="malformed origin"):
        validate_origin(bad)
    wire = Op("T1", 1, Hlc(1), "void_request", {"payment_id": "p", "at_ms": 1}).to_wire()
    wire[0] = bad
    with pytest.raises(ProtocolError, match="malformed origin"):
        Op.from_wire(wire)
    assert all(type(o) is str and origin_is_valid(o) for o in _valid_origins)


@pytest.mark.usefixtures("empty_origin_cache")
def test_only_exact_strings_are_cached() -> None:
    assert validate_origin(Str("T9")) == "T9"
    assert validate_origin(Lying("T1")) == "T1"
    assert len(_valid_origins) == 0
    validate_origin("T9")
    assert _valid_origins == {"T9"}


@pytest.mark.usefixtures("empty_origin_cache")
def test_the_origin_cache_is_bounded() -> None:
    many = [f"T{i}" for i in range(3 * ORIGIN_CACHE_MAX + 7)]
    for origin in many:
        assert validate_origin(origin) == origin
        assert 0 < len(_valid_origins) <= ORIGIN_CACHE_MAX
    assert many[-1] in _valid_origins
    # Still correct after the cache was cleared (and refilled) several times.
    assert all(validate_origin(origin) == origin for origin in many)
    with pytest.raises(ProtocolError):
        validate_origin("T 1")
    assert len(_valid_origins) <= ORIGIN_CACHE_MAX


@pytest.mark.usefixtures("empty_origin_cache")
def test_a_batch_of_one_origin_validates_it_once() -> None:
    ops = [
        Op("T1", i, Hlc(i), "void_request", {"payment_id": "p", "at_ms": i}).to_wire()
        for i in range(1, 6)
    ]
    _valid_origins.clear()
    decoded = [Op.from_wire(op) for op in ops]
    assert [op.seq for op in decoded] == [1, 2, 3, 4, 5]
    assert _valid_origins == {"T1"}
