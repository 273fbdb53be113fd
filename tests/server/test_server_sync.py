"""The /sync websocket against a real uvicorn: enrollment, auth, push/ack, pull, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import websockets
from server_kit import TestTerminal, allow_offline, running_server

from syncengine.core import crypto, protocol
from syncengine.core.ops import Op
from syncengine.server.store.sqlite import SqliteStore


async def _count_ops(running_dir: Path) -> int:
    store = SqliteStore(running_dir / "server.db")
    store.open()
    try:
        return store.counts()["ops"]
    finally:
        store.close()


async def test_enroll_auth_push_ack_then_replay_changes_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        welcome = await t.connect(running)
        assert welcome.vector["T1"] == 0
        assert welcome.vector["server/T1"] >= 1  # initial settings
        for i in range(5):
            t.capture(f"p{i}", 1000 + i, 1_000_000 + i)
        ack = await t.push(t.ops[:3])
        assert ack == protocol.Ack("T1", 3)
        ack = await t.push(t.ops)  # overlaps what is stored: duplicates ignored
        assert ack == protocol.Ack("T1", 5)
        before = running.server.metrics["ops_merged_total"]
        ack = await t.push(t.ops)  # a full replay
        assert ack == protocol.Ack("T1", 5)
        await t.close()
        assert before == 5
        assert running.server.metrics["ops_merged_total"] == 5  # the replay merged nothing
        async with running.http() as http:
            r = await http.get("/v1/payments")
            assert sorted(p["payment_id"] for p in r.json()["payments"]) == [
                f"p{i}" for i in range(5)
            ]
        # A second session sees the stored head in its welcome.
        welcome = await t.connect(running)
        assert welcome.vector["T1"] == 5
        await t.close()


async def test_settings_reach_the_terminal_as_signed_server_ops(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        ops = await t.pull()
        settings = {op.body["key"]: op.body["value"] for op in ops if op.kind == "setting"}
        assert settings["offline_allowed"] is False
        assert settings["per_transaction_limit"] == {"minor": 500_000, "currency": "USD"}
        assert settings["total_limit"] == {"minor": 5_000_000, "currency": "USD"}
        # An admin change is pushed unsolicited to the live session.
        async with running.http() as http:
            r = await http.put(
                "/v1/terminals/T1/settings",
                json={"per_transaction_limit": {"minor": 20_000, "currency": "USD"}},
            )
            assert r.status_code == 200, r.text
        pushed = await t.recv_until(protocol.ServerOps)
        assert [op.body for op in pushed.ops] == [
            {"key": "per_transaction_limit", "value": {"minor": 20_000, "currency": "USD"}}
        ]
        await t.close()


async def test_force_offline_pressed_again_is_written_again(tmp_path: Path) -> None:
    """Forcing offline is an action: a second press with the value unchanged writes a new
    setting op (a terminal that left forced offline when its link came back acts on it);
    other unchanged settings are not written again."""
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await allow_offline(running, "T1")
        async with running.http() as http:
            seqs = []
            for _ in range(2):
                r = await http.put("/v1/terminals/T1/settings", json={"force_offline": True})
                assert r.status_code == 200, r.text
                assert r.json()["force_offline"] is True
                seqs.append(r.json()["setting_ops"])
            same = {"total_limit": {"minor": 5_000_000, "currency": "USD"}}
            r = await http.put("/v1/terminals/T1/settings", json=same)
            assert r.status_code == 200 and r.json()["setting_ops"] == []
            r = await http.put("/v1/terminals/T1/settings", json={"force_offline": False})
            assert len(r.json()["setting_ops"]) == 1
            r = await http.put("/v1/terminals/T1/settings", json={"force_offline": False})
            assert r.json()["setting_ops"] == []  # lifting what is lifted changes nothing
        assert len(seqs[0]) == 1 and len(seqs[1]) == 1 and seqs[1][0] > seqs[0][0]
        await t.connect(running)
        ops = await t.pull()
        forced = [op.body["value"] for op in ops if op.body.get("key") == "force_offline"]
        assert forced == [False, True, True, False]


async def test_wrong_key_auth_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        impostor = TestTerminal("T1")  # same id, another key
        ws = await websockets.connect(running.ws_url)
        await ws.send(protocol.encode(protocol.Hello("T1", "x")).decode())
        challenge = protocol.decode(await ws.recv())
        assert isinstance(challenge, protocol.Challenge)
        sig = crypto.sign(
            impostor.key.private,
            crypto.challenge_message(crypto.b64d(challenge.nonce), "T1"),
        )
        await ws.send(protocol.encode(protocol.Auth("T1", crypto.b64e(sig))).decode())
        error = protocol.decode(await ws.recv())
        assert isinstance(error, protocol.Error) and error.fatal and error.code == "auth_failed"
        await ws.close()
        # An unknown terminal is refused at hello.
        ws = await websockets.connect(running.ws_url)
        await ws.send(protocol.encode(protocol.Hello("nobody", "x")).decode())
        error = protocol.decode(await ws.recv())
        assert isinstance(error, protocol.Error) and error.code == "not_enrolled"
        await ws.close()
        # Garbage before auth is refused too.
        ws = await websockets.connect(running.ws_url)
        await ws.send("{not json")
        error = protocol.decode(await ws.recv())
        assert isinstance(error, protocol.Error) and error.code == "bad_frame"
        await ws.close()


async def test_bad_signature_tamper_and_equivocation_are_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        t = TestTerminal("T1")
        await t.enroll(running)
        await t.connect(running)
        t.capture("p1", 100, 1_000)
        t.capture("p2", 200, 2_000)
        other = TestTerminal("T1")
        bad = await t.push(t.ops, signature=other.sign_head(t.ops[-1]))
        assert isinstance(bad, protocol.Error) and bad.code == "bad_signature" and bad.fatal
        await t.close()

        await t.connect(running)
        # Tamper: change p2's amount but keep its prev; re-sign the head (a compromised
        # terminal key cannot fix the chain for the stored head either).
        ack = await t.push(t.ops[:1])
        assert ack == protocol.Ack("T1", 1)
        first = t.ops[0]
        forged = Op(first.origin, 1, first.hlc, "mode", _mode_body(), first.prev)
        answer = await t.push([forged])
        assert isinstance(answer, protocol.Error) and answer.code == "equivocation"
        await t.close()

        await t.connect(running)
        gap = Op("T1", 3, t.ops[1].hlc, "mode", _mode_body(), t.ops[1].digest)
        answer = await t.push([gap])
        assert isinstance(answer, protocol.Error) and answer.code == "chain_gap"
        assert not answer.fatal
        assert await t.recv() == protocol.Ack("T1", 1)
        ack = await t.push(t.ops[1:])
        assert ack == protocol.Ack("T1", 2)
        await t.close()
    # Two captures, six initial settings, and two "expired" statuses: the captures were
    # taken at t=1 s and reached the server long after their 24 h deadline.
    assert await _count_ops(tmp_path) == 2 + 6 + 2


async def test_push_of_another_origin_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        a, b = TestTerminal("A"), TestTerminal("B")
        await a.enroll(running)
        await b.enroll(running)
        b.capture("pb", 100, 1_000)
        await a.connect(running)
        # A signs B's op with A's key: the origin check refuses it.
        answer = await a.push(b.ops, signature=a.sign_head(b.ops[-1]))
        assert isinstance(answer, protocol.Error) and answer.code == "wrong_origin"
        await a.close()


async def test_enrollment_code_is_one_time_and_role_checked(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        async with running.http() as http:
            r = await http.post("/v1/api-keys", json={"role": "cashier", "name": "Cas"})
            assert r.status_code == 201
            cashier = r.json()["api_key"]
            r = await http.post("/v1/enrollment-codes", json={})
            code = r.json()["code"]
        async with running.http(cashier) as http:
            r = await http.post("/v1/enrollment-codes", json={})
            assert r.status_code == 403
            assert "manager, owner" in r.json()["message"]
        t = TestTerminal("T9")
        await t.enroll(running, code)
        again = TestTerminal("T10")
        async with running.http() as http:
            r = await http.post(
                "/v1/enroll",
                json={
                    "terminal_id": "T10",
                    "code": code,
                    "public_key": crypto.b64e(again.key.public),
                    "device_class": "reader",
                },
            )
            assert r.status_code == 409 and r.json()["error"] == "enrollment_code_used"
            r = await http.post(
                "/v1/enroll",
                json={
                    "terminal_id": "T11",
                    "code": "NOPE",
                    "public_key": crypto.b64e(os.urandom(32)),
                    "device_class": "reader",
                },
            )
            assert r.status_code == 409 and r.json()["error"] == "enrollment_code_invalid"
        # A retried enrollment (lost response) with the same key succeeds again.
        await t.enroll(running, code)


def _mode_body() -> dict[str, object]:
    return {"from": "online", "to": "offline", "reason": "test", "at_ms": 1}
