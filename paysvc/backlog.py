"""What waits, and for how long: gauges for ``/metrics``, read from the database when scraped.

Events not yet published to RabbitMQ (by agency), provider callbacks stored but not yet processed (by
provider), webhook deliveries still to be made, and reconciliation exceptions still open (by reason). The
ages are what to alert on: an agency whose oldest unpublished event keeps ageing has a relay problem (no
broker, or a queue that refuses its messages), an inbox row that ages was not processed, and so on.

The values are the database's, so every service process reports the same ones (aggregate with ``max``),
but for the ages, measured on each process's clock.
A scrape reads them at most every ``REFRESH_SECONDS`` per process and waits for the read at most
``WAIT_SECONDS`` (a slower read finishes in the background, for the next scrape); a read that fails or
takes more than ``READ_TIMEOUT_SECONDS`` is counted and logged, the previous values stay, and
``paysvc_backlog_last_read_timestamp_seconds`` says how old they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime

import asyncpg
import prometheus_client

from paysvc.invoicing import now_utc
from paysvc.queries import Q

log = logging.getLogger(__name__)

REFRESH_SECONDS = 10.0
WAIT_SECONDS = 5.0           # a scrape waits this long for a read, then answers with the last values
READ_TIMEOUT_SECONDS = 30.0  # a read still running after this is given up (and counted as failed)
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
WEBHOOKS_OVERDUE = prometheus_client.Gauge(
    "paysvc_webhook_deliveries_overdue_seconds", "How long the most overdue pending webhook delivery has been due "
    "(0: none due; a retry scheduled for later is not overdue)")
EXCEPTIONS_OPEN = prometheus_client.Gauge(
    "paysvc_reconciliation_open_exceptions", "Reconciliation exceptions not yet resolved, by reason", ["reason"])
EXCEPTIONS_OLDEST = prometheus_client.Gauge(
    "paysvc_reconciliation_oldest_open_exception_seconds", "Age of the oldest open exception, by reason",
    ["reason"])
READ_FAILURES = prometheus_client.Counter(
    "paysvc_backlog_read_failures_total", "Times the backlog gauges could not be read from the database in time")
LAST_READ = prometheus_client.Gauge(
    "paysvc_backlog_last_read_timestamp_seconds", "When the backlog gauges were last read (Unix time): they keep "
    "their values while reads fail, so alert when this falls behind")


class Backlog:
    """The gauges' reader for one process; ``refresh`` before rendering the metrics."""

    def __init__(self) -> None:
        self._started_at = float("-inf")
        self._reading: asyncio.Task | None = None

    async def refresh(self, pool: asyncpg.Pool, providers: Iterable[str]) -> None:
        """Start a read unless one ran less than ``REFRESH_SECONDS`` ago or is still running, and wait for
        the running one at most ``WAIT_SECONDS``. Never raises (but a cancellation).

        The read runs as a task of its own, not cancelled when the scrape stops waiting: with the database
        host gone silent, giving a pooled connection back after a cancelled query can wait minutes for the
        cancel request's own connection, and the scrape must not (nor the scrapes after it)."""
        if self._reading is None and time.monotonic() - self._started_at >= REFRESH_SECONDS:
            self._started_at = time.monotonic()
            self._reading = asyncio.create_task(self._read(pool, list(providers)))
            self._reading.add_done_callback(self._done)
        if self._reading is not None:
            await asyncio.wait({self._reading}, timeout=WAIT_SECONDS)

    def _done(self, task: asyncio.Task) -> None:
        self._reading = None

    async def close(self) -> None:
        """Stop a read still running (before the pool closes)."""
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)

    async def _read(self, pool: asyncpg.Pool, providers: list[str]) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                async with pool.acquire() as conn:
                    outbox = await conn.fetch(Q.backlog_outbox, OUTBOX_COUNT_CAP)
                    inbox = await conn.fetch(Q.backlog_inbox)
                    webhooks = await conn.fetchrow(Q.backlog_webhooks)
                    exceptions = await conn.fetch(Q.backlog_exceptions)
            now = now_utc()
            values = (_values(outbox, "code", now, ()), _values(inbox, "provider", now, providers),
                      (webhooks["waiting"], _age(now, webhooks["since"])), _values(exceptions, "reason", now, ()))
        except Exception as exc:  # scrapes still answer, with the values of the last good read
            READ_FAILURES.inc()
            log.warning("metrics: could not read the backlog from the database (%s: %s); its gauges keep "
                        "their last values", type(exc).__name__, exc)
            return
        outbox_values, inbox_values, (pending, overdue), exception_values = values
        _set(OUTBOX_WAITING, OUTBOX_OLDEST, outbox_values)
        _set(INBOX_WAITING, INBOX_OLDEST, inbox_values)
        WEBHOOKS_WAITING.set(pending)
        WEBHOOKS_OVERDUE.set(overdue)
        _set(EXCEPTIONS_OPEN, EXCEPTIONS_OLDEST, exception_values)
        LAST_READ.set(time.time())


def _age(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


def _values(rows: list[asyncpg.Record], key: str, now: datetime,
            always: Iterable[str]) -> dict[str, tuple[int, float]]:
    """label -> (count, age) from ``rows`` (``key``, waiting, since); labels in ``always`` at 0 when absent."""
    out = {label: (0, 0.0) for label in always}
    out.update({r[key]: (r["waiting"], _age(now, r["since"])) for r in rows})
    return out


def _set(count: prometheus_client.Gauge, age: prometheus_client.Gauge, values: dict[str, tuple[int, float]]) -> None:
    """Replace the gauges' series with ``values``: a label not among them disappears."""
    count.clear()
    age.clear()
    for label, (n, seconds) in values.items():
        count.labels(label).set(n)
        age.labels(label).set(seconds)
