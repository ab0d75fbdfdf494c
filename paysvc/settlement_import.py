"""Importing a settlement file: parse → COPY into a staging table → match with joins → capture what we never
captured → post the settlement entry → raise exceptions → outbox events. One transaction, the caller's.

Matching is set-based (the SQL blocks in queries/settlements.sql): by provider transaction id, then by KHQR
md5 with the amount, then by bill number with the amount. Only the lines we never captured are handled one
by one, through ``capture`` (they are few; each needs the invoice rules).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from itertools import islice

import asyncpg

import ledger
from ledger import accounts
from ledger.postings import MAX_AMOUNT
from paysvc.capture import DuplicateCapture, capture, new_id
from paysvc.outbox import add_event
from paysvc.queries import Q
from paysvc.settlement_days import TIME_ZONE_NAME, last_day_in_grace, window
from providers import PaymentNotice, SettlementFormatError, SettlementLine

COPY_CHUNK = 20_000
STAGING_COLUMNS = ("line_no", "transaction_id", "md5", "bill_number", "amount", "currency", "paid_at", "fee",
                   "reference", "id_is_reference")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rules:
    """The settings reconciliation follows."""

    cutoff: time
    grace_days: int
    bank_account: str


@dataclass(frozen=True)
class Imported:
    settlement_id: str
    created: bool               # False: this file had been imported before; nothing changed


class SettlementConflict(Exception):
    """The same file was imported before for another provider or day, or with another format."""

    def __init__(self, detail: str, settlement_id: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.settlement_id = settlement_id


def file_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _records(lines: Iterable[SettlementLine], provider: str) -> Iterator[tuple]:
    last = 0
    totals: dict[str, int] = {}
    for ln in lines:
        totals[ln.currency] = total = totals.get(ln.currency, 0) + ln.amount
        if total > MAX_AMOUNT:  # the settlement entry posts a currency's total at once (found by fuzzing: a 500)
            raise SettlementFormatError(
                ln.line_no, f"the file's {ln.currency} lines add up to more than {MAX_AMOUNT:,} minor units by this "
                "line, more than one settlement can book: check the amounts, or split the file", provider=provider)
        if ln.line_no <= last:  # lines are keyed by their numbers (found by a review: a database error before)
            raise SettlementFormatError(
                ln.line_no, f"the {provider} plugin numbered this line {ln.line_no} after line {last}: each line "
                "needs a number greater than the one before; a defect of the plugin, not of the file (report it "
                "to its maintainers)", provider=provider)
        last = ln.line_no
        yield (ln.line_no, ln.transaction_id, ln.md5, ln.bill_number, ln.amount, ln.currency, ln.paid_at, ln.fee,
               ln.reference, ln.id_is_reference)


def _take(records: Iterator[tuple], n: int) -> list[tuple]:
    return list(islice(records, n))


async def import_settlement(conn: asyncpg.Connection, lines: Iterable[SettlementLine], *, data_sha256: bytes,
                            file_size: int, provider: str, fmt: str, business_date: date,
                            file_name: str | None, imported_by: str, now: datetime, rules: Rules,
                            timings: dict[str, float] | None = None) -> Imported:
    """Import one parsed file inside the caller's transaction (``lines`` is consumed lazily).

    A ``SettlementFormatError`` raised while ``lines`` is read propagates: the caller's rollback leaves
    nothing behind. Returns the existing settlement when this file (by SHA-256) was imported before.
    """
    clock = _Clock(timings)
    # One import of a provider at a time: matching reads which of its payments earlier files (of any day)
    # settled, so a file imported meanwhile waits for this one and then sees its lines.
    await lock_provider(conn, provider)
    settlement_id = new_id("stl")
    claimed = await conn.fetchval(Q.settlement_claim, settlement_id, provider, fmt, business_date, data_sha256,
                                  file_name, file_size, now, imported_by)
    if claimed is None:
        first = await conn.fetchrow(Q.settlement_by_sha, data_sha256)
        if (first["provider"], first["business_date"], first["format"]) != (provider, business_date, fmt):
            raise SettlementConflict(
                f"this file was already imported as settlement {first['id']} for provider {first['provider']} "
                f"on {first['business_date']} with format {first['format']}; the same file cannot settle another "
                "provider or day, nor be read with another format", first["id"])
        return Imported(first["id"], False)

    await conn.execute(Q.staging_create)
    records = _records(lines, provider)
    count = 0
    # Parsed in a worker thread, a chunk at a time: a large or hostile file must not hold the event loop, and
    # with it every other request of this instance (found by a security review: 5 s for one 4 MB statement).
    while chunk := await asyncio.to_thread(_take, records, COPY_CHUNK):
        await conn.copy_records_to_table("settlement_staging", records=chunk, columns=STAGING_COLUMNS)
        count += len(chunk)
    await conn.execute(Q.staging_analyze)
    clock.lap("parse_and_copy")

    await conn.execute(Q.match_by_transaction_id, provider)
    await conn.execute(Q.match_by_md5, provider)
    await conn.execute(Q.match_by_bill_number, provider)
    await conn.execute(Q.categorize)
    clock.lap("match")

    start, end = window(business_date, rules.cutoff)
    missing = await conn.fetch(Q.staging_missing)
    line_nos, payment_ids, created = [], [], []
    taken: set[str] = set()  # the payments lines of this file were taken for so far (capture's ``listed``)
    for row in missing:
        notice = PaymentNotice(
            provider=provider,
            transaction_id=row["transaction_id"] or f"{settlement_id}:{row['line_no']}",
            md5=row["md5"], bill_number=row["bill_number"], amount=row["amount"], currency=row["currency"],
            paid_at=row["paid_at"] or end, confirmed=True,
            raw={"settlement_id": settlement_id, "line_no": row["line_no"], "reference": row["reference"],
                 "fee": row["fee"],
                 # Named by the file, not by the provider's transaction id: its callback may come under another.
                 "id_is_reference": row["transaction_id"] is None or row["id_is_reference"]})
        try:
            result = await capture(conn, notice, source="settlement", now=now, flag="missing_in_ledger",
                                   listed=taken)
        except DuplicateCapture:
            raise SettlementConflict("a payment in this file was captured concurrently; import the file again",
                                     settlement_id) from None
        line_nos.append(row["line_no"])
        payment_ids.append(result.payment_id)
        taken.add(result.payment_id)
        created.append(result.created)
    if missing:
        await conn.execute(Q.staging_set_captured, line_nos, payment_ids, created, provider)
        await conn.execute(Q.staging_duplicates_follow)
    clock.lap("capture_missing")

    await conn.execute(Q.staging_exception_ids)
    await conn.execute(Q.exceptions_from_staging, settlement_id, provider, business_date, now)
    await conn.execute(Q.events_exceptions_opened_from_staging, now)  # queries/events.sql
    await conn.execute(Q.lines_from_staging, settlement_id)
    clock.lap("store_lines")

    totals = await conn.fetch(Q.staging_posting_totals)
    entry_id = None
    draft = settlement_draft(settlement_id, provider, business_date, [dict(t) for t in totals],
                             bank_account=rules.bank_account, effective_at=end)
    if draft is not None:
        entry_id = (await ledger.post_entry(conn, draft)).id
    await conn.execute(Q.close_missing_settled_late, settlement_id, now, str(entry_id) if entry_id else None)
    clock.lap("post")

    if payment_ids:
        await conn.execute(Q.line_exceptions_date, business_date, payment_ids)
    await conn.execute(Q.day_exceptions_date, provider, start, end, business_date)
    await raise_overdue(conn, provider=provider, today=_today(now, rules), rules=rules, now=now)
    summary = [dict(r) for r in await conn.fetch(Q.staging_summary)]
    await conn.execute(Q.settlement_finish, settlement_id, count, entry_id,
                       {"lines": summary, "posted": [dict(t) for t in totals]})
    for r in await conn.fetch(Q.staging_agency_totals):
        await add_event(conn, agency_id=r["agency_id"], type="settlement.reconciled", occurred_at=now, data={
            "settlement_id": settlement_id, "provider": provider, "business_date": business_date.isoformat(),
            "business_date_time_zone": TIME_ZONE_NAME, "currency": r["currency"], "payments": r["payments"],
            "amount": r["amount"], "fees": r["fees"]})
    clock.lap("report_and_events")
    return Imported(settlement_id, True)


def settlement_draft(settlement_id: str, provider: str, business_date: date, totals: list[dict], *,
                     bank_account: str, effective_at: datetime) -> ledger.EntryDraft | None:
    """The ledger's settlement entry, per currency: debit bank (net) and provider fees, credit clearing (gross)."""
    postings = []
    for t in totals:
        cur, gross, fees = t["currency"], t["gross"], t["fees"]
        if gross <= 0:
            continue
        if fees > gross:
            raise ValueError(f"settlement fees {fees} exceed the settled amount {gross} {cur}")
        if gross - fees:
            postings.append(ledger.Posting(account=accounts.treasury_bank(bank_account, cur), side="debit",
                                           amount=gross - fees, currency=cur))
        if fees:
            postings.append(ledger.Posting(account=accounts.provider_fees(provider, cur), side="debit",
                                           amount=fees, currency=cur))
        postings.append(ledger.Posting(account=accounts.provider_clearing(provider, cur), side="credit",
                                       amount=gross, currency=cur))
    if not postings:
        return None
    return ledger.EntryDraft(
        kind="settlement", description=f"{provider} settlement of {business_date.isoformat()} ({settlement_id})",
        effective_at=effective_at, postings=postings, idempotency_key=f"settlement:{settlement_id}",
        settlement_id=settlement_id)


def _today(now: datetime, rules: Rules) -> date:
    from paysvc.settlement_days import business_date

    return business_date(now, rules.cutoff)


async def lock_provider(conn: asyncpg.Connection, provider: str) -> None:
    """Hold the provider's settlement lock to the end of the caller's transaction (see ``provider_lock``)."""
    await conn.execute(Q.provider_lock, provider)


_EVERYTHING = datetime.min.replace(tzinfo=UTC)  # paid after the start of time: every payment is read
# The bounded read as a statement of its own: a connection that ran the full read five times would otherwise
# give the bounded one the full read's cached plan, a sequential scan (found by review).
_BOUNDED = "-- bounded by the provider's mark\n" + Q.raise_missing_in_settlement


async def raise_overdue(conn: asyncpg.Connection, *, provider: str | None, today: date, rules: Rules,
                        now: datetime, locked: bool = False, full: bool = False) -> int:
    """Raise ``missing_in_settlement`` for payments still unsettled after the grace; returns how many.

    Holds the provider's settlement lock (every provider's, in order, when ``provider`` is None) to the end
    of the caller's transaction: an import running meanwhile has lines it has not committed yet, and a check
    that does not wait for it raised the payments that import settles (found by review). ``locked``: the caller
    holds the provider's lock already.

    Reads only the payments its provider's mark leaves to check (paid after the last check's end, or recorded
    by a transaction that check could not see: migration 0057), and moves the mark. ``full`` (and ``provider``
    None) reads every payment, as ``paysvc settlements recheck`` does, and sets the mark."""
    names = [provider] if provider is not None else [r["provider"] for r in await conn.fetch(Q.payment_providers)]
    if not locked:
        for name in names:
            await lock_provider(conn, name)
    _, until = window(last_day_in_grace(today, rules.grace_days), rules.cutoff)
    full = full or provider is None
    mark = await conn.fetchrow(Q.overdue_mark, provider)  # before the read: its xmin is what the read cannot see
    if full or mark["checked_until"] is None:
        rows = await conn.fetch(Q.raise_missing_in_settlement, provider, until, TIME_ZONE_NAME, rules.cutoff, now,
                                _EVERYTHING, 0)
    else:
        if until < mark["checked_until"]:
            log.warning("the overdue mark of %s reaches %s, later than this check's %s (was a clock ahead?); it "
                        "moves again once checks pass it, or at `paysvc settlements recheck --provider %s`",
                        provider, mark["checked_until"].isoformat(), until.isoformat(), provider)
        rows = await conn.fetch(_BOUNDED, provider, until, TIME_ZONE_NAME, rules.cutoff, now,
                                mark["checked_until"], mark["checked_xmin"])
    await conn.execute(Q.events_exceptions_opened, [r["id"] for r in rows], now)  # queries/events.sql
    await conn.execute(Q.overdue_marks_set, names, until, mark["xmin"], full)
    return len(rows)


def overdue_check(pool: asyncpg.Pool, rules: Rules):
    """The background job that raises ``missing_in_settlement``: a payment whose provider never sends its file
    has no import to raise it, and that is the case the exception is for (found by a review of the docs: only
    imports and ``paysvc settlements recheck`` ran the check).

    Each process checks, once per business day, every provider that has had a settlement imported: one that
    never has is not reconciled here (a provider with no settlement format, a sandbox), and raising its whole
    history would tell treasury nothing (found by review). Each provider in a transaction of its own, under
    its settlement lock taken without waiting: a provider whose import is running is skipped, since that
    import checks it before it commits, and checked again at the next pass (found by review: one pass holding
    every provider's lock made each wait for the slowest import). A payment captured later in the day with an
    earlier payment time is raised by the next day's pass, or its provider's next import."""
    from paysvc.invoicing import now_utc

    done: dict[date, set[str]] = {}

    async def check() -> str | None:
        now = now_utc()
        today = _today(now, rules)
        checked = done.setdefault(today, set())
        for day in [d for d in done if d != today]:
            del done[day]
        raised, busy = 0, []
        async with pool.acquire() as conn:
            for name in [r["provider"] for r in await conn.fetch(Q.settled_providers)]:
                if name in checked:
                    continue
                async with conn.transaction():
                    if not await conn.fetchval(Q.provider_try_lock, name):
                        busy.append(name)
                        continue
                    raised += await raise_overdue(conn, provider=name, today=today, rules=rules, now=now,
                                                  locked=True)
                checked.add(name)
        said = [f"raised {raised} missing_in_settlement exception(s) for business day {today.isoformat()}"] if raised else []
        if busy:
            said.append(f"{', '.join(busy)} skipped while an import or a resolution holds its settlement lock "
                        "(checked again in an hour)")
        return "; ".join(said) or None

    return check


class _Clock:
    def __init__(self, timings: dict[str, float] | None) -> None:
        import time as _time

        self._now = _time.perf_counter
        self._timings = timings
        self._last = self._now()

    def lap(self, name: str) -> None:
        t = self._now()
        if self._timings is not None:
            self._timings[name] = self._timings.get(name, 0.0) + (t - self._last)
        self._last = t

