"""A minimal stand-in sync server, used only until ``syncengine.server.merge`` is wired in.

It is built from the core (ops, replica, lifecycle, protocol) and speaks the real protocol
to the real TerminalMachine, so the rest of the simulator does not care which server it
runs. It is deliberately small: handshake, push -> durable store -> ack, pull, and a
forwarder that calls the processor once per payment id in capture order, resolves an
unknown outcome by lookup under the same key, retries transient errors with capped
backoff, never retries a decline, and writes ``expired`` for payments past their deadline.

"Durable" state (the stored ops and the server streams) survives :meth:`crash`; sessions
and forwarder timers do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, StatusChange, parse_body
from syncengine.core.errors import ProtocolError, SyncEngineError
from syncengine.core.hlc import HybridClock
from syncengine.core.lifecycle import FINAL, Status
from syncengine.core.ops import Op, make_next, server_origin
from syncengine.core.replica import Replica
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    OutcomeUnknown,
    ProcessorUnavailable,
)
from syncengine.sim import facts as f
from syncengine.sim.facts import Trace
from syncengine.sim.processor import SimProcessor

BACKOFF_MS_BASE = 1_000
BACKOFF_MS_CAP = 60_000
SERVER_OPS_BATCH_MAX = 200
FORWARD_CALLS_PER_TICK_MAX = 50


@dataclass
class _Pay:
    capture: Capture
    terminal_id: str
    status: Status = Status.CAPTURED
    unknown: bool = False
    next_try_ms: int = 0
    tries: int = 0


@dataclass
class _Session:
    stage: str = "hello"  # hello -> auth -> ready
    nonce: bytes = b""


@dataclass
class _Durable:
    replica: Replica = field(default_factory=Replica)
    payments: dict[str, _Pay] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


class StandInServer:
    """A :class:`~syncengine.sim.adapters.SimServer` built on the core only."""

    def __init__(self, processor: SimProcessor, trace: Trace, merchant_id: str) -> None:
        self.processor = processor
        self.trace = trace
        self.merchant_id = merchant_id
        self.durable = _Durable()
        self.clock = HybridClock()
        self.sessions: dict[str, _Session] = {}
        self.out: list[tuple[str, bytes]] = []
        self.up = True
        self.unavailable = False  # provider outage: reachable, refuses service
        self.bugs: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def boot(self, now_ms: int) -> None:
        self.up = True
        self.sessions.clear()
        for pay in self.durable.payments.values():
            pay.next_try_ms = now_ms

    def crash(self, now_ms: int = 0, mid_forward: bool = False) -> None:
        """Lose everything volatile. ``mid_forward``: first send the next pending charge to
        the processor and die before its outcome is recorded (the hard case of R7)."""
        if mid_forward:
            for pid in self.durable.order:
                pay = self.durable.payments[pid]
                if pay.status not in FINAL:
                    try:
                        self._charge(now_ms, pay)
                        self.trace.add(now_ms, f.FORWARD, pay.terminal_id, pid, detail="crashed")
                    except SyncEngineError:
                        pass
                    break
        self.up = False
        self.sessions.clear()
        self.out.clear()

    # -- sessions ------------------------------------------------------------------------

    def open_session(self, now_ms: int, terminal_id: str) -> None:
        self.sessions[terminal_id] = _Session()

    def close_session(self, terminal_id: str) -> None:
        self.sessions.pop(terminal_id, None)

    def _send(self, terminal_id: str, message: protocol.Message) -> None:
        self.out.append((terminal_id, protocol.encode(message)))

    def outgoing(self) -> list[tuple[str, bytes]]:
        out, self.out = self.out, []
        return out

    def receive(self, now_ms: int, terminal_id: str, frame: bytes) -> None:
        session = self.sessions.get(terminal_id)
        if session is None or not self.up:
            return
        try:
            message = protocol.decode(frame)
            self._on_message(now_ms, terminal_id, session, message)
        except SyncEngineError as exc:
            self._send(terminal_id, protocol.Error("bad_request", str(exc)[:500], False))

    def _on_message(
        self, now_ms: int, tid: str, session: _Session, message: protocol.Message
    ) -> None:
        if self.unavailable:
            self._send(tid, protocol.Error("service_unavailable", "provider outage", True))
            return
        if isinstance(message, protocol.Hello):
            session.stage, session.nonce = "auth", crypto.b64d(crypto.b64e(bytes(32)))
            self._send(tid, protocol.Challenge(crypto.b64e(session.nonce), now_ms))
        elif isinstance(message, protocol.Auth):
            session.stage = "ready"
            vector = {tid: self.durable.replica.head(tid)[0]}
            self._send(tid, protocol.Welcome(vector, now_ms))
        elif session.stage != "ready":
            raise ProtocolError("authenticate first")
        elif isinstance(message, protocol.Push):
            self._on_push(now_ms, tid, message)
        elif isinstance(message, protocol.Pull):
            self._send_server_ops(tid, message.vector.get(server_origin(tid), 0))
        elif isinstance(message, protocol.Ping):
            self._send(tid, protocol.Pong(message.nonce))

    def _on_push(self, now_ms: int, tid: str, message: protocol.Push) -> None:
        if any(op.origin != tid for op in message.ops):
            raise ProtocolError("a terminal pushes only its own ops")
        for op in message.ops:
            parse_body(op)
        result = self.durable.replica.merge(message.ops)
        head = self.durable.replica.head(tid)[0]
        if "ack_before_store" in self.bugs:
            self.trace.add(now_ms, f.ACK, tid, value=head, detail=tid)
        for op in result.applied:
            if op.kind == "capture":
                capture = parse_body(op)
                assert isinstance(capture, Capture)
                self.durable.payments[capture.payment_id] = _Pay(capture, tid, next_try_ms=now_ms)
                self.durable.order.append(capture.payment_id)
        self.trace.add(now_ms, f.DURABLE, tid, value=head, detail=tid)
        self._send(tid, protocol.Ack(tid, head))
        if result.applied:
            self._forward(now_ms)

    def _send_server_ops(self, tid: str, after_seq: int) -> None:
        origin = server_origin(tid)
        ops = self.durable.replica.delta({origin: after_seq}, SERVER_OPS_BATCH_MAX + 1)
        ops = [op for op in ops if op.origin == origin]
        more = len(ops) > SERVER_OPS_BATCH_MAX
        self._send(tid, protocol.ServerOps(tuple(ops[:SERVER_OPS_BATCH_MAX]), "", more))

    # -- forwarding ----------------------------------------------------------------------

    def _status_op(self, now_ms: int, pay: _Pay, status: Status, code: str, msg: str) -> None:
        origin = server_origin(pay.terminal_id)
        seq = self.durable.replica.head(origin)[0]
        prev = self.durable.replica.get(origin, seq)
        body = StatusChange(pay.capture.payment_id, status, now_ms, code[:64], msg[:200])
        op = make_next(prev, origin, self.clock.now(now_ms), "status", body.to_body())
        self.durable.replica.merge([op])
        pay.status = status
        self.trace.add(now_ms, f.STATUS, pay.terminal_id, pay.capture.payment_id, 0, status.value)
        if pay.terminal_id in self.sessions and self.sessions[pay.terminal_id].stage == "ready":
            self._send(pay.terminal_id, protocol.ServerOps((op,), "", False))

    def tick(self, now_ms: int) -> None:
        if self.up:
            self._forward(now_ms)

    def _forward(self, now_ms: int) -> None:
        calls = 0
        blocked: set[str] = set()  # capture order per terminal: stop at the first not done
        for pid in self.durable.order:
            pay = self.durable.payments[pid]
            if pay.status in FINAL or pay.terminal_id in blocked:
                continue
            if now_ms < pay.next_try_ms or calls >= FORWARD_CALLS_PER_TICK_MAX:
                blocked.add(pay.terminal_id)
                continue
            calls += 1
            if not self._forward_one(now_ms, pay):
                blocked.add(pay.terminal_id)

    def _forward_one(self, now_ms: int, pay: _Pay) -> bool:
        cap = pay.capture
        expired = cap.expires_at_ms is not None and now_ms >= cap.expires_at_ms
        try:
            if pay.unknown:
                result = self.processor.lookup(now_ms, cap.payment_id)
                if result is None and not expired:
                    result = self._charge(now_ms, pay)
            elif not expired:
                result = self._charge(now_ms, pay)
            else:
                result = None
        except ProcessorUnavailable as exc:
            return self._retry(now_ms, pay, "unavailable", str(exc))
        except OutcomeUnknown as exc:
            pay.unknown = True
            return self._retry(now_ms, pay, "unknown", str(exc))
        if result is None:
            self.trace.add(now_ms, f.FORWARD, pay.terminal_id, cap.payment_id, detail="expired")
            self._status_op(now_ms, pay, Status.EXPIRED, "expired", "not forwarded in time")
            return True
        status = Status.APPROVED if result.outcome == "approved" else Status.OFFLINE_DECLINED
        self.trace.add(now_ms, f.FORWARD, pay.terminal_id, cap.payment_id, detail=result.outcome)
        self._status_op(now_ms, pay, status, result.code, result.message)
        return True

    def _charge(self, now_ms: int, pay: _Pay) -> ChargeResult:
        cap = pay.capture
        request = ChargeRequest(
            cap.payment_id,
            cap.merchant_id,
            pay.terminal_id,
            cap.amount,
            cap.card.sealed,
            cap.channel,
            cap.captured_at_ms,
        )
        pay.tries += 1
        return self.processor.charge(now_ms, request)

    def _retry(self, now_ms: int, pay: _Pay, what: str, detail: str) -> bool:
        delay = min(BACKOFF_MS_CAP, BACKOFF_MS_BASE * 2 ** min(pay.tries, 16))
        pay.next_try_ms = now_ms + delay
        self.trace.add(now_ms, f.FORWARD, pay.terminal_id, pay.capture.payment_id, detail=what)
        return False

    # -- facts ---------------------------------------------------------------------------

    def stored_ops(self) -> list[Op]:
        return list(self.durable.replica.ops())

    def blobs(self) -> list[bytes]:
        return [b"\n".join(op.canonical_bytes() for op in self.durable.replica.ops())]
