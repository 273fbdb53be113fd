"""End-to-end kit: real processes on loopback.

- :class:`ServerProcess`: ``python -m syncengine.cli serve`` as a subprocess (SIGKILL-able,
  restartable on the same port and data directory);
- the sandbox processor: :func:`syncengine.processor.testing.running_sandbox` (a real HTTP
  service on loopback, in a thread);
- :class:`Inbox`: a real SMTP server (aiosmtpd) on loopback;
- :class:`Proxy`: an asyncio TCP proxy between a terminal and the server, which can cut
  the link (live connections aborted, new ones reset) and heal it;
- :func:`open_terminal`: an SDK :class:`~syncengine.node.Terminal` enrolled over the real
  REST API with a one-time code made by the owner key, through the stdlib HTTP enroller.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from syncengine.core import crypto
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import Brand, Region
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.offline_mode import OfflineSettings
from syncengine.node import CardRead, Terminal, TerminalConfig
from syncengine.node.enroll import http_enroller
from syncengine.node.machine import Notice, OfflinePrompt

APPROVE = "4242424242424242"
INSUFFICIENT = "4000000000009995"  # hard decline: insufficient_funds
STOLEN = "4000000000009979"  # hard decline: stolen_card
START_TIMEOUT_S = 20.0
_LISTEN_RE = re.compile(rb"listening on http://[^:]+:(\d+)")


def usd(text: str) -> Money:
    return Money.parse(text, "USD")


def card(pan: str = APPROVE) -> CardRead:
    return CardRead(crypto.CardData(pan, 12, 2030), Brand.VISA)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float = 15.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> None:
    """Poll ``probe`` (sync or async) until it is true; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


# -- the server as a real process ----------------------------------------------------------------


class ServerProcess:
    """``syncengine serve`` in a subprocess; the first start picks a free port, restarts reuse it."""

    def __init__(self, data: Path, processor_url: str, *extra: str) -> None:
        self.data = data
        self.processor_url = processor_url
        self.extra = list(extra)
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.log = data.parent / f"{data.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def owner_key(self) -> str:
        return (self.data / "owner-api-key.txt").read_text().strip()

    async def start(self) -> None:
        argv = [sys.executable, "-m", "syncengine.cli", "serve", "--data", str(self.data)]
        argv += ["--port", str(self.port), "--processor", self.processor_url]
        argv += ["--log-level", "warning", *self.extra]
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - time.monotonic())
            if not line:
                raise RuntimeError(f"syncengine serve exited; see {self.log}")
            if match := _LISTEN_RE.search(line):
                self.port = int(match.group(1))
            if b"owner API key file" in line:
                break
        self._drain = asyncio.create_task(self._read_rest(self.proc.stdout))
        await wait_until(self._healthy, START_TIMEOUT_S, "the server to be healthy")

    @staticmethod
    async def _read_rest(stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await stream.readline():
                pass

    async def _healthy(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(self.url + "/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def kill(self) -> None:
        """SIGKILL: no shutdown of any kind."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                await self.kill()
        if self._drain is not None:
            self._drain.cancel()

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key or self.owner_key}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def api(self, method: str, path: str, json: Any = None, **params: Any) -> Any:
        """One owner-key REST call that must succeed; returns the JSON answer."""
        async with self.http() as client:
            r = await client.request(method, path, json=json, params=params or None)
        assert r.status_code < 300, (method, path, r.status_code, r.text)
        return r.json()

    async def allow_offline(self) -> None:
        """R2 as an owner would: standalone mode on, liability accepted."""
        await self.api("PATCH", "/v1/merchant", {"standalone_allowed": True})
        await self.api("POST", "/v1/merchant/offline-liability", {"accept": True})

    async def payments(self, **filters: Any) -> list[dict[str, Any]]:
        return list((await self.api("GET", "/v1/payments", limit=1000, **filters))["payments"])


# -- SMTP ----------------------------------------------------------------------------------------


class Inbox:
    """An aiosmtpd handler keeping every message it accepted."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if m["To"] == address]


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


# -- the link --------------------------------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy; :meth:`cut` aborts live connections and resets new ones."""

    def __init__(self, upstream: Callable[[], int]) -> None:
        self.upstream = upstream
        self.up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.up = False
        for writer in list(self._live):
            writer.transport.abort()
        self._live.clear()

    def heal(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream())
        except OSError:
            writer.transport.abort()
            return
        self._live |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        self._live -= {writer, up_writer}

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                if not self.up:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


# -- terminals ---------------------------------------------------------------------------------------


@dataclass
class Clock:
    """The terminal's clock: real time plus an offset the test may move."""

    offset_ms: int = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@dataclass
class Till:
    """A terminal under test with everything it told the POS."""

    terminal: Terminal
    proxy: Proxy
    clock: Clock
    notices: list[Notice] = field(default_factory=list)

    def seen(self, kind: type[Any]) -> list[Any]:
        return [n for n in self.notices if isinstance(n, kind)]


async def go_offline(till: Till) -> None:
    """Cut the link, wait for the offline prompt and accept "Activate offline payments".
    Notices from before are cleared first: a prompt left from an earlier outage (a server
    restart) is not taken for this one."""
    till.notices.clear()
    till.proxy.cut()
    await wait_until(lambda: bool(till.seen(OfflinePrompt)), 10, "the offline prompt")
    till.terminal.activate_offline()


async def open_terminal(
    tmp: Path,
    server: ServerProcess,
    terminal_id: str,
    device_class: DeviceClass = DeviceClass.TERMINAL,
    clock: Clock | None = None,
    *,
    cut: bool = False,
    offline_allowed_locally: bool = False,
    utc_offset_minutes: int | None = None,
) -> Till:
    """Enroll a terminal with a fresh one-time code, behind its own proxy, and start it.

    ``cut``: the link is down from the start. ``offline_allowed_locally``: the local default
    of R2's setting (normally the server's ``offline_allowed`` setting decides).
    """
    code = await server.api(
        "POST",
        "/v1/enrollment-codes",
        {"terminal_id": terminal_id, "device_class": device_class.value},
    )
    proxy = Proxy(lambda: server.port)
    await proxy.start()
    if cut:
        proxy.cut()
    clock = clock or Clock()
    config = TerminalConfig(
        terminal_id=terminal_id,
        merchant_id="",  # from the enrollment answer
        device_class=device_class,
        currency="USD",
        region=Region.US,
        processor_public_key=b"",  # from the enrollment answer
        heartbeat_interval_ms=500,
        heartbeat_timeout_ms=3_000,
        reconnect_base_ms=100,
        reconnect_cap_ms=400,
        offline=OfflineSettings(True, True, "owner (test)", 1)
        if offline_allowed_locally
        else OfflineSettings(),
        utc_offset_minutes=utc_offset_minutes,
    )
    terminal = await Terminal.open(
        tmp / f"{terminal_id}.db",
        config,
        proxy.ws_url,
        enrollment_code=code["code"],
        enroll=http_enroller(server.url),
        clock_ms=clock,
        tick_interval_ms=50,
    )
    till = Till(terminal, proxy, clock)
    terminal.subscribe(till.notices.append)
    await terminal.start()
    return till


async def close_all(tills: list[Till]) -> None:
    for till in tills:
        await till.terminal.close()
        await till.proxy.close()
