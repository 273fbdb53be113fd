"""``syncengine scenario run`` on bad input: one clear line on stderr, exit 2, nothing run.

Also: ``[workload].start`` delays the first arrivals, a closed stdout ends the command
quietly, and a long run (of either tier) reports its progress on stderr without changing
the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncengine.cli import main
from syncengine.sim import facts as f
from syncengine.sim import runner
from syncengine.sim.scenario import loads

ROOT = Path(__file__).parents[2]
OK = """name = "ok"
seed = 3
duration = "2h"
settle = "1m"
[[terminals]]
id = "T1"
[workload]
payments_per_hour = 60
"""


@pytest.fixture
def ok(tmp_path: Path) -> Path:
    path = tmp_path / "ok.toml"
    path.write_text(OK)
    return path


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> None:
    assert main(["scenario", "run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing ran
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("syncengine scenario: "), err
    assert needle in lines[0], err


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--clock-factor", "2"], "--clock-factor is for the real-process tier: add --real"),
        (["--real", "--clock-factor", "0"], "--clock-factor must be a number above 0"),
        (["--real", "--clock-factor", "-1"], "not -1"),
        (["--real", "--clock-factor", "nan"], "not nan"),
        (["--real", "--clock-factor", "inf"], "not inf"),
        (["--real", "--clock-factor", "3601"], "at most 3600"),
        (["--seed", "-5"], "--seed must be 0.."),
        (["--seed", str(2**63 - 1), "--seeds", "2"], "--seed must be 0.."),
        (["--seeds", "0"], "--seeds must be 1.."),
        (["--store", "postgresql://x/y"], "--store is for the real-process tier"),
    ],
)
def test_bad_options_are_one_line(
    ok: Path, capsys: pytest.CaptureFixture[str], options: list[str], needle: str
) -> None:
    _fails([str(ok), *options], capsys, needle)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty"),
        (b"# a comment and nothing else\n\n", "is empty"),
        (b"\xa0\xff\x00 random bytes \x81", "not a UTF-8 text file"),
        (OK.encode() + b"[expect]\nduplicate_charge = 0\n", "[expect].duplicate_charge"),
        (OK.encode() + b'start = "3h"\n', "[workload].start (3h) is after the end of duration"),
        (
            OK.replace('name = "ok"', 'name = "a/b"').encode(),
            "name = 'a/b'",
        ),
    ],
)
def test_bad_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    _fails([str(path)], capsys, needle)


def test_random_bytes_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "noise.toml"
    path.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run(
        [sys.executable, "-m", "syncengine.cli", "scenario", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"syncengine scenario: {path}: not a UTF-8 text file")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", ["--report", "--keep"])
def test_unwritable_destination_is_refused_before_running(
    ok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    _fails([str(ok), option, str(a_file / "out")], capsys, f"{option} {a_file / 'out'}")
    _fails([str(ok), option, str(a_file)], capsys, "not a directory")
    _fails([str(ok), option, "/proc/x"], capsys, f"{option} /proc/x: cannot write there")


def test_report_write_error_is_one_line(
    ok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncengine.sim import report

    def broken(result: runner.RunResult, directory: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write", broken)
    assert main(["scenario", "run", str(ok), "--report", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"syncengine scenario: cannot write the report of ok seed=3 into {tmp_path / 'out'}: "
        "No space left on device\n"
    )


def test_closed_stdout_ends_quietly(ok: Path) -> None:
    # `syncengine scenario run ok.toml --seeds 50 | head -1`
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncengine.cli", "scenario", "run", str(ok), "--seeds", "50"],
        stdout=write,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        first = reader.readline()
    _, err = proc.communicate(timeout=60)
    assert first.startswith(b"ok   ok seed=3 ")
    assert proc.returncode == 141
    assert err == b""


def test_workload_start_delays_the_first_payment() -> None:
    """``start`` opens the window of arrivals: none before it (it was parsed, then ignored)."""
    whole = runner.run(loads(OK))
    late = runner.run(loads(OK + 'start = "100m"\n'))
    attempts = [ev.at_ms for ev in late.facts.trace if ev.kind == f.ATTEMPT]
    assert attempts
    assert min(attempts) >= late.facts.start_ms + 100 * 60_000
    assert 0 < late.counters["captured"] < whole.counters["captured"] / 3
    assert late.ok, late.violations + late.expect_failures
    # start = 0 is the default, draw for draw
    assert runner.run(loads(OK + 'start = "0s"\n')).to_json() | {"wall_s": 0} == (
        whole.to_json() | {"wall_s": 0}
    )


def test_progress_lines_do_not_change_the_run(
    ok: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["scenario", "run", str(ok), "--json"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == ""  # a short run says nothing more
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # report after every step
    assert main(["scenario", "run", str(ok), "--json"]) == 0
    out, err = capsys.readouterr()
    strip = [line.split('"wall_s"')[0] for line in (quiet_out, out)]
    assert strip[0] == strip[1]  # stdout is the same, and so is the run
    lines = err.splitlines()
    assert lines[0].startswith("    progress: ok seed=3: 1m of 2h1m simulated (0%), ")
    assert "payments so far" in lines[-1]
    assert len(lines) == 120  # 2h1m in steps of 1m, the last one is not reported


def test_progress_keeps_the_run_event_for_event(monkeypatch: pytest.MonkeyPatch) -> None:
    sc = loads(OK + "[[faults]]\nkind = 'drop'\nat = '10m'\nduration = '30m'\nprobability = 0.3\n")
    calls: list[tuple[int, int, int]] = []
    plain = runner.run(sc)
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    watched = runner.run(sc, progress=lambda *a: calls.append(a))
    assert len(calls) == sc.end_ms // runner.PROGRESS_STEP_MS - 1  # not at the very end
    assert {c[1] for c in calls} == {sc.end_ms}
    assert [c[2] for c in calls] == sorted(c[2] for c in calls)  # payments only grow
    assert watched.events_count == plain.events_count
    assert [(e.at_ms, e.kind, e.payment_id, e.detail) for e in watched.facts.trace] == [
        (e.at_ms, e.kind, e.payment_id, e.detail) for e in plain.facts.trace
    ]


def test_the_real_tier_prints_the_same_progress_lines(
    ok: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It printed nothing for the whole of a real run (minutes at a low clock factor).
    from syncengine.sim import real

    given: list[object] = []

    def fake_real_run(sc: object, seed: int, **options: object) -> runner.RunResult:
        given.append(options.get("progress"))
        progress = options["progress"]
        assert callable(progress)
        progress(60_000, 7_260_000, 4)  # what real.run calls during a run
        return runner.run(loads(OK), seed)

    monkeypatch.setattr(real, "run", fake_real_run)
    assert main(["scenario", "run", str(ok), "--real", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(given) == 1 and given[0] is not None
    assert err.splitlines() == [
        "    progress: ok seed=3: 1m of 2h1m simulated (0%), 4 payments so far (0s)"
    ]
    assert json.loads(out)["name"] == "ok"  # stdout as without it: one JSON object


def test_the_replay_command_of_a_real_run_keeps_its_options() -> None:
    # It printed only the file and seed: a failing real-process run replayed in the
    # simulated tier.
    from syncengine.sim.cli import _replay

    real = argparse.Namespace(
        real=True, clock_factor=20.0, store="postgresql://ann:secret@db.example/x", servers=2
    )
    line = _replay(real, "scenarios/kill.toml", 7)
    assert line.startswith("syncengine scenario run scenarios/kill.toml --seed 7 --real")
    assert "--clock-factor 20" in line and "--servers 2" in line and "--store '" in line
    assert "secret" not in line
    simulated = argparse.Namespace(real=False, clock_factor=None, store=None, servers=1)
    assert _replay(simulated, "a.toml", 3) == "syncengine scenario run a.toml --seed 3"


SCENARIO_RUN = [sys.executable, "-m", "syncengine.cli", "scenario", "run"]


def test_two_scenarios_of_one_name_are_refused_with_a_report(tmp_path: Path) -> None:
    # Their reports (and --keep databases) would overwrite each other.
    text = 'name = "same"\nduration = "10m"\n[[terminals]]\nid = "T1"\n'
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(text)
    second.write_text(text)
    done = subprocess.run(
        [*SCENARIO_RUN, str(first), str(second), "--report", str(tmp_path / "reports")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "are both named 'same'" in done.stderr, done.stderr
    assert done.stdout == ""  # refused before any run
