"""What waits, and for how long: gauges for ``/metrics``, read from the database when scraped.

Events not yet published to RabbitMQ (by agency), provider callbacks stored but not yet processed (by
provider), webhook deliveries still to be made, and reconciliation exceptions still open (by reason). The
ages are what to alert on: an agency whose oldest unpublished event keeps ageing has a relay problem (no
broker, or a queue that refuses its messages), an inbox row that ages was not processed, and so on.

The values are the database's, so every service process reports the same ones (aggregate with ``max``).
A scrape reads them at most every ``REFRESH_SECONDS`` per process; a read that fails or takes more than
``TIMEOUT_SECONDS`` is counted and logged, and the previous values stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import asyncpg
import prometheus_client

from paysvc.queries import Q

log = logging.getLogger(__name__)

REFRESH_SECONDS = 10.0
TIMEOUT_SECONDS = 5.0
OUTBOX_COUNT_CAP = 10_000  # an agency's unpublished events are counted up to this many (costs ~15 ms)

OUTBOX_WAITING = prometheus_client.Gauge(
    "paysvc_outbox_unpublished_events", "Events not yet published to RabbitMQ, by agency (counted up to "
    f"{OUTBOX_COUNT_CAP:,}; with no broker configured they all wait here)", ["agency"])
OUTBOX_OLDEST = prometheus_client.Gauge(
    "paysvc_outbox_oldest_unpublished_seconds", "Age of the agency's next event to publish (0: none waiting)",
    ["agency"])
INBOX_WAITING = prometheus_client.Gauge(
    "paysvc_inbox_unprocessed_callbacks", "Provider callbacks stored but not yet processed, by provider",
    ["provider"])
INBOX_OLDEST = prometheus_client.Gauge(
    "paysvc_inbox_oldest_unprocessed_seconds", "Age of the oldest unprocessed callback, by provider (0: none)",
    ["provider"])
WEBHOOKS_WAITING = prometheus_client.Gauge(
    "paysvc_webhook_deliveries_pending", "Webhook deliveries still to be made (first tries and retries)")
WEBHOOKS_OLDEST = prometheus_client.Gauge(
    "paysvc_webhook_oldest_pending_seconds", "Age of the oldest pending webhook delivery (0: none)")
EXCEPTIONS_OPEN = prometheus_client.Gauge(
    "paysvc_reconciliation_open_exceptions", "Reconciliation exceptions not yet resolved, by reason", ["reason"])
EXCEPTIONS_OLDEST = prometheus_client.Gauge(
    "paysvc_reconciliation_oldest_open_exception_seconds", "Age of the oldest open exception, by reason",
    ["reason"])
READ_FAILURES = prometheus_client.Counter(
    "paysvc_backlog_read_failures_total", "Times the backlog gauges could not be read from the database")


class Backlog:
    """The gauges' reader for one process; ``refresh`` before rendering the metrics."""

    def __init__(self) -> None:
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, pool: asyncpg.Pool, providers: Iterable[str]) -> None:
        """Read the backlog unless it was read less than ``REFRESH_SECONDS`` ago. Never raises (but a
        cancellation)."""
        async with self._lock:  # concurrent scrapes read once
            if time.monotonic() - self._read_at < REFRESH_SECONDS:
                return
            self._read_at = time.monotonic()  # a failed read is not retried before the next interval either
            try:
                async with asyncio.timeout(TIMEOUT_SECONDS), pool.acquire() as conn:
                    outbox = await conn.fetch(Q.backlog_outbox, OUTBOX_COUNT_CAP)
                    inbox = await conn.fetch(Q.backlog_inbox)
                    webhooks = await conn.fetchrow(Q.backlog_webhooks)
                    exceptions = await conn.fetch(Q.backlog_exceptions)
            except Exception as exc:  # the scrape still answers, with the values of the last good read
                READ_FAILURES.inc()
                log.warning("metrics: could not read the backlog from the database (%s: %s); its gauges keep "
                            "their last values", type(exc).__name__, exc)
                return
        _set(OUTBOX_WAITING, OUTBOX_OLDEST, {r["code"]: (r["waiting"], r["oldest_seconds"]) for r in outbox}, ())
        _set(INBOX_WAITING, INBOX_OLDEST, {r["provider"]: (r["waiting"], r["oldest_seconds"]) for r in inbox},
             providers)
        WEBHOOKS_WAITING.set(webhooks["waiting"])
        WEBHOOKS_OLDEST.set(max(0.0, webhooks["oldest_seconds"] or 0.0))
        _set(EXCEPTIONS_OPEN, EXCEPTIONS_OLDEST, {r["reason"]: (r["open"], r["oldest_seconds"]) for r in exceptions},
             ())


def _set(count: prometheus_client.Gauge, age: prometheus_client.Gauge, values: dict[str, tuple[int, float | None]],
         always: Iterable[str]) -> None:
    """Replace the gauges' series with ``values`` (label -> (count, age)); labels in ``always`` are shown at 0
    when nothing of theirs waits, others disappear."""
    count.clear()
    age.clear()
    for label in always:
        count.labels(label).set(0)
        age.labels(label).set(0)
    for label, (n, seconds) in values.items():
        count.labels(label).set(n)
        age.labels(label).set(max(0.0, seconds or 0.0))
