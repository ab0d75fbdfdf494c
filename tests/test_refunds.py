"""Refunds owed back to payers and paid out by treasury: what is owed is listed per case, a payout is recorded
once per bank transfer, never for more than is owed, never while the payment's provider may still give the money
back, and its entry moves it from suspense:refunds-due to the bank. Real PostgreSQL, the API as treasury uses
it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

import ledger
from paysvc.db import connect
from providers.sandbox import write_settlement_csv
from tests.test_expired_part_paid import expire, part_paid
from tests.test_settlement import line, resolve, upload
from tests.test_settlement_resolve import balances, open_exceptions, overpaid, recheck

REFUNDS = "/v1/reconciliation/refunds"
ACCTS = ("suspense:refunds-due:KHR", "treasury:bank:nbc-treasury:KHR")


async def payout(api, treasury, exception_id: str, amount: int, reference: str, currency: str = "KHR", **kw):
    return await api.client.post(REFUNDS, headers=treasury, json={
        "exception_id": exception_id, "currency": currency, "amount": amount, "reference": reference,
        "note": "sent back by bank transfer", **kw})


async def owed(api, treasury) -> list[dict]:
    r = await api.client.get(f"{REFUNDS}/owed", headers=treasury)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def reconciled(dsn: str) -> list[asyncpg.Record]:
    from paysvc.queries import Q
    async with connect(dsn) as conn:
        return [*await conn.fetch(Q.entries_without_their_record), *await conn.fetch(Q.payments_booked_otherwise)]


async def test_a_refund_is_paid_once_settled_in_parts_never_more_than_owed(api, portal, treasury,
                                                                                    invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    [case] = await owed(api, treasury)
    assert (case["case_id"], case["payment_id"], case["exception_ids"], case["currency"], case["due"], case["paid"],
            case["outstanding"], case["payable"]) == (
        over["payment_id"], over["payment_id"], [over["id"]], "KHR", 3000, 0, 3000, False)

    # Not settled yet: its provider could still give the 36,000 back to the payer itself
    r = await payout(api, treasury, over["id"], 3000, "BANK-REF-1")
    body = await r.json()
    assert r.status == 422 and "is not settled yet" in body["detail"], body
    assert body["errors"][0]["field"] == "exception_id"

    r = await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))
    assert r.status == 201, await r.text()
    assert (await owed(api, treasury))[0]["payable"] is True

    r = await payout(api, treasury, over["id"], 3001, "BANK-REF-1")
    body = await r.json()
    assert r.status == 422 and "more than the 3000 KHR still owed" in body["detail"], body
    r = await payout(api, treasury, over["id"], 1000, "BANK-REF-1")
    assert r.status == 201, await r.text()
    first = await r.json()
    assert (first["exception_id"], first["payment_id"], first["currency"], first["amount"], first["reference"],
            first["bank_account"]) == (over["id"], over["payment_id"], "KHR", 1000, "BANK-REF-1", "nbc-treasury")
    assert first["recorded_by"].startswith("Treasury desk") and first["id"].startswith("rfp_")
    async with connect(api.dsn) as conn:
        entry = await ledger.get_entry(conn, first["entry_id"])
    assert entry.kind == "refund_paid" and entry.payment_id == over["payment_id"]
    assert {(p.account, p.side, p.amount) for p in entry.postings} == {
        ("suspense:refunds-due:KHR", "debit", 1000), ("treasury:bank:nbc-treasury:KHR", "credit", 1000)}
    assert await balances(api.dsn, *ACCTS) == {"suspense:refunds-due:KHR": 2000,
                                               "treasury:bank:nbc-treasury:KHR": 35000}

    # The same transfer sent again is the same payout; the same reference for another amount is refused
    again = await payout(api, treasury, over["id"], 1000, "BANK-REF-1")
    assert again.status == 200 and await again.json() == first
    r = await payout(api, treasury, over["id"], 2000, "BANK-REF-1")
    assert r.status == 409 and first["id"] in (await r.json())["detail"]
    [case] = await owed(api, treasury)
    assert (case["due"], case["paid"], case["outstanding"]) == (3000, 1000, 2000)

    assert (await payout(api, treasury, over["id"], 2000, "BANK-REF-2")).status == 201
    assert await owed(api, treasury) == []
    r = await payout(api, treasury, over["id"], 1, "BANK-REF-3")
    assert r.status == 422 and "nothing is owed back" in (await r.json())["detail"]
    assert await balances(api.dsn, *ACCTS) == {"suspense:refunds-due:KHR": 0,
                                               "treasury:bank:nbc-treasury:KHR": 33000}
    listed = await (await api.client.get(REFUNDS, headers=treasury, params={"case": over["payment_id"]})).json()
    assert [(p["reference"], p["amount"]) for p in listed["data"]] == [("BANK-REF-2", 2000), ("BANK-REF-1", 1000)]
    assert await reconciled(api.dsn) == []


async def test_what_the_provider_gave_back_is_not_owed_and_what_settled_after_all_is(api, portal, treasury,
                                                                                   invoice_body):
    """The overpaid part is owed back; then the payment is missing from settlement and refunded by its provider
    (which takes that part back): nothing is owed. Settled after all and taken in: owed again."""
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await resolve(api, treasury, missing["id"], "refund_due")).status == 200
    assert await owed(api, treasury) == []
    r = await payout(api, treasury, over["id"], 3000, "BANK-REF-1")
    assert r.status == 422 and "nothing is owed back for payment" in (await r.json())["detail"]

    r = await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))
    assert r.status == 201, await r.text()
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    [case] = await owed(api, treasury)
    assert (case["case_id"], case["outstanding"], case["payable"]) == (over["payment_id"], 3000, True)
    assert set(case["exception_ids"]) == {over["id"], missing["id"], late["id"]}
    # Named by any of the payment's exceptions, it is the same case
    assert (await payout(api, treasury, late["id"], 3000, "BANK-REF-1")).status == 201
    assert await owed(api, treasury) == []
    assert await balances(api.dsn, "suspense:refunds-due:KHR") == {"suspense:refunds-due:KHR": 0}
    assert await reconciled(api.dsn) == []


async def test_an_expired_invoices_refunded_part_is_its_exceptions_case(api, portal, treasury, invoice_body):
    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-1")
    await expire(api, inv)
    [exc] = await open_exceptions(api, treasury, reason="expired_part_paid")
    r = await payout(api, treasury, exc["id"], 400, "BANK-REF-1")
    assert r.status == 422 and "still open" in (await r.json())["detail"]
    assert (await upload(api, treasury, write_settlement_csv([line("PP-1", 400, at=now)]), day=now.date())).status == 201
    assert (await resolve(api, treasury, exc["id"], "refund_due")).status == 200
    [case] = await owed(api, treasury)
    assert (case["case_id"], case["payment_id"], case["outstanding"], case["payable"]) == (
        exc["id"], None, 400, True)
    r = await payout(api, treasury, exc["id"], 4, "BANK-REF-1", currency="USD")
    body = await r.json()
    assert r.status == 422 and "it is owed 400 KHR" in body["detail"] and body["errors"][0]["field"] == "currency"
    r = await payout(api, treasury, exc["id"], 400, "BANK-REF-1")
    assert r.status == 201, await r.text()
    assert (await r.json())["payment_id"] is None
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


async def test_two_payouts_at_once_pay_no_more_than_is_owed(api, portal, treasury, invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    answers = await asyncio.gather(*(payout(api, treasury, over["id"], 3000, f"BANK-REF-{i}") for i in range(6)))
    assert sorted(r.status for r in answers) == [201] + [422] * 5
    assert await balances(api.dsn, "suspense:refunds-due:KHR") == {"suspense:refunds-due:KHR": 0}


async def test_bad_payouts_say_what_to_fix(api, portal, treasury, invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    r = await payout(api, treasury, "exc_nope", 1, "R")
    assert r.status == 404
    for change, field in [({"amount": 0}, "amount"), ({"amount": "10"}, "amount"), ({"amount": 10**15 + 1}, "amount"),
                          ({"currency": "EUR"}, "currency"), ({"reference": "  "}, "reference"),
                          ({"reference": "a\nb"}, "reference"), ({"reference": "a\u0085b"}, "reference"),
                          ({"note": "a\u009bb"}, "note"), ({"exception_id": "exc\u0007"}, "exception_id"),
                          ({"note": ""}, "note"),
                          ({"extra": 1}, "extra")]:
        body = {"exception_id": over["id"], "currency": "KHR", "amount": 10, "reference": "R", "note": "n", **change}
        r = await api.client.post(REFUNDS, headers=treasury, json=body)
        assert r.status == 422, (change, await r.text())
        assert (await r.json())["errors"][0]["field"] == field, change
    r = await api.client.post(REFUNDS, headers=treasury, json={"exception_id": over["id"], "currency": "KHR",
                                                               "amount": 10, "reference": "R", "note": "a\x00"})
    assert r.status == 400 and "NUL" in (await r.json())["detail"]     # refused as any JSON body holding one
    r = await api.client.post(REFUNDS, headers=treasury, data=b"{")
    assert r.status in (400, 415)
    assert (await api.client.get(f"{REFUNDS}/owed", headers=treasury, params={"cursor": "x"})).status == 400
    assert (await api.client.get(REFUNDS, headers=portal)).status == 403


async def test_a_refund_entry_without_its_payout_and_a_payout_off_its_entry_are_found(api, portal, treasury,
                                                                                     invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    paid = await (await payout(api, treasury, over["id"], 1000, "BANK-REF-1")).json()
    assert await reconciled(api.dsn) == []
    conn = await asyncpg.connect(api.dsn)
    try:
        forged = await ledger.post_entry(conn, ledger.EntryDraft(
            kind="refund_paid", description="a refund nobody recorded", effective_at=datetime.now(UTC),
            idempotency_key="refund-payout:rfp_forged", postings=[
                ledger.Posting(account="suspense:refunds-due:KHR", side="debit", amount=500, currency="KHR"),
                ledger.Posting(account="treasury:bank:nbc-treasury:KHR", side="credit", amount=500, currency="KHR")]))
        # a payout whose record says more than its entry moved (as a superuser, behind the service's back)
        await conn.execute("ALTER TABLE refund_payouts DISABLE TRIGGER refund_payouts_kept_as_written")
        await conn.execute("UPDATE refund_payouts SET amount = 2000 WHERE id = $1", paid["id"])
    finally:
        await conn.close()
    found = {(r["entry_id"], r["problem"]) for r in await reconciled(api.dsn)}
    assert found == {
        (forged.id, "the refund entry is named by no refund payout whose id its idempotency key carries"),
        (paid["entry_id"], "the payout's entry does not move 2000 KHR from suspense:refunds-due to "
                           "treasury:bank:nbc-treasury")}


async def test_payouts_are_kept_as_written(api, portal, treasury, invoice_body):
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    assert (await payout(api, treasury, over["id"], 1000, "BANK-REF-1")).status == 201
    conn = await asyncpg.connect(api.dsn)
    try:
        for sql in ("DELETE FROM refund_payouts", "UPDATE refund_payouts SET amount = 1", "TRUNCATE refund_payouts"):
            with pytest.raises(asyncpg.RestrictViolationError):       # whoever asks
                await conn.execute(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):   # the service may not even ask
                async with conn.transaction():
                    await conn.execute("SET LOCAL ROLE paysvc_app")
                    await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM refund_payouts") == 1
    finally:
        await conn.close()


def refunds_cli(dsn: str, *args: str):
    import subprocess
    import sys

    from tests.service_process import free_port, service_env

    return subprocess.run([sys.executable, "-m", "paysvc", "refunds", *args], env=service_env(dsn, free_port()),
                          capture_output=True, text=True, timeout=60)


async def test_treasury_sees_and_pays_refunds_from_the_command_line(api, portal, treasury, invoice_body):
    import getpass
    import json

    none = await asyncio.to_thread(refunds_cli, api.dsn, "owed")
    assert none.returncode == 0 and none.stdout == "" and "no refunds are owed" in none.stderr, none.stderr
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    out = await asyncio.to_thread(refunds_cli, api.dsn, "owed")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["case_id", "since", "outstanding", "paid", "payable", "exception_ids"]
    assert over["payment_id"] in row and "3,000 ៛" in row and "not yet (not settled)" in row and over["id"] in row

    early = await asyncio.to_thread(refunds_cli, api.dsn, "pay", over["id"], "--currency", "KHR", "--amount",
                                    "3000", "--reference", "BANK-REF-1", "--note", "sent")
    assert early.returncode in (1, 2) and "is not settled yet" in early.stderr and "Traceback" not in \
        early.stderr, early.stderr
    for amount in ("1.5", "٣", "9" * 5000):
        bad = await asyncio.to_thread(refunds_cli, api.dsn, "pay", over["id"], "--currency", "KHR", "--amount",
                                      amount, "--reference", "R", "--note", "sent")
        assert bad.returncode == 2 and "is not a whole number" in bad.stderr, bad.stderr
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    args = ("pay", over["id"], "--currency", "KHR", "--amount", "3000", "--reference", "BANK-REF-1", "--note", "sent")
    done = await asyncio.to_thread(refunds_cli, api.dsn, *args)
    assert done.returncode == 0, done.stderr
    paid = json.loads(done.stdout)
    assert (paid["amount"], paid["recorded_by"]) == (3000, f"cli:{getpass.getuser()}")
    again = await asyncio.to_thread(refunds_cli, api.dsn, *args)
    assert again.returncode == 0 and json.loads(again.stdout)["id"] == paid["id"]
    assert "recorded before" in again.stderr
    assert await owed(api, treasury) == []


async def test_treasury_staff_record_a_payout_on_the_refunds_page(api, portal, treasury, invoice_body):
    from tests.test_treasury_pages import login, origin

    key = treasury["Authorization"].removeprefix("Bearer ")
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await login(api, key)).status == 303
    grid = await (await api.client.get("/treasury")).text()
    assert 'href="/treasury/refunds"' in grid
    assert 'id="no-refunds"' in await (await api.client.get("/treasury/refunds")).text()
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    page = await (await api.client.get("/treasury/refunds")).text()
    row = page.split(f'id="refund-{over["payment_id"]}-KHR"')[1].split("</tr>")[0]
    assert "3,000 ៛" in row and "not settled yet" in row and "<form" not in row

    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    page = await (await api.client.get("/treasury/refunds")).text()
    row = page.split(f'id="refund-{over["payment_id"]}-KHR"')[1].split("</tr>")[0]
    assert 'action="/treasury/refunds"' in row and 'value="3000"' in row
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    form = {"csrf": csrf, "exception_id": over["id"], "currency": "KHR", "amount": "3,001", "reference": "BANK-REF-1",
            "note": "sent by transfer"}
    r = await api.client.post("/treasury/refunds", data=form, headers={"Origin": origin(api)}, allow_redirects=False)
    assert r.status == 422 and "more than the 3000 KHR still owed" in await r.text()
    r = await api.client.post("/treasury/refunds", data={**form, "amount": "3e3"}, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 422 and "amount:" in await r.text()
    r = await api.client.post("/treasury/refunds", data={**form, "amount": "3000"}, allow_redirects=False)
    assert r.status == 403                                      # no Origin: not from our page
    r = await api.client.post("/treasury/refunds", data={**form, "amount": "3,000"}, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/treasury/refunds?msg=Payout%20rfp_")
    page = await (await api.client.get(r.headers["Location"])).text()
    assert 'id="no-refunds"' in page and "BANK-REF-1" in page and 'id="flash"' in page
    assert await owed(api, treasury) == []


async def test_a_refund_is_payable_once_the_payments_missing_in_settlement_is_resolved(api, portal, treasury,
                                                                                      invoice_body):
    """Found by review: the overpaid part stayed owed and refused for good when the payment was never settled and
    was written off, though nothing could take it back any more (only the refund of a missing payment takes from
    refunds-due, and its missing_in_settlement was resolved)."""
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await owed(api, treasury))[0]["payable"] is False      # open: it may still be refunded by the provider
    assert (await payout(api, treasury, over["id"], 3000, "BANK-REF-1")).status == 422
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200
    [case] = await owed(api, treasury)
    assert (case["outstanding"], case["payable"]) == (3000, True)
    r = await payout(api, treasury, missing["id"], 3000, "BANK-REF-1")
    assert r.status == 201, await r.text()
    assert await owed(api, treasury) == [] and await reconciled(api.dsn) == []


async def test_a_late_line_after_a_write_off_makes_good_the_loss_and_owes_back_only_the_excess(api, portal,
                                                                                             treasury, invoice_body):
    """Found by review: refund_due of a line settled after the payment was written off owed all of it back on top
    of what was already owed, and a payer who sent 36,000 for a paid 33,000 invoice was paid back 39,000."""
    from datetime import timedelta

    from tests.test_settlement import DAY

    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")     # 36,000 for 33,000
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200  # 3,000 owed back
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200
    r = await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36500)]), day=DAY + timedelta(days=5))
    assert r.status == 201, await r.text()
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    r = await resolve(api, treasury, late["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert _postings(await r.json()) == {
        ("treasury:bank:nbc-treasury:KHR", "debit", 36500), ("expense:write-offs:sandbox:KHR", "credit", 36000),
        ("suspense:refunds-due:KHR", "credit", 500)}
    [case] = await owed(api, treasury)
    assert (case["outstanding"], case["payable"]) == (3500, True)
    r = await payout(api, treasury, late["id"], 3501, "BANK-REF-1")
    assert r.status == 422 and "more than the 3500 KHR" in (await r.json())["detail"]
    assert (await payout(api, treasury, late["id"], 3500, "BANK-REF-1")).status == 201
    assert await balances(api.dsn, "expense:write-offs:sandbox:KHR", "suspense:refunds-due:KHR",
                          "agency:MOI:revenue:KHR") == {"expense:write-offs:sandbox:KHR": 0,
                                                        "suspense:refunds-due:KHR": 0, "agency:MOI:revenue:KHR": 33000}
    assert await reconciled(api.dsn) == []


async def test_a_multi_line_note_is_kept_and_a_huge_amount_on_the_page_is_refused(api, portal, treasury,
                                                                                 invoice_body):
    from tests.test_treasury_pages import login, origin

    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    assert (await login(api, treasury["Authorization"].removeprefix("Bearer "))).status == 303
    page = await (await api.client.get("/treasury/refunds")).text()
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    form = {"csrf": csrf, "exception_id": over["id"], "currency": "KHR", "amount": "9" * 5000, "reference": "R",
            "note": "sent by transfer\r\nconfirmed by phone"}
    for amount in ("9" * 5000, "0" * 4400 + "3000"):   # found by review: a 500 each (int() of over 4,300 digits)
        r = await api.client.post("/treasury/refunds", data={**form, "amount": amount},
                                  headers={"Origin": origin(api)}, allow_redirects=False)
        assert r.status in (303, 422) and "Internal" not in await r.text(), amount
        if amount.startswith("9"):
            assert r.status == 422 and "amount:" in await r.text()
        else:
            assert r.status == 303
            break
    [p] = (await (await api.client.get(REFUNDS, headers=treasury)).json())["data"]
    assert p["note"] == "sent by transfer\r\nconfirmed by phone"


async def test_reconcile_finds_a_payout_moved_to_another_case_and_a_case_paid_more_than_owed(api, portal, treasury,
                                                                                           invoice_body):
    """Found by review: a payout whose payment was cleared behind the service's back passed reconcile, and its
    case could then be paid again."""
    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201
    first = await (await payout(api, treasury, over["id"], 3000, "BANK-REF-1")).json()
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute("ALTER TABLE refund_payouts DISABLE TRIGGER refund_payouts_kept_as_written")
        await conn.execute("UPDATE refund_payouts SET payment_id = NULL WHERE id = $1", first["id"])
        found = {(r["record"], r["problem"]) for r in await reconciled(api.dsn)}
        assert (f"refund payout {first['id']}", f"the payout names payment none, its exception {over['id']} payment "
                f"{over['payment_id']}") in found, found
        await conn.execute("UPDATE refund_payouts SET payment_id = $2 WHERE id = $1", first["id"],
                           over["payment_id"])
        assert await reconciled(api.dsn) == []
        # a second payout of the same case, written around the service (its entry through the ledger)
        entry = await ledger.post_entry(conn, ledger.EntryDraft(
            kind="refund_paid", description="paid again", effective_at=datetime.now(UTC),
            idempotency_key="refund-payout:rfp_again", payment_id=over["payment_id"], postings=[
                ledger.Posting(account="suspense:refunds-due:KHR", side="debit", amount=3000, currency="KHR"),
                ledger.Posting(account="treasury:bank:nbc-treasury:KHR", side="credit", amount=3000, currency="KHR")]))
        await conn.execute("INSERT INTO refund_payouts (id, exception_id, payment_id, currency, amount, reference, "
                           "bank_account, note, recorded_by, recorded_at, entry_id) VALUES ('rfp_again', $1, $2, "
                           "'KHR', 3000, 'BANK-REF-2', 'nbc-treasury', 'n', 'x', now(), $3)",
                           over["id"], over["payment_id"], entry.id)
    finally:
        await conn.close()
    found = {(r["record"], r["problem"]) for r in await reconciled(api.dsn)}
    assert found == {(f"refund case {over['payment_id']}", "paid out 6000 KHR, more than the 3000 owed back")}


async def _written_off(api, portal, treasury, invoice_body, txid="TX-OVER"):
    """36,000 paid for a 33,000 invoice, the 3,000 refund_due, never settled and written off."""
    inv, over = await overpaid(api, portal, treasury, invoice_body, txid)
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200
    return inv, over, missing


async def test_a_late_line_in_another_currency_after_a_write_off_is_kept_in_its_currency(api, portal, treasury,
                                                                                       invoice_body):
    """Found by review: the make-good credited the KHR write-off from USD money, an unbalanced entry (a 500), and
    match_to_invoice was a 500 too."""
    from datetime import timedelta

    from providers import SettlementLine
    from tests.test_settlement import AT, DAY

    inv, over, missing = await _written_off(api, portal, treasury, invoice_body)
    data = write_settlement_csv([SettlementLine(line_no=1, transaction_id="TX-OVER", amount=900, currency="USD",
                                                paid_at=AT, fee=10)])
    assert (await upload(api, treasury, data, day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    r = await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 422 and "different currencies" in (await r.json())["detail"]
    r = await resolve(api, treasury, late["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert _postings(await r.json()) == {
        ("treasury:bank:nbc-treasury:USD", "debit", 890), ("expense:provider-fees:sandbox:USD", "debit", 10),
        ("equity:written-off:USD", "credit", 900)}
    [case] = await owed(api, treasury)                  # only the overpaid 3,000 is owed back
    assert (case["currency"], case["outstanding"]) == ("KHR", 3000)
    assert await reconciled(api.dsn) == []


async def test_a_duplicate_line_of_a_written_off_payment_makes_good_the_loss_first(api, portal, treasury,
                                                                                  invoice_body):
    """Found by review: after the late line was taken as a listing error, the money arriving as a duplicate line
    was owed back in full, the invoice staying paid and the write-off's loss staying booked."""
    from datetime import timedelta

    from tests.test_settlement import AT, DAY, paid

    await paid(api, portal, invoice_body, "TX-1")                  # 50,000, never settled on its day
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "write_off")).status == 200     # "a listing error"
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50700, fee=100, at=AT + timedelta(days=6))]),
                     day=DAY + timedelta(days=6))
    assert r.status == 201, await r.text()
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert _postings(await r.json()) == {
        ("treasury:bank:nbc-treasury:KHR", "debit", 50600), ("expense:provider-fees:sandbox:KHR", "debit", 100),
        ("expense:write-offs:sandbox:KHR", "credit", 50000), ("suspense:refunds-due:KHR", "credit", 700)}
    [case] = await owed(api, treasury)
    assert (case["outstanding"], case["payable"]) == (700, True)
    assert await balances(api.dsn, "expense:write-offs:sandbox:KHR") == {"expense:write-offs:sandbox:KHR": 0}
    assert await reconciled(api.dsn) == []


async def test_a_payout_racing_the_providers_refund_of_the_payment_is_refused(api, portal, treasury, invoice_body,
                                                                             monkeypatch):
    """Found by review: what was owed was read before whether the case was payable; the provider's refund (which
    takes the overpaid part back) committing between the two let the payout through, paying the payer twice."""
    import paysvc.refunds as refunds
    from paysvc.settlement_resolve import resolve as resolve_exception

    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    owed_ = refunds.owed

    async def refund_commits_meanwhile(conn, exc):      # another desk's resolution, right after this read
        left = await owed_(conn, exc)
        async with connect(api.dsn) as other:
            async with other.transaction():
                await resolve_exception(other, missing["id"], action="refund_due", note="the provider returned it",
                                        invoice_id=None, by="desk B", now=datetime.now(UTC),
                                        bank_account="nbc-treasury")
        return left

    monkeypatch.setattr(refunds, "owed", refund_commits_meanwhile)
    async with connect(api.dsn) as conn:
        with pytest.raises(refunds.RefundRefused, match="is not settled yet"):
            async with conn.transaction():
                await refunds.record_payout(conn, exception_id=over["id"], currency="KHR", amount=3000,
                                            reference="BANK-REF-1", note="desk A", by="desk A",
                                            now=datetime.now(UTC), bank_account="nbc-treasury")
    assert await balances(api.dsn, "suspense:refunds-due:KHR") == {"suspense:refunds-due:KHR": 3000}


LOSS = "expense:write-offs:sandbox:KHR"
BANK = "treasury:bank:nbc-treasury:KHR"
DUE = "suspense:refunds-due:KHR"


def _postings(body: dict) -> set[tuple[str, str, int]]:
    return {(p["account"], p["side"], p["amount"]) for p in body["postings"]}


async def _never_settled_written_off(api, portal, treasury, invoice_body, txid="TX-1") -> dict:
    """A 50,000 payment, never settled on its day: its missing_in_settlement written off (Dr loss 50,000)."""
    from tests.test_settlement import paid

    inv = await paid(api, portal, invoice_body, txid)
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    assert (await resolve(api, treasury, missing["id"], "write_off")).status == 200
    return inv


@pytest.mark.parametrize("late_action", ["refund_due", "match_to_invoice"])
async def test_a_written_off_loss_is_made_good_once_whichever_line_is_resolved_first(api, portal, treasury,
                                                                                    invoice_body, late_action):
    """Found by review: the duplicate made good the loss, then the late line credited back the whole write-off
    again; 50,000 that arrived twice for one payment vanished into a negative expense."""
    from datetime import timedelta

    from tests.test_settlement import DAY

    inv = await _never_settled_written_off(api, portal, treasury, invoice_body)
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000), line("TX-1", 50000)]),
                     day=DAY + timedelta(days=5))
    assert r.status == 201, await r.text()
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "refund_due")
    assert r.status == 200 and _postings(await r.json()) == {(BANK, "debit", 50000), (LOSS, "credit", 50000)}
    r = await resolve(api, treasury, late["id"], late_action,
                      **({"invoice_id": inv["id"]} if late_action == "match_to_invoice" else {}))
    assert r.status == 200, await r.text()
    assert _postings(await r.json()) == {(BANK, "debit", 50000), (DUE, "credit", 50000)}
    assert await balances(api.dsn, LOSS, BANK, DUE) == {LOSS: 0, BANK: 100000, DUE: 50000}
    assert await reconciled(api.dsn) == []


async def test_two_duplicates_resolved_at_once_make_good_the_loss_once(api, portal, treasury, invoice_body):
    """Found by review: nothing serialised two resolutions of one payment's lines; both read the loss as
    unrecovered and both made it good. They now take the payment's lock, as its payouts do."""
    from datetime import timedelta

    from paysvc.settlement_resolve import resolve as resolve_exception
    from tests.test_settlement import AT, DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "write_off")).status == 200     # "a listing error"
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, at=AT + timedelta(days=6)),
                                                          line("TX-1", 50000, at=AT + timedelta(days=6))]),
                     day=DAY + timedelta(days=6))
    assert r.status == 201, await r.text()
    d1, d2 = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    kw = dict(action="refund_due", note="owed back", invoice_id=None, now=datetime.now(UTC),
              bank_account="nbc-treasury")
    async with connect(api.dsn) as a, connect(api.dsn) as b:
        ta = a.transaction()
        await ta.start()
        await resolve_exception(a, d1["id"], by="desk A", **kw)           # posted, not committed yet

        async def desk_b():
            async with b.transaction():
                return await resolve_exception(b, d2["id"], by="desk B", **kw)

        tb = asyncio.ensure_future(desk_b())
        await asyncio.sleep(0.5)
        assert not tb.done()                                             # waits for desk A
        await ta.commit()
        await tb
    assert await balances(api.dsn, LOSS, BANK, DUE) == {LOSS: 0, BANK: 100000, DUE: 50000}


async def test_a_duplicate_after_a_short_settlement_is_a_plain_duplicate(api, portal, treasury, invoice_body):
    """Found by review: a loss written off for a short settlement (amount_mismatch) was taken from the next
    duplicate line too; only a write-off of a payment never settled is made good by later lines."""
    from datetime import timedelta

    from tests.test_settlement import AT, DAY, paid

    await paid(api, portal, invoice_body, "TX-1")
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 49000)]))).status == 201
    [mm] = await open_exceptions(api, treasury, reason="amount_mismatch")
    assert (await resolve(api, treasury, mm["id"], "write_off")).status == 200        # Dr loss 1,000
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 49000, at=AT + timedelta(days=1))]),
                         day=DAY + timedelta(days=1))).status == 201
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "refund_due")
    assert _postings(await r.json()) == {(BANK, "debit", 49000), (DUE, "credit", 49000)}


async def test_a_match_that_would_give_an_invoice_nothing_is_refused(api, portal, treasury, invoice_body):
    """Found by review: a duplicate all of which made good the write-off was 'matched' to any invoice named (one
    in another currency too), which then got nothing but was recorded as matched."""
    from datetime import timedelta

    from tests.test_settlement import AT, DAY

    inv = await _never_settled_written_off(api, portal, treasury, invoice_body)
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "write_off")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, at=AT + timedelta(days=6))]),
                         day=DAY + timedelta(days=6))).status == 201
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 422 and "written off as never settled" in (await r.json())["detail"]
    r = await resolve(api, treasury, dup["id"], "refund_due")
    assert r.status == 200 and _postings(await r.json()) == {(BANK, "debit", 50000), (LOSS, "credit", 50000)}


@pytest.mark.parametrize("first", ["duplicate", "late"])
async def test_a_written_off_loss_is_made_good_whichever_line_is_resolved_first(api, portal, treasury,
                                                                               invoice_body, first):
    """Found by review: with a short late line resolved first, the duplicate made good nothing and its money was
    owed back while 20,000 of the loss stayed booked; resolved the other way round, the loss was made good."""
    from datetime import timedelta

    from tests.test_settlement import DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 30000), line("TX-1", 20000)]),
                     day=DAY + timedelta(days=5))
    assert r.status == 201, await r.text()
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    for exc in ((dup, late) if first == "duplicate" else (late, dup)):
        r = await resolve(api, treasury, exc["id"], "refund_due")
        assert r.status == 200, await r.text()
    assert await balances(api.dsn, LOSS, BANK, DUE) == {LOSS: 0, BANK: 50000, DUE: 0}
    assert await owed(api, treasury) == []


def _usd(amount: int = 1250, days: int = 0, fee: int = 0):
    from datetime import timedelta

    from providers import SettlementLine
    from tests.test_settlement import AT

    return SettlementLine(line_no=1, transaction_id="TX-1", amount=amount, currency="USD", fee=fee,
                          paid_at=AT + timedelta(days=days))


KEPT_USD, DUE_USD = "equity:written-off:USD", "suspense:refunds-due:USD"


async def _resolve_all(api, treasury, *pairs) -> None:
    for exc, action in pairs:
        r = await resolve(api, treasury, exc["id"], action)
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("first", ["late", "duplicate"])
async def test_a_usd_late_line_and_a_khr_duplicate_end_the_same_in_either_order(api, portal, treasury, invoice_body,
                                                                              first):
    """A 50,000 KHR payment written off as never settled, then its late line in USD and a KHR duplicate, both
    refund_due. The KHR makes good the loss, the USD is kept in its currency, whichever is resolved first. (Two
    rules in turn were found order-dependent by review: a duplicate waiting for the late line, then the KHR owed
    back once a USD line was kept.)"""
    from datetime import timedelta

    from tests.test_settlement import AT, DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    assert (await upload(api, treasury, write_settlement_csv([_usd(fee=10)]), day=DAY + timedelta(days=5))).status == 201
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, at=AT + timedelta(days=6))]),
                         day=DAY + timedelta(days=6))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    pairs = [(late, "refund_due"), (dup, "refund_due")]
    await _resolve_all(api, treasury, *(pairs if first == "late" else pairs[::-1]))
    assert await balances(api.dsn, LOSS, DUE, KEPT_USD, DUE_USD, "expense:provider-fees:sandbox:USD") == {
        LOSS: 0, DUE: 0, KEPT_USD: 1250, DUE_USD: 0, "expense:provider-fees:sandbox:USD": 10}
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


@pytest.mark.parametrize("listing_error", ["late", "duplicate"])
async def test_one_usd_settlement_and_one_listing_error_end_the_same_whichever_is_the_error(
        api, portal, treasury, invoice_body, listing_error):
    """Found by review: two USD lines for a KHR payment written off as never settled, one of them a listing error.
    With the late line the error, the duplicate's refund_due owed the USD back to the payer, the loss staying
    booked; with the duplicate the error, the late line kept it."""
    from datetime import timedelta

    from tests.test_settlement import DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    assert (await upload(api, treasury, write_settlement_csv([_usd(), _usd()]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    await _resolve_all(api, treasury, (late, "write_off" if listing_error == "late" else "refund_due"),
                       (dup, "refund_due" if listing_error == "late" else "write_off"))
    assert await balances(api.dsn, LOSS, KEPT_USD, DUE_USD) == {LOSS: 50000, KEPT_USD: 1250, DUE_USD: 0}
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


@pytest.mark.parametrize("first", ["KHR", "USD-100", "USD-1250"])
async def test_lines_in_two_currencies_after_a_khr_listing_error_end_the_same_in_any_order(api, portal, treasury,
                                                                                         invoice_body, first):
    """Found by review: after the KHR late line was written off as a listing error, duplicates of 30,000 KHR and
    of 100 and 1,250 USD ended differently by the order a desk resolved them in (30,000 KHR owed back or not; 100
    or 1,250 USD kept). The KHR makes good what it can of the loss and every USD line is kept, in any order; a USD
    line cannot be matched to an invoice."""
    from datetime import timedelta

    from tests.payments_helpers import new_invoice
    from tests.test_settlement import AT, DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "write_off")).status == 200          # a listing error
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 30000, at=AT + timedelta(days=6)),
                                                              _usd(100, days=6), _usd(1250, days=6)]),
                         day=DAY + timedelta(days=6))).status == 201
    dups = {f"{d['currency']}-{d['amount']}" if d["currency"] == "USD" else "KHR": d
            for d in await open_exceptions(api, treasury, reason="duplicate_in_settlement")}
    usd_invoice = await new_invoice(api, portal, invoice_body, currency="USD", amount=5000)
    r = await resolve(api, treasury, dups["USD-1250"]["id"], "match_to_invoice", invoice_id=usd_invoice["id"])
    assert r.status == 422 and "refund_due" in (await r.json())["detail"]
    order = [first, *sorted(set(dups) - {first})]
    await _resolve_all(api, treasury, *((dups[k], "refund_due") for k in order))
    assert await balances(api.dsn, LOSS, DUE, KEPT_USD, DUE_USD) == {LOSS: 20000, DUE: 0, KEPT_USD: 1350, DUE_USD: 0}
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


@pytest.mark.parametrize("first", ["late", "duplicate"])
async def test_a_duplicate_of_a_written_off_payment_goes_to_no_invoice_and_ends_the_same_in_either_order(
        api, portal, treasury, invoice_body, first):
    """Found by review: a 60,000 duplicate of a 50,000 payment written off as never settled, matched to another
    invoice, gave it 60,000 when the late line had made good the loss first and 10,000 when not, the payer then
    owed 50,000. Such a duplicate is not matched; refund_due makes good the loss and owes back the rest in any
    order."""
    from datetime import timedelta

    from tests.payments_helpers import new_invoice
    from tests.test_settlement import AT, DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)
    other = await new_invoice(api, portal, invoice_body, amount=100000)
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000),
                                                              line("TX-1", 60000, at=AT + timedelta(hours=1))]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "match_to_invoice", invoice_id=other["id"])
    assert r.status == 422 and "refund_due" in (await r.json())["detail"]
    pairs = [(late, "refund_due"), (dup, "refund_due")]
    await _resolve_all(api, treasury, *(pairs if first == "late" else pairs[::-1]))
    assert await balances(api.dsn, LOSS, DUE) == {LOSS: 0, DUE: 60000}
    assert sum(c["outstanding"] for c in await owed(api, treasury)) == 60000
    assert await reconciled(api.dsn) == []


async def test_a_line_in_another_providers_statement_makes_good_the_payments_own_loss(api, portal, treasury,
                                                                                   invoice_body):
    """Found by review: a sandbox payment written off as never settled, whose money then came on Bakong's bank
    statement (matched by its KHQR's md5, raised as a duplicate under bakong): the loss was looked up in bakong's
    write-off account, found to be nothing, and all 50,000 owed back while the sandbox loss stayed booked."""
    from providers.camt053 import write_statement

    inv = await _never_settled_written_off(api, portal, treasury, invoice_body)
    r = await upload(api, treasury, write_statement([line("NBC-1", 50000, md5=inv["khqr"]["md5"])]),
                     provider="bakong", fmt="camt053", name="stmt.xml")
    assert r.status == 201, await r.text()
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    assert dup["provider"] == "bakong"
    r = await resolve(api, treasury, dup["id"], "refund_due")
    assert r.status == 200 and _postings(await r.json()) == {(BANK, "debit", 50000), (LOSS, "credit", 50000)}
    assert await balances(api.dsn, LOSS, DUE, "expense:write-offs:bakong:KHR") == {
        LOSS: 0, DUE: 0, "expense:write-offs:bakong:KHR": 0}
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


async def _payout_while_resolving(api, exception_id: str, amount: int, reference: str):
    """Desk A resolves ``exception_id`` refund_due in a transaction it has not committed; desk B records a payout
    of ``amount`` naming it meanwhile, which must wait for desk A. Returns desk B's recorded payout."""
    import paysvc.refunds as refunds
    from paysvc.settlement_resolve import resolve as resolve_exception

    async with connect(api.dsn) as desk_a, connect(api.dsn) as desk_b:
        resolving = desk_a.transaction()
        await resolving.start()
        await resolve_exception(desk_a, exception_id, action="refund_due", note="owed back", invoice_id=None,
                                by="desk A", now=datetime.now(UTC), bank_account="nbc-treasury")

        async def pay_out():
            async with desk_b.transaction():
                return await refunds.record_payout(desk_b, exception_id=exception_id, currency="KHR", amount=amount,
                                                   reference=reference, note="desk B", by="desk B",
                                                   now=datetime.now(UTC), bank_account="nbc-treasury")
        payout = asyncio.create_task(pay_out())
        await asyncio.sleep(0.5)
        assert not payout.done()                                  # waits for desk A
        await resolving.commit()
        return await asyncio.wait_for(payout, 10)


async def test_a_payout_waiting_for_the_resolution_that_makes_it_owed_is_recorded(api, portal, treasury,
                                                                                invoice_body):
    """Found by review: a payout read its exception before taking the case's lock, so one that waited there for
    the resolution making the money owed was refused as "still open" once that resolution had committed."""
    from datetime import timedelta

    from tests.test_settlement import DAY

    await _never_settled_written_off(api, portal, treasury, invoice_body)          # 50,000 lost
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 60000)]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    recorded = await _payout_while_resolving(api, late["id"], 10000, "BANK-REF-W")
    assert (recorded.payout["amount"], recorded.replayed) == (10000, False)
    assert await balances(api.dsn, LOSS, DUE) == {LOSS: 0, DUE: 0}
    assert await reconciled(api.dsn) == []


async def _bakong_line_while_missing_is_open(api, portal, treasury, invoice_body):
    """A 50,000 sandbox payment its provider never settled (its missing_in_settlement raised, still open), whose
    money then appears on Bakong's bank statement, matched by md5: a duplicate_in_settlement under bakong."""
    from providers.camt053 import write_statement
    from tests.test_settlement import paid

    inv = await paid(api, portal, invoice_body, "TX-1")
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    r = await upload(api, treasury, write_statement([line("NBC-1", 50000, md5=inv["khqr"]["md5"])]),
                     provider="bakong", fmt="camt053", name="stmt.xml")
    assert r.status == 201, await r.text()
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    assert dup["provider"] == "bakong"
    return missing, dup


@pytest.mark.parametrize("first", ["write_off", "duplicate"])
async def test_another_providers_line_and_the_write_off_end_the_same_in_either_order(api, portal, treasury,
                                                                                   invoice_body, first):
    """Found by review: the Bakong line resolved refund_due before the payment's write-off found no loss and was
    owed back in full; the write-off then booked the loss. The write-off now makes good its loss from what the
    payment's duplicates left owed back (never paid out: the payment was not payable until then)."""
    from tests.payments_helpers import new_invoice

    missing, dup = await _bakong_line_while_missing_is_open(api, portal, treasury, invoice_body)
    other = await new_invoice(api, portal, invoice_body, amount=100000)
    r = await resolve(api, treasury, dup["id"], "match_to_invoice", invoice_id=other["id"])
    assert r.status == 422 and "missing_in_settlement" in (await r.json())["detail"]    # it may yet be lost
    pairs = [(missing, "write_off"), (dup, "refund_due")]
    await _resolve_all(api, treasury, *(pairs if first == "write_off" else pairs[::-1]))
    assert await balances(api.dsn, LOSS, DUE) == {LOSS: 0, DUE: 0}
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


async def test_a_duplicate_is_matched_once_the_written_off_loss_is_made_good(api, portal, treasury, invoice_body):
    """Found by review: one code paid twice (TX-1 captured, TX-2's notice lost), TX-1 written off as never
    settled; TX-2's line (paired by md5) made good all the loss, and TX-1's own line, a duplicate, could then not
    be matched to the invoice the payer meant. With nothing of the loss left, the match no longer depends on any
    order and is allowed."""
    from datetime import timedelta

    from tests.payments_helpers import new_invoice
    from tests.test_settlement import AT, DAY

    inv = await _never_settled_written_off(api, portal, treasury, invoice_body)
    other = await new_invoice(api, portal, invoice_body, amount=50000)
    assert (await upload(api, treasury, write_settlement_csv([line("TX-2", 50000, md5=inv["khqr"]["md5"])]),
                         day=DAY + timedelta(days=5))).status == 201
    [late] = await open_exceptions(api, treasury, reason="settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "refund_due")).status == 200
    assert await balances(api.dsn, LOSS) == {LOSS: 0}
    assert (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, at=AT + timedelta(days=6))]),
                         day=DAY + timedelta(days=6))).status == 201
    [dup] = await open_exceptions(api, treasury, reason="duplicate_in_settlement")
    r = await resolve(api, treasury, dup["id"], "match_to_invoice", invoice_id=other["id"])
    assert r.status == 200, await r.text()
    assert (await (await api.client.get(f"/v1/invoices/{other['id']}", headers=portal)).json())["status"] == "paid"
    assert await reconciled(api.dsn) == []


async def test_a_payout_waits_for_the_resolution_of_an_exception_about_no_payment(api, portal, treasury,
                                                                                invoice_body):
    """Found by review: an expired invoice's part (an exception about no payment) takes no case lock when
    resolved, so a payout naming it did not wait for the resolution under way and was refused as still open."""

    now = datetime.now(UTC)
    inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-1")
    await expire(api, inv)
    [exc] = await open_exceptions(api, treasury, reason="expired_part_paid")
    assert (await upload(api, treasury, write_settlement_csv([line("PP-1", 400, at=now)]),
                         day=now.date())).status == 201
    recorded = await _payout_while_resolving(api, exc["id"], 400, "BANK-REF-P")
    assert recorded.payout["amount"] == 400
    assert await owed(api, treasury) == []
    assert await reconciled(api.dsn) == []


async def test_an_expired_part_and_its_payments_refund_resolved_at_once_do_not_deadlock(api, portal, treasury,
                                                                                       invoice_body):
    """Found by review: the expired_part_paid resolution locked its row then the invoice, the refund of the
    payment whose money the invoice holds the invoice then that row; lined up, PostgreSQL aborted one (a 500)."""
    from paysvc.settlement_resolve import resolve as resolve_exception
    from tests.test_expired_part_paid import expire, part_paid
    from tests.test_settlement import AT

    inv = await part_paid(api, portal, treasury, invoice_body, txid="TX-P", at=AT)       # 400 of 1,000 applied
    await expire(api, inv)
    [part] = await open_exceptions(api, treasury, reason="expired_part_paid")
    assert await recheck(api.dsn, api.client.app) == 1
    [missing] = await open_exceptions(api, treasury, reason="missing_in_settlement")
    holder = await asyncpg.connect(api.dsn)       # holds the invoice a moment, so that both line up behind it
    held = holder.transaction()
    await held.start()
    await holder.execute("SELECT 1 FROM invoices WHERE id = $1 FOR UPDATE", inv["id"])

    async def resolving(exc):
        async with connect(api.dsn) as c:
            async with c.transaction():
                return await resolve_exception(c, exc["id"], action="refund_due", note="n", by="desk",
                                               now=datetime.now(UTC), bank_account="nbc-treasury", invoice_id=None)

    refund = asyncio.ensure_future(resolving(missing))
    await asyncio.sleep(0.5)
    expired = asyncio.ensure_future(resolving(part))
    await asyncio.sleep(0.5)
    await held.commit()
    await holder.close()
    got = await asyncio.wait_for(asyncio.gather(refund, expired, return_exceptions=True), 30)
    assert not any(isinstance(g, asyncpg.DeadlockDetectedError) for g in got), got
    assert isinstance(got[0], dict) and got[0]["resolution"] == "refund_due"


async def test_the_refund_lists_page_with_their_cursors(api, portal, treasury, invoice_body):
    from tests.test_expired_part_paid import expire, part_paid

    inv, over = await overpaid(api, portal, treasury, invoice_body, "TX-OVER")
    assert (await resolve(api, treasury, over["id"], "refund_due")).status == 200
    now = datetime.now(UTC)
    part_inv = await part_paid(api, portal, treasury, invoice_body, txid="PP-1")
    await expire(api, part_inv)
    [part] = await open_exceptions(api, treasury, reason="expired_part_paid")
    assert (await upload(api, treasury, write_settlement_csv([line("PP-1", 400, at=now)]), day=now.date())).status \
        == 201
    assert (await resolve(api, treasury, part["id"], "refund_due")).status == 200
    assert (await upload(api, treasury, write_settlement_csv([line("TX-OVER", 36000)]))).status == 201

    async def pages(path: str, **params) -> list[list[dict]]:
        out, cursor = [], None
        while True:
            r = await api.client.get(path, headers=treasury, params={"limit": "1", **params,
                                                                     **({"cursor": cursor} if cursor else {})})
            assert r.status == 200, await r.text()
            body = await r.json()
            out.append(body["data"])
            if not (cursor := body["next_cursor"]):
                return out

    owed_pages = await pages(f"{REFUNDS}/owed")
    assert [[c["case_id"] for c in p] for p in owed_pages] == [[over["payment_id"]], [part["id"]]]
    assert (await payout(api, treasury, over["id"], 3000, "BANK-REF-1")).status == 201
    assert (await payout(api, treasury, part["id"], 400, "BANK-REF-2")).status == 201
    paid_pages = await pages(REFUNDS)
    assert [[p["reference"] for p in page] for page in paid_pages] == [["BANK-REF-2"], ["BANK-REF-1"]]
    r = await api.client.get(REFUNDS, headers=treasury, params={"cursor": "eA"})
    assert r.status == 400
