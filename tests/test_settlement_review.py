"""Settlement defects found by treasury's review: money settled after treasury had written it off or booked it
as returned, a line for money captured under another provider, and exceptions raised by a file's own lines left
without a business date."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import asyncpg
import pytest

import ledger
from paysvc.db import connect
from providers.camt053 import write_statement
from providers.sandbox import write_settlement_csv
from tests.test_settlement import DAY, clearing, line, paid, payment_ids, resolve, upload


async def _overdue(api) -> None:
    """Raise missing_in_settlement for the day's unsettled payments, as `paysvc settlements recheck` does."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    rules = rules_of(api.client.app[SETTINGS])
    async with connect(api.dsn) as conn:
        await raise_overdue(conn, provider=None, today=DAY + timedelta(days=3), rules=rules, now=datetime.now(UTC))


async def _exceptions(api, treasury, **params) -> list[dict]:
    r = await api.client.get("/v1/reconciliation/exceptions", params=params, headers=treasury)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def _balance(dsn: str, account: str) -> int:
    async with connect(dsn) as conn:
        try:
            return await ledger.balance(conn, account)
        except ledger.AccountNotFound:
            return 0


async def _revenue(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT coalesce(sum(CASE p.side WHEN 'credit' THEN p.amount ELSE -p.amount END), 0) "
            "FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id "
            "WHERE a.code LIKE 'agency:%:revenue:KHR'")
    finally:
        await conn.close()


async def test_a_line_for_a_payment_already_written_off_or_refunded_is_raised_not_matched(
        api, portal, treasury, invoice_body):
    inv1 = await paid(api, portal, invoice_body, "TX-1")
    inv2 = await paid(api, portal, invoice_body, "TX-2")
    await _overdue(api)
    tx1, tx2 = await payment_ids(api.dsn, "TX-1", "TX-2")
    missing = {e["payment_id"]: e for e in await _exceptions(api, treasury, reason="missing_in_settlement")}
    assert (await resolve(api, treasury, missing[tx1]["id"], "write_off")).status == 200
    assert (await resolve(api, treasury, missing[tx2]["id"], "refund_due")).status == 200
    assert await clearing(api.dsn) == 0
    assert await _balance(api.dsn, "expense:write-offs:sandbox:KHR") == 50000
    assert await _revenue(api.dsn) == 50000

    # The provider settles both after all.
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, fee=100), line("TX-2", 50000)]))
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert rep["lines_by_category"]["matched"]["count"] == 0
    assert rep["lines_by_category"]["settled_after_resolution"]["count"] == 2
    assert rep["settlement_entry"]["postings"] == []                 # clearing was credited by the resolutions
    assert await clearing(api.dsn) == 0
    assert not rep["clean"]
    raised = {e["payment_id"]: e for e in rep["open_exceptions"]}
    assert {e["reason"] for e in raised.values()} == {"settled_after_resolution"} and set(raised) == {tx1, tx2}
    listed = await _exceptions(api, treasury, business_date=DAY.isoformat(), state="open",
                               reason="settled_after_resolution")
    assert len(listed) == 2
    # the agency hears of both, as of any exception opened on its payments
    feed = await (await api.client.get("/v1/events", params={"after": "0"}, headers=portal)).json()
    opened = {e["data"]["exception_id"] for e in feed["data"] if e["type"] == "reconciliation.exception_opened"}
    assert {raised[tx1]["id"], raised[tx2]["id"]} <= opened

    # A line of a later file for the same payment is a duplicate: the payment is settled once.
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]), name="again.csv")
    assert (await r.json())["lines_by_category"]["duplicate_in_settlement"]["count"] == 1

    # match_to_invoice to another invoice is refused; to its own, it undoes the earlier resolution.
    assert (await resolve(api, treasury, raised[tx1]["id"], "match_to_invoice", invoice_id=inv2["id"])).status == 422
    for pid, inv in ((tx1, inv1), (tx2, inv2)):
        r = await resolve(api, treasury, raised[pid]["id"], "match_to_invoice", invoice_id=inv["id"])
        assert r.status == 200, await r.text()
    assert await clearing(api.dsn) == 0
    assert await _balance(api.dsn, "expense:write-offs:sandbox:KHR") == 0
    assert await _revenue(api.dsn) == 100000
    assert await _balance(api.dsn, "treasury:bank:nbc-treasury:KHR") == 99900
    assert await _balance(api.dsn, "expense:provider-fees:sandbox:KHR") == 100
    async with connect(api.dsn) as conn:
        assert (await ledger.verify(conn)).ok
    rep = await (await api.client.get(f"/v1/settlements/{rep['id']}", headers=treasury)).json()
    assert [e["reason"] for e in rep["open_exceptions"]] == ["duplicate_in_settlement"]


async def test_a_bank_line_for_money_captured_under_another_provider_is_a_duplicate_not_a_500(
        api, portal, treasury, invoice_body):
    inv1 = await paid(api, portal, invoice_body, "TX-1")             # its missing_in_settlement stays open
    inv2 = await paid(api, portal, invoice_body, "TX-2")             # its missing_in_settlement is written off
    await _overdue(api)
    tx1, tx2 = await payment_ids(api.dsn, "TX-1", "TX-2")
    missing = {e["payment_id"]: e for e in await _exceptions(api, treasury, reason="missing_in_settlement")}
    assert (await resolve(api, treasury, missing[tx2]["id"], "write_off")).status == 200

    data = write_statement([line("NBC-1", 50000, md5=inv1["khqr"]["md5"]),
                            line("NBC-2", 50000, md5=inv2["khqr"]["md5"])])
    r = await upload(api, treasury, data, provider="bakong", fmt="camt053", name="stmt.xml")
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert rep["lines_by_category"]["duplicate_in_settlement"]["count"] == 2
    assert {ln["payment_id"] for ln in rep["lines"]} == {tx1, tx2}
    dups = {e["payment_id"]: e for e in rep["open_exceptions"]}
    assert set(dups) == {tx1, tx2}
    assert {e["reason"] for e in dups.values()} == {"duplicate_in_settlement"}
    assert {dups[tx1]["id"], dups[tx2]["id"]}.isdisjoint({missing[tx1]["id"], missing[tx2]["id"]})
    assert {e["evidence"]["payment"]["provider"] for e in dups.values()} == {"sandbox"}
    # The sandbox payments' own exceptions are untouched; nothing was posted against bakong's clearing.
    still = {e["id"]: e["state"] for e in await _exceptions(api, treasury, reason="missing_in_settlement")}
    assert still == {missing[tx1]["id"]: "open", missing[tx2]["id"]: "resolved"}
    assert await clearing(api.dsn, "bakong") == 0 and await clearing(api.dsn) == 50000


async def test_an_exception_raised_by_a_files_line_carries_the_files_business_date(api, portal, treasury,
                                                                                   invoice_body):
    day = date(2026, 11, 22)
    at = datetime(2026, 11, 21, 23, 30, tzinfo=timezone(timedelta(hours=7)))   # the day before, local time
    r = await upload(api, treasury, write_settlement_csv([line("TX-U", 7000, at=at)]), day=day)
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert not rep["clean"]
    assert [e["reason"] for e in rep["open_exceptions"]] == ["unknown_khqr"]
    listed = await _exceptions(api, treasury, business_date=day.isoformat(), state="open")
    assert [e["reason"] for e in listed] == ["unknown_khqr"]
    assert listed[0]["business_date"] == day.isoformat()
    assert rep["business_date"] == day.isoformat()


def test_settled_after_resolution_plans_balance_whatever_the_line_says():
    """The pure rule: every action balances, restoring to the payment's own invoice puts back what the earlier
    resolution took and places the difference; the clearing account is never touched (already credited)."""
    from paysvc.settlement_resolve import Facts, ResolutionRefused, Target, plan

    own = Target("inv_1", "MOI", "KHR", 0, "paid")
    for line_amount, earlier in [(50000, (("expense:write-offs:sandbox:KHR", 50000),)),
                                 (52000, (("agency:MOI:revenue:KHR", 30000), ("suspense:unmatched:KHR", 20000))),
                                 (47000, (("expense:write-offs:sandbox:KHR", 50000),))]:
        earlier_action = "write_off" if earlier[0][0].startswith("expense:") else "refund_due"
        for cur, facts_earlier_action in [("KHR", None), ("KHR", earlier_action), ("USD", earlier_action)]:
            # the exception is in the line's currency; in USD the payment (KHR) is in another
            f = Facts(reason="settled_after_resolution", provider="sandbox", currency=cur, amount=line_amount,
                      payment_amount=50000, payment_invoice="inv_1", line_amount=line_amount, line_fee=100,
                      line_currency=cur, earlier_debits=earlier, earlier_action=facts_earlier_action,
                      payment_currency="KHR", write_off_loss=50000 if facts_earlier_action == "write_off" else 0)
            for action, target in [("match_to_invoice", own), ("refund_due", None), ("write_off", None)]:
                if cur == "USD" and action == "match_to_invoice":
                    with pytest.raises(ResolutionRefused, match="different currencies"):
                        plan(f, action, target, bank_account="nbc-treasury")
                    continue
                p = plan(f, action, target, bank_account="nbc-treasury")
                for c in ("KHR", "USD"):   # balanced in each currency
                    debit = sum(n for a, s, n in p.postings if s == "debit" and a.endswith(c))
                    assert debit == sum(n for a, s, n in p.postings if s == "credit" and a.endswith(c)), (
                        line_amount, action, cur, facts_earlier_action)
                assert not any(a.startswith("provider:") for a, _, _ in p.postings)
                assert p.invoice_amount == 0
            with pytest.raises(ResolutionRefused):
                plan(f, "match_to_invoice", Target("inv_2", "MOI", "KHR", 50000, "open"), bank_account="nbc-treasury")
