"""Polling pull providers (Bakong): ask about every code still payable or recently expired.

Codes are claimed with a short lease under ``FOR UPDATE SKIP LOCKED``, so several service instances
never ask about the same md5 at once. A provider that answers 429 or 5xx makes the poller back off.

An item of an answer that cannot be read is not an outage: the provider skips it and reports it, the poller
logs it at ERROR (with its md5 and why) and counts it each time it is seen, and the code stays open, asked
about again on every pass until its grace period ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import prometheus_client

from paysvc.inbox import capture_notices
from paysvc.invoicing import now_utc
from paysvc.queries import Q
from providers import PendingKhqr, Provider, ProviderUnavailable, UnreadableItem

log = logging.getLogger(__name__)

UNREADABLE = prometheus_client.Counter(
    "paysvc_poll_unreadable_items_total", "Items of a pull provider's answer that could not be read and were "
    "skipped, by provider and whether the provider said the code was paid (paid=yes: money moved that the "
    "poll could not book)", ["provider", "paid"])

LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class PollPolicy:
    grace: timedelta = timedelta(minutes=30)        # keep asking this long after a code expired
    min_interval: timedelta = timedelta(seconds=5)  # don't ask about one code more often than this
    batch: int = 500                                # codes claimed per pass (asked ≤ 50 per API call)


async def poll_once(pool: asyncpg.Pool, provider: Provider, policy: PollPolicy) -> tuple[int, int]:
    """One pass: claim due codes, ask the provider, capture what it reports. Returns (asked, captured)."""
    now = now_utc()
    rows = await pool.fetch(Q.poll_claim, now, now - policy.grace, now - policy.min_interval, policy.batch,
                            now + LEASE)
    if not rows:
        return 0, 0
    pending = [PendingKhqr(md5=r["md5"], bill_number=r["bill_number"], currency=r["currency"], amount=r["amount"],
                           to_account=r["to_account"], expires_at=r["expires_at"]) for r in rows]
    md5s = [r["md5"] for r in rows]
    try:
        result = await provider.poll(pending)
    finally:
        # Asked or not, the lease ends now; a failed pass is retried after min_interval.
        await pool.execute(Q.poll_release, md5s, now_utc())
    _report_unreadable(provider.name, result.unreadable)
    results = await capture_notices(pool, result.notices, source="poll")
    return len(rows), sum(r.created for r in results)


def _report_unreadable(provider: str, items: Sequence[UnreadableItem]) -> None:
    for item in items:
        UNREADABLE.labels(provider, "yes" if item.paid else "no").inc()
        log.error("%s: skipped an answer item for md5 %s%s: %s", provider, item.md5 or "(none)",
                  " that says it was paid (money moved that this poll cannot book; the code stays open and is "
                  "asked again)" if item.paid else "", item.reason,
                  extra={"provider": provider, "md5": item.md5, "paid": item.paid,
                         "transaction_id": item.transaction_id})


class Poller:
    """The background loop for one pull provider, with backoff on 429 and 5xx."""

    def __init__(self, pool: asyncpg.Pool, provider: Provider, policy: PollPolicy, interval: float) -> None:
        self.pool, self.provider, self.policy, self.interval = pool, provider, policy, interval
        self._failures = 0

    async def run(self) -> None:
        while True:
            delay = self.interval
            try:
                asked, captured = await self.poll_until_drained()
                self._failures = 0
                if captured:
                    log.info("%s poll: %d captured", self.provider.name, captured)
            except ProviderUnavailable as exc:
                self._failures += 1
                delay = exc.retry_after or min(self.interval * 2 ** self._failures, 300)
                log.warning("%s unavailable (%s); next poll in %.0fs", self.provider.name, exc, delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failures += 1
                delay = min(self.interval * 2 ** self._failures, 300)
                log.exception("%s poll failed; next poll in %.0fs", self.provider.name, delay)
            await asyncio.sleep(delay)

    async def poll_until_drained(self) -> tuple[int, int]:
        asked = captured = 0
        while True:
            a, c = await poll_once(self.pool, self.provider, self.policy)
            asked, captured = asked + a, captured + c
            if a < self.policy.batch:
                return asked, captured
