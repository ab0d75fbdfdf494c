"""Events relay benchmark: ``python -m load.events_bench`` (from the repository root).

Uses a scratch database on PostgreSQL (``PAYSVC_BENCH_DATABASE_URL``, default the local server over its Unix
socket where there is one, else postgresql://postgres@127.0.0.1:5432/postgres) and a scratch exchange and queues on RabbitMQ
(``PAYSVC_BENCH_AMQP_URL``, default amqp://guest:guest@127.0.0.1:5672/); drops all of them at the end.

  a  throughput: fill the outbox with N events (default 100,000) over 4 agencies, then time the relay
     (publisher confirms, Ed25519 signatures, quorum queues) until the outbox is empty; then the same with
     two relays at once on a fresh outbox. Checks every queue holds exactly its agency's events.
                                                            target >= 5,000 events/s
  b  delay from commit to delivery at 200 events/s: writers commit events through ``add_event``; a
     ``paysvc relay`` process publishes; a consumer notes when each message arrives. p50, p99, max.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import aio_pika
import asyncpg

from paysvc.agencies import add_agency
from paysvc.db import connect, create_pool, init_connection
from paysvc.event_keys import EventSigner
from paysvc.migrate import migrate
from paysvc.outbox import add_event
from paysvc.relay import Relay, queue_name
from paysvc.settings import Settings
from load.service import ADMIN_DSN, dsn_for

AMQP_URL = os.environ.get("PAYSVC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
AGENCIES = ("MOI", "MPWT", "GDCE", "MOH")
SEED = base64.b64encode(b"b" * 32).decode()


async def fill_outbox(dsn: str, n: int) -> None:
    """``n`` events spread over the agencies, written set-based (what the writers would have committed)."""
    async with connect(dsn) as conn:
        await conn.execute(
            """WITH a AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k, count(*) OVER () AS m FROM agencies),
                    s AS (SELECT a.id AS agency_id, g AS seq FROM a,
                           generate_series((SELECT coalesce(max(last_seq), 0) FROM agency_event_seq e
                                             WHERE e.agency_id = a.id) + 1,
                                           (SELECT coalesce(max(last_seq), 0) FROM agency_event_seq e
                                             WHERE e.agency_id = a.id) + ($1 / a.m)::int) g)
               INSERT INTO outbox_events (id, agency_id, seq, type, occurred_at, data)
               SELECT gen_random_uuid(), agency_id, seq, 'invoice.created', now(),
                      jsonb_build_object('invoice_id', 'INV-' || seq, 'reference', 'REF-' || seq,
                                         'amount', 50000, 'currency', 'KHR', 'status', 'open')
                 FROM s""", n)
        await conn.execute(
            """INSERT INTO agency_event_seq (agency_id, last_seq)
               SELECT agency_id, max(seq) FROM outbox_events GROUP BY agency_id
               ON CONFLICT (agency_id) DO UPDATE SET last_seq = excluded.last_seq""")


async def queue_counts(exchange: str, prefix: str) -> dict[str, int]:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        out = {}
        for code in AGENCIES:
            q = await channel.declare_queue(queue_name(code, prefix), passive=True)
            out[code] = q.declaration_result.message_count
        return out
    finally:
        await connection.close()


async def purge(prefix: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for code in AGENCIES:
            q = await channel.declare_queue(queue_name(code, prefix), passive=True)
            await q.purge()
    finally:
        await connection.close()


async def throughput(dsn: str, n: int, relays: int, exchange: str, prefix: str) -> tuple[float, float, dict]:
    await fill_outbox(dsn, n)
    settings = Settings(database_url=dsn, db_pool_min=2, db_pool_max=4)
    pools = [await create_pool(dsn, settings) for _ in range(relays)]
    signer = EventSigner({"bench": base64.b64decode(SEED)})
    workers = [Relay(p, AMQP_URL, signer, exchange=exchange, queue_prefix=prefix, batch_size=2000, retention=None)
               for p in pools]
    for w in workers:
        await w.connect()
    async with connect(dsn) as conn:
        total = await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
    started = time.perf_counter()
    # Two relays: each drains what it can claim; loop until the outbox is empty (one may briefly find all locked).
    while True:
        await asyncio.gather(*(w.drain() for w in workers))
        async with connect(dsn) as conn:
            if not await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL"):
                break
    seconds = time.perf_counter() - started
    for w in workers:
        await w.close()
    for p in pools:
        await p.close()
    counts = await queue_counts(exchange, prefix)
    return total / seconds, seconds, {"events": total, "per_relay": [w.published for w in workers],
                                      "in_queues": sum(counts.values())}


async def latency(dsn: str, rate: float, seconds: float, exchange: str, prefix: str) -> dict:
    env = dict(os.environ, PAYSVC_DATABASE_URL=dsn, PAYSVC_AMQP_URL=AMQP_URL, PAYSVC_EVENTS_EXCHANGE=exchange,
               PAYSVC_EVENTS_QUEUE_PREFIX=prefix, PAYSVC_EVENT_SIGNING_KEYS=f"bench:{SEED}",
               PAYSVC_PII_KEYS=f"bench:{SEED}", PAYSVC_LOG_LEVEL="WARNING")
    relay = subprocess.Popen([sys.executable, "-m", "paysvc", "relay"], env=env)
    committed: dict[str, float] = {}
    arrived: dict[str, float] = {}
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived.setdefault(message.message_id, time.time())
        await message.ack()

    for code in AGENCIES:
        q = await channel.declare_queue(queue_name(code, prefix), passive=True)
        await q.consume(on_message)
    async with connect(dsn) as conn:
        ids = dict(await conn.fetch("SELECT code, id FROM agencies"))
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4, init=init_connection)

    async def write(i: int) -> None:
        async with pool.acquire() as conn:
            async with conn.transaction():
                event_id = await add_event(conn, agency_id=ids[AGENCIES[i % len(AGENCIES)]], type="invoice.paid",
                                           data={"invoice_id": f"INV-{i}", "amount": 50000},
                                           occurred_at=datetime.now(timezone.utc))
        committed[str(event_id)] = time.time()

    await asyncio.sleep(1.5)  # the relay process starts
    tasks = []
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(write(i)))
    await asyncio.gather(*tasks)
    deadline = time.time() + 30
    while len(set(committed) - set(arrived)) and time.time() < deadline:
        await asyncio.sleep(0.1)
    relay.terminate()
    relay.wait(10)
    await pool.close()
    await connection.close()
    delays = sorted((arrived[k] - t) * 1000 for k, t in committed.items() if k in arrived)
    return {"sent": n, "arrived": len(delays),
            "p50": statistics.median(delays),
            "p99": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
            "max": delays[-1]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:8]
    name = f"paysvc_evbench_{tag}"
    exchange, prefix = f"paysvc.bench.{tag}", f"bench.{tag}."
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_for(name)
    rows = []
    try:
        async with connect(dsn) as conn:
            await migrate(conn)
            for code in AGENCIES:
                await add_agency(conn, code=code, name=f"{code} Fees", name_km="ក្រសួង", bakong_account=f"{code.lower()}@nbcq",
                                 merchant_id=None, acquiring_bank=None, mcc="9399", city="Phnom Penh")
        rate1, secs1, info1 = await throughput(dsn, args.events, 1, exchange, prefix)
        rows.append(("a  1 relay, outbox -> broker", f"{info1['events']:,} events in {secs1:.2f} s",
                     f"{rate1:,.0f} events/s", f"in queues: {info1['in_queues']:,}", ">= 5,000/s",
                     "PASS" if rate1 >= 5000 and info1["in_queues"] == info1["events"] else "FAIL"))
        await purge(prefix)
        rate2, secs2, info2 = await throughput(dsn, args.events, 2, exchange, prefix)
        rows.append(("a  2 relays at once", f"{info2['events']:,} events in {secs2:.2f} s",
                     f"{rate2:,.0f} events/s", f"in queues: {info2['in_queues']:,} (per relay {info2['per_relay']})",
                     ">= 5,000/s", "PASS" if rate2 >= 5000 and info2["in_queues"] == info2["events"] else "FAIL"))
        await purge(prefix)
        lat = await latency(dsn, args.rate, args.seconds, exchange, prefix)
        rows.append((f"b  commit -> consumer at {args.rate:.0f}/s", f"{lat['arrived']:,}/{lat['sent']:,} arrived",
                     f"p50 {lat['p50']:.1f} ms", f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms", "all arrive",
                     "PASS" if lat["arrived"] == lat["sent"] else "FAIL"))
    finally:
        try:
            connection = await aio_pika.connect(AMQP_URL)
            channel = await connection.channel()
            for code in AGENCIES:
                await channel.queue_delete(queue_name(code, prefix))
            await channel.exchange_delete(exchange)
            await connection.close()
        except Exception as exc:  # report, but still drop the database
            print(f"cleanup of exchange/queues failed: {exc}", file=sys.stderr)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print()
    print(f"events benchmark ({os.cpu_count()} cores; PostgreSQL, RabbitMQ and the relay share them)")
    widths = [max(len(str(r[i])) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    asyncio.run(main())
