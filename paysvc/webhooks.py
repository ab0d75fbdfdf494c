"""Webhooks to portals: endpoints, the fan-out of outbox events into deliveries, and the sending worker.

Every delivery is a row. The fan-out step turns each agency's new events into one row per matching endpoint;
the worker claims due rows (SKIP LOCKED, a lease so a crashed worker's rows are taken again, a cap on how many
are in flight per endpoint), sends each with its own timeout, and records every attempt. Nothing waits for
an endpoint: a slow one ties up only its own few in-flight deliveries.

Signature: ``Paysvc-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (the sandbox
callback scheme). Retries after 1 min, 5 min, 30 min, 2 h, 6 h, 12 h, 12 h: 8 attempts over ~32.6 hours,
then ``failed``; ``replay`` sends once more by hand.

Destinations: only public internet addresses (paysvc/webhook_targets.py), checked at registration and, since a
name can resolve anywhere, again at every delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from paysvc import outbox
from paysvc.background import Failures, pause, stop_if_cancelled
from paysvc.pii import PiiCipher
from paysvc.queries import Q
from paysvc.relay import message_body
from paysvc.webhook_targets import Blocked, Destinations, host_refusal

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Paysvc-Signature"
RETRY_SCHEDULE = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2),
                  timedelta(hours=6), timedelta(hours=12), timedelta(hours=12))
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
FANOUT_STEP = 500


def signature(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, t: int) -> str:
    return f"t={t},v1={signature(secret, body, t)}"


def next_attempt(attempts_made: int, now: datetime) -> datetime:
    """When to try again after ``attempts_made`` failed attempts (the last schedule step repeats)."""
    return now + RETRY_SCHEDULE[min(attempts_made, len(RETRY_SCHEDULE)) - 1]


def url_problem(url: str, destinations: Destinations) -> str | None:
    """Why ``url`` cannot be a webhook endpoint, or ``None``. ``http://`` to the local host only when
    ``destinations`` allow loopback (``PAYSVC_WEBHOOKS_ALLOW_INSECURE_LOCALHOST``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "url is not a valid URL"
    if not host:
        return "url needs a host"
    if parts.username or parts.password:
        return "url must not carry credentials"
    if parts.scheme != "https" and not (parts.scheme == "http" and destinations.allow_loopback
                                        and host in LOCAL_HOSTS):
        return "url must start with https:// (deliveries carry payment data)"
    why = host_refusal(url, destinations)
    if why:
        return (f"url refused: {why}. Webhooks go only to public internet addresses: give your receiver's "
                "public https name (for a receiver on a private network, ask the operator to allow that network)")
    return None


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def endpoint_aad(endpoint_id: uuid.UUID) -> str:
    """What a webhook secret's encryption is bound to (its endpoint)."""
    return f"webhook:{endpoint_id}"


async def create_endpoint(conn: asyncpg.Connection, cipher: PiiCipher, *, agency_id: int, url: str,
                          event_types: list[str], description: str, now: datetime) -> tuple[asyncpg.Record, str]:
    """Store a new endpoint with a fresh secret (encrypted); return its row and the secret, shown once."""
    endpoint_id = uuid.uuid4()
    secret = new_secret()
    key_id, blob = cipher.encrypt({"secret": secret}, aad=endpoint_aad(endpoint_id))
    # Number what has committed so far: the endpoint starts after it.
    await outbox.sequence(conn, [agency_id])
    row = await conn.fetchrow(Q.webhooks_create, endpoint_id, agency_id, url, event_types, description, key_id, blob,
                              now)
    return row, secret


@dataclass(frozen=True)
class Attempt:
    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    ok: bool
    status_code: int | None
    latency_ms: int
    error: str | None
    status: str                    # the delivery's status after this attempt
    next_attempt_at: datetime | None


class WebhookWorker:
    """Fans events out to endpoints and sends due deliveries. Safe on several instances at once."""

    def __init__(self, pool: asyncpg.Pool, cipher: PiiCipher, session: aiohttp.ClientSession, *,
                 destinations: Destinations = Destinations(), timeout: float = 10.0, per_endpoint: int = 4,
                 max_in_flight: int = 200) -> None:
        """``session`` should come from ``webhook_targets.client_session(destinations)``: its resolver keeps
        names from reaching other addresses; IP literals are checked here against ``destinations``."""
        self._pool = pool
        self._destinations = destinations
        self._cipher = cipher
        self._session = session
        self._timeout = timeout
        self._per_endpoint = per_endpoint
        self._max_in_flight = max_in_flight
        self._lease = timedelta(seconds=timeout * 3 + 30)
        self._secrets: dict[tuple[uuid.UUID, str], str] = {}
        self._in_flight: set[asyncio.Task] = set()

    async def fan_out(self, now: datetime) -> int:
        """Create deliveries for new events; return how many were created."""
        async with self._pool.acquire() as conn:
            await outbox.sequence(conn)  # deliveries follow the agency's seq: number what just committed
        created = 0
        while True:
            row = await self._pool.fetchrow(Q.webhooks_fanout, now, FANOUT_STEP, MAX_ATTEMPTS)
            created += row["created"]
            if not row["endpoints"]:
                return created

    async def claim(self, now: datetime, limit: int) -> list[asyncpg.Record]:
        return await self._pool.fetch(Q.webhooks_claim, now, limit, self._per_endpoint, now + self._lease)

    def _secret(self, row: asyncpg.Record) -> str:
        cache_key = (row["endpoint_id"], row["secret_key_id"])
        if cache_key not in self._secrets:
            self._secrets[cache_key] = self._cipher.decrypt(row["secret_key_id"], bytes(row["secret_blob"]),
                                                            aad=endpoint_aad(row["endpoint_id"]))["secret"]
        return self._secrets[cache_key]

    async def send(self, row: asyncpg.Record, now: datetime) -> Attempt:
        """One attempt for a claimed delivery, recorded whatever happens."""
        body = message_body(row)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self._secret(row), body, int(time.time())),
            "Paysvc-Event-Id": str(row["id"]),
            "Paysvc-Event-Type": row["type"],
            "Paysvc-Delivery-Id": str(row["delivery_id"]),
        }
        status_code: int | None = None
        error: str | None = None
        started = time.perf_counter()
        # aiohttp connects to an IP literal without asking the resolver, so the host is judged here too.
        refused = host_refusal(row["url"], self._destinations)
        if refused:
            error = f"not sent: {refused}; webhooks go only to public internet addresses"[:500]
        else:
            try:
                async with self._session.post(row["url"], data=body, headers=headers, allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout)) as response:
                    status_code = response.status
                    await response.content.read(1024)  # a little of the answer; the rest is not ours to keep
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}"
            except asyncio.TimeoutError:
                error = f"no answer within {self._timeout:g} s"
            except aiohttp.ClientConnectorError as exc:
                blocked = isinstance(exc.os_error, Blocked)  # the resolver found only forbidden addresses
                error = (exc.os_error.strerror if blocked else f"{type(exc).__name__}: {exc}")[:500]
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            except (ValueError, OSError) as exc:  # e.g. the resolver's UnicodeError for a name it cannot encode
                log.warning("webhook delivery %s to %s: unexpected %s", row["delivery_id"], row["url"],
                            type(exc).__name__, exc_info=True)
                error = f"{type(exc).__name__}: {exc}"[:500]
        latency_ms = int((time.perf_counter() - started) * 1000)
        ok = error is None
        attempted_at = now + timedelta(milliseconds=latency_ms)
        result = await self._pool.fetchrow(
            Q.webhooks_record_attempt, row["delivery_id"], attempted_at, status_code, latency_ms, error, ok,
            next_attempt(row["attempts"] + 1, attempted_at), row["replay_requested"])
        if not ok:
            log.info("webhook delivery %s to %s failed: %s", row["delivery_id"], row["url"], error)
        status = result["status"] if result else "cancelled"
        return Attempt(row["delivery_id"], row["endpoint_id"], ok, status_code, latency_ms, error, status,
                       result["next_attempt_at"] if result and status == "pending" else None)

    async def run_once(self, now: datetime | None = None, limit: int = 100) -> list[Attempt]:
        """Fan out, then send every due delivery (concurrently) and wait for all of them. For tests and tools."""
        now = now or datetime.now(timezone.utc)
        await self.fan_out(now)
        rows = await self.claim(now, limit)
        return list(await asyncio.gather(*(self.send(r, now) for r in rows)))

    async def run(self, interval: float) -> None:
        """Forever: fan out, claim what is due, start each send as its own task, never waiting for one."""
        # Found by an operator's walk-through: while the database was down, every step logged its traceback, once
        # a second; it now backs off and says the same failure in one line (as every background job does).
        failures = Failures("webhooks", interval)
        try:
            while True:
                stop_if_cancelled()
                delay = interval
                try:
                    now = datetime.now(timezone.utc)
                    await self.fan_out(now)
                    room = self._max_in_flight - len(self._in_flight)
                    if room > 0:
                        for row in await self.claim(now, room):
                            task = asyncio.create_task(self.send(row, now))
                            self._in_flight.add(task)
                            task.add_done_callback(self._done)
                    failures.succeeded()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    delay = failures.failed(exc)
                await pause(delay)
        finally:
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: a send failed to record", exc_info=task.exception())
