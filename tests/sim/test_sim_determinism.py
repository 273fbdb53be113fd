"""One seed, one run: the same seed reproduces exactly; another seed differs."""

from __future__ import annotations

from pathlib import Path

from syncengine.sim import runner
from syncengine.sim.scenario import load

SCENARIO = Path(__file__).parents[2] / "scenarios" / "duplicate-reorder.toml"


def _fingerprint(seed: int) -> tuple[object, ...]:
    result = runner.run(load(SCENARIO), seed)
    summary = result.to_json()
    summary.pop("wall_s")
    trace = tuple(
        (e.at_ms, e.kind, e.terminal, e.payment_id, e.value, e.detail) for e in result.facts.trace
    )
    ops = tuple(op.digest for op in result.facts.server_ops)
    return (tuple(sorted(summary.items(), key=str)), trace, ops)


def test_same_seed_same_run() -> None:
    assert _fingerprint(5) == _fingerprint(5)


def test_other_seed_other_run() -> None:
    assert _fingerprint(5) != _fingerprint(6)
