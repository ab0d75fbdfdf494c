"""Property: whatever valid postings, reversals and concurrent writers do, the books stay right.

The state machine runs synchronously with its own event loop on one database per run (hypothesis and
pytest-asyncio's loop do not mix), and checks the database against a model of expected balances.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import ValidationError

import ledger
from ledger import EntryDraft, Posting
from tests.conftest import ADMIN_DSN, dsn_for

ACCOUNTS = {"KHR": ["provider:sandbox:clearing:KHR", "agency:MOI:revenue:KHR", "agency:MEF:revenue:KHR",
                    "suspense:unmatched:KHR", "treasury:bank:NBC-1:KHR", "expense:provider-fees:sandbox:KHR"],
            "USD": ["provider:sandbox:clearing:USD", "agency:MOI:revenue:USD", "suspense:unmatched:USD"]}
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@st.composite
def balanced_entries(draw) -> EntryDraft:
    postings: list[Posting] = []
    for cur in draw(st.lists(st.sampled_from(sorted(ACCOUNTS)), min_size=1, max_size=2, unique=True)):
        debits = draw(st.lists(st.integers(1, 10**9), min_size=1, max_size=3))
        n_credits = draw(st.integers(1, 3))
        total = sum(debits)
        # split the total into n_credits positive parts
        cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=n_credits - 1, max_size=n_credits - 1,
                                    unique=True))) if total > n_credits else []
        credits = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        postings += [Posting(account=draw(st.sampled_from(ACCOUNTS[cur])), side="debit", amount=d, currency=cur)
                     for d in debits]
        postings += [Posting(account=draw(st.sampled_from(ACCOUNTS[cur])), side="credit", amount=c, currency=cur)
                     for c in credits]
    postings = draw(st.permutations(postings))
    return EntryDraft(kind="prop", description=draw(st.text(max_size=20).filter(lambda s: "\x00" not in s)),
                      effective_at=T0 + timedelta(seconds=draw(st.integers(0, 10**6))), postings=tuple(postings),
                      idempotency_key=draw(st.none() | st.sampled_from(["k1", "k2", "k3"])))


def books(e: EntryDraft | ledger.PostedEntry) -> tuple:
    """What an entry books, as the ledger compares it when an idempotency key is used again."""
    return (e.kind, e.invoice_id, e.payment_id, e.settlement_id, e.reverses,
            sorted((p.account, p.side, p.amount, p.currency) for p in e.postings))


@st.composite
def unbalanced_postings(draw) -> list[tuple[str, str, int, str]]:
    """Raw postings that do not balance per currency (off by some amount, or mixing currencies)."""
    cur = draw(st.sampled_from(sorted(ACCOUNTS)))
    amount = draw(st.integers(2, 10**6))
    if draw(st.booleans()):
        off = draw(st.integers(1, amount - 1))
        return [(ACCOUNTS[cur][0], "debit", amount, cur), (ACCOUNTS[cur][1], "credit", amount - off, cur)]
    other = "USD" if cur == "KHR" else "KHR"
    return [(ACCOUNTS[cur][0], "debit", amount, cur), (ACCOUNTS[other][1], "credit", amount, other)]


class LedgerMachine(RuleBasedStateMachine):
    dsn: str  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(self.dsn))
        self.start = Counter(self.run(self._net()))  # the database is shared between runs: compare deltas
        self.expected: Counter[str] = Counter()
        keyed = self.run(ledger.get_entries(self.conn, [r["id"] for r in self.run(self.conn.fetch(
            "SELECT id FROM ledger_entries WHERE idempotency_key IS NOT NULL"))]))
        self.by_key: dict[str, tuple[int, tuple]] = {e.idempotency_key: (e.id, books(e)) for e in keyed.values()}
        self.reversible: list[int] = []

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _net(self) -> dict[str, int]:
        rows = await self.conn.fetch("SELECT a.code, b.debits - b.credits AS net FROM ledger_balances b "
                                     "JOIN ledger_accounts a ON a.id = b.account_id")
        return {r["code"]: r["net"] for r in rows}

    def _book(self, e: ledger.PostedEntry) -> None:
        if e.replayed:
            assert e.idempotency_key is not None and self.by_key[e.idempotency_key] == (e.id, books(e))
            return
        if e.idempotency_key is not None:
            assert e.idempotency_key not in self.by_key
            self.by_key[e.idempotency_key] = (e.id, books(e))
        for p in e.postings:
            self.expected[p.account] += p.amount if p.side == "debit" else -p.amount
        if e.reverses is None:
            self.reversible.append(e.id)

    async def _post(self, drafts: list[EntryDraft]) -> list[ledger.PostedEntry]:
        async with self.conn.transaction():
            return await ledger.post_entries(self.conn, drafts)

    def _conflicts(self, drafts: list[EntryDraft]) -> bool:
        """Whether a draft of this batch reuses a key (known, or earlier in the batch) for something else."""
        seen = {k: b for k, (_, b) in self.by_key.items()}
        for d in drafts:
            if d.idempotency_key is not None and seen.setdefault(d.idempotency_key, books(d)) != books(d):
                return True
        return False

    def _post_and_book(self, drafts: list[EntryDraft]) -> None:
        if self._conflicts(drafts):
            with pytest.raises(ledger.IdempotencyConflict):  # the whole batch rolled back with the transaction
                self.run(self._post(drafts))
            return
        for e in self.run(self._post(drafts)):
            self._book(e)

    @rule(draft=balanced_entries())
    def post(self, draft):
        self._post_and_book([draft])

    @rule(drafts=st.lists(balanced_entries(), min_size=2, max_size=6))
    def post_batch(self, drafts):
        self._post_and_book(drafts)

    @rule(drafts=st.lists(balanced_entries(), min_size=2, max_size=8))
    def concurrent_writers(self, drafts):
        async def one(d: EntryDraft) -> ledger.PostedEntry:
            c = await asyncpg.connect(self.dsn)
            try:
                async with c.transaction():
                    return await ledger.post_entry(c, d)
            finally:
                await c.close()
        async def all_at_once() -> list[ledger.PostedEntry | BaseException]:
            return await asyncio.gather(*(one(d) for d in drafts), return_exceptions=True)
        results = self.run(all_at_once())
        posted = [e for e in results if isinstance(e, ledger.PostedEntry)]
        for e in sorted(posted, key=lambda e: (e.replayed, e.id)):  # the writer that won a key comes first
            self._book(e)
        for d, e in zip(drafts, results):  # a refused writer reused the key of an entry that books other things
            if isinstance(e, ledger.PostedEntry):
                assert books(e) == books(d), "a replay answered a draft that books something else"
            else:
                assert isinstance(e, ledger.IdempotencyConflict), e
                assert d.idempotency_key is not None and self.by_key[d.idempotency_key][1] != books(d)

    @precondition(lambda self: self.by_key)
    @rule(data=st.data(), later=st.integers(0, 10**6))
    def retry_a_keyed_entry(self, data, later):
        # A retry of a posted entry, worded and stamped anew: the first entry, nothing written.
        key = data.draw(st.sampled_from(sorted(self.by_key)))
        entry_id, _ = self.by_key[key]
        first = self.run(ledger.get_entry(self.conn, entry_id))
        retry = EntryDraft(kind=first.kind, description="retried", effective_at=first.effective_at
                           + timedelta(seconds=later), postings=tuple(reversed(first.postings)),
                           idempotency_key=key, invoice_id=first.invoice_id, payment_id=first.payment_id,
                           settlement_id=first.settlement_id, reverses=first.reverses)
        again = self.run(self._post([retry]))[0]
        assert again.replayed and again.id == entry_id and again.description == first.description
        self._book(again)

    @precondition(lambda self: self.reversible)
    @rule(data=st.data())
    def reverse(self, data):
        entry_id = data.draw(st.sampled_from(self.reversible))

        async def go():
            async with self.conn.transaction():
                return await ledger.reverse_entry(self.conn, entry_id, description="undo", effective_at=T0)
        self.reversible.remove(entry_id)
        self._book(self.run(go()))
        with pytest.raises(ledger.AlreadyReversed):
            self.run(go())

    @precondition(lambda self: self.reversible)
    @rule(data=st.data(), fold_now=st.booleans())
    def mismatched_reversal_is_refused(self, data, fold_now):
        # An entry naming one in `reverses` must be that entry undone (migration 0025), in either posting path;
        # a refused one leaves the entry reversible (the `reverse` rule may still pick it).
        entry_id = data.draw(st.sampled_from(self.reversible))
        original = self.run(ledger.get_entry(self.conn, entry_id))
        mirror = ledger.reversal_draft(original, description="undo", effective_at=T0).postings
        how = data.draw(st.sampled_from(["other_entry", "other_kind", "extra_pair"]))
        kind, postings = "reversal", mirror
        if how == "other_entry":
            postings = data.draw(balanced_entries()).postings
        elif how == "other_kind":
            kind = data.draw(st.sampled_from(["prop", "refund", "payment.captured"]))
        else:
            code = data.draw(st.sampled_from(ACCOUNTS["KHR"]))
            amount = data.draw(st.integers(1, 10**6))
            postings = mirror + (Posting(account=code, side="debit", amount=amount, currency="KHR"),
                                 Posting(account=code, side="credit", amount=amount, currency="KHR"))
        draft = EntryDraft(kind=kind, description="not the entry undone", effective_at=T0, postings=postings,
                           reverses=entry_id)
        undone = Counter((p.account, p.currency, p.amount, p.side) for p in mirror)
        if kind == "reversal" and Counter((p.account, p.currency, p.amount, p.side) for p in postings) == undone:
            return  # drew the entry undone after all: not a mismatch
        with pytest.raises(ledger.InvalidReversal):  # outside a transaction block: one statement, its own commit
            self.run(ledger.post_entry(self.conn, draft, fold_now=fold_now))

    @rule(postings=unbalanced_postings())
    def unbalanced_is_refused(self, postings):
        with pytest.raises(ValidationError):  # by Python
            EntryDraft(kind="bad", description="", effective_at=T0, postings=tuple(
                Posting(account=a, side=s, amount=n, currency=c) for a, s, n, c in postings))

        async def raw():  # and by the database, when Python is bypassed
            async with self.conn.transaction():
                eid = await self.conn.fetchval(
                    "INSERT INTO ledger_entries (kind, description, effective_at, content_hash, posting_count) "
                    "VALUES ('raw', '', now(), $1, $2) RETURNING id", bytes(32), len(postings))
                for line, (code, side, amount, cur) in enumerate(postings, start=1):
                    await self.conn.execute(
                        "INSERT INTO ledger_postings (entry_id, line, account_id, side, amount, currency) "
                        "SELECT $1, $2, id, $3, $4, $5 FROM ledger_accounts WHERE code = $6",
                        eid, line, side, amount, cur, code)
        for code, *_ in postings:  # make sure the accounts exist, so only balance can fail
            self.run(self._post([EntryDraft(kind="open", description="", effective_at=T0, postings=(
                Posting(account=code, side="debit", amount=1, currency=code[-3:]),
                Posting(account=code, side="credit", amount=1, currency=code[-3:])))]))
        with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
            self.run(raw())

    @rule()
    def seal_and_verify(self):
        self.run(ledger.seal_all(self.conn))
        rep = self.run(ledger.verify(self.conn))
        assert rep.ok, (rep.entry_problems[:3], rep.balance_mismatches[:3])

    @invariant()
    def books_balance(self):
        tb = self.run(ledger.trial_balance(self.conn))
        assert tb.balanced
        net = Counter(self.run(self._net()))
        for code in set(net) | set(self.expected) | set(self.start):
            assert net[code] - self.start[code] == self.expected[code], code

    def teardown(self):
        try:
            rep = self.run(ledger.verify(self.conn))
            assert rep.ok and not rep.balance_mismatches
        finally:
            self.run(self.conn.close())
            self.loop.close()


def test_ledger_state_machine(template_db):
    name = f"paysvc_prop_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        c = await asyncpg.connect(ADMIN_DSN)
        try:
            await c.execute(sql)
        finally:
            await c.close()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    try:
        LedgerMachine.dsn = dsn_for(name)
        run = settings(max_examples=12, stateful_step_count=12, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])(LedgerMachine)
        run.TestCase().runTest()
    finally:
        loop.run_until_complete(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        loop.close()
