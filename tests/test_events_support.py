"""Shared pieces of the events tests (no tests here): a scratch exchange and queues on the real RabbitMQ,
a consumer that records what arrives, and signing keys made for the tests."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import aio_pika
import pytest_asyncio

from paysvc.db import create_pool
from paysvc.event_keys import EventSigner, parse_signing_keys
from paysvc.relay import Relay
from paysvc.settings import Settings

AMQP_URL = os.environ.get("PAYSVC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SEED_1 = base64.b64encode(bytes(range(32))).decode()
SEED_2 = base64.b64encode(bytes(range(32, 64))).decode()
SIGNING_KEYS = f"ev1:{SEED_1}"
CODES = ("MOI", "MPWT", "GDCE")


@dataclass
class Received:
    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    content_type: str | None
    delivery_mode: int | None

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Broker:
    """A scratch exchange and queue prefix on the real broker, removed after the test."""

    url: str
    exchange: str
    prefix: str
    consumers: list[aio_pika.abc.AbstractConnection] = field(default_factory=list)

    def queue(self, code: str) -> str:
        return f"{self.prefix}{code}"

    def settings(self) -> dict[str, Any]:
        return dict(amqp_url=self.url, events_exchange=self.exchange, events_queue_prefix=self.prefix,
                    event_signing_keys=SIGNING_KEYS)

    def env(self, dsn: str) -> dict[str, str]:
        return dict(os.environ, PAYSVC_DATABASE_URL=dsn, PAYSVC_AMQP_URL=self.url, PAYSVC_EVENTS_EXCHANGE=self.exchange,
                    PAYSVC_EVENTS_QUEUE_PREFIX=self.prefix, PAYSVC_EVENT_SIGNING_KEYS=SIGNING_KEYS,
                    PAYSVC_PII_KEYS="t1:" + base64.b64encode(b"k" * 32).decode(), PAYSVC_LOG_LEVEL="WARNING")

    async def consume(self, code: str) -> list[Received]:
        """Start recording everything that arrives on the agency's queue (declared if missing)."""
        from paysvc.relay import declare_agency_queue

        await declare_agency_queue(self.url, code, exchange=self.exchange, queue_prefix=self.prefix)
        connection = await aio_pika.connect(self.url)
        self.consumers.append(connection)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(self.queue(code), passive=True)
        got: list[Received] = []

        async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(Received(m.message_id or "", m.routing_key or "", m.body, dict(m.headers or {}),
                                m.content_type, m.delivery_mode))
            await m.ack()

        await queue.consume(on_message)
        return got


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def relay_process_publishing(db_dsn: str, broker: "Broker", events: int = 3000
                                   ) -> tuple[asyncio.subprocess.Process, list[Received], dict[str, str]]:
    """Agency MOI with ``events`` events in its outbox and a ``paysvc relay`` process (batches of 100)
    publishing them to MOI's recorded queue; returns (the process, what arrived so far, its environment)
    once 250 have arrived, the process still running (killed if they never do)."""
    from paysvc.db import connect
    from paysvc.outbox import add_event
    from tests.conftest import running_api

    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    got = await broker.consume("MOI")
    async with connect(db_dsn) as conn:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
        async with conn.transaction():
            for i in range(events):
                await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"i": i},
                                occurred_at=datetime.now(timezone.utc))
    env = broker.env(db_dsn) | {"PAYSVC_RELAY_BATCH_SIZE": "100"}
    relay = await asyncio.create_subprocess_exec(sys.executable, "-m", "paysvc", "relay", env=env,
                                                 stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(lambda: len(got) >= 250, 20, "the relay to be publishing")
    except BaseException:
        relay.kill()
        await relay.wait()
        raise
    return relay, got, env


@pytest_asyncio.fixture
async def broker():
    tag = uuid.uuid4().hex[:10]
    b = Broker(AMQP_URL, f"test.events.{tag}", f"test.{tag}.")
    yield b
    for c in b.consumers:
        await c.close()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for code in CODES:
        await channel.queue_delete(b.queue(code))
    await channel.exchange_delete(b.exchange)
    await connection.close()


def signer() -> EventSigner:
    return EventSigner(parse_signing_keys(SIGNING_KEYS))


async def make_relay(dsn: str, broker: Broker, *, url: str | None = None, **kw) -> Relay:
    pool = await create_pool(dsn, Settings(database_url=dsn, db_pool_min=1, db_pool_max=4))
    kw.setdefault("retention", None)
    relay = Relay(pool, url or broker.url, signer(), exchange=broker.exchange, queue_prefix=broker.prefix, **kw)
    relay.test_pool = pool  # type: ignore[attr-defined]  # closed by close_relay
    return relay


async def close_relay(relay: Relay) -> None:
    await relay.close()
    await relay.test_pool.close()  # type: ignore[attr-defined]
