"""``syncengine run`` (``make run``): the sync server and the sandbox processor on loopback.

Both run in this one process on one event loop (two uvicorn servers), with their data
under ``--data`` (default ``.syncengine/``). It prints the URLs, the owner API key and
what to do next, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from pathlib import Path

from syncengine import cliargs
from syncengine.core.errors import SyncEngineError

DEFAULT_DATA_DIR = ".syncengine"
SERVER_PORT_DEFAULT = 8080
PROCESSOR_PORT_DEFAULT = 8081
START_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``syncengine run``."""
    parser.add_argument("--data", default=DEFAULT_DATA_DIR, help="data directory")
    parser.add_argument(
        "--port", type=cliargs.port, default=SERVER_PORT_DEFAULT, help="sync server port"
    )
    parser.add_argument(
        "--processor-port",
        type=cliargs.port,
        default=PROCESSOR_PORT_DEFAULT,
        help="sandbox port",
    )


def _bind(port: int) -> socket.socket:
    """Bind 127.0.0.1:port, or any free port if that one is taken."""
    from syncengine.processor.testing import listen_socket

    try:
        return listen_socket("127.0.0.1", port)
    except OSError:
        return listen_socket("127.0.0.1", 0)


def next_steps(server_url: str, processor_url: str, owner_key: str, key_file: Path) -> str:
    """The text printed once both services are up."""
    return f"""
syncengine is running on loopback.

  sync server      {server_url}   (terminals connect to {server_url.replace("http", "ws")}/sync)
  API reference    {server_url}/docs   (OpenAPI: {server_url}/openapi.json)
  metrics          {server_url}/metrics
  sandbox processor {processor_url}   (test cards: docs/processor.md)

Owner API key: {owner_key}
  (kept in {key_file}; create more with POST /v1/api-keys)

Next steps:
  1. Create a one-time enrollment code for a terminal:
       curl -s -X POST {server_url}/v1/enrollment-codes \\
            -H 'Authorization: Bearer {owner_key}' -d '{{"terminal_id": "T1"}}'
  2. Enroll the terminal with that code (the SDK does it: POST /v1/enroll).
  3. Allow offline payments (R2: standalone first, then accept liability, then the terminal):
       curl -s -X PATCH {server_url}/v1/merchant -H 'Authorization: Bearer {owner_key}' \\
            -d '{{"standalone_allowed": true}}'
       curl -s -X POST {server_url}/v1/merchant/offline-liability \\
            -H 'Authorization: Bearer {owner_key}' -d '{{"accept": true}}'
       curl -s -X PUT {server_url}/v1/terminals/T1/settings \\
            -H 'Authorization: Bearer {owner_key}' -d '{{"offline_allowed": true}}'
  4. Watch payments: curl -s {server_url}/v1/payments -H 'Authorization: Bearer {owner_key}'

Press Ctrl-C to stop.
"""


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from syncengine.processor.service import SandboxService
    from syncengine.server.app import OWNER_KEY_FILE, ServerConfig, SyncServer

    data = Path(args.data)
    if args.port == args.processor_port != 0:
        print("syncengine run: --port and --processor-port must differ", file=sys.stderr)
        return 2
    try:
        sandbox = SandboxService(data / "processor")
    except (SyncEngineError, OSError) as exc:  # a bad key file or ledger, or --data
        return cliargs.cannot_start("run", args.data, exc)
    processor_sock = _bind(args.processor_port)
    server_sock = _bind(args.port)
    processor_url = f"http://127.0.0.1:{processor_sock.getsockname()[1]}"
    server_url = f"http://127.0.0.1:{server_sock.getsockname()[1]}"
    try:
        server = SyncServer(ServerConfig(data_dir=data / "server", processor_url=processor_url))
        server.store.open()  # here, so a second `run` on one --data is a clear line
    except (SyncEngineError, OSError) as exc:  # e.g. another process serves this --data
        print(f"syncengine run: {exc}", file=sys.stderr)
        processor_sock.close()
        server_sock.close()
        sandbox.close()
        return 1
    uv_processor = uvicorn.Server(uvicorn.Config(sandbox.app, log_level="warning"))
    uv_server = uvicorn.Server(
        uvicorn.Config(
            server.app,
            ws="websockets-sansio",
            ws_max_size=server.config.session.frame_bytes_max,
            log_level="warning",
        )
    )
    tasks = [
        asyncio.create_task(uv_processor.serve(sockets=[processor_sock])),
        asyncio.create_task(uv_server.serve(sockets=[server_sock])),
    ]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not (uv_processor.started and uv_server.started):
            if any(t.done() for t in tasks) or loop.time() > deadline:
                print("syncengine run: a service did not start; see the log above", file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        key_file = (data / "server" / OWNER_KEY_FILE).resolve()
        owner_key = server.bootstrap_api_key or _read_key(key_file)
        if owner_key is None:  # made on an earlier start, and its file since removed
            print(
                f"syncengine run: {key_file} is gone or empty, and the owner key is shown only "
                f"once; make a new one with: syncengine owner-key --data {data / 'server'} "
                "(with this stopped)",
                file=sys.stderr,
            )
            owner_key = "$OWNER_KEY"
        print(next_steps(server_url, processor_url, owner_key, key_file), flush=True)
        await asyncio.gather(*tasks)
    finally:
        uv_processor.should_exit = uv_server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        processor_sock.close()
        server_sock.close()
        sandbox.close()
    return 0


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    """Serve both until interrupted."""
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0
