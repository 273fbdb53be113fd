"""The invariant checker, shared by the deterministic runner and the real-process tier.

It reads only recorded facts (:class:`~syncengine.sim.facts.RunFacts`): each terminal's
log as stored, the server's ops as stored, the processor's ledger and the trace. In the
spirit of Jepsen's checkers it counts what was lost, duplicated or unexpected, and says
for each violation which payment and what was seen.

Invariants (names used in reports and JSON):

- ``no_lost``: every payment the POS was told was approved (online or offline) is in a
  store, and once the run settled it reached the server.
- ``single_charge``: at most one processor charge per payment (matched by payment id, or
  by terminal, capture time and amount for a charge made under another key).
- ``no_phantom``: nothing is charged or stored that no customer paid: every ledger key is
  a captured payment id, every capture came from an attempt.
- ``same_content``: one payment id, one capture body, on every replica and at the
  processor (amount).
- ``accounting``: captured = approved + declined + expired + pending, pending only for
  terminals still cut off at the end, and each final status agrees with the ledger.
- ``monotonic_status``: a payment's status never moves backwards and has one final value.
  A server restored from a backup forgot what it wrote since: it may pass through the
  earlier statuses of such a payment again, but its final value must be the same.
- ``ack_after_durable``: the server never acks a seq it has not stored durably.
- ``offline_limits``: a terminal's outstanding offline total never exceeds its total
  limit; no offline payment exceeds the per-transaction limit.
- ``merchant_budget`` (with ``[merchant].offline_budget``): the sum of outstanding offline
  payments of all terminals (approved offline, not yet final on the server) never exceeds
  the budget, after every offline approval (after a lower budget: the new one, or what is
  left of the bound before it once the payments released since are taken off).
- ``restore_hold_lifts`` (with a budget): after a restore the server grants nothing until
  each terminal holding a grant is back; once everything healed and settled, it waits for
  none (but one still cut off at the end, or one with no op of its own to send).
- ``liveness``: once every fault has healed, every payment is final within ``settle``.
- ``no_clear_card_numbers``: no card number appears in any store or in the trace.
- ``void_once``: a void is refunded once at the processor, under ``void:<payment_id>``
  (no refund id repeats, no other refund of a payment whose void was requested) and no
  payment is refunded above its charge.
- ``void_settles``: every void the POS was told is requested is in its terminal's store
  and, once everything healed and the run drained, ``voided`` or ``refused`` there.
- ``void_matches``: a payment its terminal shows ``voided`` has the processor refund
  ``void:<payment_id>`` of the whole remaining amount (what the terminal shows); one it
  shows ``refused`` has none.
- ``void_rules``: a void reaches the processor only for an approved standalone payment
  whose own terminal asked for it on the day of the capture, in the merchant's time zone.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from syncengine.core.bodies import (
    VOID_REFUND_PREFIX,
    Capture,
    RefundRecord,
    StatusChange,
    VoidRequest,
    parse_body,
    void_refused_reason,
)
from syncengine.core.canonical import dumps
from syncengine.core.errors import InvariantViolation, SyncEngineError
from syncengine.core.lifecycle import FINAL, RANK, Status, join
from syncengine.core.ops import Op, is_server_origin
from syncengine.sim import facts as f
from syncengine.sim.facts import RunFacts
from syncengine.sim.scenario import format_duration_ms

DETAILS_MAX = 8  # violations listed per invariant; the count says how many there were

INVARIANTS: tuple[str, ...] = (
    "no_lost",
    "single_charge",
    "no_phantom",
    "same_content",
    "accounting",
    "monotonic_status",
    "ack_after_durable",
    "offline_limits",
    "merchant_budget",
    "restore_hold_lifts",
    "liveness",
    "no_clear_card_numbers",
    "void_once",
    "void_settles",
    "void_matches",
    "void_rules",
)


@dataclass
class InvariantResult:
    """One row of the invariant table."""

    name: str
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class CheckReport:
    counters: dict[str, int]
    invariants: list[InvariantResult]

    @property
    def violations(self) -> list[str]:
        out: list[str] = []
        for inv in self.invariants:
            out.extend(f"{inv.name}: {v}" for v in inv.violations[:DETAILS_MAX])
            if len(inv.violations) > DETAILS_MAX:
                out.append(f"{inv.name}: ... {len(inv.violations) - DETAILS_MAX} more")
        return out


@dataclass
class _Payment:
    pid: str
    terminal: str
    capture: Capture
    body: bytes
    on_terminal: bool = False
    on_server: bool = False
    status: Status = Status.CAPTURED
    final_at_ms: int | None = None


class _Checker:
    def __init__(self, facts: RunFacts) -> None:
        self.facts = facts
        self.inv = {name: InvariantResult(name) for name in INVARIANTS}
        self.payments: dict[str, _Payment] = {}
        self.counters: dict[str, int] = {}
        self.voids_told: dict[str, str] = {}  # payment id -> terminal, POS told "requested"

    def bad(self, name: str, message: str) -> None:
        self.inv[name].violations.append(message)

    # -- reading the stores ----------------------------------------------------------------

    def _captures(self, ops: Iterable[Op], where: str, terminal: str | None) -> None:
        for op in ops:
            if op.kind != "capture":
                continue
            if terminal is not None and op.origin != terminal:
                continue
            try:
                body = parse_body(op)
            except SyncEngineError as exc:
                self.bad("same_content", f"{where}: {op.origin}#{op.seq} unreadable: {exc}")
                continue
            assert isinstance(body, Capture)
            raw = dumps(op.body)
            seen = self.payments.get(body.payment_id)
            if seen is None:
                seen = self.payments[body.payment_id] = _Payment(
                    body.payment_id, op.origin, body, raw
                )
            elif seen.body != raw:
                self.bad("same_content", f"{body.payment_id}: {where} holds a different capture")
            if where == "server":
                seen.on_server = True
            else:
                seen.on_terminal = True

    def read_stores(self) -> None:
        for tid, tf in sorted(self.facts.terminals.items()):
            self._captures(tf.ops, f"terminal {tid}", tid)
        self._captures(self.facts.server_ops, "server", None)
        by_pid: dict[str, list[Status]] = {}
        for op in self.facts.server_ops:
            if op.kind != "status" or not is_server_origin(op.origin):
                continue
            body = parse_body(op)
            assert isinstance(body, StatusChange)
            by_pid.setdefault(body.payment_id, []).append(body.status)
        for pid, statuses in by_pid.items():
            pay = self.payments.get(pid)
            if pay is None:
                self.bad("no_phantom", f"{pid}: the server has a status for an unknown payment")
                continue
            try:
                for status in statuses:
                    pay.status = join(pay.status, status)
            except InvariantViolation as exc:
                self.bad("monotonic_status", f"{pid}: {exc}")
        # the terminal's copy of the server stream must agree with the server's
        server_digests = {op.key: op.digest for op in self.facts.server_ops}
        for tid, tf in self.facts.terminals.items():
            for op in tf.ops:
                if is_server_origin(op.origin) and server_digests.get(op.key) != op.digest:
                    self.bad(
                        "same_content",
                        f"terminal {tid} holds {op.origin}#{op.seq} unlike the server's",
                    )

    # -- invariants ------------------------------------------------------------------------

    def check_trace(self) -> None:
        told: dict[str, str] = {}
        attempts: set[str] = set()
        durable: dict[str, int] = {}
        status_seen: dict[str, Status] = {}
        forgotten: dict[str, Status] = {}  # statuses a restored server wrote before it lost them
        limits = {tid: tf.total_limit_minor for tid, tf in self.facts.terminals.items()}
        c = self.counters
        for ev in self.facts.trace:
            if ev.kind == f.ATTEMPT:
                attempts.add(ev.payment_id)
                c["attempts"] = c.get("attempts", 0) + 1
            elif ev.kind in (f.APPROVED_OFFLINE, f.APPROVED_ONLINE, f.DECLINED_ONLINE):
                told[ev.payment_id] = ev.kind
                c[ev.kind] = c.get(ev.kind, 0) + 1
            elif ev.kind == f.REFUSED:
                c["refused"] = c.get("refused", 0) + 1
                key = f"refused:{ev.detail or 'unknown'}"
                c[key] = c.get(key, 0) + 1
            elif ev.kind == f.NOTICE:
                key = f"notice:{ev.detail}"
                c[key] = c.get(key, 0) + 1
            elif ev.kind == f.CRASH and ev.detail == f.POWER_CUT_ACK_LOST:
                c["ack_markers_lost"] = c.get("ack_markers_lost", 0) + 1
            elif ev.kind == f.DURABLE:
                durable[ev.detail] = max(durable.get(ev.detail, 0), ev.value)
            elif ev.kind == f.ACK and ev.value > durable.get(ev.detail, 0):
                self.bad(
                    "ack_after_durable",
                    f"ack of {ev.detail}#{ev.value} at {ev.at_ms} before it was durable "
                    f"(durable up to {durable.get(ev.detail, 0)})",
                )
            elif ev.kind == f.OUTSTANDING and ev.value > limits.get(ev.terminal, ev.value):
                c["limit_breaches"] = c.get("limit_breaches", 0) + 1
                self.bad(
                    "offline_limits",
                    f"{ev.terminal}: outstanding {ev.value} above the total limit "
                    f"{limits[ev.terminal]} after {ev.payment_id}",
                )
            elif ev.kind == f.RESTORED:
                durable.clear()  # DURABLE facts of what the restored database holds follow
                for pid, status in status_seen.items():
                    if status in FINAL or forgotten.get(pid) not in FINAL:
                        forgotten[pid] = status
                status_seen.clear()
            elif ev.kind == f.STATUS:
                new = Status(ev.detail)
                before = forgotten.get(ev.payment_id)
                if before is not None and new in FINAL:
                    del forgotten[ev.payment_id]
                    if before in FINAL and new != before:
                        self.bad(
                            "monotonic_status",
                            f"{ev.payment_id}: {before.value} before the restore, "
                            f"{new.value} after it",
                        )
                old = status_seen.get(ev.payment_id, Status.CAPTURED)
                if RANK[new] < RANK[old] or (old in FINAL and new != old):
                    self.bad("monotonic_status", f"{ev.payment_id}: {old.value} -> {new.value}")
                status_seen[ev.payment_id] = new
                pay = self.payments.get(ev.payment_id)
                if pay is not None and new in FINAL and pay.final_at_ms is None:
                    pay.final_at_ms = ev.at_ms
            elif ev.kind == f.VIOLATION:
                self.bad("monotonic_status", f"{ev.terminal}: {ev.detail}")
            elif ev.kind == f.VOID_REQUESTED:
                self.voids_told[ev.payment_id] = ev.terminal
                c["voids_requested"] = c.get("voids_requested", 0) + 1
            elif ev.kind == f.VOID_DECLINED_LOCALLY:
                key = f"void_declined_locally:{ev.detail or 'unknown'}"
                c["void_declined_locally"] = c.get("void_declined_locally", 0) + 1
                c[key] = c.get(key, 0) + 1
        self._told(told, attempts)

    def _told(self, told: Mapping[str, str], attempts: set[str]) -> None:
        for pid, kind in sorted(told.items()):
            if kind == f.DECLINED_ONLINE:
                continue
            pay = self.payments.get(pid)
            if pay is None:
                self.counters["lost"] = self.counters.get("lost", 0) + 1
                self.bad("no_lost", f"{pid}: POS told {kind} but no store holds it")
            elif not pay.on_server and pay.terminal not in self.facts.down_at_end:
                self.counters["lost"] = self.counters.get("lost", 0) + 1
                self.bad("no_lost", f"{pid}: POS told {kind} but it never reached the server")
        for pid, pay in sorted(self.payments.items()):
            if pid not in attempts:
                self.bad("no_phantom", f"{pid}: stored but no customer attempt made it")
            elif pid not in told and pay.on_server:
                # Stored, then the terminal died before saying so: kept and forwarded, but
                # worth a line in the report.
                self.counters["unreported"] = self.counters.get("unreported", 0) + 1

    def check_ledger(self) -> None:
        by_fp = {
            (p.terminal, p.capture.captured_at_ms, p.capture.amount.minor): p
            for p in self.payments.values()
        }
        charges: dict[str, list[f.Charge]] = {}
        for ch in self.facts.ledger:
            pay = self.payments.get(ch.payment_id)
            if pay is None:
                pay = by_fp.get((ch.terminal_id, ch.captured_at_ms, ch.amount_minor))
                self.bad("no_phantom", f"charge under unknown key {ch.payment_id!r} ({ch.outcome})")
            if pay is None:
                continue
            charges.setdefault(pay.pid, []).append(ch)
            if ch.amount_minor != pay.capture.amount.minor:
                self.bad(
                    "same_content",
                    f"{pay.pid}: charged {ch.amount_minor}, captured {pay.capture.amount.minor}",
                )
        dup = 0
        for pid, group in sorted(charges.items()):
            if len(group) > 1:
                dup += len(group) - 1
                keys = ", ".join(sorted({g.payment_id for g in group}))
                self.bad(
                    "single_charge", f"{pid}: {len(group)} charges at the processor (keys {keys})"
                )
        self.counters["duplicate_charges"] = dup
        for pid, pay in self.payments.items():
            first = charges.get(pid, [None])[0]
            outcome = None if first is None else first.outcome
            want = {Status.APPROVED: "approved", Status.OFFLINE_DECLINED: "declined"}.get(
                pay.status
            )
            if pay.status in (Status.APPROVED, Status.OFFLINE_DECLINED) and outcome != want:
                self.bad(
                    "accounting", f"{pid}: status {pay.status.value} but processor says {outcome}"
                )
            if pay.status == Status.EXPIRED and outcome == "approved":
                self.bad("accounting", f"{pid}: expired, yet the processor charged it")

    def check_limits(self) -> None:
        for pay in self.payments.values():
            tf = self.facts.terminals.get(pay.terminal)
            if tf is None or pay.capture.channel != "offline":
                continue
            if pay.capture.amount.minor > tf.per_transaction_limit_minor:
                self.counters["limit_breaches"] = self.counters.get("limit_breaches", 0) + 1
                self.bad(
                    "offline_limits",
                    f"{pay.pid}: {pay.capture.amount} above the per-transaction limit",
                )

    def check_merchant_budget(self) -> None:
        """The escrow's promise (syncengine.core.budget, rule 5), from the trace: an offline
        approval adds its amount, the server's first final status of it takes it away.

        A lower budget takes back no right already granted (the terminals may spend them),
        but the server grants nothing that would raise the rights held above it. So after
        a ``budget_change`` the bound is the larger of the new budget and ``carry``: the
        bound just before the change, less every payment released since (each release
        gives back rights as large as the payment; re-grants stay within the new budget).
        A raise makes the bound the new budget at once."""
        budget = self.facts.offline_budget_minor
        if budget is None:
            return
        c = self.counters
        c.setdefault("budget_breaches", 0)
        out: dict[str, int] = {}  # offline payments not final yet -> amount
        final: set[str] = set()
        exposure = peak = carry = 0
        for ev in self.facts.trace:
            if ev.kind == f.BUDGET:
                carry, budget = max(budget, carry), ev.value
            elif ev.kind == f.APPROVED_OFFLINE and ev.payment_id not in final:
                exposure += ev.value - out.get(ev.payment_id, 0)
                out[ev.payment_id] = ev.value
                peak = max(peak, exposure)
                bound = max(budget, carry)
                if exposure > bound:
                    c["budget_breaches"] += 1
                    self.bad(
                        "merchant_budget",
                        f"{ev.terminal} approved {ev.payment_id} offline at "
                        f"{format_duration_ms(ev.at_ms - self.facts.start_ms)}: "
                        f"{exposure} outstanding across terminals, bound {bound} "
                        f"(budget {budget})",
                    )
            elif (
                ev.kind in (f.STATUS, f.RELEASED)
                and Status(ev.detail) in FINAL
                and ev.payment_id not in final
            ):
                final.add(ev.payment_id)
                amount = out.pop(ev.payment_id, 0)
                exposure -= amount
                carry = max(0, carry - amount)
        c["budget_peak_minor"] = peak

    def check_restore_hold(self) -> None:
        """The budget's restore hold ends: every terminal was back after healing (the run
        went on ``settle`` after it), so the server must wait for none of them."""
        healed, held = self.facts.healed_at_ms, self.facts.restore_hold
        if not held or healed is None or self.facts.end_ms - healed < self.facts.settle_ms:
            return
        for tid in held:
            tf = self.facts.terminals.get(tid)
            if tid in self.facts.down_at_end or tf is None:
                continue
            if any(op.origin == tid for op in tf.ops):  # it has something to push again
                self.bad(
                    "restore_hold_lifts",
                    f"{tid}: the budget still waits for it at the end, though everything "
                    f"is up since {format_duration_ms(healed - self.facts.start_ms)}",
                )

    def check_accounting_and_liveness(self) -> None:
        c = self.counters
        for key in ("approved", "declined", "expired", "pending"):
            c.setdefault(key, 0)
        name = {
            Status.APPROVED: "approved",
            Status.OFFLINE_DECLINED: "declined",
            Status.EXPIRED: "expired",
        }
        healed = self.facts.healed_at_ms
        for pid, pay in sorted(self.payments.items()):
            if pay.status in FINAL:
                c[name[pay.status]] += 1
                if healed is not None and pay.final_at_ms is not None:
                    late = pay.final_at_ms - (
                        max(healed, pay.capture.captured_at_ms) + self.facts.settle_ms
                    )
                    if late > 0:
                        self.bad("liveness", f"{pid}: final {late} ms after the settle window")
                continue
            c["pending"] += 1
            if pay.terminal in self.facts.down_at_end:
                continue
            if healed is None:
                self.bad("accounting", f"{pid}: still {pay.status.value} and the run never healed")
            else:
                self.bad(
                    "liveness",
                    f"{pid}: still {pay.status.value} {self.facts.settle_ms} ms after healing",
                )
        c["captured"] = len(self.payments)
        total = c["approved"] + c["declined"] + c["expired"] + c["pending"]
        if total != c["captured"]:
            self.bad("accounting", f"captured {c['captured']} != sum of outcomes {total}")
        c.setdefault("lost", 0)
        c.setdefault("limit_breaches", 0)
        c.setdefault("refused", 0)

    def check_card_numbers(self) -> None:
        pans = [p.encode() for p in self.facts.pans]
        blobs: list[tuple[str, bytes]] = []
        for tid, tf in self.facts.terminals.items():
            blobs += [(f"terminal {tid} store", b) for b in tf.blobs]
            blobs += [(str(p), _read(p)) for p in tf.files]
        blobs += [("server store", b) for b in self.facts.server_blobs]
        blobs += [(str(p), _read(p)) for p in self.facts.server_files]
        blobs.append(
            ("trace", "\n".join(f"{e.payment_id} {e.detail}" for e in self.facts.trace).encode())
        )
        for where, blob in blobs:
            for pan in pans:
                if pan in blob:
                    self.bad(
                        "no_clear_card_numbers",
                        f"card number ...{pan[-4:].decode()} in clear in {where}",
                    )

    def check_voids(self) -> None:
        """``void_once``, ``void_settles``, ``void_matches`` and ``void_rules``."""
        c = self.counters
        for key in ("voids_requested", "voided", "void_refused", "void_declined_locally"):
            c.setdefault(key, 0)
        asked, voided, refused = _void_states(self.facts)
        charged = {ch.payment_id: ch for ch in self.facts.ledger if ch.outcome == "approved"}
        by_id: dict[str, list[f.RefundEntry]] = {}
        by_pid: dict[str, list[f.RefundEntry]] = {}
        for r in self.facts.refunds:
            by_id.setdefault(r.refund_id, []).append(r)
            by_pid.setdefault(r.payment_id, []).append(r)
        # void_once
        for rid, group in sorted(by_id.items()):
            if len(group) > 1:
                self.bad("void_once", f"refund id {rid} used {len(group)} times at the processor")
        for pid, group in sorted(by_pid.items()):
            total = sum(r.amount_minor for r in group)
            charge = charged.get(pid)
            if charge is None or total > charge.amount_minor:
                self.bad(
                    "void_once",
                    f"{pid}: refunded {total} at the processor, charged "
                    f"{0 if charge is None else charge.amount_minor}",
                )
            if pid in asked:
                others = sorted({r.refund_id for r in group} - {VOID_REFUND_PREFIX + pid})
                if others:
                    self.bad(
                        "void_once",
                        f"{pid}: its void was requested and it was also refunded under "
                        f"{', '.join(others)} (a void is refunded once, as void:{pid})",
                    )
        # void_settles
        healed = self.facts.healed_at_ms
        for pid, tid in sorted(self.voids_told.items()):
            if pid not in asked:
                self.bad("void_settles", f"{pid}: POS told the void is requested, {tid} lost it")
        for pid, (tid, at_ms) in sorted(asked.items()):
            if pid in voided:
                c["voided"] += 1
            elif pid in refused:
                c["void_refused"] += 1
                key = f"void_refused:{refused[pid]}"
                c[key] = c.get(key, 0) + 1
            elif tid not in self.facts.down_at_end and healed is not None:
                self.bad(
                    "void_settles",
                    f"{pid}: void requested at {at_ms} still requested on {tid} "
                    f"{self.facts.settle_ms} ms after healing",
                )
        # void_matches
        for pid, amount in sorted(voided.items()):
            void_refunds = by_id.get(VOID_REFUND_PREFIX + pid, [])
            charge = charged.get(pid)
            other = sum(
                r.amount_minor
                for r in by_pid.get(pid, [])
                if r.refund_id != VOID_REFUND_PREFIX + pid
            )
            remaining = (0 if charge is None else charge.amount_minor) - other
            if not void_refunds:
                self.bad("void_matches", f"{pid}: voided on its terminal, no refund void:{pid}")
            elif void_refunds[0].amount_minor != remaining or amount != remaining:
                self.bad(
                    "void_matches",
                    f"{pid}: voided {amount} on its terminal, refunded "
                    f"{void_refunds[0].amount_minor} at the processor, {remaining} remained",
                )
        for pid, reason in sorted(refused.items()):
            if pid not in voided and by_id.get(VOID_REFUND_PREFIX + pid):
                self.bad("void_matches", f"{pid}: void refused ({reason}) yet refunded")
        # void_rules
        zone = zoneinfo.ZoneInfo(self.facts.timezone)
        for r in self.facts.refunds:
            if not r.refund_id.startswith(VOID_REFUND_PREFIX):
                continue
            pid = r.payment_id
            pay = self.payments.get(pid)
            why = ""
            if pay is None:
                why = "an unknown payment"
            elif pid not in asked or asked[pid][0] != pay.terminal:
                why = "a payment its terminal did not ask to void"
            elif pay.capture.channel != "standalone":
                why = f"a {pay.capture.channel} payment"
            elif pid not in charged:
                why = "a payment the processor did not approve"
            elif _day(pay.capture.captured_at_ms, zone) != _day(asked[pid][1], zone):
                why = (
                    f"a payment of {_day(pay.capture.captured_at_ms, zone)} voided on "
                    f"{_day(asked[pid][1], zone)} ({self.facts.timezone})"
                )
            if why:
                self.bad("void_rules", f"{pid}: refund {r.refund_id} of {why}")

    def run(self) -> CheckReport:
        self.read_stores()
        self.check_trace()
        self.check_ledger()
        self.check_limits()
        self.check_merchant_budget()
        self.check_restore_hold()
        self.check_accounting_and_liveness()
        self.check_voids()
        self.check_card_numbers()
        return CheckReport(self.counters, list(self.inv.values()))


def _day(at_ms: int, zone: zoneinfo.ZoneInfo) -> dt.date:
    return dt.datetime.fromtimestamp(at_ms / 1000, tz=zone).date()


def _void_states(
    facts: RunFacts,
) -> tuple[dict[str, tuple[str, int]], dict[str, int], dict[str, str]]:
    """Voids as each terminal's store holds them: requested (terminal, requested at),
    voided (amount of the ``void:<id>`` refund op) and refused (the server's reason)."""
    asked: dict[str, tuple[str, int]] = {}
    voided: dict[str, int] = {}
    refused: dict[str, str] = {}
    for tid, tf in sorted(facts.terminals.items()):
        for op in tf.ops:
            if op.kind == "void_request" and op.origin == tid:
                body = parse_body(op)
                assert isinstance(body, VoidRequest)
                asked.setdefault(body.payment_id, (tid, body.at_ms))
            elif op.kind == "refund" and is_server_origin(op.origin):
                refund = parse_body(op)
                assert isinstance(refund, RefundRecord)
                if refund.refund_id == VOID_REFUND_PREFIX + refund.payment_id:
                    voided[refund.payment_id] = (
                        voided.get(refund.payment_id, 0) + refund.amount.minor
                    )
            elif op.kind == "status" and is_server_origin(op.origin):
                status = parse_body(op)
                assert isinstance(status, StatusChange)
                reason = void_refused_reason(status.code)
                if reason is not None:
                    refused.setdefault(status.payment_id, reason)
    return asked, voided, refused


def _read(path: object) -> bytes:
    from pathlib import Path

    p = Path(str(path))
    try:
        return p.read_bytes()
    except OSError:
        return b""


def check(facts: RunFacts) -> CheckReport:
    """Check every invariant against ``facts``."""
    return _Checker(facts).run()


def check_expect(expect: Mapping[str, int], counters: Mapping[str, int]) -> list[str]:
    """Compare ``[expect]`` with the counters: ``key`` equal, ``key_min``/``key_max`` bounds."""
    failures: list[str] = []
    for key, want in sorted(expect.items()):
        if key.endswith("_min"):
            got = counters.get(key[:-4], 0)
            if got < want:
                failures.append(f"expect: {key[:-4]} = {got}, wanted at least {want}")
        elif key.endswith("_max"):
            got = counters.get(key[:-4], 0)
            if got > want:
                failures.append(f"expect: {key[:-4]} = {got}, wanted at most {want}")
        elif counters.get(key, 0) != want:
            failures.append(f"expect: {key} = {counters.get(key, 0)}, wanted {want}")
    return failures
