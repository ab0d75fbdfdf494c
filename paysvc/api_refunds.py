"""Refunds for treasury: what is owed back to payers, and the record of each payout (``paysvc.refunds``)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from paysvc.errors import Conflict, MalformedRequest, NotFound, ValidationFailed
from paysvc.invoicing import decode_cursor, encode_cursor, now_utc
from paysvc.queries import Q
from paysvc.refunds import ReferenceTaken, RefundRefused, record_payout
from paysvc.web import POOL, SETTINGS, Route, add_routes, json_response, parse_model, parse_query, principal, read_json

MAX_AMOUNT = 10**15   # the ledger's bound on one posting, in minor units


class PayoutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exception_id: Annotated[str, Field(min_length=1, max_length=100)]
    currency: Literal["KHR", "USD"]
    amount: Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT, description="minor units: riel for KHR, cents for USD")]
    reference: Annotated[str, Field(min_length=1, max_length=140)]
    note: Annotated[str, Field(min_length=1, max_length=2000)]

    @field_validator("exception_id", "reference", "note")
    @classmethod
    def _text(cls, v: str, info) -> str:
        v = v.strip()
        if not v:
            raise ValueError(f"{info.field_name} cannot be blank")
        # A note may run over several lines, as a resolution's does; nothing else takes a control character
        # (C0, DEL or C1: found by review, U+0085 and U+009B passed a check of C0 alone)
        allowed = "\n\r\t" if info.field_name == "note" else ""
        if any(unicodedata.category(c) == "Cc" and c not in allowed for c in v):
            raise ValueError(f"{info.field_name} cannot hold control characters"
                             + (" other than line breaks and tabs" if allowed else " (a line break, a tab, a NUL)"))
        return v


class PayoutOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    exception_id: str
    payment_id: str | None      # the case: the payment, when the exception is about one
    currency: Literal["KHR", "USD"]
    amount: int
    reference: str               # the bank's reference of the transfer
    bank_account: str            # the treasury account it left from
    note: str
    recorded_by: str
    recorded_at: datetime
    entry_id: int                # the journal entry: debit suspense:refunds-due, credit the bank


class PayoutPage(BaseModel):
    model_config = ConfigDict(frozen=True)
    data: list[PayoutOut]
    next_cursor: str | None


class PayoutQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case: Annotated[str, Field(min_length=1, max_length=100)] | None = None   # a payment id or an exception id
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class OwedOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    case_id: str                 # the payment's id, else the exception's
    payment_id: str | None
    exception_ids: list[str]     # the exceptions whose resolutions made it owed (or took from it)
    currency: Literal["KHR", "USD"]
    due: int                     # put into suspense:refunds-due for the case, less what was taken back
    paid: int                    # paid out so far
    outstanding: int             # due - paid
    since: datetime              # when it was first owed
    payable: bool                # false: the payment is neither settled nor its missing_in_settlement resolved
                                 # (its provider may still give the money back): a payout waits until one is


class OwedPage(BaseModel):
    model_config = ConfigDict(frozen=True)
    data: list[OwedOut]
    next_cursor: str | None


class OwedQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


def minor_units(text: str) -> int | None:
    """``text`` as a whole number when it is written with the digits 0-9 only (leading zeros allowed), else None
    ("1e3", "+5" or "٣" are not). One of more than 16 digits reads as 10**16, above any amount: int() refuses
    more than 4,300 digits, leading zeros included (found by review: a 500 on the refunds form)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 16 else 10**16


def _cursor(cursor: str, parts: int) -> tuple[datetime, list[str]]:
    """A next_cursor of these pages: a time and ``parts`` ids (invoicing's cursor, the ids joined by "|")."""
    ts, rest = decode_cursor(cursor)
    ids = rest.split("|")
    if len(ids) != parts:
        raise MalformedRequest("cursor is not valid: pass back the next_cursor of the previous page unchanged")
    return ts, ids


async def record(body: PayoutBody, *, pool, bank_account: str, by: str) -> tuple[dict, bool]:
    """Record a payout in one transaction; maps refusals to problems (shared by the API and the pages).
    Returns the payout and whether it was recorded before (the same transfer sent again)."""
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                done = await record_payout(conn, exception_id=body.exception_id, currency=body.currency,
                                           amount=body.amount, reference=body.reference, note=body.note, by=by,
                                           now=now_utc(), bank_account=bank_account)
    except LookupError:
        raise NotFound(f"no reconciliation exception {body.exception_id!r}") from None
    except RefundRefused as exc:
        raise ValidationFailed(exc.detail, errors=[{"field": exc.field, "message": exc.detail,
                                                    "code": "not_applicable"}]) from None
    except ReferenceTaken as exc:
        p = exc.payout
        raise Conflict(f"bank reference {p['reference']!r} is already recorded as payout {p['id']} ({p['amount']} "
                       f"{p['currency']} for exception {p['exception_id']}): one transfer is one payout; a retry of "
                       "that payout sends the same exception, currency and amount") from None
    return done.payout, done.replayed


async def create_payout(request: web.Request) -> web.Response:
    who = await principal(request, "treasury")
    body = parse_model(PayoutBody, await read_json(request))
    payout, replayed = await record(body, pool=request.app[POOL],
                                    bank_account=request.app[SETTINGS].treasury_bank_account, by=who.actor)
    return json_response(PayoutOut(**payout), status=200 if replayed else 201)


async def list_payouts(request: web.Request) -> web.Response:
    await principal(request, "treasury")
    q = parse_query(PayoutQuery, request)
    after_ts = after_id = None
    if q.cursor:
        after_ts, [after_id] = _cursor(q.cursor, 1)
    rows = await request.app[POOL].fetch(Q.refund_payouts_page, q.case, after_ts, after_id, q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return json_response(PayoutPage(
        data=[PayoutOut(**dict(r)) for r in rows],
        next_cursor=encode_cursor(rows[-1]["recorded_at"], rows[-1]["id"]) if more else None))


async def list_owed(request: web.Request) -> web.Response:
    await principal(request, "treasury")
    q = parse_query(OwedQuery, request)
    after = [None, None, None]
    if q.cursor:
        ts, (case_id, currency) = _cursor(q.cursor, 2)
        after = [ts, case_id, currency]
    rows = await request.app[POOL].fetch(Q.refunds_owed, *after, q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return json_response(OwedPage(
        data=[OwedOut(**{**dict(r), "exception_ids": list(r["exception_ids"])}) for r in rows],
        next_cursor=encode_cursor(rows[-1]["since"], f"{rows[-1]['case_id']}|{rows[-1]['currency']}")
        if more else None))


ROUTES = [
    Route("GET", "/v1/reconciliation/refunds/owed", list_owed,
          "Refunds still owed back to payers, oldest first, and whether each can be paid yet",
          scope="treasury", query=OwedQuery, response=OwedPage, tags=("reconciliation",)),
    Route("GET", "/v1/reconciliation/refunds", list_payouts, "Refund payouts recorded, newest first",
          scope="treasury", query=PayoutQuery, response=PayoutPage, tags=("reconciliation",)),
    Route("POST", "/v1/reconciliation/refunds", create_payout,
          "Record a refund paid back to a payer from the treasury bank account (posts its entry); 200 when the same "
          "transfer was recorded before", scope="treasury", body=PayoutBody, response=PayoutOut, status=201,
          tags=("reconciliation",)),
]


def setup(app: web.Application) -> None:
    add_routes(app, ROUTES)
