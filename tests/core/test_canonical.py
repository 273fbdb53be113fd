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


def test_every_code_point_encodes_as_the_reference_does() -> None:
    # Each code point outside the surrogates, in a string and as a key, in chunks.
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 4096):
        text = "".join(map(chr, points[start : start + 4096]))
        value = {text: text, "k" + text[:64]: [text[::-1]]}
        assert canonical.dumps(value) == canonical.reference_dumps(value), hex(points[start])


def test_keys_sort_by_code_point_across_planes() -> None:
    # UTF-16 order would put U+1F600 before U+FFFF; canonical order is by code point.
    value = {"\U0001f600": 1, "\uffff": 2, "\u00e9": 3, "z": 4, "": 5}
    assert canonical.dumps(value) == canonical.reference_dumps(value)
    assert list(canonical.loads(canonical.dumps(value))) == [
        "",
        "z",
        "\u00e9",
        "\uffff",
        "\U0001f600",
    ]


def test_non_string_keys_fall_back_to_the_reference_encoder() -> None:
    assert canonical.dumps({2: "b", 1: "a"}) == canonical.reference_dumps({2: "b", 1: "a"})


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
