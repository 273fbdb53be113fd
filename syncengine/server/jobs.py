"""Scheduled work (APScheduler 3, ``AsyncIOScheduler``): batch close, receipts, refund and
void retries, and the expiry sweep on a server that forwards nothing.

Every job is an idempotent ``async`` method that can also be called directly (tests,
``POST /v1/batches/close``). Jobs run with ``max_instances=1`` and ``coalesce=True``: a
slow run is never overlapped by the next one, and missed runs collapse into one. A job
that fails logs and waits for its next run; the work it left is still in the store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncengine.server.forwarder import Forwarder
from syncengine.server.model import Batch
from syncengine.server.receipts import ReceiptSender
from syncengine.server.refunds import Refunds
from syncengine.server.reports import due_closes
from syncengine.server.store import Store, StoreRunner

log = logging.getLogger("syncengine.server.jobs")


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """How often each job runs, in milliseconds."""

    expiry_sweep_interval_ms: int = 30_000
    expiry_sweep_rows_max: int = 500
    batch_check_interval_ms: int = 60_000
    receipts_interval_ms: int = 5_000
    refunds_interval_ms: int = 30_000


class Jobs:
    """The server's scheduled jobs."""

    def __init__(
        self,
        store: Store,
        runner: StoreRunner,
        clock_ms: Callable[[], int],
        forwarder: Forwarder | None,
        receipts: ReceiptSender,
        refunds: Refunds | None,
        notify: Callable[[str], None],
        config: JobsConfig | None = None,
    ) -> None:
        self.store = store
        self.run_store = runner
        self.clock_ms = clock_ms
        self.forwarder = forwarder
        self.receipts = receipts
        self.refunds = refunds
        self.notify = notify
        self.config = config or JobsConfig()
        self.scheduler: AsyncIOScheduler | None = None

    def start(self) -> None:
        """Schedule the jobs on the running event loop."""
        c = self.config
        scheduler = AsyncIOScheduler(timezone="UTC")
        jobs: list[tuple[Callable[[], Awaitable[object]], int]] = [
            (self.close_due_batches, c.batch_check_interval_ms),
            (self.send_receipts, c.receipts_interval_ms),
            (self.retry_refunds, c.refunds_interval_ms),
        ]
        if self.forwarder is None:  # a forwarding server expires through its forwarder
            jobs.append((self.expire_sweep, c.expiry_sweep_interval_ms))
        for fn, interval_ms in jobs:
            scheduler.add_job(
                fn,
                "interval",
                seconds=interval_ms / 1000,
                max_instances=1,
                coalesce=True,
                id=fn.__name__,
            )
        scheduler.start()
        self.scheduler = scheduler

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    async def expire_sweep(self) -> int:
        """Expire pending payments past their deadline that were never attempted (R5), on a
        server that forwards nothing. A forwarding server leaves them to its forwarder, which
        expires a late payment only after the processor said it holds no charge under its id
        (a server restored from a backup cannot know which payments it sent before)."""
        if self.forwarder is not None:
            return 0
        changes = await self.run_store(
            self.store.expire_due, self.clock_ms(), self.config.expiry_sweep_rows_max
        )
        for change in changes:
            payment = await self.run_store(self.store.get_payment, change.payment_id)
            if payment is not None:
                self.notify(payment.terminal_id)
        return len(changes)

    async def close_due_batches(self) -> list[Batch]:
        """Close every merchant's batches whose close time has passed (R11)."""
        closed: list[Batch] = []
        now_ms = self.clock_ms()
        for merchant in await self.run_store(self.store.list_merchants):
            last = await self.run_store(self.store.last_closed_day, merchant.merchant_id)
            for day, close_ms in due_closes(
                merchant.timezone, merchant.batch_close_local, now_ms, last
            ):
                batch = await self.run_store(
                    self.store.close_batch, merchant.merchant_id, day, close_ms, now_ms
                )
                if batch is not None:
                    log.info("closed batch %s of %s: %s", day, merchant.merchant_id, batch)
                    closed.append(batch)
        return closed

    async def send_receipts(self) -> int:
        """Deliver due receipts (R8)."""
        return await self.receipts.send_due()

    async def retry_refunds(self) -> int:
        """Finish pending refunds and act on terminals' void requests."""
        if self.refunds is None:
            return 0
        done = await self.refunds.retry_pending()
        tz: dict[str, str] = {
            m.merchant_id: m.timezone for m in await self.run_store(self.store.list_merchants)
        }
        done += await self.refunds.process_voids(lambda merchant_id: tz.get(merchant_id, "UTC"))
        return done
