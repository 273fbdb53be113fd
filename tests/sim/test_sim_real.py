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


def test_real_provider_outage_is_the_maintenance_switch() -> None:
    """provider_outage runs in the real tier: every server answers service_unavailable,
    terminals switch offline at once (auto_on_provider_outage), a server restarted inside
    the outage stays in it, and afterwards everything is forwarded once."""
    result = real.run(load(HERE / "real-provider.toml"), clock_factor=20)
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert "faults_skipped" not in result.counters
    # Offline approvals come from the provider outage alone: the network is never cut and
    # the server's 20 s crash is far shorter than the 2 min auto delay of a network outage.
    assert result.counters["approved_offline"] > 0
    kinds = {(e.kind, e.detail) for e in result.facts.trace}
    assert ("fault", "provider_outage") in kinds
    assert ("restart", "server") in kinds
