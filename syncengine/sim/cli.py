"""``syncengine scenario run FILE... [--seed N] [--seeds N] [--report DIR] [--json] [--real]
[--clock-factor X] [--store URL] [--servers N] [--keep DIR]``.

Runs each scenario file with its own seed (or ``--seed N``, or ``--seeds N`` consecutive
seeds starting at it), prints one progress line per run (or one JSON object per run with
``--json``) and exits 0 only if every invariant and every ``[expect]`` entry held. A
failing run prints the command that replays it exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from syncengine.core.errors import StorageError
from syncengine.sim import runner
from syncengine.sim.scenario import ScenarioError, load

SEEDS_MAX = 10_000
SERVERS_MAX = 16  # = syncengine.sim.real.SERVERS_MAX (not imported: it pulls in psycopg)


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
        default=60.0,
        help="--real: scenario seconds per real second (default 60)",
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


def run(args: argparse.Namespace) -> int:
    if getattr(args, "scenario_command", None) != "run":
        print("usage: syncengine scenario run FILE... [--seed N] [--seeds N]", file=sys.stderr)
        return 2
    if not 1 <= args.seeds <= SEEDS_MAX:
        print(f"--seeds must be 1..{SEEDS_MAX}", file=sys.stderr)
        return 2
    store = getattr(args, "store", None)
    servers = getattr(args, "servers", 1)
    if (store is not None or servers != 1) and not args.real:
        print("--store and --servers apply to the real-process tier: add --real", file=sys.stderr)
        return 2
    if not 1 <= servers <= SERVERS_MAX:
        print(f"--servers must be 1..{SERVERS_MAX}", file=sys.stderr)
        return 2
    if servers > 1 and store is None:
        print(
            f"--servers {servers} needs --store postgresql://...: several server processes "
            "share one PostgreSQL database (SQLite serves one process)",
            file=sys.stderr,
        )
        return 2
    try:
        scenarios = [load(path) for path in args.files]
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for sc in scenarios:
        first = sc.seed if args.seed is None else args.seed
        for seed in range(first, first + args.seeds):
            if args.real:
                from syncengine.sim import real

                factor = getattr(args, "clock_factor", real.CLOCK_FACTOR_DEFAULT)
                try:
                    result = real.run(
                        sc,
                        seed,
                        keep_dir=args.keep,
                        clock_factor=factor,
                        store_url=store,
                        servers=servers,
                    )
                except StorageError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
            else:
                result = runner.run(sc, seed, keep_dir=args.keep)
            failed += not result.ok
            if args.json:
                print(json.dumps(result.to_json(), sort_keys=True), flush=True)
            else:
                c = result.counters
                breaches = c.get("limit_breaches", 0) + c.get("budget_breaches", 0)
                print(
                    f"{'ok  ' if result.ok else 'FAIL'} {sc.name} seed={seed} "
                    f"captured={c.get('captured', 0)} approved={c.get('approved', 0)} "
                    f"declined={c.get('declined', 0)} expired={c.get('expired', 0)} "
                    f"refused={c.get('refused', 0)} lost={c.get('lost', 0)} "
                    f"dup={c.get('duplicate_charges', 0)} breaches={breaches} "
                    f"({result.wall_s:.1f}s)",
                    flush=True,
                )
            if not result.ok:
                for line in result.violations + result.expect_failures:
                    print(f"    {line}", file=sys.stderr)
                print(
                    f"    replay: syncengine scenario run {sc.path} --seed {seed}", file=sys.stderr
                )
            if args.report is not None:
                from syncengine.sim import report

                path = report.write(result, args.report)
                if not args.json:
                    print(f"    report: {path}")
    return 1 if failed else 0
