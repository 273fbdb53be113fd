"""Fault injection: turns each ``[[faults]]`` entry into actions at its start and end.

Every fault is an interval ``[at, at + duration)`` (``crash`` and ``reboot`` are moments
followed by a restart after ``duration``). Faults that hit a component through its
ordinary interface (cut links, kill a process, fill a disk, switch the sandbox's fault
flags) never reach inside the component's code.

Planted bugs (kind ``bug``) exist to prove the checker catches real mistakes:

- ``retry_decline_new_key``: the forwarder "retries" a hard decline under a new
  idempotency key (applied at the processor boundary, around the real forwarder).
- ``ignore_total_limit``: the terminal is configured with the currency's maximum total
  limit while the checker holds it to the scenario's limit.
- ``ack_before_store``: the server acknowledges a push before it is durable (applied in
  the server adapter, :mod:`syncengine.sim.server`, around the real ServerMachine).
- ``void_new_refund_id``: a void's refund reaches the processor under a new refund id on
  every call (applied at the processor boundary, around the real refunds code).
- ``void_day_in_utc``: the void job judges "same day" in UTC instead of the merchant's
  time zone (the server adapter runs the real ``process_voids`` with UTC first).
- ``double_budget``: the server splits twice the merchant's offline budget between the
  terminals (the server adapter runs the real ``plan_grants`` on a doubled budget).
- ``no_restore_hold``: after a restore the server grants budget at once, without waiting
  for the terminals that may hold rights it forgot (the server adapter runs the real
  ``plan_grants`` with an empty ``held_by``).
- ``ignore_lower_budget``: the server keeps granting on the highest budget the owner ever
  set, as if a lower one were not there (the server adapter runs the real ``plan_grants``
  on it).
- ``ignore_back_push``: the server only acks a push of nothing new, so a terminal with
  nothing new to send after a restore is never counted as back (the server adapter skips
  ``Store.mark_seen``): the budget waits for it until the hold runs out.

``server_restore`` is the operator's disaster recovery: at ``at`` the server database is
backed up while it runs (``syncengine backup``'s online copy), at ``at + duration`` the
server dies and starts again from that backup (``syncengine restore``): everything it
wrote in between is gone, and the terminals must send it again.

``budget_change`` is the owner's ``PUT /v1/merchant/offline-budget`` at ``at`` (a moment:
the budget loop runs at once); while the server is down the owner tries again and it
takes effect when the server is back. A restore brings back the backup's budget, as it
would in production.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine.sim.network import MessageFault
from syncengine.sim.scenario import FaultSpec

if TYPE_CHECKING:
    from syncengine.sim.runner import World

CRASH_RESTART_MS_DEFAULT = 10_000
REBOOT_MS_DEFAULT = 60_000
SERVER_RESTART_MS_DEFAULT = 30_000
SLOW_LATENCY_MS_DEFAULT = 20_000
CRASH_ARM_MS_MAX = 60_000  # a crash armed for "mid-capture" fires anyway after this
CALL_CRASH_ARM_MS_MAX = 30 * 60_000  # a server_crash armed for one call kind waits longer

#: Kinds during which the system is not healthy (liveness is judged after they end).
DISRUPTIVE_KINDS = frozenset(
    {
        "partition",
        "provider_outage",
        "server_crash",
        "server_restore",
        "processor_outage",
        "processor_slow",
        "crash",
        "reboot",
        "disk_full",
        "drop",
        "force_offline",
    }
)


class FaultInjector:
    """Schedules every fault of a scenario on the world's event queue."""

    def __init__(self, world: World) -> None:
        self.world = world

    def schedule(self, faults: tuple[FaultSpec, ...]) -> None:
        q = self.world.queue
        for fault in faults:
            q.schedule(
                q.start_ms + fault.at_ms,
                functools.partial(self._start, fault),
                f"fault:{fault.kind}",
            )

    def _targets(self, fault: FaultSpec) -> list[str]:
        return [t for t in self.world.terminals if fault.hits(t)]

    def _start(self, fault: FaultSpec) -> None:
        w = self.world
        now = w.queue.now_ms
        w.fault_started(fault)
        kind = fault.kind
        end = now + fault.duration_ms
        if kind == "partition":
            for tid in self._targets(fault):
                w.network.partition(tid)
            w.queue.schedule(end, lambda: self._end_partition(fault), "fault-end")
        elif kind in ("drop", "duplicate", "reorder", "delay"):
            targets = None if fault.targets is None else frozenset(fault.targets)
            mf = MessageFault(kind, fault.probability, targets, fault.latency_ms or 5_000)
            w.network.faults.append(mf)
            w.queue.schedule(end, lambda: self._end_message(fault, mf), "fault-end")
        elif kind == "provider_outage":
            w.set_provider_outage(True)
            w.queue.schedule(
                end, lambda: self._end_simple(fault, w.set_provider_outage), "fault-end"
            )
        elif kind in ("crash", "reboot"):
            self._crash(fault)
        elif kind == "clock_skew":
            for tid in self._targets(fault):
                w.skew_ms[tid] = fault.offset_ms
            if fault.duration_ms:
                w.queue.schedule(end, lambda: self._end_skew(fault), "fault-end")
            else:
                w.fault_ended(fault)
        elif kind == "disk_full":
            for tid in self._targets(fault):
                w.terminals[tid].set_disk_full(True)
            w.queue.schedule(end, lambda: self._end_disk(fault), "fault-end")
        elif kind == "server_crash":
            self._server_crash(fault)
        elif kind == "server_restore":
            # Named by the fault's place in the file: the trace names it, and a replay of
            # the seed must trace the same.
            n = next(i for i, x in enumerate(w.scenario.faults, 1) if x is fault)
            backup = w.server.backup(w.data_dir / f"server-backup-{n}.db")
            w.queue.schedule(end, lambda: self._end_restore(fault, backup), "fault-end")
        elif kind == "force_offline":
            for tid in self._targets(fault):
                w.force_offline(tid, True)
            w.queue.schedule(end, lambda: self._end_force(fault), "fault-end")
        elif kind == "processor_outage":
            w.processor.set_outage(True)
            w.queue.schedule(
                end, lambda: self._end_simple(fault, w.processor.set_outage), "fault-end"
            )
        elif kind == "processor_slow":
            w.processor.latency_ms = fault.latency_ms or SLOW_LATENCY_MS_DEFAULT
            w.queue.schedule(end, lambda: self._end_slow(fault), "fault-end")
        elif kind == "outcome_unknown":
            w.processor.set_unknown_probability(fault.probability)
            w.queue.schedule(end, lambda: self._end_unknown(fault), "fault-end")
        elif kind == "budget_change":
            w.set_budget(fault.budget_minor)
            w.fault_ended(fault)
        elif kind == "bug":
            w.plant_bug(fault.bug, True)
            w.queue.schedule(end, lambda: self._end_bug(fault), "fault-end")

    # -- ends ------------------------------------------------------------------------------

    def _end_partition(self, fault: FaultSpec) -> None:
        for tid in self._targets(fault):
            self.world.network.heal(tid)
        self.world.fault_ended(fault)

    def _end_message(self, fault: FaultSpec, mf: MessageFault) -> None:
        self.world.network.faults.remove(mf)
        self.world.fault_ended(fault)

    def _end_simple(self, fault: FaultSpec, setter: object) -> None:
        assert callable(setter)
        setter(False)
        self.world.fault_ended(fault)

    def _end_skew(self, fault: FaultSpec) -> None:
        for tid in self._targets(fault):
            self.world.skew_ms[tid] = 0
        self.world.fault_ended(fault)

    def _end_disk(self, fault: FaultSpec) -> None:
        for tid in self._targets(fault):
            self.world.terminals[tid].set_disk_full(False)
        self.world.fault_ended(fault)

    def _end_force(self, fault: FaultSpec) -> None:
        for tid in self._targets(fault):
            self.world.force_offline(tid, False)
        self.world.fault_ended(fault)

    def _server_crash(self, fault: FaultSpec) -> None:
        """Arm the server to die inside its next processor call (of kind ``call``, if set;
        after the call, before its outcome is recorded); if no call comes within
        ``CRASH_ARM_MS_MAX`` (``CALL_CRASH_ARM_MS_MAX`` with ``call``), die anyway.
        It restarts ``duration`` (default 30 s) after it died."""
        w = self.world
        restart_ms = fault.duration_ms or SERVER_RESTART_MS_DEFAULT
        fired = False

        def fire() -> None:
            nonlocal fired
            if fired:
                return
            fired = True
            w.server.disarm_crash()
            if w.crash_server():
                w.queue.after(restart_ms, lambda: self._end_server(fault), "fault-end")
            else:  # already down (another server_crash): this one ends with it
                w.fault_ended(fault)

        w.server.arm_crash(fire, fault.call)
        wait_ms = CALL_CRASH_ARM_MS_MAX if fault.call else CRASH_ARM_MS_MAX
        w.queue.after(wait_ms, fire, "server-crash-fallback")

    def _end_restore(self, fault: FaultSpec, backup: Path) -> None:
        """The server dies and comes back from the backup (if another fault had it down
        already, that fault's restart opens the restored database)."""
        w = self.world
        was_up = w.crash_server()
        w.server.restore(backup)
        if was_up:
            w.boot_server()
        w.fault_ended(fault)

    def _end_server(self, fault: FaultSpec) -> None:
        self.world.boot_server()
        self.world.fault_ended(fault)

    def _end_slow(self, fault: FaultSpec) -> None:
        self.world.processor.latency_ms = 0
        self.world.fault_ended(fault)

    def _end_unknown(self, fault: FaultSpec) -> None:
        self.world.processor.set_unknown_probability(0.0)
        self.world.fault_ended(fault)

    def _end_bug(self, fault: FaultSpec) -> None:
        self.world.plant_bug(fault.bug, False)
        self.world.fault_ended(fault)

    # -- terminal crashes --------------------------------------------------------------------

    def _crash(self, fault: FaultSpec) -> None:
        w = self.world
        default = CRASH_RESTART_MS_DEFAULT if fault.kind == "crash" else REBOOT_MS_DEFAULT
        down_ms = fault.duration_ms or default
        targets = self._targets(fault)
        pending = set(targets)

        def restart(tid: str) -> None:
            w.boot_terminal(tid)
            pending.discard(tid)
            if not pending:
                w.fault_ended(fault)

        for tid in targets:
            if fault.kind == "crash":
                # Crash mid-capture: the next durable write of this terminal is cut, with
                # or without its bytes reaching the disk; if none comes, crash anyway.
                def fire(tid: str = tid) -> None:
                    if w.crash_terminal(tid):
                        w.queue.after(down_ms, lambda: restart(tid), "restart")

                w.terminals[tid].arm_crash(w.fault_rng.random() < 0.5, fire)
                w.queue.after(CRASH_ARM_MS_MAX, fire, "crash-fallback")
            else:  # a reboot is a power cut: what was written without fsync is lost
                w.crash_terminal(tid, power_cut=True)
                w.queue.after(down_ms, functools.partial(restart, tid), "restart")
