"""Tests for syncengine.core.crypto: sealing card data and signing chain heads."""

from __future__ import annotations

import ast
import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core import crypto
from syncengine.core.crypto import (
    CARD_PLAINTEXT_BYTES,
    SEALED_ENVELOPE_BYTES_MIN,
    SEALED_HEADER_BYTES,
    SEALED_PLAINTEXT_BYTES_MAX,
    CardData,
    Ed25519KeyPair,
    X25519KeyPair,
    b64d,
    b64e,
    card_aad,
    chain_head_message,
    challenge_message,
    ed25519_public_from_private,
    last4,
    luhn_ok,
    open_card,
    open_sealed,
    seal,
    seal_card,
    sign,
    verify,
    x25519_public_from_private,
)
from syncengine.core.errors import ChainError, CryptoError, ProtocolError, Refused

# Fixed "randomness": the simulator injects bytes like these; real shells use os.urandom.
PROCESSOR = X25519KeyPair.from_private(bytes(range(1, 33)))
OTHER = X25519KeyPair.from_private(bytes(range(101, 133)))
EPHEMERAL = bytes(range(201, 233))
NONCE = bytes(range(12))
TERMINAL = Ed25519KeyPair.from_private(bytes(range(50, 82)))
DIGEST = hashlib.sha256(b"op 7").hexdigest()
CARD = CardData("4242424242424242", 12, 2030, "DOE/JANE")

keys32 = st.binary(min_size=32, max_size=32).filter(lambda b: b != bytes(32))
nonces = st.binary(min_size=12, max_size=12)


def _with_check_digit(body: str) -> str:
    """Append the digit that makes ``body`` pass Luhn."""
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


pans = st.integers(min_value=11, max_value=18).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n).map(_with_check_digit)
)


# --- sealing ----------------------------------------------------------------------------


@given(plaintext=st.binary(max_size=SEALED_PLAINTEXT_BYTES_MAX), aad=st.binary(max_size=64))
def test_seal_round_trips(plaintext: bytes, aad: bytes) -> None:
    envelope = seal(PROCESSOR.public, plaintext, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=aad)
    assert len(envelope) == SEALED_ENVELOPE_BYTES_MIN + len(plaintext)
    assert open_sealed(PROCESSOR.private, envelope, aad) == plaintext


def test_envelope_layout_matches_the_documented_construction() -> None:
    # Re-derive independently from the spec in the module docstring: a wrong info string,
    # header layout or aad composition in the implementation makes this fail.
    aad = b"payment-1"
    envelope = seal(PROCESSOR.public, b"hello", ephemeral_private=EPHEMERAL, nonce=NONCE, aad=aad)
    ephemeral_public = x25519_public_from_private(EPHEMERAL)
    assert envelope[0] == 1
    assert envelope[1:33] == ephemeral_public
    assert envelope[33:45] == NONCE
    shared = X25519PrivateKey.from_private_bytes(PROCESSOR.private).exchange(
        X25519PublicKey.from_public_bytes(ephemeral_public)
    )
    info = b"syncengine/seal/v1" + ephemeral_public + PROCESSOR.public
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    header = envelope[:SEALED_HEADER_BYTES]
    assert ChaCha20Poly1305(key).decrypt(NONCE, envelope[45:], header + aad) == b"hello"


def test_wrong_key_cannot_open() -> None:
    envelope = seal(PROCESSOR.public, b"secret", ephemeral_private=EPHEMERAL, nonce=NONCE)
    with pytest.raises(CryptoError, match="cannot be opened: wrong key or tampered"):
        open_sealed(OTHER.private, envelope)


@given(data=st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    envelope = seal(PROCESSOR.public, b"card data", ephemeral_private=EPHEMERAL, nonce=NONCE)
    position = data.draw(st.integers(min_value=0, max_value=len(envelope) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(envelope)
    tampered[position] ^= mask
    with pytest.raises(CryptoError, match="cannot be opened"):
        open_sealed(PROCESSOR.private, bytes(tampered))


def test_every_flipped_bit_position_is_detected() -> None:
    # Exhaustive companion to the property test above: every byte, lowest bit.
    envelope = seal(PROCESSOR.public, b"card data", ephemeral_private=EPHEMERAL, nonce=NONCE)
    for position in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[position] ^= 1
        with pytest.raises(CryptoError):
            open_sealed(PROCESSOR.private, bytes(tampered))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda e: e[:-1],
        lambda e: e + b"\x00",
        lambda e: e[: SEALED_ENVELOPE_BYTES_MIN - 1],
        lambda e: b"",
        lambda e: bytes([2]) + e[1:],
    ],
    ids=["truncated", "extended", "too-short", "empty", "version-2"],
)
def test_wrong_length_or_version_cannot_open(mangle: Callable[[bytes], bytes]) -> None:
    envelope = seal(PROCESSOR.public, b"card data", ephemeral_private=EPHEMERAL, nonce=NONCE)
    with pytest.raises(CryptoError, match="cannot be opened: wrong key or tampered"):
        open_sealed(PROCESSOR.private, mangle(envelope))


def test_aad_mismatch_cannot_open() -> None:
    envelope = seal(PROCESSOR.public, b"x", ephemeral_private=EPHEMERAL, nonce=NONCE, aad=b"a")
    with pytest.raises(CryptoError):
        open_sealed(PROCESSOR.private, envelope, b"b")
    with pytest.raises(CryptoError):
        open_sealed(PROCESSOR.private, envelope)


@given(ephemeral=keys32, nonce=nonces, plaintext=st.binary(max_size=64))
def test_same_randomness_gives_same_envelope(
    ephemeral: bytes, nonce: bytes, plaintext: bytes
) -> None:
    first = seal(PROCESSOR.public, plaintext, ephemeral_private=ephemeral, nonce=nonce)
    second = seal(PROCESSOR.public, plaintext, ephemeral_private=ephemeral, nonce=nonce)
    assert first == second


def test_different_randomness_gives_different_envelope() -> None:
    base = seal(PROCESSOR.public, b"x", ephemeral_private=EPHEMERAL, nonce=NONCE)
    other_ephemeral = seal(PROCESSOR.public, b"x", ephemeral_private=OTHER.private, nonce=NONCE)
    other_nonce = seal(PROCESSOR.public, b"x", ephemeral_private=EPHEMERAL, nonce=bytes(12))
    assert len({base, other_ephemeral, other_nonce}) == 3


def test_plaintext_size_is_bounded() -> None:
    at_limit = b"a" * SEALED_PLAINTEXT_BYTES_MAX
    envelope = seal(PROCESSOR.public, at_limit, ephemeral_private=EPHEMERAL, nonce=NONCE)
    assert open_sealed(PROCESSOR.private, envelope) == at_limit
    with pytest.raises(CryptoError, match="limit"):
        seal(PROCESSOR.public, at_limit + b"a", ephemeral_private=EPHEMERAL, nonce=NONCE)


@pytest.mark.parametrize(
    ("recipient", "ephemeral", "nonce", "match"),
    [
        (PROCESSOR.public[:31], EPHEMERAL, NONCE, "recipient public key must be 32 bytes"),
        (PROCESSOR.public, EPHEMERAL[:31], NONCE, "ephemeral private key must be 32 bytes"),
        (PROCESSOR.public, EPHEMERAL, NONCE[:11], "nonce must be 12 bytes"),
        (PROCESSOR.public, bytes(32), NONCE, "all zeros"),
        (bytes(32), EPHEMERAL, NONCE, "recipient public key is invalid"),  # low-order point
    ],
)
def test_seal_refuses_bad_inputs(
    recipient: bytes, ephemeral: bytes, nonce: bytes, match: str
) -> None:
    with pytest.raises(CryptoError, match=match):
        seal(recipient, b"x", ephemeral_private=ephemeral, nonce=nonce)


# --- card data --------------------------------------------------------------------------


def test_card_round_trips_bound_to_its_payment() -> None:
    envelope = seal_card(
        PROCESSOR.public, CARD, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=card_aad("pay-1")
    )
    assert open_card(PROCESSOR.private, envelope, card_aad("pay-1")) == CARD


def test_card_envelope_moved_to_another_payment_cannot_open() -> None:
    envelope = seal_card(
        PROCESSOR.public, CARD, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=card_aad("pay-1")
    )
    with pytest.raises(CryptoError, match="cannot be opened"):
        open_card(PROCESSOR.private, envelope, card_aad("pay-2"))


def test_card_wrong_processor_key_cannot_open() -> None:
    envelope = seal_card(
        PROCESSOR.public, CARD, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=card_aad("pay-1")
    )
    with pytest.raises(CryptoError):
        open_card(OTHER.private, envelope, card_aad("pay-1"))


def test_seal_card_requires_aad() -> None:
    with pytest.raises(CryptoError, match="card_aad"):
        seal_card(PROCESSOR.public, CARD, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=b"")


@given(
    pan=pans,
    name=st.one_of(
        st.none(),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=26),
    ),
    ephemeral=keys32,
    nonce=nonces,
)
def test_sealed_card_hides_the_pan_and_its_length(
    pan: str, name: str | None, ephemeral: bytes, nonce: bytes
) -> None:
    card = CardData(pan, 1, 2031, name)
    envelope = seal_card(
        PROCESSOR.public, card, ephemeral_private=ephemeral, nonce=nonce, aad=card_aad("p")
    )
    assert pan.encode("ascii") not in envelope
    assert pan.encode("ascii") not in base64.b64encode(envelope)
    # Padding: the length reveals neither the PAN length nor the name length.
    assert len(envelope) == SEALED_ENVELOPE_BYTES_MIN + CARD_PLAINTEXT_BYTES
    assert open_card(PROCESSOR.private, envelope, card_aad("p")) == card


def test_open_card_refuses_a_sealed_non_card() -> None:
    aad = card_aad("p")
    envelope = seal(PROCESSOR.public, b"{}", ephemeral_private=EPHEMERAL, nonce=NONCE, aad=aad)
    with pytest.raises(CryptoError, match="not a card payload"):
        open_card(PROCESSOR.private, envelope, aad)
    padded = b'{"pan":"1"}'.ljust(CARD_PLAINTEXT_BYTES, b"\x00")
    envelope = seal(PROCESSOR.public, padded, ephemeral_private=EPHEMERAL, nonce=NONCE, aad=aad)
    with pytest.raises(CryptoError, match="opened but"):
        open_card(PROCESSOR.private, envelope, aad)


def test_card_canonical_bytes() -> None:
    assert CARD.to_bytes() == (
        b'{"cardholder":"DOE/JANE","exp_month":12,"exp_year":2030,"pan":"4242424242424242","v":1}'
    )
    assert CardData.from_bytes(CARD.to_bytes()) == CARD
    with pytest.raises(ProtocolError, match="canonical"):
        CardData.from_bytes(CARD.to_bytes().replace(b",", b", "))


def test_card_repr_does_not_leak_the_pan_or_name() -> None:
    text = repr(CARD) + str(CARD)
    assert "4242424242424242" not in text
    assert "JANE" not in text
    assert "4242" in text


@pytest.mark.parametrize(
    ("pan", "month", "year", "name", "reason"),
    [
        ("4242424242424241", 12, 2030, None, "card_number_invalid"),  # Luhn fails
        ("42424242424", 12, 2030, None, "card_number_invalid"),  # 11 digits
        ("42424242424242424242", 12, 2030, None, "card_number_invalid"),  # 20 digits
        ("4242 4242 4242 4242", 12, 2030, None, "card_number_invalid"),
        ("４２４２４２４２４２４２４２４２", 12, 2030, None, "card_number_invalid"),  # fullwidth
        ("4242424242424242", 0, 2030, None, "card_expiry_invalid"),
        ("4242424242424242", 13, 2030, None, "card_expiry_invalid"),
        ("4242424242424242", 12, 30, None, "card_expiry_invalid"),
        ("4242424242424242", True, 2030, None, "card_expiry_invalid"),
        ("4242424242424242", 12, 2030, "", "cardholder_invalid"),
        ("4242424242424242", 12, 2030, "A" * 27, "cardholder_invalid"),
        ("4242424242424242", 12, 2030, "DOE\nJANE", "cardholder_invalid"),
    ],
)
def test_card_validation_refuses(
    pan: str, month: int, year: int, name: str | None, reason: str
) -> None:
    with pytest.raises(Refused) as info:
        CardData(pan, month, year, name)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("pan", "ok"),
    [
        ("4242424242424242", True),  # Visa test card
        ("4242424242424241", False),
        ("5555555555554444", True),  # Mastercard test card
        ("378282246310005", True),  # American Express test card
        ("6011111111111117", True),  # Discover test card
        ("6011111111111111", False),
        ("", False),
        ("4242-4242", False),
        ("０", False),
    ],
)
def test_luhn(pan: str, ok: bool) -> None:
    assert luhn_ok(pan) is ok


def test_last4() -> None:
    assert last4("4242424242424242") == "4242"
    assert last4("378282246310005") == "0005"
    with pytest.raises(Refused):
        last4("4242")


def test_card_aad_is_bounded_and_distinct() -> None:
    assert card_aad("pay-1") != card_aad("pay-12")
    for bad in ["", "x" * 129, "a\x00b", "\ud800"]:
        with pytest.raises(CryptoError):
            card_aad(bad)


# --- keys and signatures ----------------------------------------------------------------


def test_x25519_public_matches_rfc7748() -> None:
    # RFC 7748 section 6.1, Alice and Bob.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert x25519_public_from_private(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert x25519_public_from_private(bob).hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )


def test_ed25519_matches_rfc8032() -> None:
    # RFC 8032 section 7.1, TEST 1 (empty message).
    private = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = ed25519_public_from_private(private)
    assert public.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    signature = sign(private, b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
        "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    verify(public, b"", signature)


def test_key_pairs_do_not_show_private_keys() -> None:
    assert PROCESSOR.private.hex() not in repr(PROCESSOR)
    assert TERMINAL.private.hex() not in repr(TERMINAL)
    with pytest.raises(CryptoError):
        X25519KeyPair.from_private(b"short")


def test_chain_head_signature_verifies() -> None:
    message = chain_head_message("T1", 7, DIGEST)
    verify(TERMINAL.public, message, sign(TERMINAL.private, message))


@pytest.mark.parametrize(
    "changed",
    [
        ("T2", 7, DIGEST),
        ("T1", 8, DIGEST),
        ("T1", 7, hashlib.sha256(b"op 7'").hexdigest()),
    ],
    ids=["origin", "seq", "digest"],
)
def test_chain_head_signature_fails_when_any_field_changes(changed: tuple[str, int, str]) -> None:
    signature = sign(TERMINAL.private, chain_head_message("T1", 7, DIGEST))
    with pytest.raises(ChainError, match="signature does not verify"):
        verify(TERMINAL.public, chain_head_message(*changed), signature)


@given(origin=st.text(min_size=1, max_size=20), seq=st.integers(1, 2**40), data=st.data())
def test_chain_head_messages_are_injective(origin: str, seq: int, data: st.DataObject) -> None:
    other_origin = data.draw(st.text(min_size=1, max_size=20))
    other_seq = data.draw(st.integers(1, 2**40))
    same = (origin, seq) == (other_origin, other_seq)
    first = chain_head_message(origin, seq, DIGEST)
    assert (first == chain_head_message(other_origin, other_seq, DIGEST)) is same


def test_signature_by_another_key_or_tampered_fails() -> None:
    message = chain_head_message("T1", 7, DIGEST)
    signature = sign(TERMINAL.private, message)
    stranger = Ed25519KeyPair.from_private(bytes(range(150, 182)))
    with pytest.raises(ChainError):
        verify(stranger.public, message, signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(ChainError):
        verify(TERMINAL.public, message, flipped)
    for public, sig in [(TERMINAL.public[:31], signature), (TERMINAL.public, signature[:63])]:
        with pytest.raises(ChainError, match="malformed"):
            verify(public, message, sig)


def test_chain_error_is_a_protocol_error() -> None:
    assert issubclass(ChainError, ProtocolError)


@pytest.mark.parametrize(
    ("origin", "seq", "digest"),
    [
        ("", 1, DIGEST),
        ("T1", 0, DIGEST),
        ("T1", True, DIGEST),
        ("T1", 1, DIGEST.upper()),
        ("T1", 1, DIGEST[:-1]),
        ("\ud800", 1, DIGEST),  # lone surrogate: valid in JSON, not in UTF-8
    ],
)
def test_chain_head_message_refuses_malformed(origin: str, seq: int, digest: str) -> None:
    with pytest.raises(ProtocolError):
        chain_head_message(origin, seq, digest)


def test_challenge_signature_is_domain_separated() -> None:
    server_nonce = bytes(range(32))
    message = challenge_message(server_nonce, "T1")
    signature = sign(TERMINAL.private, message)
    verify(TERMINAL.public, message, signature)
    with pytest.raises(ChainError):
        verify(TERMINAL.public, challenge_message(server_nonce, "T2"), signature)
    with pytest.raises(ChainError):
        verify(TERMINAL.public, challenge_message(bytes(range(1, 33)), "T1"), signature)
    # A chain-head signature is never accepted as a session signature, and vice versa.
    assert message.split(b"\n")[0] != chain_head_message("T1", 1, DIGEST).split(b"\n")[0]
    with pytest.raises(ProtocolError):
        challenge_message(b"short", "T1")


# --- base64url --------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_b64_round_trips_without_padding(data: bytes) -> None:
    text = b64e(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64d(text) == data


@pytest.mark.parametrize("text", ["YQ==", "YQ=", "a+b/", "A", "YR", "a b", "ü", "YQ\n"])
def test_b64d_refuses_malformed(text: str) -> None:
    # "YR" decodes to b"a" too, but with non-zero unused bits: not canonical.
    with pytest.raises(ProtocolError):
        b64d(text)


def test_b64d_refuses_non_strings_and_oversized() -> None:
    with pytest.raises(ProtocolError):
        b64d(123)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        b64d("AAAA" * 3, chars_max=8)


# --- purity -----------------------------------------------------------------------------


def test_crypto_module_imports_nothing_that_does_io() -> None:
    forbidden = {"os", "random", "time", "asyncio", "uuid", "socket", "sqlite3", "secrets"}
    tree = ast.parse(Path(crypto.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & forbidden
