"""The fast path of ``capture`` bodies agrees with the detailed validator, always.

``capture_or_none`` (the fast path) may decline a body the detailed validator accepts (it
is stricter: exact types, ASCII emails); it must never accept a body the detailed
validator refuses, and what it accepts must be the very same ``Capture``. Every refusal
still carries the detailed validator's message, through ``Capture.from_body`` and
``parse_body`` alike.
"""

from __future__ import annotations

import copy
import dataclasses
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.core.bodies import (
    _CAPTURE_KEYS,
    _CARD_KEYS,
    CHANNELS,
    EMAIL_CHARS_MAX,
    ENTRY_METHODS,
    ID_CHARS_MAX,
    SEALED_B64_CHARS_MAX,
    Capture,
    CardInfo,
    capture_or_none,
    parse_body,
    without_sealed_card,
)
from syncengine.core.canonical import WIRE_INT_MAX
from syncengine.core.errors import ProtocolError
from syncengine.core.hlc import Hlc
from syncengine.core.money import AMOUNT_MINOR_MAX, CURRENCY_EXPONENT, Money
from syncengine.core.ops import Op

CARD = CardInfo("visa", "4242", "tap", "c2VhbGVk", ("eftpos",))
CAPTURE = Capture(
    "p-1", "m-1", Money(1250, "USD"), "offline", CARD, 1_000, 86_401_000, "terminal", "a@b.co"
)


class Str(str):
    """A ``str`` subclass: valid for the detailed validator, declined by the fast path.

    No ``__weakref__`` (empty ``__slots__``): hypothesis 6.165.2 and later keep a weak
    reference to each drawn value that takes one, and when the garbage collector has taken
    it by the time a failing example is replayed, the shrink fails with
    FlakyStrategyDefinition instead of reporting the failure."""

    __slots__ = ()


class Dict(dict[str, Any]):
    """A ``dict`` subclass: likewise."""

    __slots__ = ()


Outcome = Capture | tuple[str, str]


def outcome(fn: Any, body: object) -> Outcome:
    """What ``fn(body)`` gives: the Capture, or the exception's type name and message."""
    try:
        result: Capture = fn(body)
    except Exception as exc:  # compared between paths, whatever it is
        return (type(exc).__name__, str(exc))
    return result


def assert_paths_agree(body: object) -> Outcome:
    slow = outcome(Capture.from_body_checked, body)
    fast = capture_or_none(body)  # never raises
    if fast is not None:
        assert isinstance(slow, Capture), f"fast path accepted what the validator refuses: {slow}"
        assert fast == slow
        assert repr(fast) == repr(slow)
        assert type(fast.amount) is Money and type(fast.card) is CardInfo
        assert fast.to_body() == slow.to_body()
    assert outcome(Capture.from_body, body) == slow
    if isinstance(body, dict):
        try:
            op = Op("T1", 1, Hlc(1), "capture", body)
        except ProtocolError:
            pass  # e.g. a float somewhere: no op can carry this body
        else:
            assert outcome(lambda _: parse_body(op), None) == slow
    return slow


# -- strategies --------------------------------------------------------------------------

_ids = st.text(min_size=1, max_size=ID_CHARS_MAX)
_short = st.text(min_size=1, max_size=32)
_email_chars = "".join(c for c in string.printable if not c.isspace() and c != "@")
_emails = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(_email_chars, min_size=1, max_size=60),
    st.text(_email_chars, min_size=1, max_size=60),
)


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Capture bodies with exact JSON types: the fast path must accept every one."""
    card = {
        "brand": draw(_short),
        "last4": draw(st.text("0123456789", min_size=4, max_size=4)),
        "entry_method": draw(st.sampled_from(sorted(ENTRY_METHODS))),
        "sealed": draw(
            st.one_of(
                st.text(min_size=1, max_size=40),
                st.just("A" * SEALED_B64_CHARS_MAX),
            )
        ),
        "co_brands": draw(st.lists(st.text(max_size=8), max_size=4)),
    }
    return {
        "payment_id": draw(_ids),
        "merchant_id": draw(_ids),
        "amount": {
            "minor": draw(st.integers(1, AMOUNT_MINOR_MAX)),
            "currency": draw(st.sampled_from(sorted(CURRENCY_EXPONENT))),
        },
        "channel": draw(st.sampled_from(sorted(CHANNELS))),
        "card": card,
        "captured_at_ms": draw(st.integers(0, WIRE_INT_MAX)),
        "expires_at_ms": draw(st.one_of(st.none(), st.integers(0, WIRE_INT_MAX))),
        "device_class": draw(_short),
        "email": draw(st.one_of(st.none(), _emails)),
    }


# Values a field might hold instead: wrong types, bools and floats, bad bounds, and
# strings the fast path must leave to the detailed validator.
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, AMOUNT_MINOR_MAX, AMOUNT_MINOR_MAX + 1, -AMOUNT_MINOR_MAX]),
    st.sampled_from([WIRE_INT_MAX, WIRE_INT_MAX + 1, 2**63, 2**64]),
    st.floats(allow_nan=False),
    st.text(max_size=70),
    st.sampled_from(
        [
            "",
            "x" * (ID_CHARS_MAX + 1),
            "x" * 33,
            "A" * (SEALED_B64_CHARS_MAX + 1),
            "4242",
            "424",
            "42a2",
            "\u0664\u0662\u0664\u0662",  # Arabic-Indic digits: str.isdigit() holds
            "a@b.co",
            "a b@c.co",
            "a@b.co ",
            "a@b\tc",
            "a@b\x1cc",  # isspace, not printable
            "a@b\u00a0c",  # no-break space
            "a@b\u2003c",  # em space
            "jos\u00e9@example.com",  # non-ASCII: valid, left to the slow path
            "@" + "x" * EMAIL_CHARS_MAX,
            "no-at-sign",
            "USD",
            "usd",
            "ZZZ",
            "JPY",
            "offline",
            "tap",
            "telepathy",
        ]
    ),
    st.builds(Str, st.sampled_from(["p-1", "4242", "USD", "offline", "tap", "a@b.co"])),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.none()), max_size=6),
    st.dictionaries(st.sampled_from(["minor", "currency", "x"]), st.integers(), max_size=3),
    st.builds(
        lambda minor, currency: {"minor": minor, "currency": currency},
        st.one_of(st.integers(-5, 5), st.booleans(), st.floats(allow_nan=False)),
        st.one_of(st.sampled_from(["USD", "JPY", "ZZZ", "", "usd"]), st.integers()),
    ),
)

_TOP = sorted(_CAPTURE_KEYS)
_CARD = sorted(_CARD_KEYS)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one to three changes: a value (junk, or another valid body's), a
    key dropped, added or swapped for another."""
    body = draw(valid_bodies())
    other = draw(valid_bodies())
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        where = draw(st.sampled_from(["top", "top", "top", "card", "card", "amount"]))
        target: Any = body
        source: Any = other
        keys: list[str] = _TOP
        if where == "card" and isinstance(body.get("card"), dict):
            target, source, keys = body["card"], other["card"], _CARD
        elif where == "amount" and isinstance(body.get("amount"), dict):
            target, source, keys = body["amount"], other["amount"], ["minor", "currency"]
        action = draw(st.sampled_from(["junk", "junk", "junk", "valid", "drop", "add", "swap"]))
        key = draw(st.sampled_from(keys))
        if action == "junk":
            target[key] = draw(_junk)
        elif action == "valid":
            target[key] = source.get(key)
        elif action == "drop":
            target.pop(key, None)
        elif action == "add":
            target[draw(st.sampled_from(["extra", "pan", "Email", *keys]))] = draw(_junk)
        else:  # drop one key and add another: the same number of keys
            target.pop(key, None)
            target[draw(st.sampled_from(["extra", "pan", *keys]))] = draw(_junk)
    return body


# -- properties --------------------------------------------------------------------------


@settings(max_examples=300)
@given(valid_bodies())
def test_fast_path_accepts_valid_bodies_and_builds_the_same_capture(body: dict[str, Any]) -> None:
    fast = capture_or_none(body)
    assert fast is not None
    assert isinstance(assert_paths_agree(body), Capture)
    assert fast.to_body() == body


@given(valid_bodies())
def test_a_view_s_capture_is_the_capture_without_its_sealed_card(body: dict[str, Any]) -> None:
    capture = capture_or_none(body)
    assert capture is not None
    view = without_sealed_card(capture)
    assert view.card.sealed == "" and capture.card.sealed != ""
    assert view == dataclasses.replace(capture, card=dataclasses.replace(capture.card, sealed=""))


@settings(max_examples=1500)
@given(mutated_bodies())
def test_fast_and_detailed_paths_agree_on_any_body(body: dict[str, Any]) -> None:
    assert_paths_agree(body)


@given(valid_bodies(), st.data())
def test_fast_path_never_accepts_what_a_type_change_makes_invalid(
    body: dict[str, Any], data: st.DataObject
) -> None:
    """Bools and floats where integers belong, for every integer field."""
    field = data.draw(st.sampled_from(["captured_at_ms", "expires_at_ms", "amount.minor"]))
    value = data.draw(st.one_of(st.booleans(), st.floats(allow_nan=False)))
    if field == "amount.minor":
        body["amount"]["minor"] = value
    else:
        body[field] = value
    assert capture_or_none(body) is None
    slow = assert_paths_agree(body)
    assert not isinstance(slow, Capture)


# -- the messages, as before ------------------------------------------------------------


def body_with(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(CAPTURE.to_body())
    *parents, last = path.split(".")
    target = body
    for name in parents:
        target = target[name]
    target[last] = value
    return body


def body_without(path: str) -> dict[str, Any]:
    body = copy.deepcopy(CAPTURE.to_body())
    *parents, last = path.split(".")
    target = body
    for name in parents:
        target = target[name]
    del target[last]
    return body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (body_with("amount.minor", 0), "a captured amount must be positive"),
        (body_with("amount.minor", -5), "a captured amount must be positive"),
        (
            body_with("amount.minor", True),
            "body field 'amount': malformed money {'minor': True, 'currency': 'USD'}",
        ),
        (
            body_with("amount.minor", 12.5),
            "body field 'amount': malformed money {'minor': 12.5, 'currency': 'USD'}",
        ),
        (
            body_with("amount.currency", "ZZZ"),
            "body field 'amount': unknown currency 'ZZZ'; use an ISO 4217 code such as "
            "USD, EUR, CAD",
        ),
        (
            body_with("amount.minor", AMOUNT_MINOR_MAX + 1),
            f"body field 'amount': amount {AMOUNT_MINOR_MAX + 1} is beyond the allowed magnitude",
        ),
        (
            body_with("channel", "carrier-pigeon"),
            "body field 'channel' must be one of ['integrated', 'offline', 'standalone']",
        ),
        (body_with("email", "not an email"), "email must look like name@example.com"),
        (body_with("email", "a b@c.co"), "email must look like name@example.com"),
        (body_with("email", "a@b\u00a0c"), "email must look like name@example.com"),
        (body_with("email", "a@b\x1cc"), "email must look like name@example.com"),
        (
            body_with("email", ""),
            f"body field 'email' must be a non-empty string (<= {EMAIL_CHARS_MAX})",
        ),
        (body_with("card.last4", "42"), "card last4 must be 4 digits"),
        (
            body_with("card.last4", "42424"),
            "body field 'last4' must be a non-empty string (<= 4)",
        ),
        (body_with("card.last4", "42a4"), "card last4 must be 4 digits"),
        (
            body_with("card.co_brands", ["amex", 1]),
            "card co_brands must be a short list of strings",
        ),
        (
            body_with("card.co_brands", ["a", "b", "c", "d", "e"]),
            "card co_brands must be a short list of strings",
        ),
        (
            body_with("card.entry_method", "telepathy"),
            "body field 'entry_method' must be one of ['insert', 'manual', 'swipe', 'tap']",
        ),
        (body_with("card", ["visa"]), "card must be an object"),
        (
            body_with("captured_at_ms", True),
            f"body field 'captured_at_ms' must be an integer from 0 to {WIRE_INT_MAX}, got True",
        ),
        (
            body_with("captured_at_ms", -1),
            f"body field 'captured_at_ms' must be an integer from 0 to {WIRE_INT_MAX}, got -1",
        ),
        (
            body_with("expires_at_ms", 1.0),
            f"body field 'expires_at_ms' must be an integer from 0 to {WIRE_INT_MAX}, got 1.0",
        ),
        (
            body_with("expires_at_ms", WIRE_INT_MAX + 1),
            f"body field 'expires_at_ms' must be an integer from 0 to {WIRE_INT_MAX}, got "
            f"{WIRE_INT_MAX + 1}",
        ),
        (
            body_with("payment_id", ""),
            f"body field 'payment_id' must be a non-empty string (<= {ID_CHARS_MAX})",
        ),
        (
            body_with("device_class", "d" * 33),
            "body field 'device_class' must be a non-empty string (<= 32)",
        ),
        (
            body_with("extra", 1),
            f"body fields {sorted([*_CAPTURE_KEYS, 'extra'])}: need {sorted(_CAPTURE_KEYS)}, "
            "may add []",
        ),
        (
            body_without("payment_id"),
            f"body fields {sorted(_CAPTURE_KEYS - {'payment_id'})}: "
            f"need {sorted(_CAPTURE_KEYS)}, may add []",
        ),
    ],
)
def test_refusals_keep_their_precise_message(body: dict[str, Any], message: str) -> None:
    assert capture_or_none(body) is None
    assert assert_paths_agree(body) == ("ProtocolError", message)
    with pytest.raises(ProtocolError) as caught:
        Capture.from_body(body)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "body",
    [
        body_with("amount.currency", Str("USD")),
        body_with("card.co_brands", [Str("amex")]),
        body_with("email", "jos\u00e9@example.com"),
        Dict(CAPTURE.to_body()),
    ],
)
def test_what_only_the_detailed_validator_accepts_is_still_accepted(
    body: dict[str, Any],
) -> None:
    assert capture_or_none(body) is None
    slow = assert_paths_agree(body)
    assert isinstance(slow, Capture)
    assert Capture.from_body(body) == slow


def test_last4_digits_are_judged_by_the_same_rule_on_both_paths() -> None:
    """``str.isdigit`` on both, as before (it holds for other scripts' digits too)."""
    for last4 in ("0000", "4242", "\u0664\u0662\u0664\u0662", "42\u00b24"):
        body = body_with("card.last4", last4)
        slow = assert_paths_agree(body)
        assert isinstance(slow, Capture) == last4.isdigit()
        assert (capture_or_none(body) is not None) == last4.isdigit()


def test_a_str_subclass_id_is_refused_by_both_paths_as_before() -> None:
    body = body_with("payment_id", Str("p-1"))
    assert capture_or_none(body) is None
    assert assert_paths_agree(body) == (
        "ProtocolError",
        f"body field 'payment_id' must be a non-empty string (<= {ID_CHARS_MAX})",
    )


def test_the_common_body_takes_the_fast_path() -> None:
    body = CAPTURE.to_body()
    fast = capture_or_none(body)
    assert fast == CAPTURE
    assert capture_or_none({**body, "email": None, "expires_at_ms": None}) is not None


def test_the_fast_path_reads_exactly_the_schema_keys() -> None:
    """It checks the key set by count plus lookups: those lookups are the schema's keys."""
    body = CAPTURE.to_body()
    assert set(body) == _CAPTURE_KEYS and set(body["card"]) == _CARD_KEYS
    for key in _CAPTURE_KEYS:
        renamed = {("x" + k if k == key else k): v for k, v in body.items()}
        assert capture_or_none(renamed) is None
    for key in _CARD_KEYS:
        card = {("x" + k if k == key else k): v for k, v in body["card"].items()}
        assert capture_or_none({**body, "card": card}) is None
