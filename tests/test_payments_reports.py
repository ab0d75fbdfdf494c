"""One payment reported by several channels; one code paid more than once.

A bank's callback and the Bakong poll report the same payment under their own transaction ids: that is one
payment, and the second report is kept as a report of it. A code paid twice is two payments, whichever
channels report them and in whatever order. Found by review: a second payment on a code, reported by two
channels, was booked twice; and a second payment made through a channel that had reported the first was
taken for the first and never booked.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from datetime import UTC, datetime, timedelta

import pytest

from paysvc.capture import capture
from paysvc.db import connect
from providers import PaymentNotice
from providers.camt053 import write_statement
from tests.payments_helpers import new_invoice
from tests.test_settlement import AT, DAY, issued_before, line, upload, write_settlement_csv


def notice(inv: dict, provider: str, txid: str, amount: int | None = None, *,
           paid_at: datetime | None = None) -> PaymentNotice:
    """A confirmed notice of a payment on the invoice's code, made when the invoice was created (a report asked
    again says the same)."""
    return PaymentNotice(provider=provider, transaction_id=txid, md5=inv["khqr"]["md5"],
                         bill_number=inv["bill_number"], amount=amount or inv["amount"], currency="KHR",
                         paid_at=paid_at or datetime.fromisoformat(inv["created_at"]), confirmed=True)


async def report(conn, n: PaymentNotice, source: str = "callback"):
    async with conn.transaction():
        return await capture(conn, n, source=source, now=datetime.now(UTC))


async def booked(conn, inv: dict) -> tuple[int, int]:
    """(payments on the invoice's code, riel booked for them in the ledger)."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(p.amount), 0) AS total FROM payments p WHERE p.khqr_md5 = $1",
        inv["khqr"]["md5"])
    ledger_total = await conn.fetchval(
        "SELECT coalesce(sum(lp.amount), 0) FROM ledger_entries e JOIN ledger_postings lp ON lp.entry_id = e.id "
        "JOIN ledger_accounts a ON a.id = lp.account_id "
        "WHERE e.payment_id IN (SELECT id FROM payments WHERE khqr_md5 = $1) AND a.code LIKE 'provider:%:clearing:%' "
        "AND lp.side = 'debit'", inv["khqr"]["md5"])
    assert ledger_total == row["total"]  # each payment booked once, for its amount
    return row["n"], row["total"]


async def test_a_second_payment_reported_by_two_channels_is_booked_once(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "sandbox", "T1", 30000))      # underpaid: held for treasury
        second = await report(conn, notice(inv, "sandbox", "T2", 50000))     # the same code paid again
        assert first.created and second.created and second.reason is None   # the second pays the invoice
        # Bakong reports both: each is one of those two payments, the second one too.
        by_poll = [await report(conn, notice(inv, "bakong", "H2", 50000), "poll"),
                   await report(conn, notice(inv, "bakong", "H1", 30000), "poll")]
        assert [(r.created, r.payment_id) for r in by_poll] == [(False, second.payment_id), (False, first.payment_id)]
        # Asked again, the same answers; nothing more is booked.
        again = await report(conn, notice(inv, "bakong", "H2", 50000), "poll")
        assert (again.created, again.payment_id) == (False, second.payment_id)
        assert await booked(conn, inv) == (2, 80000)
        reports = await conn.fetch("SELECT provider_transaction_id, payment_id, source FROM payment_reports "
                                   "ORDER BY provider_transaction_id")
        assert [tuple(r) for r in reports] == [("H1", first.payment_id, "poll"), ("H2", second.payment_id, "poll")]
        seqs = await conn.fetch("SELECT khqr_seq FROM payments WHERE khqr_md5 = $1 ORDER BY khqr_seq",
                                inv["khqr"]["md5"])
        assert [r["khqr_seq"] for r in seqs] == [1, 2]


async def test_a_second_payment_through_a_channel_that_reported_the_first_is_booked(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "sandbox", "T1"))
        assert not (await report(conn, notice(inv, "bakong", "H1"), "poll")).created  # the same payment
        # The citizen pays the code again, through an app only Bakong reports: a payment of its own, held
        # (the invoice is paid), not taken for the first one.
        again = await report(conn, notice(inv, "bakong", "H2"), "poll")
        assert again.created and again.reason == "duplicate_payment" and again.payment_id != first.payment_id
        assert await booked(conn, inv) == (2, 100000)


async def test_a_report_that_contradicts_itself_is_raised_once_and_books_nothing(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "sandbox", "T1"))
        await report(conn, notice(inv, "bakong", "H1"), "poll")
        # Bakong's answer for H1 changes its amount: raised to treasury, once however often it says so.
        for _ in range(2):
            got = await report(conn, notice(inv, "bakong", "H1", 40000), "poll")
            assert (got.created, got.payment_id, got.reason) == (False, first.payment_id, "conflicting_notice")
        reasons = await conn.fetch("SELECT reason, payment_id FROM reconciliation_exceptions")
        assert {(r["reason"], r["payment_id"]) for r in reasons} == {("conflicting_notice", first.payment_id)}
        assert await booked(conn, inv) == (1, 50000)


@pytest.mark.parametrize("amounts", [(50000, 50000), (30000, 50000)], ids=["alike", "different"])
async def test_two_payments_each_reported_by_two_channels_in_any_order_are_two_payments(api, portal, invoice_body,
                                                                                      amounts):
    """Every order of the four reports (two payments, each reported by the bank's callback and by Bakong)."""
    reports = [(provider, i) for i in range(2) for provider in ("sandbox", "bakong")]
    async with connect(api.dsn) as conn:
        for order in itertools.permutations(reports):
            inv = await new_invoice(api, portal, invoice_body, amount=50000)
            for provider, i in order:
                await report(conn, notice(inv, provider, f"{inv['id']}-{provider}-{i}", amounts[i]))
            assert await booked(conn, inv) == (2, sum(amounts)), order


async def test_two_channels_reporting_a_second_payment_at_once_book_it_once(api, portal, invoice_body):
    for round_ in range(8):
        inv = await new_invoice(api, portal, invoice_body, amount=50000)
        async with connect(api.dsn) as a, connect(api.dsn) as b, connect(api.dsn) as c:
            t = inv["id"]
            await report(a, notice(inv, "sandbox", f"{t}-T1", 30000))
            got = await asyncio.gather(report(b, notice(inv, "sandbox", f"{t}-T2")),
                                       report(c, notice(inv, "bakong", f"{t}-H2"), "poll"))
            assert sorted(r.created for r in got) == [False, True], round_
            assert got[0].payment_id == got[1].payment_id
            assert await booked(a, inv) == (2, 80000)


async def test_a_settlement_pairs_two_payments_on_one_code_with_two_lines_by_md5(api, portal, treasury,
                                                                                invoice_body):
    """Lines that name the code but not the transaction id: the n-th line takes the n-th payment on the code
    (it used to be the first line for both, and the second line was captured again, as missing_in_ledger)."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as conn:
        await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))
        await report(conn, notice(inv, "sandbox", "T2", paid_at=AT))
    r = await upload(api, treasury, write_settlement_csv([line("bank-1", 50000, md5=inv["khqr"]["md5"]),
                                                          line("bank-2", 50000, md5=inv["khqr"]["md5"])]))
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        cats = await conn.fetch("SELECT category, matched_by FROM settlement_lines ORDER BY line_no")
        assert [tuple(c) for c in cats] == [("matched", "md5"), ("matched", "md5")]
        assert await booked(conn, inv) == (2, 100000)


async def settled_lines(conn) -> list[tuple]:
    return [tuple(x) for x in await conn.fetch(
        "SELECT l.transaction_id, l.category, l.payment_id FROM settlement_lines l "
        "JOIN settlements s ON s.id = l.settlement_id ORDER BY s.business_date, l.line_no")]


def bank_statement(md5: str, *, reference: bool) -> bytes:
    """A camt.053 statement listing one payment on the code under the bank's own reference, or under none."""
    data = write_statement([line(None, 50000, md5=md5)])
    return data if reference else re.sub(rb"<AcctSvcrRef>[^<]*</AcctSvcrRef>", b"", data)


async def test_settlement_lines_for_a_code_another_channel_paid_are_raised_not_booked(api, portal, treasury,
                                                                                     invoice_body):
    """A file's line that matches none of its provider's payments, for a code another channel's payment of the
    same amount is on, is raised for treasury (duplicate_in_settlement) and books nothing: whether it is that
    payment or the citizen paying the code again cannot be told from the file. Treasury resolves it (refund_due
    or match_to_invoice bring the money in)."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    md5 = inv["khqr"]["md5"]
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "bakong", "H1", paid_at=AT), "poll")
    r = await upload(api, treasury, write_settlement_csv([line("T1", 50000, md5=md5), line("T2", 50000, md5=md5)]))
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        assert await settled_lines(conn) == [("T1", "duplicate_in_settlement", first.payment_id),
                                             ("T2", "duplicate_in_settlement", first.payment_id)]
        assert await conn.fetchval("SELECT count(*) FROM reconciliation_exceptions "
                                   "WHERE reason = 'duplicate_in_settlement' AND state = 'open'") == 2
        assert await conn.fetchval("SELECT count(*) FROM payment_reports") == 0
        assert await booked(conn, inv) == (1, 50000)
        # The bank's callbacks, late: T1 is the poll's payment; T3, another payment on the code, is booked.
        assert (await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))).payment_id == first.payment_id
        third = await report(conn, notice(inv, "sandbox", "T3", paid_at=AT))
        assert third.created and await booked(conn, inv) == (2, 100000)


@pytest.mark.parametrize("reference", [True, False], ids=["bank-reference", "no-reference"])
async def test_a_bank_statement_listing_a_payment_its_callback_reported_books_nothing(api, portal, treasury,
                                                                                    invoice_body, reference):
    """The poll captured the payment, the bank's callback was kept as its report, and the bank's statement lists
    it under the bank's own reference (or none). Found by review: the line was booked as a second payment,
    since the bank had reported the poll's payment already."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "bakong", "H1", paid_at=AT), "poll")
        assert (await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))).payment_id == first.payment_id
    r = await upload(api, treasury, bank_statement(inv["khqr"]["md5"], reference=reference), fmt="camt053",
                     name="stmt.xml")
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        assert [x[1:] for x in await settled_lines(conn)] == [("duplicate_in_settlement", first.payment_id)]
        assert await booked(conn, inv) == (1, 50000)


@pytest.mark.parametrize("reference", [True, False], ids=["bank-reference", "no-reference"])
async def test_a_bank_callback_after_its_statement_listed_the_payment_books_nothing(api, portal, treasury,
                                                                                  invoice_body, reference):
    """The statement came first, under the bank's reference (or none); the bank's own callback comes late. Found
    by review: the statement's line was kept as the bank's report, and the callback was booked a second time."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "bakong", "H1", paid_at=AT), "poll")
    r = await upload(api, treasury, bank_statement(inv["khqr"]["md5"], reference=reference), fmt="camt053",
                     name="stmt.xml")
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        late = await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))
        assert (late.created, late.payment_id) == (False, first.payment_id)
        assert await booked(conn, inv) == (1, 50000)


@pytest.mark.parametrize("names", ["md5", "bill_number"])
async def test_a_line_the_bank_reported_as_another_channels_payment_is_not_paired_with_its_next_one(
        api, portal, treasury, invoice_body, names):
    """The poll captured P1 and the bank's callback T1 was kept as its report; the citizen paid the code again
    through the bank (T2, the bank's payment P2). The bank's file of day 1 lists T1, of day 2 T2. Found by
    review: matching by md5 (or bill number) paired T1 with P2, and T2 then came as a duplicate of P2, raised
    against the wrong payment."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    key = {"md5": inv["khqr"]["md5"]} if names == "md5" else {"bill": inv["bill_number"]}
    async with connect(api.dsn) as conn:
        first = await report(conn, notice(inv, "bakong", "H1", paid_at=AT), "poll")
        await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))
        second = await report(conn, notice(inv, "sandbox", "T2", paid_at=AT))
        assert second.created
    for txid, day in (("T1", DAY), ("T2", DAY + timedelta(days=1))):
        r = await upload(api, treasury, write_settlement_csv([line(txid, 50000, **key)]), day=day)
        assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        assert await settled_lines(conn) == [("T1", "duplicate_in_settlement", first.payment_id),
                                             ("T2", "matched", second.payment_id)]
        assert await booked(conn, inv) == (2, 100000)


@pytest.mark.parametrize("reference", [True, False], ids=["bank-reference", "no-reference"])
async def test_a_banks_late_callback_for_a_payment_its_statement_booked_books_nothing(api, portal, treasury,
                                                                                     invoice_body, reference):
    """The callback was lost and the poll did not see the payment; the bank's statement booked it under the
    bank's reference (missing_in_ledger); then the bank's callback comes, with its own transaction id. Found by
    review: it was booked as a second payment (duplicate_payment), and treasury would refund a payment the
    citizen made once."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    r = await upload(api, treasury, bank_statement(inv["khqr"]["md5"], reference=reference), fmt="camt053",
                     name="stmt.xml")
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        [(_, category, from_file)] = await settled_lines(conn)
        assert category == "missing_in_ledger"
        late = await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))
        assert (late.created, late.payment_id) == (False, from_file)
        assert await booked(conn, inv) == (1, 50000)
        # Kept as the bank's report of it: a second payment through the bank is booked.
        again = await report(conn, notice(inv, "sandbox", "T2", paid_at=AT))
        assert again.created and await booked(conn, inv) == (2, 100000)


async def test_a_files_line_for_the_codes_second_payment_is_raised_against_it(api, portal, treasury,
                                                                             invoice_body):
    """The poll booked P1 and P2 (the code paid twice); the bank reported P1 by callback (T1). Its file lists T1
    and T2: T1 is P1; T2, unmatched, is raised against P2, not against P1 a second time (found by review)."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    md5 = inv["khqr"]["md5"]
    async with connect(api.dsn) as conn:
        p1 = await report(conn, notice(inv, "bakong", "H1", paid_at=AT), "poll")
        assert (await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))).payment_id == p1.payment_id
        p2 = await report(conn, notice(inv, "bakong", "H2", paid_at=AT), "poll")
        assert p2.created
    r = await upload(api, treasury, write_settlement_csv([line("T1", 50000, md5=md5), line("T2", 50000, md5=md5)]))
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        assert await settled_lines(conn) == [("T1", "duplicate_in_settlement", p1.payment_id),
                                             ("T2", "duplicate_in_settlement", p2.payment_id)]
        assert await booked(conn, inv) == (2, 100000)


@pytest.mark.parametrize("fmt", ["csv", "camt053"])
async def test_a_callback_under_another_id_than_its_files_line_is_another_payment(api, portal, treasury,
                                                                                 invoice_body, fmt):
    """The file named the payment by the provider's own transaction id (T1, as a sandbox CSV always does, and a
    camt.053 EndToEndId): a callback for T2 on the same code is a second payment, booked and raised
    (duplicate_payment), not taken for T1 (found by review of the rule above)."""
    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    lines = [line("T1", 50000, md5=inv["khqr"]["md5"])]
    data = write_settlement_csv(lines) if fmt == "csv" else write_statement(lines)
    r = await upload(api, treasury, data, **({"fmt": "camt053", "name": "stmt.xml"} if fmt == "camt053" else {}))
    assert r.status == 201, await r.text()
    async with connect(api.dsn) as conn:
        [(_, category, from_file)] = await settled_lines(conn)
        assert category == "missing_in_ledger"
        assert (await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))).payment_id == from_file  # a retry
        second = await report(conn, notice(inv, "sandbox", "T2", paid_at=AT))
        assert second.created and second.reason == "duplicate_payment"
        assert await booked(conn, inv) == (2, 100000)


def test_a_statement_says_when_a_line_is_named_by_the_banks_reference():
    from providers.camt053 import create as camt053

    md5 = "a" * 32
    named = list(camt053({}).parse_settlement(write_statement([line("E2E-1", 50000, md5=md5)])))
    by_ref = list(camt053({}).parse_settlement(bank_statement(md5, reference=True)))
    assert [(x.transaction_id, x.id_is_reference) for x in named] == [("E2E-1", False)]
    assert [x.id_is_reference for x in by_ref] == [True] and by_ref[0].transaction_id.startswith("BANK")


@pytest.mark.parametrize("reference", [True, False], ids=["bank-reference", "no-reference"])
async def test_a_payment_a_statement_booked_before_0041_is_marked_by_it(api, portal, treasury, invoice_body,
                                                                       reference):
    """Found by review: payments captured from a statement before migration 0041 lacked the mark, so the bank's
    late callback for one was booked as a second payment. The migration marks them from their lines."""
    from paysvc.migrate import migrations_dir

    inv = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    r = await upload(api, treasury, bank_statement(inv["khqr"]["md5"], reference=reference), fmt="camt053",
                     name="stmt.xml")
    assert r.status == 201, await r.text()
    sql = (migrations_dir() / "0041_settlement_lines_named_by_the_bank.sql").read_text()
    backfill = sql[sql.index("UPDATE payments"):]
    async with connect(api.dsn) as conn:
        await conn.execute("UPDATE payments SET evidence = evidence #- '{notice,raw,id_is_reference}'")
        await conn.execute(backfill)  # as a superuser, like the migration
        [(_, _, from_file)] = await settled_lines(conn)
        late = await report(conn, notice(inv, "sandbox", "T1", paid_at=AT))
        assert (late.created, late.payment_id) == (False, from_file)
        assert await booked(conn, inv) == (1, 50000)
