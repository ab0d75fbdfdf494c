"""Per-agency event numbers, given after commit: gap-free, in write order, each event once."""

from __future__ import annotations

import asyncio

import asyncpg

from paysvc.db import init_connection
from paysvc.outbox import sequence


async def test_numbers_are_per_agency_gap_free_and_in_write_order(api, invoice_body):
    moi = await api.portal("MOI")
    gdt = await api.portal("GDT")
    await asyncio.gather(*(api.client.post("/v1/invoices", json=invoice_body(), headers=moi) for _ in range(12)),
                         *(api.client.post("/v1/invoices", json=invoice_body(), headers=gdt) for _ in range(3)))
    conn = await asyncpg.connect(api.dsn)
    await init_connection(conn)
    # A transaction that writes an event and rolls back leaves no number behind.
    tx = conn.transaction()
    await tx.start()
    await conn.execute("INSERT INTO outbox_events (id, agency_id, type, occurred_at, data) "
                       "SELECT gen_random_uuid(), id, 'invoice.created', now(), '{}' FROM agencies WHERE code='MOI'")
    await tx.rollback()
    # Two sequencers at once: each event is numbered exactly once.
    other = await asyncpg.connect(api.dsn)
    counts = await asyncio.gather(sequence(conn), sequence(other))
    await other.close()
    assert sum(counts) == 15
    for code, n in (("MOI", 12), ("GDT", 3)):
        rows = await conn.fetch("SELECT o.seq, o.pos FROM outbox_events o JOIN agencies a ON a.id = o.agency_id "
                                "WHERE a.code = $1 ORDER BY o.seq", code)
        assert [r["seq"] for r in rows] == list(range(1, n + 1))
        assert [r["pos"] for r in rows] == sorted(r["pos"] for r in rows)
        assert await conn.fetchval("SELECT s.last_seq FROM agency_event_seq s JOIN agencies a ON a.id = s.agency_id "
                                   "WHERE a.code = $1", code) == n
    await conn.close()


async def test_feed_shows_events_committed_a_moment_ago(api, invoice_body):
    h = await api.portal("MOI")
    await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    feed = await (await api.client.get("/v1/events", params={"after": "0"}, headers=h)).json()
    assert [(e["seq"], e["type"]) for e in feed["data"]] == [(1, "invoice.created")]
