"""Voids on the terminal (R9): VoidPayment driven by hand through TerminalMachine."""

from __future__ import annotations

from typing import Any

import pytest
from node_support import SERVER_KEY, make_config, usd, visa

from syncengine.core import crypto, protocol
from syncengine.core.bodies import (
    VOID_REFUSED_CODE_PREFIX,
    RefundRecord,
    StatusChange,
    VoidRequest,
    parse_body,
)
from syncengine.core.errors import ConfigError
from syncengine.core.hlc import Hlc
from syncengine.core.lifecycle import Status
from syncengine.core.ops import Op, make_next
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import (
    DAY_MS,
    ActivateOffline,
    CommitFailed,
    Committed,
    Connected,
    ConnectFailed,
    Effect,
    Notify,
    PaymentRefunded,
    PaymentVoided,
    Persist,
    Received,
    Send,
    TakePayment,
    TerminalMachine,
    VoidDecided,
    VoidPayment,
    VoidRefused,
    VoidResult,
)

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
HOUR_MS = 3_600_000


def run(machine: TerminalMachine, effects: list[Effect], now_ms: int) -> list[Effect]:
    done: list[Effect] = []
    queue = list(effects)
    while queue:
        effect = queue.pop(0)
        done.append(effect)
        if isinstance(effect, Persist):
            queue.extend(machine.handle(Committed(now_ms)))
    return done


def connected(**config: Any) -> TerminalMachine:
    machine = TerminalMachine(make_config(**config), bytes(range(32)), lambda n: 0, T0)
    machine.handle(Connected(T0))
    machine.handle(Received(T0, protocol.Challenge(crypto.b64e(bytes(32)), T0)))
    run(machine, machine.handle(Received(T0, protocol.Welcome({}, T0))), T0)
    assert machine.link == "connected"
    return machine


def take(machine: TerminalMachine, now_ms: int, pid: str, standalone: bool = True) -> None:
    event = TakePayment(
        now_ms,
        pid,
        usd("10.00"),
        visa(),
        EntryMethod.TAP,
        bytes([7]) * 32,
        bytes(12),
        standalone=standalone,
    )
    run(machine, machine.handle(event), now_ms)
    assert pid in machine.payments


def server_ops(machine: TerminalMachine, now_ms: int, *bodies: tuple[str, Any]) -> list[Effect]:
    """Deliver signed server/T ops after what the machine holds."""
    origin = machine.server_origin
    prev = machine.replica.get(origin, machine.replica.head(origin)[0])
    ops: list[Op] = []
    for kind, body in bodies:
        prev = make_next(prev, origin, Hlc(now_ms), kind, body)
        ops.append(prev)
    head = crypto.chain_head_message(origin, ops[-1].seq, ops[-1].digest)
    signature = crypto.b64e(crypto.sign(SERVER_KEY.private, head))
    message = protocol.ServerOps(tuple(ops), signature, False)
    return run(machine, machine.handle(Received(now_ms, message)), now_ms)


def approve(machine: TerminalMachine, now_ms: int, pid: str) -> None:
    server_ops(machine, now_ms, ("status", StatusChange(pid, Status.APPROVED, now_ms).to_body()))
    assert machine.payments[pid].status is Status.APPROVED


def void(machine: TerminalMachine, now_ms: int, pid: str) -> tuple[VoidResult, list[Effect]]:
    effects = run(machine, machine.handle(VoidPayment(now_ms, pid)), now_ms)
    results = [
        e.notice.result
        for e in effects
        if isinstance(e, Notify) and isinstance(e.notice, VoidDecided)
    ]
    assert len(results) == 1, effects
    return results[0], effects


def refused(machine: TerminalMachine, now_ms: int, pid: str) -> str:
    head = machine.replica.head(machine.origin)[0]
    result, effects = void(machine, now_ms, pid)
    assert result.outcome == "refused" and result.message, result
    assert not any(isinstance(e, Persist) for e in effects)
    assert machine.replica.head(machine.origin)[0] == head  # nothing written
    return result.reason


def test_a_same_day_standalone_void_is_stored_then_sent_as_a_void_request() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    effects = machine.handle(VoidPayment(T0 + HOUR_MS // 2, "p1"))
    # durability first: only a Persist until the commit, no answer yet
    assert len(effects) == 1 and isinstance(effects[0], Persist)
    (op,) = effects[0].ops
    assert op.kind == "void_request"
    assert parse_body(op) == VoidRequest("p1", T0 + HOUR_MS // 2)
    after = machine.handle(Committed(T0 + HOUR_MS // 2))
    decided = [e.notice for e in after if isinstance(e, Notify)]
    assert VoidDecided(VoidResult("requested", "p1", usd("10.00"))) in decided
    pushed = [e.message for e in after if isinstance(e, Send)]
    assert any(isinstance(m, protocol.Push) and op in m.ops for m in pushed)
    view = machine.payments["p1"]
    assert view.void_state == "requested" and view.voided == usd("0.00")
    assert refused(machine, T0 + HOUR_MS, "p1") == "already_voided"


def test_a_failed_commit_of_a_void_requests_nothing() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    machine.handle(VoidPayment(T0 + 2_000, "p1"))
    after = machine.handle(CommitFailed(T0 + 2_000, "disk full"))
    (notice,) = [e.notice for e in after if isinstance(e, Notify)]
    assert isinstance(notice, VoidDecided) and notice.result.reason == "storage_failed"
    assert machine.payments["p1"].void_state == ""
    assert void(machine, T0 + 3_000, "p1")[0].outcome == "requested"  # may try again


def test_the_servers_void_refund_marks_the_payment_voided_and_tells_the_pos() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    void(machine, T0 + 2_000, "p1")
    record = RefundRecord("p1", "void:p1", usd("10.00"), T0 + 5_000)
    effects = server_ops(machine, T0 + 5_000, ("refund", record.to_body()))
    notices = [e.notice for e in effects if isinstance(e, Notify)]
    assert PaymentVoided("p1", "void:p1", usd("10.00"), "standalone") in notices
    view = machine.payments["p1"]
    assert (view.void_state, view.voided, view.refunded) == ("voided", usd("10.00"), usd("10.00"))
    assert refused(machine, T0 + 6_000, "p1") == "already_voided"


def test_an_ordinary_refund_is_a_refund_notice_not_a_void() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    record = RefundRecord("p1", "r-1", usd("4.00"), T0 + 2_000)
    effects = server_ops(machine, T0 + 2_000, ("refund", record.to_body()))
    notices = [e.notice for e in effects if isinstance(e, Notify)]
    assert PaymentRefunded("p1", "r-1", usd("4.00"), usd("4.00")) in notices
    view = machine.payments["p1"]
    assert view.void_state == "" and view.refunded == usd("4.00")
    # a partial refund leaves the rest voidable; a full one does not
    assert void(machine, T0 + 3_000, "p1")[0].outcome == "requested"
    take(machine, T0 + 4_000, "p2")
    approve(machine, T0 + 4_000, "p2")
    full = RefundRecord("p2", "r-2", usd("10.00"), T0 + 5_000)
    server_ops(machine, T0 + 5_000, ("refund", full.to_body()))
    assert refused(machine, T0 + 6_000, "p2") == "already_refunded"


def void_refusal(pid: str, status: Status, at_ms: int, reason: str) -> dict[str, Any]:
    """The status op the server writes when it does not make a requested void."""
    message = "Not voided: refund it from the POS or the portal."
    return StatusChange(pid, status, at_ms, VOID_REFUSED_CODE_PREFIX + reason, message).to_body()


def test_a_void_the_server_refuses_ends_as_refused_and_tells_the_pos() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    void(machine, T0 + 2_000, "p1")
    body = void_refusal("p1", Status.APPROVED, T0 + 5_000, "refused_rules")
    effects = server_ops(machine, T0 + 5_000, ("status", body))
    notices = [e.notice for e in effects if isinstance(e, Notify)]
    assert notices == [
        VoidRefused("p1", usd("10.00"), "refused_rules", body["message"]),
    ]
    view = machine.payments["p1"]
    assert (view.void_state, view.void_refused) == ("refused", "refused_rules")
    # the payment itself is unchanged: approved, its own code, nothing refunded
    assert (view.status, view.code, view.refunded) == (Status.APPROVED, "", usd("0.00"))
    assert refused(machine, T0 + 6_000, "p1") == "void_refused"
    # the same refusal again (a re-sent stream) tells the POS nothing new
    again = server_ops(machine, T0 + 7_000, ("status", body))
    assert not [e for e in again if isinstance(e, Notify)]


def test_a_void_refusal_without_a_void_request_changes_nothing() -> None:
    machine = connected()
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    body = void_refusal("p1", Status.APPROVED, T0 + 2_000, "refused_rules")
    effects = server_ops(machine, T0 + 2_000, ("status", body))
    assert not [e for e in effects if isinstance(e, Notify)]
    assert machine.payments["p1"].void_state == ""
    assert void(machine, T0 + 3_000, "p1")[0].outcome == "requested"


def test_a_void_refusal_never_moves_a_status_that_lags() -> None:
    # The server sends a payment's outcome before any refusal of its void; were a refusal
    # to arrive first, it must not act as the outcome.
    machine = connected()
    take(machine, T0, "p1")
    body = void_refusal("p1", Status.OFFLINE_DECLINED, T0 + 1_000, "not_charged")
    effects = server_ops(machine, T0 + 1_000, ("status", body))
    assert not [e for e in effects if isinstance(e, Notify)]
    assert machine.payments["p1"].status is Status.CAPTURED


def test_unknown_integrated_and_unprocessed_payments_are_refused() -> None:
    machine = connected()
    assert refused(machine, T0, "nope") == "not_found"
    take(machine, T0, "integrated", standalone=False)
    approve(machine, T0 + 1_000, "integrated")
    assert refused(machine, T0 + 2_000, "integrated") == "not_standalone"
    take(machine, T0 + 3_000, "waiting")  # standalone, outcome not known yet
    assert refused(machine, T0 + 3_500, "waiting") == "not_processed"
    declined = StatusChange("waiting", Status.OFFLINE_DECLINED, T0 + 4_000, "stolen_card")
    server_ops(machine, T0 + 4_000, ("status", declined.to_body()))
    assert refused(machine, T0 + 5_000, "waiting") == "not_approved"


def test_an_offline_payment_cannot_be_voided_while_it_is_not_processed() -> None:
    machine = TerminalMachine(make_config(), bytes(32), lambda n: 0, T0)
    run(machine, machine.handle(ConnectFailed(T0, "network", "refused")), T0)
    run(machine, machine.handle(ActivateOffline(T0)), T0)
    take(machine, T0 + 1, "off", standalone=False)
    assert machine.payments["off"].capture.channel == "offline"
    assert refused(machine, T0 + 2, "off") == "not_processed"


@pytest.mark.parametrize(
    ("offset_minutes", "void_at", "reason"),
    [
        (None, T0 + HOUR_MS, ""),  # 22:13 -> 23:13 UTC, same day
        (None, T0 + 2 * HOUR_MS, "not_same_day"),  # 22:13 -> 00:13 UTC: another day
        (-300, T0 + 2 * HOUR_MS, ""),  # UTC-5: 17:13 -> 19:13, same day
        (120, T0 + 2 * HOUR_MS, ""),  # UTC+2: 00:13 -> 02:13 on the 15th, same day
        (120, T0 + 22 * HOUR_MS, ""),  # UTC+2: 00:13 -> 22:13 of the 15th
        (120, T0 + 24 * HOUR_MS, "not_same_day"),  # UTC+2: the 16th
    ],
)
def test_same_day_is_the_local_business_day_of_the_configured_offset(
    offset_minutes: int | None, void_at: int, reason: str
) -> None:
    machine = connected(utc_offset_minutes=offset_minutes)
    take(machine, T0, "p1")
    approve(machine, T0 + 1_000, "p1")
    day = machine.business_day
    expected_same = day(T0) == day(void_at)
    assert expected_same == (reason == "")
    if reason:
        assert refused(machine, void_at, "p1") == reason
    else:
        assert void(machine, void_at, "p1")[0].outcome == "requested"


def test_business_day_boundaries() -> None:
    utc = connected()
    midnight = (T0 // DAY_MS + 1) * DAY_MS
    assert utc.business_day(midnight - 1) + 1 == utc.business_day(midnight)
    east = connected(utc_offset_minutes=60)
    assert east.business_day(midnight - HOUR_MS) == utc.business_day(midnight)
    with pytest.raises(ConfigError):
        make_config(utc_offset_minutes=15 * 60)


def test_restore_keeps_void_requests_and_voids() -> None:
    machine = connected()
    persisted: list[Op] = []
    for pid in ("p1", "p2", "p3"):
        event = TakePayment(
            T0,
            pid,
            usd("10.00"),
            visa(),
            EntryMethod.TAP,
            bytes([7]) * 32,
            bytes(12),
            standalone=True,
        )
        effects = run(machine, machine.handle(event), T0)
        persisted += [op for e in effects if isinstance(e, Persist) for op in e.ops]
    for pid in ("p1", "p2", "p3"):
        effects = server_ops(
            machine, T0 + 1, ("status", StatusChange(pid, Status.APPROVED, T0 + 1).to_body())
        )
        persisted += [op for e in effects if isinstance(e, Persist) for op in e.ops]
    for pid in ("p1", "p2", "p3"):
        _, effects = void(machine, T0 + 2, pid)
        persisted += [op for e in effects if isinstance(e, Persist) for op in e.ops]
    record = RefundRecord("p1", "void:p1", usd("10.00"), T0 + 3)
    effects = server_ops(machine, T0 + 3, ("refund", record.to_body()))
    persisted += [op for e in effects if isinstance(e, Persist) for op in e.ops]
    refusal = void_refusal("p3", Status.APPROVED, T0 + 3, "refused_rules")
    effects = server_ops(machine, T0 + 3, ("status", refusal))
    persisted += [op for e in effects if isinstance(e, Persist) for op in e.ops]
    restored = TerminalMachine.restore(
        make_config(), bytes(range(32)), lambda n: 0, T0 + 4, persisted, 0
    )
    assert restored.payments["p1"].void_state == "voided"
    assert restored.payments["p2"].void_state == "requested"
    assert restored.payments["p3"].void_state == "refused"
    assert restored.payments["p2"].void_seq == machine.payments["p2"].void_seq
