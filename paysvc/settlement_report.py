"""The reconciliation report of a settlement (JSON and CSV) and the treasury's day grid.

Every time in a report is UTC and says so; business dates are Asia/Phnom_Penh days and say so.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg

from paysvc.queries import Q
from paysvc.settlement_days import TIME_ZONE_NAME, grace_over, window
from paysvc.settlement_import import Rules

# The day's unsettled payments a report lists (report.csv lists every one).
UNSETTLED_LIMIT = 1000
LINE_CATEGORIES = ("matched", "amount_mismatch", "missing_in_ledger", "duplicate_in_settlement")
PAYMENT_STATES = ("matched", "amount_mismatch", "missing_in_ledger", "missing_in_settlement", "expected")
# A category outside these (settled_after_resolution: a line for a payment whose missing_in_settlement was
# already written off or refunded) appears in the totals only when some line or payment has it.


def _totals(rows, key: str, names: tuple[str, ...], count_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {n: {"count": 0, "amounts": {}} for n in names}
    for r in rows:
        slot = out.setdefault(r[key], {"count": 0, "amounts": {}})
        slot["count"] += r[count_field]
        slot["amounts"][r["currency"]] = slot["amounts"].get(r["currency"], 0) + r["amount"]
    return out


async def report(conn: asyncpg.Connection, settlement_id: str, *, rules: Rules, today: date,
                 lines_limit: int = 200, after_line: int = 0) -> dict[str, Any] | None:
    """The settlement's report as it stands now, or None when there is no such settlement."""
    s = await conn.fetchrow(Q.settlement_get, settlement_id)
    if s is None:
        return None
    day: date = s["business_date"]
    start, end = window(day, rules.cutoff)
    line_rows = await conn.fetch(Q.settlement_line_totals, settlement_id)
    pay_rows = await conn.fetch(Q.day_payment_states, s["provider"], start, end)
    remaining = await conn.fetch(Q.day_remaining, s["provider"], start, end)
    posted = await conn.fetch(Q.settlement_entry_postings, s["journal_entry_id"]) if s["journal_entry_id"] else []
    lines = await conn.fetch(Q.settlement_lines_page, settlement_id, after_line, lines_limit + 1)
    unsettled = await conn.fetch(Q.day_unsettled_payments, s["provider"], start, end, UNSETTLED_LIMIT + 1)
    open_exc = await conn.fetch(Q.day_open_exceptions, s["provider"], day)
    line_totals = _totals(line_rows, "category", LINE_CATEGORIES, "lines")
    for r in line_rows:
        slot = line_totals[r["category"]]
        slot.setdefault("fees", {})[r["currency"]] = slot.get("fees", {}).get(r["currency"], 0) + r["fees"]
    return {
        "id": s["id"], "provider": s["provider"], "format": s["format"],
        "business_date": day.isoformat(), "business_date_time_zone": TIME_ZONE_NAME, "times_time_zone": "UTC",
        "business_day_window_utc": {"after": start.isoformat(), "until": end.isoformat()},
        "file": {"sha256": s["file_sha256"], "name": s["file_name"], "size": s["file_size"],
                 "lines": s["line_count"]},
        "imported_at": s["imported_at"].isoformat(), "imported_by": s["imported_by"],
        "lines_by_category": line_totals,
        "payments_of_the_day": _totals(pay_rows, "state", PAYMENT_STATES, "payments"),
        "grace_days": rules.grace_days,
        "grace_over": grace_over(day, today, rules.grace_days),
        "settlement_entry": {"id": s["journal_entry_id"], "postings": [dict(p) for p in posted]},
        "clearing_remaining": _totals(remaining, "why", ("expected", "missing_in_settlement", "amount_mismatch"),
                                      "payments"),
        "clean": not open_exc and not remaining,
        "open_exceptions": [{**dict(e), "opened_at": e["opened_at"].isoformat()} for e in open_exc],
        "lines": [_line_json(r) for r in lines[:lines_limit]],
        "next_after_line": _next_after_line(lines, lines_limit, after_line),
        # Not paged with the lines (found by review: the import's summary, lines_limit 0, said none was unsettled)
        "unsettled_payments": [{**dict(u), "paid_at": u["paid_at"].isoformat()} for u in unsettled[:UNSETTLED_LIMIT]],
        "unsettled_payments_more": len(unsettled) > UNSETTLED_LIMIT,
        "summary_at_import": s["summary"],
    }


def _next_after_line(lines, lines_limit: int, after_line: int) -> int | None:
    """Where the next page starts: after the last line given, or, when none was asked for (lines_limit 0,
    a summary), where this page started. None when no line follows. ``lines`` holds one line more than
    asked for when more follow."""
    if len(lines) <= lines_limit:
        return None
    return lines[lines_limit - 1]["line_no"] if lines_limit else after_line


def _line_json(r) -> dict[str, Any]:
    d = dict(r)
    d["paid_at"] = r["paid_at"].isoformat() if r["paid_at"] else None
    return d


CSV_HEADER = ("settlement_id", "provider", "business_date_asia_phnom_penh", "record", "line_no", "transaction_id",
              "md5", "bill_number", "amount_minor", "currency", "fee_minor", "paid_at_utc", "reference", "category",
              "matched_by", "payment_id", "exception_id", "exception_state", "payment_exception_id",
              "payment_exception_state", "payment_exception_reason")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class SafeCells:
    """A CSV writer whose text cells cannot start a spreadsheet formula: one that would (= + - @, a tab or a
    carriage return first) is written with a leading apostrophe, which spreadsheets show as text (found by a
    security review: a settlement file's transaction id =HYPERLINK(…) reached treasury's Excel as a formula).
    The files' texts come from providers and banks, some typed by payers."""

    def __init__(self, writer) -> None:
        self._writer = writer

    def writerow(self, row) -> None:
        self._writer.writerow(["'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v for v in row])


async def report_csv(conn: asyncpg.Connection, settlement_id: str, *, rules: Rules,
                     chunk: int = 5000) -> AsyncIterator[bytes]:
    """The report as CSV, streamed: every line of the file, then the day's payments no line settled.

    Runs inside a transaction (server-side cursor). Times are UTC (``paid_at_utc``); the business date is
    an Asia/Phnom_Penh day.
    """
    s = await conn.fetchrow(Q.settlement_get, settlement_id)
    buf = io.StringIO()
    w = SafeCells(csv.writer(buf, lineterminator="\n"))
    w.writerow(CSV_HEADER)
    day = s["business_date"].isoformat()

    def utc(t: datetime | None) -> str:
        return t.astimezone(timezone.utc).isoformat() if t else ""

    after = 0
    while True:
        rows = await conn.fetch(Q.settlement_lines_page, settlement_id, after, chunk)
        for r in rows:
            w.writerow((s["id"], s["provider"], day, "line", r["line_no"], r["transaction_id"] or "", r["md5"] or "",
                        r["bill_number"] or "", r["amount"], r["currency"], r["fee"], utc(r["paid_at"]),
                        r["reference"] or "", r["category"], r["matched_by"] or "", r["payment_id"] or "",
                        r["exception_id"] or "", r["exception_state"] or "", r["payment_exception_id"] or "",
                        r["payment_exception_state"] or "", r["payment_exception_reason"] or ""))
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
        if len(rows) < chunk:
            break
        after = rows[-1]["line_no"]
    start, end = window(s["business_date"], rules.cutoff)
    for u in await conn.fetch(Q.day_unsettled_payments, s["provider"], start, end, None):
        state = "missing_in_settlement" if u["exception_id"] else "expected"
        w.writerow((s["id"], s["provider"], day, "payment", "", u["provider_transaction_id"], "",
                    u["bill_number"] or "", u["amount"], u["currency"], 0, utc(u["paid_at"]), "", state, "",
                    u["id"], u["exception_id"] or "", u["exception_state"] or "", "", "", ""))
    yield buf.getvalue().encode()


async def day_grid(conn: asyncpg.Connection, *, today: date, days: int, providers: list[str],
                   rules: Rules) -> list[dict]:
    """Business days × providers, newest first, each ``matched``, ``exceptions open``, ``left in clearing``
    or ``not received``.

    ``matched`` is the report's ``clean``: no open exception and nothing of the day's payments left in
    clearing. A day whose files settle nothing (a header-only file) while its payments are still expected
    is ``left in clearing``, not ``matched``.
    """
    rows = await conn.fetch(Q.day_grid, today - timedelta(days=days - 1), today, providers)
    out = []
    for r in rows:
        if r["settlements"] == 0:
            state = "not received"
        elif r["open_exceptions"]:
            state = "exceptions open"
        else:
            start, end = window(r["business_date"], rules.cutoff)
            remaining = await conn.fetch(Q.day_remaining, r["provider"], start, end)
            state = "left in clearing" if remaining else "matched"
        out.append({"business_date": r["business_date"].isoformat(), "provider": r["provider"], "state": state,
                    "settlements": r["settlements"], "open_exceptions": r["open_exceptions"]})
    return out


async def day_overview(conn: asyncpg.Connection, provider: str, day: date, *, rules: Rules,
                       exceptions_limit: int, exceptions_after: str | None = None) -> dict[str, Any]:
    """What a provider's business day stands at, with or without a settlement file: the day's payments, what
    is left in clearing, how many exceptions are open and one page of them (``next_exceptions_after`` is the
    cursor of the next page, None after the last). ``clean`` is the report's ``clean``."""
    start, end = window(day, rules.cutoff)
    pay_rows = await conn.fetch(Q.day_payment_states, provider, start, end)
    remaining = await conn.fetch(Q.day_remaining, provider, start, end)
    open_count = await conn.fetchval(Q.day_open_exception_count, provider, day)
    page = await conn.fetch(Q.day_open_exceptions_page, provider, day, exceptions_after, exceptions_limit + 1)
    return {
        "payments_of_the_day": _totals(pay_rows, "state", PAYMENT_STATES, "payments"),
        "clearing_remaining": _totals(remaining, "why", ("expected", "missing_in_settlement", "amount_mismatch"),
                                      "payments"),
        "clean": not open_count and not remaining,
        "open_exception_count": open_count,
        "open_exceptions": [dict(e) for e in page[:exceptions_limit]],
        "next_exceptions_after": page[exceptions_limit - 1]["id"] if len(page) > exceptions_limit else None,
    }


async def settlement_page(conn: asyncpg.Connection, settlement_id: str, *, lines_limit: int,
                          after_line: int = 0) -> dict[str, Any]:
    """One settlement of a day as the treasury day page shows it: the file, its totals per category and one
    page of its lines (``next_after_line`` as in ``report``)."""
    s = await conn.fetchrow(Q.settlement_get, settlement_id)
    line_rows = await conn.fetch(Q.settlement_line_totals, settlement_id)
    lines = await conn.fetch(Q.settlement_lines_page, settlement_id, after_line, lines_limit + 1)
    return {
        "id": s["id"], "format": s["format"],
        "file": {"name": s["file_name"], "lines": s["line_count"]},
        "imported_at": s["imported_at"].isoformat(), "imported_by": s["imported_by"],
        "lines_by_category": _totals(line_rows, "category", LINE_CATEGORIES, "lines"),
        "lines": [_line_json(r) for r in lines[:lines_limit]],
        "after_line": after_line,
        "next_after_line": _next_after_line(lines, lines_limit, after_line),
    }
