"""``syncengine scenario run FILE... [--seed N] [--seeds N] [--report DIR] [--json] [--real]
[--clock-factor X] [--store URL] [--servers N] [--keep DIR]``.

Runs each scenario file with its own seed (or ``--seed N``, or ``--seeds N`` consecutive
seeds starting at it), prints one progress line per run (or one JSON object per run with
``--json``) and exits 0 only if every invariant and every ``[expect]`` entry held. A
failing run prints the command that replays it exactly. A long run, in either tier, prints
a progress line on stderr at most every ``runner.PROGRESS_EVERY_S`` seconds.

Bad input (options, files, destinations) is one line ``syncengine scenario: ...`` on
stderr and exit 2, before anything runs. A closed stdout (``| head``) ends the command
quietly with exit 141 (128 + SIGPIPE), as a shell tool killed by the pipe would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from syncengine.core.errors import StorageError
from syncengine.sim import runner
from syncengine.sim.scenario import Scenario, ScenarioError, format_duration_ms, load

SEEDS_MAX = 10_000
SEED_MAX = 2**63 - 1  # = the file format's seed bound (syncengine.sim.scenario)
SERVERS_MAX = 16  # = syncengine.sim.real.SERVERS_MAX (not imported: it pulls in psycopg)
CLOCK_FACTOR_DEFAULT = 60.0  # = syncengine.sim.real.CLOCK_FACTOR_DEFAULT
# One scenario hour per real second: beyond it the terminals' compressed clock outruns
# the real-time server and processor (their timers are seconds), and a run means nothing.
CLOCK_FACTOR_MAX = 3_600.0
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE


class _StdoutClosed(Exception):
    """Whoever read our stdout went away (``| head -1``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scenario_command", metavar="ACTION")
    p = sub.add_parser("run", help="run scenario files and check their invariants")
    p.add_argument("files", nargs="+", metavar="FILE", help="scenario TOML files")
    p.add_argument("--seed", type=int, default=None, help="seed to use (default: the file's)")
    p.add_argument("--seeds", type=int, default=1, help="run N consecutive seeds from --seed")
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="write HTML reports")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.add_argument("--real", action="store_true", help="real processes (syncengine.sim.real)")
    p.add_argument(
        "--clock-factor",
        type=float,
        default=None,
        metavar="X",
        help=f"--real: scenario seconds per real second, 0 < X <= {CLOCK_FACTOR_MAX:g} "
        f"(default {CLOCK_FACTOR_DEFAULT:g})",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="--real: PostgreSQL server URL; each run creates (and drops) its own database "
        "there, named after scenario and seed (default: SQLite)",
    )
    p.add_argument(
        "--servers",
        type=int,
        default=1,
        metavar="N",
        help="--real: N server processes over the --store database (default 1)",
    )
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep every database")


def _replay(args: argparse.Namespace, path: object, seed: int) -> str:
    """The command that runs this scenario and seed again the same way: the real tier's
    options too (it replayed in the simulated tier), the store URL without its password."""
    words = [f"syncengine scenario run {path} --seed {seed}"]
    if args.real:
        words.append("--real")
        factor = getattr(args, "clock_factor", None)
        if factor is not None:
            words.append(f"--clock-factor {factor:g}")
        store = getattr(args, "store", None)
        if store is not None:
            from syncengine.server.store.postgres import redact_url

            words.append(f"--store '{redact_url(store)}'")
        servers = getattr(args, "servers", 1)
        if servers != 1:
            words.append(f"--servers {servers}")
    return " ".join(words)


def _error(message: str) -> int:
    print(f"syncengine scenario: {message}", file=sys.stderr, flush=True)
    return 2


def _out(line: str) -> None:
    try:
        print(line, flush=True)
    except BrokenPipeError:
        raise _StdoutClosed from None


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _StdoutClosed:
        # Nobody reads any more: stop quietly. Point stdout at /dev/null so that the
        # interpreter's last flush at exit does not complain about the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE_CLOSED


def _check_options(args: argparse.Namespace) -> str:
    """What is wrong with the options, or ""."""
    if not 1 <= args.seeds <= SEEDS_MAX:
        return f"--seeds must be 1..{SEEDS_MAX}, not {args.seeds}"
    if args.seed is not None and not 0 <= args.seed <= SEED_MAX + 1 - args.seeds:
        return (
            f"--seed must be 0..{SEED_MAX + 1 - args.seeds} (a seed is 0..2**63-1), not {args.seed}"
        )
    store = getattr(args, "store", None)
    servers = getattr(args, "servers", 1)
    factor = getattr(args, "clock_factor", None)
    if not args.real:
        given = [
            option
            for option, value in (
                ("--clock-factor", factor is not None),
                ("--store", store is not None),
                ("--servers", servers != 1),
            )
            if value
        ]
        if given:
            verb = "is" if len(given) == 1 else "are"
            return f"{' and '.join(given)} {verb} for the real-process tier: add --real"
    if factor is not None and not (math.isfinite(factor) and 0 < factor <= CLOCK_FACTOR_MAX):
        return (
            f"--clock-factor must be a number above 0 and at most {CLOCK_FACTOR_MAX:g} "
            f"(scenario seconds per real second), not {factor:g}"
        )
    if not 1 <= servers <= SERVERS_MAX:
        return f"--servers must be 1..{SERVERS_MAX}, not {servers}"
    if servers > 1 and store is None:
        return (
            f"--servers {servers} needs --store postgresql://...: several server processes "
            "share one PostgreSQL database (SQLite serves one process)"
        )
    return ""


def _check_destinations(args: argparse.Namespace, runs: list[tuple[Scenario, int]]) -> str:
    """Create ``--report`` and ``--keep`` now and make sure files can be written there, so
    a bad destination is said before the runs, not after them. What is wrong, or ""."""
    if args.report is not None or args.keep is not None:
        by_name: dict[str, object] = {}
        for sc, _seed in runs:
            other = by_name.setdefault(sc.name, sc.path)
            if other != sc.path:  # their reports and databases would overwrite each other
                return (
                    f"{other} and {sc.path} are both named {sc.name!r}; with --report or "
                    "--keep every scenario needs its own name"
                )
    for option, directory in (("--report", args.report), ("--keep", args.keep)):
        if directory is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".syncengine-probe-"):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc)
            if isinstance(exc, FileExistsError):
                why = "it exists and is not a directory"
            return f"{option} {directory}: cannot write there ({why}); give a directory"
        for sc, seed in runs:
            if option == "--report":
                path = directory / f"{sc.name}-seed{seed}.html"
                if path.is_dir():
                    return f"{option}: {path} is a directory; remove it or give another DIR"
            else:
                path = directory / f"{sc.name}-seed{seed}{'-real' if args.real else ''}"
                if path.exists() and not path.is_dir():
                    return f"{option}: {path} is not a directory; remove it or give another DIR"
    return ""


def _progress(sc: Scenario, seed: int) -> runner.Progress:
    started = time.perf_counter()

    def show(elapsed_ms: int, total_ms: int, payments: int) -> None:
        print(
            f"    progress: {sc.name} seed={seed}: {format_duration_ms(elapsed_ms)} of "
            f"{format_duration_ms(total_ms)} simulated ({100 * elapsed_ms // total_ms}%), "
            f"{payments} payments so far ({time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    return show


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "scenario_command", None) != "run":
        print("usage: syncengine scenario run FILE... [--seed N] [--seeds N]", file=sys.stderr)
        return 2
    problem = _check_options(args)
    if problem:
        return _error(problem)
    try:
        scenarios = [load(path) for path in args.files]
    except ScenarioError as exc:
        return _error(str(exc))
    runs: list[tuple[Scenario, int]] = []
    for sc in scenarios:
        first = sc.seed if args.seed is None else args.seed
        if first + args.seeds - 1 > SEED_MAX:
            return _error(f"{sc.path}: seed {first} + --seeds {args.seeds} passes 2**63-1")
        runs += [(sc, seed) for seed in range(first, first + args.seeds)]
    problem = _check_destinations(args, runs)
    if problem:
        return _error(problem)
    store = getattr(args, "store", None)
    servers = getattr(args, "servers", 1)
    failed = 0
    for sc, seed in runs:
        if args.real:
            from syncengine.sim import real

            factor = getattr(args, "clock_factor", None)
            if factor is None:
                factor = real.CLOCK_FACTOR_DEFAULT
            try:
                result = real.run(
                    sc,
                    seed,
                    keep_dir=args.keep,
                    clock_factor=factor,
                    store_url=store,
                    servers=servers,
                    progress=_progress(sc, seed),
                )
            except StorageError as exc:
                return _error(str(exc))
        else:
            result = runner.run(sc, seed, keep_dir=args.keep, progress=_progress(sc, seed))
        failed += not result.ok
        if args.json:
            _out(json.dumps(result.to_json(), sort_keys=True))
        else:
            c = result.counters
            breaches = c.get("limit_breaches", 0) + c.get("budget_breaches", 0)
            _out(
                f"{'ok  ' if result.ok else 'FAIL'} {sc.name} seed={seed} "
                f"captured={c.get('captured', 0)} approved={c.get('approved', 0)} "
                f"declined={c.get('declined', 0)} expired={c.get('expired', 0)} "
                f"refused={c.get('refused', 0)} lost={c.get('lost', 0)} "
                f"dup={c.get('duplicate_charges', 0)} breaches={breaches} "
                f"({result.wall_s:.1f}s)"
            )
        if not result.ok:
            for line in result.violations + result.expect_failures:
                print(f"    {line}", file=sys.stderr)
            print(f"    replay: {_replay(args, sc.path, seed)}", file=sys.stderr)
        if args.report is not None:
            from syncengine.sim import report

            try:
                path = report.write(result, args.report)
            except OSError as exc:
                return _error(
                    f"cannot write the report of {sc.name} seed={seed} into {args.report}: "
                    f"{exc.strerror or exc}"
                )
            if not args.json:
                _out(f"    report: {path}")
    return 1 if failed else 0
