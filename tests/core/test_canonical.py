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
    [b"1.5", b'{"a":1e3}', b"NaN", b"[Infinity]", b"\xff", b"{", b"[" * 100_000],
)
def test_loads_refuses_floats_constants_and_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        canonical.loads(data)


def test_unencodable_values_are_refused() -> None:
    with pytest.raises(ProtocolError):
        canonical.dumps({"x": "\ud800"})  # a lone surrogate has no UTF-8 form
