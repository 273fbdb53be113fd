"""The maintenance switch: /sync answers ``service_unavailable`` and the SDK shows a
*provider* outage, not a network one (R4: two different alerts)."""

from __future__ import annotations

from pathlib import Path

from e2e_support import ServerProcess, Till, close_all, open_terminal, wait_until

from syncengine.node.machine import ModeAlert, OfflinePrompt, OutageAlert
from syncengine.processor.testing import running_sandbox


def _outages(till: Till) -> list[str]:
    return [n.outage for n in till.seen(OutageAlert)]


async def test_maintenance_switch_is_a_provider_outage_on_the_terminal(tmp_path: Path) -> None:
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url, "--maintenance")
        await server.start()
        tills: list[Till] = []
        try:
            await server.allow_offline()
            # Started with --maintenance: the first session already meets the outage.
            till = await open_terminal(tmp_path, server, "M1")
            tills.append(till)
            await wait_until(
                lambda: till.terminal.status().network == "provider_outage", 10, "provider outage"
            )
            assert _outages(till) and set(_outages(till)) == {"provider"}
            assert any(a.kind == "provider_outage" for a in till.seen(ModeAlert))

            # Only an owner may switch it (a manager key is refused).
            manager = await server.api("POST", "/v1/api-keys", {"role": "manager"})
            async with server.http(manager["api_key"]) as http:
                r = await http.put("/v1/maintenance", json={"maintenance": False})
                assert r.status_code == 403, r.text
            assert (await server.api("GET", "/v1/maintenance"))["maintenance"] is True

            await server.api("PUT", "/v1/maintenance", {"maintenance": False})
            await wait_until(lambda: till.terminal.status().network == "connected", 10, "reconnect")

            # Switched on while a session is live: the terminal is told at once.
            await server.api("PUT", "/v1/terminals/M1/settings", {"offline_allowed": True})
            await wait_until(lambda: till.terminal.status().offline_allowed, 10, "settings")
            # The entry policy is a server setting the SDK honours (forced = portal only).
            await server.api("PUT", "/v1/terminals/M1/settings", {"offline_entry_policy": "forced"})
            await wait_until(
                lambda: till.terminal.machine.om.policy.entry.value == "forced", 5, "policy"
            )
            await server.api("PUT", "/v1/terminals/M1/settings", {"offline_entry_policy": "prompt"})
            await wait_until(
                lambda: till.terminal.machine.om.policy.entry.value == "prompt", 5, "policy"
            )
            till.notices.clear()
            await server.api("PUT", "/v1/maintenance", {"maintenance": True})
            await wait_until(
                lambda: till.terminal.status().network == "provider_outage", 5, "provider outage"
            )
            assert set(_outages(till)) == {"provider"}
            await wait_until(lambda: bool(till.seen(OfflinePrompt)), 5, "the offline prompt")
            prompt = till.seen(OfflinePrompt)
            assert prompt[0].outage == "provider"

            # A cut link, by contrast, is a network outage.
            await server.api("PUT", "/v1/maintenance", {"maintenance": False})
            await wait_until(lambda: till.terminal.status().network == "connected", 10, "reconnect")
            till.notices.clear()
            till.proxy.cut()
            await wait_until(
                lambda: till.terminal.status().network == "network_outage", 5, "network outage"
            )
            assert set(_outages(till)) == {"network"}
        finally:
            await close_all(tills)
            await server.stop()
