"""Test support for the node SDK: a minimal sync server on loopback, builders, a clock.

The server is built from the same core protocol module as the real one will be: it checks
the challenge signature, every pushed chain and its head signature, stores ops in memory,
acks, forwards captures at once (writing ``status`` ops) and can send any server op.
Replace it with the real server once ``syncengine/server`` lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, StatusChange
from syncengine.core.errors import ProtocolError
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.core.ops import GENESIS, Op, check_chain, make_next, server_origin
from syncengine.core.policy.acceptance import Brand, Region
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.offline_mode import OfflineModePolicy, OfflineSettings
from syncengine.node.machine import CardRead, TerminalConfig

PAN = "4111111111111111"
PROCESSOR = crypto.X25519KeyPair.from_private(bytes(range(1, 33)))
SERVER_KEY = crypto.Ed25519KeyPair.from_private(bytes(range(2, 34)))
ALLOWED = OfflineSettings(True, True, "owner@example.com", 1)


def visa(pan: str = PAN) -> CardRead:
    return CardRead(crypto.CardData(pan, 12, 2030), Brand.VISA)


def usd(text: str) -> Money:
    return Money.parse(text, "USD")


def make_config(terminal_id: str = "T1", **changes: Any) -> TerminalConfig:
    base: dict[str, Any] = {
        "terminal_id": terminal_id,
        "merchant_id": "M1",
        "device_class": DeviceClass.TERMINAL,
        "currency": "USD",
        "region": Region.US,
        "processor_public_key": PROCESSOR.public,
        "server_public_key": SERVER_KEY.public,
        "offline": ALLOWED,
        "policy": OfflineModePolicy(),
        "heartbeat_interval_ms": 200,
        "heartbeat_timeout_ms": 1_000,
        "reconnect_base_ms": 20,
        "reconnect_cap_ms": 100,
        "online_outcome_timeout_ms": 1_000,
    }
    base.update(changes)
    return TerminalConfig(**base)


class FakeClock:
    """A settable clock for pure machine tests."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class TerminalRecord:
    public_key: bytes
    ops: list[Op] = field(default_factory=list)
    server_ops: list[Op] = field(default_factory=list)


class FakeSyncServer:
    """A minimal sync server: auth, chain checks, acks, instant forwarding."""

    def __init__(self) -> None:
        self.terminals: dict[str, TerminalRecord] = {}
        self.sessions: dict[str, ServerConnection] = {}
        self.http_status: int | None = None  # e.g. 503: refuse every upgrade
        self.unavailable = False  # answer Hello with Error service_unavailable
        self.auto_forward = True
        self.silent = False  # stop answering anything (a black hole)
        self.decline_minor: set[int] = set()
        self.pushes = 0
        self.auth_failures = 0
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    async def start(self) -> None:
        self._server = await serve(
            self._handler, "127.0.0.1", self.port, process_request=self._process_request
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.sessions.clear()

    async def enroll(self, request: protocol.EnrollRequest) -> None:
        self.terminals[request.terminal_id] = TerminalRecord(crypto.b64d(request.public_key))

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.http_status is not None:
            return Response(self.http_status, "Service Unavailable", Headers(), b"down\n")
        return None

    async def _send(self, ws: ServerConnection, message: protocol.Message) -> None:
        await ws.send(protocol.encode(message).decode())

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            hello = protocol.decode(await ws.recv())
            if not isinstance(hello, protocol.Hello) or hello.terminal_id not in self.terminals:
                await self._send(ws, protocol.Error("unknown_terminal", "enroll first", True))
                return
            if self.unavailable:
                await self._send(ws, protocol.Error("service_unavailable", "maintenance", True))
                return
            tid = hello.terminal_id
            record = self.terminals[tid]
            nonce = os.urandom(32)
            await self._send(ws, protocol.Challenge(crypto.b64e(nonce), 0))
            auth = protocol.decode(await ws.recv())
            if not isinstance(auth, protocol.Auth):
                return
            try:
                crypto.verify(
                    record.public_key,
                    crypto.challenge_message(nonce, tid),
                    crypto.b64d(auth.signature),
                )
            except ProtocolError:
                self.auth_failures += 1
                await self._send(ws, protocol.Error("auth_failed", "bad signature", True))
                return
            vector = {tid: len(record.ops), server_origin(tid): len(record.server_ops)}
            await self._send(ws, protocol.Welcome(vector, int(time.time() * 1000)))
            self.sessions[tid] = ws
            async for frame in ws:
                if self.silent:
                    continue
                await self._on_message(ws, tid, record, protocol.decode(frame))
        except ConnectionClosed:
            pass
        finally:
            for tid, session in list(self.sessions.items()):
                if session is ws:
                    del self.sessions[tid]

    async def _on_message(
        self, ws: ServerConnection, tid: str, record: TerminalRecord, message: protocol.Message
    ) -> None:
        if isinstance(message, protocol.Ping):
            await self._send(ws, protocol.Pong(message.nonce))
        elif isinstance(message, protocol.Pull):
            have = message.vector.get(server_origin(tid), 0)
            ops = tuple(record.server_ops[have:])
            await self._send(ws, self._server_ops(tid, ops))
        elif isinstance(message, protocol.Push):
            self.pushes += 1
            head = record.ops[-1] if record.ops else None
            plan = check_chain(
                0 if head is None else head.seq,
                GENESIS if head is None else head.digest,
                message.ops,
                {op.seq: op.digest for op in record.ops},
            )
            last = message.ops[-1]
            crypto.verify(
                record.public_key,
                crypto.chain_head_message(tid, last.seq, last.digest),
                crypto.b64d(message.head_signature),
            )
            record.ops.extend(plan.new)
            await self._send(ws, protocol.Ack(tid, plan.head_seq))
            if self.auto_forward:
                for op in plan.new:
                    if op.kind == "capture":
                        capture = Capture.from_body(op.body)
                        declined = capture.amount.minor in self.decline_minor
                        status = Status.OFFLINE_DECLINED if declined else Status.APPROVED
                        code = "insufficient_funds" if declined else "approved"
                        await self.send_status(tid, capture.payment_id, status, code)

    def _server_ops(self, tid: str, ops: tuple[Op, ...]) -> protocol.ServerOps:
        signature = ""
        if ops:
            last = ops[-1]
            message = crypto.chain_head_message(server_origin(tid), last.seq, last.digest)
            signature = crypto.b64e(crypto.sign(SERVER_KEY.private, message))
        return protocol.ServerOps(ops, signature, False)

    async def send_server_op(self, tid: str, kind: str, body: dict[str, Any]) -> Op:
        """Append a server op for ``tid`` and send it if the terminal is connected."""
        record = self.terminals[tid]
        prev = record.server_ops[-1] if record.server_ops else None
        wall = 1_700_000_000_000 + len(record.server_ops)
        op = make_next(prev, server_origin(tid), Hlc(wall, 0), kind, body)
        record.server_ops.append(op)
        ws = self.sessions.get(tid)
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._send(ws, self._server_ops(tid, (op,)))
        return op

    async def send_status(self, tid: str, payment_id: str, status: Status, code: str) -> None:
        body = StatusChange(payment_id, status, 1_700_000_000_000, code, "").to_body()
        await self.send_server_op(tid, "status", body)

    async def drop(self) -> None:
        """Close every open session (as a network blip would)."""
        for ws in list(self.sessions.values()):
            await ws.close()
        self.sessions.clear()


async def wait_for(predicate: Any, timeout_s: float = 5.0, step_s: float = 0.01) -> None:
    """Poll ``predicate()`` until true; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step_s)
