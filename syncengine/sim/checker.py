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
- ``ack_after_durable``: the server never acks a seq it has not stored durably.
- ``offline_limits``: a terminal's outstanding offline total never exceeds its total
  limit; no offline payment exceeds the per-transaction limit.
- ``liveness``: once every fault has healed, every payment is final within ``settle``.
- ``no_clear_card_numbers``: no card number appears in any store or in the trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from syncengine.core.bodies import Capture, StatusChange, parse_body
from syncengine.core.canonical import dumps
from syncengine.core.errors import InvariantViolation, SyncEngineError
from syncengine.core.lifecycle import FINAL, RANK, Status, join
from syncengine.core.ops import Op, is_server_origin
from syncengine.sim import facts as f
from syncengine.sim.facts import RunFacts

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
    "liveness",
    "no_clear_card_numbers",
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
            elif ev.kind == f.STATUS:
                new = Status(ev.detail)
                old = status_seen.get(ev.payment_id, Status.CAPTURED)
                if RANK[new] < RANK[old] or (old in FINAL and new != old):
                    self.bad("monotonic_status", f"{ev.payment_id}: {old.value} -> {new.value}")
                status_seen[ev.payment_id] = new
                pay = self.payments.get(ev.payment_id)
                if pay is not None and new in FINAL and pay.final_at_ms is None:
                    pay.final_at_ms = ev.at_ms
            elif ev.kind == f.VIOLATION:
                self.bad("monotonic_status", f"{ev.terminal}: {ev.detail}")
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

    def run(self) -> CheckReport:
        self.read_stores()
        self.check_trace()
        self.check_ledger()
        self.check_limits()
        self.check_accounting_and_liveness()
        self.check_card_numbers()
        return CheckReport(self.counters, list(self.inv.values()))


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
