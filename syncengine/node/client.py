"""The asyncio shell around the sync session: one websocket, frames in and out.

The client holds no policy. It opens a connection when told (``ConnectAt``), turns what
happens on the wire into machine events (:class:`Connected`, :class:`ConnectFailed`,
:class:`Received`, :class:`Disconnected`) and sends the frames the machine asks for, in
order. It tells the two kinds of outage apart:

- **network**: the server cannot be reached at all (DNS failure, connection refused or
  reset, timeout, TLS/handshake failure, a dropped connection);
- **provider**: the server answered but is unavailable (HTTP 503 on the websocket upgrade,
  or an ``Error`` frame ``service_unavailable``, which the machine handles).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable
from typing import Literal

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from syncengine.core import protocol
from syncengine.core.errors import ProtocolError
from syncengine.node.machine import (
    Connected,
    ConnectFailed,
    Disconnected,
    Event,
    Outage,
    Received,
)

OPEN_TIMEOUT_MS_DEFAULT = 5_000
CLOSE_TIMEOUT_MS_DEFAULT = 1_000
SEND_QUEUE_FRAMES_MAX = 1_024  # frames waiting to be written; past it the link is closed

PROVIDER_HTTP_STATUSES = frozenset({502, 503, 504})
# permessage-deflate at zlib level 1: a backlog frame compresses about as well as at the
# default level 6 (sealed card data is random) for a third of the CPU, which a terminal
# draining thousands of payments spends on nothing else. Z_FILTERED with zlib's default
# memLevel (8) gives the same bytes as the default strategy at memLevel 5 (half the frame)
# for about a fifth less CPU: 10.3-11.8 against 13.1-14.0 us per op on push frames of
# captures, each with its own sealed card (min of 5 runs); it costs 112 KiB more memory for
# the one connection. Any deflate stream inflates the same, so servers need nothing.
DEFLATE_LEVEL = 1
DEFLATE_MEM_LEVEL = 8
DEFLATE_STRATEGY = zlib.Z_FILTERED


def deflate_extension() -> ClientPerMessageDeflateFactory:
    """The terminal's permessage-deflate settings (see :data:`DEFLATE_LEVEL`)."""
    return ClientPerMessageDeflateFactory(
        compress_settings={
            "level": DEFLATE_LEVEL,
            "memLevel": DEFLATE_MEM_LEVEL,
            "strategy": DEFLATE_STRATEGY,
        }
    )


def classify_connect_error(exc: BaseException) -> Outage:
    """``provider`` when the server answered with an unavailable status, else ``network``."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code in PROVIDER_HTTP_STATUSES:
        return "provider"
    return "network"


class SyncClient:
    """One websocket connection at a time to ``url``; events go to ``feed``.

    ``feed(event)`` is called from the event loop for every event; ``clock_ms()`` gives
    the time stamped on them. Limits: ``open_timeout_ms`` bounds a connection attempt,
    ``frame_bytes_max`` bounds every frame in both directions.
    """

    def __init__(
        self,
        url: str,
        feed: Callable[[Event], None],
        clock_ms: Callable[[], int],
        *,
        open_timeout_ms: int = OPEN_TIMEOUT_MS_DEFAULT,
        limits: protocol.Limits = protocol.DEFAULT_LIMITS,
    ) -> None:
        self.url = url
        self._feed = feed
        self._clock_ms = clock_ms
        self.open_timeout_ms = open_timeout_ms
        self.limits = limits
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE_FRAMES_MAX)
        self._session = 0  # bumps on every connection; stale callbacks are ignored
        # The system's proxy for the url (environment, OS settings), looked up once:
        # websockets would look it up again on every connect (about 60 us, a third of it
        # walking the environment twice), and a terminal reconnects often.
        self._proxy: str | Literal[True] | None
        try:
            self._proxy = get_proxy(parse_uri(url))
        except InvalidURI:
            self._proxy = True  # connect() reports the bad url, as an outage

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def connect(self) -> None:
        """Try to open a connection; feeds Connected or ConnectFailed."""
        await self.close()
        try:
            ws = await ws_connect(
                self.url,
                open_timeout=self.open_timeout_ms / 1000,
                close_timeout=CLOSE_TIMEOUT_MS_DEFAULT / 1000,
                max_size=self.limits.frame_bytes_max,
                ping_interval=None,  # liveness is the machine's Ping/Pong, by design
                extensions=[deflate_extension()],
                proxy=self._proxy,  # None: connect directly, as get_proxy decided
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure to connect is an outage of some kind
            self._feed(ConnectFailed(self._clock_ms(), classify_connect_error(exc), _why(exc)))
            return
        self._session += 1
        self._ws = ws
        self._queue = asyncio.Queue(SEND_QUEUE_FRAMES_MAX)
        self._feed(Connected(self._clock_ms()))
        session = self._session
        self._reader = asyncio.create_task(self._read(ws, session))
        self._writer = asyncio.create_task(self._write(ws, session))

    def send(self, message: protocol.Message) -> None:
        """Queue ``message`` for sending; dropped if there is no connection."""
        if self._ws is None:
            return
        try:
            self._queue.put_nowait(protocol.encode(message, self.limits))
        except asyncio.QueueFull:
            # A stalled peer: do not grow without bound; the machine reconnects.
            self._lost(self._session, "send queue full")

    async def close(self) -> None:
        """Close the connection (no Disconnected is fed: the caller asked for it)."""
        ws, self._ws = self._ws, None
        self._session += 1
        for task in (self._reader, self._writer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reader = self._writer = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    def _lost(self, session: int, detail: str, outage: Outage = "network") -> None:
        if session != self._session or self._ws is None:
            return
        ws, self._ws = self._ws, None
        self._session += 1
        asyncio.get_running_loop().create_task(_close_quietly(ws))
        self._feed(Disconnected(self._clock_ms(), outage, detail))

    async def _read(self, ws: ClientConnection, session: int) -> None:
        try:
            async for frame in ws:
                if session != self._session:
                    return
                try:
                    message = protocol.decode(frame, self.limits)
                except ProtocolError as exc:
                    # The link worked; what came over it did not: the provider's side.
                    self._lost(session, f"server sent a bad frame: {exc}", "provider")
                    return
                self._feed(Received(self._clock_ms(), message))
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            self._lost(session, f"server message refused: {exc}", "provider")
            return
        self._lost(session, "connection closed")

    async def _write(self, ws: ClientConnection, session: int) -> None:
        try:
            while True:
                data = await self._queue.get()
                await ws.send(data.decode("utf-8"))
        except ConnectionClosed:
            self._lost(session, "connection closed while sending")


async def _close_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        await ws.close()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]
