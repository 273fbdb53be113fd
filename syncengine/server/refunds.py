"""Refunds (R9) and terminal voids, exactly once against the processor.

A refund is recorded ``pending`` first, in a transaction that checks the rules of
:func:`syncengine.core.lifecycle.check_refund` on a fresh read (so two concurrent refunds
cannot exceed the amount); then the processor is called with the refund id as its
idempotency key; then it is marked ``done`` and a ``refund`` op is appended to
``server/T``. A crash in between leaves it ``pending`` and :meth:`Refunds.retry_pending`
finishes it under the same key. A processor that holds another request under that key
(``IdempotencyConflict``) cannot be retried out of it: the refund is ``parked`` for a person
(:meth:`Refunds.resolve`), its amount still counted as refunded.

A terminal's ``void_request`` voids a same-day standalone payment: once the payment is
approved it becomes a full refund with the id ``void:<payment_id>``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from syncengine.core.errors import ProtocolError, Refused
from syncengine.core.lifecycle import RefundState, check_refund, parse_status
from syncengine.core.money import Money
from syncengine.processor.api import (
    IdempotencyConflict,
    Processor,
    ProcessorError,
    RefundRequest,
    RequestRefused,
)
from syncengine.server.model import Payment, Refund
from syncengine.server.reports import day_of
from syncengine.server.store import Store, StoreRunner

log = logging.getLogger("syncengine.server.refunds")

REFUND_METHODS = frozenset({"original_payment", "card_present"})
PENDING_BATCH_MAX = 50


def rules_for(
    amount: Money, now_ms: int, card_present_required: bool, card_present: bool
) -> Callable[[Payment, list[Refund]], None]:
    """The R9 check, to run inside the store's refund transaction."""

    def rules(payment: Payment, refunds: list[Refund]) -> None:
        state = RefundState(Money(payment.amount_minor, payment.currency))
        for r in refunds:
            if r.state == REFUND_REFUSED:
                continue  # the processor refused it: nothing was refunded
            state = state.add(r.refund_id, Money(r.amount_minor, r.currency))
        check_refund(
            status=parse_status(payment.status),
            refunds=state,
            amount=amount,
            processed_at_ms=payment.processed_at_ms,
            now_ms=now_ms,
            dispute_open=payment.dispute_open,
            card_present_required=card_present_required,
            card_present=card_present,
        )

    return rules


REFUND_REFUSED = "refused"  # a refund's end when the processor refused it for good


class Refunds:
    """Makes refunds and voids through the processor."""

    def __init__(
        self,
        store: Store,
        runner: StoreRunner,
        processor: Processor,
        clock_ms: Callable[[], int],
        notify: Callable[[str], None],
    ) -> None:
        self.store = store
        self.run_store = runner
        self.processor = processor
        self.clock_ms = clock_ms
        self.notify = notify
        # One void pass at a time in this process (the job and a kick after a merge):
        # the refund id makes overlap safe anyway, the lock makes it cheap.
        self._voids_lock = asyncio.Lock()
        self._retry_lock = asyncio.Lock()  # one retry pass at a time (job or void demand)

    async def refund(
        self,
        payment_id: str,
        refund_id: str,
        amount: Money,
        actor: str,
        method: str = "original_payment",
        card_present: bool = False,
    ) -> Refund:
        """Refund ``amount`` of a payment; raises :class:`Refused` with a clear reason."""
        if method not in REFUND_METHODS:
            raise Refused(
                "unknown_method", f"refund method must be one of {sorted(REFUND_METHODS)}"
            )
        now_ms = self.clock_ms()
        rules = rules_for(amount, now_ms, method == "card_present", card_present)
        refund = await self.run_store(
            self.store.begin_refund, payment_id, refund_id, amount.minor, actor, now_ms, rules
        )
        if refund.state == "pending":
            refund = await self._finish(refund)
        return refund

    async def _finish(self, refund: Refund) -> Refund:
        try:
            await self.processor.refund(
                RefundRequest(
                    refund.payment_id, refund.refund_id, Money(refund.amount_minor, refund.currency)
                )
            )
        except Refused as exc:
            # The processor's final word (no such charge, more than was charged, ...): the
            # refund ends refused and its amount is refundable again.
            log.warning("refund %s refused by the processor: %s", refund.refund_id, exc)
            await self.run_store(
                self.store.refuse_refund,
                refund.refund_id,
                exc.reason,
                str(exc),
                "processor",
                self.clock_ms(),
            )
            await self._notify_terminal_of(refund)  # a void's refusal reaches its terminal
            raise
        except (IdempotencyConflict, RequestRefused) as exc:
            # The processor holds another request under this refund id, or refuses the
            # request as such: retrying cannot change either. Parked for a person (POST
            # .../refunds/{id}/resolve); its amount stays counted as refunded meanwhile, so
            # nothing can be refunded twice.
            log.error("refund %s parked, needs a person: %s", refund.refund_id, exc)
            why = (
                "idempotency_conflict"
                if isinstance(exc, IdempotencyConflict)
                else ("request_refused")
            )
            return await self.run_store(
                self.store.park_refund,
                refund.refund_id,
                f"{why}: {exc}",
                "processor",
                self.clock_ms(),
            )
        except (ProcessorError, ProtocolError, OSError) as exc:
            log.warning("refund %s pending, processor failed: %s", refund.refund_id, exc)
            return refund  # stays pending; retry_pending finishes it under the same key
        done = await self.run_store(self.store.finish_refund, refund.refund_id, self.clock_ms())
        await self._notify_terminal_of(done)
        return done

    async def resolve(self, refund_id: str, action: str, actor: str, note: str | None) -> Refund:
        """A person's decision on a parked refund (see :meth:`Store.resolve_refund`);
        ``retry`` asks the processor again at once, under the same id."""
        refund = await self.run_store(
            self.store.resolve_refund, refund_id, action, actor, note, self.clock_ms()
        )
        if action == "retry" and refund.state == "pending":
            return await self._finish(refund)
        await self._notify_terminal_of(refund)  # its refund op, or its void's refusal
        return refund

    async def _notify_terminal_of(self, refund: Refund) -> None:
        payment = await self.run_store(self.store.get_payment, refund.payment_id)
        if payment is not None:
            self.notify(payment.terminal_id)

    async def retry_pending(self) -> int:
        """Finish refunds left pending by a crash or a processor outage."""
        async with self._retry_lock:
            done = 0
            for refund in await self.run_store(self.store.pending_refunds, PENDING_BATCH_MAX):
                try:
                    if (await self._finish(refund)).state == "done":
                        done += 1
                except Refused:
                    continue  # ended refused (logged); the others go on
            return done

    async def process_voids(self, timezone_of: Callable[[str], str]) -> int:
        """Act on terminals' void requests (same-day standalone payments only)."""
        async with self._voids_lock:
            return await self._process_voids(timezone_of)

    async def _process_voids(self, timezone_of: Callable[[str], str]) -> int:
        acted = 0
        for payment_id, terminal_id, requested_at_ms in await self.run_store(
            self.store.pending_voids, PENDING_BATCH_MAX
        ):
            payment = await self.run_store(self.store.get_payment, payment_id)
            now_ms = self.clock_ms()
            if payment is None or payment.terminal_id != terminal_id:
                await self._refuse_void(payment_id, "refused_unknown", now_ms)
                continue
            if payment.status in ("captured", "forwarding"):
                continue  # not processed yet: void once it is (R9: no refund before)
            tz = timezone_of(payment.merchant_id)
            if payment.status != "approved":
                await self._refuse_void(payment_id, "not_charged", now_ms)
                continue
            same_day = day_of(payment.captured_at_ms, tz) == day_of(requested_at_ms, tz)
            if payment.channel != "standalone" or not same_day:
                await self._refuse_void(payment_id, "refused_rules", now_ms)
                continue
            remaining = payment.amount_minor - payment.refunded_minor
            if remaining > 0:
                try:
                    await self.refund(
                        payment_id,
                        f"void:{payment_id}",
                        Money(remaining, payment.currency),
                        f"terminal:{terminal_id}",
                    )
                except Refused as exc:
                    await self._refuse_void(payment_id, f"refused_{exc.reason}", now_ms)
                    continue
            await self.run_store(self.store.finish_void, payment_id, "voided", now_ms)
            acted += 1
        return acted

    async def _refuse_void(self, payment_id: str, state: str, now_ms: int) -> None:
        """End a void unmade; the terminal hears it (a ``void_refused:`` status op)."""
        log.info("void of %s refused: %s", payment_id, state)
        told = await self.run_store(self.store.finish_void, payment_id, state, now_ms)
        if told is not None:
            self.notify(told)
