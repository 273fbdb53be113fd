"""``syncengine restore``: put a backup in place as the server's database.

See :func:`syncengine.server.backup.restore_database` and docs/operations.md, "Restore
from a backup", for what comes back by itself once the server runs again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from syncengine.core.errors import StorageError
from syncengine.server.backup import restore_database
from syncengine.server.cli import DB_FILE, DEFAULT_DATA_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine restore``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        help=f"the server's data directory (default {DEFAULT_DATA_DIR}); stop its server first",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE",
        help="the backup file (made by syncengine backup)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        done = restore_database(Path(args.data) / DB_FILE, Path(args.source))
    except StorageError as exc:
        print(f"syncengine restore: {exc}", file=sys.stderr)
        return 2
    print(f"restored {done.restored.describe()}")
    if done.set_aside is not None:
        print(f"the database it replaced is kept in {done.set_aside}")
    print(
        "start the server again: terminals send what the backup lacks on their next session "
        "and take what the server writes from then on in place of what it lost; set again "
        "the settings and budget changed since the backup "
        "(docs/operations.md, 'Restore from a backup')"
    )
    return 0
