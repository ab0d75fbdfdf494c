"""The ledger against a real PostgreSQL: posting, idempotency, reversal, immutability, sealing, verification."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ledger
from ledger import EntryDraft, entries
from ledger.postings import MAX_AMOUNT
from paysvc.db import connect
from tests.conftest import TEST_PII_KEYS

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
CLEARING, REVENUE = "provider:sandbox:clearing:KHR", "agency:MOI:revenue:KHR"


def capture(n: int, amount: int = 50_000, at: datetime = T0, *, provider: str = "sandbox",
            agency: str = "MOI") -> EntryDraft:
    return entries.payment_captured(provider=provider, agency=agency, amount=amount, currency="KHR",
                                    effective_at=at, invoice_id=f"inv_{n}", payment_id=f"pay_{n}")


async def seal_everything(conn, timeout: float = 20.0) -> int:
    """Seal until every committed entry is sealed. The sealer waits for every older transaction in the
    cluster to end, and other databases on a shared test server keep some open briefly: retry."""
    deadline = asyncio.get_running_loop().time() + timeout
    total = 0
    while True:
        total += await ledger.seal_all(conn)
        if not await conn.fetchval("SELECT count(*) FROM ledger_entries e WHERE NOT EXISTS "
                                   "(SELECT 1 FROM ledger_seals s WHERE s.entry_id = e.id)"):
            return total
        assert asyncio.get_running_loop().time() < deadline, "entries left unsealed"
        await asyncio.sleep(0.05)


async def post(db, draft):
    async with db.transaction():
        return await ledger.post_entry(db, draft)


async def _account_ids(db) -> list[int]:
    """The ids of the accounts capture() posts to: its provider's clearing and its agency's revenue."""
    return [await db.fetchval("SELECT id FROM ledger_accounts WHERE code = $1", c) for c in (CLEARING, REVENUE)]


async def test_posting_creates_accounts_and_keeps_balances(db):
    e = await post(db, capture(1))
    await post(db, capture(2, 20_000, T0 + timedelta(hours=1)))
    assert e.id > 0 and e.seal_position is None
    assert await ledger.balance(db, CLEARING) == 70_000
    assert await ledger.balance(db, REVENUE) == 70_000  # credit-normal: positive
    assert await ledger.balance(db, REVENUE, as_of=T0 + timedelta(minutes=30)) == 50_000
    acct = await ledger.get_account(db, CLEARING)
    assert (acct.type, acct.currency, acct.debits, acct.credits) == ("asset", "KHR", 70_000, 0)
    tb = await ledger.trial_balance(db)
    assert tb.balanced and tb.totals[0].debits == tb.totals[0].credits == 70_000
    tb_then = await ledger.trial_balance(db, as_of=T0)
    assert tb_then.totals[0].debits == 50_000
    with pytest.raises(ledger.AccountNotFound):
        await ledger.balance(db, "agency:MEF:revenue:KHR")


async def test_same_idempotency_key_returns_the_first_entry_and_writes_nothing(db):
    first = await post(db, capture(1))
    # A retry may word or time the entry anew: the first's description and time stay.
    retry = capture(1, at=T0 + timedelta(minutes=5)).model_copy(update={"description": "retried"})
    again = await post(db, retry)
    assert again.replayed and again.id == first.id and again.postings[0].amount == 50_000
    assert (again.description, again.effective_at) == (first.description, first.effective_at)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert await ledger.balance(db, CLEARING) == 50_000
    batch = [capture(2), capture(2), capture(3)]  # a key repeated inside one batch
    async with db.transaction():
        posted = await ledger.post_entries(db, batch)
    assert [x.replayed for x in posted] == [False, True, False] and posted[0].id == posted[1].id
    assert await ledger.balance(db, CLEARING) == 150_000


@pytest.mark.parametrize("fold_now", [False, True])
@pytest.mark.parametrize("change", ["amount", "account", "invoice", "kind"])
async def test_a_key_used_again_for_other_money_is_refused_not_dropped(db, change, fold_now):
    # A key already used by an entry that books something else: the draft is refused, naming that entry.
    first = await post(db, capture(1))
    other = {"amount": capture(1, amount=999),
             "account": capture(1, agency="MEF"),
             "invoice": capture(1).model_copy(update={"invoice_id": "inv_2"}),
             "kind": capture(1).model_copy(update={"kind": "refund"})}[change]
    with pytest.raises(ledger.IdempotencyConflict, match=f"journal entry {first.id}") as refused:
        async with db.transaction():
            await ledger.post_entry(db, other, fold_now=fold_now)
    assert refused.value.code == "idempotency-conflict" and "payment.captured:pay_1" in str(refused.value)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert await ledger.balance(db, CLEARING) == 50_000


async def test_a_key_used_twice_in_one_batch_for_other_money_refuses_the_batch(db):
    with pytest.raises(ledger.IdempotencyConflict, match="other postings"):
        async with db.transaction():
            await ledger.post_entries(db, [capture(1), capture(2), capture(1, amount=7)])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_a_reversal_key_replays_that_reversal_and_refuses_another_entrys(db):
    a, b = await post(db, capture(1)), await post(db, capture(2))
    async with db.transaction():
        undo = await ledger.reverse_entry(db, a.id, description="undo", effective_at=T0, idempotency_key="undo-1")
    async with db.transaction():  # retried later: the same reversal, stamped anew
        again = await ledger.reverse_entry(db, a.id, description="undo again", effective_at=T0 + timedelta(hours=1),
                                           idempotency_key="undo-1")
    assert again.replayed and again.id == undo.id
    with pytest.raises(ledger.IdempotencyConflict, match=f"reverses {a.id}, not {b.id}"):
        async with db.transaction():
            await ledger.reverse_entry(db, b.id, description="undo", effective_at=T0, idempotency_key="undo-1")
    assert await ledger.balance(db, CLEARING) == 50_000  # b stands


async def test_concurrent_posts_of_one_key_for_other_money_write_one_and_refuse_the_rest(db_dsn):
    async def one(amount: int):
        async with connect(db_dsn) as c:
            return await post(c, capture(7, amount=amount))
    results = await asyncio.gather(*(one(1000 + i % 2) for i in range(8)), return_exceptions=True)
    won = [r for r in results if isinstance(r, ledger.PostedEntry) and not r.replayed]
    assert len(won) == 1
    for r in results:  # the same amount as the winner's is a replay, the other amount is refused
        if isinstance(r, ledger.PostedEntry):
            assert r.id == won[0].id and r.postings[0].amount == won[0].postings[0].amount
        else:
            assert isinstance(r, ledger.IdempotencyConflict), r
    assert sum(isinstance(r, ledger.IdempotencyConflict) for r in results) == 4
    async with connect(db_dsn) as c:
        assert await ledger.balance(c, CLEARING) == won[0].postings[0].amount


async def test_concurrent_posts_with_one_key_write_once(db_dsn):
    async def one():
        async with connect(db_dsn) as c:
            return await post(c, capture(7))
    results = await asyncio.gather(*(one() for _ in range(8)))
    assert len({r.id for r in results}) == 1 and sum(not r.replayed for r in results) == 1
    async with connect(db_dsn) as c:
        assert await ledger.balance(c, CLEARING) == 50_000


async def test_an_entry_is_reversed_once(db):
    e = await post(db, capture(1))
    async with db.transaction():
        r = await ledger.reverse_entry(db, e.id, description="posted in error", effective_at=T0)
    assert r.reverses == e.id and [x.side for x in r.postings] == ["credit", "debit"]
    assert await ledger.balance(db, CLEARING) == 0
    with pytest.raises(ledger.AlreadyReversed):
        async with db.transaction():
            await ledger.reverse_entry(db, e.id, description="again", effective_at=T0)
    with pytest.raises(ledger.EntryNotFound):
        await ledger.reverse_entry(db, 999_999, description="none", effective_at=T0)
    # the database itself refuses a second reversal written by hand
    raw = ledger.reversal_draft(e, description="raw", effective_at=T0)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO ledger_entries (kind, description, effective_at, reverses, content_hash) "
                         "VALUES ('reversal', 'raw', now(), $1, $2)", raw.reverses, bytes(32))


async def test_journal_rows_cannot_be_updated_or_deleted_even_by_the_owner(db):
    e = await post(db, capture(1))
    for sql in ("UPDATE ledger_postings SET amount = 1 WHERE entry_id = $1",
                "DELETE FROM ledger_postings WHERE entry_id = $1",
                "UPDATE ledger_entries SET description = 'x' WHERE id = $1",
                "DELETE FROM ledger_entries WHERE id = $1"):
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await db.execute(sql, e.id)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await db.execute("TRUNCATE ledger_postings, ledger_entries CASCADE")
    assert await ledger.balance(db, CLEARING) == 50_000


async def test_the_service_role_may_append_but_not_rewrite(db):
    e = await post(db, capture(1))
    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        await ledger.post_entry(db, capture(2))  # the role can post
    for sql in ("UPDATE ledger_postings SET amount = 1 WHERE entry_id = $1",
                "DELETE FROM ledger_entries WHERE id = $1",
                "UPDATE ledger_balance_slots SET debits = 0 WHERE account_id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE paysvc_app")
                await db.execute(sql, e.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("TRUNCATE ledger_postings")
    assert await ledger.balance(db, CLEARING) == 100_000


async def raw_entry(db, postings: list[tuple[str, str, int, str]]) -> None:
    """Write an entry bypassing Python, as a careless script would."""
    async with db.transaction():
        await db.execute("INSERT INTO ledger_accounts (code, type, currency, normal_side) VALUES "
                         "($1, 'asset', 'KHR', 'debit'), ($2, 'revenue', 'KHR', 'credit'), "
                         "($3, 'revenue', 'USD', 'credit') ON CONFLICT DO NOTHING",
                         CLEARING, REVENUE, "agency:MOI:revenue:USD")
    async with db.transaction():
        eid = await db.fetchval("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                                "posting_count) VALUES ('raw', 'by hand', now(), $1, $2) RETURNING id",
                                bytes(32), len(postings))
        for line, (code, side, amount, cur) in enumerate(postings, start=1):
            await db.execute(
                "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                "SELECT $1, $2, id, $3, $4, $5 FROM ledger_accounts WHERE code = $6", eid, line, side, amount, cur,
                code)


async def test_the_database_refuses_an_unbalanced_entry_at_commit(db):
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        await raw_entry(db, [(CLEARING, "debit", 100, "KHR"), (REVENUE, "credit", 99, "KHR")])
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        await raw_entry(db, [(CLEARING, "debit", 100, "KHR")])
    await raw_entry(db, [(CLEARING, "debit", 100, "KHR"), (REVENUE, "credit", 100, "KHR")])  # balanced: fine
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1


async def test_the_database_refuses_a_posting_in_another_currency_than_its_account(db):
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await raw_entry(db, [(CLEARING, "debit", 100, "USD"), ("agency:MOI:revenue:USD", "credit", 100, "USD")])
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO ledger_accounts (code, type, currency, normal_side) "
                         "VALUES ('wallet:x:KHR', 'asset', 'KHR', 'debit')")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO ledger_accounts (code, type, currency, normal_side) "
                         "VALUES ('agency:MOI:revenue:KHR', 'revenue', 'USD', 'credit')")


@pytest.mark.parametrize("column, value", [
    ("kind", "Payment"), ("kind", ""), ("kind", "p" * 65), ("kind", "pay ment"), ("kind", "1pay"),
    ("description", "d" * 501), ("idempotency_key", ""), ("idempotency_key", "k" * 256), ("invoice_id", ""),
    ("invoice_id", "i" * 101), ("payment_id", ""), ("settlement_id", "s" * 101), ("content_hash", bytes(31)),
])
async def test_the_database_refuses_an_entry_whose_text_or_hash_breaks_the_rules(db, column, value):
    # Held by domains since migration 0024 (a table CHECK before): whoever writes the row, by hand here.
    good = {"kind": "raw", "description": "by hand", "content_hash": bytes(32)}
    row = {**good, column: value}
    cols = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    insert = "INSERT INTO ledger_entries ({}, effective_at, posting_count) VALUES ({}, now(), 0) RETURNING id"
    tx = db.transaction()
    await tx.start()
    try:
        # the same row with only good values is let in (rolled back below, before the commit-time check)
        assert await db.fetchval(insert.format(", ".join(good), "$1, $2, $3"), *good.values())
        with pytest.raises(asyncpg.CheckViolationError):
            await db.fetchval(insert.format(cols, params), *row.values())
    finally:
        await tx.rollback()


async def test_the_database_refuses_an_entry_that_reverses_itself(db):
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO ledger_entries (id, kind, description, effective_at, content_hash, reverses, "
                         "posting_count) VALUES (424242, 'raw', 'x', now(), $1, 424242, 2)", bytes(32))


async def test_two_entries_cannot_reverse_each_other(db):
    """Found by review: one INSERT of entries 3 and 4, each of kind reversal naming the other, with mirrored
    postings, committed as the service role (the foreign key is checked at the statement's end and each mirrored
    the other), so neither was an original. An entry reverses an earlier one (migration 0035)."""
    await post(db, capture(1))
    with pytest.raises(asyncpg.CheckViolationError) as err:
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("INSERT INTO ledger_entries (id, kind, description, effective_at, content_hash, reverses, "
                             "posting_count) VALUES (900003, 'reversal', 'x', now(), $1, 900004, 2), "
                             "(900004, 'reversal', 'y', now(), $1, 900003, 2)", bytes(32))
    assert err.value.constraint_name == "ledger_entries_reverses_an_earlier_entry"
    assert (await ledger.verify(db)).ok


@pytest.mark.parametrize("when", ["infinity", "-infinity", "10000-01-01 00:00+00", "4000-01-01 00:00+00 BC",
                                  "0001-01-01 12:00+00", "9999-12-31 12:00+00"])
async def test_an_entry_dated_where_no_reader_can_follow_is_refused(db, when):
    """Found by review: an entry dated 'infinity' or past year 9999 committed as the service role, and then
    paysvc ledger verify stopped with a traceback instead of reporting, and every page of entries holding it
    answered 400. Effective times are real instants from 0001-01-02 to 9999-12-30 (UTC; migration 0035)."""
    with pytest.raises(asyncpg.CheckViolationError) as err:
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                             "posting_count) VALUES ('raw', 'x', $2::text::timestamptz, $1, 2)", bytes(32), when)
    assert err.value.constraint_name == "ledger_entries_effective_at_in_range"


async def test_postings_cannot_be_added_to_a_committed_entry(db):
    e = await post(db, capture(1))
    with pytest.raises(asyncpg.CheckViolationError, match="transaction that writes their entry"):
        await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                         "SELECT $1, 3, id, 'debit', 5, 'KHR' FROM ledger_accounts WHERE code = $2", e.id, CLEARING)


async def test_sealer_chains_committed_entries_and_never_skips_a_late_commit(db, db_dsn):
    first = await post(db, capture(1))
    async with connect(db_dsn) as slow:
        tx = slow.transaction()
        await tx.start()
        other = entries.payment_captured(provider="bakong", agency="MEF", amount=5, currency="KHR",
                                         effective_at=T0, invoice_id="inv_2", payment_id="pay_2")
        late = await ledger.post_entry(slow, other)  # written, not committed yet (other accounts: no wait)
        after = await post(db, capture(3))  # commits before the earlier-started one
        assert late.id < after.id
        for _ in range(20):  # only the first can be sealed: the later ones wait for the open transaction
            await ledger.seal_all(db)
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT array_agg(entry_id) FROM ledger_seals") in (None, [first.id])
        await tx.commit()
    await seal_everything(db)
    got = await ledger.get_entries(db, [first.id, late.id, after.id])
    assert sorted(g.seal_position for g in got.values()) == [1, 2, 3]
    assert got[first.id].seal_position == 1
    report = await ledger.verify(db)
    assert report.ok and report.sealed == 3 and report.unsealed == 0


async def test_two_sealers_do_not_fork_the_chain(db_dsn):
    async with connect(db_dsn) as c:
        async with c.transaction():
            await ledger.post_entries(c, [capture(n) for n in range(200)])

    async def sealer():
        async with connect(db_dsn) as c:
            return await ledger.seal_all(c, batch=7)
    counts = await asyncio.gather(*(sealer() for _ in range(4)))
    async with connect(db_dsn) as c:
        await seal_everything(c)
        assert await c.fetchval("SELECT count(*) FROM ledger_seals") == 200
        assert await c.fetchval("SELECT max(position) FROM ledger_seals") == 200
        assert (await ledger.verify(c)).ok
    assert sum(counts) <= 200


async def tamper(db_dsn, sql: str, *args) -> None:
    """Change a row behind the ledger's back, as a superuser who switches the triggers off."""
    async with connect(db_dsn) as c:
        async with c.transaction():
            await c.execute("SET LOCAL session_replication_role = replica")
            await c.execute(sql, *args)


@pytest.mark.parametrize("change, said", [
    ("currency = 'USD'", "currency USD where its code says KHR"),
    ("normal_side = 'debit'", "normal_side debit where its code says credit"),
    ("type = 'liability'", "type liability where its code says revenue"),
])
async def test_verify_finds_an_account_changed_behind_the_ledgers_back(db, db_dsn, change, said):
    """Found by review: account rows are in no hash, and verify passed after an account's currency (or normal
    side, or type) was changed as a superuser, though the trial balance then no longer balanced per currency.
    Each account is now checked against its code, and each posting's currency against its account's."""
    posted = [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    assert (await ledger.verify(db)).ok
    async with connect(db_dsn) as c:
        async with c.transaction():
            for name in await c.fetch("SELECT conname FROM pg_constraint WHERE conrelid = 'ledger_accounts'::regclass "
                                      "AND contype = 'c'"):
                await c.execute(f'ALTER TABLE ledger_accounts DROP CONSTRAINT "{name["conname"]}"')
            await c.execute("SET LOCAL session_replication_role = replica")
            await c.execute(f"UPDATE ledger_accounts SET {change} WHERE code = $1", REVENUE)
    report = await ledger.verify(db)
    assert not report.ok
    assert [(a.account, a.problem) for a in report.account_problems] == [(REVENUE, said)]
    if "currency" in change:  # and every posting to it, under its own entry, in chain order
        assert [(p.entry_id, p.problem) for p in report.entry_problems] == [
            (e.id, f"posting line 2 is in KHR, but its account {REVENUE} holds USD") for e in posted]
        assert report.first_bad_entry == posted[0].id


async def test_verify_names_the_entry_whose_posting_was_edited(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    assert (await ledger.verify(db)).ok
    victim = posted[2]
    await tamper(db_dsn, "UPDATE ledger_postings SET amount = amount + 1000 WHERE entry_id = $1 AND line = 1",
                 victim.id)
    report = await ledger.verify(db)
    assert not report.ok and report.first_bad_entry == victim.id
    assert {p.entry_id for p in report.entry_problems} == {victim.id}
    assert {m.account for m in report.balance_mismatches} == {CLEARING}


async def test_verify_detects_a_rewritten_seal_and_an_edited_unsealed_entry(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    unsealed = await post(db, capture(9))
    await tamper(db_dsn, "UPDATE ledger_entries SET description = 'nothing to see' WHERE id = $1", unsealed.id)
    await tamper(db_dsn, "UPDATE ledger_seals SET chain_hash = $2 WHERE entry_id = $1", posted[1].id, bytes(32))
    report = await ledger.verify(db)
    bad = [p.entry_id for p in report.entry_problems]
    assert report.first_bad_entry == posted[1].id
    assert posted[2].id in bad  # its link to the forged seal no longer holds
    assert unsealed.id in bad


def run_cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PAYSVC_DATABASE_URL=dsn, PAYSVC_PII_KEYS=TEST_PII_KEYS)
    return subprocess.run([sys.executable, "-m", "paysvc", "ledger", *args], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=60)


async def test_cli_seal_and_verify_exit_codes(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(3)]
    # The sealer waits for every older transaction on the database server to end (not only this database's): on
    # a server shared with other work (a second test run, say) a pass can seal none yet, so seal until all three
    sealed, deadline = 0, asyncio.get_running_loop().time() + 60
    while sealed < 3:
        done = await asyncio.to_thread(run_cli, db_dsn, "seal")
        assert done.returncode == 0, done.stderr
        sealed += int(re.fullmatch(r"sealed (\d+) journal entries\n", done.stdout).group(1))
        assert asyncio.get_running_loop().time() < deadline, "entries not sealed within 60 s"
        if sealed < 3:
            await asyncio.sleep(0.5)
    assert sealed == 3
    ok = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    await tamper(db_dsn, "UPDATE ledger_postings SET amount = 1 WHERE entry_id = $1", posted[1].id)
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {posted[1].id}" in bad.stdout


async def test_an_entry_cannot_claim_another_transactions_id(db):
    # An entry written with an old transaction's txid would escape the commit-time balance check, which
    # finds this transaction's entries by txid; the database refuses to commit it, alone or beside a
    # balanced entry posted in the same transaction (which the balance check alone would let through).
    old = await db.fetchval("SELECT pg_current_xact_id()::text")
    forge = ("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, txid) "
             "VALUES ('raw', 'forged', now(), $1, $2::text::xid8)")
    with pytest.raises(asyncpg.CheckViolationError, match="txid must be the writing transaction's"):
        await db.execute(forge, bytes(32), old)
    for forged_first in (False, True):
        with pytest.raises(asyncpg.CheckViolationError, match="txid must be the writing transaction's"):
            async with db.transaction():
                if forged_first:
                    await db.execute(forge, bytes(32), old)
                await ledger.post_entry(db, capture(1))
                if not forged_first:
                    await db.execute(forge, bytes(32), old)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
    assert await db.fetchval("SELECT count(*) FROM ledger_balance_slots") == 0


async def test_an_entry_written_below_a_folded_round_is_checked_and_folded_on_its_own(db):
    # After SET CONSTRAINTS ... IMMEDIATE folded this transaction's entries, an entry inserted with a lower
    # explicit id is still checked and folded by its own firing at commit.
    await post(db, capture(0))
    debit, credit = await _account_ids(db)
    for postings, ok in ((0, False), (2, True)):
        async def write():
            async with db.transaction():
                below = await db.fetchval("SELECT nextval('ledger_entries_id_seq')")
                await ledger.post_entry(db, capture(1))
                await ledger.fold_pending(db)
                await db.execute("INSERT INTO ledger_entries (id, kind, description, effective_at, content_hash, "
                                 "posting_count) VALUES ($1, 'raw', 'below', now(), $2, 2)", below, bytes(32))
                if postings:
                    await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                                     "VALUES ($1, 1, $2, 'debit', 5, 'KHR'), ($1, 2, $3, 'credit', 5, 'KHR')",
                                     below, debit, credit)
        if ok:
            await write()
        else:
            with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
                await write()
    assert await ledger.balance(db, CLEARING) == 100_005
    assert not (await ledger.verify(db)).balance_mismatches  # (its hash is made up: only balances are compared)


async def test_the_database_accepts_every_kind_the_rule_allows(db):
    for kind in ("payment.captured", "a", "x" * 64, "settlement_2-b.c", "z9"):
        tx = db.transaction()
        await tx.start()
        try:  # the CHECK runs at INSERT; rolled back before the commit-time balance check
            await db.execute("INSERT INTO ledger_entries (kind, description, effective_at, content_hash) "
                             "VALUES ($1, 'k', now(), $2)", kind, bytes(32))
        finally:
            await tx.rollback()


async def test_an_entry_kind_outside_the_rule_is_refused_by_the_database(db):
    for kind in ("", "Payment", "1st", "a" * 65, "pay ment", "paiement\u00e9", "a/b", "ក"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute("INSERT INTO ledger_entries (kind, description, effective_at, content_hash) "
                             "VALUES ($1, 'k', now(), $2)", kind, bytes(32))


async def test_an_unbalanced_entry_cannot_commit_whatever_the_session_sets(db):
    # The commit-time check remembers what it checked in a session setting; a session that sets it itself
    # must not get an unbalanced entry through.
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with db.transaction():
            entry = await db.fetchval("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                                      "posting_count) VALUES ('raw', 'forged mark', now(), $1, 2) RETURNING id",
                                      bytes(32))
            await ledger.post_entry(db, capture(1))  # creates the two accounts
            ids = await _account_ids(db)
            await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                             "VALUES ($1, 1, $2, 'debit', 1000, 'KHR'), ($1, 2, $3, 'credit', 1, 'KHR')",
                             entry, *ids)
            await db.execute("SET LOCAL ledger.balanced_upto = '9223372036854775807'")
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_an_entry_slipped_into_a_gap_of_a_checked_window_is_refused(db):
    # Ids of a transaction's window need not be consecutive (a concurrent writer or a replayed draft takes
    # some); an entry written later by hand into such a gap is checked on its own at commit.
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with db.transaction():
            await ledger.post_entry(db, capture(1))
            gap = await db.fetchval("SELECT nextval('ledger_entries_id_seq')")
            await ledger.post_entry(db, capture(2))
            await ledger.fold_pending(db)  # checks the window around the gap
            await db.execute("INSERT INTO ledger_entries (id, kind, description, effective_at, content_hash) "
                             "VALUES ($1, 'raw', 'in the gap', now(), $2)", gap, bytes(32))
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_a_writer_waiting_for_a_new_account_holds_no_idempotency_key(db_dsn):
    # T2 creates an account in an open transaction; T1 posts key K1 on that account and waits for it;
    # T2 then posts K1 too. T1 must not hold K1 while it waits, or the two deadlock.
    def keyed(agency: str, key: str) -> EntryDraft:
        return capture(0, agency=agency).model_copy(update={"idempotency_key": key})

    t1, t2 = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        await ledger.post_entry(t1, keyed("OLD", "warm-up"))  # the provider's account exists
        tx1, tx2 = t1.transaction(), t2.transaction()
        await tx1.start()
        await tx2.start()
        await ledger.post_entry(t2, keyed("NEW", "t2-first"))  # agency NEW's account, not committed
        first = asyncio.create_task(ledger.post_entry(t1, keyed("NEW", "K1")))
        await asyncio.sleep(0.5)
        assert not first.done()  # waiting for T2's account
        second = await asyncio.wait_for(ledger.post_entry(t2, keyed("NEW", "K1")), 10)
        await tx2.commit()
        replay = await asyncio.wait_for(first, 10)
        await tx1.commit()
        assert not second.replayed and replay.replayed and replay.id == second.id
    finally:
        await t1.close()
        await t2.close()


async def test_a_temporary_table_cannot_stand_in_for_the_journal(db):
    # The commit-time check runs as the ledger's owner; a TEMP TABLE named like the journal's postings,
    # made by the service's role, must not be what it reads (the session's temporary schema comes first in
    # a search_path that does not name it).
    await post(db, capture(0))
    debit, credit = await _account_ids(db)
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("CREATE TEMP TABLE ledger_postings (entry_id bigint, line smallint, account_id bigint, "
                             "side text, amount bigint, currency text)")
            e = await db.fetchval("INSERT INTO public.ledger_entries (kind, description, effective_at, content_hash, "
                                  "posting_count) VALUES ('raw', 'one-sided', now(), $1, 2) RETURNING id", bytes(32))
            await db.execute("INSERT INTO public.ledger_postings (entry_id, line, account_id, side, amount, currency) "
                             "VALUES ($1, 1, $2, 'debit', 1000000, 'KHR')", e, debit)
            await db.execute("INSERT INTO pg_temp.ledger_postings VALUES ($1, 1, $2, 'debit', 5, 'KHR'), "
                             "($1, 2, $3, 'credit', 5, 'KHR')", e, debit, credit)
    assert await db.fetchval("SELECT count(*) FROM public.ledger_entries") == 1
    assert (await ledger.trial_balance(db)).balanced


@pytest.mark.parametrize("line, error", [
    (3, asyncpg.CheckViolationError),   # beyond the two postings the entry declares
    (2, asyncpg.UniqueViolationError),  # a line the entry already has
])
async def test_postings_cannot_be_added_to_a_checked_entry_whatever_the_session_sets(db, line, error):
    # Once an entry's commit-time check has run (here early, by fold_pending), no posting may join it: the
    # check will not run again. The check found exactly the postings the entry declares, so every line it
    # may have is taken, whatever the session sets the mark of checked entries to.
    await post(db, capture(0))
    debit, _ = await _account_ids(db)
    with pytest.raises(error):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            e = await ledger.post_entry(db, capture(1))
            await ledger.fold_pending(db)
            await db.execute("SET LOCAL ledger.balanced_upto = '0'")
            await db.execute("SET LOCAL ledger.balanced_from = '0'")
            await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                             "VALUES ($1, $2, $3, 'debit', 7, 'KHR')", e.id, line, debit)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert (await ledger.trial_balance(db)).balanced


async def test_an_entry_must_have_exactly_the_postings_it_declares(db):
    # Without Python: an entry declares its number of postings; fewer (even balanced) or more are refused.
    await post(db, capture(0))
    debit, credit = await _account_ids(db)

    async def write(declared, lines):
        async with db.transaction():
            e = await db.fetchval("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                                  "posting_count) VALUES ('raw', 'declared', now(), $1, $2) RETURNING id",
                                  bytes(32), declared)
            for line in lines:
                await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                                 "VALUES ($1, $2, $3, $4, 10, 'KHR')", e, line, debit if line % 2 else credit,
                                 "debit" if line % 2 else "credit")

    with pytest.raises(asyncpg.CheckViolationError, match="has 2 postings but declares 4"):
        await write(4, [1, 2])
    with pytest.raises(asyncpg.CheckViolationError, match="declares 2 postings"):
        await write(2, [1, 2, 3, 4])
    with pytest.raises(asyncpg.CheckViolationError, match="declares no postings"):
        await write(None, [1, 2])
    await write(4, [1, 2, 3, 4])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 2
    assert await ledger.balance(db, CLEARING) == 50_000 + 20


@pytest.mark.parametrize("forged, before_second", [
    ("0", True),                     # lower, before the second entry: the first must not be folded again
    ("9223372036854775807", False),  # higher, after it: the second must still be folded
    ("9223372036854775807", True),   # higher, before it
])
async def test_balances_stay_equal_to_postings_whatever_the_session_sets(db, forged, before_second):
    # The mark only spares later firings the locking step; each entry's own firing checks and folds it once.
    async def forge() -> None:
        await db.execute(f"SET LOCAL ledger.balanced_upto = '{forged}'")
        await db.execute(f"SET LOCAL ledger.balanced_from = '{forged}'")

    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        await ledger.post_entry(db, capture(1))
        await ledger.fold_pending(db)
        if before_second:
            await forge()
        await ledger.post_entry(db, capture(2, 20_000))
        if not before_second:
            await forge()
    assert await ledger.balance(db, CLEARING) == 70_000
    assert await ledger.balance(db, REVENUE) == 70_000
    assert (await ledger.verify(db)).ok


async def test_folding_in_several_windows_folds_each_entry_once(db):
    # The legitimate pattern the guard above must allow: fold early, post more, fold again, on the same
    # accounts and on new ones, with a savepoint rolled back in between.
    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        await ledger.post_entry(db, capture(1))
        await ledger.fold_pending(db)
        await ledger.post_entry(db, capture(2, 20_000))
        await ledger.fold_pending(db)
        try:
            async with db.transaction():
                await ledger.post_entry(db, capture(3, 5_000))
                await ledger.fold_pending(db)
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
        await ledger.post_entry(db, capture(4, 1_000, agency="MEF"))
        await ledger.post_entry(db, capture(5, 3_000))
    assert await ledger.balance(db, CLEARING) == 74_000
    assert await ledger.balance(db, REVENUE) == 73_000
    assert await ledger.balance(db, "agency:MEF:revenue:KHR") == 1_000
    assert (await ledger.verify(db)).ok


async def test_concurrent_serializable_writers_both_commit(db_dsn):
    # Two SERIALIZABLE transactions posting to different accounts at the same time both commit: whatever
    # keeps the commit-time fold's state must not make them conflict (a shared table of marks did).
    def on(agency: str, n: int) -> EntryDraft:
        return capture(n, provider=agency.lower(), agency=agency)

    c1, c2 = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        await ledger.post_entry(c1, on("AAA", 0))
        await ledger.post_entry(c2, on("BBB", 100))
        failures = 0
        for n in range(1, 11):
            t1, t2 = c1.transaction(isolation="serializable"), c2.transaction(isolation="serializable")
            await t1.start()
            await t2.start()
            await asyncio.wait_for(ledger.post_entry(c1, on("AAA", n)), 10)
            await asyncio.wait_for(ledger.post_entry(c2, on("BBB", 100 + n)), 10)
            for c, t in ((c1, t1), (c2, t2)):
                try:
                    await asyncio.wait_for(t.commit(), 10)
                except asyncpg.SerializationError:
                    failures += 1
                    await t.rollback()
        assert failures == 0
        assert await ledger.balance(c1, "agency:AAA:revenue:KHR") == 11 * 50_000
    finally:
        await c1.close()
        await c2.close()


async def test_the_ledger_post_of_before_posting_counts_still_posts(db):
    # Code from before migration 0023 calls ledger_post without posting counts (a rolling deploy runs it
    # beside the new code); the old signature counts each entry's postings itself.
    rows = await db.fetch(
        "SELECT * FROM ledger_post(ARRAY['raw', 'raw'], ARRAY['old', 'old'], ARRAY[now(), now()], "
        "ARRAY[NULL, 'old-code-key'], ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[], "
        "ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::bigint[], ARRAY[$1, $1]::bytea[], "
        "ARRAY[1, 1, 2, 2, 2], ARRAY[1, 2, 1, 2, 3]::smallint[], "
        "ARRAY[$2, $3, $2, $3, $3], ARRAY['debit', 'credit', 'debit', 'credit', 'credit'], "
        "ARRAY[10, 10, 30, 20, 10]::bigint[], ARRAY['KHR', 'KHR', 'KHR', 'KHR', 'KHR'], "
        "ARRAY[$2, $3], ARRAY['asset', 'revenue'], ARRAY['KHR', 'KHR'])", bytes(32), CLEARING, REVENUE)
    assert [r["o_status"] for r in rows] == ["posted", "posted"]
    counts = await db.fetch("SELECT posting_count FROM ledger_entries ORDER BY id")
    assert [r["posting_count"] for r in counts] == [2, 3]
    assert await ledger.balance(db, CLEARING) == 40 and await ledger.balance(db, REVENUE) == 40


async def test_fold_now_checks_and_folds_in_the_posting_statement(db):
    # The balances are there before the commit, and nothing is folded again at commit.
    async with db.transaction():
        posted = await ledger.post_entries(db, [capture(1), capture(2, 20_000)], fold_now=True)
        assert await ledger.balance(db, CLEARING) == 70_000  # without fold_pending
        assert await db.fetchval("SELECT bool_and(folded) FROM ledger_entries") is True
    assert [p.id for p in posted] == sorted(p.id for p in posted)
    assert await ledger.balance(db, CLEARING) == 70_000 and await ledger.balance(db, REVENUE) == 70_000
    assert (await ledger.verify(db)).ok


async def test_fold_now_replays_an_idempotency_key_without_folding_again(db):
    keyed = capture(1).model_copy(update={"idempotency_key": "k-1"})
    first = await ledger.post_entry(db, keyed, fold_now=True)
    again = await ledger.post_entry(db, keyed, fold_now=True)
    assert again.replayed and again.id == first.id
    assert await ledger.balance(db, CLEARING) == 50_000


@pytest.mark.parametrize("fold_now_first", [True, False])
async def test_fold_now_must_be_the_transactions_only_posting(db, fold_now_first):
    # Rows locked by one posting and others by a later one could deadlock with another transaction doing
    # the same in the other order: a fold_now posting is a transaction's only one.
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="fold_now"):
        async with db.transaction():
            await ledger.post_entry(db, capture(1), fold_now=fold_now_first)
            await ledger.post_entry(db, capture(2), fold_now=not fold_now_first)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0
    assert await db.fetchval("SELECT count(*) FROM ledger_balance_slots") == 0


async def test_fold_now_refuses_what_the_commit_time_check_refuses(db):
    # Called directly, bypassing Python's checks: refused in the statement itself, not at commit.
    await post(db, capture(0))
    call = ("SELECT * FROM ledger_post(ARRAY['raw'], ARRAY['x'], ARRAY[now()], ARRAY[NULL::text], ARRAY[NULL::text], "
            "ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], ARRAY[$1::bytea], $2::smallint[], "
            "ARRAY[1, 1], ARRAY[1, 2]::smallint[], ARRAY[$3, $4], ARRAY['debit', 'credit'], $5::bigint[], "
            "ARRAY['KHR', 'KHR'], ARRAY[$3, $4], ARRAY['asset', 'revenue'], ARRAY['KHR', 'KHR'], true)")
    for declared, amounts, error in (([2], [100, 99], "does not balance"), ([3], [100, 100], "declares 3")):
        tx = db.transaction()
        await tx.start()
        try:  # inside an open transaction: the statement itself raises, before any commit
            with pytest.raises(asyncpg.CheckViolationError, match=error):
                await db.execute(call, bytes(32), declared, CLEARING, REVENUE, amounts)
        finally:
            await tx.rollback()
    await db.execute(call, bytes(32), [2], CLEARING, REVENUE, [100, 100])
    assert await ledger.balance(db, CLEARING) == 50_100


@pytest.mark.parametrize("counts, p_entry", [
    ("{2}", "{}"),           # an entry given no postings at all
    ("{2,2}", "{1,1}"),      # beside one that has its postings
    ("[0:1]={3,2}", "{1,1}"),  # counts indexed from 0: the check must use the count the entry is stored with
], ids=["alone", "in_a_batch", "counts_from_0"])
async def test_fold_now_checks_the_entries_it_wrote_not_its_arguments(db, counts, p_entry):
    # Found by review: the check once read the arguments, so an entry without postings skipped it and took
    # postings later, and counts given from index 0 were checked against another entry's.
    await post(db, capture(0))
    debit, _ = await _account_ids(db)
    n = len(counts.split("=")[-1].strip("{}").split(","))
    lines = [i + 1 for i in range(len(p_entry.strip("{}").split(",")))] if p_entry != "{}" else []
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            rows = await db.fetch(
                "SELECT * FROM ledger_post($1::text[], $1::text[], $2::timestamptz[], $3::text[], $3::text[], "
                "$3::text[], $3::text[], $4::bigint[], $5::bytea[], $6::text::smallint[], $7::text::int[], $8::smallint[], "
                "$9::text[], $10::text[], $11::bigint[], $12::text[], $9::text[], $13::text[], $12::text[], true)",
                ["raw"] * n, [T0] * n, [None] * n, [None] * n, [bytes(32)] * n, counts, p_entry, lines,
                [CLEARING, REVENUE][:len(lines)], ["debit", "credit"][:len(lines)], [5, 5][:len(lines)],
                ["KHR", "KHR"][:len(lines)], ["asset", "revenue"][:len(lines)])
            last = rows[-1]["o_id"]
            await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                             "VALUES ($1, 1, $2, 'debit', 1000000, 'KHR')", last, debit)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert (await ledger.verify(db)).ok


async def test_only_the_service_role_may_call_the_ledgers_owner_rights_function(db):
    # ledger_post runs as the ledger's owner: PUBLIC may not call it.
    sig = ("ledger_post(text[], text[], timestamptz[], text[], text[], text[], text[], bigint[], bytea[], "
           "smallint[], int[], smallint[], text[], text[], bigint[], text[], text[], text[], text[], boolean)")
    assert await db.fetchval("SELECT prosecdef FROM pg_proc WHERE oid = $1::regprocedure", sig)
    assert not await db.fetchval("SELECT has_function_privilege('public', $1, 'EXECUTE')", sig)
    assert await db.fetchval("SELECT has_function_privilege('paysvc_app', $1, 'EXECUTE')", sig)
    for trigger_function in ("ledger_check_posting()", "ledger_apply_balances()"):  # they fire without it
        assert not await db.fetchval("SELECT has_function_privilege('public', $1, 'EXECUTE')", trigger_function)
    # the shared check-and-fold would fold an entry again if anyone but the ledger's functions could call it
    for role in ("public", "paysvc_app"):
        assert not await db.fetchval("SELECT has_function_privilege($1, 'ledger_check_and_fold(bigint[])', "
                                     "'EXECUTE')", role)
        # nor the reversal check it runs first (migration 0025): it reads the journal as its caller
        assert not await db.fetchval("SELECT has_function_privilege($1, 'ledger_check_reversals(bigint[])', "
                                     "'EXECUTE')", role)


async def test_only_the_ledger_writes_an_entry_folded(db):
    # An entry written folded skips the commit-time check; the service's role cannot write one itself.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.execute("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                             "posting_count, folded) VALUES ('raw', 'folded?', now(), $1, 2, true)", bytes(32))
    async with db.transaction():  # every other column it may write
        await db.execute("SET LOCAL ROLE paysvc_app")
        await ledger.post_entry(db, capture(1), fold_now=True)
    assert await ledger.balance(db, CLEARING) == 50_000


async def test_no_posting_joins_an_entry_folded_at_once(db):
    await post(db, capture(0))
    debit, _ = await _account_ids(db)
    for line, error in ((3, asyncpg.CheckViolationError), (1, asyncpg.UniqueViolationError)):
        with pytest.raises(error):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE paysvc_app")
                e = await ledger.post_entry(db, capture(1), fold_now=True)
                await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                                 "VALUES ($1, $2, $3, 'debit', 7, 'KHR')", e.id, line, debit)
    assert (await ledger.trial_balance(db)).balanced and (await ledger.verify(db)).ok


_RAW_POST = ("SELECT * FROM ledger_post($1::text[], $1::text[], $2::timestamptz[], $17::text[], $3::text[], "
             "$3::text[], $3::text[], $4::bigint[], $5::bytea[], $6::text::smallint[], $7::int[], $8::int[]::smallint[], "
             "$9::text[], $10::text[], $11::bigint[], $12::text[], $13::text[], $14::text[], $15::text[], $16)")


async def _raw_post(db, *, counts="{2}", p_entry=(1, 1), lines=(1, 2), accounts=(CLEARING, REVENUE),
                    currencies=("KHR", "KHR"), keyed=False, fold_now=True):
    """ledger_post called directly, as the service's role, bypassing the library's checks."""
    n = len(counts.split("=")[-1].strip("{}").split(","))
    codes = sorted(set(accounts))
    types = ["asset" if c.startswith("provider:") else "revenue" for c in codes]
    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        return await db.fetch(
            _RAW_POST, ["raw"] * n, [T0] * n, [None] * n, [None] * n, [bytes(32)] * n, counts, list(p_entry),
            list(lines), list(accounts), ["debit", "credit"][:len(lines)], [5, 5][:len(lines)], list(currencies),
            codes, types, [c.rsplit(":", 1)[1] for c in codes], fold_now,
            [f"raw-{i}" for i in range(n)] if keyed else [None] * n)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
@pytest.mark.parametrize("case, error, message", [
    (dict(lines=(1, 3)), asyncpg.CheckViolationError, r"posting line 3 of journal entry \d+: the entry declares 2"),
    (dict(lines=(0, 2)), asyncpg.CheckViolationError, r"posting line 0 of journal entry \d+"),
    (dict(p_entry=(1, 2)), asyncpg.ForeignKeyViolationError, "names entry 2 of this call, which has 1 entries"),
    (dict(currencies=("KHR", "USD")), asyncpg.ForeignKeyViolationError,
     "posting to account agency:MOI:revenue:KHR in USD: no such account in that currency"),
    # counts indexed from 0: the line rule uses the count entry 1 is stored with (2), not the argument's [1] (5)
    (dict(counts="[0:1]={2,5}", p_entry=(1, 1), lines=(1, 5)), asyncpg.CheckViolationError,
     r"posting line 5 of journal entry \d+: the entry declares 2"),
], ids=["line_past_count", "line_0", "entry_not_in_call", "currency", "counts_from_0"])
async def test_ledger_post_writes_only_postings_that_keep_the_postings_rules(db, fold_now, keyed, case, error,
                                                                            message):
    # ledger_post's postings skip the postings trigger (migration 0031): it keeps the trigger's rules itself,
    # on every path, and says which posting broke which rule. Nothing is written.
    await post(db, capture(0))
    with pytest.raises(error, match=message):
        await _raw_post(db, fold_now=fold_now, keyed=keyed, **case)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert await db.fetchval("SELECT count(*) FROM ledger_postings") == 2
    assert (await ledger.verify(db)).ok


USD_REVENUE = "agency:MOI:revenue:USD"


@st.composite
def _single_entry_arguments(draw):
    """A valid single entry's posting arguments (2 or 3 postings, KHR or USD), then up to three changes that
    may break it: a side, an amount, a currency, an account, an entry number, a line, the count, a shorter
    argument."""
    khr = draw(st.booleans())
    credit = REVENUE if khr else USD_REVENUE
    amounts = draw(st.sampled_from([[500, 500], [500, 300, 200]]))
    rows = [[1, i + 1, CLEARING if i == 0 else credit, "debit" if i == 0 else "credit", a, "KHR" if khr else "USD"]
            for i, a in enumerate(amounts)]
    if not khr:  # the USD debit goes to the same USD account: a 2-posting USD entry on one account
        rows[0][2] = USD_REVENUE
    count = len(rows)
    trim = None
    for change in draw(st.lists(st.sampled_from(
            ["side", "amount", "currency", "account", "entry", "line", "count", "trim"]), max_size=3)):
        i = draw(st.integers(0, len(rows) - 1))
        if change == "side":
            rows[i][3] = draw(st.sampled_from(["debit", "credit", "Debit"]))
        elif change == "amount":
            rows[i][4] = draw(st.sampled_from([0, -500, 300, 499, 1000]))
        elif change == "currency":
            rows[i][5] = draw(st.sampled_from(["KHR", "USD"]))
        elif change == "account":
            rows[i][2] = draw(st.sampled_from([CLEARING, REVENUE, USD_REVENUE]))
        elif change == "entry":
            rows[i][0] = draw(st.sampled_from([0, 2, None]))
        elif change == "line":
            rows[i][1] = draw(st.sampled_from([0, 1, 2, 3, 4, None]))
        elif change == "count":
            count = draw(st.sampled_from([None, 0, 1, 2, 3, 4]))
        else:
            trim = draw(st.sampled_from(["p_entry", "p_line", "p_account", "p_side", "p_amount", "p_currency"]))
    return rows, count, trim


@given(_single_entry_arguments())
# the shapes the three comparisons must tell apart, whatever the generator draws
@example(([[1, 1, CLEARING, "debit", 500, "KHR"], [1, 2, REVENUE, "debit", 500, "KHR"]], 2, None))
@example(([[1, 1, CLEARING, "credit", 500, "KHR"], [1, 2, REVENUE, "credit", 500, "KHR"]], 2, None))
@example(([[1, 1, CLEARING, "debit", 500, "KHR"], [1, 2, USD_REVENUE, "credit", 500, "USD"]], 2, None))
@example(([[1, 1, CLEARING, "debit", 500, "KHR"], [1, 2, REVENUE, "credit", 499, "KHR"]], 2, None))
@example(([[1, 1, CLEARING, "debit", 500, "KHR"], [1, 2, REVENUE, "credit", 500, "KHR"]], 3, None))
@example(([[1, 1, CLEARING, "debit", 500, "KHR"], [1, 2, REVENUE, "credit", 500, "KHR"]], 2, "p_side"))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_single_entry_posted_with_fold_now_is_refused_exactly_when_the_commit_time_check_refuses_it(
        db_dsn, case):
    # Migration 0034 checks a single entry posted with fold_now against its arguments (two postings by three
    # comparisons) instead of through the rows it wrote. Whatever the arguments, it must accept and refuse
    # what the general path with the commit-time check does, with the same SQLSTATE and the same balances.
    asyncio.run(_compare_single_entry_paths(db_dsn, *case))


async def seed_khr_and_usd(conn) -> bool:
    """A capture in KHR and one in USD, once per database (a hypothesis test's examples share theirs); whether
    this call wrote them."""
    if await conn.fetchval("SELECT count(*) FROM ledger_accounts"):
        return False
    async with conn.transaction():
        await ledger.post_entry(conn, capture(0))
        await ledger.post_entry(conn, entries.payment_captured(
            provider="sandbox", agency="MOI", amount=100, currency="USD", effective_at=T0,
            invoice_id="inv_usd", payment_id="pay_usd"))
    return True


async def outcome_as_the_service(conn, call, observe) -> tuple:
    """What a posting call does as the service's role, in a transaction rolled back afterwards: ("done", what
    ``observe(rows)`` then reads, once the commit-time check has run) or ("refused", the error's SQLSTATE)."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SET LOCAL ROLE paysvc_app")
        rows = await call()
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the commit-time check, run now
        return ("done", await observe(rows))
    except asyncpg.PostgresError as exc:
        return ("refused", exc.sqlstate)
    finally:
        await tx.rollback()


async def _compare_single_entry_paths(dsn, postings, count, trim):
    conn = await asyncpg.connect(dsn)
    try:
        await seed_khr_and_usd(conn)
        args = {"p_entry": [p[0] for p in postings], "p_line": [p[1] for p in postings],
                "p_account": [p[2] for p in postings], "p_side": [p[3] for p in postings],
                "p_amount": [p[4] for p in postings], "p_currency": [p[5] for p in postings]}
        if trim and args[trim]:
            args[trim] = args[trim][:-1]  # one argument shorter than the others

        async def balances(_rows) -> tuple:
            return tuple(await conn.fetch("SELECT a.code, b.debits, b.credits FROM ledger_balances b "
                                          "JOIN ledger_accounts a ON a.id = b.account_id ORDER BY a.code"))

        outcomes = [await outcome_as_the_service(conn, lambda fold_now=fold_now: conn.fetch(
            "SELECT * FROM ledger_post(ARRAY['raw'], ARRAY['x'], ARRAY[now()], ARRAY[NULL::text], "
            "ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], "
            "ARRAY[$1::bytea], ARRAY[$2::smallint], $3::int[], $4::smallint[], $5::text[], $6::text[], "
            "$7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12)",
            bytes(32), count, args["p_entry"], args["p_line"], args["p_account"], args["p_side"],
            args["p_amount"], args["p_currency"], [CLEARING, REVENUE, USD_REVENUE],
            ["asset", "revenue", "revenue"], ["KHR", "KHR", "USD"], fold_now), balances)
            for fold_now in (True, False)]
        event(f"{outcomes[0][0]} {outcomes[0][1] if outcomes[0][0] == 'refused' else ''}")
        assert outcomes[0] == outcomes[1], (postings, count, trim)
    finally:
        await conn.close()


@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
async def test_an_amount_above_the_librarys_limit_is_refused_by_the_database(db, fold_now):
    # Found by review: two postings of the largest bigint could be written, and their sum overflowed a balance
    # slot, after which the balances view and every later posting to that slot failed. Migration 0034 gives
    # the database the library's limit (MAX_AMOUNT).
    await post(db, capture(0))
    call = ("SELECT * FROM ledger_post(ARRAY['raw'], ARRAY['x'], ARRAY[now()], ARRAY[NULL::text], ARRAY[NULL::text], "
            "ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], ARRAY[$1::bytea], ARRAY[2::smallint], "
            "ARRAY[1, 1], ARRAY[1, 2]::smallint[], ARRAY[$2, $3], ARRAY['debit', 'credit'], ARRAY[$4, $4]::bigint[], "
            "ARRAY['KHR', 'KHR'], ARRAY[$2, $3], ARRAY['asset', 'revenue'], ARRAY['KHR', 'KHR'], $5)")
    for amount in (MAX_AMOUNT + 1, 2**63 - 1):
        with pytest.raises(asyncpg.CheckViolationError, match="ledger_posting_amount_range"):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE paysvc_app")
                await db.execute(call, bytes(32), CLEARING, REVENUE, amount, fold_now)
                await db.execute("SET CONSTRAINTS ALL IMMEDIATE")
    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        await db.execute(call, bytes(32), CLEARING, REVENUE, MAX_AMOUNT, fold_now)
    assert await ledger.balance(db, CLEARING) == 50_000 + MAX_AMOUNT
    # (its content hash is a placeholder: only the balances are compared)
    assert (await ledger.verify(db)).balance_mismatches == [] and (await ledger.trial_balance(db)).balanced


async def test_an_unbalanced_single_entry_is_refused_without_waiting_for_a_balance_row(db, db_dsn):
    # Found by review: migration 0034's single-entry path first folded an entry, then refused it, so an
    # unbalanced call queued behind a transaction holding the balance row it would have folded into.
    await post(db, capture(0))
    holder = await asyncpg.connect(db_dsn)
    try:
        await holder.execute("BEGIN")
        await ledger.post_entry(holder, capture(1), fold_now=True)  # holds its slot of both accounts
        slot = await holder.fetchval("SELECT pg_current_xact_id()::text::bigint % 16")
        for _ in range(400):  # a transaction whose id falls in the same slot (ids advance by one or more)
            tx = db.transaction()
            await tx.start()
            if await db.fetchval("SELECT pg_current_xact_id()::text::bigint % 16") == slot:
                break
            await tx.rollback()
        else:
            pytest.fail("no transaction id in the held slot")
        try:
            await db.execute("SET LOCAL lock_timeout = '3s'")
            await db.execute("SET LOCAL ROLE paysvc_app")
            with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
                await db.execute(
                    "SELECT * FROM ledger_post(ARRAY['raw'], ARRAY['x'], ARRAY[now()], ARRAY[NULL::text], "
                    "ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::bigint], ARRAY[$1::bytea], "
                    "ARRAY[2::smallint], ARRAY[1, 1], ARRAY[1, 2]::smallint[], ARRAY[$2, $3], ARRAY['debit', 'credit'], "
                    "ARRAY[5, 4]::bigint[], ARRAY['KHR', 'KHR'], ARRAY[$2, $3], ARRAY['asset', 'revenue'], "
                    "ARRAY['KHR', 'KHR'], true)", bytes(32), CLEARING, REVENUE)
        finally:
            await tx.rollback()
        await holder.execute("COMMIT")
    finally:
        await holder.close()
    assert await ledger.balance(db, CLEARING) == 100_000


async def test_a_refusal_names_a_posting_of_an_entry_this_call_wrote(db):
    # Found by review: with one key of the call replayed, the refusal named a posting of the replayed entry
    # (never written) instead of the one that was wrong.
    await post(db, capture(0))
    first = await _raw_post(db, keyed=True)
    assert first[0]["o_status"] == "posted"
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="agency:MOI:revenue:KHR in USD"):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.fetch(_RAW_POST, ["raw"] * 2, [T0] * 2, [None] * 2, [None] * 2, [bytes(32)] * 2, "{2,2}",
                           [1, 1, 2, 2], [1, 2, 1, 2], [CLEARING, REVENUE] * 2, ["debit", "credit"] * 2, [5] * 4,
                           ["KHR", "KHR", "KHR", "USD"], sorted({CLEARING, REVENUE}), ["revenue", "asset"],
                           ["KHR", "KHR"], True, ["raw-0", "raw-1"])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 2


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
@pytest.mark.parametrize("short", ["p_entry", "p_line", "p_account", "p_currency"])
async def test_a_posting_argument_shorter_than_the_others_is_refused(db, fold_now, keyed, short):
    # Found by review: a posting argument longer than p_entry was padded with NULL by unnest, and the posting
    # it described was left out without an error. Nothing is written.
    await post(db, capture(0))
    args = {"p_entry": [1, 1, 1], "p_line": [1, 2, 3], "p_account": [CLEARING, REVENUE, REVENUE],
            "p_currency": ["KHR"] * 3}
    args[short] = args[short][:2]
    with pytest.raises((asyncpg.ForeignKeyViolationError, asyncpg.CheckViolationError)):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await db.fetch(_RAW_POST, ["raw"], [T0], [None], [None], [bytes(32)], "{3}", args["p_entry"],
                           args["p_line"], args["p_account"], ["debit", "credit", "credit"], [10, 5, 5],
                           args["p_currency"], sorted({CLEARING, REVENUE}), ["revenue", "asset"], ["KHR", "KHR"],
                           fold_now, ["raw-k"] if keyed else [None])
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1


async def test_the_service_role_cannot_write_a_posting_prechecked(db):
    # prechecked postings skip the postings trigger: only the ledger's owner (ledger_post) may write one.
    await post(db, capture(0))
    debit, _ = await _account_ids(db)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            e = await ledger.post_entry(db, capture(1), fold_now=True)
            await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, "
                             "prechecked) VALUES ($1, 3, $2, 'debit', 7, 'KHR', true)", e.id, debit)
    assert await db.fetchval("SELECT count(*) FROM ledger_postings") == 2  # capture(0)'s
    assert (await ledger.verify(db)).ok


async def test_balance_slots_keep_their_rules(db):
    # The slots' rules are domains since migration 0031 (checked once per connection, not per statement).
    await post(db, capture(0))
    for sql in ("UPDATE ledger_balance_slots SET debits = -1", "UPDATE ledger_balance_slots SET slot = 16",
                "UPDATE ledger_balance_slots SET postings = -1"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(sql)
    assert (await ledger.verify(db)).ok


async def _take_the_next_entry_id_by_hand(db) -> int:
    """Write, as a writer with an explicit id would, an entry with the id the sequence gives next."""
    await post(db, capture(0))
    taken = await db.fetchval("SELECT nextval('ledger_entries_id_seq')") + 1
    debit, credit = await _account_ids(db)
    async with db.transaction():
        await db.execute("INSERT INTO ledger_entries (id, kind, description, effective_at, content_hash, posting_count) "
                         "VALUES ($1, 'raw', 'explicit id', now(), $2, 2)", taken, bytes(32))
        await db.execute("INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                         "VALUES ($1, 1, $2, 'debit', 5, 'KHR'), ($1, 2, $3, 'credit', 5, 'KHR')", taken, debit, credit)
    return taken


async def test_an_entry_id_taken_by_hand_is_reported_as_such(db):
    # Found by review: an entry written by hand with the id the sequence gives next made a keyed posting
    # report "already reversed" for a draft that reverses nothing. Nothing is written; the error says why.
    taken = await _take_the_next_entry_id_by_hand(db)
    keyed = capture(1).model_copy(update={"idempotency_key": "after-the-taken-id"})
    with pytest.raises(ledger.LedgerError, match="taken by an entry written with an explicit id") as info:
        await post(db, keyed)
    assert not isinstance(info.value, ledger.AlreadyReversed)
    assert (await post(db, keyed)).id > taken  # posted again: the next id


# Found by review: verify read the seals through an inner join on ledger_entries and summed every posting,
# so rows whose entry had been deleted were invisible to it; and it never compared the posting counts.

def _problems_of(report, entry_id: int) -> list:
    return [p for p in report.entry_problems if p.entry_id == entry_id]


async def test_verify_reports_a_deleted_last_sealed_entry(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(4)]
    await seal_everything(db)
    victim = posted[-1]
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", victim.id)  # postings and seal stay
    report = await ledger.verify(db)
    assert not report.ok and report.first_bad_entry == victim.id
    found = _problems_of(report, victim.id)
    assert found and all(p.seal_position == 4 for p in found)
    assert any("seal 4 names entry" in p.problem and "missing" in p.problem for p in found)
    assert any("2 postings name this entry" in p.problem for p in found)
    assert {p.entry_id for p in report.entry_problems} == {victim.id}
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {victim.id}" in bad.stdout
    assert f"entry {victim.id} (seal 4): seal 4 names entry {victim.id}" in bad.stdout


async def _delete_entry_and_adjust_balances(db_dsn, entry_id: int) -> None:
    """What the chain alone cannot show: an entry, its postings and its seal deleted, its amounts taken out of
    the balance slots, as a superuser with the triggers off."""
    await tamper(db_dsn, """
        WITH gone AS (DELETE FROM ledger_postings WHERE entry_id = $1 RETURNING account_id, side, amount),
             per AS (SELECT account_id, coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0) AS d,
                            coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0) AS c, count(*) AS n
                       FROM gone GROUP BY account_id),
             fixed AS (UPDATE ledger_balance_slots b SET debits = b.debits - per.d, credits = b.credits - per.c,
                              postings = b.postings - per.n
                         FROM per
                        WHERE b.account_id = per.account_id
                          AND b.slot = (SELECT min(slot) FROM ledger_balance_slots x
                                         WHERE x.account_id = per.account_id AND x.debits >= per.d
                                           AND x.credits >= per.c AND x.postings >= per.n))
        DELETE FROM ledger_seals WHERE entry_id = $1""", entry_id)
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", entry_id)


async def test_an_anchor_shows_sealed_entries_deleted_from_the_chains_end(db, db_dsn):
    # Deleted with its postings, its seal and its amounts, the last sealed entry leaves a chain that is simply
    # shorter: verify alone passes. A chain head recorded before shows it.
    posted = [await post(db, capture(n)) for n in range(4)]
    await seal_everything(db)
    head = (await ledger.verify(db)).head
    assert head is not None and head.position == 4 and head.entry_id == posted[-1].id
    assert head == await ledger.chain_head(db)
    assert (await ledger.chain_head(db, 2)).entry_id == posted[1].id and await ledger.chain_head(db, 5) is None
    await _delete_entry_and_adjust_balances(db_dsn, posted[-1].id)
    assert (await ledger.verify(db)).ok  # the limit the anchor is for
    report = await ledger.verify(db, anchors=[ledger.parse_anchor(head.anchor)])
    assert not report.ok and report.head.position == 3
    assert [(p.position, p.found_hash) for p in report.anchor_problems] == [(4, None)]
    assert "no seal 4, recorded earlier: the chain ends at seal 3" in report.anchor_problems[0].problem
    earlier = await ledger.chain_head(db, 3)
    assert (await ledger.verify(db, anchors=[(3, earlier.chain_hash)])).ok  # what is left is intact


async def test_an_anchor_shows_a_chain_recomputed_after_a_deletion(db, db_dsn):
    # Delete a mid-chain entry and recompute every later seal (the chain hash is a public function): the chain
    # links and verify alone passes. An anchor recorded before, at or after the deleted entry's position, shows
    # it; one before it still holds.
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    recorded = {p: await ledger.chain_head(db, p) for p in range(1, 6)}
    await _delete_entry_and_adjust_balances(db_dsn, posted[1].id)  # sealed at position 2
    rows = await db.fetch("SELECT s.entry_id, e.content_hash FROM ledger_seals s "
                          "JOIN ledger_entries e ON e.id = s.entry_id ORDER BY s.position")
    prev = ledger.canonical.GENESIS
    await tamper(db_dsn, "DELETE FROM ledger_seals")
    for position, r in enumerate(rows, start=1):
        h = ledger.chain_hash(prev, position, r["entry_id"], bytes(r["content_hash"]))
        await tamper(db_dsn, "INSERT INTO ledger_seals (position, entry_id, prev_hash, chain_hash) "
                             "VALUES ($1, $2, $3, $4)", position, r["entry_id"], prev, h)
        prev = h
    assert (await ledger.verify(db)).ok  # the limit anchors are for
    assert (await ledger.verify(db, anchors=[(1, recorded[1].chain_hash)])).ok
    report = await ledger.verify(db, anchors=[(p, recorded[p].chain_hash) for p in (2, 3, 5)])
    assert not report.ok and report.entry_problems == [] and report.balance_mismatches == []
    assert [(a.position, a.found_hash is None) for a in report.anchor_problems] == [(2, False), (3, False), (5, True)]
    assert all("another chain hash" in a.problem for a in report.anchor_problems[:2])
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify", "--anchor", recorded[5].anchor)
    assert bad.returncode == 1, bad.stdout
    assert f"ANCHOR {recorded[5].anchor}: no seal 5, recorded earlier: the chain ends at seal 4" in bad.stdout
    # the deletion was in the middle (at seal 2), not only possibly at the end; and what to do is said
    assert "from its end or before it with the chain recomputed" in bad.stdout
    assert "what to do: preserve the database as it is now" in bad.stdout and "paysvc ledger export" in bad.stdout


async def test_every_anchor_recorded_for_a_position_is_checked(db, db_dsn):
    # Found by review: anchors were kept per position, so a second one for the same position replaced the
    # first, and a genuine old record passed beside the forged chain's own.
    for n in range(3):
        await post(db, capture(n))
    await seal_everything(db)
    head = await ledger.chain_head(db)
    forged = (head.position, "cd" * 32)
    for anchors in ([forged, (head.position, head.chain_hash)], [(head.position, head.chain_hash), forged]):
        report = await ledger.verify(db, anchors=anchors)
        assert [(a.position, a.recorded_hash) for a in report.anchor_problems] == [forged]
    # the same anchor twice, and in capitals, is one anchor
    upper = (head.position, head.chain_hash.upper())
    assert (await ledger.verify(db, anchors=[upper, (head.position, head.chain_hash)])).ok
    assert ledger.parse_anchor(f" {head.position}:{head.chain_hash.upper()} ") == (head.position, head.chain_hash)


async def test_an_anchor_checks_the_entries_not_only_the_seal_it_names(db, db_dsn):
    # Found by review: an edited entry, the seals before the anchor's recomputed and the anchor's own seal left
    # as it was, passed the anchor check (verify still failed, but blamed the untouched entry at the anchor).
    posted = [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    head = await ledger.chain_head(db)
    await tamper(db_dsn, "UPDATE ledger_entries SET description = 'edited' WHERE id = $1", posted[0].id)
    report = await ledger.verify(db, anchors=[(head.position, head.chain_hash)])
    assert [a.position for a in report.anchor_problems] == [head.position]
    assert "entries sealed up to it, as they are now, chain to another" in report.anchor_problems[0].problem


async def test_anchor_messages_for_a_gap_and_for_an_empty_chain(db, db_dsn):
    report = await ledger.verify(db, anchors=[(1, "ab" * 32)])
    assert not report.ok and "no seal 1, recorded earlier: nothing is sealed" in report.anchor_problems[0].problem
    for n in range(4):
        await post(db, capture(n))
    await seal_everything(db)
    second = await ledger.chain_head(db, 2)
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 2")
    report = await ledger.verify(db, anchors=[(2, second.chain_hash)])
    assert "no seal 2, recorded earlier: the chain has no seal there" in report.anchor_problems[0].problem


async def test_a_seal_deleted_mid_chain_names_the_entry_that_lost_it_first(db, db_dsn):
    """Found by review: with seal 3 of 5 deleted, verify named entry 4 first (a gap, a broken link, and a
    spurious "seal hash does not match", recomputed from the wrong previous hash) and entry 3, the one that lost
    its seal, last. An unsealed entry the sealer passed is now placed before the next sealed entry, and each
    seal's hash is checked from the previous hash it names (the broken link is reported on its own)."""
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 3")
    report = await ledger.verify(db)
    assert report.first_bad_entry == posted[2].id
    assert [(p.entry_id, p.problem) for p in report.entry_problems] == [
        (posted[2].id, "unsealed, but the sealer has already passed it (chain order broken)"),
        (posted[3].id, "seal position 4 follows 2: the chain has a gap"),
        (posted[3].id, "seal does not link to the previous seal's hash"),
    ]
    # and with entry 4 deleted too (its seal names a missing entry), entry 3 is still the first
    await tamper(db_dsn, "DELETE FROM ledger_postings WHERE entry_id = $1", posted[3].id)
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", posted[3].id)
    report = await ledger.verify(db)
    assert report.first_bad_entry == posted[2].id
    assert [p.entry_id for p in report.entry_problems][:2] == [posted[2].id, posted[3].id]


async def test_an_entry_that_lost_its_seal_after_a_deleted_entry_is_named_after_it(db, db_dsn):
    """Found by review: seal 4 deleted and entry 3 deleted (its seal 3 left naming a missing entry): entry 4,
    placed from the last seal of an entry still there (seal 2), was named before seal 3. It held the first
    missing position after that seal, 4: seal 3's problem comes first, as in the chain."""
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 4")
    await tamper(db_dsn, "DELETE FROM ledger_postings WHERE entry_id = $1", posted[2].id)
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", posted[2].id)
    report = await ledger.verify(db)
    assert report.first_bad_entry == posted[2].id
    order = [p.entry_id for p in report.entry_problems]
    assert order.index(posted[2].id) < order.index(posted[3].id)
    # and with seal 2 deleted too, entry 2 then entry 3 then entry 4, each where it sat (found by review: entries
    # 2 and 4 both took position 2)
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 2")
    order = list(dict.fromkeys(p.entry_id for p in (await ledger.verify(db)).entry_problems))
    assert order[:3] == [posted[1].id, posted[2].id, posted[3].id]


async def _forge_entry(db, db_dsn, entry_id: int, txid: str) -> None:
    """A balanced entry of 900 written behind the ledger's back (triggers off), with this id and transaction id."""
    debit, credit = await _account_ids(db)
    await tamper(db_dsn, "INSERT INTO ledger_entries (id, txid, kind, description, effective_at, content_hash, "
                         "posting_count, folded) VALUES ($1, $2::text::xid8, 'raw', 'x', now(), $3, 2, true)",
                 entry_id, txid, bytes(32))
    for line, (account, side) in enumerate(((debit, "debit"), (credit, "credit")), start=1):
        await tamper(db_dsn, "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, "
                             "prechecked) VALUES ($1, $2, $3, $4, 900, 'KHR', true)", entry_id, line, account, side)


async def _forge_beside(db, db_dsn, entry_id: int, beside) -> None:
    """A forged entry with ``beside``'s transaction id: in chain order just after it, though it never had a seal."""
    await _forge_entry(db, db_dsn, entry_id, await db.fetchval("SELECT txid::text FROM ledger_entries WHERE id = $1",
                                                               beside.id))


async def test_entries_forged_behind_the_seal_do_not_push_one_that_lost_its_seal_out_of_place(db, db_dsn):
    """Found by review: entries forged behind the sealer (they never had a seal) took the positions of deleted
    seals further on, so an entry that did lose its seal was named after the next sealed entry, and a forged
    entry could even be named after a later bad entry. An entry with no free position before the next seal
    sorts just before that seal and takes none."""
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    for forged in (-5, -4):
        await _forge_beside(db, db_dsn, forged, posted[0])  # between seals 1 and 2
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 3")
    order = list(dict.fromkeys(p.entry_id for p in (await ledger.verify(db)).entry_problems))
    assert order[:4] == [-5, -4, posted[2].id, posted[3].id]


async def test_a_forged_entry_early_in_the_chain_is_the_first_bad_entry(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    await _forge_beside(db, db_dsn, -5, posted[0])
    await tamper(db_dsn, "UPDATE ledger_postings SET amount = amount + 1 WHERE entry_id = $1", posted[2].id)
    await tamper(db_dsn, "DELETE FROM ledger_seals WHERE position = 4")
    assert (await ledger.verify(db)).first_bad_entry == -5


async def test_verify_sees_entries_written_behind_the_sealers_back(db, db_dsn):
    # Found by review: entries inserted behind the ledger's back that verify never looked at, each with its
    # postings and the balances adjusted: an id of 0 or below (the unsealed walk started after 0), a
    # transaction id no transaction had yet (the sealer never reaches it), and a posting on an account that
    # does not exist (dropped by a join).
    base = await post(db, capture(0))
    await seal_everything(db)
    forged = {-1: "1", 1_000_000: str(2**62)}
    for entry_id, txid in forged.items():
        await _forge_entry(db, db_dsn, entry_id, txid)
    await tamper(db_dsn, "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency, prechecked) "
                         "VALUES ($1, 3, 999999, 'debit', 123, 'KHR', true)", base.id)
    report = await ledger.verify(db)
    assert not report.ok and report.entries == 3
    problems = {p.entry_id: p.problem for p in report.entry_problems}
    assert -1 in problems
    assert any(p.entry_id == 1_000_000 and "transaction id is one no transaction had" in p.problem
               for p in report.entry_problems)
    assert any(p.entry_id == base.id and "names account 999999, which is missing" in p.problem
               for p in report.entry_problems)


async def test_cli_verify_prints_the_chain_head_and_checks_anchors(db, db_dsn):
    await post(db, capture(1))
    await post(db, capture(2))
    await seal_everything(db)
    head = await ledger.chain_head(db)
    ok = await asyncio.to_thread(run_cli, db_dsn, "verify", "--anchor", head.anchor)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"chain head: {head.anchor}" in ok.stdout and "the 1 anchor(s) given are in the chain" in ok.stdout
    wrong = f"{head.position}:{'0' * 64}"
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify", "--anchor", wrong)
    assert bad.returncode == 1 and f"ANCHOR {wrong}: seal 2 has another chain hash" in bad.stdout
    assert "NOT verified: do not record it" in bad.stdout and "keep a copy" not in bad.stdout
    for malformed, says in (("2", "expected POSITION:HASH"), ("x:" + "0" * 64, "expected POSITION:HASH"),
                            ("0:" + "0" * 64, "expected POSITION:HASH"), ("2:abc", "must be 64 hex digits"),
                            ("\u0665:" + "0" * 64, "expected POSITION:HASH"), ("9" * 5000 + ":" + "0" * 64,
                                                                           "expected POSITION:HASH"),
                            ("2:0x" + "0" * 62, "only the hex digits")):
        refused = await asyncio.to_thread(run_cli, db_dsn, "verify", "--anchor", malformed)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr


async def test_verify_reports_a_deleted_last_unsealed_entry(db, db_dsn):
    [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    victim = await post(db, capture(9, 7_000))
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", victim.id)  # its postings stay
    report = await ledger.verify(db)
    assert not report.ok and report.first_bad_entry == victim.id
    assert {p.entry_id for p in report.entry_problems} == {victim.id}
    assert any("2 postings name this entry" in p.problem and "missing" in p.problem
               for p in _problems_of(report, victim.id))
    # the maintained balances hold the orphaned postings; the postings of existing entries do not
    assert {m.account: m.maintained_debits - m.posted_debits for m in report.balance_mismatches} == \
        {CLEARING: 7_000, REVENUE: 0}
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {victim.id}" in bad.stdout


async def test_verify_reports_the_seal_left_by_an_entry_deleted_with_its_postings(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(4)]
    await seal_everything(db)
    victim = posted[-1]
    # a careful forger: take the entry's postings out of the balances, then delete the postings and the entry
    await tamper(db_dsn, "UPDATE ledger_balance_slots b "
                         "SET debits = b.debits - CASE p.side WHEN 'debit' THEN p.amount ELSE 0 END, "
                         "    credits = b.credits - CASE p.side WHEN 'credit' THEN p.amount ELSE 0 END, "
                         "    postings = b.postings - 1 "
                         "FROM ledger_postings p JOIN ledger_entries e ON e.id = p.entry_id "
                         "WHERE p.entry_id = $1 AND b.account_id = p.account_id "
                         "  AND b.slot = e.txid::text::bigint % 16", victim.id)
    await tamper(db_dsn, "DELETE FROM ledger_postings WHERE entry_id = $1", victim.id)
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", victim.id)
    report = await ledger.verify(db)
    assert not report.balance_mismatches  # the balances were made to agree: only the seal tells
    assert not report.ok and report.first_bad_entry == victim.id
    assert [(p.entry_id, p.seal_position) for p in report.entry_problems] == [(victim.id, 4)]
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {victim.id}" in bad.stdout
    assert f"entry {victim.id} (seal 4): seal 4 names entry {victim.id}" in bad.stdout


async def test_verify_blames_a_deleted_mid_chain_entry_not_its_neighbour(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(5)]
    await seal_everything(db)
    victim = posted[2]
    position = (await ledger.get_entry(db, victim.id)).seal_position
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", victim.id)
    report = await ledger.verify(db)
    assert not report.ok and report.first_bad_entry == victim.id
    assert {p.entry_id for p in report.entry_problems} == {victim.id}
    assert {p.seal_position for p in report.entry_problems} == {position}
    assert not any("gap" in p.problem for p in report.entry_problems)
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {victim.id}" in bad.stdout
    assert f"entry {victim.id} (seal {position}): seal {position} names entry {victim.id}" in bad.stdout


async def test_verify_reports_postings_that_name_no_entry(db, db_dsn):
    [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    debit, credit = await _account_ids(db)
    ghost = 10_000_000
    # postings of an entry that never existed, with the balances raised to match them
    await tamper(db_dsn, "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                         "VALUES ($1, 1, $2, 'debit', 900, 'KHR'), ($1, 2, $3, 'credit', 900, 'KHR')",
                 ghost, debit, credit)
    await tamper(db_dsn, "UPDATE ledger_balance_slots SET debits = debits + 900, postings = postings + 1 "
                         "WHERE account_id = $1 AND slot = (SELECT min(slot) FROM ledger_balance_slots "
                         "WHERE account_id = $1)", debit)
    await tamper(db_dsn, "UPDATE ledger_balance_slots SET credits = credits + 900, postings = postings + 1 "
                         "WHERE account_id = $1 AND slot = (SELECT min(slot) FROM ledger_balance_slots "
                         "WHERE account_id = $1)", credit)
    report = await ledger.verify(db)
    assert not report.ok and report.first_bad_entry == ghost
    assert [(p.entry_id, p.seal_position) for p in report.entry_problems] == [(ghost, None)]
    assert "2 postings name this entry" in report.entry_problems[0].problem
    assert {m.account for m in report.balance_mismatches} == {CLEARING, REVENUE}  # not counted as posted
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"FIRST BAD ENTRY: {ghost}" in bad.stdout


async def test_verify_compares_the_maintained_posting_counts(db, db_dsn):
    [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    debit, _ = await _account_ids(db)
    await tamper(db_dsn, "UPDATE ledger_balance_slots SET postings = postings + 7 WHERE account_id = $1", debit)
    assert (await ledger.get_account(db, CLEARING)).postings != 3  # what the API shows is now wrong
    report = await ledger.verify(db)
    assert not report.ok and not report.entry_problems
    [m] = report.balance_mismatches
    assert m.account == CLEARING and m.posted_postings == 3
    assert m.maintained_postings - m.posted_postings == 7 * await db.fetchval(
        "SELECT count(*) FROM ledger_balance_slots WHERE account_id = $1", debit)
    assert (m.maintained_debits, m.maintained_credits) == (m.posted_debits, m.posted_credits)
    bad = await asyncio.to_thread(run_cli, db_dsn, "verify")
    assert bad.returncode == 1
    assert f"balance of {CLEARING}:" in bad.stdout and "3 postings" in bad.stdout


async def test_the_sealer_refuses_to_extend_a_chain_whose_last_entry_was_deleted(db, db_dsn):
    posted = [await post(db, capture(n)) for n in range(3)]
    await seal_everything(db)
    victim = posted[-1]
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", victim.id)
    refusal = f"seal 3, the last one, names entry {victim.id}, which is missing"
    with pytest.raises(ledger.LedgerTampered, match=refusal):
        await ledger.seal(db)
    await post(db, capture(7))
    with pytest.raises(ledger.LedgerTampered, match=refusal):
        await ledger.seal_all(db)  # neither reuses position 3 nor chains past the deleted entry
    assert await db.fetchval("SELECT count(*) FROM ledger_seals") == 3
    refused = await asyncio.to_thread(run_cli, db_dsn, "seal")
    assert refused.returncode == 1
    assert f"entry {victim.id}" in refused.stderr and "Traceback" not in refused.stderr
    assert await db.fetchval("SELECT count(*) FROM ledger_seals") == 3


# --- Reversals: an entry that names what it reverses must be exactly that entry undone (migration 0025) ----

USD_CLEARING, USD_REVENUE = "provider:sandbox:clearing:USD", "agency:MOI:revenue:USD"


def _p(account: str, side: str, amount: int) -> ledger.Posting:
    return ledger.Posting(account=account, side=side, amount=amount, currency=account[-3:])


def five_postings(n: int = 1) -> EntryDraft:
    """An entry of 5 postings in two currencies: 100 KHR (60 + 40 against 100) and 5 USD."""
    return EntryDraft(kind="payment.captured", description=f"five postings {n}", effective_at=T0,
                      idempotency_key=f"five:{n}", postings=(
                          _p(CLEARING, "debit", 60), _p(CLEARING, "debit", 40), _p(REVENUE, "credit", 100),
                          _p(USD_CLEARING, "debit", 5), _p(USD_REVENUE, "credit", 5)))


def _flip(postings) -> tuple[ledger.Posting, ...]:
    return tuple(p.model_copy(update={"side": "credit" if p.side == "debit" else "debit"}) for p in postings)


BAD_REVERSALS = {
    # the reviewer's case: another kind, one posting pair of 1 KHR
    "one_pair_as_a_capture": lambda e: ("payment.captured", (_p(CLEARING, "debit", 1), _p(REVENUE, "credit", 1))),
    "one_pair": lambda e: ("reversal", (_p(CLEARING, "credit", 1), _p(REVENUE, "debit", 1))),
    "sides_not_swapped": lambda e: ("reversal", e.postings),
    "one_currency_only": lambda e: ("reversal", _flip(e.postings[:3])),
    "lines_merged": lambda e: ("reversal", (_p(CLEARING, "credit", 100), _p(REVENUE, "debit", 100),
                                            _p(USD_CLEARING, "credit", 5), _p(USD_REVENUE, "debit", 5))),
    "one_pair_more": lambda e: ("reversal", _flip(e.postings) + (_p(CLEARING, "debit", 1), _p(REVENUE, "credit", 1))),
    "exact_but_another_kind": lambda e: ("refund", _flip(e.postings)),
}


async def _balances(db) -> dict[str, int]:
    return {code: await ledger.balance(db, code) for code in (CLEARING, REVENUE, USD_CLEARING, USD_REVENUE)}


@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
@pytest.mark.parametrize("bad", sorted(BAD_REVERSALS))
async def test_a_reversal_that_is_not_its_entry_undone_is_refused(db, bad, fold_now):
    # Found by review: any balanced entry could name any entry in `reverses` and was accepted; the entry it
    # named could then never be reversed properly (AlreadyReversed). Posted as the service's role, through the
    # library, outside a transaction block (so the commit-time check runs inside this statement too).
    original = await ledger.post_entry(db, five_postings())
    before = await _balances(db)
    kind, postings = BAD_REVERSALS[bad](original)
    draft = EntryDraft(kind=kind, description="not a mirror", effective_at=T0, postings=postings,
                       reverses=original.id)
    await db.execute("SET ROLE paysvc_app")
    try:
        with pytest.raises(ledger.InvalidReversal, match=f"reverses entry {original.id}") as info:
            await ledger.post_entry(db, draft, fold_now=fold_now)
        assert "reversal_draft" in str(info.value)  # says what to do instead
    finally:
        await db.execute("RESET ROLE")
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert await _balances(db) == before
    # the original can still be reversed, properly
    r = await ledger.reverse_entry(db, original.id, description="posted in error", effective_at=T0)
    assert r.reverses == original.id and r.kind == "reversal"
    assert set((await _balances(db)).values()) == {0}
    assert (await ledger.verify(db)).ok


async def test_a_bad_reversal_inside_a_transaction_block_is_refused_at_commit(db):
    # Folded at commit, the check runs when the caller's transaction commits: asyncpg's error, with the rule's name.
    original = await ledger.post_entry(db, five_postings())
    draft = EntryDraft(kind="reversal", description="one pair", effective_at=T0, reverses=original.id,
                       postings=(_p(CLEARING, "credit", 1), _p(REVENUE, "debit", 1)))
    with pytest.raises(asyncpg.CheckViolationError, match="reverses entry") as info:
        async with db.transaction():
            await db.execute("SET LOCAL ROLE paysvc_app")
            await ledger.post_entry(db, draft)
    assert info.value.constraint_name == "ledger_reversal_mirrors_its_entry"
    # fold_pending runs the same check early, inside the transaction: the typed error
    with pytest.raises(ledger.InvalidReversal):
        async with db.transaction():
            await ledger.post_entry(db, draft)
            await ledger.fold_pending(db)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE reverses IS NOT NULL") == 0


async def _raw_reversal(db, reverses: int, kind: str, postings: list[tuple[str, str, int]], *,
                        role: str | None, early: bool = False) -> None:
    """An entry naming `reverses`, written by hand (no ledger_post), in one transaction."""
    async with db.transaction():
        if role:
            await db.execute(f"SET LOCAL ROLE {role}")
        eid = await db.fetchval("INSERT INTO ledger_entries (kind, description, effective_at, content_hash, "
                                "posting_count, reverses) VALUES ($1, 'by hand', now(), $2, $3, $4) RETURNING id",
                                kind, bytes(32), len(postings), reverses)
        for line, (code, side, amount) in enumerate(postings, start=1):
            await db.execute(
                "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                "SELECT $1, $2, id, $3, $4, currency FROM ledger_accounts WHERE code = $5", eid, line, side, amount,
                code)
        if early:
            await db.execute("SET CONSTRAINTS ALL IMMEDIATE")


@pytest.mark.parametrize("role, early", [("paysvc_app", False), (None, False), (None, True)],
                         ids=["service_role", "superuser", "superuser_checked_early"])
async def test_the_database_refuses_a_reversal_written_by_hand_that_is_not_its_entry_undone(db, role, early):
    original = await ledger.post_entry(db, five_postings())
    mirror = [(p.account, "credit" if p.side == "debit" else "debit", p.amount) for p in original.postings]
    for kind, postings in (("reversal", mirror[:3]),                                 # the KHR part only
                           ("reversal", [(CLEARING, "credit", 50), (CLEARING, "credit", 50),  # same totals,
                                         *mirror[2:]]),                                        # other lines
                           ("raw", mirror)):                                        # undone, but not a 'reversal'
        with pytest.raises(asyncpg.CheckViolationError, match=f"reverses entry {original.id}") as info:
            await _raw_reversal(db, original.id, kind, postings, role=role, early=early)
        assert info.value.constraint_name == "ledger_reversal_mirrors_its_entry"
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 1
    # the entry undone, lines in another order, is let in
    await _raw_reversal(db, original.id, "reversal", mirror[::-1], role=role, early=early)
    assert set((await _balances(db)).values()) == {0}


@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
async def test_a_multi_currency_entry_is_reversed_whatever_the_order_of_its_lines(db, fold_now):
    original = await ledger.post_entry(db, five_postings(1))
    r = await ledger.reverse_entry(db, original.id, description="undo", effective_at=T0)
    assert r.reverses == original.id and [p.side for p in r.postings] == ["credit"] * 2 + ["debit", "credit", "debit"]
    assert set((await _balances(db)).values()) == {0}
    # the reversal's lines need not be in the original's order (a multiset, not a sequence)
    second = await ledger.post_entry(db, five_postings(2))
    draft = ledger.reversal_draft(second, description="undo", effective_at=T0)
    shuffled = draft.model_copy(update={"postings": draft.postings[::-1]})
    async with db.transaction():
        await db.execute("SET LOCAL ROLE paysvc_app")
        assert (await ledger.post_entry(db, shuffled, fold_now=fold_now)).reverses == second.id
    assert set((await _balances(db)).values()) == {0}
    # a reversal of a reversal puts the entry back
    again = await ledger.post_entry(db, ledger.reversal_draft(r, description="redo", effective_at=T0),
                                    fold_now=fold_now)
    assert again.reverses == r.id and await ledger.balance(db, CLEARING) == 100
    with pytest.raises(ledger.AlreadyReversed):
        await ledger.reverse_entry(db, original.id, description="twice", effective_at=T0)
    assert (await ledger.verify(db)).ok


@pytest.mark.parametrize("fold_now", [True, False], ids=["fold_now", "at_commit"])
async def test_a_reversal_of_an_entry_that_does_not_exist_is_entry_not_found(db, fold_now):
    # Found by review: asyncpg's ForeignKeyViolationError leaked out of the library.
    draft = EntryDraft(kind="reversal", description="of nothing", effective_at=T0, reverses=888888,
                       postings=(_p(CLEARING, "credit", 1), _p(REVENUE, "debit", 1)))
    with pytest.raises(ledger.EntryNotFound, match="888888"):
        await ledger.post_entry(db, draft, fold_now=fold_now)
    with pytest.raises(ledger.EntryNotFound, match="888888"):  # in a batch, beside an ordinary entry
        await ledger.post_entries(db, [capture(1), draft], fold_now=fold_now)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_an_entry_id_taken_by_hand_is_reported_as_such_without_a_key_too(db):
    # The plain insert (no idempotency key, no reversal) met the explicit id with asyncpg's
    # UniqueViolationError; it now says what happened, like the keyed path.
    taken = await _take_the_next_entry_id_by_hand(db)
    plain = capture(1).model_copy(update={"idempotency_key": None})
    with pytest.raises(ledger.LedgerError, match="taken by an entry written with an explicit id") as info:
        await post(db, plain)
    assert not isinstance(info.value, asyncpg.PostgresError)
    assert (await post(db, plain)).id > taken  # posted again: the next id
    assert await ledger.balance(db, CLEARING) == 100_005  # capture(0), the 5 by hand, the plain one


def test_ledger_entries_is_there_after_a_plain_import_ledger():
    # docs/ledger.md shows `ledger.entries.payment_captured(...)` after `import ledger`; a user that imports
    # nothing else (no paysvc, no test module importing ledger.entries) must find it.
    code = "import ledger; print(ledger.entries.payment_captured.__name__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "payment_captured"


def offline_check(lines: list[str]) -> list[str]:
    """An auditor's check of `paysvc ledger export`, written from docs/ledger.md alone (no paysvc code): the
    problems found, an empty list when every content and chain hash holds."""
    import hashlib

    problems, prev = [], bytes(32)
    for text in lines:
        e = json.loads(text)
        if e.get("missing"):
            problems.append(f"seal {e['position']}: entry {e['entry_id']} missing")
            prev = bytes.fromhex(e["chain_hash"])  # its link cannot be checked: its content is gone
            continue
        t = datetime.fromisoformat(e["effective_at"]) - datetime(1970, 1, 1, tzinfo=timezone.utc)
        doc = {k: e[k] for k in ("kind", "description", "idempotency_key", "invoice_id", "payment_id",
                                 "settlement_id", "reverses", "postings")}
        doc["effective_at_us"] = (t.days * 86_400 + t.seconds) * 1_000_000 + t.microseconds
        content = hashlib.sha256(b"paysvc.ledger.entry.v1\n" + json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).digest()
        if content.hex() != e["content_hash"]:
            problems.append(f"entry {e['entry_id']}: content differs from its hash")
        chained = hashlib.sha256(prev + e["position"].to_bytes(8, "big") + e["entry_id"].to_bytes(8, "big")
                                 + bytes.fromhex(e["content_hash"])).digest()
        if chained.hex() != e["chain_hash"] or e["prev_hash"] != prev.hex():
            problems.append(f"seal {e['position']}: chain broken")
        prev = bytes.fromhex(e["chain_hash"])
    return problems


async def test_the_exported_chain_checks_away_from_the_service(db, db_dsn):
    """Found by an auditor's walk-through: the only way to check the ledger independently was paging the API."""
    posted = [await post(db, capture(n, amount=1000 + n)) for n in range(4)]
    await post(db, capture(9, at=T0.replace(microsecond=123456)).model_copy(
        update={"description": "ការទូទាត់\u2028line\u2029para\x85\x01 end"}))
    await seal_everything(db)
    out = await asyncio.to_thread(run_cli, db_dsn, "export")
    assert out.returncode == 0 and "exported 5 sealed entries" in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5 and offline_check(lines) == [] and out.stdout.isascii()
    head = await ledger.chain_head(db)
    assert json.loads(lines[-1])["chain_hash"] == head.chain_hash     # the head an anchor records
    later = await asyncio.to_thread(run_cli, db_dsn, "export", "--after", "3")
    assert [json.loads(x)["position"] for x in later.stdout.splitlines()] == [4, 5]
    # a reader gone away (`| head`) ends it quietly
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        env = dict(os.environ, PAYSVC_DATABASE_URL=db_dsn, PAYSVC_PII_KEYS=TEST_PII_KEYS)
        gone = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "paysvc", "ledger", "export"], env=env,
                                       stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert gone.returncode == 141 and "Traceback" not in gone.stderr, gone.stderr
    await tamper(db_dsn, "UPDATE ledger_postings SET amount = amount + 1 WHERE entry_id = $1", posted[1].id)
    again = await asyncio.to_thread(run_cli, db_dsn, "export")
    assert offline_check(again.stdout.splitlines()) == [f"entry {posted[1].id}: content differs from its hash"]
    # an entry row deleted: its seal is exported as missing, and the chain after it still checks
    await tamper(db_dsn, "DELETE FROM ledger_postings WHERE entry_id = $1", posted[2].id)
    await tamper(db_dsn, "DELETE FROM ledger_entries WHERE id = $1", posted[2].id)
    gone_row = await asyncio.to_thread(run_cli, db_dsn, "export")
    assert offline_check(gone_row.stdout.splitlines()) == [
        f"entry {posted[1].id}: content differs from its hash", f"seal 3: entry {posted[2].id} missing"]


@pytest.mark.parametrize("entry_id", [0, -7])
async def test_the_sealer_refuses_an_entry_with_an_id_no_entry_can_have(db, db_dsn, entry_id):
    """Found by review: forged after the last seal (a transaction id later than its entry's), an entry with id 0 was
    sealed like any other, and one with a negative id stopped the sealer with an OverflowError (the chain encodes
    ids as unsigned 64-bit)."""
    await post(db, capture(0))
    await seal_everything(db)
    await _forge_beside(db, db_dsn, entry_id, await post(db, capture(1)))   # chained just before that entry
    with pytest.raises(ledger.LedgerTampered, match=f"entry {entry_id} has an id no entry of the ledger can have"):
        for _ in range(50):   # the sealer reaches the forged entry once every older transaction has ended
            await ledger.seal_all(db)
            await asyncio.sleep(0.1)
    assert await db.fetchval("SELECT count(*) FROM ledger_seals WHERE entry_id = $1", entry_id) == 0
    out = await asyncio.to_thread(run_cli, db_dsn, "seal")
    assert out.returncode == 1 and "ledger seal REFUSED" in out.stderr and "Traceback" not in out.stderr, out.stderr


_DATED_ENTRY = st.tuples(st.sampled_from(["capture", "refund"]), st.sampled_from(["sandbox", "bakong"]),
                         st.sampled_from(["MOI", "MPWT"]), st.sampled_from(["KHR", "USD"]),
                         st.integers(1, 1_000_000), st.integers(-600, 600))


@given(batches=st.lists(st.lists(_DATED_ENTRY, min_size=1, max_size=6), min_size=1, max_size=4),
       moments=st.lists(st.integers(-700, 700), min_size=1, max_size=4), on_an_entry=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_balances_as_of_a_time_are_the_same_read_either_way(db_dsn, monkeypatch, batches, moments, on_an_entry):
    # Migration 0053: totals as of a time are either summed from the postings dated up to it or read back from
    # the maintained balances less the postings dated after it, whichever costs less. Whatever the dates
    # (posted out of order, several in one transaction, a moment exactly on an entry's time), both ways must
    # give what the postings dated up to that moment add up to. The ledger only grows, so the expected
    # postings accumulate over the examples.
    asyncio.run(_compare_as_of_ways(db_dsn, monkeypatch, batches, moments, on_an_entry))


_posted_so_far: dict[str, list] = {}


async def _compare_as_of_ways(dsn, monkeypatch, batches, moments, on_an_entry):
    from ledger import balances
    posted = _posted_so_far.setdefault(dsn, [])  # (effective_at, account, side, amount)
    conn = await asyncpg.connect(dsn)

    def draft_of(kind, provider, agency, cur, amount, minutes, n):
        at = T0 + timedelta(minutes=minutes)
        return (entries.payment_captured(provider=provider, agency=agency, amount=amount, currency=cur,
                                         effective_at=at, invoice_id=f"inv_{n}", payment_id=f"pay_{n}")
                if kind == "capture" else
                entries.refund(provider=provider, agency=agency, amount=amount, currency=cur, effective_at=at,
                               payment_id=f"pay_{n}", refund_id=f"ref_{n}"))

    def expected_as_of(rows, as_of, prefix=""):
        totals = {}
        for at, code, side, amount in rows:
            if at <= as_of and code.startswith(prefix):
                d, c, k = totals.get(code, (0, 0, 0))
                totals[code] = (d + amount, c, k + 1) if side == "debit" else (d, c + amount, k + 1)
        return totals

    async def check(rows, as_of, codes):
        expected = expected_as_of(rows, as_of)
        tb = await ledger.trial_balance(conn, as_of=as_of)
        assert {ln.account: (ln.debits, ln.credits) for ln in tb.lines} == {
            code: (d, c) for code, (d, c, _) in expected.items()}, as_of
        assert tb.balanced
        part = await ledger.trial_balance(conn, as_of=as_of, prefix="agency:MOI:")
        assert {ln.account: (ln.debits, ln.credits) for ln in part.lines} == {
            code: (d, c) for code, (d, c, _) in expected_as_of(rows, as_of, "agency:MOI:").items()}, as_of
        for code in codes:
            a = await ledger.get_account(conn, code, as_of=as_of)
            assert (a.debits, a.credits, a.postings) == expected.get(code, (0, 0, 0)), code

    real_read_back = balances._read_back
    try:
        for batch in batches:
            written = []
            async with conn.transaction():
                for kind, provider, agency, cur, amount, minutes in batch:
                    draft = draft_of(kind, provider, agency, cur, amount, minutes, len(posted) + len(written))
                    await ledger.post_entry(conn, draft)
                    written.extend((draft.effective_at, p.account, p.side, p.amount) for p in draft.postings)
            posted.extend(written)  # once committed
        if on_an_entry:
            moments = [*moments, round((posted[-1][0] - T0).total_seconds() / 60)]
        codes = sorted({p[1] for p in posted})
        for minutes in moments:
            as_of = T0 + timedelta(minutes=minutes)
            for way in (False, True, None):  # summed, read back, and whichever the service takes
                async def forced(conn, as_of, _way=way):
                    return _way
                monkeypatch.setattr(balances, "_read_back", real_read_back if way is None else forced)
                await check(posted, as_of, codes)
        # Inside a transaction that has not written (a report's repeatable-read snapshot, as the CLI reads): either
        # way, and the session's plan setting left as it was.
        for way in (False, True):
            async def forced_in_tx(conn, as_of, _way=way):
                return _way
            monkeypatch.setattr(balances, "_read_back", forced_in_tx)
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                for minutes in moments:
                    await check(posted, T0 + timedelta(minutes=minutes), codes)
                assert await conn.fetchval("SELECT current_setting('plan_cache_mode')") == "auto"
        # Read inside a transaction that has posted, before its commit folds the postings into the balances:
        # its own postings count, whichever way would be cheaper (found by review: the read-back missed them).
        monkeypatch.setattr(balances, "_read_back", forced_in_tx)  # would read back: must not
        tx = conn.transaction()
        await tx.start()
        try:
            kind, provider, agency, cur, amount, minutes = batches[0][0]
            draft = draft_of(kind, provider, agency, cur, amount, moments[0], "pending")
            await ledger.post_entry(conn, draft)
            pending = posted + [(draft.effective_at, p.account, p.side, p.amount) for p in draft.postings]
            for minutes in moments:
                await check(pending, T0 + timedelta(minutes=minutes), sorted({p[1] for p in pending}))
        finally:
            await tx.rollback()
        with pytest.raises(ValueError, match="timezone"):
            await ledger.trial_balance(conn, as_of=datetime(2026, 3, 1))
    finally:
        await conn.close()
