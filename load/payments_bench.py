"""Payments end to end: create an invoice, pay it with a signed sandbox callback, at fixed rates.

    python -m load.payments_bench                 # 60 s per rate, as the target asks
    python -m load.payments_bench --duration 15   # a quicker look
    python -m load.payments_bench --processes 1   # one service process instead of two
    python -m load.payments_bench --service-nice -10   # the service at a higher CPU priority (root)
    python -m load.payments_bench --calibrate 0   # without the 10 s pgbench run that rates the machine first
    python -m load.payments_bench --warmup 2      # the first rate warmed up as briefly as the others
    python -m load.payments_bench --broker        # each payment's events also published to the local RabbitMQ

Each scheduled payment is one ``POST /v1/invoices`` then one signed ``POST /v1/providers/sandbox/
callbacks``; its latency runs from the scheduled start to the callback's answer (captured and booked),
so a server that falls behind cannot hide its queue. The service processes start fresh: the first rate is
warmed up for 10 s (its warm-up's latencies printed apart), each later one for 2 s. The generator sends
with a lean HTTP client (load/httpclient.py), as it shares the cores with what it measures. Also measures
the Bakong poller's cost per 10,000 pending codes against a local fake of Bakong's API.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from load import openloop
from load.service import LOOP, SANDBOX_SECRET, cli, cpu_seconds_by_role, scratch_database, services
from load.service import run as run_on_loop


def make_request(urls: list[str], key: str):
    from providers.sandbox import sign

    rr = itertools.cycle(urls)
    run_id = uuid.uuid4().hex[:6]

    async def request(session, i: int) -> int:
        url = next(rr)
        headers = {"Authorization": f"Bearer {key}"}
        body = {"reference": f"P{run_id}-{i}", "description": "Vehicle tax", "currency": "KHR", "amount": 120000}
        async with session.post(f"{url}/v1/invoices", json=body, headers=headers) as r:
            if r.status != 201:
                return r.status
            inv = await r.json()
        cb = json.dumps({"transaction_id": f"T{run_id}-{i}", "md5": inv["khqr"]["md5"],
                         "bill_number": inv["bill_number"], "amount": 120000, "currency": "KHR",
                         "to_account": "tax@nbcq", "paid_at": datetime.now(UTC).isoformat()}).encode()
        cb_headers = {"Content-Type": "application/json", "Sandbox-Signature": sign(SANDBOX_SECRET, cb, int(time.time()))}
        async with session.post(f"{url}/v1/providers/sandbox/callbacks", data=cb, headers=cb_headers) as r:
            out = await r.read()
            if r.status == 200 and b'"exception":null' in out:
                return 200
            return r.status if r.status != 200 else 599
    return request


async def bakong_poll_cost(dsn: str, pending: int = 10_000) -> None:
    from paysvc.db import init_connection
    from paysvc.poller import PollPolicy, poll_once
    from providers import load_providers
    from tests.fakes.bakong import FakeBakong

    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4, init=init_connection)
    agency = await pool.fetchval("SELECT id FROM agencies WHERE code = 'TAX'")
    now = datetime.now(UTC)
    # Pending codes made directly in SQL: the poller only reads khqr_codes and payments.
    await pool.execute("""
        INSERT INTO invoices (id, number, bill_number, agency_id, reference, description, currency, amount, expires_at)
        SELECT 'inv_poll_' || g, 900000000 + g, 'PS' || (900000000 + g), $1, 'POLL-' || g, 'poll', 'KHR', 1000, $2
          FROM generate_series(1, $3) g""", agency, now + timedelta(hours=1), pending)
    await pool.execute("""
        INSERT INTO khqr_codes (md5, invoice_id, payload, to_account, currency, amount, created_at, expires_at)
        SELECT md5('poll' || g), 'inv_poll_' || g, 'payload', 'tax@nbcq', 'KHR', 1000, $1, $2
          FROM generate_series(1, $3) g""", now - timedelta(seconds=5), now + timedelta(minutes=9), pending)
    async with FakeBakong(token="bench") as fake:
        for g in range(1, pending + 1, 100):  # 1% of them paid
            md5 = await pool.fetchval("SELECT md5('poll' || $1::int)", g)
            fake.add_payment(md5, amount="1000", currency="KHR", to_account="tax@nbcq")
        provider = load_providers({"bakong": {"token": "bench", "base_url": fake.base_url}})["bakong"]
        cpu0, t0 = time.process_time(), time.perf_counter()
        asked = captured = 0
        policy = PollPolicy(min_interval=timedelta(minutes=5))
        while True:
            a, c = await poll_once(pool, provider, policy)
            asked, captured = asked + a, captured + c
            if a == 0:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await provider.aclose()
        calls = len(fake.requests)
    await pool.close()
    print(f"\n== Bakong poller, {pending} pending codes (1% paid), fake Bakong on loopback")
    print(f"codes asked {asked}, API calls {calls} (≤ 50 md5 each), captured {captured}")
    print(f"wall {wall:.2f} s, poller process CPU {cpu:.2f} s "
          f"(per 10,000 codes: {wall * 10_000 / asked:.2f} s wall, {cpu * 10_000 / asked:.2f} s CPU, "
          f"{calls * 10_000 / asked:.0f} calls)")


class Broker:
    """With ``--broker``: the service's relay publishes every event to RabbitMQ (a scratch exchange and queue,
    deleted afterwards); without it events wait in the outbox. Nothing consumes the queue: RabbitMQ's cost
    here is taking and storing the messages, not delivering them."""

    def __init__(self, url: str) -> None:
        import base64

        from paysvc.relay import queue_name

        tag = uuid.uuid4().hex[:8]
        self.url, self.exchange, self.prefix = url, f"paysvc.bench.{tag}", f"bench.{tag}."
        self.queue = queue_name("TAX", self.prefix)  # the benchmark's one agency
        self.env = {"PAYSVC_AMQP_URL": url, "PAYSVC_EVENTS_EXCHANGE": self.exchange,
                    "PAYSVC_EVENTS_QUEUE_PREFIX": self.prefix,
                    "PAYSVC_EVENT_SIGNING_KEYS": f"bench:{base64.b64encode(os.urandom(32)).decode()}"}

    async def published(self) -> int:
        """Messages in the agency's queue (nothing consumes it)."""
        import aio_pika

        try:
            async with await aio_pika.connect(self.url) as conn:
                queue = await (await conn.channel()).declare_queue(self.queue, passive=True)
                return queue.declaration_result.message_count
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0

    async def waiting(self, dsn: str) -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
        finally:
            await conn.close()

    async def wait_published(self, dsn: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while await self.waiting(dsn) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def delete(self) -> None:
        import aio_pika

        async with await aio_pika.connect(self.url) as conn:
            channel = await conn.channel()
            await channel.queue_delete(self.queue)
            await channel.exchange_delete(self.exchange)


async def main_async(args, urls, key, dsn: str, broker: Broker | None) -> None:
    # The priority this process runs at, which the service processes inherited (--service-nice, or the shell's).
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    print(f"\n== {len(urls)} service process(es) at nice {nice} on {os.cpu_count()} cores, load generator on {LOOP}; "
          f"step up the rate, "
          f"{args.duration:.0f} s each; held = p99 < 200 ms and no errors")
    best = None
    for step, rate in enumerate(args.rates):
        # Fresh references per run, so no invoice of an earlier run is met again.
        cpu0 = cpu_seconds_by_role()
        # The first step meets freshly started processes: every pooled database connection's first requests
        # are slow (its server process has yet to read the catalogs and compile the functions it runs), and
        # at 100/s on a slow day that backlog took 2.5 s to drain. It is warmed up for longer, and its
        # warm-up's latencies are printed, so a restart's cost stays visible without being mistaken for the
        # steady state the target is about.
        warmup = args.warmup if step == 0 else 2.0
        r = await openloop.run(make_request(urls, key), rate=rate, duration=args.duration, warmup=warmup)
        if broker:
            await broker.wait_published(dsn)  # so the step's own events are published on its account
        cpu1 = cpu_seconds_by_role()
        held = r.pct(99) < 200 and not r.errors and r.ok == r.sent
        if step == 0 and r.warmup_sent:
            print("  " + r.warmup_line())
        print(r.line() + ("   HELD" if held else "   not held"))
        if not held and r.latencies_ms:
            print("           " + r.worst_seconds())
        if r.ok_with_warmup:
            # Over the whole step, warm-up included; background work (expiry, sealing, outbox) counts too.
            roles = ["postgresql", "service", "generator"] + (["broker"] if broker else [])
            per = {k: (cpu1[k] - cpu0[k]) * 1000 / r.ok_with_warmup for k in roles}
            print(f"           CPU per payment: PostgreSQL {per['postgresql']:.2f} ms, service processes "
                  f"{per['service']:.2f} ms, load generator {per['generator']:.2f} ms"
                  + (f", RabbitMQ {per['broker']:.2f} ms" if broker else "")
                  + f"; total {sum(per.values()):.2f} ms of the machine's {os.cpu_count()} cores")
        if broker:
            print(f"           events: {await broker.published():,} in the agency's queue so far, "
                  f"{await broker.waiting(dsn):,} still in the outbox at the end of the step")
        if held:
            best = rate
        else:
            break
    print(f"\nhighest rate of captured payments held for {args.duration:.0f} s with p99 < 200 ms: "
          f"{best or 'none'} payments/s (each also creates its invoice)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--processes", type=int, default=2,
                   help="paysvc serve processes (default 2; on this 2-core machine one cost less CPU per payment "
                        "at moderate rates, but two held higher rates; see README)")
    p.add_argument("--service-nice", type=int, default=0, metavar="N",
                   help="run the service processes, and this load generator (which stands in for clients on other "
                        "machines), at this CPU priority, e.g. -10 (below 0 needs root): beside PostgreSQL's "
                        "backends on the same cores it shortened a single service process's tail near its limit "
                        "(see README)")
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[200, 300, 400, 500, 600, 700])
    p.add_argument("--warmup", type=float, default=10, metavar="SECONDS",
                   help="warm-up of the first rate, on freshly started service processes, before measuring "
                        "(default 10; later rates 2)")
    p.add_argument("--broker", metavar="AMQP_URL", nargs="?", const="amqp://guest:guest@127.0.0.1:5672/",
                   help="the relay publishes every event to this RabbitMQ (default amqp://guest:guest@127.0.0.1:"
                        "5672/; a scratch exchange and queue, deleted afterwards), and RabbitMQ's CPU is counted; "
                        "without it events wait in the outbox")
    p.add_argument("--skip-http", action="store_true", help="only measure the Bakong poller")
    p.add_argument("--calibrate", type=float, default=10, metavar="SECONDS",
                   help="first run pgbench's TPC-B for this long and print its rate, the machine's speed at the "
                        "time (default 10; 0 to skip)")
    args = p.parse_args()
    # The benchmark's processes (setup commands, services) inherit this environment: a broker or events
    # setting of the caller's must not reach them (with --broker, the service processes get the scratch ones).
    for name in [n for n in os.environ if n == "PAYSVC_AMQP_URL" or n.startswith("PAYSVC_EVENT")]:
        del os.environ[name]
    if args.service_nice:
        try:
            # This process first: the service processes it starts inherit its priority.
            os.setpriority(os.PRIO_PROCESS, 0, args.service_nice)
        except PermissionError:
            p.error(f"--service-nice {args.service_nice}: a priority below 0 needs root or CAP_SYS_NICE")
    if args.calibrate:
        from load.ledger_bench import pgbench_tpcb

        # The machine's speed right now, to compare runs made on different days: this 2-core machine's
        # TPC-B rate has been seen anywhere from 1,800 to 6,600 transactions/s.
        tps, note = pgbench_tpcb(args.calibrate)
        print(f"machine calibration: pgbench TPC-B-like, 16 clients, {args.calibrate:.0f} s: {tps:,.0f} tx/s ({note})",
              flush=True)
    with scratch_database() as dsn:
        cli(dsn, "migrate")
        cli(dsn, "agencies", "add", "TAX", "--name", "Vehicle Tax", "--name-km", "ពន្ធលើយានយន្ត",
            "--bakong-account", "tax@nbcq")
        key = cli(dsn, "keys", "create", "--agency", "TAX", "--scope", "invoices:write", "--scope", "invoices:read")
        if not args.skip_http:
            broker = Broker(args.broker) if args.broker else None
            try:
                with services(dsn, args.processes, PAYSVC_PROVIDERS="sandbox",
                              **(broker.env if broker else {})) as urls:
                    run_on_loop(main_async(args, urls, key, dsn, broker))
            finally:
                if broker:  # the service processes are stopped by now: nothing declares them again
                    try:
                        run_on_loop(broker.delete())
                    except Exception as exc:  # do not hide what failed the run, if anything did
                        print(f"could not delete the scratch exchange {broker.exchange} and queue "
                              f"{broker.queue}: {exc!r}; delete them by hand")
        run_on_loop(bakong_poll_cost(dsn))
    print(f"\nbenchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
