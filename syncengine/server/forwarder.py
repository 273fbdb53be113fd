"""Exactly-once forwarding of stored payments to the card processor (R7).

Theory of operation
-------------------
1. A worker claims one *terminal* in the store with a lease (``claim_terminal``), then
   forwards that terminal's pending payments one by one in capture order. At most
   ``concurrency_max`` workers run, so at most that many processor calls are in flight.
   Each worker leases under its own owner name; after a failed round it releases what
   that name holds (``release_leases``): a claim whose commit was lost with its
   connection may have left it a lease it does not know of.
2. Before calling the processor the attempt is recorded durably (``begin_attempt``). A
   first attempt charges under the payment id as idempotency key. Any later attempt
   first *looks the key up* (an earlier attempt may have charged before a crash or a lost
   answer) and charges only if the processor has no record: never a new key, never a
   second charge.
3. Answers: approved -> ``approved``; declined -> ``offline_declined`` (final, never
   retried); ``ProcessorUnavailable``/``OutcomeUnknown``/transport errors -> the payment
   stays pending and is retried after a capped exponential backoff (``defer``); the
   terminal is released so the order of its payments is kept (nothing overtakes it).
   ``IdempotencyConflict`` means our request changed under one key: a bug, parked for a
   person (``park``), never retried blindly; so is ``RequestRefused`` (the processor will
   not take the request as it is: an HTTP 400); the person resolves it
   (``POST /v1/payments/{id}/resolve``: retry under the same key, or approved/declined from
   the processor's own record).
4. A payment whose deadline passed is never charged: its attempt only looks its id up (a
   server restored from a backup may have charged it before and forgotten) and adopts
   what the processor holds; when it holds nothing the payment is ``expired``.
5. Outcomes are written with ``record_outcome``, which only moves a payment that is still
   pending: a second writer (a lease that expired under a slow worker) changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from syncengine.core.bodies import StatusChange
from syncengine.core.errors import ProtocolError
from syncengine.core.lifecycle import Status
from syncengine.core.money import Money
from syncengine.processor.api import (
    ChargeRequest,
    ChargeResult,
    IdempotencyConflict,
    OutcomeUnknown,
    Processor,
    ProcessorUnavailable,
    RequestRefused,
)
from syncengine.server.model import AttemptAction, Payment
from syncengine.server.store import Store, StoreRunner

log = logging.getLogger("syncengine.server.forwarder")

FAILURE_CHARS_MAX = 300  # the unexpected error /health shows, cut to this


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    """Bounds of forwarding. Every delay is in milliseconds."""

    concurrency_max: int = 8
    lease_ms: int = 30_000
    backoff_base_ms: int = 500
    backoff_cap_ms: int = 60_000
    backoff_jitter_percent: int = 10
    poll_interval_ms: int = 1_000
    payments_per_claim_max: int = 1_000
    # A payment first forwarded this long after its capture is looked up by its key
    # before it is charged: the processor may have pruned the key (Stripe: after 24 h)
    # while our record of an earlier charge was lost (a server restored from a backup).
    # Keep it below the processor's idempotency window.
    lookup_first_after_ms: int = 12 * 3_600_000


@dataclass
class ForwarderStats:
    """Counters exported on /metrics."""

    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    # The first unexpected error since an attempt last went through (None: none since),
    # the latest one and when: /health reports a stuck forwarder from these.
    failing_since_ms: int | None = None
    last_failure_ms: int = 0
    last_failure: str = ""

    def count_outcome(self, status: str) -> None:
        self.outcomes[status] = self.outcomes.get(status, 0) + 1

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def round_failed(self, exc: BaseException, now_ms: int) -> None:
        """A worker round ended in an unexpected error (a bug or a broken dependency)."""
        self.count_error("internal")
        if self.failing_since_ms is None:
            self.failing_since_ms = now_ms
        self.last_failure_ms = now_ms
        self.last_failure = f"{type(exc).__name__}: {exc}"[:FAILURE_CHARS_MAX]

    def attempt_done(self) -> None:
        """An attempt went through (an outcome, a deferral or a parking was stored)."""
        self.failing_since_ms = None

    def failing_ms(self, now_ms: int, recent_ms: int) -> int:
        """How long the forwarder has failed without one attempt going through; 0 if it
        has not, or if its last failure is ``recent_ms`` old or more (nothing to do)."""
        if self.failing_since_ms is None or now_ms - self.last_failure_ms >= recent_ms:
            return 0
        return max(0, now_ms - self.failing_since_ms)


def backoff_ms(attempts: int, config: ForwarderConfig, jitter: float) -> int:
    """Delay before attempt ``attempts + 1``: capped exponential, plus up to ``jitter``
    (0..1) times ``backoff_jitter_percent`` percent."""
    exponent = min(max(attempts - 1, 0), 30)
    delay: int = min(config.backoff_cap_ms, config.backoff_base_ms * 2**exponent)
    return delay + int(delay * config.backoff_jitter_percent * jitter) // 100


class Forwarder:
    """Runs the forwarding workers. ``notify(terminal_id)`` is told when ``server/T`` grew."""

    def __init__(
        self,
        store: Store,
        runner: StoreRunner,
        processor: Processor,
        clock_ms: Callable[[], int],
        owner: str,
        config: ForwarderConfig | None = None,
        notify: Callable[[str], None] = lambda terminal_id: None,
        on_final: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.run_store = runner
        self.processor = processor
        self.clock_ms = clock_ms
        self.owner = owner
        self.config = config or ForwarderConfig()
        self.notify = notify
        self.on_final = on_final
        self.stats = ForwarderStats()
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def wake(self) -> None:
        """New work may be due (a merge stored captures): stop waiting for the poll."""
        self._wake.set()

    def start(self) -> None:
        """Start ``concurrency_max`` workers on the running loop."""
        self._stopping = False
        for i in range(self.config.concurrency_max):
            # Each worker leases under an owner of its own ("<owner>/<i>"), so after a
            # failed round it can let go of whatever it may hold (release_leases).
            worker = self._worker(f"{self.owner}/{i}")
            self._tasks.append(asyncio.create_task(worker, name=f"forwarder-{i}"))

    async def stop(self) -> None:
        """Stop the workers. In-flight attempts are abandoned; their leases expire."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _worker(self, owner: str) -> None:
        while not self._stopping:
            try:
                terminal_id = await self.run_store(
                    self.store.claim_terminal, owner, self.clock_ms(), self.config.lease_ms
                )
                if terminal_id is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), self.config.poll_interval_ms / 1000
                        )
                    continue
                await self.drain_terminal(terminal_id, owner)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the worker alive; the payment stays pending
                log.exception("forwarder worker failed; retrying after the poll interval")
                self.stats.round_failed(exc, self.clock_ms())
                await asyncio.sleep(self.config.poll_interval_ms / 1000)
                await self._let_go(owner)

    async def _let_go(self, owner: str) -> None:
        """After a failed round the worker holds nothing it knows of, yet a claim (or a
        release) whose commit was lost with its connection may have left it a lease: give
        those back now rather than leave the terminal idle until the lease runs out."""
        try:
            released = await self.run_store(self.store.release_leases, owner)
        except Exception as exc:  # the store is still failing; the lease runs out anyway
            log.warning("could not release the leases of %s: %s", owner, exc)
            return
        if released:
            log.warning("released %d lease(s) %s held after a failed round", released, owner)
            self._wake.set()

    async def drain_terminal(self, terminal_id: str, owner: str | None = None) -> None:
        """Forward the terminal's due payments in capture order, then release it.
        ``owner`` is the lease holder (default: the forwarder's own name)."""
        owner = owner or self.owner
        try:
            for _ in range(self.config.payments_per_claim_max):
                payment = await self.run_store(self.store.next_pending, terminal_id)
                if payment is None or payment.next_attempt_at_ms > self.clock_ms():
                    return
                done = await self.forward_one(payment.payment_id, owner)
                self.stats.attempt_done()
                if not done:
                    return  # deferred: nothing may overtake it
        finally:
            await self.run_store(self.store.release_terminal, terminal_id, owner)

    async def forward_one(self, payment_id: str, owner: str | None = None) -> bool:
        """One attempt. True if the payment is final (or parked) afterwards."""
        now_ms = self.clock_ms()
        attempt = await self.run_store(
            self.store.begin_attempt, payment_id, owner or self.owner, now_ms, self.config.lease_ms
        )
        payment = attempt.payment
        if attempt.action is AttemptAction.DONE:
            self.notify(payment.terminal_id)
            return True
        self.notify(payment.terminal_id)  # the first attempt wrote a "forwarding" op
        self.stats.attempts += 1
        action = attempt.action
        if (
            action is AttemptAction.CHARGE
            and now_ms - payment.captured_at_ms >= self.config.lookup_first_after_ms
        ):
            action = AttemptAction.LOOKUP  # charged only if the processor does not know it
        try:
            result = await self._call(payment, action)
        except IdempotencyConflict as exc:
            self.stats.count_error("idempotency_conflict")
            log.error("payment %s parked: %s", payment_id, exc)
            await self.run_store(self.store.park, payment_id, f"idempotency conflict: {exc}")
            return True
        except RequestRefused as exc:
            # The same request would be refused again: parked for a person, so the
            # terminal's later payments are not held behind it for ever.
            self.stats.count_error("request_refused")
            log.error("payment %s parked: %s", payment_id, exc)
            await self.run_store(self.store.park, payment_id, f"request refused: {exc}")
            return True
        except (
            ProcessorUnavailable,
            OutcomeUnknown,
            ProtocolError,
            httpx.HTTPError,
            OSError,
        ) as exc:
            kind = "outcome_unknown" if isinstance(exc, OutcomeUnknown) else "unavailable"
            self.stats.count_error(kind)
            delay_ms = backoff_ms(payment.attempts + 1, self.config, self._rng.random())
            await self.run_store(
                self.store.defer, payment_id, self.clock_ms() + delay_ms, f"{kind}: {exc}"
            )
            return False
        if result is None:  # lookup found nothing and the deadline has passed
            change = StatusChange(
                payment_id,
                Status.EXPIRED,
                self.clock_ms(),
                "expired",
                "Not forwarded before its deadline; the card was not charged.",
            )
            ref = None
        else:
            approved = result.outcome == "approved"
            change = StatusChange(
                payment_id,
                Status.APPROVED if approved else Status.OFFLINE_DECLINED,
                self.clock_ms(),
                result.code[:64],
                result.message[:512],
            )
            ref = result.processor_ref
        if await self.run_store(self.store.record_outcome, change, ref, change.at_ms):
            self.stats.count_outcome(change.status.value)
        self.notify(payment.terminal_id)
        self.on_final()
        return True

    async def _call(self, payment: Payment, action: AttemptAction) -> ChargeResult | None:
        ours = Money(payment.amount_minor, payment.currency)
        if action is AttemptAction.LOOKUP:
            found = await self.processor.lookup(payment.payment_id)
            if found is not None:
                if found.amount != ours:
                    # The key holds another request's record (what parked this payment
                    # before): never adopt its outcome as ours.
                    raise IdempotencyConflict(
                        f"the processor's record under {payment.payment_id} is for "
                        f"{found.amount}, not {ours}"
                    )
                return found
            if payment.expires_at_ms is not None and self.clock_ms() >= payment.expires_at_ms:
                return None
        request = ChargeRequest(
            payment_id=payment.payment_id,
            merchant_id=payment.merchant_id,
            terminal_id=payment.terminal_id,
            amount=ours,
            sealed_card=payment.sealed,
            channel=payment.channel,
            captured_at_ms=payment.captured_at_ms,
        )
        return await self.processor.charge(request)
