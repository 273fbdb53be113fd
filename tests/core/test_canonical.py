"""Canonical JSON: the fast encoder gives exactly the reference bytes; bad input is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core import canonical
from syncengine.core.errors import ProtocolError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits: the fallback path
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=6),
            children,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=400)
@given(json_values)
def test_fast_encoder_equals_the_reference(value: object) -> None:
    assert canonical.dumps(value) == canonical.reference_dumps(value)
    assert canonical.loads(canonical.dumps(value)) == value


def test_control_and_unicode_characters_encode_identically() -> None:
    value = {"é": '\x00\x1f\u2028\u2029"\\/\x7f😀', "a": [True, None, -0]}
    assert canonical.dumps(value) == canonical.reference_dumps(value)


@pytest.mark.parametrize(
    "data",
    [
        b"1.5",
        b'{"a":1e3}',
        b'{"a":[0.0]}',
        b"-1E2",
        b"NaN",
        b"[Infinity]",
        b"-Infinity",
        b"\xff",
        b'"\xc3"',  # truncated UTF-8 inside a string
        b'"\\ud800"',  # an escaped lone surrogate has no UTF-8 form
        b'"a\x01b"',  # a raw control character in a string
        b'{"a":1} x',  # trailing data
        b"{",
        b"",
        b"[" * 100_000,
    ],
)
def test_loads_refuses_floats_constants_and_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        canonical.loads(data)


def test_loads_refuses_floats_with_a_clear_message() -> None:
    with pytest.raises(ProtocolError, match="floats are not allowed"):
        canonical.loads(b'{"amount":{"minor":12.5}}')


@given(st.integers(min_value=-(2**200), max_value=2**200))
def test_loads_keeps_integers_of_any_size_exactly(n: int) -> None:
    assert canonical.loads(str(n).encode()) == n
    assert canonical.loads(b'{"n":[%d]}' % n) == {"n": [n]}


def test_loads_keeps_the_last_of_duplicate_keys() -> None:
    # As the standard library does; a duplicate never survives into canonical bytes.
    assert canonical.loads(b'{"a":1,"a":2}') == {"a": 2}


def test_unencodable_values_are_refused() -> None:
    with pytest.raises(ProtocolError):
        canonical.dumps({"x": "\ud800"})  # a lone surrogate has no UTF-8 form
