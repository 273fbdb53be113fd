"""Email receipts through an outbox (R8): sent only after processing, once.

Theory of operation
-------------------
1. The outbox row is written in the same transaction as the payment's final status
   (``approved`` or ``offline_declined``; an expired payment was never processed and gets
   no receipt). So a receipt exists exactly when the outcome exists.
2. :meth:`ReceiptSender.send_due` claims due rows with a lease, sends each by SMTP and
   marks it sent. A failed send is retried with a capped backoff; a row is never sent
   again once marked sent. Retries are bounded: a permanent refusal (an SMTP 5xx reply,
   e.g. "550 no such user") ends the row ``undeliverable`` at once, and so does the
   ``attempts_max``-th failure of any kind (a relay down for days); the row keeps the
   last error.
3. SMTP has no idempotency key, so one window remains: a crash after the SMTP server
   accepted the message and before the row was marked sent resends it after the lease.
   The ``Message-ID`` is derived from the payment id, so the resend is the same message
   and mail systems that deduplicate by Message-ID show it once. docs/server.md says so.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, getaddresses

from syncengine.core.money import Money
from syncengine.server.model import ReceiptJob
from syncengine.server.store import Store, StoreRunner

log = logging.getLogger("syncengine.server.receipts")


@dataclass(frozen=True, slots=True)
class ReceiptConfig:
    """Where and how receipts are sent. ``smtp_host=None`` disables sending."""

    smtp_host: str | None = None
    smtp_port: int = 25
    sender: str = "receipts@syncengine.invalid"
    batch_rows_max: int = 50
    lease_ms: int = 60_000
    retry_base_ms: int = 5_000
    retry_cap_ms: int = 600_000
    smtp_timeout_ms: int = 10_000
    # Sends of one receipt at most: with the 10-minute cap, about two days of trying.
    attempts_max: int = 300


def permanent_failure(exc: Exception) -> bool:
    """True for an SMTP refusal that a retry cannot change: a 5xx reply (for every
    recipient, the sender, or the data). 4xx replies and connection failures are
    transient."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return bool(codes) and all(500 <= code < 600 for code in codes)
    if isinstance(exc, smtplib.SMTPResponseException):
        return 500 <= exc.smtp_code < 600
    return False


def single_recipient(email: str) -> str:
    """The one address a receipt goes to, or a permanent refusal (never retried).

    A capture's email is checked on the terminal only for an ``@`` and no spaces, so
    ``a@b.co,c@d.co`` passes; sent as the To: header, it was a receipt to two people.
    """
    found = getaddresses([email])
    if len(found) != 1 or found[0][1] != email or email.count("@") != 1:
        raise smtplib.SMTPRecipientsRefused(
            {email: (553, b"not one email address; the receipt is not sent")}
        )
    return email


def message_id(payment_id: str) -> str:
    """The stable Message-ID of a payment's receipt (a resend is the same message)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in payment_id)
    return f"<receipt.{safe}@syncengine>"


def build_receipt(job: ReceiptJob, sender: str) -> EmailMessage:
    """The receipt email for one processed payment."""
    amount = Money(job.amount_minor, job.currency)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = job.email
    msg["Message-ID"] = message_id(job.payment_id)
    msg["Date"] = formatdate(job.processed_at_ms / 1000, usegmt=True)
    if job.status == "approved":
        msg["Subject"] = f"Your receipt: {amount} approved"
        outcome = "was approved"
    else:
        msg["Subject"] = f"Your card payment of {amount} was declined"
        outcome = f"was declined by the card issuer ({job.code})"
    msg.set_content(
        f"Your payment of {amount} with {job.brand} ending {job.last4} {outcome}.\n"
        f"Merchant: {job.merchant_id}\nPayment: {job.payment_id}\n"
    )
    return msg


class ReceiptSender:
    """Delivers due outbox rows by SMTP."""

    def __init__(
        self,
        store: Store,
        runner: StoreRunner,
        config: ReceiptConfig,
        clock_ms: Callable[[], int],
    ) -> None:
        self.store = store
        self.run_store = runner
        self.config = config
        self.clock_ms = clock_ms
        self.sent = 0
        self.failed = 0  # failed sends (each retried or ended undeliverable)
        self.undeliverable = 0
        self._lock = asyncio.Lock()

    async def send_due(self) -> int:
        """Send every due receipt (bounded per call); returns how many were sent."""
        if self.config.smtp_host is None:
            return 0
        async with self._lock:  # one sender at a time in this process
            jobs = await self.run_store(
                self.store.claim_receipts,
                self.clock_ms(),
                self.config.lease_ms,
                self.config.batch_rows_max,
            )
            sent = 0
            for job in jobs:
                try:
                    await asyncio.to_thread(self._send, job)
                except (OSError, smtplib.SMTPException) as exc:
                    self.failed += 1
                    refused = permanent_failure(exc)
                    if refused or job.attempts >= self.config.attempts_max:
                        why = "refused" if refused else "failed too often"
                        log.warning(
                            "receipt for %s undeliverable (%s after %d attempts): %s",
                            job.payment_id,
                            why,
                            job.attempts,
                            exc,
                        )
                        await self.run_store(
                            self.store.receipt_undeliverable,
                            job.payment_id,
                            f"{why}: {exc}",
                            self.clock_ms(),
                        )
                        self.undeliverable += 1
                        continue
                    delay = min(
                        self.config.retry_cap_ms,
                        self.config.retry_base_ms * 2 ** min(job.attempts - 1, 20),
                    )
                    log.warning("receipt for %s not sent (%s); retry later", job.payment_id, exc)
                    await self.run_store(
                        self.store.receipt_failed, job.payment_id, self.clock_ms() + delay, str(exc)
                    )
                    continue
                await self.run_store(self.store.receipt_sent, job.payment_id, self.clock_ms())
                self.sent += 1
                sent += 1
            return sent

    def _send(self, job: ReceiptJob) -> None:
        assert self.config.smtp_host is not None
        recipient = single_recipient(job.email)
        with smtplib.SMTP(
            self.config.smtp_host,
            self.config.smtp_port,
            timeout=self.config.smtp_timeout_ms / 1000,
        ) as smtp:
            # The envelope names the one customer: the To: header is never read for
            # recipients (send_message would send to every address a header lists).
            smtp.send_message(
                build_receipt(job, self.config.sender),
                from_addr=self.config.sender,
                to_addrs=[recipient],
            )
