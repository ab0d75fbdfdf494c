"""The overdue check reads only what its provider's mark leaves to check (migration 0057): payments paid after
the last check's end, or recorded since it began (less an hour), so a check does not read a provider's whole
history each time. ``paysvc settlements recheck`` still reads everything."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import asyncpg

from paysvc.settlement_days import last_day_in_grace, window
from paysvc.settlement_import import Rules, raise_overdue

RULES = Rules(cutoff=time(17, 0), grace_days=2, bank_account="treasury")
TODAY = date(2026, 6, 10)
UNTIL = window(last_day_in_grace(TODAY, RULES.grace_days), RULES.cutoff)[1]  # what a check on TODAY reads up to


async def _payment(db: asyncpg.Connection, pid: str, *, paid_at: datetime, recorded_at: datetime | None = None,
                   provider: str = "sandbox") -> None:
    """A payment written directly (no invoice, agency or inbox row needed); recorded now unless told."""
    await db.execute("SET session_replication_role = replica")
    try:
        await db.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, currency, amount, applied_amount, "
            "suspense_amount, paid_at, captured_at, source, recorded_at) VALUES ($1, $2, $1, 'KHR', 100, 0, 100, "
            "$3, $3, 'callback', coalesce($4, now()))", pid, provider, paid_at, recorded_at)
    finally:
        await db.execute("SET session_replication_role = origin")


async def _check(db: asyncpg.Connection, today: date = TODAY, *, full: bool = False) -> set[str]:
    """One check in a transaction of its own, as the import and the daily job run it: the payments it raised."""
    async with db.transaction():
        before = {r["payment_id"] for r in await db.fetch(
            "SELECT payment_id FROM reconciliation_exceptions WHERE reason = 'missing_in_settlement'")}
        await raise_overdue(db, provider="sandbox", today=today, rules=RULES, now=datetime.now(UTC), full=full)
        after = {r["payment_id"] for r in await db.fetch(
            "SELECT payment_id FROM reconciliation_exceptions WHERE reason = 'missing_in_settlement'")}
    return after - before


async def _mark(db: asyncpg.Connection):
    return await db.fetchrow("SELECT checked_until, checked_at FROM settlement_overdue_marks WHERE provider = 'sandbox'")


async def test_a_check_reads_only_what_its_mark_leaves_and_a_recheck_reads_everything(db):
    week_ago = datetime.now(UTC) - timedelta(days=7)
    await _payment(db, "pay_first", paid_at=UNTIL - timedelta(days=3))
    assert await _check(db) == {"pay_first"}  # no mark yet: everything read
    mark = await _mark(db)
    assert mark["checked_until"] == UNTIL

    # Paid before the mark's end, and recorded more than an hour before the check began: by the mark it was read
    # then, so the next check does not read it (a payment like this cannot exist unless written behind the
    # service's back, as here). The recheck reads everything and raises it.
    await _payment(db, "pay_behind_the_mark", paid_at=UNTIL - timedelta(days=2), recorded_at=week_ago)
    # Paid before the mark's end too, but recorded now (a bank that reported it late): read, and raised.
    await _payment(db, "pay_reported_late", paid_at=UNTIL - timedelta(days=2))
    # Paid after the mark's end and past its grace by the next day's check: read, and raised.
    await _payment(db, "pay_next_day", paid_at=UNTIL + timedelta(hours=12), recorded_at=week_ago)
    assert await _check(db, TODAY + timedelta(days=1)) == {"pay_reported_late", "pay_next_day"}
    assert (await _mark(db))["checked_until"] == UNTIL + timedelta(days=1)
    assert await _check(db, TODAY + timedelta(days=1), full=True) == {"pay_behind_the_mark"}


async def test_the_mark_only_moves_forward(db):
    await _payment(db, "pay_1", paid_at=UNTIL - timedelta(days=1))
    assert await _check(db) == {"pay_1"}
    mark = await _mark(db)
    # A check up to an earlier day (a recheck with --today in the past) read less than the mark stands for.
    assert await _check(db, TODAY - timedelta(days=5), full=True) == set()
    assert await _mark(db) == mark
    # A later check moves it, with its own start time.
    assert await _check(db, TODAY + timedelta(days=1)) == set()
    moved = await _mark(db)
    assert moved["checked_until"] > mark["checked_until"] and moved["checked_at"] >= mark["checked_at"]
