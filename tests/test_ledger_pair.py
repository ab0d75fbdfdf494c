"""ledger_post_pair (migration 0058): an entry of two postings written from scalars, by ledger_post's rules."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ledger
from ledger import EntryDraft, Posting, entries
from paysvc.db import connect
from tests.test_ledger_db import (CLEARING, REVENUE, T0, USD_REVENUE, capture, outcome_as_the_service, post,
                                  seed_khr_and_usd)

NEW_KHR = "agency:NEW:revenue:KHR"  # an account no entry has named yet
PAIR_SIG = ("ledger_post_pair(text, text, timestamptz, text, text, text, text, bytea, text, text, text, bigint, text, "
            "boolean)")

_PAIR = ("SELECT o_ord, o_id, o_status FROM ledger_post_pair('raw', 'x', $1, $2, 'inv_raw', NULL, NULL, $3, "
         "$4, $5, $6, $7, $8, $9)")
_GENERAL = ("SELECT o_ord, o_id, o_status FROM ledger_post(ARRAY['raw'], ARRAY['x'], ARRAY[$1::timestamptz], "
            "ARRAY[$2::text], ARRAY['inv_raw'], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], "
            "ARRAY[$3::bytea], ARRAY[2::smallint], ARRAY[1, 1], ARRAY[1, 2]::smallint[], $4::text[], $5::text[], "
            "$6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[], $11)")
_OTHER_SIDE = {"debit": "credit", "credit": "debit"}


async def _state(conn) -> tuple:
    """What the ledger holds, apart from ids and times: entries, postings, accounts and balances."""
    return (
        tuple(await conn.fetch("SELECT kind, description, effective_at, idempotency_key, invoice_id, payment_id, "
                               "settlement_id, reverses, content_hash, posting_count, folded FROM ledger_entries "
                               "ORDER BY id")),
        tuple(await conn.fetch("SELECT p.line, a.code, p.side, p.amount, p.currency, p.prechecked "
                               "FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id "
                               "ORDER BY p.entry_id, p.line")),
        tuple(await conn.fetch("SELECT code, type, currency, normal_side, "
                               "(SELECT count(*) FROM ledger_balance_slots s WHERE s.account_id = a.id) AS slots "
                               "FROM ledger_accounts a ORDER BY code")),
        tuple(await conn.fetch("SELECT a.code, b.debits, b.credits, b.postings FROM ledger_balances b "
                               "JOIN ledger_accounts a ON a.id = b.account_id ORDER BY a.code")),
        # the last entry folded into each account: this call's (whose id differs from path to path) or another
        tuple(await conn.fetch("SELECT a.code, CASE WHEN max(s.last_entry_id) = (SELECT max(id) FROM ledger_entries) "
                               "THEN 'this entry' ELSE max(s.last_entry_id)::text END AS last_entry "
                               "FROM ledger_balance_slots s JOIN ledger_accounts a ON a.id = s.account_id "
                               "GROUP BY a.code ORDER BY a.code")),
    )


@st.composite
def _pair_arguments(draw):
    """A two-posting entry's arguments, often valid, sometimes not: any side, amount, currency or account."""
    accounts = st.sampled_from([CLEARING, REVENUE, USD_REVENUE, NEW_KHR, "agency:NEW:revenue:USD",
                                "bogus:x:KHR", None])
    return dict(
        first=draw(accounts), second=draw(accounts),
        side=draw(st.sampled_from(["debit", "credit", "Debit", None])),
        amount=draw(st.sampled_from([500, 1, 10**15, 10**15 + 1, 0, -500, None])),
        currency=draw(st.sampled_from(["KHR", "USD", "EUR", None])),
        key=draw(st.sampled_from([None, "fresh-key", "used-key"])),
        fold_now=draw(st.sampled_from([True, False, None])),
    )


@given(_pair_arguments())
# the same account on both sides; the lower account debited, then credited; a new account; a key met
# before; the fold at commit; a currency the account does not have
@example(dict(first=REVENUE, second=REVENUE, side="debit", amount=500, currency="KHR", key=None, fold_now=True))
@example(dict(first=CLEARING, second=REVENUE, side="debit", amount=500, currency="KHR", key=None, fold_now=True))
@example(dict(first=CLEARING, second=REVENUE, side="credit", amount=500, currency="KHR", key=None, fold_now=True))
@example(dict(first=NEW_KHR, second=CLEARING, side="debit", amount=7, currency="KHR", key="fresh-key",
              fold_now=True))
@example(dict(first=CLEARING, second=REVENUE, side="debit", amount=500, currency="KHR", key="used-key",
              fold_now=True))
@example(dict(first=REVENUE, second=CLEARING, side="debit", amount=500, currency="KHR", key=None, fold_now=False))
@example(dict(first=CLEARING, second=USD_REVENUE, side="debit", amount=500, currency="KHR", key=None,
              fold_now=True))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_pair_is_written_refused_or_replayed_exactly_as_ledger_post_does_it(db_dsn, case):
    # Whatever the arguments, ledger_post_pair must leave the ledger as ledger_post, given the same entry as
    # arrays (what the library sent before 0058), leaves it: the same entries, postings, new accounts and
    # balances once the commit-time check has run, the same answer, or the same SQLSTATE.
    asyncio.run(_compare(db_dsn, case))


async def _compare(dsn, case):
    conn = await asyncpg.connect(dsn)
    try:
        if await seed_khr_and_usd(conn):
            await ledger.post_entry(conn, EntryDraft(
                kind="raw", description="x", effective_at=T0, idempotency_key="used-key",
                postings=(Posting(account=CLEARING, side="debit", amount=500, currency="KHR"),
                          Posting(account=REVENUE, side="credit", amount=500, currency="KHR"))))
        used = await conn.fetchval("SELECT id FROM ledger_entries WHERE idempotency_key = 'used-key'")
        first, second, side = case["first"], case["second"], case["side"]
        amount, currency, key, fold_now = case["amount"], case["currency"], case["key"], case["fold_now"]
        codes = sorted({c for c in (first, second) if c is not None}) + ([None] if None in (first, second) else [])
        types = [await conn.fetchval("SELECT ledger_account_type($1)", c) for c in codes]
        async def answer_and_state(rows) -> tuple:
            return ([(r["o_ord"], r["o_status"], r["o_id"] == used if r["o_status"] == "replayed" else None)
                     for r in rows], await _state(conn))

        outcomes = [
            await outcome_as_the_service(conn, lambda: conn.fetch(
                _PAIR, T0, key, bytes(32), first, side, second, amount, currency, fold_now), answer_and_state),
            await outcome_as_the_service(conn, lambda: conn.fetch(
                _GENERAL, T0, key, bytes(32), [first, second], [side, _OTHER_SIDE.get(side)], [amount, amount],
                [currency, currency], codes, types, [c.rsplit(":", 1)[1] if c else None for c in codes], fold_now),
                answer_and_state),
        ]
        kind, what = outcomes[0]
        event(f"{kind} {what if kind == 'refused' else what[0][0][1]}")
        assert outcomes[0] == outcomes[1], case
    finally:
        await conn.close()


async def test_only_the_service_role_may_call_ledger_post_pair(db):
    assert await db.fetchval("SELECT prosecdef FROM pg_proc WHERE oid = $1::regprocedure", PAIR_SIG)
    assert not await db.fetchval("SELECT has_function_privilege('public', $1, 'EXECUTE')", PAIR_SIG)
    assert await db.fetchval("SELECT has_function_privilege('paysvc_app', $1, 'EXECUTE')", PAIR_SIG)


async def test_every_function_that_runs_as_the_ledgers_owner_reads_the_ledgers_own_tables(db):
    # A SECURITY DEFINER function whose search_path does not end with pg_temp would read a temporary table the
    # caller made under a journal table's name (migration 0022): found by review, a ledger_post_pair without its
    # search_path folded an entry into such a table, and the real balances were never updated.
    rows = await db.fetch("SELECT p.oid::regprocedure::text AS f, p.proconfig FROM pg_proc p "
                          "JOIN pg_namespace n ON n.oid = p.pronamespace "
                          "WHERE n.nspname = 'public' AND p.prosecdef ORDER BY 1")
    assert PAIR_SIG.split("(")[0] in {r["f"].split("(")[0] for r in rows}
    unpinned = [r["f"] for r in rows
                if "search_path=pg_catalog, public, pg_temp" not in (r["proconfig"] or [])]
    assert unpinned == []


@pytest.mark.parametrize("first", ["lower", "higher"])
async def test_a_pair_folded_at_once_locks_its_balance_rows_in_account_order(db_dsn, first):
    # Found by review: with its two updates the other way round, a pair posted with fold_now while a general
    # post queued on the lower account's balance row deadlocked with it. A third transaction holds the lower
    # account's row in the slot both writers fold into (their transaction ids are drawn until they share it);
    # the general post queues on it, then the pair; once it is released, both must post.
    admin, c_pair, c_general, burn = [await asyncpg.connect(db_dsn) for _ in range(4)]
    try:
        await ledger.post_entry(admin, capture(0))  # both accounts exist
        low, high = await admin.fetchval("SELECT array_agg(code ORDER BY id) FROM ledger_accounts")
        low_id = await admin.fetchval("SELECT id FROM ledger_accounts WHERE code = $1", low)
        for c in (c_pair, c_general):
            await c.execute("SET ROLE paysvc_app")
        await c_general.execute("BEGIN")
        x_general = int(await c_general.fetchval("SELECT pg_current_xact_id()::text"))
        while True:  # a transaction id in the same slot (other databases on the server draw ids too)
            await c_pair.execute("BEGIN")
            x_pair = int(await c_pair.fetchval("SELECT pg_current_xact_id()::text"))
            if x_pair % 16 == x_general % 16:
                break
            await c_pair.execute("ROLLBACK")
            for _ in range((x_general - x_pair - 1) % 16):
                await burn.fetchval("SELECT pg_current_xact_id()")
        await admin.execute("BEGIN")
        await admin.execute("SELECT 1 FROM ledger_balance_slots WHERE account_id = $1 AND slot = $2 FOR UPDATE",
                            low_id, x_pair % 16)
        general = asyncio.create_task(c_general.fetch(
            "SELECT * FROM ledger_post(ARRAY['t'], ARRAY['x'], ARRAY[now()], ARRAY[NULL::text], "
            "ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], ARRAY[sha256('g')], "
            "ARRAY[2::smallint], ARRAY[1, 1], ARRAY[1, 2]::smallint[], ARRAY[$1, $2], ARRAY['debit', 'credit'], "
            "ARRAY[5, 5]::bigint[], ARRAY['KHR', 'KHR'], ARRAY[$1, $2], ARRAY['asset', 'revenue'], "
            "ARRAY['KHR', 'KHR'], true)", low, high))
        await asyncio.sleep(0.3)
        a, b = (low, high) if first == "lower" else (high, low)
        pair = asyncio.create_task(c_pair.fetch(
            "SELECT * FROM ledger_post_pair('t', 'x', now(), NULL, NULL, NULL, NULL, sha256('p'), $1, 'credit', $2, "
            "5, 'KHR', true)", a, b))
        await asyncio.sleep(0.3)
        assert not general.done() and not pair.done()  # both queued behind the held row
        await admin.execute("COMMIT")
        for task, conn in ((general, c_general), (pair, c_pair)):
            await asyncio.wait_for(task, 20)  # a deadlock raises here
            await conn.execute("COMMIT")
    finally:
        for c in (admin, c_pair, c_general, burn):
            await c.close()
    async with connect(db_dsn) as conn:  # (the two raw entries carry placeholder hashes: balances only)
        assert (await ledger.trial_balance(conn)).balanced and (await ledger.verify(conn)).balance_mismatches == []
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 3


async def _functions_called(db, drafts: list[EntryDraft], fold_now: bool = False) -> dict[str, int]:
    """Which of the ledger's posting functions the library called to post ``drafts`` (PostgreSQL's own
    per-transaction function counters)."""
    # counts not yet reported to the statistics system carry over from earlier transactions: the difference
    calls = ("SELECT funcname, calls FROM pg_stat_xact_user_functions "
             "WHERE funcname IN ('ledger_post', 'ledger_post_pair')")
    async with db.transaction():
        await db.execute("SET LOCAL track_functions = 'pl'")
        before = {r["funcname"]: r["calls"] for r in await db.fetch(calls)}
        await ledger.post_entries(db, drafts, fold_now=fold_now)
        after = {r["funcname"]: r["calls"] for r in await db.fetch(calls)}
    return {f: n - before.get(f, 0) for f, n in after.items() if n != before.get(f, 0)}


async def test_the_library_posts_two_posting_entries_through_ledger_post_pair(db):
    assert await _functions_called(db, [capture(1)]) == {"ledger_post_pair": 1}  # keyed, folded at commit
    assert await _functions_called(db, [capture(2)], fold_now=True) == {"ledger_post_pair": 1}
    assert await _functions_called(db, [capture(3), capture(4)]) == {"ledger_post": 1}  # a batch
    three = entries.payment_to_suspense(provider="sandbox", amount=900, currency="KHR", effective_at=T0,
                                        payment_id="pay_5", invoice_id="inv_5", owed=400, agency="MOI")
    assert len(three.postings) == 3
    assert await _functions_called(db, [three]) == {"ledger_post": 1}
    first = await ledger.get_entry(db, (await post(db, capture(6))).id)
    undo = ledger.reversal_draft(first, description="undo", effective_at=T0)
    assert await _functions_called(db, [undo]) == {"ledger_post": 1}
    assert (await ledger.trial_balance(db)).balanced and (await ledger.verify(db)).ok


@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
async def test_a_pair_replayed_by_its_key_returns_the_first_entry_and_writes_nothing(db, fold_now):
    e = await post(db, capture(1))
    before = await _state(db)
    async with db.transaction():
        again = await ledger.post_entry(db, capture(1), fold_now=fold_now)
    assert (again.id, again.replayed) == (e.id, True)
    assert await _state(db) == before
    with pytest.raises(ledger.IdempotencyConflict):
        await post(db, capture(1, amount=7))
    assert await _state(db) == before


async def test_an_account_posted_against_itself_gets_both_sides_once(db):
    draft = EntryDraft(kind="transfer", description="to itself", effective_at=T0,
                       postings=(Posting(account=REVENUE, side="credit", amount=300, currency="KHR"),
                                 Posting(account=REVENUE, side="debit", amount=300, currency="KHR")))
    async with db.transaction():
        await ledger.post_entry(db, draft, fold_now=True)
    row = await db.fetchrow("SELECT b.debits, b.credits, b.postings FROM ledger_balances b "
                            "JOIN ledger_accounts a ON a.id = b.account_id WHERE a.code = $1", REVENUE)
    assert dict(row) == {"debits": 300, "credits": 300, "postings": 2}
    assert (await ledger.verify(db)).ok


async def test_fold_now_is_refused_beside_another_entry_of_the_transaction(db):
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="already written journal entries"):
        async with db.transaction():
            await ledger.post_entry(db, capture(1))
            await ledger.post_entry(db, capture(2), fold_now=True)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
