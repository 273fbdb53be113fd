"""TerminalMachine driven by hand, without asyncio: events in, effects out."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from node_support import make_config, usd, visa

from syncengine.core import protocol
from syncengine.core.errors import InvalidState, StorageError
from syncengine.core.ops import Op
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.core.policy.expiry import DeviceClass
from syncengine.node import machine as machine_module
from syncengine.node.machine import ActivateOffline as Activate
from syncengine.node.machine import (
    CommitFailed,
    Committed,
    ConnectAt,
    Connected,
    ConnectFailed,
    Effect,
    Notify,
    OfflinePrompt,
    PaymentDecided,
    Persist,
    Received,
    Send,
    TakePayment,
    TerminalMachine,
    Tick,
)

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000


class DurableLog:
    """A store a compacting machine reads its ops back from (its ``reader``)."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, int], Op] = {}
        self.failing = False  # reads fail as on a disk I/O error

    def write(self, persist: Persist) -> None:
        if persist.archive is not None:
            origin, start = persist.archive
            for key in [k for k in self.ops if k[0] == origin and k[1] >= start]:
                del self.ops[key]
        for op in persist.ops:
            self.ops[(op.origin, op.seq)] = op

    def read(self, origin: str, after_seq: int, end_seq: int) -> list[Op]:
        if self.failing:
            raise StorageError("storage failed while reading the log: disk I/O error")
        return [self.ops[(origin, seq)] for seq in range(after_seq + 1, end_seq + 1)]


def run(machine: TerminalMachine, effects: list[Effect], now_ms: int) -> list[Effect]:
    """Perform effects like a shell whose every write succeeds; return them all."""
    done: list[Effect] = []
    queue = list(effects)
    log = getattr(machine.replica.reader, "__self__", None)
    while queue:
        effect = queue.pop(0)
        done.append(effect)
        if isinstance(effect, Persist):
            if isinstance(log, DurableLog):
                log.write(effect)
            queue.extend(machine.handle(Committed(now_ms)))
    return done


def pay(machine: TerminalMachine, now_ms: int, pid: str, amount: str = "10.00") -> TakePayment:
    return TakePayment(
        now_ms, pid, usd(amount), visa(), EntryMethod.TAP, bytes([7]) * 32, bytes(12)
    )


def offline_machine(compacting: bool = False, **config: object) -> TerminalMachine:
    """An offline machine; ``compacting``: its stored ops leave memory at once (slack 0)
    and are read back from a :class:`DurableLog`."""
    reader = DurableLog().read if compacting else None
    machine = TerminalMachine(
        make_config(**config),  # type: ignore[arg-type]
        bytes(32),
        lambda n: n,
        T0,
        reader=reader,
        compact_slack_ops=0,
    )
    effects = run(machine, machine.handle(ConnectFailed(T0, "network", "refused")), T0)
    assert any(isinstance(e, Notify) and isinstance(e.notice, OfflinePrompt) for e in effects)
    run(machine, machine.handle(Activate(T0)), T0)
    assert machine.mode == "offline"
    return machine


def decided(effects: list[Effect]) -> PaymentDecided:
    return next(e for e in effects if isinstance(e, PaymentDecided))


def test_an_offline_payment_is_approved_only_after_its_commit() -> None:
    machine = offline_machine()
    effects = machine.handle(pay(machine, T0 + 1, "p1"))
    assert len(effects) == 1 and isinstance(effects[0], Persist)
    assert effects[0].ops[0].kind == "capture" and machine.payments == {}
    with pytest.raises(InvalidState):
        machine.handle(Tick(T0 + 2))  # nothing else until the write is answered
    after = machine.handle(Committed(T0 + 2))
    assert decided(after).result.outcome == "approved_offline"
    assert "p1" in machine.payments


def test_a_failed_commit_leaves_the_machine_as_it_was() -> None:
    machine = offline_machine()
    head = machine.replica.head("T1")
    machine.handle(pay(machine, T0 + 1, "p1"))
    after = machine.handle(CommitFailed(T0 + 2, "disk full"))
    assert decided(after).result.reason == "storage_failed"
    assert machine.replica.head("T1") == head and machine.payments == {}
    ok = run(machine, machine.handle(pay(machine, T0 + 3, "p2")), T0 + 3)
    assert decided(ok).result.outcome == "approved_offline"


def test_total_limit_counts_stored_payments() -> None:
    machine = offline_machine()
    run(machine, machine.handle(pay(machine, T0, "a", "5000.00")), T0)
    for i in range(9):
        run(machine, machine.handle(pay(machine, T0, f"b{i}", "5000.00")), T0)
    assert machine.status(T0).max_offline_amount == usd("0.00")
    refused = machine.handle(pay(machine, T0, "c", "0.01"))
    assert decided(refused).result.reason == "over_total_limit"


def test_reader_window_closes_after_one_hour_and_refuses() -> None:
    machine = offline_machine(device_class=DeviceClass.READER)
    first = decided(run(machine, machine.handle(pay(machine, T0 + 10, "p1")), T0 + 10))
    assert first.result.expires_at_ms == T0 + 24 * HOUR_MS  # from connectivity lost
    run(machine, machine.handle(Tick(T0 + HOUR_MS)), T0 + HOUR_MS)
    assert machine.mode == "window_closed"
    refused = machine.handle(pay(machine, T0 + HOUR_MS + 1, "p2"))
    assert decided(refused).result.reason == "offline_window_closed"


def test_backoff_is_exponential_capped_and_jittered() -> None:
    machine = TerminalMachine(make_config(), bytes(32), lambda n: n, T0)
    delays = []
    for _ in range(8):
        effects = run(machine, machine.handle(ConnectFailed(T0, "network")), T0)
        delays.append(next(e.at_ms for e in effects if isinstance(e, ConnectAt)) - T0)
    assert delays[:3] == [20, 40, 80]  # base 20 ms, full jitter of the upper half
    assert max(delays) == 100  # the cap


def test_handshake_and_push_carry_valid_signatures() -> None:
    from syncengine.core import crypto

    key = bytes(range(32))
    machine = TerminalMachine(make_config(), key, lambda n: 0, T0)
    hello = machine.handle(Connected(T0))
    assert isinstance(hello[-1], Send) and isinstance(hello[-1].message, protocol.Hello)
    nonce = bytes(32)
    auth = machine.handle(Received(T0, protocol.Challenge(crypto.b64e(nonce), T0)))
    message = auth[0].message  # type: ignore[union-attr]
    assert isinstance(message, protocol.Auth)
    public = crypto.ed25519_public_from_private(key)
    crypto.verify(public, crypto.challenge_message(nonce, "T1"), crypto.b64d(message.signature))
    welcome = run(machine, machine.handle(Received(T0, protocol.Welcome({}, T0))), T0)
    pulls = [e for e in welcome if isinstance(e, Send) and isinstance(e.message, protocol.Pull)]
    assert pulls and machine.link == "connected"
    online = run(machine, machine.handle(pay(machine, T0, "p1")), T0)
    push = next(
        e.message for e in online if isinstance(e, Send) and isinstance(e.message, protocol.Push)
    )
    last = push.ops[-1]
    crypto.verify(
        public,
        crypto.chain_head_message("T1", last.seq, last.digest),
        crypto.b64d(push.head_signature),
    )
    assert machine.unsynced_ops() == 1
    run(machine, machine.handle(Received(T0, protocol.Ack("T1", last.seq))), T0)
    assert machine.unsynced_ops() == 0


def test_restore_rebuilds_payments_and_mode_from_what_was_persisted() -> None:
    machine = TerminalMachine(make_config(), bytes(32), lambda n: 0, T0)
    persisted: list[Persist] = []

    def drive(effects: list[Effect], now_ms: int) -> list[Effect]:
        done = run(machine, effects, now_ms)
        persisted.extend(e for e in done if isinstance(e, Persist))
        return done

    drive(machine.handle(ConnectFailed(T0, "network")), T0)
    drive(machine.handle(Activate(T0 + 5)), T0 + 5)
    paid = decided(drive(machine.handle(pay(machine, T0 + 9, "p1")), T0 + 9))
    ops = [op for p in persisted for op in p.ops]
    snapshot = str([p.meta for p in persisted if "offline_mode" in p.meta][-1]["offline_mode"])
    restored = TerminalMachine.restore(
        make_config(), bytes(32), lambda n: 0, T0 + HOUR_MS, ops, 0, snapshot
    )
    assert restored.mode == "offline"
    assert list(restored.payments) == ["p1"]
    assert restored.window_closes_at_ms() == machine.window_closes_at_ms() == T0 + 24 * HOUR_MS
    again = decided(run(restored, restored.handle(pay(restored, T0 + HOUR_MS, "p2")), T0))
    assert again.result.expires_at_ms == paid.result.expires_at_ms  # same first payment


def connected_machine(**config: Any) -> TerminalMachine:
    from syncengine.core import crypto

    machine = TerminalMachine(make_config(**config), bytes(range(32)), lambda n: 0, T0)
    machine.handle(Connected(T0))
    machine.handle(Received(T0, protocol.Challenge(crypto.b64e(bytes(32)), T0)))
    run(machine, machine.handle(Received(T0, protocol.Welcome({}, T0))), T0)
    assert machine.link == "connected"
    return machine


def test_an_unacknowledged_push_resets_the_link_and_is_sent_again() -> None:
    from syncengine.node.machine import PUSH_ACK_TIMEOUT_MS_DEFAULT, CloseLink

    machine = connected_machine()
    sent = run(machine, machine.handle(pay(machine, T0, "p1")), T0)
    assert any(isinstance(e, Send) and isinstance(e.message, protocol.Push) for e in sent)
    # The push frame is lost: pongs keep the link alive, but the ack never comes.
    later = T0 + PUSH_ACK_TIMEOUT_MS_DEFAULT - 1
    machine.handle(Received(later, protocol.Pong(1)))
    assert not any(
        isinstance(e, CloseLink) for e in run(machine, machine.handle(Tick(later)), later)
    )
    due = T0 + PUSH_ACK_TIMEOUT_MS_DEFAULT
    effects = run(machine, machine.handle(Tick(due)), due)
    assert any(isinstance(e, CloseLink) for e in effects)
    assert machine.link != "connected"
    # The next session pushes the op again from what the server says it has.
    from syncengine.core import crypto

    machine.handle(Connected(due + 1))
    machine.handle(Received(due + 1, protocol.Challenge(crypto.b64e(bytes(32)), due)))
    again = run(machine, machine.handle(Received(due + 1, protocol.Welcome({}, due))), due + 1)
    pushes = [
        e.message for e in again if isinstance(e, Send) and isinstance(e.message, protocol.Push)
    ]
    assert pushes and pushes[0].ops[0].seq == 1


def test_server_ops_above_a_gap_ask_for_the_gap_instead_of_failing() -> None:
    from syncengine.core.hlc import Hlc
    from syncengine.core.ops import make_next

    machine = connected_machine()
    first = make_next(None, "server/T1", Hlc(T0), "setting", {"key": "x", "value": 1})
    second = make_next(first, "server/T1", Hlc(T0 + 1), "setting", {"key": "y", "value": 2})
    effects = machine.handle(Received(T0, protocol.ServerOps((second,), "", False)))
    pulls = [
        e.message for e in effects if isinstance(e, Send) and isinstance(e.message, protocol.Pull)
    ]
    assert pulls == [protocol.Pull({"server/T1": 0})]
    assert machine.link == "connected" and machine.replica.head("server/T1")[0] == 0


def test_pushes_are_pipelined_up_to_the_in_flight_bound() -> None:
    machine = offline_machine(push_batch_ops_max=2, pushes_in_flight_max=2)
    for i in range(7):  # 7 captures plus the mode-change ops recorded going offline
        run(machine, machine.handle(pay(machine, T0 + i, f"p{i}")), T0 + i)
    from syncengine.core import crypto

    machine.handle(Connected(T0 + 10))
    machine.handle(Received(T0 + 10, protocol.Challenge(crypto.b64e(bytes(32)), T0)))
    effects = run(machine, machine.handle(Received(T0 + 10, protocol.Welcome({}, T0))), T0 + 10)
    pushes = [
        e.message for e in effects if isinstance(e, Send) and isinstance(e.message, protocol.Push)
    ]
    assert [[op.seq for op in p.ops] for p in pushes] == [[1, 2], [3, 4]]
    head = machine.replica.head("T1")[0]  # reconnecting recorded a mode change too
    assert head > 4
    sent = 4
    while sent < head:  # each ack frees one slot for the next batch
        oldest_in_flight = sent - 2  # ack the older of the two pushes in flight
        ack = protocol.Ack("T1", oldest_in_flight)
        effects = run(machine, machine.handle(Received(T0 + 11, ack)), T0 + 11)
        more = [
            e.message
            for e in effects
            if isinstance(e, Send) and isinstance(e.message, protocol.Push)
        ]
        assert len(more) == 1 and more[0].ops[0].seq == sent + 1
        sent = more[0].ops[-1].seq
    assert sent == head


def test_unacked_payments_counts_captures_above_the_acked_seq() -> None:
    """The O(log n) count agrees with counting every view, for any acked position."""
    machine = offline_machine()
    for i in range(12):
        run(machine, machine.handle(pay(machine, T0 + 1 + i, f"p{i}")), T0 + 1 + i)
    seqs = sorted(v.seq for v in machine.payments.values())
    assert len(seqs) == 12
    for acked in [0, *seqs, seqs[-1] + 5, seqs[3] - 1, 0]:
        machine.acked_seq = acked
        brute = sum(1 for v in machine.payments.values() if v.seq > acked)
        assert machine.unacked_payments() == brute


def test_a_push_frame_stays_under_the_frame_limit_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ops larger than the frame limit allows 500 of, a push is cut by bytes too."""
    from syncengine.core import crypto

    frame_max = 12_000  # a capture op is ~1 KB here: ~10 ops per frame, not 500
    monkeypatch.setattr(protocol, "FRAME_BYTES_MAX_DEFAULT", frame_max)
    limits = protocol.Limits(frame_bytes_max=frame_max)
    machine = offline_machine(pushes_in_flight_max=64)
    for i in range(60):
        run(machine, machine.handle(pay(machine, T0 + i, f"p{i}")), T0 + i)
    machine.handle(Connected(T0 + 100))
    machine.handle(Received(T0 + 100, protocol.Challenge(crypto.b64e(bytes(32)), T0)))
    effects = run(machine, machine.handle(Received(T0 + 100, protocol.Welcome({}, T0))), T0)
    pushes = [
        e.message for e in effects if isinstance(e, Send) and isinstance(e.message, protocol.Push)
    ]
    assert len(pushes) > 5
    seqs = [op.seq for p in pushes for op in p.ops]
    assert seqs == list(range(1, machine.replica.head("T1")[0] + 1))  # all, in order
    for push in pushes:
        assert len(protocol.encode(push, limits)) <= frame_max  # encode checks the limit
        assert 1 <= len(push.ops) < 500


def test_only_the_ack_marker_skips_the_fsync_and_a_lost_one_comes_back_in_welcome() -> None:
    from syncengine.core import crypto

    machine = TerminalMachine(make_config(), bytes(32), lambda n: 0, T0)
    persisted: list[Persist] = []
    for event in (ConnectFailed(T0, "network"), Activate(T0), pay(machine, T0 + 1, "p1")):
        persisted += [e for e in run(machine, machine.handle(event), T0) if isinstance(e, Persist)]
    assert persisted and all(p.durable for p in persisted)
    run(machine, machine.handle(Connected(T0 + 2)), T0 + 2)
    run(
        machine,
        machine.handle(Received(T0 + 2, protocol.Challenge(crypto.b64e(bytes(32)), T0))),
        T0,
    )
    done = run(machine, machine.handle(Received(T0 + 3, protocol.Welcome({"T1": 0}, T0 + 3))), T0)
    persisted += [e for e in done if isinstance(e, Persist)]
    pushes = [
        e.message for e in done if isinstance(e, Send) and isinstance(e.message, protocol.Push)
    ]
    head = pushes[-1].ops[-1].seq
    acked = run(machine, machine.handle(Received(T0 + 4, protocol.Ack("T1", head))), T0 + 4)
    marker = [e for e in acked if isinstance(e, Persist)]
    assert [(p.ops, p.meta, p.durable) for p in marker] == [((), {"acked_seq": head}, False)]
    assert all(p.durable for p in persisted)  # every op, mode snapshot and capture is fsynced
    assert machine.unacked_payments() == 0
    # A power cut took the marker back: the restored terminal counts p1 as unacknowledged
    # (the cautious side) until the server's vector in the next Welcome says otherwise,
    # and pushes nothing the server already holds.
    ops = [op for p in persisted for op in p.ops]
    snapshot = str([p.meta for p in persisted if "offline_mode" in p.meta][-1]["offline_mode"])
    restored = TerminalMachine.restore(
        make_config(), bytes(32), lambda n: 0, T0 + 5, ops, 0, snapshot
    )
    assert restored.unacked_payments() == 1
    run(restored, restored.handle(Connected(T0 + 6)), T0 + 6)
    run(
        restored,
        restored.handle(Received(T0 + 6, protocol.Challenge(crypto.b64e(bytes(32)), T0))),
        T0,
    )
    again = run(
        restored, restored.handle(Received(T0 + 7, protocol.Welcome({"T1": head}, T0 + 7))), T0
    )
    assert restored.unacked_payments() == 0
    assert not any(isinstance(e, Send) and isinstance(e.message, protocol.Push) for e in again)


def _reconnect(machine: TerminalMachine, now_ms: int, server_has: int) -> list[Effect]:
    from syncengine.core import crypto

    run(machine, machine.handle(Connected(now_ms)), now_ms)
    challenge = protocol.Challenge(crypto.b64e(bytes(32)), now_ms)
    run(machine, machine.handle(Received(now_ms, challenge)), now_ms)
    welcome = protocol.Welcome({"T1": server_has} if server_has else {}, now_ms)
    return run(machine, machine.handle(Received(now_ms, welcome)), now_ms)


def _pushed(effects: list[Effect]) -> list[int]:
    return [
        op.seq
        for e in effects
        if isinstance(e, Send) and isinstance(e.message, protocol.Push)
        for op in e.message.ops
    ]


def _paid_and_pushed(payments: int, compacting: bool = False) -> tuple[TerminalMachine, int]:
    """An offline machine with ``payments`` captures, reconnected: every op pushed once
    from seq 1 (the server had nothing). Returns it with its head."""
    machine = offline_machine(compacting)
    for i in range(payments):
        run(machine, machine.handle(pay(machine, T0 + 1 + i, f"p{i}")), T0 + 1 + i)
    first = _reconnect(machine, T0 + 10, 0)
    head = machine.replica.head("T1")[0]
    assert _pushed(first) == list(range(1, head + 1))
    return machine, head


@pytest.mark.parametrize("compacting", [False, True], ids=["in-memory", "compacted"])
def test_a_server_that_lost_acknowledged_ops_gets_them_again(compacting: bool) -> None:
    """Restored from a backup, the server's Welcome says it holds less than it acked: the
    terminal (which deletes nothing) sends the rest again from there, counts those payments
    as unacknowledged until they are acked again, writes the lower marker durably and
    tells the POS; nothing is pushed twice within the session. Ops that left memory once
    acknowledged (``compacting``) are read back from the store and sent alike."""
    from syncengine.node.machine import Disconnected, ForwardingFailed

    machine, head = _paid_and_pushed(6, compacting)
    run(machine, machine.handle(Received(T0 + 11, protocol.Ack("T1", head))), T0 + 11)
    assert machine.acked_seq == head and machine.unacked_payments() == 0
    assert machine.replica.in_memory("T1") == (1 if compacting else head)
    run(machine, machine.handle(Disconnected(T0 + 12, "network")), T0 + 12)

    kept = 3  # the backup held the first three ops of this terminal
    captures_above = sum(1 for v in machine.payments.values() if v.seq > kept)
    assert captures_above > 0
    again = _reconnect(machine, T0 + 20, kept)
    head = machine.replica.head("T1")[0]  # reconnecting may record a mode change
    assert _pushed(again) == list(range(kept + 1, head + 1))
    assert machine.acked_seq == kept
    assert machine.unacked_payments() == captures_above
    lowered = [e for e in again if isinstance(e, Persist) and "acked_seq" in e.meta]
    assert [(p.meta["acked_seq"], p.durable) for p in lowered] == [(kept, True)]
    notices = [e.notice for e in again if isinstance(e, Notify)]
    assert any(isinstance(n, ForwardingFailed) and n.code == "server_behind" for n in notices)
    acked = run(machine, machine.handle(Received(T0 + 21, protocol.Ack("T1", head))), T0 + 21)
    assert machine.acked_seq == head and machine.unacked_payments() == 0
    assert not _pushed(acked)


def test_a_push_whose_ops_cannot_be_read_back_is_tried_again_on_the_next_tick() -> None:
    """Ops that left memory and cannot be read back (a disk error) hold the push back, not
    the session: the POS hears of it once; the next tick tries again."""
    from syncengine.node.machine import Disconnected, ForwardingFailed, Tick

    machine, head = _paid_and_pushed(6, compacting=True)
    run(machine, machine.handle(Received(T0 + 11, protocol.Ack("T1", head))), T0 + 11)
    run(machine, machine.handle(Disconnected(T0 + 12, "network")), T0 + 12)
    log = getattr(machine.replica.reader, "__self__", None)
    assert isinstance(log, DurableLog)
    log.failing = True
    kept = 3
    effects = _reconnect(machine, T0 + 20, kept)
    effects += run(machine, machine.handle(Tick(T0 + 21)), T0 + 21)
    assert not _pushed(effects) and machine.link == "connected"
    failed = [
        e.notice
        for e in effects
        if isinstance(e, Notify) and isinstance(e.notice, ForwardingFailed)
    ]
    assert [n.code for n in failed if n.code == "storage_failed"] == ["storage_failed"]
    assert "disk I/O error" in failed[-1].message
    log.failing = False
    retried = run(machine, machine.handle(Tick(T0 + 22)), T0 + 22)
    assert _pushed(retried) == list(range(kept + 1, machine.replica.head("T1")[0] + 1))


def test_a_welcome_at_or_above_the_acked_seq_never_lowers_it() -> None:
    machine, head = _paid_and_pushed(3)
    run(machine, machine.handle(Received(T0 + 11, protocol.Ack("T1", head))), T0 + 11)
    from syncengine.node.machine import Disconnected

    run(machine, machine.handle(Disconnected(T0 + 12, "network")), T0 + 12)
    effects = _reconnect(machine, T0 + 20, head)
    assert machine.acked_seq == head
    assert not any(isinstance(e, Persist) and "acked_seq" in e.meta for e in effects)
    assert _pushed(effects) == list(range(head + 1, machine.replica.head("T1")[0] + 1))


def test_a_chain_gap_below_the_acked_seq_resets_the_link_instead_of_looping() -> None:
    """The server's database lost acked ops while the session lived (a failover to a copy
    that lagged): it answers the next push with chain_gap and an Ack of what it holds. The
    terminal does not push above its marker again (that would loop); it resets the link,
    and the next Welcome's vector makes it send the lost ops."""
    from syncengine.node.machine import CloseLink

    machine, head = _paid_and_pushed(4)
    run(machine, machine.handle(Received(T0 + 11, protocol.Ack("T1", head))), T0 + 11)
    sent = run(machine, machine.handle(pay(machine, T0 + 12, "p9")), T0 + 12)
    assert _pushed(sent) == [head + 1]

    kept = 2
    gap = protocol.Error("chain_gap", f"resend from #{kept + 1}", False)
    run(machine, machine.handle(Received(T0 + 13, gap)), T0 + 13)
    effects = run(machine, machine.handle(Received(T0 + 13, protocol.Ack("T1", kept))), T0 + 13)
    assert any(isinstance(e, CloseLink) for e in effects)
    assert not _pushed(effects) and machine.link != "connected"
    again = _reconnect(machine, T0 + 20, kept)
    assert _pushed(again) == list(range(kept + 1, machine.replica.head("T1")[0] + 1))


def test_a_chain_gap_at_or_above_the_acked_seq_pushes_from_the_servers_head() -> None:
    """A gap the server can fill from what it holds (e.g. a push that overtook another)
    keeps the session: the terminal pushes again above its marker."""
    machine, head = _paid_and_pushed(3)
    gap = protocol.Error("chain_gap", "resend from #1", False)
    run(machine, machine.handle(Received(T0 + 11, gap)), T0 + 11)
    effects = run(machine, machine.handle(Received(T0 + 11, protocol.Ack("T1", 0))), T0 + 11)
    assert machine.link == "connected"
    assert _pushed(effects) == list(range(1, head + 1))


def test_a_welcome_below_our_copy_of_the_server_stream_is_reported() -> None:
    from node_support import SERVER_KEY

    from syncengine.core import crypto
    from syncengine.core.hlc import Hlc
    from syncengine.core.ops import make_next
    from syncengine.node.machine import Disconnected, ForwardingFailed

    machine = connected_machine()
    first = make_next(None, "server/T1", Hlc(T0), "setting", {"key": "x", "value": 1})
    second = make_next(first, "server/T1", Hlc(T0 + 1), "setting", {"key": "y", "value": 2})
    head = crypto.chain_head_message("server/T1", second.seq, second.digest)
    signed = crypto.b64e(crypto.sign(SERVER_KEY.private, head))
    run(
        machine,
        machine.handle(Received(T0, protocol.ServerOps((first, second), signed, False))),
        T0,
    )
    assert machine.replica.head("server/T1")[0] == 2
    for server_stream, reported in ((2, False), (1, True)):
        run(machine, machine.handle(Disconnected(T0 + 1, "network")), T0 + 1)
        effects = _reconnect(machine, T0 + 2, 0)  # _reconnect's Welcome has no server/T1
        assert not any(
            isinstance(e, Notify) and isinstance(e.notice, ForwardingFailed) for e in effects
        )
        run(machine, machine.handle(Disconnected(T0 + 3, "network")), T0 + 3)
        run(machine, machine.handle(Connected(T0 + 4)), T0 + 4)
        challenge = protocol.Challenge(crypto.b64e(bytes(32)), T0 + 4)
        run(machine, machine.handle(Received(T0 + 4, challenge)), T0 + 4)
        welcome = protocol.Welcome({"server/T1": server_stream}, T0 + 4)
        effects = run(machine, machine.handle(Received(T0 + 4, welcome)), T0 + 4)
        codes = [
            e.notice.code
            for e in effects
            if isinstance(e, Notify) and isinstance(e.notice, ForwardingFailed)
        ]
        assert codes == (["server_stream_behind"] if reported else [])


def test_a_terminal_at_its_payment_bound_refuses_before_storing_and_still_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past the bound, a stored capture failed the bound's check on every later open: the
    # terminal could never start again. Now the payment is refused before it is stored.
    monkeypatch.setattr(machine_module, "PAYMENTS_MAX", 3)
    machine = TerminalMachine(make_config(), bytes(32), lambda n: 0, T0)
    persisted: list[Any] = []

    def drive(effects: list[Effect], now_ms: int) -> list[Effect]:
        done = run(machine, effects, now_ms)
        persisted.extend(op for e in done if isinstance(e, Persist) for op in e.ops)
        return done

    drive(machine.handle(ConnectFailed(T0, "network")), T0)
    drive(machine.handle(Activate(T0)), T0)
    for i in range(3):
        effects = drive(machine.handle(pay(machine, T0 + i, f"p{i}")), T0 + i)
        assert decided(effects).result.outcome == "approved_offline"
    effects = machine.handle(pay(machine, T0 + 5, "p3"))
    assert not any(isinstance(e, Persist) for e in effects)
    assert decided(effects).result.reason == "terminal_full"
    assert "3 payments, the most it can" in decided(effects).result.message
    restored = TerminalMachine.restore(
        make_config(), bytes(32), lambda n: n, T0 + 6, persisted, 0, ""
    )
    assert sorted(restored.payments) == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    "email", ["ann@example.com,eve@example.net", "ann@example.com;x", "ann", "a b@example.com"]
)
def test_a_receipt_address_that_is_not_one_address_is_refused_before_storing(
    email: str,
) -> None:
    machine = offline_machine()
    event = pay(machine, T0 + 1, "p1")
    effects = machine.handle(dataclasses.replace(event, email=email))
    assert not any(isinstance(e, Persist) for e in effects)
    assert decided(effects).result.reason == "invalid_email"
    ok = machine.handle(dataclasses.replace(event, email="ann@example.com"))
    assert any(isinstance(e, Persist) for e in ok)
