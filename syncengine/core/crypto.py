"""Sealing card data to the processor and signing chain heads. Pure: no I/O, no clock.

Theory of operation
-------------------
1. **Sealing** (R13: a stolen terminal or a compromised sync server reveals no card
   number). A terminal seals card data to the processor's X25519 public key, like HPKE
   base mode or a libsodium sealed box: a fresh ephemeral X25519 key agrees a secret with
   the recipient; HKDF-SHA256 turns it into a ChaCha20-Poly1305 key, with ``info`` binding a
   domain string, the ephemeral public key and the recipient public key. The envelope is::

       version (1 byte) | ephemeral public (32) | nonce (12) | ciphertext + tag (16)

   The header (version, ephemeral public, nonce) is also authenticated as AEAD associated
   data, followed by the caller's ``aad``. Only the processor's private key opens it.
2. **Randomness is injected.** ``seal`` takes ``ephemeral_private`` (32 bytes) and
   ``nonce`` (12 bytes) so the simulator is reproducible; real shells pass
   ``os.urandom``. The ephemeral key MUST be fresh for every envelope: reusing it with the
   same recipient and nonce reuses the AEAD key and nonce, which breaks confidentiality.
3. **Card payloads** are canonical JSON, padded to a fixed size before sealing so the
   envelope length does not reveal the PAN or name length. Their ``aad`` binds the
   payment id (:func:`card_aad`), so an envelope cannot be moved to another payment.
4. **Signatures** are Ed25519 over domain-separated messages (:func:`chain_head_message`,
   :func:`challenge_message`); a signature made for one purpose never verifies for another.
5. **Errors.** Opening fails with one :class:`CryptoError` whatever went wrong (wrong key,
   tampering, wrong aad) so the failure is no oracle. A signature that does not verify is a
   :class:`ChainError` (the peer misbehaved). Malformed wire values are a
   :class:`ProtocolError`. Card data that fails validation is :class:`Refused`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from syncengine.core import canonical
from syncengine.core.errors import ChainError, CryptoError, ProtocolError, Refused, check

# --- sizes and limits -------------------------------------------------------------------

KEY_BYTES = 32  # X25519 and Ed25519 raw keys (private and public)
SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12  # ChaCha20-Poly1305
TAG_BYTES = 16  # Poly1305
SEALED_VERSION = 1
SEALED_HEADER_BYTES = 1 + KEY_BYTES + NONCE_BYTES
SEALED_PLAINTEXT_BYTES_MAX = 1024
SEALED_ENVELOPE_BYTES_MIN = SEALED_HEADER_BYTES + TAG_BYTES
SEALED_ENVELOPE_BYTES_MAX = SEALED_ENVELOPE_BYTES_MIN + SEALED_PLAINTEXT_BYTES_MAX

CARD_PLAINTEXT_BYTES = 256  # every card payload is padded to exactly this size
CARDHOLDER_CHARS_MAX = 26  # EMV tag 5F20 (cardholder name) is 2-26 characters
PAN_DIGITS_MIN = 12
PAN_DIGITS_MAX = 19
EXP_YEAR_MIN = 2000
EXP_YEAR_MAX = 2099
PAYMENT_ID_CHARS_MAX = 128
ORIGIN_CHARS_MAX = 128
SEQ_MAX = 2**63 - 1
CHALLENGE_NONCE_BYTES_MIN = 16
CHALLENGE_NONCE_BYTES_MAX = 64
B64_CHARS_MAX_DEFAULT = 2**20

# Domain strings: each names its purpose and version, so no two uses can be confused.
_SEAL_DOMAIN = b"syncengine/seal/v1"
_CARD_AAD_DOMAIN = b"syncengine/card-aad/v1\x00"
_CHAIN_HEAD_DOMAIN = b"syncengine/chain-head/v1\n"
_CHALLENGE_DOMAIN = b"syncengine/ws-challenge/v1\n"
_CARD_FORMAT = 1

_OPEN_FAILED = "sealed envelope cannot be opened: wrong key or tampered"
_DIGITS_RE = re.compile(r"[0-9]+")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_CARDHOLDER_RE = re.compile(r"[\x20-\x7e]+")  # printable ASCII, as EMV encodes names


def _need_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise CryptoError(f"{what} must be {size} bytes, got {got}")
    return value


# --- keys -------------------------------------------------------------------------------


def x25519_public_from_private(private: bytes) -> bytes:
    """Return the raw 32-byte X25519 public key of a raw 32-byte private key."""
    key = X25519PrivateKey.from_private_bytes(_need_bytes(private, KEY_BYTES, "X25519 private"))
    return key.public_key().public_bytes_raw()


def ed25519_public_from_private(private: bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key of a raw 32-byte private key (seed)."""
    key = Ed25519PrivateKey.from_private_bytes(_need_bytes(private, KEY_BYTES, "Ed25519 private"))
    return key.public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class X25519KeyPair:
    """An X25519 key pair as raw bytes; build it with :meth:`from_private`."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> X25519KeyPair:
        """Derive the pair from 32 random bytes (the caller supplies the randomness)."""
        return cls(private, x25519_public_from_private(private))


@dataclass(frozen=True, slots=True)
class Ed25519KeyPair:
    """An Ed25519 key pair as raw bytes; build it with :meth:`from_private`."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> Ed25519KeyPair:
        """Derive the pair from a 32-byte random seed (the caller supplies the randomness)."""
        return cls(private, ed25519_public_from_private(private))


# --- sealing ----------------------------------------------------------------------------


def _seal_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_SEAL_DOMAIN + ephemeral_public + recipient_public,
    )
    return hkdf.derive(shared)


def seal(
    recipient_public: bytes,
    plaintext: bytes,
    *,
    ephemeral_private: bytes,
    nonce: bytes,
    aad: bytes = b"",
) -> bytes:
    """Seal ``plaintext`` so that only the holder of ``recipient_public``'s key can open it.

    ``ephemeral_private`` (32 bytes) and ``nonce`` (12 bytes) must come from a secure
    random source and must never be reused. ``aad`` is authenticated but not encrypted;
    :func:`open_sealed` needs the same ``aad``. Returns the versioned envelope described in
    the module docstring. Raises :class:`CryptoError` on malformed inputs, an invalid
    recipient key or a plaintext above ``SEALED_PLAINTEXT_BYTES_MAX``.
    """
    _need_bytes(recipient_public, KEY_BYTES, "recipient public key")
    _need_bytes(ephemeral_private, KEY_BYTES, "ephemeral private key")
    _need_bytes(nonce, NONCE_BYTES, "nonce")
    if ephemeral_private == bytes(KEY_BYTES):
        # An all-zero "random" key means the randomness was never filled in.
        raise CryptoError("ephemeral private key is all zeros; pass fresh random bytes")
    if not isinstance(plaintext, bytes) or not isinstance(aad, bytes):
        raise CryptoError("plaintext and aad must be bytes")
    if len(plaintext) > SEALED_PLAINTEXT_BYTES_MAX:
        raise CryptoError(
            f"plaintext is {len(plaintext)} bytes, above the {SEALED_PLAINTEXT_BYTES_MAX}-byte"
            " limit for sealing"
        )
    ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_private)
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    except ValueError:
        # A low-order point gives an all-zero shared secret: never encrypt under it.
        raise CryptoError("recipient public key is invalid; check the processor key") from None
    header = bytes([SEALED_VERSION]) + ephemeral_public + nonce
    key = _seal_key(shared, ephemeral_public, recipient_public)
    envelope = header + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header + aad)
    check(len(envelope) == SEALED_ENVELOPE_BYTES_MIN + len(plaintext), "envelope size")
    return envelope


def open_sealed(recipient_private: bytes, envelope: bytes, aad: bytes = b"") -> bytes:
    """Open an envelope made by :func:`seal` and return the plaintext.

    Raises :class:`CryptoError` ("... cannot be opened: wrong key or tampered") on any
    failure: wrong key, a changed byte, a different ``aad``, wrong version or length.
    """
    _need_bytes(recipient_private, KEY_BYTES, "recipient private key")
    if not isinstance(envelope, bytes) or not isinstance(aad, bytes):
        raise CryptoError(_OPEN_FAILED)
    if not SEALED_ENVELOPE_BYTES_MIN <= len(envelope) <= SEALED_ENVELOPE_BYTES_MAX:
        raise CryptoError(f"{_OPEN_FAILED} (length {len(envelope)} bytes)")
    if envelope[0] != SEALED_VERSION:
        raise CryptoError(f"{_OPEN_FAILED} (unsupported version {envelope[0]})")
    header = envelope[:SEALED_HEADER_BYTES]
    ephemeral_public = envelope[1 : 1 + KEY_BYTES]
    nonce = envelope[1 + KEY_BYTES : SEALED_HEADER_BYTES]
    recipient = X25519PrivateKey.from_private_bytes(recipient_private)
    recipient_public = recipient.public_key().public_bytes_raw()
    try:
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        key = _seal_key(shared, ephemeral_public, recipient_public)
        plaintext = ChaCha20Poly1305(key).decrypt(
            nonce, envelope[SEALED_HEADER_BYTES:], header + aad
        )
    except (InvalidTag, ValueError):
        raise CryptoError(_OPEN_FAILED) from None
    check(len(plaintext) <= SEALED_PLAINTEXT_BYTES_MAX, "opened plaintext size")
    return plaintext


# --- card data --------------------------------------------------------------------------


def luhn_ok(pan: str) -> bool:
    """True when ``pan`` is a non-empty string of ASCII digits with a valid Luhn check digit."""
    if not isinstance(pan, str) or not _DIGITS_RE.fullmatch(pan):
        return False
    total = 0
    for index, char in enumerate(reversed(pan)):
        digit = ord(char) - ord("0")
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _check_pan_shape(pan: object) -> str:
    if (
        not isinstance(pan, str)
        or not _DIGITS_RE.fullmatch(pan)
        or not PAN_DIGITS_MIN <= len(pan) <= PAN_DIGITS_MAX
    ):
        raise Refused(
            "card_number_invalid",
            f"the card number must be {PAN_DIGITS_MIN}-{PAN_DIGITS_MAX} digits;"
            " ask the customer to tap or insert the card again",
        )
    return pan


def last4(pan: str) -> str:
    """The last four digits of a card number (the only part terminals may keep in clear)."""
    return _check_pan_shape(pan)[-4:]


@dataclass(frozen=True, slots=True, repr=False)
class CardData:
    """Card data read at capture. Never logged: ``repr`` shows only the last four digits.

    Validation raises :class:`Refused` with reason ``card_number_invalid`` (not 12-19
    digits, or the Luhn check fails), ``card_expiry_invalid`` or ``cardholder_invalid``.
    Whether the card has expired is a policy decision made elsewhere (it needs a clock).
    """

    pan: str
    exp_month: int
    exp_year: int
    cardholder: str | None = None

    def __post_init__(self) -> None:
        if not luhn_ok(_check_pan_shape(self.pan)):
            raise Refused(
                "card_number_invalid",
                "the card number fails its check digit; ask the customer to tap or insert"
                " the card again",
            )
        month_ok = type(self.exp_month) is int and 1 <= self.exp_month <= 12
        year_ok = type(self.exp_year) is int and EXP_YEAR_MIN <= self.exp_year <= EXP_YEAR_MAX
        if not (month_ok and year_ok):
            raise Refused(
                "card_expiry_invalid",
                f"card expiry {self.exp_month!r}/{self.exp_year!r} is not a month 1-12 of a"
                f" year {EXP_YEAR_MIN}-{EXP_YEAR_MAX}; read the card again",
            )
        if self.cardholder is not None and not (
            isinstance(self.cardholder, str)
            and len(self.cardholder) <= CARDHOLDER_CHARS_MAX
            and _CARDHOLDER_RE.fullmatch(self.cardholder)
        ):
            raise Refused(
                "cardholder_invalid",
                f"the cardholder name must be 1-{CARDHOLDER_CHARS_MAX} printable ASCII"
                " characters, or absent",
            )

    def __repr__(self) -> str:
        return f"CardData(pan='…{self.pan[-4:]}', exp={self.exp_month:02d}/{self.exp_year})"

    def to_bytes(self) -> bytes:
        """Canonical JSON (:mod:`syncengine.core.canonical`) of this card."""
        body = {
            "cardholder": self.cardholder,
            "exp_month": self.exp_month,
            "exp_year": self.exp_year,
            "pan": self.pan,
            "v": _CARD_FORMAT,
        }
        return canonical.dumps(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> CardData:
        """Parse :meth:`to_bytes` output; raises :class:`ProtocolError` unless canonical."""
        body: Any = canonical.loads(data)
        keys = {"cardholder", "exp_month", "exp_year", "pan", "v"}
        if not isinstance(body, dict) or set(body) != keys or body["v"] != _CARD_FORMAT:
            raise ProtocolError("card payload has unexpected fields or version")
        try:
            card = cls(body["pan"], body["exp_month"], body["exp_year"], body["cardholder"])
        except Refused as exc:
            raise ProtocolError(f"card payload holds invalid card data ({exc.reason})") from None
        if card.to_bytes() != data:
            raise ProtocolError("card payload is not in canonical form")
        return card


def card_aad(payment_id: str) -> bytes:
    """The ``aad`` that binds a card envelope to one payment id (pass it to seal/open)."""
    if (
        not isinstance(payment_id, str)
        or not 1 <= len(payment_id) <= PAYMENT_ID_CHARS_MAX
        or "\x00" in payment_id
        or not _encodable(payment_id)
    ):
        raise CryptoError(
            f"payment id must be 1-{PAYMENT_ID_CHARS_MAX} characters without NUL to bind a card"
        )
    return _CARD_AAD_DOMAIN + payment_id.encode("utf-8")


def seal_card(
    processor_public: bytes,
    card: CardData,
    *,
    ephemeral_private: bytes,
    nonce: bytes,
    aad: bytes,
) -> bytes:
    """Seal ``card`` to the processor; ``aad`` should be ``card_aad(payment_id)``.

    The payload is padded to ``CARD_PLAINTEXT_BYTES`` so every card envelope has the same
    length. Randomness rules are those of :func:`seal`.
    """
    if not aad:
        raise CryptoError("seal_card needs aad binding the payment id; use card_aad(payment_id)")
    payload = card.to_bytes()
    check(len(payload) <= CARD_PLAINTEXT_BYTES, "card payload fits its padded size")
    # NUL never occurs in JSON text, so it pads unambiguously.
    padded = payload.ljust(CARD_PLAINTEXT_BYTES, b"\x00")
    return seal(processor_public, padded, ephemeral_private=ephemeral_private, nonce=nonce, aad=aad)


def open_card(processor_private: bytes, envelope: bytes, aad: bytes) -> CardData:
    """Open an envelope made by :func:`seal_card` with the same ``aad``.

    Raises :class:`CryptoError` if the envelope does not open or does not hold card data.
    """
    padded = open_sealed(processor_private, envelope, aad)
    if len(padded) != CARD_PLAINTEXT_BYTES:
        raise CryptoError("sealed envelope opened but is not a card payload")
    try:
        return CardData.from_bytes(padded.rstrip(b"\x00"))
    except ProtocolError as exc:
        raise CryptoError(f"sealed envelope opened but {exc}") from None


# --- signatures -------------------------------------------------------------------------


def sign(private: bytes, message: bytes) -> bytes:
    """Ed25519-sign ``message`` with a raw 32-byte private key; returns 64 bytes."""
    return Signer(private).sign(message)


class Signer:
    """A raw 32-byte Ed25519 private key, loaded once to sign many messages.

    Loading the key derives its public half and costs about as much as a signature: a
    holder that signs on every session or push keeps a Signer instead of the raw bytes.
    """

    __slots__ = ("_key",)

    def __init__(self, private: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(
            _need_bytes(private, KEY_BYTES, "Ed25519 private")
        )

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    """Return if ``signature`` is a valid Ed25519 signature of ``message`` by ``public``.

    Raises :class:`ChainError` ("signature does not verify ...") otherwise, including for a
    malformed key or signature.
    """
    if (
        not isinstance(public, bytes)
        or len(public) != KEY_BYTES
        or not isinstance(signature, bytes)
        or len(signature) != SIGNATURE_BYTES
    ):
        raise ChainError("signature does not verify: malformed key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ChainError(
            "signature does not verify: the data was changed or signed by another key"
        ) from None


def _encodable(text: str) -> bool:
    # JSON can carry lone surrogates ("\\ud800"); they have no UTF-8 encoding.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= ORIGIN_CHARS_MAX
        or not _encodable(value)
    ):
        raise ProtocolError(f"{what} must be a string of 1-{ORIGIN_CHARS_MAX} characters")
    return value


def chain_head_message(origin: str, seq: int, head_digest_hex: str) -> bytes:
    """The bytes a terminal signs over the head of its hash chain.

    ``seq`` is the head's sequence number (>= 1), ``head_digest_hex`` its SHA-256 digest as
    64 lowercase hex digits. Raises :class:`ProtocolError` on malformed values.
    """
    _check_name(origin, "origin")
    if type(seq) is not int or not 1 <= seq <= SEQ_MAX:
        raise ProtocolError(f"chain head seq must be an integer 1..{SEQ_MAX}, got {seq!r}")
    if not isinstance(head_digest_hex, str) or not _HEX64_RE.fullmatch(head_digest_hex):
        raise ProtocolError("chain head digest must be 64 lowercase hex digits (SHA-256)")
    body: dict[str, object] = {"digest": head_digest_hex, "origin": origin, "seq": seq}
    return _CHAIN_HEAD_DOMAIN + canonical.dumps(body)


def challenge_message(server_nonce: bytes, terminal_id: str) -> bytes:
    """The bytes a terminal signs to authenticate a websocket session.

    ``server_nonce`` is the server's fresh random challenge
    (``CHALLENGE_NONCE_BYTES_MIN``-``CHALLENGE_NONCE_BYTES_MAX`` bytes).
    Raises :class:`ProtocolError` on malformed values.
    """
    if (
        not isinstance(server_nonce, bytes)
        or not CHALLENGE_NONCE_BYTES_MIN <= len(server_nonce) <= CHALLENGE_NONCE_BYTES_MAX
    ):
        raise ProtocolError(
            f"challenge nonce must be {CHALLENGE_NONCE_BYTES_MIN}-{CHALLENGE_NONCE_BYTES_MAX} bytes"
        )
    _check_name(terminal_id, "terminal id")
    body: dict[str, object] = {"nonce": b64e(server_nonce), "terminal": terminal_id}
    return _CHALLENGE_DOMAIN + canonical.dumps(body)


# --- base64url --------------------------------------------------------------------------


def b64e(data: bytes) -> str:
    """Base64url without padding, as used on the wire for keys, signatures, ciphertexts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, *, chars_max: int = B64_CHARS_MAX_DEFAULT) -> bytes:
    """Decode :func:`b64e` output strictly; raises :class:`ProtocolError` if malformed.

    Rejects padding, characters outside the base64url alphabet, impossible lengths,
    non-canonical trailing bits and input longer than ``chars_max`` characters.
    """
    if not isinstance(text, str):
        raise ProtocolError(f"expected a base64url string, got {type(text).__name__}")
    if len(text) > chars_max:
        raise ProtocolError(f"base64url value is {len(text)} characters, above {chars_max}")
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ProtocolError("malformed base64url value (unpadded base64url expected)")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ProtocolError("malformed base64url value") from None
    if b64e(data) != text:
        # Non-zero unused bits: two strings would decode to the same bytes.
        raise ProtocolError("non-canonical base64url value")
    return data
