"""``syncengine serve``: run the sync server on uvicorn (websockets implementation)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine import cliargs
from syncengine.core.errors import SyncEngineError

if TYPE_CHECKING:
    from syncengine.server.store import Store

DEFAULT_DATA_DIR = ".syncengine/server"
DB_FILE = "server.db"  # the SQLite database in the data directory
SERVER_KEY_FILE = "server-ed25519.key"  # its signing key, beside it
DEFAULT_PORT = 8080


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine serve``."""
    parser.add_argument(
        "--data", default=DEFAULT_DATA_DIR, help=f"data directory (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=cliargs.port,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 = any)",
    )
    parser.add_argument(
        "--processor",
        default=None,
        type=cliargs.http_url,
        metavar="URL",
        help="card processor base URL, e.g. http://127.0.0.1:8081 (none or '': nothing is "
        "forwarded)",
    )
    parser.add_argument(
        "--merchant-id",
        default="merchant-1",
        type=cliargs.merchant_id,
        help="merchant created on first start",
    )
    parser.add_argument(
        "--currency",
        default="USD",
        type=cliargs.currency,
        help="that merchant's ISO 4217 currency",
    )
    parser.add_argument(
        "--smtp",
        default=None,
        type=cliargs.host_port,
        metavar="HOST:PORT",
        help="SMTP relay for receipts",
    )
    parser.add_argument(
        "--receipt-sender", default="receipts@syncengine.invalid", help="From: of receipts"
    )
    parser.add_argument(
        "--maintenance",
        action="store_true",
        help="turn maintenance on at start, for every process of the store: /sync answers "
        "service_unavailable (terminals see a provider outage) until an owner turns it off "
        "(PUT /v1/maintenance)",
    )
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="PostgreSQL URL (postgresql://user@host:5432/db): many processes share it "
        "(docs/scaling.md); default: SQLite in --data, one process",
    )
    parser.add_argument(
        "--forward-lease-ms",
        type=cliargs.positive_int,
        default=30_000,
        metavar="MS",
        help="forwarding lease: how long a killed process holds its terminals (default 30000)",
    )
    parser.add_argument(
        "--lookup-first-after-ms",
        type=cliargs.non_negative_int,
        default=None,  # ForwarderConfig.lookup_first_after_ms
        metavar="MS",
        help="a payment first forwarded this long after its capture is looked up at the "
        "processor before it is charged (default 12 h; keep it below the "
        "processor's idempotency window)",
    )
    parser.add_argument(
        "--sessions-max",
        type=cliargs.positive_int,
        default=10_000,
        metavar="N",
        help="websocket sessions this process serves at once; one more is answered "
        "service_unavailable and retries later (default 10000)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=cliargs.log_level,
        help="debug, info, warning, error",
    )


def build_config(args: argparse.Namespace) -> object:
    """The :class:`~syncengine.server.app.ServerConfig` the arguments describe."""
    from syncengine.server.app import ServerConfig
    from syncengine.server.forwarder import ForwarderConfig
    from syncengine.server.receipts import ReceiptConfig

    forwarder = ForwarderConfig(lease_ms=args.forward_lease_ms)
    if args.lookup_first_after_ms is not None:
        forwarder = replace(forwarder, lookup_first_after_ms=args.lookup_first_after_ms)
    receipts = ReceiptConfig(sender=args.receipt_sender)
    if args.smtp:
        host, port = args.smtp
        receipts = ReceiptConfig(smtp_host=host, smtp_port=port, sender=args.receipt_sender)
    return ServerConfig(
        data_dir=Path(args.data),
        processor_url=args.processor,
        merchant_id=args.merchant_id,
        currency=args.currency,
        receipts=receipts,
        maintenance=args.maintenance,
        forwarder=forwarder,
        sessions_max=args.sessions_max,
    )


def open_store(url: str | None, command: str = "serve") -> Store | None:
    """The store ``--store`` names: None for the default (SQLite in the data directory)."""
    if url is None:
        return None
    if not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
        raise SystemExit(
            f"syncengine {command}: --store takes a PostgreSQL URL (postgresql://user@host/db) "
            f"or libpq string (host=... dbname=...), not {url!r}"
        )
    from syncengine.server.store.postgres import PostgresStore

    return PostgresStore(url)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    from syncengine.processor.testing import listen_socket
    from syncengine.server.app import OWNER_KEY_FILE, ServerConfig, SyncServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = build_config(args)
    assert isinstance(config, ServerConfig)
    store = open_store(args.store)
    try:
        server = SyncServer(config, store=store)
        # Opened here rather than in the app's startup (where it is then a no-op): a bad key
        # file, an unreachable database or a second process on one SQLite file is one
        # clear line and exit status 1, not a traceback from the ASGI server.
        server.store.open()
    except (SyncEngineError, OSError) as exc:
        return cliargs.cannot_start("serve", args.data, exc)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        print(
            f"syncengine serve: cannot listen on {args.host}:{args.port} ({exc}); "
            "check --host (an address of this machine) and --port (a free one)",
            file=sys.stderr,
        )
        return 1
    port = sock.getsockname()[1]
    url = f"http://{cliargs.url_host(args.host)}:{port}"
    print(f"sync server listening on {url} (websocket /sync)", flush=True)
    print(f"data in {config.data_dir.resolve()}", flush=True)
    if args.store:
        print("store: PostgreSQL (several processes may share it)", flush=True)
    if args.maintenance:
        print("maintenance mode: /sync answers service_unavailable", flush=True)
    if not args.processor:
        print("no --processor given: payments are stored but not forwarded", flush=True)
    key_file = config.data_dir / OWNER_KEY_FILE
    print(f"owner API key file (created on first start): {key_file.resolve()}", flush=True)
    uv = uvicorn.Config(
        server.app,
        ws="websockets-sansio",
        ws_max_size=config.session.frame_bytes_max,
        log_level=args.log_level.lower(),
    )
    running = uvicorn.Server(uv)
    try:
        running.run(sockets=[sock])
    finally:
        sock.close()
    if not running.started:  # the app's startup failed; uvicorn has logged why
        print("syncengine serve: the server did not start (see above)", file=sys.stderr)
        return 1
    return 0
