"""A server stream the server lost and wrote again (a restore from a backup).

The terminal holds ``server/T1`` up to ``M``; the restored server holds the same first
``c`` ops and then its own new ones. On the next session the terminal must find ``c``
(verifying pulls, further down each time), move its ops above ``c`` to the archive (views
keep them: statuses never move backwards, a refund counts once), take the server's stream
from there, and read all of it back the same way after a reopen.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from node_support import SERVER_KEY, make_config, usd, visa

from syncengine.core import crypto, protocol
from syncengine.core.bodies import RefundRecord, StatusChange
from syncengine.core.errors import ChainError, StorageError
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.ops import Op, make_next
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import ActivateOffline as Activate
from syncengine.node.machine import (
    Committed,
    Connected,
    ConnectFailed,
    Disconnected,
    Effect,
    ForwardingFailed,
    Notify,
    Persist,
    Received,
    Send,
    TakePayment,
    TerminalMachine,
)
from syncengine.node.store import Store

T0 = 1_700_000_000_000
ORIGIN = "server/T1"
PAYMENTS = ("p0", "p1", "p2")
REFUNDS = {"r1": 100, "r2": 250}  # a refund id always names the same refund
KEY = bytes(range(32))

Body = tuple[str, dict[str, Any]]


class Stream:
    """The server's ``server/T1``: answers a Pull as the server does, in signed batches."""

    def __init__(self, ops: list[Op], batch: int) -> None:
        self.ops = ops
        self.batch = batch
        self.pulls: list[int] = []

    def answer(self, after: int) -> protocol.ServerOps:
        self.pulls.append(after)
        chunk = tuple(self.ops[after : after + self.batch])
        signature = ""
        if chunk:
            last = chunk[-1]
            message = crypto.chain_head_message(ORIGIN, last.seq, last.digest)
            signature = crypto.b64e(crypto.sign(SERVER_KEY.private, message))
        return protocol.ServerOps(chunk, signature, after + len(chunk) < len(self.ops))


def build(bodies: list[Body], wall0: int, base: list[Op]) -> list[Op]:
    ops = list(base)
    for i, (kind, body) in enumerate(bodies):
        ops.append(make_next(ops[-1] if ops else None, ORIGIN, Hlc(wall0 + i), kind, body))
    return ops


class Shell:
    """Performs effects like the SDK: Persist into a real SQLite store, then Committed."""

    def __init__(self, machine: TerminalMachine, store: Store) -> None:
        self.machine = machine
        self.store = store
        self.notices: list[Any] = []
        self.log: list[str] = []  # "answer", "archive", "push": in the order they happened
        self.pushes: list[protocol.Push] = []

    def feed(self, effects: list[Effect], now_ms: int = T0) -> list[Effect]:
        done: list[Effect] = []
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            done.append(effect)
            if isinstance(effect, Persist):
                self.store.write(effect.ops, effect.meta, effect.durable, effect.archive)
                if effect.archive is not None:
                    self.log.append("archive")
                queue.extend(self.machine.handle(Committed(now_ms)))
            elif isinstance(effect, Send) and isinstance(effect.message, protocol.Push):
                self.log.append("push")
                self.pushes.append(effect.message)
            elif isinstance(effect, Notify):
                self.notices.append(effect.notice)
        return done

    def session(
        self, stream: Stream, answer: Callable[[int], protocol.Message] | None = None
    ) -> None:
        """Connect, be welcomed by a server holding ``stream``, answer every Pull."""
        machine = self.machine
        self.feed(machine.handle(Connected(T0)))
        self.feed(machine.handle(Received(T0, protocol.Challenge(crypto.b64e(bytes(32)), T0))))
        vector = {"T1": machine.replica.head("T1")[0], ORIGIN: len(stream.ops)}
        effects = self.feed(machine.handle(Received(T0, protocol.Welcome(vector, T0))))
        for _ in range(200):
            pulls = [
                e.message.vector[ORIGIN]
                for e in effects
                if isinstance(e, Send) and isinstance(e.message, protocol.Pull)
            ]
            if not pulls:
                return
            reply = (answer or stream.answer)(pulls[-1])
            self.log.append("answer")
            effects = self.feed(machine.handle(Received(T0, reply)))
        raise AssertionError("the terminal kept pulling")

    def disconnect(self) -> None:
        self.feed(self.machine.handle(Disconnected(T0, "network", "test")))


def offline_terminal(path: Path, compacting: bool = False) -> Shell:
    """A terminal that took one offline payment per id of PAYMENTS; ``compacting``: its
    stored ops leave memory at once and are read back from the store (slack 0)."""
    store = Store(path)
    reader = store.read_ops if compacting else None
    machine = TerminalMachine(make_config(), KEY, lambda n: 0, T0, reader, compact_slack_ops=0)
    shell = Shell(machine, store)
    shell.feed(machine.handle(ConnectFailed(T0, "network", "refused")))
    shell.feed(machine.handle(Activate(T0)))
    for i, pid in enumerate(PAYMENTS):
        shell.feed(
            machine.handle(
                TakePayment(
                    T0 + i, pid, usd("10.00"), visa(), EntryMethod.TAP, bytes([7]) * 32, bytes(12)
                )
            )
        )
    assert set(machine.payments) == set(PAYMENTS)
    return shell


def reopened(shell: Shell) -> TerminalMachine:
    store = shell.store
    compacting = shell.machine.replica.reader is not None
    return TerminalMachine.restore(
        make_config(),
        KEY,
        lambda n: 0,
        T0,
        store.iter_log("T1") if compacting else store.load_ops(),
        shell.machine.acked_seq,
        archived=store.load_archived_ops(),
        reader=store.read_ops if compacting else None,
        compact_slack_ops=0,
    )


def views(machine: TerminalMachine) -> dict[str, Any]:
    """What a rewrite must not change: settings, statuses, refunded amounts."""
    return {
        "settings": {k: v for k, (_, v) in machine.settings.items()},
        "status": {p: v.status for p, v in machine.payments.items()},
        "refunded": {p: v.refunded_minor for p, v in machine.payments.items()},
    }


def expected(ops: list[Op]) -> dict[str, Any]:
    """The views of a union of server ops, computed directly (LWW, join, set of refunds)."""
    latest: dict[str, tuple[Hlc, Any]] = {}
    status = dict.fromkeys(PAYMENTS, Status.CAPTURED)
    refunds: dict[str, set[str]] = {p: set() for p in PAYMENTS}
    for op in ops:
        if op.kind == "setting":
            key = op.body["key"]
            if key not in latest or latest[key][0] < op.hlc:
                latest[key] = (op.hlc, op.body["value"])
        elif op.kind == "status":
            status[op.body["payment_id"]] = Status(op.body["status"])
        elif op.kind == "refund":
            refunds[op.body["payment_id"]].add(op.body["refund_id"])
    return {
        "settings": {k: v for k, (_, v) in latest.items()},
        "status": status,
        "refunded": {p: sum(REFUNDS[r] for r in ids) for p, ids in refunds.items()},
    }


def _setting(key: str, value: int) -> Body:
    return "setting", {"key": key, "value": value}


def _approved(pid: str) -> Body:
    return "status", StatusChange(pid, Status.APPROVED, T0, "approved").to_body()


def _refund(pid: str, rid: str) -> Body:
    return "refund", RefundRecord(pid, rid, usd(f"{REFUNDS[rid] / 100:.2f}"), T0).to_body()


bodies = st.one_of(
    st.builds(_setting, st.sampled_from(["a", "b", "c"]), st.integers(0, 9)),
    st.builds(_approved, st.sampled_from(PAYMENTS)),
    st.builds(_refund, st.sampled_from(PAYMENTS), st.sampled_from(sorted(REFUNDS))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The server holds as many ops as we do, but not the same last ones.
@example(
    old=[_setting("a", 1)] * 3, common=1, new=[_setting("a", 2)] * 2, batch=1, compacting=False
)
@example(old=[_setting("a", 1)] * 3, common=1, new=[_setting("a", 2)] * 2, batch=1, compacting=True)
@given(
    old=st.lists(bodies, min_size=1, max_size=30),
    common=st.integers(0, 30),
    new=st.lists(bodies, max_size=30),
    batch=st.integers(1, 8),
    compacting=st.booleans(),
)
def test_a_rewritten_stream_is_taken_from_where_it_parts_and_loses_nothing(
    old: list[Body], common: int, new: list[Body], batch: int, compacting: bool
) -> None:
    """Also with ops that left memory as soon as stored (``compacting``): our copy of the
    stream is then read back from the store to find where they part."""
    common = min(common, len(old))
    with tempfile.TemporaryDirectory() as tmp:
        shell = offline_terminal(Path(tmp) / "t.db", compacting)
        held = build(old, T0 + 1_000, [])
        shell.session(Stream(held, batch))
        assert [op.digest for op in shell.machine.replica.ops() if op.origin == ORIGIN] == [
            op.digest for op in held
        ]
        shell.disconnect()

        # The restored server kept `common` ops and wrote `new` ones after them (later).
        rewritten = build(new, T0 + 100_000, held[:common])
        stream = Stream(rewritten, batch)
        shell.log.clear()
        shell.session(stream)
        # Nothing is pushed before our copy was checked (the first answer at least), and
        # after a rewrite not before the archive is written: a push merged after a restore
        # tells the server we dropped what it forgot (the budget's restore hold).
        log = shell.log
        assert "push" in log and log.index("push") > log.index("answer")
        if common < len(held):
            assert log.index("push") > log.index("archive")

        machine = shell.machine
        mine = [op.digest for op in machine.replica.ops() if op.origin == ORIGIN]
        assert mine == [op.digest for op in rewritten]
        assert machine.archived_ops == len(held) - common
        union = held + rewritten[common:]
        assert views(machine) == expected(union)
        codes = {n.code for n in shell.notices if isinstance(n, ForwardingFailed)}
        assert ("server_stream_rewritten" in codes) == (common < len(held))
        # Verifying pulls go down by doubling steps: a handful, not one per op.
        assert (
            len(stream.pulls) <= 2 * (len(rewritten) // batch + 1) + 2 * len(held).bit_length() + 4
        )

        if compacting:  # only the head of each stream stays in memory
            assert machine.replica.in_memory(ORIGIN) <= 1
        again = reopened(shell)
        assert again.archived_ops == machine.archived_ops
        assert views(again) == views(machine)
        assert again.replica.state_key() == machine.replica.state_key()
        shell.store.close()


def test_a_stream_that_cannot_be_read_back_ends_the_session_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Our copy of the server's stream left memory; reading it back to compare it with a
    rewritten one fails (a disk error): the session ends with ``storage_failed``, nothing
    is archived or changed, and the next session takes the rewrite as usual."""
    shell = offline_terminal(tmp_path / "t.db", compacting=True)
    held = build([_setting("a", i) for i in range(6)], T0 + 1_000, [])
    shell.session(Stream(held, 2))
    shell.disconnect()
    machine = shell.machine
    reader = machine.replica.reader

    def broken(origin: str, after_seq: int, end_seq: int) -> list[Op]:
        raise StorageError("storage failed while reading the log: disk I/O error")

    machine.replica.reader = broken
    rewritten = build([_setting("a", 9)] * 3, T0 + 100_000, held[:2])
    before = views(machine)
    shell.session(Stream(rewritten, 2))
    codes = [n.code for n in shell.notices if isinstance(n, ForwardingFailed)]
    assert "storage_failed" in codes and machine.link != "connected"
    assert views(machine) == before and machine.archived_ops == 0
    assert [op.digest for op in shell.store.read_ops(ORIGIN, 0, 99)] == [op.digest for op in held]
    shell.disconnect()
    machine.replica.reader = reader
    shell.session(Stream(rewritten, 2))
    assert [op.digest for op in machine.replica.ops_of(ORIGIN)] == [op.digest for op in rewritten]
    assert machine.archived_ops == len(held) - 2
    assert views(machine) == expected(held + rewritten[2:])
    shell.store.close()


def test_a_conflicting_final_status_keeps_the_first_and_says_so(tmp_path: Path) -> None:
    shell = offline_terminal(tmp_path / "t.db")
    held = build([_setting("a", 1), _approved("p0")], T0 + 1_000, [])
    shell.session(Stream(held, 10))
    shell.disconnect()
    expired = StatusChange("p0", Status.EXPIRED, T0, "expired").to_body()
    rewritten = build([_setting("a", 2), ("status", expired)], T0 + 100_000, held[:1])
    shell.session(Stream(rewritten, 10))
    assert shell.machine.payments["p0"].status is Status.APPROVED
    assert shell.machine.setting("a", None) == 2
    conflicts = [n for n in shell.notices if getattr(n, "code", "") == "status_conflict"]
    assert len(conflicts) == 1 and "p0" in conflicts[0].message
    again = reopened(shell)  # the archive is folded in first: the same outcome after a reopen
    assert again.payments["p0"].status is Status.APPROVED


def test_a_rewrite_without_the_servers_signature_changes_nothing(tmp_path: Path) -> None:
    shell = offline_terminal(tmp_path / "t.db")
    held = build([_setting("a", 1), _approved("p0")], T0 + 1_000, [])
    shell.session(Stream(held, 10))
    shell.disconnect()
    forged = build([_setting("a", 9), _setting("a", 8)], T0 + 100_000, held[:1])
    stream = Stream(forged, 10)

    def unsigned(after: int) -> protocol.Message:
        real = stream.answer(after)
        return protocol.ServerOps(real.ops, crypto.b64e(bytes(64)), real.more)

    with pytest.raises(ChainError, match="signature does not verify"):
        shell.session(stream, unsigned)
    assert shell.machine.archived_ops == 0 and shell.store.load_archived_ops() == []
    assert [op.digest for op in shell.store.load_ops() if op.origin == ORIGIN] == [
        op.digest for op in held
    ]
    assert shell.machine.setting("a", None) == 1


def test_a_push_while_verifying_is_asked_for_again_at_the_end(tmp_path: Path) -> None:
    shell = offline_terminal(tmp_path / "t.db")
    held = build([_setting("a", i) for i in range(6)], T0 + 1_000, [])
    shell.session(Stream(held, 10))
    shell.disconnect()
    rewritten = build([_setting("b", i) for i in range(8)], T0 + 100_000, held[:2])
    # The answers come from the stream without its newest op, which is pushed meanwhile.
    stream = Stream(rewritten[:-1], 10)
    full = Stream(rewritten, 10)

    def with_a_push(after: int) -> protocol.Message:
        if len(stream.pulls) == 1:  # the first answer showed the streams part: verifying
            assert shell.machine._probe is not None
            left = shell.feed(shell.machine.handle(Received(T0, full.answer(len(rewritten) - 1))))
            assert left == []  # not the answer to the verifying pull: left alone
        elif len(stream.pulls) > 2:
            stream.ops = rewritten  # written by now
        return stream.answer(after)

    shell.session(stream, with_a_push)
    mine = [op.digest for op in shell.machine.replica.ops() if op.origin == ORIGIN]
    assert mine == [op.digest for op in rewritten]
    assert shell.machine.archived_ops == 4


def test_budget_rights_the_server_lost_no_longer_count(tmp_path: Path) -> None:
    """A grant the restored server forgot may have been granted again to another terminal:
    only the grants of the server's current stream count (the merchant-wide budget)."""

    def grant(amount: str) -> Body:
        return "grant", {"total": usd(amount).to_wire(), "at_ms": T0}

    shell = offline_terminal(tmp_path / "t.db")
    held = build([grant("50.00"), grant("200.00"), _approved("p0")], T0 + 1_000, [])
    shell.session(Stream(held, 10))
    assert shell.machine.grant_total == usd("200.00")
    shell.disconnect()
    rewritten = build([grant("80.00"), _setting("a", 1)], T0 + 100_000, held[:1])
    shell.session(Stream(rewritten, 10))
    machine = shell.machine
    assert machine.archived_ops == 2
    assert machine.grant_total == usd("80.00")
    assert machine.payments["p0"].status is Status.APPROVED  # the archived outcome stays
    again = reopened(shell)
    assert again.grant_total == usd("80.00")
    assert again.payments["p0"].status is Status.APPROVED


def test_a_terminal_holding_a_grant_with_nothing_new_pushes_its_last_op_once_checked(
    tmp_path: Path,
) -> None:
    """After a restore the server's budget waits for each terminal holding a grant to push
    once its copy of the server's stream is checked. An app started again with nothing new
    to push (no link loss recorded: no mode op) sends its last op again, once a session (a
    duplicate: the server acks it and counts the terminal as back); without a grant it
    sends nothing."""

    def grant(amount: str) -> Body:
        return "grant", {"total": usd(amount).to_wire(), "at_ms": T0}

    shell = offline_terminal(tmp_path / "t.db")
    held = build([grant("50.00"), _approved("p0")], T0 + 1_000, [])
    shell.session(Stream(held, 10))
    # The first session pushes what the server lacked (its vector is the head at Welcome).
    assert shell.pushes and shell.machine.grant_total == usd("50.00")
    head = shell.machine.replica.head("T1")[0]
    shell.feed(shell.machine.handle(Received(T0, protocol.Ack("T1", head))))

    for _ in range(2):  # the app closed and started again, twice
        shell.machine = machine = reopened(shell)
        shell.log.clear()
        shell.pushes.clear()
        shell.session(Stream(held, 10))
        assert machine.replica.head("T1")[0] == head  # nothing new of ours
        assert shell.log == ["answer", "push"]  # after the check
        (push,) = shell.pushes
        assert [op.digest for op in push.ops] == [machine.replica.ops_of("T1")[-1].digest]
        last = push.ops[-1]
        crypto.verify(
            crypto.Ed25519KeyPair.from_private(KEY).public,
            crypto.chain_head_message("T1", last.seq, last.digest),
            crypto.b64d(push.head_signature),
        )
        # Its ack (the server holds it) and the next answers ask for nothing more.
        assert shell.feed(machine.handle(Received(T0, protocol.Ack("T1", head)))) == []
        assert shell.feed(machine.handle(Received(T0, Stream(held, 10).answer(2)))) == []
        assert shell.pushes == [push]

    # The restored server forgot the grant: the terminal drops it and has nothing to say.
    shell.machine = machine = reopened(shell)
    shell.log.clear()
    shell.pushes.clear()
    shell.session(Stream(build([_setting("a", 1)], T0 + 100_000, []), 10))
    assert machine.grant_total is None and machine.archived_ops == 2
    assert machine.replica.head("T1")[0] == head
    assert shell.pushes == []
