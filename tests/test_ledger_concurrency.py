"""Sixteen writers on the same few hot accounts: no deadlock, no lost update, balances exact."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import datetime, timezone

import asyncpg
import pytest

import ledger
from ledger import EntryDraft, Posting
from paysvc.db import connect
from tests.test_ledger_db import seal_everything

HOT = {"KHR": ["provider:sandbox:clearing:KHR", "provider:bakong:clearing:KHR", "agency:MOI:revenue:KHR",
               "suspense:unmatched:KHR"],
       "USD": ["provider:sandbox:clearing:USD", "agency:MOI:revenue:USD"]}


def random_entry(rng: random.Random) -> EntryDraft:
    postings = []
    for cur in rng.sample(sorted(HOT), rng.randint(1, 2)):  # sometimes a two-currency entry
        a, b = rng.sample(HOT[cur], 2)
        amount = rng.randint(1, 1_000_000)
        postings += [Posting(account=a, side="debit", amount=amount, currency=cur),
                     Posting(account=b, side="credit", amount=amount, currency=cur)]
    rng.shuffle(postings)  # accounts in any order: the lock order is the database's job
    return EntryDraft(kind="test", description="hot", effective_at=datetime.now(timezone.utc),
                      postings=tuple(postings))


@pytest.mark.parametrize("fold_now", [False, True], ids=["folded_at_commit", "folded_at_once"])
async def test_sixteen_writers_on_hot_accounts(db_dsn, fold_now):
    expected: Counter[str] = Counter()  # debits minus credits per account
    failures: list[BaseException] = []
    stop = asyncio.get_running_loop().time() + 3.0

    async def writer(w: int) -> int:
        rng = random.Random(w)
        n = 0
        async with connect(db_dsn) as conn:
            while asyncio.get_running_loop().time() < stop:
                batch = [random_entry(rng) for _ in range(rng.choice([1, 1, 1, 5]))]
                try:
                    async with conn.transaction():
                        await ledger.post_entries(conn, batch, fold_now=fold_now)
                except asyncpg.PostgresError as exc:  # a deadlock would land here
                    failures.append(exc)
                    continue
                for e in batch:
                    for p in e.postings:
                        expected[p.account] += p.amount if p.side == "debit" else -p.amount
                n += len(batch)
        return n

    counts = await asyncio.gather(*(writer(w) for w in range(16)))
    assert not failures, failures[:3]
    assert sum(counts) > 100
    async with connect(db_dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == sum(counts)
        for code, net in expected.items():
            acct = await ledger.get_account(conn, code)
            assert acct.debits - acct.credits == net, code
        tb = await ledger.trial_balance(conn)
        assert tb.balanced and {t.currency for t in tb.totals} == {"KHR", "USD"}
        await seal_everything(conn)
        report = await ledger.verify(conn)
        assert report.ok and report.sealed == sum(counts)
        assert await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") == 0
