"""Replay every seed kept in regressions.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from syncengine.sim import runner
from syncengine.sim.scenario import load

ROOT = Path(__file__).parents[2]
CASES: list[dict[str, Any]] = tomllib.loads(
    (Path(__file__).parent / "regressions.toml").read_text()
)["regression"]


PARAMS = [
    pytest.param(
        c,
        id=f"{c['scenario']}@{c['seed']}",
        marks=[pytest.mark.xfail(strict=True, reason=c["xfail"])] if "xfail" in c else [],
    )
    for c in CASES
]


@pytest.mark.parametrize("case", PARAMS)
def test_regression_seed_passes(case: dict[str, Any]) -> None:
    result = runner.run(load(ROOT / case["scenario"]), int(case["seed"]))
    assert result.ok, "\n".join(result.violations + result.expect_failures)
