"""Balances: one account now (O(1), from the maintained row) or as of a time, the trial balance, statements."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from ledger.accounts import signed
from ledger.errors import AccountNotFound
from ledger.journal import ledger_error
from ledger.sql import Q


class Account(BaseModel):
    """An account with its totals. ``balance`` is signed in the account's normal side."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    code: str
    type: Literal["asset", "liability", "revenue", "expense", "equity"]
    currency: Literal["KHR", "USD"]
    normal_side: Literal["debit", "credit"]
    debits: int
    credits: int
    balance: int
    postings: int


class StatementLine(BaseModel):
    """One posting on an account's statement."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    entry_id: int
    line: int
    side: Literal["debit", "credit"]
    amount: int
    kind: str
    description: str
    effective_at: datetime
    recorded_at: datetime


class TrialBalanceLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    account: str
    type: str
    currency: Literal["KHR", "USD"]
    debits: int
    credits: int
    balance: int


class CurrencyTotal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    currency: Literal["KHR", "USD"]
    debits: int
    credits: int
    balanced: bool | None  # None for a part of the ledger (see ``TrialBalance.scope``)


class TrialBalance(BaseModel):
    """Every account's debits and credits; per currency, total debits equal total credits.

    ``scope``: the account-code prefix the lines are limited to (an agency's own accounts), or None for the
    whole ledger. Only the whole ledger has to balance: for a part, ``balanced`` is None."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    as_of: datetime | None
    scope: str | None = None
    sealed_upto: int | None = Field(None, description="counting only entries sealed at chain positions up to this "
                                                      "one (the chain head recorded at a sign-off); null: every "
                                                      "entry, sealed or not")
    anchor: str | None = Field(None, description="with sealed_upto: that seal as POSITION:HASH, to compare with the "
                                                 "head recorded then (as stored: `paysvc ledger verify --anchor` "
                                                 "proves it)")
    lines: list[TrialBalanceLine]
    totals: list[CurrencyTotal]
    balanced: bool | None


def _account(r: asyncpg.Record) -> Account:
    return Account(code=r["code"], type=r["type"], currency=r["currency"], normal_side=r["normal_side"],
                   debits=r["debits"], credits=r["credits"], postings=r["postings"],
                   balance=signed(r["normal_side"], r["debits"], r["credits"]))


async def get_account(conn: asyncpg.Connection, code: str, *, as_of: datetime | None = None) -> Account:
    """An account and its totals (now, or from entries effective at or before ``as_of``)."""
    r = await conn.fetchrow(Q.account, code)
    if r is None:
        raise AccountNotFound(f"no account {code!r}: accounts exist once something is posted to them")
    if as_of is None:
        return _account(r)
    t = await _fetch_as_of(conn, as_of, Q.account_totals_as_of, Q.account_totals_as_of_from_now, r["id"], as_of,
                           many=False)
    return _account({**dict(r), "debits": t["debits"], "credits": t["credits"], "postings": t["postings"]})


async def _fetch_as_of(conn: asyncpg.Connection, as_of: datetime, direct: str, read_back: str, *args: object,
                       many: bool):
    """The rows of figures as of ``as_of``: ``direct`` sums the postings dated up to it, ``read_back`` takes the
    maintained balances less the postings dated after it (both with ``args``), whichever costs less."""
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of needs a timezone offset (e.g. +07:00, or UTC)")
    fetch = conn.fetch if many else conn.fetchrow
    # A generic plan, which PostgreSQL may switch a prepared statement to after a few executions, does not know
    # the time, so it cannot use the index on effective_at: it read every posting (found by review). Hence
    # plan_cache_mode = force_custom_plan for this read, local to the transaction.
    if not conn.is_in_transaction():
        async with conn.transaction(readonly=True):
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            return await fetch(read_back if await _read_back(conn, as_of) else direct, *args)
    # In the caller's transaction: the setting is put back as it was. A transaction that has written may hold
    # postings not yet folded into the balances (they fold at its commit), which only the sum of the postings
    # sees (found by review); one that has not, a report's repeatable-read snapshot say, may read back.
    wrote, before = await conn.fetchrow("SELECT pg_current_xact_id_if_assigned() IS NOT NULL, "
                                        "current_setting('plan_cache_mode')")
    await conn.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
    rows = await fetch(direct if wrote or not await _read_back(conn, as_of) else read_back, *args)
    await conn.execute("SELECT set_config('plan_cache_mode', $1, true)", before)  # (an error aborted it anyway)
    return rows


async def _read_back(conn: asyncpg.Connection, as_of: datetime) -> bool:
    """Whether totals as of ``as_of`` cost less read back from the maintained balances, less the postings dated
    after it, than summed from the postings dated up to it: when ``as_of`` lies in the later half of the time
    from the first entry posted to the last. Both ways give the same figures (in one statement each, so one
    snapshot); entries are posted in about the order of their effective time, which an index on it
    (migration 0053) uses either way."""
    span = await conn.fetchrow(Q.ledger_time_span)
    if span["first"] is None:
        return False
    return as_of >= span["first"] + (span["last"] - span["first"]) / 2


async def fold_pending(conn: asyncpg.Connection) -> None:
    """Fold this transaction's postings into the balances now rather than at commit.

    Balances change when the writing transaction commits (so busy balance rows are held only during
    the commit); a caller that must read, inside the same transaction, balances that include what it
    just posted calls this first. Later postings in the transaction are still folded at commit; a
    transaction that does both locks balance rows in two rounds and can deadlock with another such
    transaction (PostgreSQL aborts one of them): retry it, or post everything before folding.
    """
    try:
        await conn.execute("SET CONSTRAINTS ledger_entries_apply_balances IMMEDIATE")
    except asyncpg.PostgresError as exc:  # the entries' checks run here: e.g. InvalidReversal
        typed = ledger_error(exc)
        if typed is None:
            raise
        raise typed from exc
    await conn.execute("SET CONSTRAINTS ledger_entries_apply_balances DEFERRED")


async def balance(conn: asyncpg.Connection, account_code: str, *, as_of: datetime | None = None) -> int:
    """Balance signed in the account's normal side: O(1) now; as of a time, from its postings dated up to it, or
    from the balance now less those dated after it, whichever reads fewer."""
    return (await get_account(conn, account_code, as_of=as_of)).balance


async def list_accounts(
    conn: asyncpg.Connection, *, prefix: str | None = None, currency: str | None = None,
    after_code: str | None = None, limit: int = 100,
) -> tuple[list[Account], str | None]:
    """Accounts in code order with their balances; returns the page and the next ``after_code`` (or None)."""
    rows = await conn.fetch(Q.accounts_page, prefix, currency, after_code, limit + 1)
    more = len(rows) > limit
    page = [_account(r) for r in rows[:limit]]
    return page, (page[-1].code if more else None)


async def trial_balance(conn: asyncpg.Connection, *, as_of: datetime | None = None,
                        prefix: str | None = None, sealed_upto: int | None = None) -> TrialBalance:
    """Debits and credits of every account (now, or as of an effective time), with per-currency totals.

    ``prefix`` restricts the lines to accounts whose code starts with it: a part of the ledger, whose totals
    need not balance, so ``balanced`` is then None (not false) and ``scope`` names the part.

    ``sealed_upto`` counts only the entries sealed at chain positions up to it, so the answer never changes
    afterwards (seals are append-only): a sign-off records these figures with the head it records (found by an
    auditor's walk-through: an entry dated back changed a signed-off day's figures, and nothing showed it). It is
    what the chain held, not every entry committed by then: the sealer chains an entry seconds after it commits,
    and only once every older transaction on the server has ended (found by review). The difference from the
    answer without it is what was sealed after that head. Raises ``ValueError`` for a position not sealed yet.
    """
    anchor = None
    if sealed_upto is not None:
        head = await conn.fetchrow(Q.trial_balance_seal, sealed_upto)
        if head is None or head["position"] is None:
            raise ValueError(f"position {sealed_upto} is not sealed yet"
                             + (f": the last seal is {head['last']}" if head and head["last"] else
                                ": nothing is sealed yet"))
        anchor = f"{head['position']}:{bytes(head['chain_hash']).hex()}"
        rows = await conn.fetch(Q.trial_balance_sealed, as_of, prefix, sealed_upto)
    else:
        rows = (await conn.fetch(Q.trial_balance_now, prefix) if as_of is None
                else await _fetch_as_of(conn, as_of, Q.trial_balance_as_of, Q.trial_balance_as_of_from_now, as_of,
                                        prefix, many=True))
    lines = [TrialBalanceLine(account=r["code"], type=r["type"], currency=r["currency"], debits=r["debits"],
                              credits=r["credits"], balance=signed(r["normal_side"], r["debits"], r["credits"]))
             for r in rows]
    totals = []
    for cur in sorted({ln.currency for ln in lines}):
        dr = sum(ln.debits for ln in lines if ln.currency == cur)
        cr = sum(ln.credits for ln in lines if ln.currency == cur)
        totals.append(CurrencyTotal(currency=cur, debits=dr, credits=cr, balanced=dr == cr if prefix is None else None))
    return TrialBalance(as_of=as_of, scope=prefix, sealed_upto=sealed_upto, anchor=anchor, lines=lines, totals=totals,
                        balanced=all(t.balanced for t in totals) if prefix is None else None)


async def statement(
    conn: asyncpg.Connection, account_code: str, *, before: tuple[int, int] | None = None, limit: int = 50,
    as_of: datetime | None = None,
) -> tuple[list[StatementLine], tuple[int, int] | None]:
    """An account's postings newest first; ``before`` is the (entry id, line) cursor of the next page.

    With ``as_of``, only the postings of entries effective at or before it: the lines behind ``balance(...,
    as_of=...)``."""
    r = await conn.fetchrow(Q.account, account_code)
    if r is None:
        raise AccountNotFound(f"no account {account_code!r}")
    b_entry, b_line = before if before else (None, None)
    rows = await conn.fetch(Q.statement_page, r["id"], b_entry, b_line, limit + 1, as_of)
    more = len(rows) > limit
    lines = [StatementLine(**dict(x)) for x in rows[:limit]]
    return lines, ((lines[-1].entry_id, lines[-1].line) if more else None)
