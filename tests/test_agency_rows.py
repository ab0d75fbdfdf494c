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


@pytest.mark.parametrize("invoice, agency, error", [
    (False, "own", asyncpg.CheckViolationError),         # an agency without an invoice
    (True, None, asyncpg.CheckViolationError),           # an invoice without its agency
    (True, "other", asyncpg.ForeignKeyViolationError),   # another agency than its invoice's (found by review)
    (True, "missing", asyncpg.ForeignKeyViolationError),  # an agency that does not exist (found by review)
], ids=["agency_only", "invoice_only", "other_agency", "missing_agency"])
async def test_a_payment_has_its_invoices_agency_and_only_then(db, invoice, agency, error):
    # With the foreign key to agencies gone (it locked the agency's row), a payment's agency is checked as its
    # invoice's: (invoice_id, agency_id) references the invoice's (id, agency_id).
    ids = [await db.fetchval("INSERT INTO agencies (code, name, name_km, bakong_account) "
                             "VALUES ($1, $1, $1, 'pair@nbcq') RETURNING id", code) for code in ("PAIR", "OTHER")]
    invoice_id = None
    if invoice:
        invoice_id = "inv_pair"
        await db.execute(
            "INSERT INTO invoices (id, bill_number, agency_id, reference, description, currency, amount, "
            "expires_at) VALUES ($1, 'PS00000001', $2, 'R-1', 'd', 'KHR', 100, now() + interval '10 minutes')",
            invoice_id, ids[0])
    agency_id = {"own": ids[0], "other": ids[1], "missing": 999_999, None: None}[agency]
    insert = ("INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, currency, amount, "
              "applied_amount, suspense_amount, paid_at, source) "
              "VALUES ($3, 'sandbox', $3, $1, $2, 'KHR', 100, 0, 100, now(), 'callback')")
    with pytest.raises(error):
        await db.execute(insert, invoice_id, agency_id, "pay_pair")
    if invoice:  # the invoice's own agency is accepted
        await db.execute(insert, invoice_id, ids[0], "pay_ok")


async def test_an_event_whose_agency_has_no_counter_is_reported(db, caplog):
    # The events' foreign key to agencies is gone: an event naming an agency without an event counter would
    # never be numbered or published. The sequencer's pass reports it rather than leave it unseen.
    from paysvc import outbox

    assert await outbox.events_without_agency(db) == 0
    await db.execute("INSERT INTO outbox_events (id, agency_id, type, occurred_at, data) "
                     "VALUES (gen_random_uuid(), 424242, 'invoice.created', now(), '{}')")
    assert await outbox.sequence(db) == 0
    with caplog.at_level("ERROR", logger="paysvc.outbox"):
        assert await outbox.events_without_agency(db) == 1
    assert "424242" in caplog.text and "never numbered or published" in caplog.text
    assert outbox.WITHOUT_AGENCY._value.get() == 1
