"""``syncengine owner-key``: a new owner API key, made on the server's machine.

The way back in when every owner key is lost (or the bootstrap key file went missing):
whoever can open the server's store -- its data directory, or its PostgreSQL database --
is already trusted with everything in it, so this command needs no API key. The secret is
printed once on stdout and stored only as its hash; the creation is audited with the
local user and host. Revoke the lost or leaked keys afterwards with
``DELETE /v1/api-keys/{key_id}``.

SQLite: stop the server first (its store is served by one process). PostgreSQL: works
beside running servers.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from pathlib import Path

from syncengine.core.errors import SyncEngineError
from syncengine.server.cli import DB_FILE, DEFAULT_DATA_DIR, open_store
from syncengine.server.model import Role

DEFAULT_MERCHANT_ID = "merchant-1"  # as ``syncengine serve --merchant-id``
DEFAULT_NAME = "recovery owner key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine owner-key``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        help=f"the server's data directory (default {DEFAULT_DATA_DIR}); SQLite: stop its "
        "server first",
    )
    parser.add_argument(
        "--store", metavar="URL", help="PostgreSQL URL, as given to syncengine serve --store"
    )
    parser.add_argument(
        "--merchant-id",
        default=DEFAULT_MERCHANT_ID,
        help=f"the merchant the key is for (default {DEFAULT_MERCHANT_ID})",
    )
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help=f"a label for the key (default {DEFAULT_NAME!r})"
    )


def run(args: argparse.Namespace) -> int:
    """Create the key; the secret alone on stdout, what to do next on stderr."""
    from syncengine.server.app import API_KEY_NAME_CHARS_MAX, SyncServer, hash_secret
    from syncengine.server.store.sqlite import SqliteStore

    if len(args.name) > API_KEY_NAME_CHARS_MAX:
        print(
            f"syncengine owner-key: --name is at most {API_KEY_NAME_CHARS_MAX} characters",
            file=sys.stderr,
        )
        return 2
    store = open_store(args.store)
    if store is None:
        db = Path(args.data) / DB_FILE
        if not db.is_file():
            print(
                f"syncengine owner-key: no server database at {db}; give the server's --data",
                file=sys.stderr,
            )
            return 2
        store = SqliteStore(db)
    try:
        store.open()
        if store.get_merchant(args.merchant_id) is None:
            print(
                f"syncengine owner-key: no merchant {args.merchant_id!r} in this store; give "
                "--merchant-id (as syncengine serve --merchant-id made it)",
                file=sys.stderr,
            )
            return 2
        secret = SyncServer.new_api_key_secret()
        now_ms = time.time_ns() // 1_000_000
        created = store.create_api_key(
            hash_secret(secret),
            hash_secret(secret)[:12],
            args.merchant_id,
            Role.OWNER,
            args.name,
            now_ms,
        )
        actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
        store.audit(actor, "api_key.create", f"{created.key_id} (owner-key command)", now_ms)
    except SyncEngineError as exc:
        print(f"syncengine owner-key: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(secret)
    print(
        f"created owner key {created.key_id} for {args.merchant_id} (shown once, above); "
        "list keys with GET /v1/api-keys and revoke lost ones with "
        "DELETE /v1/api-keys/{key_id}",
        file=sys.stderr,
    )
    return 0
