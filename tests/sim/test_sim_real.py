"""The real-process tier: real server, sandbox processor and terminal processes on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncengine.sim import real
from syncengine.sim.scenario import load

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_real_smoke_partition_sigkill_terminal_and_server() -> None:
    # 10 scenario minutes at 20x: ~30 s with process start-up.
    result = real.run(load(HERE / "real-smoke.toml"), clock_factor=20)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert result.counters["captured"] > 0
    assert result.counters["approved_offline"] > 0
    kinds = {(e.kind, e.detail) for e in result.facts.trace}
    assert ("crash", "server") in kinds and ("restart", "server") in kinds
    assert result.facts.ledger and result.facts.server_ops


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decline-after-reconnect", "duplicate-reorder"])
def test_real_shipped_scenario(name: str) -> None:
    result = real.run(load(ROOT / "scenarios" / f"{name}.toml"), clock_factor=120)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
