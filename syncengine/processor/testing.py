"""Run the sandbox processor on loopback for tests: a real uvicorn server in a thread.

Other components' end-to-end tests use this too::

    with running_sandbox(tmp_path / "processor") as sandbox:
        processor = HttpProcessor(sandbox.url)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from syncengine.processor.service import SandboxService

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox service listening on ``url``."""

    url: str
    service: SandboxService
    public_key: bytes


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``port=0`` picks a free one); uvicorn serves on it.

    The protocol is named explicitly: asyncio turns on TCP_NODELAY for accepted connections
    only when the listening socket's ``proto`` is IPPROTO_TCP. Without it, Nagle's algorithm
    delays small frames (every ack and handshake step) by ~40 ms on loopback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def running_sandbox(data_dir: Path, host: str = "127.0.0.1") -> Iterator[RunningSandbox]:
    """Start the service on a free port of ``host``; stop it (and close its ledger) on exit."""
    service = SandboxService(data_dir)
    sock = listen_socket(host, 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(service.app, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox processor did not start")
            time.sleep(0.01)
        yield RunningSandbox(f"http://{host}:{port}", service, service.public_key)
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        sock.close()
        service.close()
