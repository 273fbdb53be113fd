"""SyncClient over a real loopback websocket: the compression it negotiates."""

from __future__ import annotations

import asyncio
import zlib

from websockets.asyncio.server import ServerConnection, serve
from websockets.extensions.permessage_deflate import PerMessageDeflate

from syncengine.core import protocol
from syncengine.node.client import DEFLATE_LEVEL, SyncClient
from syncengine.node.machine import Connected, Event


async def test_the_terminal_compresses_at_the_cheap_deflate_level() -> None:
    received: list[bytes] = []
    got = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            received.append(frame if isinstance(frame, bytes) else frame.encode())
            got.set()

    events: list[Event] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = SyncClient(f"ws://127.0.0.1:{port}/sync", events.append, lambda: 0)
        await client.connect()
        try:
            assert any(isinstance(e, Connected) for e in events)
            ws = client._ws
            assert ws is not None
            deflate = [e for e in ws.protocol.extensions if isinstance(e, PerMessageDeflate)]
            assert len(deflate) == 1, ws.protocol.extensions
            assert deflate[0].compress_settings == {
                "level": DEFLATE_LEVEL,
                "memLevel": 8,
                "strategy": zlib.Z_FILTERED,
            }
            assert DEFLATE_LEVEL == 1  # the cheapest level; see DEFLATE_LEVEL
            client.send(protocol.Ping(7))
            await asyncio.wait_for(got.wait(), 5)
        finally:
            await client.close()
    assert protocol.decode(received[0]) == protocol.Ping(7)
