"""ServerMachine: one terminal's sync session on the server, sans I/O.

Theory of operation
-------------------
The machine is fed *events* and answers *effects*; it never touches a socket, a database
or a clock. After every call you must carry out the returned effects in order; an effect
that reads or writes the store is answered by calling the matching ``*_loaded`` /
``batch_stored`` method, which returns the next effects. At most one store effect is
outstanding at a time (``busy``): the shell feeds the next frame only when the machine is
idle, which is the session's back-pressure.

States (one table, :data:`ALLOWED`, says which frame each state accepts)::

    HELLO --Hello--> [LoadTerminal] --> AUTH --Auth(ok)--> READY
    READY --Push--> [LoadChain] --> [MergeBatch] --> Ack --> READY
    READY --Push (nothing new)--> [LoadChain] --> [MarkSeen, once a session] --> Ack --> READY
    READY --Pull--> [LoadServerOps] --> ServerOps --> READY
    READY --Ping--> Pong
    any   --bad frame / bad signature / equivocation--> Error(fatal) + Close --> CLOSED

Rules
-----
1. Nothing changes before the terminal proved its key: ``Auth`` carries an Ed25519
   signature over ``challenge_message(nonce, terminal_id)``; the nonce is fresh per session
   (injected), so a recorded session cannot be replayed.
2. A ``Push`` carries only ops of the session's own origin, at most ``batch_ops_max``. One
   signature per batch is verified (over the head of the batch), plus one hash per op
   (each op's ``prev`` must be the digest of the one before): the signed head commits to
   every op of the batch.
3. Ops at or below the stored head are duplicates; a different op under a stored seq is
   equivocation (fatal). A batch starting above head+1 has a gap: refused without effect
   (``Error(chain_gap)`` + an ``Ack`` of what is stored), the terminal resends from there
   (the SDK resets the link instead when that Ack is below what it had acknowledged).
4. A batch is acked only after :class:`MergeBatch` was stored (durable); replays and
   duplicates are acked at once and change nothing -- except that the first such push of
   a session, signed and chained like any, tells the store the terminal is back
   (:class:`MarkSeen`): after a restore from a backup the budget waits for each terminal
   holding a grant to push, and one with nothing new re-sends its last op to say so.
5. A capture received at or after its ``expires_at_ms`` (server clock) is stored and never
   charged. On a server that forwards nothing its ``expired`` status is written in the same
   transaction. A forwarding server (``expire_late_captures=False``) leaves it to the
   forwarder, which first looks its id up at the processor: a server restored from a
   backup may have charged it before and forgotten, and that charge is adopted, not
   reported as a loss.
6. ``ServerOps`` answers carry the server's signature over their last op's chain head.
   When the store tells the shell that ``server/T`` grew, :meth:`ServerMachine.server_ops_available`
   pushes the new ops unsolicited, from the highest seq the terminal has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from syncengine.core import crypto, protocol
from syncengine.core.bodies import Capture, ModeChange, StatusChange, VoidRequest, parse_body
from syncengine.core.errors import ChainError, Equivocation, ProtocolError
from syncengine.core.lifecycle import Status
from syncengine.core.ops import Op, check_chain, server_origin
from syncengine.server.model import (
    TERMINAL_REVOKED_TEXT,
    BatchStored,
    ChainView,
    HeadMoved,
    MergeBatch,
    TerminalInfo,
)

HEAD_MOVED_RETRIES_MAX = 3


class State(StrEnum):
    HELLO = "hello"
    AUTH = "auth"
    READY = "ready"
    CLOSED = "closed"


ALLOWED: dict[State, frozenset[type[protocol.Message]]] = {
    State.HELLO: frozenset({protocol.Hello}),
    State.AUTH: frozenset({protocol.Auth}),
    State.READY: frozenset({protocol.Push, protocol.Pull, protocol.Ping}),
    State.CLOSED: frozenset(),
}


# -- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this message to the terminal."""

    message: protocol.Message


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (after sending what came before)."""

    reason: str


@dataclass(frozen=True, slots=True)
class LoadTerminal:
    """Read the terminal's record; answer with :meth:`ServerMachine.terminal_loaded`."""

    terminal_id: str


@dataclass(frozen=True, slots=True)
class LoadChain:
    """Read head + stored digests of ``origin`` in [lo, hi]; answer ``chain_loaded``."""

    origin: str
    seq_lo: int
    seq_hi: int


@dataclass(frozen=True, slots=True)
class StoreBatch:
    """Apply the batch durably (``Store.merge_batch``); answer ``batch_stored``."""

    batch: MergeBatch


@dataclass(frozen=True, slots=True)
class MarkSeen:
    """A verified push held nothing the store lacks: the terminal is back (``Store.mark_seen``;
    a restore hold waits for that). Answer ``seen_marked``, also when the write failed."""

    terminal_id: str


@dataclass(frozen=True, slots=True)
class LoadServerOps:
    """Read ops of ``origin`` above ``after_seq`` (at most ``ops_max``); answer
    ``server_ops_loaded``."""

    origin: str
    after_seq: int
    ops_max: int


Effect = Send | Close | LoadTerminal | LoadChain | StoreBatch | MarkSeen | LoadServerOps


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Bounds of one session. ``batch_ops_max`` bounds pushes and server answers alike."""

    frame_bytes_max: int = protocol.FRAME_BYTES_MAX_DEFAULT
    batch_ops_max: int = protocol.BATCH_OPS_MAX_DEFAULT

    def protocol_limits(self) -> protocol.Limits:
        return protocol.Limits(self.frame_bytes_max, self.batch_ops_max)


@dataclass
class SessionStats:
    """Counters the shell exports as metrics."""

    ops_merged: int = 0
    ops_duplicate: int = 0
    batches_acked: int = 0
    refused: int = 0
    # server/T ops the terminal holds above what the server held when the session began:
    # the server lost them (restored from a backup; docs/operations.md, "Restore").
    server_stream_behind: int = 0


class ServerMachine:
    """The server side of one websocket session. See the module docstring."""

    def __init__(
        self,
        server_signer: crypto.Signer,
        nonce: bytes,
        limits: SessionLimits | None = None,
        *,
        expire_late_captures: bool = True,
    ) -> None:
        # The server's key, loaded once and shared by all of a shell's sessions.
        self._signer = server_signer
        self._expire_late = expire_late_captures
        self._nonce = nonce
        self.limits = limits or SessionLimits()
        self._proto_limits = self.limits.protocol_limits()
        self.state = State.HELLO
        self.terminal: TerminalInfo | None = None
        self.stats = SessionStats()
        self._hello_id: str | None = None
        self._busy = False
        self._push: tuple[Op, ...] = ()
        self._head_moved = 0
        self._server_seen = -1  # highest server/T seq the terminal has (-1: never pulled)
        self._wants_server_ops = False
        self._planned_new = 0
        self._unsolicited = False
        self._seen_marked = False  # a push of nothing new told the store we are back
        self._seen_ack = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a store effect is outstanding; do not feed frames then."""
        return self._busy

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- events ----------------------------------------------------------------------------

    def receive_frame(self, data: bytes | str, now_ms: int) -> list[Effect]:
        """A frame arrived. Decoding errors end the session; nothing changes."""
        try:
            message = protocol.decode(data, self._proto_limits)
        except ProtocolError as exc:
            return self._fatal("bad_frame", str(exc))
        return self.receive(message, now_ms)

    def receive(self, message: protocol.Message, now_ms: int) -> list[Effect]:
        """A decoded message arrived from the terminal."""
        if self.state is State.CLOSED:
            return []
        if self._busy:
            return self._fatal("busy", "send the next frame only after the previous answer")
        if type(message) not in ALLOWED[self.state]:
            return self._fatal(
                "unexpected_message", f"{message.TYPE} is not allowed in state {self.state.value}"
            )
        if isinstance(message, protocol.Hello):
            self._hello_id = message.terminal_id
            self._busy = True
            return [LoadTerminal(message.terminal_id)]
        if isinstance(message, protocol.Auth):
            return self._on_auth(message, now_ms)
        if isinstance(message, protocol.Push):
            return self._on_push(message, now_ms)
        if isinstance(message, protocol.Pull):
            return self._on_pull(message)
        if isinstance(message, protocol.Ping):
            return [Send(protocol.Pong(message.nonce))]
        raise AssertionError("ALLOWED admits only the message types handled above")

    def terminal_loaded(self, info: TerminalInfo | None, now_ms: int) -> list[Effect]:
        """Answer to :class:`LoadTerminal`."""
        self._busy = False
        if info is None or not info.active:
            return self._fatal(
                "not_enrolled",
                "This terminal is not enrolled (or was revoked); enroll it with a new code.",
            )
        self.terminal = info
        self.state = State.AUTH
        return [Send(protocol.Challenge(crypto.b64e(self._nonce), now_ms))]

    def chain_loaded(self, view: ChainView, now_ms: int) -> list[Effect]:
        """Answer to :class:`LoadChain`: plan the merge of the pending push."""
        self._busy = False
        info = self._info()
        ops = self._push
        origin = info.terminal_id
        if ops[0].seq > view.head_seq + 1:
            self._push = ()
            self.stats.refused += 1
            return [
                Send(
                    protocol.Error(
                        "chain_gap",
                        f"ops start at #{ops[0].seq} but the server holds up to "
                        f"#{view.head_seq}; resend from #{view.head_seq + 1}",
                        False,
                    )
                ),
                Send(protocol.Ack(origin, view.head_seq)),
            ]
        try:
            plan = check_chain(view.head_seq, view.head_digest, ops, view.digests)
        except Equivocation as exc:
            return self._fatal("equivocation", str(exc))
        except ChainError as exc:
            return self._fatal("chain_invalid", str(exc))
        self.stats.ops_duplicate += plan.duplicates
        if not plan.new:
            self._push = ()
            if self._seen_marked:
                return [Send(protocol.Ack(origin, view.head_seq))]
            self._seen_marked, self._seen_ack, self._busy = True, view.head_seq, True
            return [MarkSeen(origin)]
        try:
            batch = self._plan_batch(info, view, plan.new, now_ms)
        except ProtocolError as exc:
            return self._fatal("bad_op", str(exc))
        self._busy = True
        self._planned_new = len(plan.new)
        return [StoreBatch(batch)]

    def batch_stored(self, result: BatchStored | HeadMoved, now_ms: int) -> list[Effect]:
        """Answer to :class:`StoreBatch`. Ack only now: the ops are durable."""
        self._busy = False
        info = self._info()
        if isinstance(result, HeadMoved):
            # Another session of this terminal stored ops meanwhile: replan against it.
            self._head_moved += 1
            if self._head_moved > HEAD_MOVED_RETRIES_MAX:
                self._push = ()
                return [Send(protocol.Error("busy", "the chain moved under us; push again", False))]
            return self._load_chain(now_ms)
        self.stats.ops_merged += self._planned_new
        self.stats.batches_acked += 1
        self.terminal = _with_head(info, result.head_seq, result.head_digest)
        self._push = ()
        self._head_moved = 0
        effects: list[Effect] = [Send(protocol.Ack(info.terminal_id, result.head_seq))]
        if result.server_ops_written and self._server_seen >= 0:
            effects += self.server_ops_available(now_ms)
        return effects

    def seen_marked(self) -> list[Effect]:
        """Answer to :class:`MarkSeen`: acknowledge the push."""
        self._busy = False
        return [Send(protocol.Ack(self._info().terminal_id, self._seen_ack))]

    def timed_out(self) -> list[Effect]:
        """The shell's timer fired: the handshake or an idle session took too long."""
        if self.state is State.CLOSED:
            return []
        text = (
            "authentication took too long; reconnect and answer the challenge"
            if self.state is not State.READY
            else "the session was idle too long; reconnect when there is work"
        )
        return self._fatal("timeout", text)

    def revoked(self) -> list[Effect]:
        """The terminal was revoked while this session lived: end it."""
        return self._fatal("not_enrolled", TERMINAL_REVOKED_TEXT)

    def batch_refused(self, code: str, text: str, fatal: bool) -> list[Effect]:
        """Answer to :class:`StoreBatch` when the store refused it; nothing was stored.

        ``fatal`` for a refusal by the rules (e.g. a reused payment id), not for a storage
        failure (the terminal keeps its ops and pushes again later).
        """
        self._busy = False
        self._push = ()
        if fatal:
            return self._fatal(code, text)
        self.stats.refused += 1
        return [Send(protocol.Error(code, text[: protocol.TEXT_CHARS_MAX], False))]

    def server_ops_loaded(self, ops: list[Op], more: bool, now_ms: int) -> list[Effect]:
        """Answer to :class:`LoadServerOps`: send them, signed by the server."""
        self._busy = False
        unsolicited, self._unsolicited = self._unsolicited, False
        if unsolicited and not ops:
            return self._after_server_ops(now_ms)
        signature = ""
        if ops:
            last = ops[-1]
            signature = crypto.b64e(
                self._signer.sign(crypto.chain_head_message(last.origin, last.seq, last.digest))
            )
            self._server_seen = max(self._server_seen, last.seq)
        return [
            Send(protocol.ServerOps(tuple(ops), signature, more)),
            *self._after_server_ops(now_ms),
        ]

    def _after_server_ops(self, now_ms: int) -> list[Effect]:
        if self._wants_server_ops:
            self._wants_server_ops = False
            return self.server_ops_available(now_ms)
        return []

    def server_ops_available(self, now_ms: int) -> list[Effect]:
        """The shell learnt that ``server/T`` grew: push what the terminal lacks.

        Only once the terminal pulled at least once (so we know its vector). If the
        machine is busy the request is remembered and served afterwards.
        """
        if self.state is not State.READY or self._server_seen < 0:
            return []
        if self._busy:
            self._wants_server_ops = True
            return []
        self._busy = True
        self._unsolicited = True
        return [
            LoadServerOps(
                server_origin(self._info().terminal_id),
                self._server_seen,
                self.limits.batch_ops_max,
            )
        ]

    # -- handlers --------------------------------------------------------------------------

    def _on_auth(self, message: protocol.Auth, now_ms: int) -> list[Effect]:
        info = self._info()
        if message.terminal_id != self._hello_id:
            return self._fatal("auth_failed", "auth names another terminal than hello")
        try:
            signature = crypto.b64d(message.signature, chars_max=protocol.B64_CHARS_MAX)
            crypto.verify(
                info.public_key, crypto.challenge_message(self._nonce, info.terminal_id), signature
            )
        except ProtocolError as exc:
            return self._fatal("auth_failed", f"challenge signature refused: {exc}")
        self.state = State.READY
        vector = {info.terminal_id: info.head_seq, server_origin(info.terminal_id): info.server_seq}
        return [Send(protocol.Welcome(vector, now_ms))]

    def _on_push(self, message: protocol.Push, now_ms: int) -> list[Effect]:
        info = self._info()
        ops = tuple(sorted(message.ops, key=lambda op: op.seq))
        if any(op.origin != info.terminal_id for op in ops):
            return self._fatal(
                "wrong_origin", f"a terminal pushes only its own ops (origin {info.terminal_id})"
            )
        if len({op.seq for op in ops}) != len(ops):
            return self._fatal("equivocation", "two ops with one seq in a single push")
        last = ops[-1]
        try:
            signature = crypto.b64d(message.head_signature, chars_max=protocol.B64_CHARS_MAX)
            crypto.verify(
                info.public_key,
                crypto.chain_head_message(last.origin, last.seq, last.digest),
                signature,
            )
        except ProtocolError as exc:
            return self._fatal("bad_signature", f"push head signature refused: {exc}")
        self._push = ops
        self._head_moved = 0
        return self._load_chain(now_ms)

    def _on_pull(self, message: protocol.Pull) -> list[Effect]:
        info = self._info()
        origin = server_origin(info.terminal_id)
        after = message.vector.get(origin, 0)
        if self._server_seen < 0 and after > info.server_seq:
            self.stats.server_stream_behind = after - info.server_seq
        self._server_seen = after
        self._busy = True
        self._unsolicited = False
        return [LoadServerOps(origin, after, self.limits.batch_ops_max)]

    def _load_chain(self, now_ms: int) -> list[Effect]:
        ops = self._push
        self._busy = True
        return [LoadChain(ops[0].origin, ops[0].seq, ops[-1].seq)]

    def _plan_batch(
        self, info: TerminalInfo, view: ChainView, new: tuple[Op, ...], now_ms: int
    ) -> MergeBatch:
        captures: list[tuple[int, Capture]] = []
        expired: list[StatusChange] = []
        voids: list[VoidRequest] = []
        last_mode: ModeChange | None = None
        for op in new:
            body = parse_body(op)
            if isinstance(body, Capture):
                if body.merchant_id != info.merchant_id:
                    raise ProtocolError(
                        f"capture {body.payment_id} names merchant {body.merchant_id!r}; this "
                        f"terminal belongs to {info.merchant_id!r}"
                    )
                captures.append((op.seq, body))
                late = body.expires_at_ms is not None and now_ms >= body.expires_at_ms
                if late and self._expire_late:
                    expired.append(
                        StatusChange(
                            body.payment_id,
                            Status.EXPIRED,
                            now_ms,
                            "expired",
                            "Received after its deadline; the card was not charged.",
                        )
                    )
            elif isinstance(body, ModeChange):
                last_mode = body
            elif isinstance(body, VoidRequest):
                voids.append(body)
        if len({c.payment_id for _, c in captures}) != len(captures):
            raise ProtocolError("two captures with one payment id in a single push")
        return MergeBatch(
            terminal_id=info.terminal_id,
            merchant_id=info.merchant_id,
            expected_head_seq=view.head_seq,
            expected_head_digest=view.head_digest,
            ops=new,
            captures=tuple(captures),
            expired=tuple(expired),
            voids=tuple(voids),
            last_mode=last_mode,
            received_at_ms=now_ms,
        )

    def _info(self) -> TerminalInfo:
        if self.terminal is None:
            raise AssertionError("the terminal is known in every state past HELLO")
        return self.terminal

    def _fatal(self, code: str, text: str) -> list[Effect]:
        self.state = State.CLOSED
        self._busy = False
        self._push = ()
        self.stats.refused += 1
        return [Send(protocol.Error(code, text[: protocol.TEXT_CHARS_MAX], True)), Close(code)]


def _with_head(info: TerminalInfo, head_seq: int, head_digest: str) -> TerminalInfo:
    return TerminalInfo(
        info.terminal_id,
        info.merchant_id,
        info.public_key,
        info.device_class,
        info.active,
        head_seq,
        head_digest,
        info.server_seq,
    )
