"""Experiment: what would a compiled decoder for push frames save on the server? CPU only.

The server's per-op work in Python -- decoding a push frame, checking each op and hashing
it, validating each capture body -- is the larger part of its ~38 us an op on the drain
path (the SQLite writes are the other; see ``bench_storage_model``). This compares, on
the same 10,000-capture frames as ``bench_drain``:

- ``today``: :func:`protocol.decode` (msgspec into dicts, :meth:`Op.from_wire` with one
  canonical encoding and one SHA-256 per op) and :func:`parse_body` on every op;
- ``typed``: one msgspec decode of the whole frame into typed ``Struct``s that carry the
  capture rules as constraints (lengths, allowed values, exact keys, amount range), then
  the canonical bytes of each op encoded from the structs and hashed -- the work a compiled
  decoder would leave in Python.

``typed`` is not the product's validator (it only mirrors its rules for captures, and
builds no :class:`Op`); its figure bounds what such a decoder could save. The two
alternate for ``--rounds`` rounds; medians of CPU per op are printed as JSON, with a check
that both paths produce the same digests. Not part of ``syncengine bench`` (no target):
``.venv/bin/python -m bench.bench_typed_decode [--rounds N]``.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from typing import Annotated, Any, Literal

import msgspec

from bench._common import experiment_main, progress
from bench.bench_drain import PAYMENTS, _terminal_ops
from syncengine.core import crypto, protocol
from syncengine.core.bodies import (
    EMAIL_CHARS_MAX,
    ID_CHARS_MAX,
    SEALED_B64_CHARS_MAX,
    parse_body,
)
from syncengine.core.money import AMOUNT_MINOR_MAX, CURRENCY_EXPONENT
from syncengine.core.ops import OP_FORMAT_VERSION

ROUNDS_DEFAULT = 15

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_CHARS_MAX)]
Short = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Millis = Annotated[int, msgspec.Meta(ge=0)]
Currency = Annotated[str, msgspec.Meta(pattern="^(" + "|".join(sorted(CURRENCY_EXPONENT)) + ")$")]
Email = Annotated[
    str, msgspec.Meta(min_length=1, max_length=EMAIL_CHARS_MAX, pattern=r"^[!-~]*@[!-~]*$")
]


class Amount(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    currency: Currency
    minor: Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MINOR_MAX)]


class Card(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    brand: Short
    co_brands: Annotated[list[str], msgspec.Meta(max_length=4)]
    entry_method: Literal["insert", "manual", "swipe", "tap"]
    last4: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}$")]
    sealed: Annotated[str, msgspec.Meta(min_length=1, max_length=SEALED_B64_CHARS_MAX)]


class CaptureBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Fields in sorted order: encoded as they are declared, they give canonical bytes.
    amount: Amount
    captured_at_ms: Millis
    card: Card
    channel: Literal["integrated", "offline", "standalone"]
    device_class: Short
    email: Email | None
    expires_at_ms: Millis | None
    merchant_id: Id
    payment_id: Id


class CaptureOp(msgspec.Struct, array_like=True, frozen=True):
    origin: Id
    seq: Annotated[int, msgspec.Meta(ge=1)]
    hlc: tuple[Millis, Annotated[int, msgspec.Meta(ge=0)]]
    kind: Literal["capture"]
    body: CaptureBody
    prev: Annotated[str, msgspec.Meta(min_length=64, max_length=64)]


class PushFrame(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    head_signature: str
    ops: list[CaptureOp]
    type: Literal["push"]
    v: Literal[1]


_DECODER = msgspec.json.Decoder(PushFrame)
_ENCODER = msgspec.json.Encoder()


def _today(frames: list[bytes]) -> list[str]:
    digests = []
    for frame in frames:
        message = protocol.decode(frame)
        assert isinstance(message, protocol.Push)
        for op in message.ops:
            parse_body(op)
            digests.append(op.digest)
    return digests


def _typed(frames: list[bytes]) -> list[str]:
    digests = []
    for frame in frames:
        for op in _DECODER.decode(frame).ops:
            data = _ENCODER.encode(
                (OP_FORMAT_VERSION, op.origin, op.seq, op.hlc, op.kind, op.body, op.prev)
            )
            digests.append(hashlib.sha256(data).hexdigest())
    return digests


def run(rounds: int = ROUNDS_DEFAULT, payments: int = PAYMENTS) -> dict[str, Any]:
    progress(f"typed decode: building {payments} captures")
    frames = _terminal_ops(payments, crypto.Ed25519KeyPair.from_private(os.urandom(32)))
    if _today(frames) != _typed(frames):
        raise AssertionError("the typed path hashed different bytes: it is not canonical")
    paths = {"today": _today, "typed": _typed}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        for name in paths if r % 2 else reversed(paths):
            started = time.process_time()
            paths[name](frames)
            cpu[name].append((time.process_time() - started) * 1e6 / payments)
    medians = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
    return {
        "payments": payments,
        "rounds": rounds,
        "cpu_us_per_op_median": medians,
        "saved_us_per_op": round(medians["today"] - medians["typed"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    return experiment_main("python -m bench.bench_typed_decode", run, ROUNDS_DEFAULT, argv)


if __name__ == "__main__":
    raise SystemExit(main())
