"""An invoice that expires holding part of its amount (treasury applied a held payment to it; the rest never
came) is raised to treasury as expired_part_paid, and resolved by a refund, a match to another invoice, or a
write_off that leaves the money with the agency. Real PostgreSQL, the API as treasury uses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import ledger
from paysvc import invoicing
from paysvc.db import connect
from paysvc.web import POOL
from providers.sandbox import write_settlement_csv
from tests.payments_helpers import new_invoice, pay
from tests.test_settlement import AT, DAY, issued_before, line, upload


async def exceptions(api, treasury, **params) -> list[dict]:
    r = await api.client.get("/v1/reconciliation/exceptions", params=params, headers=treasury)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def resolve(api, treasury, exc_id: str, action: str, **kw):
    return await api.client.post(f"/v1/reconciliation/exceptions/{exc_id}/resolve", headers=treasury,
                                 json={"action": action, "note": "checked", **kw})


async def part_paid(api, portal, treasury, invoice_body, *, txid: str, at: datetime | None = None,
                    amount: int = 1000, paid: int = 400) -> dict:
    """An invoice paid short (all of it held), the payment applied to it by treasury: open, amount_paid grown."""
    inv = await new_invoice(api, portal, invoice_body, amount=amount)
    if at is not None:
        inv = await issued_before(api.dsn, inv, at)
    r = await pay(api.client, inv, amount=paid, txid=txid, **({"paid_at": at} if at else {}))
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    [exc] = [e for e in await exceptions(api, treasury, reason="underpaid", state="open") if e["invoice_id"] == inv["id"]]
    r = await resolve(api, treasury, exc["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 200, await r.text()
    return inv


async def expire(api, *invoices: dict) -> None:
    async with connect(api.dsn) as conn:
        await conn.execute("UPDATE invoices SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
                           [i["id"] for i in invoices])
    await invoicing.expire_due(api.client.app[POOL])


async def invoice(api, portal, inv: dict) -> dict:
    return await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()


async def balances(dsn: str) -> dict[str, int]:
    """Each account's debits less credits, as maintained by the ledger."""
    async with connect(dsn) as conn:
        return {r["code"]: r["debits"] - r["credits"] for r in await conn.fetch(
            "SELECT a.code, b.debits, b.credits FROM ledger_balances b JOIN ledger_accounts a ON a.id = b.account_id")}


async def test_an_expired_part_paid_invoice_is_raised_and_refunded_once_its_payment_is_settled(
        api, portal, treasury, invoice_body):
    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-1")
    await expire(api, inv)
    assert (await invoice(api, portal, inv))["status"] == "expired"
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    assert (exc["state"], exc["invoice_id"], exc["agency"], exc["amount"], exc["provider"]) == (
        "open", inv["id"], "MOI", 400, "sandbox")
    assert exc["evidence"]["invoice"]["id"] == inv["id"] and exc["evidence"]["invoice"]["amount"] == 1000
    async with connect(api.dsn) as conn:
        told = await conn.fetch("SELECT data FROM outbox_events WHERE type = 'reconciliation.exception_opened' "
                                "AND data->>'exception_id' = $1", exc["id"])
    assert len(told) == 1  # the agency hears of it, as of any exception about its money

    # Its payment is not settled yet: the provider may still give it back (which takes it from the invoice)
    r = await resolve(api, treasury, exc["id"], "refund_due")
    body = await r.json()
    assert r.status == 422 and "not settled yet" in body["detail"], body
    [pay_id] = [p["id"] for p in (await invoice(api, portal, inv))["payments"]]
    assert pay_id in body["detail"]

    r = await upload(api, treasury, write_settlement_csv([line("PP-1", 400, at=now)]), day=now.date())
    assert r.status == 201, await r.text()
    before = await balances(api.dsn)
    r = await resolve(api, treasury, exc["id"], "refund_due")
    assert r.status == 200, await r.text()
    done = await r.json()
    assert {(p["account"], p["side"], p["amount"]) for p in done["postings"]} == {
        ("agency:MOI:revenue:KHR", "debit", 400), ("suspense:refunds-due:KHR", "credit", 400)}
    after = await balances(api.dsn)
    assert after["agency:MOI:revenue:KHR"] - before["agency:MOI:revenue:KHR"] == 400   # revenue debited
    assert after["suspense:refunds-due:KHR"] - before.get("suspense:refunds-due:KHR", 0) == -400  # owed back
    got = await invoice(api, portal, inv)
    assert (got["status"], got["amount_paid"]) == ("expired", 0)
    async with connect(api.dsn) as conn:
        posted = await conn.fetch("SELECT data FROM outbox_events WHERE type = 'journal.posted' "
                                  "AND data->>'exception_id' = $1", exc["id"])
        assert len(posted) == 1
        tb = await ledger.trial_balance(conn)
        assert all(t.debits == t.credits for t in tb.totals)
        assert (await ledger.verify(conn)).ok
    assert (await resolve(api, treasury, exc["id"], "write_off")).status == 409


async def test_the_part_is_carried_to_another_invoice_and_an_expired_one_that_then_holds_part_is_raised(
        api, portal, treasury, invoice_body):
    now = datetime.now(UTC)
    old = await part_paid(api, portal, treasury, invoice_body, txid="PP-2")
    await upload(api, treasury, write_settlement_csv([line("PP-2", 400, at=now)]), day=now.date())
    new = await new_invoice(api, portal, invoice_body, amount=1000)
    await expire(api, old)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    r = await resolve(api, treasury, exc["id"], "match_to_invoice", invoice_id=old["id"])
    assert r.status == 422 and "is the one that expired" in (await r.json())["detail"]
    r = await resolve(api, treasury, exc["id"], "match_to_invoice", invoice_id=new["id"])
    assert r.status == 200, await r.text()
    assert {(p["account"], p["side"], p["amount"]) for p in (await r.json())["postings"]} == {
        ("agency:MOI:revenue:KHR", "debit", 400), ("agency:MOI:revenue:KHR", "credit", 400)}
    assert (await invoice(api, portal, old))["amount_paid"] == 0
    got = await invoice(api, portal, new)
    assert (got["status"], got["amount_paid"]) == ("open", 400)
    # The new one expires too, holding the part: raised in its turn
    await expire(api, new)
    opened = await exceptions(api, treasury, reason="expired_part_paid", state="open")
    assert [(e["invoice_id"], e["amount"]) for e in opened] == [(new["id"], 400)]


async def test_one_paid_in_full_after_it_expired_is_closed_and_write_off_leaves_the_money_with_the_agency(
        api, portal, treasury, invoice_body):
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-3")
    await expire(api, inv)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    # The citizen pays the rest late, with the code it had: held as invoice_expired; treasury applies it
    r = await pay(api.client, inv, amount=600, txid="PP-3-REST")
    assert (await r.json())["payments"][0]["exception"] == "invoice_expired"
    [late] = await exceptions(api, treasury, reason="invoice_expired", state="open")
    r = await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 200, await r.text()
    assert (await invoice(api, portal, inv))["status"] == "paid"
    [closed] = await exceptions(api, treasury, reason="expired_part_paid")
    assert (closed["state"], closed["resolution"], closed["resolution_entry_id"]) == ("resolved", "paid_in_full", None)
    assert late["id"] in closed["resolved_by"]
    assert (await resolve(api, treasury, exc["id"], "refund_due")).status == 409



async def test_what_a_write_off_left_with_the_agency_is_not_refunded_with_a_later_part(api, portal, treasury,
                                                                                     invoice_body):
    """Found by review: the agency kept 400 (write_off); then 300 more was applied to the expired invoice, and its
    new exception refunded 700. A write_off now waits for the money to be settled too (it is final), and records
    what the agency keeps; a later part is raised, and refunded, alone."""
    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-4")
    await expire(api, inv)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid", state="open")
    r = await resolve(api, treasury, exc["id"], "write_off")
    assert r.status == 422 and "not settled yet" in (await r.json())["detail"]
    await upload(api, treasury, write_settlement_csv([line("PP-4", 400, at=now)]), day=now.date())
    before = await balances(api.dsn)
    r = await resolve(api, treasury, exc["id"], "write_off")
    assert r.status == 200 and (await r.json())["postings"] == []
    assert await balances(api.dsn) == before and (await invoice(api, portal, inv))["amount_paid"] == 400
    [kept] = await exceptions(api, treasury, reason="expired_part_paid")
    assert kept["evidence"]["kept"] == 400

    r = await pay(api.client, inv, amount=300, txid="PP-4-LATE")
    assert (await r.json())["payments"][0]["exception"] == "invoice_expired"
    [late] = await exceptions(api, treasury, reason="invoice_expired", state="open")
    assert (await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    assert (await invoice(api, portal, inv))["amount_paid"] == 700
    [again] = await exceptions(api, treasury, reason="expired_part_paid", state="open")
    assert again["amount"] == 300 and again["evidence"]["invoice"]["kept_before"] == 400
    await upload(api, treasury, write_settlement_csv([line("PP-4-LATE", 300, at=now)]), day=now.date())
    r = await resolve(api, treasury, again["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert {(p["account"], p["side"], p["amount"]) for p in (await r.json())["postings"]} == {
        ("agency:MOI:revenue:KHR", "debit", 300), ("suspense:refunds-due:KHR", "credit", 300)}
    assert (await invoice(api, portal, inv))["amount_paid"] == 400   # what the agency keeps


async def test_money_applied_to_an_expired_invoice_with_its_exception_open_is_refunded_with_it(
        api, portal, treasury, invoice_body):
    """More money applied while its expired_part_paid is open opens no second one; the refund takes what the
    invoice holds when it is resolved."""
    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-6")
    await expire(api, inv)
    r = await pay(api.client, inv, amount=100, txid="PP-6-LATE")
    [late] = await exceptions(api, treasury, reason="invoice_expired", state="open")
    assert (await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")   # still one
    assert (exc["state"], exc["amount"]) == ("open", 500)                  # saying what it holds now
    await upload(api, treasury, write_settlement_csv([line("PP-6", 400, at=now), line("PP-6-LATE", 100, at=now)]),
                 day=now.date())
    r = await resolve(api, treasury, exc["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert ("agency:MOI:revenue:KHR", "debit", 500) in {(p["account"], p["side"], p["amount"])
                                                         for p in (await r.json())["postings"]}
    assert (await invoice(api, portal, inv))["amount_paid"] == 0


async def test_one_being_resolved_while_a_match_pays_its_invoice_is_closed_as_paid_in_full(
        api, portal, treasury, invoice_body):
    """Found by review: the match that paid the invoice skipped the exception (locked by its own resolution), and
    that resolution, seeing the invoice paid, failed (404 'no reconciliation exception'), for good. The resolution
    now takes the invoice before the exception's row (a later review: row first deadlocked with a refund of the
    invoice's payment), so the match closes it as paid_in_full, and the resolution waiting for the invoice then
    finds it resolved (409 through the API)."""
    import asyncio

    from paysvc.settlement_resolve import AlreadyResolved
    from paysvc.settlement_resolve import resolve as resolve_in

    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-7")
    await upload(api, treasury, write_settlement_csv([line("PP-7", 400, at=now)]), day=now.date())
    await expire(api, inv)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    await pay(api.client, inv, amount=600, txid="PP-7-REST")
    [late] = await exceptions(api, treasury, reason="invoice_expired", state="open")
    async with connect(api.dsn) as paying, connect(api.dsn) as refunding:  # the service's JSON codecs
        await paying.execute("BEGIN")
        await paying.fetchrow("SELECT id FROM invoices WHERE id = $1 FOR UPDATE", inv["id"])  # the match's lock
        await refunding.execute("BEGIN")
        refund = asyncio.ensure_future(resolve_in(refunding, exc["id"], action="refund_due", note="refund",
                                                  invoice_id=None, by="treasury", now=now, bank_account="b"))
        await asyncio.sleep(0.5)
        assert not refund.done()  # it waits for the invoice
        out = await resolve_in(paying, late["id"], action="match_to_invoice", note="the rest", invoice_id=inv["id"],
                               by="treasury", now=now, bank_account="b")
        assert out["resolution"] == "match_to_invoice"
        await paying.execute("COMMIT")
        with pytest.raises(AlreadyResolved):
            await refund
        await refunding.execute("ROLLBACK")
    assert (await invoice(api, portal, inv))["status"] == "paid"
    [closed] = await exceptions(api, treasury, reason="expired_part_paid")
    assert (closed["state"], closed["resolution"]) == ("resolved", "paid_in_full")


async def test_a_part_its_provider_gave_back_is_not_refunded_twice(api, portal, treasury, invoice_body):
    """The provider returned the payment (refund_due of its missing_in_settlement): that took the part back from
    the invoice already, so the expired_part_paid has nothing left to refund."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-5", at=AT)
    await expire(api, inv)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    async with connect(api.dsn) as conn:
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3),
                                   rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC)) == 1
    [missing] = await exceptions(api, treasury, reason="missing_in_settlement")
    r = await resolve(api, treasury, missing["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert (await invoice(api, portal, inv))["amount_paid"] == 0
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    assert exc["amount"] == 0  # what it holds now
    r = await resolve(api, treasury, exc["id"], "refund_due")
    assert r.status == 422 and "holds nothing of its amount any more" in (await r.json())["detail"]
    assert (await resolve(api, treasury, exc["id"], "write_off")).status == 200
    async with connect(api.dsn) as conn:
        assert all(t.debits == t.credits for t in (await ledger.trial_balance(conn)).totals)


async def test_an_invoice_expiring_with_nothing_applied_raises_nothing(api, portal, treasury, invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=1000)
    await expire(api, inv)
    assert (await invoice(api, portal, inv))["status"] == "expired"
    assert await exceptions(api, treasury, reason="expired_part_paid") == []


async def test_a_part_from_a_payment_dated_in_the_future_can_still_be_resolved(api, portal, treasury, invoice_body):
    """Found by review: a payment its provider dated later than it reached us (held as paid_at_implausible) was never
    raised as missing_in_settlement (the recheck went by the reported time), so once treasury had applied it to an
    invoice that then expired, its expired_part_paid waited for a settlement for ever. It is raised by its capture
    time now, and resolving that frees the expired_part_paid."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_days import business_date
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    rules = rules_of(api.client.app[SETTINGS])
    inv = await new_invoice(api, portal, invoice_body, amount=1000)
    r = await pay(api.client, inv, amount=400, txid="PP-FUTURE", paid_at=datetime.now(UTC) + timedelta(days=400))
    # The business day of its capture, as the service counts days (Phnom Penh time, its cutoff). The UTC date
    # is the day before from 17:00 UTC, where this test failed in CI when it took that date.
    today = business_date(datetime.now(UTC), rules.cutoff)
    assert (await r.json())["payments"][0]["exception"] == "paid_at_implausible"
    [held] = await exceptions(api, treasury, reason="paid_at_implausible", state="open")
    assert (await resolve(api, treasury, held["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    await expire(api, inv)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    assert (await resolve(api, treasury, exc["id"], "write_off")).status == 422  # not settled yet
    async with connect(api.dsn) as conn:
        raised = await raise_overdue(conn, provider="sandbox", today=today + timedelta(days=3), rules=rules,
                                     now=datetime.now(UTC))
    assert raised == 1
    [missing] = await exceptions(api, treasury, reason="missing_in_settlement")
    assert missing["business_date"] == today.isoformat()  # its capture's day, not 400 days on
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200  # the provider will not pay
    r = await resolve(api, treasury, exc["id"], "refund_due")
    assert r.status == 200, await r.text()


async def test_a_part_carried_to_another_agencys_invoice_names_to_each_agency_only_its_own_invoice(
        api, portal, treasury, invoice_body):
    # Found by a security review: the journal.posted event to the agency the money left, and its entry list,
    # named the other agency's invoice, whose id is the only secret of that invoice's public pages.
    now = datetime.now(UTC)
    old = await part_paid(api, portal, treasury, invoice_body, txid="PP-X")
    await upload(api, treasury, write_settlement_csv([line("PP-X", 400, at=now)]), day=now.date())
    mpwt = await api.portal("MPWT")
    new = await new_invoice(api, mpwt, invoice_body, amount=1000)
    await expire(api, old)
    [exc] = await exceptions(api, treasury, reason="expired_part_paid")
    r = await resolve(api, treasury, exc["id"], "match_to_invoice", invoice_id=new["id"])
    assert r.status == 200, await r.text()
    resolved = await r.json()
    assert {(p["account"], p["side"], p["amount"]) for p in resolved["postings"]} == {
        ("agency:MOI:revenue:KHR", "debit", 400), ("agency:MPWT:revenue:KHR", "credit", 400)}
    async with connect(api.dsn) as conn:
        told = {r["code"]: r["data"] for r in await conn.fetch(
            "SELECT a.code, e.data FROM outbox_events e JOIN agencies a ON a.id = e.agency_id "
            "WHERE e.type = 'journal.posted' AND e.data->>'exception_id' = $1", exc["id"])}
    assert {code: (d["invoice_id"], [p["account"] for p in d["postings"]]) for code, d in told.items()} == {
        "MOI": (old["id"], ["agency:MOI:revenue:KHR"]), "MPWT": (new["id"], ["agency:MPWT:revenue:KHR"])}
    for key, expected in ((portal, None), (mpwt, new["id"]), (treasury, new["id"])):  # treasury sees every id
        r = await api.client.get("/v1/ledger/entries", params={"kind": "exception_resolved"}, headers=key)
        assert r.status == 200, await r.text()
        [entry] = [e for e in (await r.json())["data"] if e["id"] == resolved["resolution_entry_id"]]
        assert entry["invoice_id"] == expected
        if key is portal:
            assert new["id"] not in await r.text()
