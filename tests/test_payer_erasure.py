"""Payer details (personal data) are erased on request and past their retention; the invoice, its payments and
the ledger stay."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from paysvc import invoicing
from paysvc.db import connect, create_pool
from paysvc.settings import Settings, SettingsError, load_settings
from tests.conftest import running_api

PAYER = {"name": "Sok Dara", "phone": "+85512345678", "email": "dara@example.com"}


async def test_an_agency_erases_its_invoices_payer_and_the_invoice_stays(api, portal, invoice_body):
    body = invoice_body(payer=PAYER)
    created = await api.client.post("/v1/invoices", json=body, headers={**portal, "Idempotency-Key": "k-1"})
    assert created.status == 201
    inv = await created.json()
    assert inv["payer"]["name"] == "Sok Dara" and inv["payer_erased_at"] is None

    r = await api.client.delete(f"/v1/invoices/{inv['id']}/payer", headers=portal)
    erased = await r.json()
    assert r.status == 200, erased
    assert erased["payer"] is None and erased["payer_erased_at"] is not None
    assert (erased["id"], erased["status"], erased["amount"], erased["reference"]) == (
        inv["id"], "open", 50000, body["reference"])
    assert erased["khqr"] == inv["khqr"] and erased["khqr"] is not None  # the open invoice's code, as GET says
    async with connect(api.dsn) as conn:
        row = await conn.fetchrow("SELECT payer_key_id, payer_ciphertext FROM invoices WHERE id = $1", inv["id"])
    assert tuple(row) == (None, None)  # gone from the database, not only hidden

    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["payer"] is None and got["payer_erased_at"] == erased["payer_erased_at"]
    # A replay of the create answers as the first time, without the payer (it was a 500: nothing to decrypt).
    again = await api.client.post("/v1/invoices", json=body, headers={**portal, "Idempotency-Key": "k-1"})
    replayed = await again.json()
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true", replayed
    assert replayed["id"] == inv["id"] and replayed["payer"] is None
    assert replayed["payer_erased_at"] == erased["payer_erased_at"]  # why it has none
    # Erasing again changes nothing: the first erasure's time stays.
    r = await api.client.delete(f"/v1/invoices/{inv['id']}/payer", headers=portal)
    assert r.status == 200 and (await r.json())["payer_erased_at"] == erased["payer_erased_at"]
    # The invoice is still payable: its code is unchanged.
    code = await (await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=portal)).json()
    assert code["md5"] == inv["khqr"]["md5"]


async def test_only_the_invoices_own_agency_erases_with_a_key_that_may_write(api, portal, invoice_body):
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(payer=PAYER), headers=portal)).json()
    other = await api.portal("MPWT")
    r = await api.client.delete(f"/v1/invoices/{inv['id']}/payer", headers=other)
    assert r.status == 404, await r.text()
    reader = {"Authorization": f"Bearer {await api.key('MOI', scopes=('invoices:read',))}"}
    r = await api.client.delete(f"/v1/invoices/{inv['id']}/payer", headers=reader)
    assert r.status == 403, await r.text()
    r = await api.client.delete("/v1/invoices/inv_nosuchinvoice/payer", headers=portal)
    assert r.status == 404
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["payer"] == PAYER  # untouched by the refused requests


async def _invoices(api, portal, invoice_body, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = await api.client.post("/v1/invoices", json=invoice_body(payer=PAYER), headers=portal)
        assert r.status == 201
        out.append((await r.json())["id"])
    return out


async def _final(conn, invoice_id: str, status: str, days_ago: float) -> None:
    column = {"paid": "paid_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
    await conn.execute(f"UPDATE invoices SET status = $2, {column} = now() - make_interval(secs => $3) "
                       "WHERE id = $1", invoice_id, status, days_ago * 86400)


async def test_payers_are_erased_past_their_retention_except_where_treasury_may_need_them(api, portal, invoice_body):
    old_paid, old_expired, old_cancelled, recent, still_open, disputed, settled_dispute, paid_late = await _invoices(
        api, portal, invoice_body, 8)
    async with connect(api.dsn) as conn:
        await _final(conn, old_paid, "paid", 400)
        await _final(conn, old_expired, "expired", 366)
        await _final(conn, old_cancelled, "cancelled", 500)
        await _final(conn, recent, "paid", 364)
        await _final(conn, disputed, "expired", 400)
        await _final(conn, settled_dispute, "expired", 400)
        # expired long ago, paid lately (treasury applied a payment to it): final since it was paid
        await _final(conn, paid_late, "expired", 400)
        await _final(conn, paid_late, "paid", 10)
        for exc_id, invoice_id, state in (("exc_open", disputed, "open"), ("exc_done", settled_dispute, "resolved")):
            await conn.execute(
                "INSERT INTO reconciliation_exceptions (id, reason, provider, invoice_id, currency, amount, state, "
                "resolved_at, resolved_by, resolution, resolution_note) VALUES ($1, 'underpaid', 'sandbox', $2, "
                "'KHR', 100, $3, CASE WHEN $3 = 'resolved' THEN now() END, CASE WHEN $3 = 'resolved' THEN 't' END, "
                "CASE WHEN $3 = 'resolved' THEN 'write_off' END, CASE WHEN $3 = 'resolved' THEN 'n' END)",
                exc_id, invoice_id, state)
    pool = await create_pool(api.dsn, Settings(database_url=api.dsn, db_pool_min=1, db_pool_max=2))
    try:
        said = await invoicing.erase_payers_past_retention(pool, retention=timedelta(days=365), batch=2)
        assert await invoicing.erase_payers_past_retention(pool, retention=timedelta(days=365)) is None
    finally:
        await pool.close()
    assert said == "erased the payer of 4 invoices final for over 365 days"  # in batches of 2
    async with connect(api.dsn) as conn:
        kept = {r["id"]: (r["payer_key_id"] is not None, r["payer_erased_at"] is not None) for r in await conn.fetch(
            "SELECT id, payer_key_id, payer_erased_at FROM invoices")}
    assert kept == {old_paid: (False, True), old_expired: (False, True), old_cancelled: (False, True),
                    settled_dispute: (False, True),
                    recent: (True, False), still_open: (True, False), disputed: (True, False),
                    paid_late: (True, False)}
    got = await (await api.client.get(f"/v1/invoices/{old_paid}", headers=portal)).json()
    assert got["payer"] is None and got["status"] == "paid" and got["payer_erased_at"] is not None


async def test_the_service_erases_payers_past_retention_by_itself(db_dsn, invoice_body):
    async with running_api(db_dsn) as api:
        portal = await api.portal("MOI")
        [old] = await _invoices(api, portal, invoice_body, 1)
        async with connect(db_dsn) as conn:
            await _final(conn, old, "cancelled", 400)
    async with running_api(db_dsn, background=True) as api:  # its hourly job runs once at start
        async with connect(db_dsn) as conn:
            for _ in range(100):
                if await conn.fetchval("SELECT payer_erased_at FROM invoices WHERE id = $1", old) is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the payer was not erased by the service's background job")


def test_payer_retention_outlasts_the_settlement_grace():
    with pytest.raises(SettingsError, match=r"PAYSVC_PAYER_RETENTION_DAYS \(49\) must be at least "
                                            r"PAYSVC_SETTLEMENT_GRACE_DAYS \+ 30 \(50\)"):
        load_settings(settlement_grace_days=20, payer_retention_days=49)
    assert load_settings(settlement_grace_days=20, payer_retention_days=50).payer_retention_days == 50
    assert load_settings().payer_retention_days == 365
