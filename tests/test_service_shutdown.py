"""SIGTERM stops ``paysvc serve`` (while portals write and its relay publishes) and ``paysvc relay`` promptly
and cleanly."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import asyncpg

from tests.service_process import ServiceProcess
from tests.test_events_support import (Broker, SIGNING_KEYS, broker, relay_process_publishing,  # noqa: F401
                                       wait_until)


async def test_sigterm_stops_the_service_promptly_while_it_publishes(db_dsn, broker: Broker):
    """The service's shutdown cancels its background tasks (relay, event sequencer, inbox worker, expiry…) and
    waits for them: a task that went on after its cancellation (Python 3.11's wait_for can swallow one) would
    keep the process alive until it was killed. Invoices keep coming while SIGTERM arrives: the process
    exits by itself, with status 0 and no traceback, and every invoice it answered with 201 is in the
    database with its event, which no consumer has lost (the outbox keeps what was not yet published)."""
    svc = ServiceProcess(db_dsn, PAYSVC_AMQP_URL=broker.url, PAYSVC_EVENTS_EXCHANGE=broker.exchange,
                         PAYSVC_EVENTS_QUEUE_PREFIX=broker.prefix, PAYSVC_EVENT_SIGNING_KEYS=SIGNING_KEYS,
                         PAYSVC_RELAY_POLL_INTERVAL_SECONDS="0.01").start()
    try:
        assert svc.cli("agencies", "add", "MOI", "--name", "MOI Fees Office", "--name-km", "ក្រសួងមហាផ្ទៃ",
                       "--bakong-account", "moi@nbcq").returncode == 0
        key = svc.cli("keys", "create", "--agency", "MOI", "--scope", "invoices:write").stdout.strip()
        got = await broker.consume("MOI")
        created: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def write() -> None:
                n = 0
                while True:
                    n += 1
                    try:
                        async with http.post(f"{svc.url}/v1/invoices", headers={"Authorization": f"Bearer {key}"},
                                             json={"reference": f"S{n}", "description": "fee", "currency": "KHR",
                                                   "amount": 5000}) as r:
                            if r.status == 201:
                                created.append((await r.json())["id"])
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        return  # the service stopped listening

            writer = asyncio.create_task(write())
            try:
                await wait_until(lambda: len(got) >= 20, 20, "the relay to be publishing")
                assert svc.proc is not None
                started = time.monotonic()
                svc.proc.send_signal(signal.SIGTERM)
                while svc.proc.poll() is None and time.monotonic() - started < 20:
                    await asyncio.sleep(0.05)
                took = time.monotonic() - started
                assert svc.proc.poll() is not None, "paysvc serve was still running 20 s after SIGTERM"
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        stderr = svc.proc.stderr.read().decode() if svc.proc.stderr else ""
        assert svc.proc.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        assert took < 10, f"stopping took {took:.1f} s"
        said = stderr.splitlines()
        assert "paysvc stopping: no new connections; finishing the requests in progress" in said, stderr[-2000:]
        assert said[-1] == "paysvc stopped", stderr[-2000:]
    finally:
        svc.stop()

    conn = await asyncpg.connect(db_dsn)
    try:
        stored = {r["id"] for r in await conn.fetch("SELECT id FROM invoices")}
        evented = {r["invoice_id"] for r in await conn.fetch(
            "SELECT data->>'invoice_id' AS invoice_id FROM outbox_events WHERE type = 'invoice.created'")}
    finally:
        await conn.close()
    assert len(created) > 20 and set(created) <= stored, "an invoice answered 201 is missing"
    assert set(created) <= evented, "an answered invoice has no invoice.created event"


async def test_sigterm_stops_paysvc_relay_promptly_and_marks_only_what_was_delivered(db_dsn, broker: Broker):
    """`paysvc relay` on its own, stopped with SIGTERM mid-stream: it exits by itself with status 0 and no
    traceback, and every event it marked published is in the agency's queue (the rest stays in the outbox)."""
    from paysvc.db import connect

    relay, got, _ = await relay_process_publishing(db_dsn, broker)
    try:
        started = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await relay.communicate()
        took = time.monotonic() - started
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()
    assert relay.returncode == 0, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr, stderr.decode()[-2000:]
    assert took < 10, f"stopping took {took:.1f} s"
    await asyncio.sleep(0.5)  # let the consumer take what the relay sent last
    async with connect(db_dsn) as conn:
        marked = {str(r["id"]) for r in await conn.fetch(
            "SELECT id FROM outbox_events WHERE published_at IS NOT NULL")}
    assert marked and marked <= {m.message_id for m in got}, "marked published but never delivered"
