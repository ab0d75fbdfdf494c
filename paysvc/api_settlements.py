"""Treasury's settlement API: upload a provider's file for a business day, read its report (JSON, CSV), list.

``provider`` names whose payments the file settles (the name they were captured under); ``format`` picks
the parser (a registered provider plugin's ``parse_settlement``), by default the provider's own. A bank
statement for sandbox payments is ``provider=sandbox, format=camt053``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import unicodedata
from datetime import date, datetime
from typing import Annotated, Any, Literal

from aiohttp import BodyPartReader, web
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

import paysvc.web
from paysvc.errors import (Conflict, MalformedRequest, NotFound, PayloadTooLarge, Problem, RequestTimeout, ValidationFailed,
                           invalid)
from paysvc.invoicing import now_utc
from paysvc.settings import Settings
from paysvc.settlement_days import TIME_ZONE_NAME, business_date, parse_cutoff
from paysvc.settlement_import import Imported, Rules, SettlementConflict, file_digest, import_settlement
from paysvc.settlement_report import report, report_csv
from paysvc.queries import Q
from paysvc.web import (POOL, PROVIDERS, SETTINGS, UNREADABLE_FORM, Route, add_routes, json_response, parse_query,
                        principal, reader, refuse_encoded_body)
from providers import ProviderError, SettlementFormatError, Unsupported, available_providers, load_providers


class SettlementFileInvalid(Problem):
    status = 422
    slug = "settlement-file-invalid"
    title = "Settlement file is not valid"


def rules_of(settings: Settings) -> Rules:
    return Rules(cutoff=parse_cutoff(settings.business_day_cutoff), grace_days=settings.settlement_grace_days,
                 bank_account=settings.treasury_bank_account)


def parser_for(enabled: dict, fmt: str, field: str = "format"):
    """The plugin that reads ``fmt``: an enabled provider, or a registered one that needs no configuration.

    ``field`` is the form field that named it: ``provider`` when no ``format`` was given."""
    if fmt in enabled:
        return enabled[fmt]
    if fmt not in available_providers():
        raise ValidationFailed(f"no settlement format for {field} {fmt!r}; available: "
                               f"{', '.join(available_providers())}",
                               errors=[{"field": field, "message": "unknown format", "code": "unknown"}])
    try:
        return load_providers({fmt: {}})[fmt]
    except ProviderError as exc:
        raise ValidationFailed(f"format {fmt!r} needs its provider enabled on this instance: add {fmt} to "
                               f"PAYSVC_PROVIDERS, with its settings (PAYSVC_{fmt.upper()}_…), and restart "
                               f"({exc})") from None


def check_provider(provider: str, enabled: dict) -> None:
    """``provider`` must be a registered plugin that captures payments: payments are captured only under
    those, and a typo, or a file format's name (camt053), would otherwise open its own clearing account and
    report the whole file as missing_in_ledger."""
    if provider not in available_providers():
        # only the names payments are captured under (found by a walk-through: camt053 was offered, then refused)
        names = [n for n in available_providers() if _captures_payments(n, enabled)]
        raise ValidationFailed(f"provider {provider!r} is not a registered provider; use one of: {', '.join(names)}",
                               errors=[{"field": "provider", "message": f"must be one of: {', '.join(names)}",
                                        "code": "unknown"}])
    if not _captures_payments(provider, enabled):
        raise ValidationFailed(
            f"{provider!r} is a settlement file format, not a provider payments are captured under: send "
            f"format={provider} with the provider whose payments the file settles as provider",
            errors=[{"field": "provider", "message": "a file format, not a payment provider; give it as format",
                     "code": "format_only"}])


def _captures_payments(provider: str, enabled: dict) -> bool:
    plugin = enabled.get(provider)
    if plugin is None:
        try:
            plugin = load_providers({provider: {}})[provider]
        except ProviderError:
            return True  # it needs its configuration to be built: a provider payments are captured under
    return getattr(plugin, "captures_payments", True)


FIRST_BUSINESS_DATE, LAST_BUSINESS_DATE = date(2000, 1, 1), date(2099, 12, 31)


def check_business_date(day: date) -> date:
    """The business dates a settlement may have, the same for the API and the command line."""
    if not FIRST_BUSINESS_DATE <= day <= LAST_BUSINESS_DATE:
        raise ValueError(f"business_date {day.isoformat()} is out of range: it must lie between "
                         f"{FIRST_BUSINESS_DATE.isoformat()} and {LAST_BUSINESS_DATE.isoformat()}")
    return day


def _iso_date_text(value: object) -> object:
    """A form's business_date is text written YYYY-MM-DD: pydantic would also read a number of seconds since
    1970 as a date, and then refuse it in its own words (found by a fuzz audit)."""
    if isinstance(value, str) and not ISO_DATE.fullmatch(value):
        raise ValueError(f"business_date {value[:40]!r} must be a date written YYYY-MM-DD, e.g. 2026-11-24")
    return value


# Only this form, on the command line and the treasury pages too: Python's date.fromisoformat also reads
# 20261124 and 2026-W48-4.
ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def iso_date(text: str) -> date:
    """The date ``text`` names, written YYYY-MM-DD and only so; ValueError otherwise."""
    if not ISO_DATE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not written YYYY-MM-DD")
    return date.fromisoformat(text)


class UploadForm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Names are checked against the registry by run_import, which lists the valid ones.
    provider: Annotated[str, Field(min_length=1, max_length=64)]
    business_date: Annotated[date, BeforeValidator(_iso_date_text), AfterValidator(check_business_date)]
    format: Annotated[str, Field(min_length=1, max_length=64)] | None = None


async def run_import(pool, enabled: dict, settings: Settings, *, provider: str, fmt: str | None, day: date,
                     data: bytes, file_name: str | None, imported_by: str,
                     timings: dict | None = None) -> Imported:
    """Parse and import in one transaction; a malformed file raises ``SettlementFileInvalid`` (nothing kept)."""
    check_provider(provider, enabled)
    try:
        check_business_date(day)
    except ValueError as exc:
        raise ValidationFailed(str(exc), errors=[{"field": "business_date", "message": str(exc),
                                                  "code": "out_of_range"}]) from None
    rules = rules_of(settings)
    now = now_utc()
    today = business_date(now, rules.cutoff)
    if day > today:
        # A day not begun has nothing to settle; its file is another day's, mistyped (found by a walk-through:
        # such files were imported, and no day page showed them)
        raise ValidationFailed(f"business_date {day.isoformat()} has not begun yet: today is {today.isoformat()} "
                               f"({TIME_ZONE_NAME}); give the day the file settles",
                               errors=[{"field": "business_date", "message": "in the future", "code": "in_the_future"}])
    field = "format" if fmt else "provider"  # the form field that named the format, for the error
    fmt = fmt or provider
    parser = parser_for(enabled, fmt, field)
    try:
        # In a worker thread, as the import reads the lines: a plugin may parse the whole file when called
        lines = await asyncio.to_thread(parser.parse_settlement, data)
        async with pool.acquire() as conn:
            async with conn.transaction():
                return await import_settlement(
                    conn, lines, data_sha256=file_digest(data), file_size=len(data),
                    provider=provider, fmt=fmt, business_date=day, file_name=file_name, imported_by=imported_by,
                    now=now, rules=rules, timings=timings)
    except SettlementFormatError as exc:
        raise SettlementFileInvalid(f"line {exc.line_no}: {exc.reason}; nothing was imported", line=exc.line_no,
                                    reason=exc.reason) from None
    except Unsupported:  # a plugin that reads no settlement file (aba_payway, bakong)
        raise ValidationFailed(f"{fmt!r} has no settlement file format; name the file's format with {field}=",
                               errors=[{"field": field, "message": "no settlement file format",
                                        "code": "unsupported"}]) from None
    except SettlementConflict as exc:
        raise Conflict(exc.detail, settlement_id=exc.settlement_id) from None


MAX_FILE_NAME = 255  # settlements.file_name
MIN_UPLOAD_RATE = 16 * 1024  # bytes per second, on average, that a settlement upload must arrive at
MAX_UPLOAD_SECONDS = 900  # and the longest it may take whole (512 MiB, the largest by default, at 600 KB/s)


def _file_name(name: str | None) -> str | None:
    """The uploaded file's name as it is kept, or a 422 saying what is wrong with it."""
    if name is None:
        return None
    if len(name) > MAX_FILE_NAME:
        raise ValidationFailed(f"the file's name is {len(name)} characters long; at most {MAX_FILE_NAME}: rename "
                               "the file", errors=[{"field": "file", "message": "file name too long",
                                                    "code": "too_long"}])
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):  # control characters; bytes not UTF-8
        raise ValidationFailed("the file's name holds control characters or bytes that are not UTF-8: rename the "
                               "file", errors=[{"field": "file", "message": "file name not printable text",
                                                "code": "invalid"}])
    return name


async def upload(request: web.Request) -> web.Response:
    who = await principal(request, "treasury")
    settings = request.app[SETTINGS]
    if not request.content_type.startswith("multipart/"):
        raise MalformedRequest("send multipart/form-data with the fields file, provider, business_date (and "
                               "optionally format)")
    refuse_encoded_body(request)
    fields: dict[str, str] = {}
    data: bytes | None = None
    file_name = None
    started = asyncio.get_running_loop().time()

    async def arriving(step):
        """``step`` (a read of the form) within BODY_SECONDS, and the body arriving at MIN_UPLOAD_RATE on average
        once BODY_SECONDS have passed: a file may take long to come whole, but an upload that stalls, or trickles,
        holds an admission slot (found by a review of the docs: one that stalled held it for good; and by review:
        a few bytes every few seconds held it as long)."""
        seconds = paysvc.web.BODY_SECONDS
        try:
            async with asyncio.timeout(seconds):
                out = await step
        except TimeoutError:
            raise RequestTimeout(f"the upload stalled: nothing came for {seconds:g} s after "
                                 f"{request.content.total_bytes} bytes; send it again") from None
        elapsed = asyncio.get_running_loop().time() - started
        if elapsed > MAX_UPLOAD_SECONDS:  # found by review: 16 KiB/s alone let a large file hold a slot for hours
            raise RequestTimeout(f"the upload took more than {MAX_UPLOAD_SECONDS // 60} minutes "
                                 f"({request.content.total_bytes} bytes came): send it again over a faster "
                                 "connection, or split the file") from None
        if elapsed > seconds and request.content.total_bytes < MIN_UPLOAD_RATE * (elapsed - seconds):
            raise RequestTimeout(f"the upload is too slow: {request.content.total_bytes} bytes in {elapsed:.0f} s, "
                                 f"less than {MIN_UPLOAD_RATE // 1024} KiB/s after its first {seconds:g} s; send it "
                                 "again over a faster connection") from None
        return out

    try:
        reader = await arriving(request.multipart())
        while (part := await arriving(reader.next())) is not None:
            if not isinstance(part, BodyPartReader):
                raise ValidationFailed("a form part is itself multipart; send each field as a plain part, as a "
                                       "browser or curl -F would")
            if part.name == "file":
                if data is not None:
                    raise ValidationFailed("form field 'file' is sent twice; send one settlement file")
                file_name = _file_name(part.filename)
                chunks, size = [], 0
                while chunk := await arriving(part.read_chunk(1024**2)):
                    size += len(chunk)
                    if size > settings.settlement_max_bytes:
                        raise PayloadTooLarge(f"the file is larger than {settings.settlement_max_bytes} bytes")
                    chunks.append(chunk)
                data = b"".join(chunks)
            elif part.name in ("provider", "business_date", "format"):
                if part.name in fields:
                    raise ValidationFailed(f"form field {part.name!r} is sent twice; send it once")
                fields[part.name] = (await arriving(part.text())).strip()
            else:
                raise ValidationFailed(f"unknown form field {part.name!r}")
    except UNREADABLE_FORM as exc:
        raise MalformedRequest(f"the multipart/form-data body cannot be read ({exc}); send the fields file, "
                               "provider and business_date as a browser or curl -F would") from None
    if data is None:
        raise ValidationFailed("the settlement file is missing: send it as the form field 'file'",
                               errors=[{"field": "file", "message": "required", "code": "missing"}])
    try:
        form = UploadForm.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc, "form fields") from None
    done = await run_import(request.app[POOL], request.app[PROVIDERS], settings, provider=form.provider,
                            fmt=form.format, day=form.business_date, data=data, file_name=file_name,
                            imported_by=who.actor)
    body = await _report(request, done.settlement_id)
    body["replayed"] = not done.created
    return json_response(body, status=201 if done.created else 200,
                         headers={"Location": f"/v1/settlements/{done.settlement_id}"})


async def _report(request: web.Request, settlement_id: str, **kw) -> dict[str, Any]:
    settings = request.app[SETTINGS]
    rules = rules_of(settings)
    async with request.app[POOL].acquire() as conn:
        out = await report(conn, settlement_id, rules=rules, today=business_date(now_utc(), rules.cutoff), **kw)
    if out is None:
        raise NotFound(f"no settlement {settlement_id!r}")
    return out


MAX_LINE_NO = 2**31 - 1  # settlement_lines.line_no is an integer (found by fuzzing: a larger after_line was a 400
# saying numbers must fit in 64 bits)


class ReportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines_limit: Annotated[int, Field(ge=0, le=5000)] = 200
    after_line: Annotated[int, Field(ge=0, le=MAX_LINE_NO)] = 0


async def get_settlement(request: web.Request) -> web.Response:
    await principal(request, "treasury")
    q = parse_query(ReportQuery, request)
    return json_response(await _report(request, request.match_info["id"], lines_limit=q.lines_limit,
                                       after_line=q.after_line))


class SettledPaymentsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after_line: Annotated[int, Field(ge=0, le=MAX_LINE_NO, description="the last line_no of the previous page")] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 200


class SettledPayment(BaseModel):
    line_no: int = Field(description="the file's line that settled it")
    category: Literal["matched", "missing_in_ledger"] = Field(
        description="matched: a payment booked before; missing_in_ledger: booked from this line")
    payment_id: str
    provider_transaction_id: str
    invoice_id: str | None = Field(description="null for a payment of no invoice of ours")
    invoice_reference: str | None = Field(description="the portal's own reference of that invoice")
    bill_number: str | None
    agency: str | None = Field(description="the agency's code; null for a payment of no agency (treasury only)")
    currency: Literal["KHR", "USD"]
    amount: int = Field(description="what the line settled, in minor units")
    fee: int = Field(description="the provider's fee on the line, in minor units")
    paid_at: datetime


class SettledPayments(BaseModel):
    settlement_id: str
    provider: str
    business_date: date
    business_date_time_zone: str
    data: list[SettledPayment]
    next_after_line: int | None = Field(description="pass back as after_line for the next page; null on the last")


async def settled_payments(request: web.Request) -> web.Response:
    """The payments a settlement settled, one per line: an agency's own (its key with invoices:read), or every
    agency's (a treasury key). What an agency's ``settlement.reconciled`` event counts, payment by payment, so
    its back office can mark each invoice's money as arrived."""
    p = await reader(request)
    q = parse_query(SettledPaymentsQuery, request)
    settlement_id = request.match_info["id"]
    async with request.app[POOL].acquire() as conn, conn.transaction(readonly=True):
        found = await conn.fetchrow("SELECT provider, business_date FROM settlements WHERE id = $1", settlement_id)
        if found is None:
            raise NotFound(f"no settlement {settlement_id!r}")
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = (await conn.fetch(Q.settled_payments_all, settlement_id, q.after_line, q.limit + 1)
                if p.agency_id is None else
                await conn.fetch(Q.settled_payments_of_agency, settlement_id, p.agency_id, q.after_line, q.limit + 1))
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return json_response(SettledPayments(
        settlement_id=settlement_id, provider=found["provider"], business_date=found["business_date"],
        business_date_time_zone=TIME_ZONE_NAME, data=[SettledPayment(**dict(r)) for r in rows],
        next_after_line=rows[-1]["line_no"] if more else None))


async def stream_csv(request: web.Request, settlement_id: str) -> web.StreamResponse:
    rules = rules_of(request.app[SETTINGS])
    async with request.app[POOL].acquire() as conn:
        if await conn.fetchval("SELECT 1 FROM settlements WHERE id = $1", settlement_id) is None:
            raise NotFound(f"no settlement {settlement_id!r}")
        resp = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="settlement-{settlement_id}.csv"'})
        await resp.prepare(request)
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            async for chunk in report_csv(conn, settlement_id, rules=rules):
                await resp.write(chunk)
    await resp.write_eof()
    return resp


async def get_csv(request: web.Request) -> web.StreamResponse:
    await principal(request, "treasury")
    return await stream_csv(request, request.match_info["id"])


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str | None = None
    business_date: date | None = None
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


async def list_settlements(request: web.Request) -> web.Response:
    await principal(request, "treasury")
    q = parse_query(ListQuery, request)
    after_ts = after_id = None
    if q.cursor:
        try:
            ts, _, after_id = base64.urlsafe_b64decode(q.cursor + "=" * (-len(q.cursor) % 4)).decode().partition("|")
            after_ts = datetime.fromisoformat(ts)
        except (ValueError, UnicodeDecodeError):
            raise MalformedRequest("cursor is not valid: pass back next_cursor unchanged") from None
    rows = await request.app[POOL].fetch(Q.settlements_list, q.provider, q.business_date, after_ts, after_id,
                                         q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    last = rows[-1] if rows else None
    return json_response({
        "times_time_zone": "UTC", "business_date_time_zone": "Asia/Phnom_Penh",
        "data": [{**dict(r), "business_date": r["business_date"].isoformat(),
                  "imported_at": r["imported_at"].isoformat()} for r in rows],
        "next_cursor": base64.urlsafe_b64encode(f"{last['imported_at'].isoformat()}|{last['id']}".encode())
        .decode().rstrip("=") if more and last else None})


ROUTES = [
    Route("POST", "/v1/settlements", upload, "Import a settlement file (multipart: file, provider, business_date, "
          "format) and reconcile the day", scope="treasury", status=201, tags=("settlements",)),
    Route("GET", "/v1/settlements", list_settlements, "Imported settlements, newest first", scope="treasury",
          query=ListQuery, tags=("settlements",)),
    Route("GET", "/v1/settlements/{id}", get_settlement, "A settlement's reconciliation report", scope="treasury",
          query=ReportQuery, tags=("settlements",)),
    Route("GET", "/v1/settlements/{id}/payments", settled_payments, "The payments a settlement settled: an "
          "agency's own, or every agency's for treasury", scope="invoices:read (own agency) or treasury",
          query=SettledPaymentsQuery, response=SettledPayments, tags=("settlements",)),
    Route("GET", "/v1/settlements/{id}/report.csv", get_csv, "A settlement's report as CSV (every line)",
          scope="treasury", content_type="text/csv", tags=("settlements",)),
]


def setup(app: web.Application) -> None:
    add_routes(app, ROUTES)
