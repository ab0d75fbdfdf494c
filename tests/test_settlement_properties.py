"""Invariants of matching, for any day and any file made from it: every line and every payment lands in
exactly one category, the totals add up, and clearing keeps exactly what was not settled. Also the
business-day rule, in Python and in SQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta

import asyncpg
from hypothesis import HealthCheck, given, settings, strategies as st

import ledger
from paysvc.capture import capture
from paysvc.db import init_connection
from paysvc.queries import Q
from paysvc.settlement_days import TIME_ZONE_NAME, business_date, parse_cutoff, window
from paysvc.settlement_import import Rules, import_settlement
from providers import PaymentNotice, SettlementLine

DAY = date(2025, 6, 2)
RULES = Rules(cutoff=parse_cutoff("23:59:59.999"), grace_days=2, bank_account="nbc-treasury")
OPS = st.sampled_from(["keep", "drop", "alter", "dup", "alter_dup"])


def test_business_day_boundaries():
    cutoff = parse_cutoff("18:00")
    local = lambda h, m=0, s=0, us=0: datetime(2025, 6, 2, h, m, s, us, tzinfo=UTC) - timedelta(hours=7)  # noqa: E731
    assert business_date(local(17, 59, 59), cutoff) == DAY
    assert business_date(local(18), cutoff) == DAY                     # at the cut-off: still that day
    assert business_date(local(18, 0, 0, 1), cutoff) == DAY + timedelta(days=1)
    default = parse_cutoff("23:59:59.999")
    assert business_date(local(23, 59, 59, 999000), default) == DAY
    assert business_date(local(23, 59, 59, 999500), default) == DAY + timedelta(days=1)
    start, end = window(DAY, cutoff)
    assert (start, end) == (local(18) - timedelta(days=1), local(18))


@settings(max_examples=60, deadline=None)
@given(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
       st.times())
def test_every_instant_is_in_the_window_of_its_business_day(instant, cutoff):
    start, end = window(business_date(instant, cutoff), cutoff)
    assert start < instant <= end


@given(cases=st.lists(st.tuples(OPS, st.integers(1, 90_000)), min_size=0, max_size=7),
       added=st.lists(st.tuples(st.integers(1, 90_000), st.booleans()), max_size=3),
       order=st.randoms(use_true_random=False))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_line_and_payment_lands_in_exactly_one_category(db_dsn, cases, added, order):
    asyncio.run(_check(db_dsn, cases, added, order))


async def _check(dsn: str, cases, added, order) -> None:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    tx = conn.transaction()
    await tx.start()
    try:
        at = datetime(2025, 6, 2, 3, 0, tzinfo=UTC)
        lines: list[tuple] = []
        expect_lines = {"matched": 0, "amount_mismatch": 0, "missing_in_ledger": 0, "duplicate_in_settlement": 0}
        expect_pay = {"matched": 0, "amount_mismatch": 0, "missing_in_ledger": 0, "missing_in_settlement": 0}
        unsettled = 0
        for i, (op, amount) in enumerate(cases):
            await capture(conn, PaymentNotice(provider="sandbox", transaction_id=f"P{i}", amount=amount, currency="KHR",
                                              paid_at=at + timedelta(minutes=i), confirmed=True),
                          source="callback", now=at)
            settled = amount + 1 if op.startswith("alter") else amount
            if op == "drop":
                expect_pay["missing_in_settlement"] += 1
                unsettled += amount
                continue
            kind = "amount_mismatch" if op.startswith("alter") else "matched"
            expect_pay[kind] += 1
            expect_lines[kind] += 1
            if kind == "amount_mismatch":
                unsettled += amount
            lines.append((f"P{i}", settled))
            if op.endswith("dup"):
                lines.append((f"P{i}", settled))
                expect_lines["duplicate_in_settlement"] += 1
        for k, (amount, twice) in enumerate(added):
            lines.append((f"NEW{k}", amount))
            expect_lines["missing_in_ledger"] += 1
            expect_pay["missing_in_ledger"] += 1
            if twice:
                lines.append((f"NEW{k}", amount))
                expect_lines["duplicate_in_settlement"] += 1
        order.shuffle(lines)
        parsed = [SettlementLine(line_no=n + 2, transaction_id=t, amount=a, currency="KHR", paid_at=at, fee=0)
                  for n, (t, a) in enumerate(lines)]
        done = await import_settlement(conn, iter(parsed), data_sha256=bytes(32), file_size=0, provider="sandbox",
                                       fmt="sandbox", business_date=DAY, file_name=None, imported_by="test",
                                       now=datetime.now(UTC), rules=RULES)
        got = dict(await conn.fetch("SELECT category, count(*) FROM settlement_lines WHERE settlement_id = $1 "
                                    "GROUP BY 1", done.settlement_id))
        assert {k: got.get(k, 0) for k in expect_lines} == expect_lines
        assert sum(got.values()) == len(lines)
        total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM settlement_lines WHERE settlement_id = $1",
                                    done.settlement_id)
        assert total == sum(a for _, a in lines)
        start, end = window(DAY, RULES.cutoff)
        states = {r["state"]: r["payments"] for r in await conn.fetch(Q.day_payment_states, "sandbox", start, end)}
        assert {k: states.get(k, 0) for k in expect_pay} == expect_pay
        assert sum(states.values()) == len(cases) + len(added)
        try:
            await ledger.fold_pending(conn)  # this example's transaction is rolled back, never committed
            clearing = await ledger.balance(conn, "provider:sandbox:clearing:KHR")
        except ledger.AccountNotFound:
            clearing = 0
        assert clearing == unsettled
    finally:
        await tx.rollback()
        await conn.close()


async def test_the_sql_business_date_agrees_with_python(db):
    for cutoff in ("23:59:59.999", "18:00", "00:00"):
        c = parse_cutoff(cutoff)
        for minutes in range(0, 24 * 60, 37):
            instant = datetime(2025, 6, 1, 16, 0, tzinfo=UTC) + timedelta(minutes=minutes, microseconds=999_400)
            assert await db.fetchval(Q.business_date_sql, instant, TIME_ZONE_NAME, c) == business_date(instant, c)
    assert isinstance(time(0), time)
