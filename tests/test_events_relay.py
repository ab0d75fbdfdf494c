"""The outbox relay against the real RabbitMQ and PostgreSQL: every committed event arrives, signed and in
order per agency, through two relays at once, a broker outage and a killed relay."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

import aio_pika
import aiormq
import asyncpg
import pytest

from paysvc.db import connect
from paysvc.event_keys import verify
from paysvc.outbox import add_event
from paysvc.relay import Relay, declare_agency_queue
from tests.conftest import running_api
from tests.test_events_support import (AMQP_URL, Broker, broker, close_relay, make_relay,  # noqa: F401
                                       relay_process_publishing, signer, wait_until)


class Rollback(Exception):
    pass


async def outbox_ids(dsn: str, code: str | None = None) -> list[str]:
    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT o.id FROM outbox_events o JOIN agencies a ON a.id = o.agency_id "
            "WHERE $1::text IS NULL OR a.code = $1 ORDER BY o.agency_id, o.seq", code)
    return [str(r["id"]) for r in rows]


def seqs_after_dedup(received) -> dict[str, list[int]]:
    seen, out = set(), {}
    for m in received:
        if m.message_id in seen:
            continue
        seen.add(m.message_id)
        e = m.event
        out.setdefault(e["agency"], []).append(e["seq"])
    return out


async def test_every_committed_event_arrives_signed_and_a_rolled_back_one_never(db_dsn, broker: Broker, invoice_body):
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")
        created = []
        for _ in range(3):
            r = await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
            assert r.status == 201, await r.text()
            created.append((await r.json())["id"])
        r = await api.client.post(f"/v1/invoices/{created[0]}/cancel", headers=headers)
        assert r.status == 200, await r.text()
        async with connect(db_dsn) as conn:
            agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
            with pytest.raises(Rollback):
                async with conn.transaction():
                    rolled_back = await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"x": 1},
                                                  occurred_at=datetime.now(timezone.utc))
                    raise Rollback
        relay = await make_relay(db_dsn, broker)
        try:
            assert await relay.drain() == 4
        finally:
            await close_relay(relay)
        committed = await outbox_ids(db_dsn)
        await wait_until(lambda: len(got) >= 4, 10, "4 messages")
        await asyncio.sleep(0.2)  # anything extra would show up now

    assert [m.message_id for m in got] == committed
    assert str(rolled_back) not in {m.message_id for m in got}
    events = [m.event for m in got]
    assert [e["type"] for e in events] == ["invoice.created"] * 3 + ["invoice.cancelled"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["data"]["invoice_id"] for e in events] == created + [created[0]]
    keys = {k.key_id: base64.b64decode(k.public_key) for k in signer().public_keys().keys}
    for m in got:
        assert set(m.event) == {"event_id", "type", "schema_version", "agency", "seq", "occurred_at", "data"}
        assert m.event["event_id"] == m.message_id and m.event["agency"] == "MOI"
        assert m.routing_key == f"MOI.{m.event['type']}"
        assert m.content_type == "application/json" and m.delivery_mode == 2
        assert verify(keys, m.headers["paysvc-key-id"], m.headers["paysvc-signature"], m.body) is None
    async with connect(db_dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL") == 0


async def test_a_published_message_carries_a_seq_the_database_has_committed(db_dsn, broker: Broker, invoice_body):
    # The relay numbered events inside the transaction that published them, so for as long as the broker took
    # to confirm, a consumer holding message N found no event N in the feed (GET /v1/events?after=N was even
    # refused as past the newest). Now whatever reaches the broker is numbered and committed first.
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")
        for _ in range(3):
            assert (await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)).status == 201
        relay = await make_relay(db_dsn, broker)
        seen_committed: list[list[int]] = []
        publish = relay._publish

        async def publish_then_look(rows):
            delivered = await publish(rows)
            async with connect(db_dsn) as other:  # what a feed reader sees while the broker holds the messages
                seen_committed.append(await other.fetchval(
                    "SELECT coalesce(array_agg(seq ORDER BY seq), '{}') FROM outbox_events WHERE id = ANY($1)",
                    [r["id"] for r in delivered]))
            last = delivered[-1]["seq"]  # a consumer that processed the last message polls the feed after it
            r = await api.client.get("/v1/events", params={"after": last}, headers=headers)
            assert r.status == 200, await r.text()
            r = await api.client.get("/v1/events", params={"after": last - 1}, headers=headers)
            assert [e["seq"] for e in (await r.json())["data"]] == [last]
            return delivered
        relay._publish = publish_then_look  # type: ignore[method-assign]
        try:
            assert await relay.drain() == 3
        finally:
            await close_relay(relay)
        await wait_until(lambda: len(got) == 3, 10, "3 messages")
    assert seen_committed == [[1, 2, 3]]
    assert [m.event["seq"] for m in got] == [1, 2, 3]


async def test_two_relays_at_once_keep_each_agencys_order(db_dsn, broker: Broker):
    async with running_api(db_dsn) as api:
        for code in ("MOI", "MPWT", "GDCE"):
            await api.agency(code)
    got = {code: await broker.consume(code) for code in ("MOI", "MPWT", "GDCE")}
    async with connect(db_dsn) as conn:
        ids = dict(await conn.fetch("SELECT code, id FROM agencies"))

    async def writer(code: str, n: int) -> None:
        async with connect(db_dsn) as conn:
            for i in range(n):
                async with conn.transaction():
                    await add_event(conn, agency_id=ids[code], type="invoice.paid", data={"i": i},
                                    occurred_at=datetime.now(timezone.utc))

    # Small batches and one agency per pass: the two relays take turns on every agency, many times over.
    relays = [await make_relay(db_dsn, broker, batch_size=7, max_agencies=1, poll_interval=0.01, quiet_after=60)
              for _ in range(2)]  # both keep the poll pace: a quiet spell before the writers must not idle one
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await asyncio.gather(writer("MOI", 300), writer("MPWT", 300), writer("GDCE", 300))
        await wait_until(lambda: sum(len(g) for g in got.values()) >= 900, 20, "900 messages")
        await asyncio.sleep(0.3)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in relays:
            await close_relay(r)

    assert all(r.published > 0 for r in relays), [r.published for r in relays]
    assert sum(r.published for r in relays) == 900
    for code, received in got.items():
        ids_ = [m.message_id for m in received]
        assert len(ids_) == len(set(ids_)) == 300, f"{code}: no event published twice without a failure"
        assert [m.event["seq"] for m in received] == list(range(1, 301)), f"{code} out of order"


class Proxy:
    """A TCP proxy to RabbitMQ that the test can cut (every connection dropped, none accepted) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.stalled = False  # True: bytes are read and dropped, connections stay open (a path gone silent)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    if self.stalled:
                        continue
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


async def test_broker_outage_while_invoices_are_written_loses_nothing(db_dsn, broker: Broker, invoice_body):
    proxy = Proxy(5672)
    await proxy.start()
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")  # straight to the broker, not through the proxy
        relay = await make_relay(db_dsn, broker, url=proxy.url, batch_size=5, poll_interval=0.01,
                                 backoff_initial=0.1, backoff_max=0.5, publish_timeout=3)
        task = asyncio.create_task(relay.run())
        writing = True
        statuses: list[int] = []

        async def write() -> None:
            while writing:
                r = await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
                statuses.append(r.status)
                inv = await r.json()
                if len(statuses) % 3 == 0:
                    r = await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=headers)
                    statuses.append(r.status)

        writer = asyncio.create_task(write())
        try:
            await wait_until(lambda: len(got) >= 10, 10, "the first events before the outage")
            await proxy.cut()
            during = len(statuses)
            await asyncio.sleep(1.5)
            async with connect(db_dsn) as conn:
                backlog = await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
            assert len(statuses) - during > 5, "the service kept taking invoices during the outage"
            assert backlog > 0, "events waited in the outbox"
            await proxy.start()  # the broker is back
            await asyncio.sleep(0.5)
            writing = False
            await writer
            committed = await outbox_ids(db_dsn)
            await wait_until(lambda: set(committed) <= {m.message_id for m in got}, 20, "every event after the outage")
        finally:
            writing = False
            task.cancel()
            await asyncio.gather(task, writer, return_exceptions=True)
            await close_relay(relay)
            await proxy.cut()

    assert set(statuses) <= {200, 201}
    unique = {m.message_id for m in got}
    assert unique == set(committed), "exactly the committed events, each once after dedup"
    assert seqs_after_dedup(got)["MOI"] == list(range(1, len(committed) + 1))


async def test_a_relay_killed_mid_batch_loses_nothing(db_dsn, broker: Broker):
    relay, got, env = await relay_process_publishing(db_dsn, broker)
    relay.send_signal(signal.SIGKILL)
    await relay.wait()
    async with connect(db_dsn) as conn:
        published = await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL")
    assert 0 < published < 3000, "killed part-way"
    again = await asyncio.create_subprocess_exec(sys.executable, "-m", "paysvc", "relay", "--once", env=env,
                                                 stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(again.communicate(), 30)
    assert again.returncode == 0, err.decode()
    committed = await outbox_ids(db_dsn)
    await wait_until(lambda: set(committed) <= {m.message_id for m in got}, 20, "every event after the restart")
    assert {m.message_id for m in got} == set(committed)
    assert seqs_after_dedup(got)["MOI"] == list(range(1, 3001))
    async with connect(db_dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL") == 0


async def test_declare_makes_a_quorum_queue_bound_to_the_agencys_events(broker: Broker):
    env = broker.env("unused")
    del env["PAYSVC_DATABASE_URL"]  # declaring needs the broker only
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "paysvc", "events", "declare", "--agency", "MOI",
                                                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == broker.queue("MOI")
    # Idempotent, also from the function the agencies CLI calls.
    assert await declare_agency_queue(AMQP_URL, "MOI", exchange=broker.exchange,
                                      queue_prefix=broker.prefix) == broker.queue("MOI")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker.exchange)
        await exchange.publish(aio_pika.Message(b"{}"), "MOI.invoice.paid")
        await exchange.publish(aio_pika.Message(b"{}"), "MPWT.invoice.paid")
        queue = await channel.declare_queue(broker.queue("MOI"), passive=True)
        await asyncio.sleep(0.2)
        assert (await channel.declare_queue(broker.queue("MOI"), passive=True)).declaration_result.message_count == 1
        # It is a quorum queue: declaring it as a classic one is refused as inequivalent.
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            other = await connection.channel()
            await other.declare_queue(broker.queue("MOI"), durable=True, arguments={"x-queue-type": "classic"})
        del queue
    finally:
        await connection.close()


async def test_the_service_runs_the_relay_in_the_background(db_dsn, broker: Broker, invoice_body):
    async with running_api(db_dsn, background=True, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")
        r = await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        assert r.status == 201
        await wait_until(lambda: len(got) == 1, 10, "the event, published by the service itself")
        assert got[0].event["data"]["invoice_id"] == (await r.json())["id"]


async def test_prune_deletes_only_published_events_past_the_retention(db_dsn):
    from datetime import timedelta

    from paysvc.db import create_pool
    from paysvc.relay import prune_outbox
    from paysvc.settings import Settings

    with pytest.raises(ValueError):
        Settings(events_retention_days=29)  # history is kept at least 30 days
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    now = datetime.now(timezone.utc)
    async with connect(db_dsn) as conn:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
        ids = {}
        # (name, days since it occurred, days since it was published or None): retention counts from publication
        for name, age, published in (("old_published", 40, 36), ("old_unpublished", 40, None),
                                     ("recent_published", 20, 20),
                                     ("waited_40_days_published_now", 40, 0),
                                     ("waited_then_published_34_days_ago", 70, 34)):
            ids[name] = await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"n": name},
                                        occurred_at=now - timedelta(days=age))
            if published is not None:
                await conn.execute("UPDATE outbox_events SET published_at = $2 WHERE id = $1",
                                   ids[name], now - timedelta(days=published))
    pool = await create_pool(db_dsn, Settings(database_url=db_dsn, db_pool_min=1, db_pool_max=2))
    try:
        assert await prune_outbox(pool, retention=timedelta(days=35), now=now) == 1
    finally:
        await pool.close()
    async with connect(db_dsn) as conn:
        left = {r["id"] for r in await conn.fetch("SELECT id FROM outbox_events")}
        # the prune is served by the partial index on published_at (migration 0029), not a scan of the outbox
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT id FROM outbox_events WHERE published_at < now() LIMIT 10"))
    assert left == {ids["old_unpublished"], ids["recent_published"], ids["waited_40_days_published_now"],
                    ids["waited_then_published_34_days_ago"]}
    assert "outbox_events_published" in plan, plan


async def _queued_ids(broker: Broker, code: str) -> list[str] | None:
    """The message ids waiting in the agency's queue (taken off it), or None when the queue does not exist."""
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(broker.queue(code), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        ids = []
        while (m := await queue.get(no_ack=True, fail=False)) is not None:
            ids.append(m.message_id)
        return ids
    finally:
        await connection.close()


async def _delete_queue(broker: Broker, code: str) -> None:
    connection = await aio_pika.connect(broker.url)
    try:
        await (await connection.channel()).queue_delete(broker.queue(code))
    finally:
        await connection.close()


async def _published(dsn: str, event_id) -> bool:
    async with connect(dsn) as conn:
        return await conn.fetchval("SELECT published_at IS NOT NULL FROM outbox_events WHERE id = $1", event_id)


async def test_an_event_for_a_deleted_queue_reaches_the_queue_declared_again(db_dsn, broker: Broker):
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    async with connect(db_dsn) as conn:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
    now = datetime.now(timezone.utc)
    relay = await make_relay(db_dsn, broker)
    try:
        async with connect(db_dsn) as conn:
            first = await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"n": 1}, occurred_at=now)
        assert await relay.drain() == 1                              # the relay declares the queue
        assert await _queued_ids(broker, "MOI") == [str(first)]
        await _delete_queue(broker, "MOI")                           # e.g. by an operator, while the relay runs
        async with connect(db_dsn) as conn:
            second = await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"n": 2}, occurred_at=now)
        assert await relay.publish_pass() == 1                       # one pass, on the same connection
        assert await _published(db_dsn, second)
        assert await _queued_ids(broker, "MOI") == [str(second)]     # the queue is back and holds it
    finally:
        await close_relay(relay)


async def test_an_event_no_queue_takes_stays_unpublished_until_one_does(db_dsn, broker: Broker):
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    async with connect(db_dsn) as conn:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
    now = datetime.now(timezone.utc)
    relay = await make_relay(db_dsn, broker, backoff_initial=5)
    try:
        _never_declare(relay)                                         # the queue is not declared again (yet)
        async with connect(db_dsn) as conn:
            ids = [await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"n": n}, occurred_at=now)
                   for n in range(3)]
        assert await relay.publish_pass() == 0                       # every message came back: none marked
        assert await relay.drain() == 0                               # and MOI is left alone for 5 s
        assert not any([await _published(db_dsn, i) for i in ids])
        assert await _queued_ids(broker, "MOI") is None              # no queue, nothing delivered anywhere
        del relay._declare                                            # the queue can be declared again
        relay._stuck[agency_id] = (time.monotonic() - 0.01, 5.0)     # and MOI's backoff has run out
        assert await relay.drain() == 3
        assert all([await _published(db_dsn, i) for i in ids])
        assert await _queued_ids(broker, "MOI") == [str(i) for i in ids]   # in seq order
    finally:
        await close_relay(relay)


def _never_declare(relay: Relay, code: str | None = None) -> None:
    """The relay declares no queue again for agency ``code`` (for any, without one), as if it could not, yet
    without a refusal: their messages keep coming back unrouted."""
    real_declare = relay._declare

    async def declare(codes) -> set[str]:
        return set() if code is None else await real_declare({c for c in codes if c != code})

    relay._declare = declare  # type: ignore[method-assign]


def _count_sends(relay: Relay) -> list[int]:
    """A one-element list holding how many times the relay has called _send (a publish of a batch)."""
    sends = [0]
    real_send = relay._send

    async def counting_send(rows):
        sends[0] += 1
        return await real_send(rows)

    relay._send = counting_send  # type: ignore[method-assign]
    return sends


async def test_a_relay_whose_events_no_queue_takes_backs_off_instead_of_retrying_every_poll(db_dsn, broker: Broker):
    """While messages keep coming back unrouted, the background relay waits longer each time (up to its
    backoff maximum) instead of trying, and warning, at every poll interval (20 times a second)."""
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    async with connect(db_dsn) as conn:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
        await add_event(conn, agency_id=agency_id, type="invoice.paid", data={}, occurred_at=datetime.now(timezone.utc))
    relay = await make_relay(db_dsn, broker, poll_interval=0.05, backoff_initial=0.2, backoff_max=5)
    _never_declare(relay)
    sends = _count_sends(relay)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(1.6)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_relay(relay)
    # each pass sends twice (once, then again after declaring); passes at about 0, 0.2, 0.6 and 1.4 s
    assert 2 <= sends[0] <= 10, sends[0]


async def test_a_quiet_relay_polls_less_and_still_publishes_what_comes(db_dsn, broker: Broker):
    """Once nothing has been published for quiet_after, passes are idle_max apart: an idle relay does not poll
    20 times a second, and an event written while it waits is published within about idle_max."""
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    got = await broker.consume("MOI")
    relay = await make_relay(db_dsn, broker, poll_interval=0.01, idle_max=0.2, quiet_after=0.1)
    passes = 0
    real_pass = relay.publish_pass

    async def counting_pass():
        nonlocal passes
        passes += 1
        return await real_pass()

    relay.publish_pass = counting_pass  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.4)
        before = passes
        await asyncio.sleep(1.0)
        # quiet since the start: passes 0.2 s apart, about five in this second, not a hundred
        assert 1 <= passes - before <= 8, passes - before  # (the event below shows it still polls)
        async with connect(db_dsn) as conn:
            agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
            await add_event(conn, agency_id=agency_id, type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
        await wait_until(lambda: len(got) == 1, 2, "the event written while the relay idled")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_relay(relay)


async def test_a_relay_with_events_coming_keeps_its_pace(db_dsn, broker: Broker):
    """Events a little apart (less than quiet_after) are each published at the poll pace, not idle_max's."""
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    got = await broker.consume("MOI")
    # quiet_after leaves room for a slow start (connecting) before the first event; idle_max would show.
    relay = await make_relay(db_dsn, broker, poll_interval=0.01, idle_max=6.0, quiet_after=3.0)
    task = asyncio.create_task(relay.run())
    delays = []
    try:
        async with connect(db_dsn) as conn:
            agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
            for i in range(6):
                await asyncio.sleep(0.3)
                written = asyncio.get_running_loop().time()
                await add_event(conn, agency_id=agency_id, type="invoice.paid", data={"n": i},
                                occurred_at=datetime.now(timezone.utc))
                await wait_until(lambda: len(got) == i + 1, 10, f"event {i}")
                delays.append(asyncio.get_running_loop().time() - written)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_relay(relay)
    assert max(delays) < 2.0, delays  # an idle_max wait (6 s) would show; the poll pace is 0.01 s


async def test_one_agency_whose_events_no_queue_takes_does_not_slow_the_others(db_dsn, broker: Broker):
    """MOI's messages keep coming back unrouted, so the relay retries MOI less and less often; MPWT's events,
    written meanwhile, are published at the usual pace, not at MOI's backoff."""
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
        await api.agency("MPWT")
    mpwt = await broker.consume("MPWT")
    async with connect(db_dsn) as conn:
        ids = dict(await conn.fetch("SELECT code, id FROM agencies"))
        await add_event(conn, agency_id=ids["MOI"], type="invoice.paid", data={},
                        occurred_at=datetime.now(timezone.utc))
    relay = await make_relay(db_dsn, broker, poll_interval=0.05, backoff_initial=2.0, backoff_max=30)
    _never_declare(relay, "MOI")
    sends = _count_sends(relay)
    task = asyncio.create_task(relay.run())
    try:
        # MOI tried at once and again 2 s later (two sends each: once, then after declaring): the next try
        # would be 4 s later.
        await wait_until(lambda: sends[0] >= 4, 10, "MOI's second try")
        async with connect(db_dsn) as conn:
            written = asyncio.get_running_loop().time()
            await add_event(conn, agency_id=ids["MPWT"], type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
        await wait_until(lambda: len(mpwt) == 1, 10, "MPWT's event")
        delay = asyncio.get_running_loop().time() - written
        async with connect(db_dsn) as conn:
            moi_waiting = await conn.fetchval(
                "SELECT count(*) FROM outbox_events WHERE agency_id = $1 AND published_at IS NULL", ids["MOI"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_relay(relay)
    assert delay < 1.5, delay  # MOI's backoff (4 s by then) would show
    assert moi_waiting == 1  # and MOI's event still waits, unpublished, for a queue to take it


async def test_in_one_pass_a_stuck_agency_backs_off_alone_and_a_success_clears_its_backoff(db_dsn, broker: Broker):
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
        await api.agency("MPWT")
    await broker.consume("MPWT")
    async with connect(db_dsn) as conn:
        ids = dict(await conn.fetch("SELECT code, id FROM agencies"))
        moi = [await add_event(conn, agency_id=ids["MOI"], type="invoice.paid", data={},
                               occurred_at=datetime.now(timezone.utc)) for _ in range(2)]
        mpwt = await add_event(conn, agency_id=ids["MPWT"], type="invoice.paid", data={},
                               occurred_at=datetime.now(timezone.utc))
    relay = await make_relay(db_dsn, broker, backoff_initial=0.5, backoff_max=30)
    try:
        _never_declare(relay, "MOI")
        assert await relay.publish_pass() == 1                        # MPWT's event, in the same pass
        assert await _published(db_dsn, mpwt) and not any([await _published(db_dsn, i) for i in moi])
        assert set(relay._stuck) == {ids["MOI"]} and relay._stuck[ids["MOI"]][1] == 0.5
        relay._stuck[ids["MOI"]] = (time.monotonic() - 0.01, 0.5)     # its backoff has run out: tried again
        assert await relay.publish_pass() == 0
        assert relay._stuck[ids["MOI"]][1] == 1.0                     # twice as long
        del relay._declare                                             # MOI's queue can be declared again
        relay._stuck[ids["MOI"]] = (time.monotonic() - 0.01, 1.0)
        assert await relay.publish_pass() == 2
        assert relay._stuck == {}                                      # delivered: back to the usual pace
        # An entry not tried for backoff_max past its time (nothing left to claim) is forgotten.
        relay._stuck[ids["MOI"]] = (time.monotonic() - 31, 16.0)
        assert await relay.publish_pass() == 0 and relay._stuck == {}
    finally:
        await close_relay(relay)


async def _moi_queue_declared_by_hand(broker: Broker, *, durable: bool = True, **arguments) -> None:
    """MOI's queue, declared (classic) and bound by hand, ``durable`` or not, with ``arguments`` the relay does
    not use."""
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(broker.queue("MOI"), durable=durable, arguments=arguments)
        await queue.bind(exchange, routing_key="MOI.#")
    finally:
        await connection.close()


async def _three_moi_events_and_one_mpwt(db_dsn: str, big: int | None = 1) -> tuple[dict, list, object]:
    """MOI's events 1 and 3 are small, its event 2 is over 4 kB (``big``: which one, from 0; None: none);
    MPWT's one is small."""
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
        await api.agency("MPWT")
    async with connect(db_dsn) as conn:
        ids = dict(await conn.fetch("SELECT code, id FROM agencies"))
        now = datetime.now(timezone.utc)
        moi = [await add_event(conn, agency_id=ids["MOI"], type="invoice.paid",
                               data={"n": n, "pad": "x" * (4000 if n == big else 0)}, occurred_at=now)
               for n in range(3)]
        mpwt = await add_event(conn, agency_id=ids["MPWT"], type="invoice.paid", data={}, occurred_at=now)
    return ids, moi, mpwt


def _declaration_refusals(caplog, code: str) -> int:
    return sum(f"refused to declare the queue of agency {code}" in r.getMessage() for r in caplog.records)


def _backoff_over(relay: Relay, agency_id: int) -> None:
    """End the agency's backoff now (the tests give it a long one, so that it cannot run out on its own
    while a slow machine runs the test's other steps)."""
    _, wait = relay._stuck[agency_id]
    relay._stuck[agency_id] = (time.monotonic() - 0.001, wait)


async def test_a_queue_that_refuses_messages_holds_back_only_its_agency(db_dsn, broker: Broker, caplog):
    """MOI's queue, declared by hand, takes at most 2 kB and refuses what would overflow it (reject-publish:
    the broker nacks it), as if the relay had declared it on this connection: it takes MOI's small events 1
    and 3 and refuses the big event 2. The relay declares MOI's queue again to send 2 and 3 once more; the
    broker refuses that declaration (the queue has other arguments), so they wait. MPWT's event in the same
    pass is published; of MOI's only event 1 is marked (3, though taken, follows a refused one), and MOI
    backs off alone. Once the queue is replaced and the backoff is over, MOI's events go through."""
    await _moi_queue_declared_by_hand(broker, **{"x-max-length-bytes": 2000, "x-overflow": "reject-publish"})
    ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn)
    await broker.consume("MPWT")
    relay = await make_relay(db_dsn, broker, backoff_initial=10)
    caplog.set_level(logging.WARNING, logger="paysvc.relay")
    try:
        await relay.connect()
        relay._declared["MOI"] = time.monotonic()  # as if declared earlier on this connection
        assert await relay.publish_pass() == 2
        assert [await _published(db_dsn, i) for i in moi] == [True, False, False]
        assert await _published(db_dsn, mpwt)
        assert set(relay._stuck) == {ids["MOI"]}
        assert await _queued_ids(broker, "MOI") == [str(moi[0]), str(moi[2])]  # 2 refused, 3 taken
        assert _declaration_refusals(caplog, "MOI") == 1
        assert await relay.publish_pass() == 0  # during MOI's backoff: left alone

        await _delete_queue(broker, "MOI")  # the operator removes the misconfigured queue
        _backoff_over(relay, ids["MOI"])
        caplog.clear()
        assert await relay.publish_pass() == 2
        assert [await _published(db_dsn, i) for i in moi] == [True, True, True]
        assert relay._stuck == {}
        assert not [r for r in caplog.records if "came back" in r.getMessage()], "sent before declaring again"
        assert await _queued_ids(broker, "MOI") == [str(moi[1]), str(moi[2])]
    finally:
        await close_relay(relay)


async def _rabbitmqctl(broker: Broker, *args: str, cleanup: bool = False) -> None:
    """Run rabbitmqctl on this machine's broker (policies have no AMQP method). Where it cannot serve the
    test's broker (not installed, not root or rabbitmq, or the broker is not this machine's on vhost /), the
    test is skipped; a failed cleanup is only logged, never raised over the test's own outcome."""
    url = urlparse(broker.url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") or url.path not in ("", "/"):
        pytest.skip(f"the test broker {url.hostname}{url.path} is not this machine's vhost /, which rabbitmqctl "
                    "sets policies on")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed here: the test sets a broker policy with it")
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
        failed = proc.returncode != 0
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # its wrapper runs the Erlang VM as a child: the whole group
        await proc.wait()
        out, failed = b"no answer within 60 s", True
    if failed:
        message = f"rabbitmqctl {args[0]} failed: {out.decode(errors='replace')[-500:]}"
        if cleanup:
            logging.getLogger(__name__).warning(message)
        elif b"Only root or rabbitmq" in out:
            pytest.skip(message)
        else:
            raise AssertionError(message)


async def test_a_full_queue_holds_back_only_its_agency_until_its_consumer_catches_up(db_dsn, broker: Broker):
    """A broker policy caps MOI's queue (the relay's own quorum queue) at 2 kB, refusing publishes once over
    it, and MOI's consumer has fallen behind: 4 kB wait in the queue. The broker refuses (nacks) MOI's three
    events; the relay declares the queue again (accepted: a policy is not an argument) and sends them once
    more: refused again. They wait and MOI backs off alone; MPWT's event is published. Once MOI's consumer
    has caught up and the backoff is over, MOI's events are published."""
    policy = f"paysvc-test-{broker.prefix.strip('.')}"
    pattern = "^" + broker.queue("MOI").replace(".", "\\.") + "$"
    await _rabbitmqctl(broker, "set_policy", "-p", "/", "--apply-to", "queues", "--priority", "1000", policy, pattern,
                       '{"max-length-bytes": 2000, "overflow": "reject-publish"}')
    try:
        await declare_agency_queue(broker.url, "MOI", exchange=broker.exchange, queue_prefix=broker.prefix)
        connection = await aio_pika.connect(broker.url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x" * 4000, message_id="backlog"),
                                                   routing_key=broker.queue("MOI"))
        finally:
            await connection.close()
        ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn, big=None)  # all small: they fit, later
        await broker.consume("MPWT")
        relay = await make_relay(db_dsn, broker, backoff_initial=10)
        try:
            assert await relay.publish_pass() == 1
            assert not any([await _published(db_dsn, i) for i in moi])
            assert await _published(db_dsn, mpwt)
            assert set(relay._stuck) == {ids["MOI"]}
            assert await _queued_ids(broker, "MOI") == ["backlog"]  # refused, twice; the consumer catches up
            _backoff_over(relay, ids["MOI"])
            assert await relay.publish_pass() == 3
            assert all([await _published(db_dsn, i) for i in moi])
            assert relay._stuck == {}
            assert await _queued_ids(broker, "MOI") == [str(i) for i in moi]
        finally:
            await close_relay(relay)
    finally:
        await _rabbitmqctl(broker, "clear_policy", "-p", "/", policy, cleanup=True)


async def test_a_queue_that_cannot_be_declared_holds_back_only_its_agency(db_dsn, broker: Broker, caplog):
    """MOI's queue exists with an argument the relay's declaration contradicts (x-max-length), so the broker
    refuses the declaration. The relay cannot tell whether such a queue keeps what it takes (it might not be
    durable), so MOI's events wait, logged, while MPWT's are published; MOI is left alone during its backoff
    and tried again (declared again) after it."""
    await _moi_queue_declared_by_hand(broker, **{"x-max-length": 1000})
    ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn)
    await broker.consume("MPWT")
    relay = await make_relay(db_dsn, broker, backoff_initial=10)
    caplog.set_level(logging.WARNING, logger="paysvc.relay")
    try:
        assert await relay.publish_pass() == 1
        assert not any([await _published(db_dsn, i) for i in moi])
        assert await _published(db_dsn, mpwt)
        assert await _queued_ids(broker, "MOI") == []
        assert set(relay._stuck) == {ids["MOI"]} and _declaration_refusals(caplog, "MOI") == 1
        first = relay._stuck[ids["MOI"]]
        assert await relay.publish_pass() == 0
        assert relay._stuck[ids["MOI"]] == first and _declaration_refusals(caplog, "MOI") == 1  # left alone
        _backoff_over(relay, ids["MOI"])
        assert await relay.publish_pass() == 0
        assert _declaration_refusals(caplog, "MOI") == 2  # tried again: refused again, waits twice as long
        assert relay._stuck[ids["MOI"]][1] == 2 * first[1]
    finally:
        await close_relay(relay)


async def test_the_relay_keeps_publishing_while_it_prunes_and_after_a_prune_fails(db_dsn, broker: Broker,
                                                                                   monkeypatch):
    """The hourly prune runs beside publishing: a slow one does not pause it, a failing one does not stop it
    (nor drop the broker connection)."""
    from datetime import timedelta

    import paysvc.relay as relay_module

    calls: list[str] = []
    pruning = asyncio.Event()

    async def slow_then_failing_prune(pool, *, retention, now):
        calls.append("start")
        if len(calls) == 1:
            pruning.set()
            await asyncio.sleep(3)  # a long prune
            return 0
        raise RuntimeError("database went away")

    monkeypatch.setattr(relay_module, "prune_outbox", slow_then_failing_prune)
    monkeypatch.setattr(relay_module, "PRUNE_FIRST_SECONDS", 0.0)
    monkeypatch.setattr(relay_module, "PRUNE_EVERY_SECONDS", 0.2)
    async with running_api(db_dsn) as api:
        await api.agency("MOI")
    got = await broker.consume("MOI")
    relay = await make_relay(db_dsn, broker, poll_interval=0.01, retention=timedelta(days=35))
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(pruning.wait(), 5)
        async with connect(db_dsn) as conn:
            agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
            await add_event(conn, agency_id=agency_id, type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
            await wait_until(lambda: len(got) == 1, 2, "an event published during the prune")
            assert calls == ["start"]  # the first prune is still running
            await wait_until(lambda: len(calls) >= 3, 10, "two more prunes, failing")
            connection = relay._connection
            await add_event(conn, agency_id=agency_id, type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
            await wait_until(lambda: len(got) == 2, 5, "an event published after the prunes failed")
            assert relay._connection is connection  # a failed prune did not drop the broker connection
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_relay(relay)


async def test_only_the_brokers_refusals_hold_an_agency_any_other_channel_failure_fails_the_pass(
        db_dsn, broker: Broker, monkeypatch):
    """A declaration the broker refuses for this queue (406, 403, 404, 405) holds back that agency alone; a
    channel closed for another reason (say, under a connection going away) is not the agency's doing and
    fails the whole pass, so the relay backs off and reconnects."""
    import paysvc.relay as relay_module

    ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn)
    await broker.consume("MPWT")
    real_declare = relay_module._declare_on
    failure: list[BaseException] = []

    async def declare(connection, code, **kw):
        if code == "MOI" and failure:
            raise failure[0]
        return await real_declare(connection, code, **kw)
    monkeypatch.setattr(relay_module, "_declare_on", declare)
    relay = await make_relay(db_dsn, broker, backoff_initial=10)
    try:
        failure.append(aiormq.exceptions.ChannelClosed(None, None))
        with pytest.raises(aiormq.exceptions.ChannelClosed):
            await relay.publish_pass()
        assert not await _published(db_dsn, mpwt) and relay._stuck == {}

        failure[0] = aiormq.exceptions.ChannelAccessRefused(None, None)
        assert await relay.publish_pass() == 1
        assert await _published(db_dsn, mpwt) and not await _published(db_dsn, moi[0])
        assert set(relay._stuck) == {ids["MOI"]}
    finally:
        await close_relay(relay)


async def test_a_queue_made_again_otherwise_while_the_relay_runs_is_noticed_when_it_is_declared_again(
        db_dsn, broker: Broker, monkeypatch):
    """The relay declares an agency's queue on each new connection and again every REDECLARE_SECONDS. MOI's
    queue is deleted while the relay runs and made again by hand as a non-durable queue (a consumer
    declaring it with its client's defaults, say). Once the relay declares it again the broker refuses (not
    durable), and MOI's next event waits instead of going into a queue that would lose it at a restart."""
    import paysvc.relay as relay_module

    ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn, big=None)
    relay = await make_relay(db_dsn, broker, backoff_initial=10)
    try:
        assert await relay.publish_pass() == 4
        await _delete_queue(broker, "MOI")
        await _moi_queue_declared_by_hand(broker, durable=False)
        async with connect(db_dsn) as conn:
            later = await add_event(conn, agency_id=ids["MOI"], type="invoice.paid", data={},
                                    occurred_at=datetime.now(timezone.utc))
        monkeypatch.setattr(relay_module, "REDECLARE_SECONDS", 0.0)  # the time to declare again has come
        assert await relay.publish_pass() == 0
        assert not await _published(db_dsn, later)
        assert set(relay._stuck) == {ids["MOI"]}
        assert await _queued_ids(broker, "MOI") == []
    finally:
        await close_relay(relay)


async def test_a_classic_queue_is_declared_again_as_classic(db_dsn, broker: Broker, monkeypatch, caplog):
    """An agency queue made before the broker had quorum queues is classic: the relay's quorum declaration is
    refused and it declares a classic one. Declaring it again (every REDECLARE_SECONDS) it goes straight to
    classic, instead of having the broker refuse (and log) a quorum declaration each time. Once the queue is
    gone (deleted: its messages come back), the relay makes it again as a quorum queue."""
    import paysvc.relay as relay_module

    await _moi_queue_declared_by_hand(broker)  # classic, durable, no other arguments: as the relay's own
    ids, moi, mpwt = await _three_moi_events_and_one_mpwt(db_dsn, big=None)
    relay = await make_relay(db_dsn, broker)
    caplog.set_level(logging.INFO, logger="paysvc.relay")
    try:
        assert await relay.publish_pass() == 4
        monkeypatch.setattr(relay_module, "REDECLARE_SECONDS", 0.0)
        async with connect(db_dsn) as conn:
            await add_event(conn, agency_id=ids["MOI"], type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
        assert await relay.publish_pass() == 1
        assert len(await _queued_ids(broker, "MOI")) == 4
        assert sum("declaring classic queue" in r.getMessage() for r in caplog.records) == 1

        await _delete_queue(broker, "MOI")
        async with connect(db_dsn) as conn:
            await add_event(conn, agency_id=ids["MOI"], type="invoice.paid", data={},
                            occurred_at=datetime.now(timezone.utc))
        monkeypatch.setattr(relay_module, "REDECLARE_SECONDS", 60.0)  # not declared before sending: it returns
        assert await relay.publish_pass() == 1
        connection = await aio_pika.connect(broker.url)
        try:  # the same declaration again is accepted only if the queue is a quorum queue
            await (await connection.channel()).declare_queue(broker.queue("MOI"), durable=True,
                                                             arguments={"x-queue-type": "quorum"})
        finally:
            await connection.close()
    finally:
        await close_relay(relay)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "paysvc.relay" and r.levelno == logging.WARNING]


async def test_a_broker_that_refuses_the_relay_is_logged_with_what_to_check(db_dsn, broker: Broker, caplog):
    """Found by an operator's walk-through: a missing virtual host was logged as "Expected one of
    ['Connection.OpenOk'], got <Connection.Close object at 0x…>", a refused port without naming the setting."""
    import prometheus_client

    from paysvc.relay import RELAY_BROKER_CONNECTED

    def failures(cause: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value("paysvc_relay_failures_total", {"cause": cause}) or 0

    for url, says in ((AMQP_URL.rstrip("/") + "/test.no-such-vhost", "virtual host 'test.no-such-vhost' closed the connection"),
                      ("amqp://guest:s3cret@127.0.0.1:1/", "cannot use the broker at 127.0.0.1:1")):
        caplog.clear()
        before = failures("broker")
        relay = await make_relay(db_dsn, broker, url=url, backoff_initial=0.05, backoff_max=0.1)
        RELAY_BROKER_CONNECTED.set(1)  # as another relay of this process may have left it
        task = asyncio.create_task(relay.run())
        try:
            with caplog.at_level(logging.WARNING, logger="paysvc.relay"):
                await wait_until(lambda: len(_warnings(caplog)) >= 2, 10, "the relay's warnings")
            assert RELAY_BROKER_CONNECTED._value.get() == 0  # while it runs, failing to connect
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close_relay(relay)
        first = _warnings(caplog)[0]
        assert first.startswith("relay: the broker failed (") and says in first and "PAYSVC_AMQP_URL" in first, first
        assert "Connection.OpenOk" not in first and "s3cret" not in first
        assert failures("broker") >= before + 2


async def test_a_database_outage_keeps_the_broker_connection_and_backs_off(db_dsn, broker: Broker, invoice_body,
                                                                           caplog):
    """Found by an operator's walk-through: each database failure closed and reopened the broker connection,
    logged "connected to the broker again" although the broker never went away, and so retried every 0.5 s for
    as long as the database was down."""
    from tests.conftest import ADMIN_DSN

    dbname = db_dsn.rsplit("/", 1)[1].split("?")[0]
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")
        relay = await make_relay(db_dsn, broker, backoff_initial=0.1, backoff_max=0.8, poll_interval=0.01)
        task = asyncio.create_task(relay.run())
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await wait_until(lambda: relay._connection is not None, 10, "the relay's broker connection")
            connection = relay._connection
            with caplog.at_level(logging.INFO, logger="paysvc.relay"):
                await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = $1 AND pid <> pg_backend_pid()", dbname)
                await wait_until(lambda: len(_warnings(caplog)) >= 4, 15, "four failed passes")
                await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
                r = await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
                assert r.status == 201, await r.text()
                await wait_until(lambda: len(got) >= 1, 15, "the invoice's event, once the database is back")
                await wait_until(lambda: any("publishing the outbox again" in r.getMessage() for r in caplog.records),
                                 5, "the relay saying it publishes again")
            said = _warnings(caplog)
            assert all(w.startswith("relay: the database failed (") for w in said), said
            waits = [float(w.rsplit("retrying in ", 1)[1].rstrip("s")) for w in said[:4]]
            assert waits == [0.1, 0.2, 0.4, 0.8], waits  # backing off, not retrying at the first wait for ever
            assert relay._connection is connection and not connection.is_closed  # the broker was never left
            infos = [r.getMessage() for r in caplog.records if r.name == "paysvc.relay" and r.levelno == logging.INFO]
            assert any(m.startswith("relay: publishing the outbox again, after ") for m in infos), infos
            assert not any("connected to the broker again" in m for m in infos)
        finally:
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            await admin.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close_relay(relay)


async def test_relay_once_with_a_broker_it_cannot_reach_says_so_in_one_line(db_dsn, broker: Broker):
    env = {**broker.env(db_dsn), "PAYSVC_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "paysvc", "relay", "--once", env=env,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1 and "Traceback" not in text, text
    assert "cannot use the broker at 127.0.0.1:1" in text and "PAYSVC_AMQP_URL" in text
    assert "the events stay in the outbox" in text


async def test_a_broker_path_gone_silent_is_the_brokers_failure_and_the_relay_reconnects(db_dsn, broker: Broker,
                                                                                       invoice_body, caplog):
    """Found by review: a publish confirm that never came (a timeout) was taken for a database failure, so the
    relay kept the connection that had stopped answering, failing every pass until the heartbeat ended it."""
    proxy = Proxy(5672)
    await proxy.start()
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        got = await broker.consume("MOI")
        relay = await make_relay(db_dsn, broker, url=proxy.url, backoff_initial=0.1, backoff_max=0.2,
                                 publish_timeout=1, poll_interval=0.01)
        task = asyncio.create_task(relay.run())
        try:
            assert (await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)).status == 201
            await wait_until(lambda: len(got) >= 1, 10, "the first event")
            first = relay._connection
            proxy.stalled = True
            with caplog.at_level(logging.WARNING, logger="paysvc.relay"):
                assert (await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)).status == 201
                await wait_until(lambda: _warnings(caplog), 10, "the relay's warning")
                proxy.stalled = False
                await wait_until(lambda: len({m.message_id for m in got}) >= 2, 20, "the second event")
            said = _warnings(caplog)[0]
            assert said.startswith("relay: the broker failed (TimeoutError)"), said
            assert relay._connection is not first  # a new connection, not the one gone silent
        finally:
            proxy.stalled = False
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close_relay(relay)
            await proxy.cut()
