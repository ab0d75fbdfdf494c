"""Balances are folded in at commit: exactly once per posting, never for a rolled-back entry."""

from __future__ import annotations

from datetime import datetime, timezone

import ledger
from ledger import entries

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
        with_commit_pending = await db.fetchval("SELECT count(*) FROM ledger_balance_slots")
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
        with pytest.raises(asyncpg.CheckViolationError, match="already checked"):
            async with db.transaction():
                await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                                 "VALUES ($1, 3, $2, 'credit', 5, 'KHR')", entry.id, account)
    assert await ledger.balance(db, "agency:MOI:revenue:KHR") == 100


async def test_a_hot_account_is_spread_over_slots_and_read_as_one_balance(db):
    for n in range(1, 41):  # forty transactions: forty transaction ids, so several of the 16 slots
        await ledger.post_entry(db, capture(n, n))  # outside a block: each statement is its own transaction
    slots = await db.fetch(
        "SELECT s.slot, s.credits, s.postings FROM ledger_balance_slots s JOIN ledger_accounts a ON a.id = s.account_id"
        " WHERE a.code = 'agency:MOI:revenue:KHR' ORDER BY s.slot")
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
