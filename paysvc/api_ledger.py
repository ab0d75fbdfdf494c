"""The ledger API: thin read views over ``ledger``, and the background sealer.

A treasury (or admin) key sees every account. An agency's key (scope ``invoices:read``) sees only its own
accounts, ``agency:{code}:…``: any other account is 404, entries are those touching its accounts (postings on
another agency's accounts hidden), and its trial balance lists its accounts only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime
from typing import Annotated, AsyncIterator, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

import ledger
from paysvc.auth import Principal
from paysvc.background import run_periodically
from paysvc.errors import MalformedRequest, NotFound, ValidationFailed
from paysvc.queries import Q
from paysvc.web import (BACKGROUND, POOL, Route, add_routes, json_response, parse_query, principal, reader,
                        QueryTime, require_offset)

log = logging.getLogger(__name__)
SEAL_INTERVAL_SECONDS = 1.0
_SCOPE_DOC = "invoices:read (own agency) or treasury"


class AccountListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str | None = Field(None, description="only codes starting with this, e.g. 'provider:'")
    currency: Literal["KHR", "USD"] | None = None
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 100


class AccountQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: QueryTime | None = Field(None, description="balance and postings of entries effective at or before "
                                                     "this time")
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class TrialBalanceQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: QueryTime | None = Field(None, description="ISO 8601 with offset; default now")
    sealed_upto: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = Field(
        None, description="treasury only: count only entries sealed at chain positions up to this one (the head "
                          "recorded at a sign-off), so a past answer cannot change afterwards")


class EntryListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str | None = None
    account: str | None = Field(None, description="only entries with a posting on this account")
    invoice_id: str | None = None
    payment_id: str | None = None
    settlement_id: str | None = None
    effective_from: QueryTime | None = Field(None, description="inclusive")
    effective_to: QueryTime | None = Field(None, description="exclusive")
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class AccountPage(BaseModel):
    data: list[ledger.Account]
    next_cursor: str | None


class AccountDetail(BaseModel):
    account: ledger.Account
    as_of: datetime | None
    postings: list[ledger.StatementLine]
    next_cursor: str | None


class EntryPage(BaseModel):
    data: list[ledger.PostedEntry]
    next_cursor: str | None


class ChainHeadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = Field(None, description="a seal position; "
                                                                                         "default the last")


def _encode(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest("cursor is not valid: pass back the next_cursor of the previous page unchanged") from None


def _int_cursor(cursor: str, parts: int) -> list[int]:
    raw = _decode(cursor).split(":")
    try:
        if len(raw) != parts:
            raise ValueError
        return [int(x) for x in raw]
    except ValueError:
        raise MalformedRequest("cursor is not valid: pass back the next_cursor of the previous page unchanged") from None




async def _viewer(request: web.Request) -> tuple[Principal, str | None]:
    """The caller and the account-code prefix it is limited to (None: sees everything)."""
    p = await reader(request)
    return p, (f"agency:{p.agency_code}:" if p.agency_id is not None else None)


def _visible(code: str, prefix: str | None) -> bool:
    return prefix is None or code.startswith(prefix)


async def accounts(request: web.Request) -> web.Response:
    _, limit_to = await _viewer(request)
    q = parse_query(AccountListQuery, request)
    prefix = q.prefix
    if limit_to is not None:
        # an agency narrows within its own accounts, never beyond them
        prefix = q.prefix if q.prefix and q.prefix.startswith(limit_to) else limit_to
    after = _decode(q.cursor) if q.cursor else None
    async with request.app[POOL].acquire() as conn:
        page, nxt = await ledger.list_accounts(conn, prefix=prefix, currency=q.currency, after_code=after,
                                               limit=q.limit)
    return json_response(AccountPage(data=page, next_cursor=_encode(nxt) if nxt else None))


async def account(request: web.Request) -> web.Response:
    _, limit_to = await _viewer(request)
    q = parse_query(AccountQuery, request)
    require_offset("as_of", q.as_of)
    code = request.match_info["code"]
    if not _visible(code, limit_to):
        raise NotFound(f"no ledger account {code!r}")
    before = tuple(_int_cursor(q.cursor, 2)) if q.cursor else None
    async with request.app[POOL].acquire() as conn:
        try:
            acct = await ledger.get_account(conn, code, as_of=q.as_of)
            lines, nxt = await ledger.statement(conn, code, before=before, limit=q.limit,  # type: ignore[arg-type]
                                                as_of=q.as_of)
        except ledger.AccountNotFound:
            raise NotFound(f"no ledger account {code!r}") from None
    return json_response(AccountDetail(account=acct, as_of=q.as_of, postings=lines,
                                       next_cursor=_encode(f"{nxt[0]}:{nxt[1]}") if nxt else None))


async def trial_balance(request: web.Request) -> web.Response:
    _, limit_to = await _viewer(request)
    q = parse_query(TrialBalanceQuery, request)
    require_offset("as_of", q.as_of)
    if q.sealed_upto is not None:
        # positions count every agency's entries, as the chain head does (treasury only)
        await principal(request, "treasury")
    async with request.app[POOL].acquire() as conn:
        try:
            tb = await ledger.trial_balance(conn, as_of=q.as_of, prefix=limit_to, sealed_upto=q.sealed_upto)
        except ValueError as exc:
            raise ValidationFailed(f"sealed_upto: {exc}; pass the position of a recorded chain head "
                                   "(GET /v1/ledger/chain-head)",
                                   errors=[{"field": "sealed_upto", "message": str(exc), "code": "not_sealed"}]) from None
    return json_response(tb)


async def entries(request: web.Request) -> web.Response:
    _, limit_to = await _viewer(request)
    q = parse_query(EntryListQuery, request)
    require_offset("effective_from", q.effective_from)
    require_offset("effective_to", q.effective_to)
    if q.account is not None and not _visible(q.account, limit_to):
        raise NotFound(f"no ledger account {q.account!r}")
    before = _int_cursor(q.cursor, 1)[0] if q.cursor else None
    async with request.app[POOL].acquire() as conn:
        page, nxt = await ledger.list_entries(
            conn, account_prefix=limit_to, account=q.account, kind=q.kind, invoice_id=q.invoice_id,
            payment_id=q.payment_id, settlement_id=q.settlement_id, effective_from=q.effective_from,
            effective_to=q.effective_to, before_id=before, limit=q.limit)
        if limit_to is not None:
            # An agency sees its own postings, and no other agency's invoice ids: treasury may match one agency's
            # money to another's invoice, whose id is the only secret of its public pages (found by a security
            # review).
            named = sorted({e.invoice_id for e in page if e.invoice_id})
            others = {r["id"] for r in await conn.fetch(Q.invoice_agencies, named)
                      if f"agency:{r['code']}:" != limit_to}
    if limit_to is not None:
        page = [e.model_copy(update={"postings": tuple(
            p for p in e.postings if not p.account.startswith("agency:") or p.account.startswith(limit_to)),
            "invoice_id": None if e.invoice_id in others else e.invoice_id})
            for e in page]
    return json_response(EntryPage(data=page, next_cursor=_encode(str(nxt)) if nxt else None))


async def chain_head(request: web.Request) -> web.Response:
    """The hash chain's last seal (or the one at ``position``), to keep outside the database as an anchor."""
    await principal(request, "treasury")  # the chain covers every agency's entries: its length is the whole ledger's
    q = parse_query(ChainHeadQuery, request)
    async with request.app[POOL].acquire() as conn:
        head = await ledger.chain_head(conn, q.position)
    if head is None:
        raise NotFound("no seal at that position" if q.position else "nothing is sealed yet")
    return json_response(head)


ROUTES = [
    Route("GET", "/v1/ledger/accounts", accounts, "Ledger accounts with their balances", scope=_SCOPE_DOC,
          query=AccountListQuery, response=AccountPage, tags=("ledger",)),
    Route("GET", "/v1/ledger/accounts/{code}", account, "One account: balance (now or as of) and its postings",
          scope=_SCOPE_DOC, query=AccountQuery, response=AccountDetail, tags=("ledger",)),
    Route("GET", "/v1/ledger/trial-balance", trial_balance, "Trial balance per currency, now or as of a time",
          scope=_SCOPE_DOC, query=TrialBalanceQuery, response=ledger.TrialBalance, tags=("ledger",)),
    Route("GET", "/v1/ledger/entries", entries, "Journal entries, newest first, with their seal",
          scope=_SCOPE_DOC, query=EntryListQuery, response=EntryPage, tags=("ledger",)),
    Route("GET", "/v1/ledger/chain-head", chain_head,
          "The hash chain's last seal (or one position's), as stored, not verified: record its `anchor` outside "
          "the database after `paysvc ledger verify` passes, and check it later with `--anchor`",
          scope="treasury", query=ChainHeadQuery,
          response=ledger.ChainHead, tags=("ledger",)),
]


async def _seal(app: web.Application) -> str | None:
    async with app[POOL].acquire() as conn:
        n = await ledger.seal_all(conn)
    return f"sealed {n} journal entries" if n else None


async def _sealer(app: web.Application) -> AsyncIterator[None]:
    task = None
    if app[BACKGROUND]:
        task = asyncio.create_task(run_periodically("ledger-seal", SEAL_INTERVAL_SECONDS, lambda: _seal(app)))
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def setup(app: web.Application) -> None:
    add_routes(app, ROUTES)
    app.cleanup_ctx.append(_sealer)
