"""Smoke test of ``syncengine bench``: the harness runs end to end in its tiny mode.

It checks structure and sanity (every key present, numbers positive and finite, verdicts
consistent with the targets), never speed: speed is what BENCHMARKS.md records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature

from syncengine import benchmarks
from syncengine.core import crypto

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150


def _run_tiny(tmp_path: Path) -> tuple[dict[str, object], str]:
    # -X faulthandler: on a hang, SIGABRT makes the run print every thread's stack, so
    # the failure says where it waited (a tiny run takes ~10 s).
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "syncengine.cli", "bench", "--tiny", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "BENCH_DIR": str(tmp_path)},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        os.killpg(proc.pid, signal.SIGKILL)  # the servers it started, if any are left
        first = stderr.find("Traceback")
        pytest.fail(
            f"bench --tiny still running after {TIMEOUT_S} s. First error logged:\n"
            f"{stderr[first : first + 6000] if first >= 0 else '(none)'}\n...\n"
            f"Last output, with every thread's stack:\n{stderr[-10000:]}"
        )
    assert proc.returncode == 0, stderr[-4000:]
    figures = json.loads(stdout)
    assert isinstance(figures, dict)
    return figures, stderr


def _number(figures: dict[str, object], key: str) -> float:
    value = figures[key]
    assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert math.isfinite(value) and value > 0, (key, value)
    return float(value)


def test_tiny_run_prints_every_key_with_sane_values(tmp_path: Path) -> None:
    figures, stderr = _run_tiny(tmp_path)
    assert figures["errors"] == {}
    for key in benchmarks.REQUIRED_KEYS:
        _number(figures, key)
    assert figures["mode"] == "tiny"
    # Ratios are what their parts say they are.
    assert math.isclose(
        _number(figures, "capture_vs_commit_ratio"),
        _number(figures, "capture_p50_ms") / _number(figures, "bare_commit_ms"),
        rel_tol=1e-6,
    )
    assert math.isclose(
        _number(figures, "drain_vs_peer_ratio"),
        _number(figures, "drain_e2e_ops_per_s") / _number(figures, "peer_drain_ops_per_s"),
        rel_tol=1e-6,
    )
    # Both end-to-end drains ran in the same number of rounds; each figure is its median.
    assert figures["drain_e2e_rounds"] == benchmarks.TINY.e2e_rounds == 2
    for key in ("drain_e2e_ops_per_s", "peer_drain_ops_per_s"):
        rounds = figures[f"{key}_rounds"]
        assert isinstance(rounds, list) and len(rounds) == 2, (key, rounds)
        assert math.isclose(_number(figures, key), sum(rounds) / 2, rel_tol=0.01, abs_tol=1)
    assert math.isclose(
        _number(figures, "delta_cost_ratio_100k_vs_1k"),
        _number(figures, "delta_reconnect_large_ms") / _number(figures, "delta_reconnect_small_ms"),
        rel_tol=1e-6,
    )
    # Peak RSS of a Python server process is at least a few MiB.
    assert _number(figures, "herd_peak_rss_mb") > 5
    verdicts = figures["verdicts"]
    assert isinstance(verdicts, dict)
    assert set(verdicts) == {t.key for t in benchmarks.TARGETS}
    assert set(verdicts.values()) <= {"PASS", "MISS"}
    assert "[bench" in stderr  # progress goes to stderr, the JSON alone to stdout


def test_verdicts_follow_the_targets() -> None:
    figures = {
        "capture_vs_commit_ratio": 3.5,
        "drain_ops_per_s": 49_999.0,
        "delta_cost_ratio_100k_vs_1k": 1.6,
        "drain_vs_peer_ratio": 2.0,
    }
    assert benchmarks.verdicts(figures) == {
        "capture_vs_commit_ratio": "PASS",
        "drain_ops_per_s": "MISS",
        "delta_cost_ratio_100k_vs_1k": "MISS",
        "drain_vs_peer_ratio": "PASS",
    }
    assert benchmarks.verdicts({}) == {}


def test_table_marks_pass_and_miss() -> None:
    text = benchmarks.table(
        {"capture_vs_commit_ratio": 2.0, "drain_ops_per_s": 10.0}, benchmarks.TINY, {}
    )
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert any("PASS" in line and "capture" in line for line in lines.values())
    assert any("MISS" in line and "drain" in line for line in lines.values())
    assert "targets met: 1 of 4" in text


def test_cli_rejects_an_unknown_benchmark() -> None:
    parser = argparse.ArgumentParser()
    benchmarks.add_arguments(parser)
    args = parser.parse_args(["--only", "nonsense"])
    assert benchmarks.run(args) == 2


def test_a_quick_run_leaves_out_the_scale_out_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[str] = []

    def section(name: str) -> Callable[[benchmarks.Sizes], dict[str, Any]]:
        def run(sizes: benchmarks.Sizes) -> dict[str, Any]:
            ran.append(name)
            return {f"{name}_figure": 1.0}

        return run

    monkeypatch.setattr(
        benchmarks, "SECTIONS", {name: section(name) for name in benchmarks.SECTIONS}
    )
    figures, errors, skipped = benchmarks.collect(benchmarks.QUICK, [])
    assert errors == {} and skipped == {}
    assert "scale" not in ran and "scale_figure" not in figures
    assert ran == [name for name in benchmarks.SECTIONS if name != "scale"]
    ran.clear()
    benchmarks.collect(benchmarks.QUICK, ["scale"])
    assert ran == ["scale"]
    ran.clear()
    benchmarks.collect(benchmarks.FULL, [])
    assert "scale" in ran


def test_the_peer_syncs_the_payments_ours_synced() -> None:
    from bench import _common

    processor = crypto.x25519_public_from_private(os.urandom(32))
    ours = _common.build_fixture("KEEP1", 3, processor, keep=True)
    assert _common.capture_bodies_of("KEEP1", 3) == list(ours.capture_bodies())
    assert len(_common.capture_bodies_of("KEEP1", 3)) == 3
    # Not kept (another count): a fixture of its own, other payment ids.
    other = _common.capture_bodies_of("KEEP1", 2)
    assert len(other) == 2
    ids = {body["payment_id"] for body in ours.capture_bodies()}
    assert ids.isdisjoint(body["payment_id"] for body in other)


def _assert_medians(figures: dict[str, Any], names: Iterable[str]) -> None:
    """An experiment's CPU and wall medians: one finite, positive figure per name."""
    for kind in ("cpu_us_per_op_median", "wall_us_per_op_median"):
        values = figures[kind]
        assert set(values) == set(names), (kind, values)
        assert all(math.isfinite(v) and v > 0 for v in values.values()), (kind, values)


def test_storage_model_experiment_writes_every_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import bench_storage_model

    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    figures = bench_storage_model.run(rounds=1, payments=1_000)
    assert figures["payments"] == 1_000 and figures["rounds"] == 1
    _assert_medians(figures, bench_storage_model.LAYOUTS)


def test_log_floor_experiment_stores_every_op_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import bench_log_floor

    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    # Raises if the log-first path hashes other bytes or a path stores fewer payments.
    figures = bench_log_floor.run(rounds=1, payments=1_000)
    assert figures["payments"] == 1_000 and figures["batches"] == 2
    _assert_medians(figures, bench_log_floor.PATHS)


def test_log_floor_checks_the_chain_and_the_signature(tmp_path: Path) -> None:
    import sqlite3

    from bench import bench_log_floor
    from bench.bench_drain import _terminal_ops

    key = crypto.Ed25519KeyPair.from_private(os.urandom(32))
    frames = _terminal_ops(600, key)  # two pushes: 500 and 100 ops

    def fresh() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / f"{os.urandom(4).hex()}.db", isolation_level=None)
        for statement in bench_log_floor._SCHEMA:
            conn.execute(statement)
        return conn

    assert len(bench_log_floor._log_first(fresh(), frames, key.public)) == 600
    with pytest.raises(AssertionError, match="chain broken"):
        bench_log_floor._log_first(fresh(), frames[1:], key.public)  # a gap
    other = crypto.Ed25519KeyPair.from_private(os.urandom(32))
    with pytest.raises(InvalidSignature):
        bench_log_floor._log_first(fresh(), frames, other.public)


def test_typed_decode_experiment_hashes_the_same_bytes() -> None:
    from bench import bench_typed_decode

    figures = bench_typed_decode.run(rounds=1, payments=1_000)  # raises if digests differ
    medians = figures["cpu_us_per_op_median"]
    assert set(medians) == {"today", "typed"}
    assert all(math.isfinite(v) and v > 0 for v in medians.values())


def test_typed_decode_experiment_refuses_what_the_product_refuses() -> None:
    from bench.bench_drain import _terminal_ops
    from syncengine.core import protocol, push_codec
    from syncengine.core.bodies import parse_body
    from syncengine.core.errors import ProtocolError

    frame = _terminal_ops(1, crypto.Ed25519KeyPair.from_private(os.urandom(32)))[0]
    for bad in (b'"last4":"4242"', b'"channel":"offline"', b'"currency":"USD"'):
        broken = frame.replace(bad, bad[:-2] + b'x"', 1)
        assert broken != frame
        with pytest.raises(ProtocolError):
            message = protocol.decode(broken)
            assert isinstance(message, protocol.Push)
            for op in message.ops:
                parse_body(op)
        # The typed decoder (the experiment's "typed") does not type it: it declines the
        # frame, or leaves the op to the general body check, which refuses it.
        taken = push_codec.decode_push(broken, 500, protocol.B64_CHARS_MAX)
        assert taken is None or all(op._typed is None for op in taken[0])
