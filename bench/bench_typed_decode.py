"""Experiment: what would a compiled decoder for push frames save on the server? CPU only.

The server's per-op work in Python -- decoding a push frame, checking each op and hashing
it, validating each capture body -- is the larger part of its ~38 us an op on the drain
path (the SQLite writes are the other; see ``bench_storage_model``). This compares, on
the same 10,000-capture frames as ``bench_drain``:

- ``today``: the general decoder (:func:`protocol.decode_general`: msgspec into dicts,
  :meth:`Op.from_wire` with one canonical encoding and one SHA-256 per op) and
  :func:`parse_body` on every op;
- ``typed``: the typed decoder of :mod:`syncengine.core.push_codec` (one msgspec decode
  of the whole frame into structs that carry the capture rules as constraints), then the
  canonical bytes of each op encoded from the structs and hashed -- the work a compiled
  decoder would leave in Python.

``typed`` builds no :class:`Op`, body or ``Capture``; its figure bounds what a compiled
decoder could save. ``protocol.decode`` itself (push_codec's :func:`decode_push`) builds
all three and saves less (see BENCHMARKS.md). The two alternate for ``--rounds`` rounds;
medians of CPU per op are printed as JSON, with a check
that both paths produce the same digests. Not part of ``syncengine bench`` (no target):
``.venv/bin/python -m bench.bench_typed_decode [--rounds N]``.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from typing import Any

import msgspec

from bench._common import experiment_main, progress
from bench.bench_drain import PAYMENTS, _terminal_ops
from syncengine.core import crypto, protocol, push_codec
from syncengine.core.bodies import parse_body
from syncengine.core.ops import OP_FORMAT_VERSION

ROUNDS_DEFAULT = 15

_ENCODER = msgspec.json.Encoder()


def _today(frames: list[bytes]) -> list[str]:
    digests = []
    for frame in frames:
        message = protocol.decode_general(frame)
        assert isinstance(message, protocol.Push)
        for op in message.ops:
            parse_body(op)
            digests.append(op.digest)
    return digests


def _typed(frames: list[bytes]) -> list[str]:
    digests = []
    for frame in frames:
        # The product's typed decoder (push_codec), without the Ops and Captures it builds.
        for origin, seq, hlc, kind, body, prev in push_codec._DECODER.decode(frame).ops:
            data = _ENCODER.encode((OP_FORMAT_VERSION, origin, seq, hlc, kind, body, prev))
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
