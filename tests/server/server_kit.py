"""Test kit for the sync server: a real server on loopback and a small test terminal.

The terminal here is built from core modules only (Ed25519 key, ``ops.make_next``, the
protocol codec); the SDK's client will replace it in end-to-end tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import websockets

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, CardInfo
from syncengine.core.hlc import Hlc
from syncengine.core.money import Money
from syncengine.core.ops import Op, make_next
from syncengine.processor.api import Processor
from syncengine.server.app import ServerConfig, SyncServer

APPROVE_PAN = "4242424242424242"
DECLINE_PAN = "4000000000009995"  # insufficient_funds
TRANSIENT_PAN = "4000000000000119"


class FakeClock:
    """A settable clock in ms; starts at the real time so receipts have sane dates."""

    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Running:
    """A running server: its object, base URL and an owner API key."""

    server: SyncServer
    url: str
    owner_key: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/sync"

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key or self.owner_key}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)


@asynccontextmanager
async def running_server(
    data_dir: Path,
    processor: Processor | None = None,
    clock: Callable[[], int] | None = None,
    **config: Any,
) -> AsyncIterator[Running]:
    """A real uvicorn (websockets implementation) serving a SyncServer on 127.0.0.1."""
    server = SyncServer(
        # /metrics reads the store's gauges afresh unless a test asks for the cache
        ServerConfig(data_dir=data_dir, **{"metrics_counts_max_age_ms": 0, **config}),
        processor=processor,
        clock_ms=clock or FakeClock(),
    )
    sock = free_socket()
    port = sock.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn.Config(server.app, ws="websockets-sansio", log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if uv.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        key = server.bootstrap_api_key
        if key is None:
            key = (data_dir / "owner-api-key.txt").read_text().strip()
        yield Running(server, f"http://127.0.0.1:{port}", key)
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@dataclass
class TestTerminal:
    """A terminal made of core parts: its key, its chain, a websocket session."""

    terminal_id: str
    merchant_id: str = "merchant-1"
    device_class: str = "terminal"
    key: crypto.Ed25519KeyPair = field(
        default_factory=lambda: crypto.Ed25519KeyPair.from_private(os.urandom(32))
    )
    ops: list[Op] = field(default_factory=list)
    processor_public: bytes = b""
    server_public: bytes = b""
    received: list[protocol.Message] = field(default_factory=list)
    ws: Any = None

    __test__ = False  # not a pytest class

    # -- building ops ------------------------------------------------------------------------

    def append(self, kind: str, body: dict[str, Any], at_ms: int) -> Op:
        previous = self.ops[-1] if self.ops else None
        op = make_next(previous, self.terminal_id, Hlc(at_ms, len(self.ops)), kind, body)
        self.ops.append(op)
        return op

    def capture(
        self,
        payment_id: str,
        amount_minor: int,
        at_ms: int,
        *,
        pan: str = APPROVE_PAN,
        channel: str = "offline",
        expires_at_ms: int | None = None,
        email: str | None = None,
        currency: str = "USD",
    ) -> Op:
        sealed = b"x" * 64
        if self.processor_public:
            sealed = crypto.seal_card(
                self.processor_public,
                crypto.CardData(pan, 12, 2030),
                ephemeral_private=os.urandom(32),
                nonce=os.urandom(12),
                aad=crypto.card_aad(payment_id),
            )
        if channel != "integrated" and expires_at_ms is None:
            expires_at_ms = at_ms + 24 * 3_600_000
        body = Capture(
            payment_id=payment_id,
            merchant_id=self.merchant_id,
            amount=Money(amount_minor, currency),
            channel=channel,
            card=CardInfo("visa", pan[-4:], "tap", crypto.b64e(sealed)),
            captured_at_ms=at_ms,
            expires_at_ms=None if channel == "integrated" else expires_at_ms,
            device_class=self.device_class,
            email=email,
        ).to_body()
        return self.append("capture", body, at_ms)

    def sign_head(self, op: Op) -> str:
        return crypto.b64e(
            crypto.sign(self.key.private, crypto.chain_head_message(op.origin, op.seq, op.digest))
        )

    # -- enrollment and session ----------------------------------------------------------------

    async def enroll(self, running: Running, code: str | None = None) -> dict[str, Any]:
        async with running.http() as http:
            if code is None:
                r = await http.post("/v1/enrollment-codes", json={"terminal_id": self.terminal_id})
                assert r.status_code == 201, r.text
                code = r.json()["code"]
            r = await http.post(
                "/v1/enroll",
                json={
                    "terminal_id": self.terminal_id,
                    "code": code,
                    "public_key": crypto.b64e(self.key.public),
                    "device_class": self.device_class,
                },
            )
            assert r.status_code == 201, r.text
            body: dict[str, Any] = r.json()
            self.server_public = crypto.b64d(body["server_public_key"])
            return body

    async def connect(self, running: Running) -> protocol.Welcome:
        self.ws = await websockets.connect(running.ws_url)
        await self.send(protocol.Hello(self.terminal_id, "test-kit"))
        challenge = await self.recv()
        assert isinstance(challenge, protocol.Challenge), challenge
        nonce = crypto.b64d(challenge.nonce)
        sig = crypto.sign(self.key.private, crypto.challenge_message(nonce, self.terminal_id))
        await self.send(protocol.Auth(self.terminal_id, crypto.b64e(sig)))
        welcome = await self.recv()
        assert isinstance(welcome, protocol.Welcome), welcome
        return welcome

    async def send(self, message: protocol.Message) -> None:
        await self.ws.send(protocol.encode(message).decode())

    async def recv(self, timeout_s: float = 10) -> protocol.Message:
        data = await asyncio.wait_for(self.ws.recv(), timeout_s)
        message = protocol.decode(data)
        self.received.append(message)
        return message

    async def recv_until(self, kind: type[protocol.Message], timeout_s: float = 10) -> Any:
        """Receive until a message of ``kind`` (others are kept in ``received``)."""
        while True:
            message = await self.recv(timeout_s)
            if isinstance(message, kind):
                return message
            if isinstance(message, protocol.Error) and message.fatal:
                raise AssertionError(f"fatal error: {message}")

    async def push(self, ops: list[Op], signature: str | None = None) -> protocol.Message:
        """Push ``ops`` signed over their last op; return the answer (Ack or Error)."""
        sig = signature if signature is not None else self.sign_head(ops[-1])
        await self.send(protocol.Push(tuple(ops), sig))
        while True:
            message = await self.recv()
            if isinstance(message, (protocol.Ack, protocol.Error)):
                return message

    async def push_all(self, batch_ops_max: int = 500) -> int:
        """Push every op in batches; returns the last acked seq."""
        seq = 0
        for start in range(0, len(self.ops), batch_ops_max):
            answer = await self.push(self.ops[start : start + batch_ops_max])
            assert isinstance(answer, protocol.Ack), answer
            seq = answer.seq
        return seq

    async def pull(self, after: int = 0) -> list[Op]:
        """Pull server ops after ``after``; verify the server's head signature."""
        origin = f"server/{self.terminal_id}"
        ops: list[Op] = []
        while True:
            await self.send(protocol.Pull({origin: after}))
            answer = await self.recv_until(protocol.ServerOps)
            if answer.ops:
                last = answer.ops[-1]
                crypto.verify(
                    self.server_public,
                    crypto.chain_head_message(last.origin, last.seq, last.digest),
                    crypto.b64d(answer.head_signature),
                )
                ops.extend(answer.ops)
                after = last.seq
            if not answer.more:
                return ops

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


async def connected_terminal(
    running: Running, processor_public: bytes, terminal_id: str = "T1"
) -> TestTerminal:
    """A :class:`TestTerminal` sealing to ``processor_public``, enrolled and connected."""
    terminal = TestTerminal(terminal_id, processor_public=processor_public)
    await terminal.enroll(running)
    await terminal.connect(running)
    return terminal


async def healthy(url: str) -> bool:
    """True when the server at ``url`` answers ``GET /health`` with 200."""
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(url + "/health", timeout=1)).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_for(predicate: Any, timeout_s: float = 20, interval_s: float = 0.05) -> None:
    """Poll an async predicate until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval_s)


async def allow_offline(running: Running, terminal_id: str) -> None:
    """Allow standalone + accept liability + allow offline for a terminal."""
    async with running.http() as http:
        r = await http.patch("/v1/merchant", json={"standalone_allowed": True})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/merchant/offline-liability", json={"accept": True})
        assert r.status_code == 200, r.text
        r = await http.put(f"/v1/terminals/{terminal_id}/settings", json={"offline_allowed": True})
        assert r.status_code == 200, r.text


async def api_key(running: Running, role: str) -> str:
    """A new API key of ``role`` (``owner``, ``manager``, ``cashier``), made by the owner."""
    async with running.http() as http:
        r = await http.post("/v1/api-keys", json={"role": role, "name": role.title()})
        assert r.status_code == 201
        return str(r.json()["api_key"])
