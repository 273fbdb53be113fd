"""The maintenance switch is stored: a process follows a switch another process turned."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets
from server_kit import TestTerminal, running_server

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


async def test_sessions_above_the_bound_meet_a_provider_outage_until_one_ends(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path / "server", sessions_max=2) as running:
        held = [await websockets.connect(running.ws_url) for _ in range(2)]
        try:
            # Two sessions (not even past their hello) fill the process: a third is told
            # to come back later, and closed with "try again later".
            async with websockets.connect(running.ws_url) as ws:
                message = protocol.decode(await asyncio.wait_for(ws.recv(), WAIT_S))
                assert isinstance(message, protocol.Error)
                assert message.code == "service_unavailable" and message.fatal
                assert "serves 2 sessions at once" in message.message
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), WAIT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert running.server.metrics["sessions_refused_total"] == 1
            assert running.server.metrics["sessions_active"] == 2
        finally:
            await held[0].close()
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while running.server.metrics["sessions_active"] > 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        # A place is free again: the next session is served (its handshake starts).
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        assert running.server.metrics["sessions_refused_total"] == 1
        assert "T1" in running.server._sessions
        await t.close()
        await held[1].close()
        while running.server.metrics["sessions_active"] > 0:
            assert asyncio.get_running_loop().time() < deadline + WAIT_S
            await asyncio.sleep(0.01)
        assert running.server._sessions == {}  # an ended terminal's entry goes with it
