"""Resolving reconciliation exceptions: a settlement in another currency can be closed, a payment's suspense is
reversed from where earlier resolutions put it (never twice), and every agency whose accounts a resolution
moves is told with a ``journal.posted`` event."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

import ledger
from paysvc.db import connect
from providers import SettlementLine
from providers.sandbox import write_settlement_csv
from tests.payments_helpers import new_invoice, pay
from tests.test_settlement import AT, DAY, clearing, issued_before, resolve, upload


async def balances(dsn: str, *codes: str) -> dict[str, int]:
    out = {}
    async with connect(dsn) as conn:
        for code in codes:
            try:
                out[code] = await ledger.balance(conn, code)
            except ledger.AccountNotFound:
                out[code] = 0
        assert (await ledger.verify(conn)).ok
    return out


async def open_exceptions(api, treasury, **params) -> list[dict]:
    r = await api.client.get("/v1/reconciliation/exceptions", params={"state": "open", **params}, headers=treasury)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def overpaid(api, portal, treasury, invoice_body, txid: str) -> tuple[dict, dict]:
    """Invoice 33,000 paid 36,000: 3,000 held in suspense under an ``overpaid`` exception."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=33000), AT)
    r = await pay(api.client, inv, txid=txid, paid_at=AT, amount=36000)
    assert r.status == 200, await r.text()
    [exc] = await open_exceptions(api, treasury, reason="overpaid")
    assert exc["amount"] == 3000
    return inv, exc


async def recheck(dsn: str, app) -> int:
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    async with connect(dsn) as conn:
        return await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=9),
                                   rules=rules_of(app[SETTINGS]), now=datetime.now(UTC))


async def journal_events(dsn: str) -> list[tuple[str, dict]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT a.code, o.data FROM outbox_events o JOIN agencies a ON a.id = o.agency_id "
                                "WHERE o.type = 'journal.posted' AND o.data ? 'exception_id'")
    finally:
        await conn.close()
    return [(r["code"], r["data"] if isinstance(r["data"], dict) else json.loads(r["data"])) for r in rows]


async def test_a_line_settled_in_another_currency_is_written_off_per_currency(api, portal, treasury, invoice_body):
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=20000), AT)
    assert (await pay(api.client, inv, txid="TX-FX", paid_at=AT)).status == 200
    data = write_settlement_csv([SettlementLine(line_no=1, transaction_id="TX-FX", amount=500, currency="USD",
                                                paid_at=AT, fee=10)])
    r = await upload(api, treasury, data)
    assert r.status == 201, await r.text()
    [exc] = await open_exceptions(api, treasury, reason="amount_mismatch")
    assert await clearing(api.dsn) == 20000

    # Only write_off makes sense without an exchange rate; the others say so and name it.
    for action, kw in [("refund_due", {}), ("match_to_invoice", {"invoice_id": inv["id"]})]:
        r = await resolve(api, treasury, exc["id"], action, **kw)
        assert r.status == 422, await r.text()
        assert "write_off" in (await r.json())["detail"]
    r = await resolve(api, treasury, exc["id"], "write_off")
    assert r.status == 200, await r.text()
    got = {(p["account"], p["side"], p["currency"]): p["amount"] for p in (await r.json())["postings"]}
    assert got == {("expense:write-offs:sandbox:KHR", "debit", "KHR"): 20000,
                   ("provider:sandbox:clearing:KHR", "credit", "KHR"): 20000,
                   ("treasury:bank:nbc-treasury:USD", "debit", "USD"): 490,
                   ("expense:provider-fees:sandbox:USD", "debit", "USD"): 10,
                   ("equity:written-off:USD", "credit", "USD"): 500}
    # The day's clearing is zero in each currency, and the ledger balances.
    assert await balances(api.dsn, "provider:sandbox:clearing:KHR", "provider:sandbox:clearing:USD",
                          "treasury:bank:nbc-treasury:USD") == {
        "provider:sandbox:clearing:KHR": 0, "provider:sandbox:clearing:USD": 0, "treasury:bank:nbc-treasury:USD": 490}
    assert await open_exceptions(api, treasury) == []


async def test_refund_of_a_missing_payment_takes_its_suspense_from_where_it_was_moved(api, portal, treasury,
                                                                                     invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert missing["amount"] == 36000

    # While the overpaid exception still holds the 3,000, reversing the payment would take it twice.
    r = await resolve(api, treasury, missing["id"], "refund_due")
    assert r.status == 422, await r.text()
    assert over["id"] in (await r.json())["detail"]

    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    accts = ("suspense:unmatched:KHR", "suspense:refunds-due:KHR", "agency:MOI:revenue:KHR",
             "provider:sandbox:clearing:KHR")
    assert await balances(api.dsn, *accts) == {"suspense:unmatched:KHR": 0, "suspense:refunds-due:KHR": 3000,
                                               "agency:MOI:revenue:KHR": 33000, "provider:sandbox:clearing:KHR": 36000}
    r = await resolve(api, treasury, missing["id"], "refund_due")
    assert r.status == 200, await r.text()
    got = {(p["account"], p["side"]): p["amount"] for p in (await r.json())["postings"]}
    assert got == {("agency:MOI:revenue:KHR", "debit"): 33000, ("suspense:refunds-due:KHR", "debit"): 3000,
                   ("provider:sandbox:clearing:KHR", "credit"): 36000}
    # The provider returned all 36,000: nothing is owed to the payer any more, nothing left anywhere.
    assert await balances(api.dsn, *accts) == dict.fromkeys(accts, 0)


async def test_agencies_whose_accounts_a_resolution_moves_get_journal_posted(api, portal, treasury, invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    mof = await api.portal("MOF")
    other = await new_invoice(api, mof, invoice_body, amount=3000)
    conn = await asyncpg.connect(api.dsn)
    ids = dict(await conn.fetch("SELECT code, id FROM agencies"))
    await conn.close()

    # The overpaid 3,000 pays another agency's invoice: MOF's revenue grows, MOF hears of it.
    r = await resolve(api, treasury, over["id"], "match_to_invoice", invoice_id=other["id"])
    assert r.status == 200, await r.text()
    entry1 = (await r.json())["resolution_entry_id"]
    [(code, data)] = await journal_events(api.dsn)
    assert code == "MOF"
    assert data == {"entry_id": entry1, "kind": "exception_resolved", "payment_id": over["payment_id"],
                    "invoice_id": other["id"], "effective_at": data["effective_at"], "exception_id": over["id"],
                    "postings": [{"account": "agency:MOF:revenue:KHR", "side": "credit", "amount": 3000,
                                  "currency": "KHR"}]}

    # The provider never settled the payment and returned it: both agencies' revenue is taken back, each told
    # only of its own postings.
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    r = await resolve(api, treasury, missing["id"], "refund_due")
    assert r.status == 200, await r.text()
    entry2 = (await r.json())["resolution_entry_id"]
    events = {code: data for code, data in await journal_events(api.dsn) if data["exception_id"] == missing["id"]}
    assert set(events) == {"MOI", "MOF"}
    for code, amount in [("MOI", 33000), ("MOF", 3000)]:
        assert events[code]["entry_id"] == entry2 and events[code]["exception_id"] == missing["id"]
        assert events[code]["kind"] == "exception_resolved" and events[code]["payment_id"] == missing["payment_id"]
        assert events[code]["postings"] == [{"account": f"agency:{code}:revenue:KHR", "side": "debit",
                                             "amount": amount, "currency": "KHR"}]
    conn = await asyncpg.connect(api.dsn)
    agencies = {r["agency_id"] for r in await conn.fetch(
        "SELECT agency_id FROM outbox_events WHERE type = 'journal.posted' AND data->>'entry_id' = $1", str(entry2))}
    await conn.close()
    assert agencies == {ids["MOI"], ids["MOF"]}
    assert await balances(api.dsn, "agency:MOI:revenue:KHR", "agency:MOF:revenue:KHR",
                          "provider:sandbox:clearing:KHR") == {
        "agency:MOI:revenue:KHR": 0, "agency:MOF:revenue:KHR": 0, "provider:sandbox:clearing:KHR": 0}
    assert inv


async def test_a_refusal_about_the_invoice_named_is_reported_under_invoice_id(api, portal, treasury, invoice_body):
    # Found by a fuzz audit: "no invoice 'inv_x'" was reported under the field action.
    _, over = await overpaid(api, portal, treasury, invoice_body, "TX-NOINV")
    r = await resolve(api, treasury, over["id"], "match_to_invoice", invoice_id="inv_does_not_exist")
    body = await r.json()
    assert r.status == 422 and body["errors"][0]["field"] == "invoice_id", body
    assert "no invoice 'inv_does_not_exist'" in body["detail"]
