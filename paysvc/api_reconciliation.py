"""Reconciliation exceptions for treasury: money that could not be booked as a plain invoice payment."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from paysvc.errors import Conflict, FieldValueError, NotFound, ValidationFailed
from paysvc.invoicing import decode_cursor, encode_cursor, now_utc
from paysvc.settlement_resolve import AlreadyResolved, ResolutionRefused, resolve
from paysvc.web import POOL, SETTINGS, Route, add_routes, json_response, parse_model, parse_query, principal, read_json
from paysvc.queries import Q

Reason = Literal["unknown_khqr", "currency_mismatch", "account_mismatch", "invoice_expired", "invoice_cancelled",
                 "duplicate_payment", "underpaid", "overpaid", "paid_at_implausible", "conflicting_notice",
                 "amount_mismatch", "missing_in_ledger", "missing_in_settlement", "duplicate_in_settlement",
                 "settled_after_resolution", "expired_part_paid"]


class ExceptionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str | None = None
    business_date: date | None = None
    reason: Reason | None = None
    state: Literal["open", "resolved"] | None = None
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class ExceptionOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    reason: Reason
    state: Literal["open", "resolved"]
    provider: str
    payment_id: str | None
    invoice_id: str | None
    agency: str | None
    currency: Literal["KHR", "USD"]
    amount: int
    business_date: date | None
    evidence: dict[str, Any]
    opened_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: Literal["match_to_invoice", "refund_due", "write_off", "settled_late", "paid_in_full"] | None
    resolution_note: str | None
    resolution_entry_id: int | None  # the journal entry that moved the money, when one did


class ExceptionPage(BaseModel):
    model_config = ConfigDict(frozen=True)
    data: list[ExceptionOut]
    next_cursor: str | None




async def list_exceptions(request: web.Request) -> web.Response:
    await principal(request, "treasury")
    q = parse_query(ExceptionQuery, request)
    after_ts = after_id = None
    if q.cursor:
        after_ts, after_id = decode_cursor(q.cursor)
    rows = await request.app[POOL].fetch(Q.exceptions_list, q.provider, q.business_date, q.reason, q.state,
                                         after_ts, after_id, q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return json_response(ExceptionPage(
        data=[ExceptionOut(**dict(r)) for r in rows],
        next_cursor=encode_cursor(rows[-1]["opened_at"], rows[-1]["id"]) if more else None,
    ))


class ResolveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["match_to_invoice", "refund_due", "write_off"]
    note: Annotated[str, Field(min_length=1, max_length=2000)]
    invoice_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None

    @field_validator("note")
    @classmethod
    def _note(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("note must say why: it cannot be blank")
        return v.strip()

    @model_validator(mode="after")
    def _invoice(self) -> "ResolveBody":
        if self.action == "match_to_invoice" and not self.invoice_id:
            raise FieldValueError("invoice_id", "match_to_invoice needs invoice_id")
        if self.action != "match_to_invoice" and self.invoice_id is not None:
            # Found by a treasury walk-through: a write_off sent with an invoice_id was taken as a write-off, the
            # invoice silently ignored; the sender meant something else, so say so rather than guess.
            raise FieldValueError("invoice_id", f"only match_to_invoice takes invoice_id; {self.action} moves the "
                                                "money to no invoice: leave invoice_id out, or use match_to_invoice")
        return self


async def resolve_exception(exc_id: str, body: ResolveBody, *, pool, bank_account: str, by: str) -> dict:
    """Resolve in one transaction; maps the rule's refusals to problems (shared by the API and the pages)."""
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                return await resolve(conn, exc_id, action=body.action, note=body.note, invoice_id=body.invoice_id,
                                     by=by, now=now_utc(), bank_account=bank_account)
    except LookupError:
        raise NotFound(f"no reconciliation exception {exc_id!r}") from None
    except AlreadyResolved:
        raise Conflict(f"exception {exc_id} is already resolved; a resolution is final") from None
    except ResolutionRefused as exc:
        raise ValidationFailed(exc.detail, errors=[{"field": exc.field, "message": exc.detail,
                                                    "code": "not_applicable"}]) from None


async def resolve_one(request: web.Request) -> web.Response:
    who = await principal(request, "treasury")
    body = parse_model(ResolveBody, await read_json(request))
    out = await resolve_exception(request.match_info["id"], body, pool=request.app[POOL],
                                  bank_account=request.app[SETTINGS].treasury_bank_account, by=who.actor)
    return json_response(out)


ROUTES = [
    Route("GET", "/v1/reconciliation/exceptions", list_exceptions, "Reconciliation exceptions, newest first",
          scope="treasury", query=ExceptionQuery, response=ExceptionPage, tags=("reconciliation",)),
    Route("POST", "/v1/reconciliation/exceptions/{id}/resolve", resolve_one,
          "Resolve an open exception: match_to_invoice, refund_due or write_off, with a note (posts its entry)",
          scope="treasury", body=ResolveBody, tags=("reconciliation",)),
]


def setup(app: web.Application) -> None:
    add_routes(app, ROUTES)
