"""The listening socket every service binds gives accepted connections TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket

from syncengine.processor.testing import listen_socket


async def test_accepted_connections_have_nodelay() -> None:
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("socket")
        seen.append(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()
    assert seen and seen[0] != 0
