"""The maintenance switch is stored: a process follows a switch another process turned."""

from __future__ import annotations

import asyncio
from pathlib import Path

import websockets
from server_kit import running_server

from syncengine.core import protocol

POLL_MS = 50
WAIT_S = 5.0


async def test_a_switch_turned_elsewhere_is_followed_and_closes_live_sessions(
    tmp_path: Path,
) -> None:
    async with running_server(
        tmp_path / "server", run_background=True, maintenance_poll_ms=POLL_MS
    ) as running:
        server = running.server
        assert server.maintenance is False
        # What another process of the same store does: write the switch in the store.
        await server.run_store(server.store.set_maintenance, True, "other-process", 1)
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not server.maintenance and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert server.maintenance is True
        # A new session meets the provider outage.
        async with websockets.connect(running.ws_url) as ws:
            frame = await asyncio.wait_for(ws.recv(), WAIT_S)
            message = protocol.decode(frame)
            assert isinstance(message, protocol.Error)
            assert message.code == "service_unavailable"
        # GET reads the stored switch; turning it off through this process's API works.
        async with running.http() as http:
            assert (await http.get("/v1/maintenance")).json() == {"maintenance": True}
            r = await http.put("/v1/maintenance", json={"maintenance": False})
            assert r.json() == {"maintenance": False}
        assert await server.run_store(server.store.get_maintenance) is False
