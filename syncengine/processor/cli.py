"""``syncengine processor``: run the sandbox card processor service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from syncengine import cliargs
from syncengine.core.crypto import b64e
from syncengine.core.errors import SyncEngineError
from syncengine.processor.service import SandboxService
from syncengine.processor.testing import listen_socket

DEFAULT_DATA_DIR = ".syncengine/processor"
DEFAULT_PORT = 8081


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine processor``."""
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        help=f"directory for the key and ledger (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=cliargs.port,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 = any)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; print the address and public key first."""
    try:
        service = SandboxService(Path(args.data))
    except (SyncEngineError, OSError) as exc:  # a bad key file or ledger, or --data
        return cliargs.cannot_start("processor", args.data, exc)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        print(
            f"syncengine processor: cannot listen on {args.host}:{args.port} ({exc}); "
            "check --host (an address of this machine) and --port (a free one)",
            file=sys.stderr,
        )
        service.close()
        return 1
    port = sock.getsockname()[1]
    print(f"sandbox processor listening on http://{cliargs.url_host(args.host)}:{port}", flush=True)
    print(f"public key (X25519, base64url): {b64e(service.public_key)}", flush=True)
    print(f"ledger and key in {Path(args.data).resolve()}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(service.app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
        service.close()
    return 0
