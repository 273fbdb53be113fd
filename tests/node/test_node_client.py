"""SyncClient over a real loopback websocket: the compression it negotiates, the proxy it uses."""

from __future__ import annotations

import asyncio
import contextlib
import zlib

import pytest
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


async def test_the_system_proxy_is_looked_up_once_and_used_for_every_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real HTTP CONNECT proxy on loopback: the terminal reaches the server through it,
    as configured in the environment when the client was made."""
    tunnels: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        target = request.split(b" ")[1]
        tunnels.append(target)
        host, port = target.rsplit(b":", 1)
        up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def handler(ws: ServerConnection) -> None:
        async for _ in ws:
            pass

    events: list[Event] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        tunnel = await asyncio.start_server(proxy, "127.0.0.1", 0)
        proxy_port = tunnel.sockets[0].getsockname()[1]
        for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("ws_proxy", f"http://127.0.0.1:{proxy_port}")
        client = SyncClient(f"ws://127.0.0.1:{port}/sync", events.append, lambda: 0)
        monkeypatch.delenv("ws_proxy")  # read when the client was made, not per connect
        try:
            for _ in range(2):
                await client.connect()
                assert isinstance(events[-1], Connected), events[-1]
            assert tunnels == [f"127.0.0.1:{port}".encode()] * 2
        finally:
            await client.close()
            tunnel.close()
    direct = SyncClient("ws://127.0.0.1:9/sync", events.append, lambda: 0)
    assert direct._proxy is None  # nothing configured: connect directly
