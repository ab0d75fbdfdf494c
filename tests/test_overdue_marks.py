"""The overdue check reads only what its provider's mark leaves to check (migration 0057): payments paid after
the last check's end, or recorded by a transaction that check could not see, so a check does not read a
provider's whole history each time. ``paysvc settlements recheck`` (a full check) reads everything."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time, timedelta

import asyncpg

from paysvc.settlement_days import last_day_in_grace, window
from paysvc.settlement_import import Rules, raise_overdue
from tests.pg_stats import table_counter

RULES = Rules(cutoff=time(17, 0), grace_days=2, bank_account="treasury")
TODAY = date(2026, 6, 10)
UNTIL = window(last_day_in_grace(TODAY, RULES.grace_days), RULES.cutoff)[1]  # what a check on TODAY reads up to


async def _payment(db: asyncpg.Connection, pid: str, *, paid_at: datetime, provider: str = "sandbox") -> None:
    """A payment written directly (no invoice, agency or inbox row needed)."""
    await db.execute("SET session_replication_role = replica")
    try:
        await db.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, currency, amount, applied_amount, "
            "suspense_amount, paid_at, captured_at, source) VALUES ($1, $2, $1, 'KHR', 100, 0, 100, $3, $3, "
            "'callback')", pid, provider, paid_at)
    finally:
        await db.execute("SET session_replication_role = origin")


@asynccontextmanager
async def _recording(db_dsn: str, pid: str):
    """Another connection recording payment ``pid`` (paid before the mark's end) in a transaction it leaves open:
    yields that transaction, to commit when the test says."""
    conn = await asyncpg.connect(db_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await _payment(conn, pid, paid_at=UNTIL - timedelta(days=5))
        yield tx
    finally:
        await conn.close()


async def _raised(db: asyncpg.Connection) -> set[str]:
    return {r["payment_id"] for r in await db.fetch(
        "SELECT payment_id FROM reconciliation_exceptions WHERE reason = 'missing_in_settlement'")}


async def _check(db: asyncpg.Connection, today: date = TODAY, *, full: bool = False) -> set[str]:
    """One check in a transaction of its own, as the import and the daily job run it: the payments it raised."""
    async with db.transaction():
        before = await _raised(db)
        await raise_overdue(db, provider="sandbox", today=today, rules=RULES, now=datetime.now(UTC), full=full)
        return await _raised(db) - before


async def _mark(db: asyncpg.Connection):
    return await db.fetchrow("SELECT checked_until, checked_xmin FROM settlement_overdue_marks "
                             "WHERE provider = 'sandbox'")


async def test_a_check_reads_what_its_mark_leaves_and_a_recheck_reads_everything(db):
    await _payment(db, "pay_first", paid_at=UNTIL - timedelta(days=3))
    assert await _check(db) == {"pay_first"}  # no mark yet: everything read
    assert (await _mark(db))["checked_until"] == UNTIL

    # A check trusts its mark. Written behind the service's back, a payment paid before the mark's end and
    # recorded below its transaction id (the mark moved past it by hand) is not read again; the recheck reads
    # everything, raises it, and sets the mark.
    await _payment(db, "pay_behind_the_mark", paid_at=UNTIL - timedelta(days=2))
    await db.execute("UPDATE settlement_overdue_marks SET checked_xmin = pg_current_xact_id()")  # above it
    # Paid before the mark's end, recorded after it (a bank that reported it late): read, and raised.
    await _payment(db, "pay_reported_late", paid_at=UNTIL - timedelta(days=2))
    # Paid after the mark's end, past its grace by the next day's check: read, and raised.
    await _payment(db, "pay_next_day", paid_at=UNTIL + timedelta(hours=12))
    assert await _check(db, TODAY + timedelta(days=1)) == {"pay_reported_late", "pay_next_day"}
    assert (await _mark(db))["checked_until"] == UNTIL + timedelta(days=1)
    assert await _check(db, TODAY + timedelta(days=1), full=True) == {"pay_behind_the_mark"}


async def test_a_payment_recorded_while_a_check_ran_is_read_by_the_next(db, db_dsn):
    # Found by review of a first version that marked checks by the clock, with an hour's margin: a recording
    # transaction open longer than that (a capture waiting for an invoice row another provider's import holds)
    # committed a payment the check could not see, and later checks never read it. The mark is now the oldest
    # transaction running when the check read: whatever it could not see is at or above it.
    assert await _check(db) == set()
    async with _recording(db_dsn, "pay_open") as tx:
        assert await _check(db) == set()  # cannot see it: not committed
        await tx.commit()
    assert await _check(db) == {"pay_open"}


class _CommitBeforeTheMark:
    """The connection a check runs on, which commits another transaction just before the check writes its mark
    (after its read): the order in which a mark taken after the read would miss that transaction's payment."""

    def __init__(self, conn: asyncpg.Connection, other) -> None:
        self._conn, self._other = conn, other

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def execute(self, sql: str, *args):
        from paysvc.queries import Q

        if sql == Q.overdue_marks_set:
            await self._other.commit()
        return await self._conn.execute(sql, *args)


async def test_a_payment_committed_between_a_checks_read_and_its_mark_is_read_by_the_next(db, db_dsn):
    # Found by review: the tests above would not notice a mark taken after the read instead of before it.
    assert await _check(db) == set()
    async with _recording(db_dsn, "pay_between") as tx, db.transaction():
        await raise_overdue(_CommitBeforeTheMark(db, tx), provider="sandbox", today=TODAY, rules=RULES,
                            now=datetime.now(UTC))
    assert "pay_between" not in await _raised(db)  # committed after that check's read
    assert await _check(db) == {"pay_between"}


async def test_a_bounded_check_moves_the_mark_forward_only_and_a_full_one_sets_it(db, caplog):
    await _payment(db, "pay_1", paid_at=UNTIL - timedelta(days=1))
    assert await _check(db) == {"pay_1"}
    mark = await _mark(db)
    # A bounded check up to an earlier day read less than the mark stands for: the mark stays, and says so.
    with caplog.at_level(logging.WARNING, logger="paysvc.settlement_import"):
        assert await _check(db, TODAY - timedelta(days=5)) == set()
    assert await _mark(db) == mark
    assert "overdue mark of sandbox" in caplog.text
    # A later one moves it.
    assert await _check(db, TODAY + timedelta(days=1)) == set()
    moved = await _mark(db)
    assert moved["checked_until"] > mark["checked_until"] and moved["checked_xmin"] >= mark["checked_xmin"]
    # A full one read everything up to its day: it sets the mark, even back.
    assert await _check(db, TODAY - timedelta(days=5), full=True) == set()
    assert (await _mark(db))["checked_until"] == UNTIL - timedelta(days=5)


async def test_a_bounded_check_keeps_its_index_plan_after_full_checks_on_the_same_connection(db):
    # Found by review: with one statement for both reads, five full checks on a connection made PostgreSQL give
    # the bounded read the full read's generic plan, a sequential scan of every payment. Counted in PostgreSQL's
    # own statistics: payments rows read by sequential scans during the bounded check.
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "INSERT INTO payments (id, provider, provider_transaction_id, currency, amount, applied_amount, "
        "suspense_amount, paid_at, captured_at, source) SELECT 'pay_old_' || g, 'sandbox', 'T' || g, 'KHR', 100, "
        "0, 100, $1::timestamptz - g * interval '1 minute', $1::timestamptz - g * interval '1 minute', 'callback' "
        "FROM generate_series(1, 20000) g", UNTIL - timedelta(days=30))
    await db.execute("SET session_replication_role = origin")
    await db.execute("ANALYZE payments")

    for _ in range(6):
        await _check(db, full=True)
    await _payment(db, "pay_new", paid_at=UNTIL + timedelta(hours=1))
    before = await table_counter(db, "seq_tup_read", "payments")
    assert await _check(db, TODAY + timedelta(days=1)) == {"pay_new"}
    assert await table_counter(db, "seq_tup_read", "payments") - before < 1000
