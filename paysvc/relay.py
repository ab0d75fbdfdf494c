"""The outbox relay: committed events to the RabbitMQ topic exchange, signed, in order per agency.

One pass: in one transaction, claim agencies with unpublished events (a transaction-scoped advisory lock
per agency, skipped when another relay holds it), read each claimed agency's next unpublished events in
seq order, publish them on one channel with publisher confirms (``mandatory``: a message no queue takes
comes back, one the broker refuses is nacked; its agency's queue is declared again and it is sent once more,
or it stays unpublished and that agency backs off alone), wait for every confirm, then mark those a queue took
published with one UPDATE and commit. An agency is thus handled by one relay at a time, the next holder
sees what the previous one committed, and a crash anywhere before the commit only means the same rows
are published again (consumers dedupe on ``message_id``). When the broker is unreachable the relay logs
and retries with backoff; the outbox keeps growing meanwhile and drains when the broker returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

import aio_pika
import aiormq
import asyncpg
import prometheus_client

from paysvc import outbox
from paysvc.db import execute_in_batches
from paysvc.background import pause, stop_if_cancelled
from paysvc.event_keys import KEY_ID_HEADER, SIGNATURE_HEADER, EventSigner
from paysvc.queries import Q

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "paysvc.events"
DEFAULT_QUEUE_PREFIX = "agency."
PRUNE_EVERY_SECONDS = 3600.0
PRUNE_FIRST_SECONDS = 60.0  # after the relay starts


def envelope(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event as agencies see it, from an outbox row joined with its agency's code."""
    occurred: datetime = row["occurred_at"]
    return {
        "event_id": str(row["id"]),
        "type": row["type"],
        "schema_version": row["schema_version"],
        "agency": row["agency"],
        "seq": row["seq"],
        "occurred_at": occurred.astimezone(timezone.utc).isoformat(),
        "data": row["data"],
    }


def message_body(row: Mapping[str, Any]) -> bytes:
    """The exact bytes that are sent and signed: compact UTF-8 JSON of the envelope."""
    return envelope_body(envelope(row))


def envelope_body(event: Mapping[str, Any]) -> bytes:
    """``message_body`` of an envelope already built."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def routing_key(agency_code: str, event_type: str) -> str:
    return f"{agency_code}.{event_type}"


def queue_name(code: str, prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    return f"{prefix}{code}"


RELAY_BROKER_CONNECTED = prometheus_client.Gauge(
    "paysvc_relay_broker_connected", "1 while this process's relay holds a connection to the broker, else 0")
RELAY_FAILURES = prometheus_client.Counter(
    "paysvc_relay_failures_total", "Relay passes that failed (events stay in the outbox), by what failed",
    ["cause"])  # broker, database


class BrokerUnreachable(Exception):
    """The broker could not be connected to; the message names where and what to check."""


def broker_where(url: str) -> str:
    """The broker's address as the URL gives it, without its user and password."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        return f"{parts.hostname}:{port}, virtual host {unquote(parts.path[1:]) or '/'!r}"
    except ValueError:
        return "the URL given"


def broker_error(exc: BaseException, url: str, *, agency: str | None = None, queue: str | None = None) -> str | None:
    """What a broker failure means and what to do about it, in one line; None for an error that is not the
    broker's. Found by a consumer's walk-through: each ended in a traceback (ACCESS_REFUSED, an unknown virtual
    host seen as InvalidFrameError, NOT_FOUND for an undeclared queue)."""
    amqp = aiormq.exceptions
    where = broker_where(url)
    if isinstance(exc, amqp.ProbableAuthenticationError):
        return f"the broker at {where} refused the user and password in the URL: check them (PAYSVC_AMQP_URL)"
    if isinstance(exc, (amqp.InvalidFrameError, amqp.ConnectionNotAllowed)) or (
            isinstance(exc, amqp.AMQPConnectionError) and "NOT_ALLOWED" in str(exc)):
        return (f"the broker at {where} closed the connection when it was opened: does that virtual host exist, "
                "and may this user use it (rabbitmqctl list_permissions -p VHOST)?")
    if isinstance(exc, amqp.ChannelNotFoundEntity) and queue is not None:
        hint = f"`paysvc events declare --agency {agency}`" if agency else "`paysvc events declare`"
        case = " (agency codes are upper case)" if agency and agency != agency.upper() else ""
        return f"the broker at {where} has no queue {queue!r}{case}: declare it with {hint}"
    if isinstance(exc, amqp.ChannelAccessRefused):
        return (f"the broker at {where} refused this user ({exc}): it needs the configure, write and read "
                "permissions on the events exchange and the agency queues")
    if isinstance(exc, (amqp.AMQPError, OSError)):
        # str(): an exception is always true, so `exc or …` never named a timeout's class (found by review)
        return f"cannot use the broker at {where}: {str(exc) or type(exc).__name__}"
    return None


async def connect_broker(url: str, *, timeout: float = 10) -> aio_pika.abc.AbstractConnection:
    """``aio_pika.connect``; a failure is a ``BrokerUnreachable`` saying where, what to check, and the setting
    (found by an operator's walk-through: the relay logged a missing virtual host as "Expected one of
    ['Connection.OpenOk'], got <Connection.Close object at 0x…>", and nothing named PAYSVC_AMQP_URL)."""
    try:
        return await aio_pika.connect(url, timeout=timeout)
    except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError) as exc:
        why = broker_error(exc, url) or f"cannot use the broker at {broker_where(url)}: {type(exc).__name__}"
        raise BrokerUnreachable(why if "PAYSVC_AMQP_URL" in why else f"{why} (PAYSVC_AMQP_URL)") from None


_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


# A queue declared on this connection is declared again after this long before the relay publishes to it.
REDECLARE_SECONDS = 60.0

# What the broker answers when it refuses one queue's declaration, closing only that channel: access refused
# (403), the queue exists with other arguments (406), no such entity (404), locked by another connection's
# exclusive queue (405). Any other failure is not the agency's doing and fails the pass as usual.
REFUSALS = (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
            aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ChannelLockedResource)


async def _declare_on(connection: aio_pika.abc.AbstractConnection, code: str, *, exchange: str,
                      queue_prefix: str, quorum: bool = True) -> bool:
    """Exchange, the agency's durable queue (quorum when the broker has them) and its ``{code}.#`` binding.

    Returns whether the queue is a quorum queue. ``quorum=False`` declares a classic one straight away (the
    relay, declaring again a queue it found classic, spares the broker a refused declaration each time)."""
    name = queue_name(code, queue_prefix)
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = None
        if quorum:
            try:
                queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            except aiormq.exceptions.ChannelClosed:
                # No quorum queues here, or the queue already exists as a classic one: a classic queue it is.
                # The refused declaration closed the channel, so open another.
                channel = await connection.channel(publisher_confirms=False)
                log.info("declaring classic queue %s (the broker refused a quorum queue)", name)
        if queue is None:
            queue = await channel.declare_queue(name, durable=True)
            quorum = False
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await queue.bind(ex, routing_key=f"{code}.#")
    finally:
        await channel.close()
    return quorum


async def declare_agency_queue(amqp_url: str, code: str, *, exchange: str = DEFAULT_EXCHANGE,
                               queue_prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    """Declare the events exchange and ``agency.{code}`` bound to ``{code}.#``; return the queue's name.

    Idempotent: an agency can start consuming at once, before its first event.
    """
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        await _declare_on(connection, code, exchange=exchange, queue_prefix=queue_prefix)
        return queue_name(code, queue_prefix)
    finally:
        await connection.close()


async def prune_outbox(pool: asyncpg.Pool, *, retention: timedelta, now: datetime, slice_size: int = 5000) -> int:
    """Delete events published before ``now - retention`` (however long they waited before); unpublished ones stay."""
    return await execute_in_batches(pool, Q.events_prune, now - retention, batch=slice_size)


def _from_first_return(rows: list[asyncpg.Record], returned: set[Any]) -> list[asyncpg.Record]:
    """Each agency's rows from its first returned one on (rows are in seq order per agency)."""
    hit: set[str] = set()
    out = []
    for r in rows:
        if r["agency"] in hit or r["id"] in returned:
            hit.add(r["agency"])
            out.append(r)
    return out


class Relay:
    """Publishes the outbox to RabbitMQ. Safe to run in several processes at once."""

    def __init__(self, pool: asyncpg.Pool, amqp_url: str, signer: EventSigner, *,
                 exchange: str = DEFAULT_EXCHANGE, queue_prefix: str = DEFAULT_QUEUE_PREFIX,
                 batch_size: int = 2000, max_agencies: int = 16, poll_interval: float = 0.05,
                 idle_max: float = 0.5, quiet_after: float = 1.0, publish_timeout: float = 30.0,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 retention: timedelta | None = timedelta(days=35)) -> None:
        self._pool = pool
        self._url = amqp_url
        self._signer = signer
        self._exchange_name = exchange
        self._queue_prefix = queue_prefix
        self._batch_size = batch_size
        self._max_agencies = max_agencies
        self._poll_interval = poll_interval
        # Once nothing has been published for quiet_after seconds, passes that find nothing are idle_max apart
        # instead of poll_interval: polling an empty outbox 20 times a second cost two idle service processes
        # and their PostgreSQL 66 ms of CPU per second (19.5-21.5 since). While events keep coming (one at
        # least every quiet_after seconds) the pace is unchanged; the first event after a quiet spell waits up
        # to idle_max.
        # (Doubling the wait after every empty pass instead raised the commit-to-delivery p99 at a steady 200
        # events/s from 60 to 411 ms on a slow machine: a writer's pause of a few tens of ms was enough.)
        self._idle_max = max(idle_max, poll_interval)
        self._quiet_after = quiet_after
        self._publish_timeout = publish_timeout
        self._backoff = (backoff_initial, backoff_max)
        # Agencies whose events the broker still did not take after their queue was declared again (returned
        # unrouted, nacked), or whose queue it refused to declare: agency id -> (when to try again, the wait
        # that set it). Only those wait; every other agency keeps the pace.
        self._stuck: dict[int, tuple[float, float]] = {}
        self._retention = retention
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        # Agency code -> when its queue was last declared on this connection (time.monotonic()).
        self._declared: dict[str, float] = {}
        self._classic: set[str] = set()  # agencies whose queue turned out classic: declared as such again
        self.published = 0  # events confirmed and marked by this relay, for logs and benchmarks

    def _broker_alive(self) -> bool:
        """Whether the broker connection is usable: aio-pika's ``is_closed`` says only whether *we* closed it; a
        connection the broker or the network ended has its ``connected`` event cleared (found by review)."""
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()

    async def connect(self) -> None:
        if self._broker_alive():
            return
        if self._connection is not None:
            await self.close()  # ended by the broker or the network: open a new one
        try:
            self._connection = await connect_broker(self._url)
        except BrokerUnreachable:
            RELAY_BROKER_CONNECTED.set(0)
            raise
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(self._exchange_name, aio_pika.ExchangeType.TOPIC,
                                                        durable=True)
        self._declared.clear()
        RELAY_BROKER_CONNECTED.set(1)

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        self._declared.clear()
        RELAY_BROKER_CONNECTED.set(0)
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass

    async def publish_pass(self) -> int:
        """Publish one batch for the agencies this relay can claim; return how many were published."""
        await self.connect()
        now = time.monotonic()
        # An entry long past its retry time is forgotten: a stuck agency is claimed again as soon as its time
        # comes, so one not tried for backoff_max since had no events left here (another relay published them,
        # say), and a new failure starts its backoff afresh.
        self._stuck = {a: (t, w) for a, (t, w) in self._stuck.items() if now <= t + self._backoff[1]}
        waiting = [agency for agency, (retry_at, _) in self._stuck.items() if retry_at > now]
        async with self._pool.acquire() as conn:
            # Number what committed since the last pass (the sequencer's job, done here too so a relay alone
            # needs nothing else), in a statement that commits on its own before anything is published: a
            # message never carries a seq the database has not committed. Numbered inside the claim's
            # transaction, a consumer holding message N could ask the feed for events after N before the
            # numbering committed and be refused as past the newest (found by the signed feed's test).
            await outbox.sequence(conn)
            async with conn.transaction():
                claimed = [r["agency_id"] for r in await conn.fetch(Q.relay_claim_agencies, self._max_agencies,
                                                                   waiting)]
                if not claimed:
                    return 0
                per_agency = max(1, self._batch_size // len(claimed))
                rows = await conn.fetch(Q.relay_unpublished, claimed, per_agency)
                if not rows:
                    return 0
                delivered = await self._publish(rows)
                if delivered:
                    await conn.execute(Q.relay_mark_published, [r["id"] for r in delivered])
        self.published += len(delivered)
        return len(delivered)

    async def _publish(self, rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
        """Publish ``rows``; return those a queue took, to be marked published (a prefix of each agency's rows).

        Every message is ``mandatory``: one that no queue takes (the agency's queue was deleted, say) comes
        back to us instead of vanishing; one the broker refuses is nacked (a full queue that rejects
        publishes). Either way its agency's queue is declared again and that agency's rows from the first one
        not taken on are published once more. An agency whose queue the broker refuses to declare is not
        sent at all (see ``_declare``). Whatever is still not taken stays unpublished, and this relay leaves
        that agency alone until its backoff runs out (``_note_not_taken``), then declares the queue again
        first. Messages after one not taken that a queue did take are sent again (at least once: consumers
        dedupe), so each agency's marked rows stay a prefix in ``seq`` order.
        """
        pending, still = rows, []
        for attempt in range(2):
            if attempt:
                codes = {r["agency"] for r in pending}
                log.warning("relay: %d events came back unrouted or refused (agencies %s); declaring their "
                            "queues again and publishing once more", len(pending), ", ".join(sorted(codes)))
                for code in codes:  # declared again, quorum first: the queue may be gone
                    self._declared.pop(code, None)
                    self._classic.discard(code)
            refused = await self._declare({r["agency"] for r in pending})
            still += [r for r in pending if r["agency"] in refused]
            pending = [r for r in pending if r["agency"] not in refused]
            if not pending:
                break
            pending = _from_first_return(pending, await self._send(pending))
            if not pending:
                break
        still += pending
        self._note_not_taken(rows, still)
        if still:
            for r in still:
                self._declared.pop(r["agency"], None)
            again = {r["agency"]: self._stuck[r["agency_id"]][1] for r in still}
            log.warning("relay: %d events were still not taken; they stay unpublished, and this relay tries "
                        "again %s (other agencies keep their pace)", len(still),
                        ", ".join(f"{code} in {wait:g} s" for code, wait in sorted(again.items())))
        left = {r["id"] for r in still}
        return [r for r in rows if r["id"] not in left]

    def _note_not_taken(self, rows: list[asyncpg.Record], still: list[asyncpg.Record]) -> None:
        """Back off the agencies of ``still`` (``backoff_initial``, then twice as long each time, up to
        ``backoff_max``); an agency of ``rows`` whose events a queue took is tried at the usual pace again. The
        backoff is this relay's own: several relays each try a stuck agency on their own schedule."""
        now = time.monotonic()
        stuck = {r["agency_id"] for r in still}
        for agency in {r["agency_id"] for r in rows}:
            if agency in stuck:
                wait = self._stuck[agency][1] * 2 if agency in self._stuck else self._backoff[0]
                wait = min(wait, self._backoff[1])
                self._stuck[agency] = (now + wait, wait)
            else:
                self._stuck.pop(agency, None)

    async def _declare(self, codes: set[str]) -> set[str]:
        """Declare the queues of the agencies among ``codes`` not yet declared on this connection; return those
        the broker refused (``REFUSALS``: logged).

        A queue is declared again at least every ``REDECLARE_SECONDS``, so a queue deleted and made again
        otherwise while the relay runs is noticed within that time (until then, it is published to).
        A refused agency's events are not published: its queue may exist but not keep them (not durable,
        deleted with its last consumer, another connection's exclusive queue), and what the broker acks into
        such a queue would be marked published and then lost. They wait, as for a queue that takes nothing,
        until a declaration succeeds (``paysvc_outbox_oldest_unpublished_seconds`` shows the wait). Each
        declaration has a channel of its own, so a refusal closes only that one; any other failure (the
        connection lost, say) raises and fails the pass.
        """
        assert self._connection is not None
        refused = set()
        now = time.monotonic()
        for code in sorted(c for c in codes if now - self._declared.get(c, -math.inf) >= REDECLARE_SECONDS):
            try:
                if not await _declare_on(self._connection, code, exchange=self._exchange_name,
                                         queue_prefix=self._queue_prefix, quorum=code not in self._classic):
                    self._classic.add(code)
            except REFUSALS as exc:
                # A user without the permission, or a queue declared otherwise: each told its own fix (found by a
                # walk-through: a missing permission was reported as a queue of the wrong shape)
                fix = ("the relay's broker user lacks the configure, write or read permission on it (rabbitmqctl "
                       "set_permissions)" if isinstance(exc, aiormq.exceptions.ChannelAccessRefused) else
                       "its queue is declared as the relay declares it (durable, with no other arguments)")
                log.warning("relay: the broker refused to declare the queue of agency %s (%s); its events wait "
                            "until %s", code, exc, fix)
                refused.add(code)
            else:
                self._declared[code] = now
        return refused

    async def _send(self, rows: list[asyncpg.Record]) -> set[Any]:
        """Publish ``rows`` (mandatory, confirmed); return the ids of those the broker did not take: returned
        unrouted, or refused (nacked: a full queue that rejects publishes, say).

        Raises when a publish fails (the channel or connection is gone): nothing of the batch is then marked.
        """
        assert self._exchange is not None
        channel = await self._exchange.channel.get_underlay_channel()
        sign, key_id = self._signer.sign, self._signer.active_key_id
        publishes = []
        for r in rows:
            body = message_body(r)
            properties = aiormq.spec.Basic.Properties(
                message_id=str(r["id"]), content_type="application/json", delivery_mode=2, message_type=r["type"],
                headers={SIGNATURE_HEADER: sign(body), KEY_ID_HEADER: key_id},
            )
            # aiormq sends publishes on one channel in call order (a FIFO lock), so each agency's messages
            # reach its queue in seq order. wait=False skips a socket drain per message; the broker's
            # confirm is still awaited for every one. mandatory: a message no queue takes is returned
            # (basic.return, then its ack), and aiormq resolves its publish with the returned message.
            publishes.append(channel.basic_publish(body, exchange=self._exchange_name,
                                                   routing_key=routing_key(r["agency"], r["type"]),
                                                   properties=properties, mandatory=True, wait=False))
        async with asyncio.timeout(self._publish_timeout):  # not wait_for: on 3.11 it can swallow a cancellation
            results = await asyncio.gather(*publishes, return_exceptions=True)
        not_taken = set()
        for r, result in zip(rows, results):
            if isinstance(result, aiormq.exceptions.DeliveryError) and isinstance(result.frame,
                                                                                  aiormq.spec.Basic.Nack):
                not_taken.add(r["id"])  # a nack: the broker did not take it
            elif isinstance(result, BaseException):
                raise result
            elif isinstance(result, (aiormq.abc.DeliveredMessage, aiormq.spec.Basic.Return)):
                not_taken.add(r["id"])
            elif not isinstance(result, aiormq.spec.Basic.Ack):  # not a confirm at all: something is wrong
                raise aiormq.exceptions.DeliveryError(None, result)
        return not_taken

    async def drain(self) -> int:
        """Publish until nothing this relay can claim is left; return how many it published."""
        total = 0
        while n := await self.publish_pass():
            total += n
        return total

    def _cause(self, exc: BaseException) -> str:
        """What a failed pass failed on: ``database`` (the broker connection is still good: keep it) or
        ``broker`` (anything else: reconnecting costs little). A timeout is the broker's: the pass waits on
        nothing else with one (a publish confirm that never came: found by review, it was taken for the
        database's, so a connection that had silently stopped was kept)."""
        if isinstance(exc, _DATABASE_ERRORS):
            return "database"
        if (isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, aiormq.exceptions.AMQPError))
                and self._broker_alive()):
            return "database"  # the pool could not connect (refused, reset) while the broker connection held
        return "broker"

    async def run(self) -> None:
        """Publish forever; on any failure log, back off (with jitter) and carry on. Cancel to stop.

        A database failure keeps the broker connection (found by an operator's walk-through: each one closed and
        reopened it, logged "connected to the broker again", and so never backed off past the first wait); the
        wait doubles until a pass succeeds, whatever failed."""
        delay = self._backoff[0]
        failures = 0
        pruner = asyncio.create_task(self._prune_periodically()) if self._retention is not None else None
        try:
            while True:
                stop_if_cancelled()
                try:
                    await self.connect()
                    last_busy = time.monotonic()
                    while True:
                        stop_if_cancelled()
                        # An agency whose events no queue takes is left out of the claims until its own backoff
                        # runs out (see _note_not_taken), so it neither slows the others nor is tried (and warned
                        # about) at every poll.
                        published = await self.publish_pass()
                        if failures:
                            log.info("relay: publishing the outbox again, after %d failed attempt%s", failures,
                                     "s" if failures != 1 else "")
                            failures, delay = 0, self._backoff[0]
                        if published:
                            last_busy = time.monotonic()
                        elif time.monotonic() - last_busy < self._quiet_after:
                            await pause(self._poll_interval)
                        else:
                            await pause(self._idle_max)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    cause = self._cause(exc)
                    RELAY_FAILURES.labels(cause).inc()
                    failures += 1
                    what = (str(exc) if isinstance(exc, BrokerUnreachable) else
                            f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                    log.warning("relay: the %s failed (%s); events stay in the outbox, retrying in %.1fs", cause,
                                what, delay)
                    if cause == "broker":
                        await self.close()
                    await pause(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, self._backoff[1])
        finally:
            if pruner is not None:
                pruner.cancel()
                await asyncio.gather(pruner, return_exceptions=True)
            await self.close()

    async def _prune_periodically(self) -> None:
        """Delete events published more than the retention ago, a minute after start and then hourly, beside
        publishing: run inline, a long prune paused publishing, and a failed one (the database, say) was
        taken for a publishing failure, which dropped the broker connection. A failure is logged and the
        prune tried again at the next hour."""
        assert self._retention is not None
        await asyncio.sleep(PRUNE_FIRST_SECONDS)
        while True:
            stop_if_cancelled()
            try:
                n = await prune_outbox(self._pool, retention=self._retention, now=datetime.now(timezone.utc))
                if n:
                    log.info("relay: pruned %d published events older than %s", n, self._retention)
            except Exception as exc:
                log.warning("relay: pruning the outbox failed (%s: %s); trying again in %.0f s",
                            type(exc).__name__, exc, PRUNE_EVERY_SECONDS)
            await pause(PRUNE_EVERY_SECONDS)
