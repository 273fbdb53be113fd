"""Every shipped scenario passes its invariants and [expect] once, on its own seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncengine.sim import runner
from syncengine.sim.scenario import load

SCENARIOS = sorted((Path(__file__).parents[2] / "scenarios").glob("*.toml"))

#: Scenarios that fail with the server code that ships, for a reported bug (seed = file's).
KNOWN_BUGS: dict[str, str] = {}
PARAMS = [
    pytest.param(
        p,
        id=p.stem,
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[p.stem])]
        if p.stem in KNOWN_BUGS
        else [],
    )
    for p in SCENARIOS
]


def test_there_is_a_scenario_per_situation() -> None:
    assert len(SCENARIOS) >= 14


@pytest.mark.parametrize("path", PARAMS)
def test_scenario_passes(path: Path) -> None:
    result = runner.run(load(path))
    assert result.ok, "\n".join(result.violations + result.expect_failures)
    assert result.counters["captured"] > 0
