"""Balances are folded in at commit: exactly once per posting, never for a rolled-back entry."""

from __future__ import annotations

from datetime import datetime, timezone

import ledger
from ledger import entries
from tests.pg_stats import table_counter

T0 = datetime(2026, 11, 25, 5, 0, tzinfo=timezone.utc)


def capture(n: int, amount: int) -> ledger.EntryDraft:
    return entries.payment_captured(provider="sandbox", agency="MOI", amount=amount, currency="KHR",
                                    effective_at=T0, invoice_id=f"inv_{n}", payment_id=f"pay_{n}")


async def test_balances_follow_commit_and_rollback(db):
    async with db.transaction():
        await ledger.post_entry(db, capture(1, 100))
        await ledger.post_entry(db, capture(2, 200))
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 300
    tx = db.transaction()
    await tx.start()
    await ledger.post_entry(db, capture(3, 999))
    await tx.rollback()
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 300
    assert await ledger.balance(db, "provider:sandbox:clearing:KHR") == 300


async def test_entries_written_after_constraints_were_checked_early_still_count_once(db):
    async with db.transaction():
        await ledger.post_entry(db, capture(1, 100))
        await db.execute("SET CONSTRAINTS ALL IMMEDIATE")  # folds entry 1 now
        await db.execute("SET CONSTRAINTS ALL DEFERRED")
        await ledger.post_entry(db, capture(2, 20))
        await ledger.post_entries(db, [capture(3, 3), capture(4, 4)])
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 127
    report = await ledger.verify(db)
    assert not report.balance_mismatches
    row = await db.fetchrow("SELECT b.postings FROM ledger_balances b JOIN ledger_accounts a ON a.id = b.account_id "
                            "WHERE a.code = 'agency:MOI:revenue:KHR'")
    assert row["postings"] == 4


async def test_fold_pending_shows_this_transactions_postings_without_counting_them_twice(db):
    async with db.transaction():
        await ledger.post_entry(db, capture(1, 100))
        with_commit_pending = await db.fetchval("SELECT count(*) FROM ledger_balance_slots WHERE postings > 0")
        await ledger.fold_pending(db)
        assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 100
        await ledger.post_entry(db, capture(2, 5))
    assert with_commit_pending == 0  # nothing folded before commit or fold_pending
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 105


async def test_no_posting_can_slip_in_after_an_entry_was_checked(db):
    import asyncpg
    import pytest

    async with db.transaction():
        entry = await ledger.post_entry(db, capture(1, 100))
        await db.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the entry is checked and folded now
        account = await db.fetchval("SELECT id FROM ledger_accounts WHERE code = 'agency:MOI:revenue:KHR'")
        with pytest.raises(asyncpg.CheckViolationError, match="declares 2 postings"):
            async with db.transaction():
                await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                                 "VALUES ($1, 3, $2, 'credit', 5, 'KHR')", entry.id, account)
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 100


async def test_a_hot_account_is_spread_over_slots_and_read_as_one_balance(db):
    for n in range(1, 41):  # forty transactions: forty transaction ids, so several of the 16 slots
        await ledger.post_entry(db, capture(n, n))  # outside a block: each statement is its own transaction
    slots = await db.fetch(
        "SELECT s.slot, s.credits, s.postings FROM ledger_balance_slots s JOIN ledger_accounts a ON a.id = s.account_id"
        " WHERE a.code = 'agency:MOI:revenue:KHR' AND s.postings > 0 ORDER BY s.slot")
    assert 1 < len(slots) <= 16  # the slot is the transaction id mod 16: forty transactions use several
    assert sum(r["credits"] for r in slots) == sum(range(1, 41))
    assert sum(r["postings"] for r in slots) == 40
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == sum(range(1, 41))
    acct = await ledger.get_account(db, "agency:MOI:revenue:KHR")
    assert (acct.credits, acct.postings) == (sum(range(1, 41)), 40)
    row = await db.fetchrow("SELECT b.credits, b.postings FROM ledger_balances b JOIN ledger_accounts a "
                            "ON a.id = b.account_id WHERE a.code = 'agency:MOI:revenue:KHR'")
    assert (row["credits"], row["postings"]) == (sum(range(1, 41)), 40)
    assert not (await ledger.verify(db)).balance_mismatches


async def test_a_connection_that_first_posted_on_an_empty_ledger_reads_only_its_own_rows_later(db_dsn):
    """The ledger's functions keep one plan per connection, made at its first call. On a new database that
    is when the tables are empty; a posting made much later on that connection must still read only its own
    rows (by key), not scan what everyone else has written since. Counted in PostgreSQL's own table
    statistics: rows read by sequential scans plus rows fetched through indexes."""
    from paysvc.db import connect

    def spread(n: int) -> ledger.EntryDraft:  # 500 agency accounts, as many agencies would have
        return entries.payment_captured(provider="sandbox", agency=f"A{n % 500}", amount=10, currency="KHR",
                                        effective_at=T0, invoice_id=f"inv_{n}", payment_id=f"pay_{n}")

    async def rows_read(conn) -> int:
        return await table_counter(conn, "coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)", "ledger_entries",
                                   "ledger_postings", "ledger_accounts", "ledger_balance_slots")

    async with connect(db_dsn) as early, connect(db_dsn) as others:
        await ledger.post_entry(early, spread(0))  # its plans are made now, on an almost empty ledger
        for b in range(30):
            await ledger.post_entries(others, [spread(n) for n in range(1 + 100 * b, 101 + 100 * b)])
        before = await rows_read(others)
        await ledger.post_entry(early, spread(5000))
        await early.execute("SELECT pg_stat_force_next_flush()")  # its counters reach the view when it idles
        after = await rows_read(others)
    # One entry, two postings, two accounts, two balance slots, a few index probes: a few dozen rows at most.
    # A plan that scans grows with the 3,000 entries, 6,000 postings and 500 accounts written since.
    assert after - before < 100, f"posting one entry read {after - before} rows"


async def test_an_account_has_its_sixteen_balance_slots_from_its_creation(db):
    """Migration 0056: an account is created with its 16 balance slots, so a fold always updates a row that is
    there (no insertion, no foreign-key check of a new row), whichever slot its transaction lands on."""
    await ledger.post_entry(db, capture(1, 100))
    slots = await db.fetch(
        "SELECT a.code, count(*) AS n, array_agg(s.slot ORDER BY s.slot) AS which, sum(s.postings) AS postings"
        "  FROM ledger_balance_slots s JOIN ledger_accounts a ON a.id = s.account_id GROUP BY a.code ORDER BY a.code")
    assert [(r["code"], r["n"], list(r["which"]), r["postings"]) for r in slots] == [
        ("agency:MOI:revenue:KHR", 16, list(range(16)), 1), ("provider:sandbox:clearing:KHR", 16, list(range(16)), 1)]

    before = await table_counter(db, "n_tup_ins", "ledger_balance_slots")
    async with db.transaction():  # folded at commit
        for n in range(2, 6):
            await ledger.post_entry(db, capture(n, 10))
    for n in range(6, 26):  # twenty transactions: twenty transaction ids, so other slots than the first
        await ledger.post_entry(db, capture(n, 1), fold_now=n % 2 == 0)
    assert await table_counter(db, "n_tup_ins", "ledger_balance_slots") == before
    used = await db.fetchval("SELECT count(DISTINCT slot) FROM ledger_balance_slots WHERE postings > 0")
    assert used > 1
    assert await db.fetchval("SELECT count(*) FROM ledger_balance_slots") == 32
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 100 + 40 + 20
    assert (await ledger.verify(db)).ok
