"""An agency's row is shared by every transaction of that agency: payments and their events do not lock it
(migration 0032), and it is never deleted, so what names it keeps naming an agency that exists."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from paysvc.capture import capture
from paysvc.db import connect
from tests.payments_helpers import new_invoice
from tests.test_settlement import AT, _notice, issued_before


async def test_a_capture_does_not_wait_for_its_agencys_row(api, portal, invoice_body):
    # A capture wrote a payment and events with foreign keys to agencies, each locking the agency's row
    # (FOR KEY SHARE) to the end of the transaction: every capture of the agency queued behind whatever held
    # that row, and concurrent ones piled up multixacts on it. Hold the row as an UPDATE of it would: the
    # capture goes through, with its payment and events.
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as holder, connect(api.dsn) as conn:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute("SELECT 1 FROM agencies a JOIN invoices i ON i.agency_id = a.id "
                                 "WHERE i.id = $1 FOR UPDATE OF a", inv["id"])
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '2s'")
                done = await asyncio.wait_for(
                    capture(conn, _notice(inv, "TX-AGENCY-ROW"), source="callback", now=datetime.now(UTC)), 10)
            assert done.created and done.reason is None
        finally:
            await tx.rollback()
        events = await conn.fetch("SELECT type FROM outbox_events o JOIN payments p ON p.agency_id = o.agency_id "
                                  "WHERE p.id = $1 AND o.data ->> 'payment_id' = $1 ORDER BY o.type", done.payment_id)
        assert [e["type"] for e in events] == ["invoice.paid", "journal.posted"], events


async def test_an_agency_is_never_deleted(db):
    agency = await db.fetchval("INSERT INTO agencies (code, name, name_km, bakong_account) "
                               "VALUES ('UNUSED', 'Unused', 'Unused', 'unused@nbcq') RETURNING id")
    # not even one nothing names yet, and not by the database's owner
    with pytest.raises(asyncpg.RestrictViolationError, match="agencies are never deleted"):
        await db.execute("DELETE FROM agencies WHERE id = $1", agency)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("DELETE FROM agencies WHERE id = $1", agency)
    assert await db.fetchval("SELECT count(*) FROM agencies WHERE id = $1", agency) == 1


@pytest.mark.parametrize("invoice, agency", [(False, True), (True, False)], ids=["agency_only", "invoice_only"])
async def test_a_payment_has_an_agency_exactly_when_it_has_an_invoice(db, invoice, agency):
    # Its agency is its invoice's; with the foreign key to agencies gone, the pairing is a rule of its own.
    agency_id = await db.fetchval("INSERT INTO agencies (code, name, name_km, bakong_account) "
                                  "VALUES ('PAIR', 'Pair', 'Pair', 'pair@nbcq') RETURNING id")
    invoice_id = None
    if invoice:
        invoice_id = "inv_pair"
        await db.execute(
            "INSERT INTO invoices (id, bill_number, agency_id, reference, description, currency, amount, "
            "expires_at) VALUES ($1, 'PS00000001', $2, 'R-1', 'd', 'KHR', 100, now() + interval '10 minutes')",
            invoice_id, agency_id)
    with pytest.raises(asyncpg.CheckViolationError, match="payments_invoice_and_agency"):
        await db.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, currency, amount, "
            "applied_amount, suspense_amount, paid_at, source) "
            "VALUES ('pay_pair', 'sandbox', 'TX-PAIR', $1, $2, 'KHR', 100, 0, 100, now(), 'callback')",
            invoice_id, agency_id if agency else None)
