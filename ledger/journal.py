"""Posting, reversing and reading journal entries, inside the caller's transaction."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Sequence

import asyncpg

from ledger.accounts import account_spec
from ledger.canonical import content_hash
from ledger.errors import AlreadyReversed, EntryNotFound, IdempotencyConflict, InvalidReversal, LedgerError
from ledger.postings import EntryDraft, PostedEntry, Posting
from ledger.sql import Q


async def post_entry(conn: asyncpg.Connection, draft: EntryDraft, *, fold_now: bool = False) -> PostedEntry:
    """Post one balanced entry in the caller's transaction (one round trip).

    The database checks the entry again at commit (with ``fold_now``, in this statement). If the
    idempotency key was used before by the same entry, the first entry is returned with ``replayed=True`` and
    nothing is written; "the same" is what it books: its kind, its postings (in any order) and what it refers
    to (invoice, payment, settlement, reversed entry), not its description or effective time, which a retry
    may word or stamp anew (the first's stay). A key used before by an entry that books something else
    raises ``IdempotencyConflict``: nothing is written for the draft. Raises ``AlreadyReversed`` when
    ``reverses`` names an entry that already has its reversal, ``EntryNotFound`` when it names no entry, and
    ``InvalidReversal`` when the draft is not that entry undone (its postings with each side swapped, kind
    ``reversal``: use ``reversal_draft`` or ``reverse_entry``).
    Without ``fold_now``, inside a transaction block, the database checks the last at commit: the caller's
    COMMIT then raises asyncpg's ``CheckViolationError`` (its ``constraint_name`` is
    ``ledger_reversal_mirrors_its_entry``).
    ``fold_now``: see ``post_entries``.
    """
    return (await post_entries(conn, [draft], fold_now=fold_now))[0]


async def post_entries(conn: asyncpg.Connection, drafts: Sequence[EntryDraft], *,
                       fold_now: bool = False) -> list[PostedEntry]:
    """Post a micro-batch of entries with one statement; results in the order of ``drafts``.

    Same rules as ``post_entry`` for each draft. A batch with an ``AlreadyReversed`` or
    ``IdempotencyConflict`` draft raises after the others were written in the caller's transaction: roll it back
    (outside a transaction block the statement has committed them), or post such drafts one by one. Any other
    error refuses the whole statement.

    By default the database checks each of the transaction's entries and folds it into the balances when
    the transaction commits, with all the balance rows it needs locked first in account order, however many
    times it posted. With ``fold_now`` it does both in this statement instead, which costs less, but then
    this must be the transaction's only posting: the database refuses any other entry in the same
    transaction (balance rows locked now and others later could deadlock with another transaction). The
    balance rows stay locked until the commit: keep the rest of such a transaction short, and take any other
    row lock it needs before posting, not after (a transaction that holds that row and folds at commit into
    the same balance slot would otherwise deadlock with this one).
    """
    if not drafts:
        return []
    hashes = [content_hash(d) for d in drafts]
    pair = _pair(drafts)
    try:
        if pair is not None:  # the common case: one entry of two postings (see the post_pair block)
            d, (p, q) = drafts[0], pair
            rows = await conn.fetch(
                Q.post_pair, d.kind, d.description, d.effective_at, d.idempotency_key, d.invoice_id, d.payment_id,
                d.settlement_id, hashes[0], p.account, p.side, q.account, p.amount, p.currency, fold_now,
            )
        else:
            rows = await _post(conn, drafts, hashes, fold_now)
    except asyncpg.PostgresError as exc:  # costs nothing when nothing is raised
        typed = ledger_error(exc, drafts)
        if typed is None:
            raise
        raise typed from exc
    out: list[PostedEntry | None] = [None] * len(drafts)
    replayed: dict[int, int] = {}
    for r in rows:
        i = r["o_ord"] - 1
        if r["o_status"] == "already_reversed":
            raise AlreadyReversed(f"entry {drafts[i].reverses} has already been reversed; "
                                  "an entry is reversed at most once")
        if r["o_status"] == "id_taken":
            raise LedgerError(_ID_TAKEN + "nothing was written for this draft: post it again (and let the "
                              "sequence choose entry ids)")
        if r["o_status"] == "replayed":
            replayed[i] = r["o_id"]
            continue
        d = drafts[i]
        # built without re-validating: every field comes from a validated draft or from the database
        out[i] = PostedEntry.model_construct(
            id=r["o_id"], kind=d.kind, description=d.description, effective_at=d.effective_at,
            recorded_at=r["o_recorded_at"], postings=d.postings, idempotency_key=d.idempotency_key,
            invoice_id=d.invoice_id, payment_id=d.payment_id, settlement_id=d.settlement_id, reverses=d.reverses,
            content_hash=hashes[i].hex(), seal_position=None, chain_hash=None, replayed=False,
        )
    if replayed:
        firsts = await get_entries(conn, list(set(replayed.values())))
        for i, entry_id in replayed.items():
            first = firsts[entry_id]
            differs = _differences(drafts[i], first)
            if differs:
                raise IdempotencyConflict(
                    f"idempotency key {drafts[i].idempotency_key!r} was used by journal entry {first.id}, which "
                    f"books something else ({differs}); nothing was written for this draft: a retry must book "
                    "the same entry, and a new entry needs a new key")
            out[i] = first.model_copy(update={"replayed": True})
    return out  # type: ignore[return-value]


def _pair(drafts: Sequence[EntryDraft]) -> tuple[Posting, Posting] | None:
    """The two postings of a single draft that ledger_post_pair can write (one that reverses no entry, with two
    postings on opposite sides of one amount and currency, as every valid two-posting draft has), else None."""
    if len(drafts) != 1:
        return None
    d = drafts[0]
    if d.reverses is not None or len(d.postings) != 2:
        return None
    p, q = d.postings
    if p.side == q.side or p.amount != q.amount or p.currency != q.currency:
        return None
    return p, q


async def _post(conn: asyncpg.Connection, drafts: Sequence[EntryDraft], hashes: list[bytes],
                fold_now: bool) -> list[asyncpg.Record]:
    """The drafts sent to ledger_post: their fields and postings as arrays, with the accounts they name."""
    p_entry: list[int] = []
    p_line: list[int] = []
    p_account: list[str] = []
    p_side: list[str] = []
    p_amount: list[int] = []
    p_currency: list[str] = []
    accounts: dict[str, None] = {}
    for i, d in enumerate(drafts, start=1):
        for line, p in enumerate(d.postings, start=1):
            p_entry.append(i)
            p_line.append(line)
            p_account.append(p.account)
            p_side.append(p.side)
            p_amount.append(p.amount)
            p_currency.append(p.currency)
            accounts[p.account] = None
    specs = [account_spec(code) for code in accounts]
    if len(drafts) == 1:  # sent as scalars where it can (see the post_one block)
        d = drafts[0]
        return await conn.fetch(
            Q.post_one, d.kind, d.description, d.effective_at, d.idempotency_key, d.invoice_id, d.payment_id,
            d.settlement_id, d.reverses, hashes[0], p_account, p_line, p_side, p_amount, p_currency,
            [s.code for s in specs], [s.type for s in specs], [s.currency for s in specs], fold_now,
        )
    return await conn.fetch(
        Q.post,
        [d.kind for d in drafts], [d.description for d in drafts], [d.effective_at for d in drafts],
        [d.idempotency_key for d in drafts], [d.invoice_id for d in drafts],
        [d.payment_id for d in drafts], [d.settlement_id for d in drafts], [d.reverses for d in drafts],
        hashes, [len(d.postings) for d in drafts],
        p_entry, p_line, p_account, p_side, p_amount, p_currency,
        [s.code for s in specs], [s.type for s in specs], [s.currency for s in specs], fold_now,
    )


def _differences(draft: EntryDraft, first: PostedEntry) -> str:
    """What the draft books differently from the entry that holds its idempotency key ('' when nothing)."""
    out = [f"{name} {getattr(first, name)!r}, not {getattr(draft, name)!r}"
           for name in ("kind", "invoice_id", "payment_id", "settlement_id", "reverses")
           if getattr(first, name) != getattr(draft, name)]
    def lines(e: EntryDraft | PostedEntry) -> list[tuple[str, str, int, str]]:
        return sorted((p.account, p.side, p.amount, p.currency) for p in e.postings)
    if lines(first) != lines(draft):
        out.append("other postings")
    return ", ".join(out)


_ID_TAKEN = "the entry id drawn from the sequence was taken by an entry written with an explicit id; "
_REVERSAL_RULE = "ledger_reversal_mirrors_its_entry"  # migration 0025
_MISSING_KEY = re.compile(r"\(reverses\)=\((\d+)\)")


def ledger_error(exc: asyncpg.PostgresError, drafts: Sequence[EntryDraft] = ()) -> LedgerError | None:
    """The typed ledger error for what the database refused in a posting statement (or in ``fold_pending``),
    recognised by the constraint name the database gives; None for any other error (raised as it is).
    ``drafts``: those of the statement, to name what they reverse."""
    name = getattr(exc, "constraint_name", None)
    if isinstance(exc, asyncpg.CheckViolationError) and name == "ledger_entries_reverses_an_earlier_entry":
        # Checked on the row, before the foreign key: the entry named does not exist (yet), so it is not earlier.
        named = ", ".join(str(d.reverses) for d in drafts if d.reverses is not None) or "named in `reverses`"
        return EntryNotFound(f"journal entry {named} is not an earlier entry (it does not exist); nothing was "
                             "written: name an existing entry (ledger.reverse_entry takes its id)")
    if isinstance(exc, asyncpg.CheckViolationError) and name == _REVERSAL_RULE:
        return InvalidReversal(f"{exc.args[0] if exc.args else exc}. It cannot commit: post instead the entry "
                               "ledger.reversal_draft builds from the entry it reverses (ledger.reverse_entry "
                               "does both)")
    if isinstance(exc, asyncpg.ForeignKeyViolationError) and name == "ledger_entries_reverses_fkey":
        found = _MISSING_KEY.search(getattr(exc, "detail", None) or "")
        which = f"journal entry {found.group(1)}" if found else "the journal entry"
        return EntryNotFound(f"{which}, named in `reverses`, does not exist; nothing was written: name an "
                             "existing entry (ledger.reverse_entry takes its id)")
    if isinstance(exc, asyncpg.UniqueViolationError) and name in ("ledger_entries_pkey", "ledger_postings_pkey"):
        # Only an entry id can collide in ledger_post (lines are numbered per draft), and only in its plain
        # insert, without ON CONFLICT (entries without idempotency key or reversal): the whole statement failed.
        return LedgerError(_ID_TAKEN + "nothing of this call was written (inside a transaction block, roll it "
                           "back): post again (and let the sequence choose entry ids)")
    return None


async def get_entries(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, PostedEntry]:
    """The entries with these ids (missing ids are absent from the result), keyed by id."""
    rows = await conn.fetch(Q.entries_by_id, list(ids))
    lines = await conn.fetch(Q.postings_of_entries, list(ids))
    postings: dict[int, list[Posting]] = {}
    for p in lines:
        postings.setdefault(p["entry_id"], []).append(
            Posting(account=p["account"], side=p["side"], amount=p["amount"], currency=p["currency"]))
    return {r["id"]: _entry(r, postings.get(r["id"], [])) for r in rows}


async def get_entry(conn: asyncpg.Connection, entry_id: int) -> PostedEntry:
    """One entry with its postings and seal; raises ``EntryNotFound``."""
    found = await get_entries(conn, [entry_id])
    if entry_id not in found:
        raise EntryNotFound(f"no journal entry {entry_id}")
    return found[entry_id]


def _entry(r: asyncpg.Record, postings: list[Posting]) -> PostedEntry:
    return PostedEntry(
        id=r["id"], kind=r["kind"], description=r["description"], effective_at=r["effective_at"],
        recorded_at=r["recorded_at"], postings=tuple(postings), idempotency_key=r["idempotency_key"],
        invoice_id=r["invoice_id"], payment_id=r["payment_id"], settlement_id=r["settlement_id"],
        reverses=r["reverses"], content_hash=bytes(r["content_hash"]).hex(), seal_position=r["seal_position"],
        chain_hash=bytes(r["chain_hash"]).hex() if r["chain_hash"] is not None else None,
    )


def reversal_draft(entry: PostedEntry, *, description: str, effective_at: datetime,
                   idempotency_key: str | None = None) -> EntryDraft:
    """The entry that undoes ``entry``: the same postings with sides swapped, naming what it reverses."""
    flipped = tuple(p.model_copy(update={"side": "credit" if p.side == "debit" else "debit"})
                    for p in entry.postings)
    return EntryDraft(
        kind="reversal", description=description, effective_at=effective_at, postings=flipped,
        idempotency_key=idempotency_key, invoice_id=entry.invoice_id, payment_id=entry.payment_id,
        settlement_id=entry.settlement_id, reverses=entry.id,
    )


async def reverse_entry(conn: asyncpg.Connection, entry_id: int, *, description: str, effective_at: datetime,
                        idempotency_key: str | None = None) -> PostedEntry:
    """Post the reversing entry of ``entry_id`` in the caller's transaction.

    Raises ``EntryNotFound``, or ``AlreadyReversed`` if it was reversed before (the database's UNIQUE
    constraint decides, so two concurrent reversals cannot both succeed). With an idempotency key already
    used by this reversal, returns that first entry; used by another entry, raises ``IdempotencyConflict``.
    """
    original = await get_entry(conn, entry_id)
    return await post_entry(conn, reversal_draft(original, description=description, effective_at=effective_at,
                                                 idempotency_key=idempotency_key))


async def list_entries(
    conn: asyncpg.Connection, *, account_prefix: str | None = None, account: str | None = None,
    kind: str | None = None, invoice_id: str | None = None, payment_id: str | None = None,
    settlement_id: str | None = None, effective_from: datetime | None = None,
    effective_to: datetime | None = None, before_id: int | None = None, limit: int = 50,
) -> tuple[list[PostedEntry], int | None]:
    """Entries newest first, filtered; returns the page and the ``before_id`` of the next page (or None).

    ``account_prefix`` keeps entries touching an account whose code starts with it (e.g. ``agency:MOI:``).
    """
    ids = [r["id"] for r in await conn.fetch(
        Q.entries_page, account_prefix, kind, invoice_id, payment_id, settlement_id, effective_from,
        effective_to, account, before_id, limit + 1)]
    more = len(ids) > limit
    ids = ids[:limit]
    found = await get_entries(conn, ids)
    return [found[i] for i in ids], (ids[-1] if more else None)
