"""``syncengine bench``'s arguments and exit status: bad input is refused, a skip is shown.

Fast: no benchmark runs here. The sections are replaced, or the one that runs (the
PostgreSQL scale-out) meets a port where nothing listens and stops at its first check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncengine import benchmarks
from syncengine.server.store.postgres import redact_url

REPO_ROOT = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmarks.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def no_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test, rather than start minutes of benchmarks, if anything would run."""

    def collect(*_: object) -> object:
        raise AssertionError("a benchmark would have run")

    monkeypatch.setattr(benchmarks, "collect", collect)


@pytest.mark.parametrize("only", ["", ",", " , ,", "  "])
@pytest.mark.usefixtures("no_collect")
def test_an_only_that_names_no_benchmark_is_refused(
    only: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert benchmarks.run(_args("--only", only)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "syncengine bench: --only names no benchmark; choose from "
        "capture, drain, herd, delta, peer, scale"
    ]


def test_without_only_every_benchmark_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[list[str]] = []

    def collect(sizes: benchmarks.Sizes, only: list[str]) -> Any:
        chosen.append(only)
        return {}, {}, {}

    monkeypatch.setattr(benchmarks, "collect", collect)
    assert benchmarks.run(_args("--json")) == 0
    assert chosen == [[]]


def _sections(monkeypatch: pytest.MonkeyPatch, skip: str, why: str) -> Callable[[], list[str]]:
    """Every section replaced by one that gives a figure, except ``skip``, which skips."""
    ran: list[str] = []

    def section(name: str) -> Callable[[benchmarks.Sizes], dict[str, Any]]:
        def run(sizes: benchmarks.Sizes) -> dict[str, Any]:
            ran.append(name)
            if name == skip:
                raise benchmarks.Skipped(why + "\n\tsecond line of the driver's message")
            return {"herd_seconds": 1.5} if name == "herd" else {}

        return run

    monkeypatch.setattr(
        benchmarks, "SECTIONS", {name: section(name) for name in benchmarks.SECTIONS}
    )
    return lambda: ran


def redacted(url: str) -> str:
    """The URL as reasons show it (no password; libpq's key=value form)."""
    return redact_url(url)


WHY = "PostgreSQL not reachable at postgresql://127.0.0.1:1/x: connection refused"
ONE_LINE = WHY + " second line of the driver's message"


def test_a_full_run_shows_a_skip_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = _sections(monkeypatch, "scale", WHY)
    assert benchmarks.run(_args()) == 0
    assert ran() == list(benchmarks.SECTIONS)
    out = capsys.readouterr().out
    assert f"skipped: scale ({ONE_LINE})" in out.splitlines()

    assert benchmarks.run(_args("--json")) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["skipped"] == {"scale": ONE_LINE}
    assert figures["errors"] == {}
    assert figures["herd_seconds"] == 1.5


def test_a_run_without_a_skip_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _sections(monkeypatch, "none", WHY)
    assert benchmarks.run(_args("--json", "--only", "herd")) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {}
    assert benchmarks.run(_args("--only", "herd")) == 0
    assert "skipped" not in capsys.readouterr().out


def test_a_named_benchmark_that_is_skipped_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = _sections(monkeypatch, "scale", WHY)
    assert benchmarks.run(_args("--only", "herd,scale", "--json")) == 1
    assert ran() == ["herd", "scale"]
    captured = capsys.readouterr()
    figures = json.loads(captured.out)  # what did run is still printed
    assert figures["herd_seconds"] == 1.5
    assert figures["skipped"] == {"scale": ONE_LINE}
    assert captured.err.strip().splitlines()[-1] == (
        f"syncengine bench: scale was asked for but skipped: {ONE_LINE}"
    )


@pytest.fixture
def dead_pg_url() -> Iterator[str]:
    """A PostgreSQL URL on a loopback port held bound but not listening: refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"postgresql://postgres@127.0.0.1:{sock.getsockname()[1]}/postgres"


def test_the_scale_out_without_postgresql_skips_with_the_reason(
    dead_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scale = benchmarks._import_bench("bench_pg_scale")
    monkeypatch.setattr(scale, "ADMIN_URL", dead_pg_url)

    def run(*_: object, **__: object) -> object:
        raise AssertionError("the scale-out would have run")

    monkeypatch.setattr(scale, "run", run)
    with pytest.raises(
        benchmarks.Skipped, match=re.escape(f"PostgreSQL not reachable at {redacted(dead_pg_url)}")
    ):
        benchmarks._scale(benchmarks.QUICK)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_cli_only_scale_without_postgresql_exits_1(dead_pg_url: str, json_flag: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "syncengine.cli", "bench", "--only", "scale", "--quick", *json_flag],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "SYNCENGINE_BENCH_PG": dead_pg_url},
        timeout=60,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"syncengine bench: scale was asked for but skipped: "
        f"PostgreSQL not reachable at {redacted(dead_pg_url)}: "
    ), proc.stderr
    # Only the scale-out was started, and it stopped at its reachability check.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[bench]")]
    assert progress[0] == "[bench] scale (quick) ..."
    assert all(line.startswith("[bench] scale ") for line in progress), progress
    if json_flag:
        skipped = json.loads(proc.stdout)["skipped"]
        assert list(skipped) == ["scale"]
        assert skipped["scale"].startswith(f"PostgreSQL not reachable at {redacted(dead_pg_url)}")
    else:
        assert f"skipped: scale (PostgreSQL not reachable at {redacted(dead_pg_url)}" in proc.stdout
