"""The invoicing API: thin views over ``paysvc.invoicing``."""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from paysvc import invoicing, qrimage
from paysvc.errors import MalformedRequest, ValidationFailed
from paysvc.invoices import REFERENCE, InvoiceCreate, InvoiceOut, InvoicePage, KhqrOut
from paysvc.queries import Q
from paysvc.web import (POOL, Route, add_routes, json_response, parse_model, parse_query, principal, read_json,
                        reader, QueryTime, WHOLE_NUMBER, require_offset)

CTX = web.AppKey("invoice_ctx", invoicing.InvoiceContext)


class InvoiceListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["open", "paid", "expired", "cancelled"] | None = None
    reference: str | None = Field(None, description="the portal's reference, exactly (URL-encode it: a + reads as a "
                                                    "space)")
    created_from: QueryTime | None = Field(None, description="inclusive, ISO 8601 with offset")
    created_to: QueryTime | None = Field(None, description="exclusive, ISO 8601 with offset")
    bill_number: str | None = Field(None, description="the invoice's bill number (KHQR tag 62, on the citizen's "
                                                      "receipt), e.g. PS00000123", pattern=r"^PS[0-9]{8,23}$")
    agency: str | None = Field(None, description="treasury keys: whose invoices (an agency's code); a treasury key "
                                                 "gives agency or bill_number", pattern=r"^[A-Z][A-Z0-9_]{1,15}$")
    cursor: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        # Found by a portal developer's walk-through: reference=PP+2026/1 (unencoded +) searched for "PP 2026/1",
        # which no reference can be, and answered an empty list: "no such invoice", when there was one.
        if v is not None and not REFERENCE.fullmatch(v):
            if " " in v:
                raise ValueError("references have no spaces, and a + in a query string reads as a space: write + "
                                 "as %2B (URL-encode the reference)")
            raise ValueError("must be a reference as created: 1-64 printable ASCII characters, no spaces")
        return v


class QrImageQuery(BaseModel):
    """The PNG's query, as documented (the view reads it itself, and answers 400 for a bad scale)."""
    model_config = ConfigDict(extra="forbid")
    scale: Annotated[int, Field(ge=2, le=20)] = Field(8, description="pixels per module: 2 to 20 (a 37-module code "
                                                                        "with its border is 360 px at 8)")


class KhqrCurrent(KhqrOut):
    invoice_id: str
    status: str


def _idempotency_key(request: web.Request) -> str | None:
    keys = request.headers.getall("Idempotency-Key", ())
    if not keys:
        return None
    if len(keys) > 1:
        raise ValidationFailed("send one Idempotency-Key header, not several",
                               errors=[{"field": "Idempotency-Key", "message": "sent more than once",
                                        "code": "repeated"}])
    key = keys[0]
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ValidationFailed("Idempotency-Key must be 1 to 255 printable characters",
                               errors=[{"field": "Idempotency-Key", "message": "1 to 255 printable characters",
                                        "code": "value_error"}])
    return key


async def create(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:write")
    agency_id = p.require_agency()
    key = _idempotency_key(request)
    raw = await read_json(request)
    body = parse_model(InvoiceCreate, raw)
    status, response, replayed = await invoicing.create_invoice(
        request.app[POOL], request.app[CTX], agency_id=agency_id, agency_code=p.agency_code, body=body, raw=raw,
        idempotency_key=key,
    )
    headers = {"Location": f"/v1/invoices/{response['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(response, status=status, headers=headers)


async def get_one(request: web.Request) -> web.Response:
    # An agency's key reads its own invoices; a treasury key every agency's, without their payer: treasury
    # answers for the money, the agency for its citizens.
    p = await reader(request)
    inv = await invoicing.get_invoice(request.app[POOL], request.app[CTX], agency_id=p.agency_id,
                                      invoice_id=request.match_info["id"], with_payer=p.agency_id is not None)
    return json_response(inv)


async def list_(request: web.Request) -> web.Response:
    p = await reader(request)
    q = parse_query(InvoiceListQuery, request)
    for name in ("created_from", "created_to"):
        require_offset(name, getattr(q, name))
    agency_id = p.agency_id
    if agency_id is not None and q.agency is not None and q.agency != p.agency_code:
        raise ValidationFailed(f"agency: this key lists {p.agency_code}'s invoices only; leave agency out",
                               errors=[{"field": "agency", "message": "not this key's agency", "code": "not_yours"}])
    if agency_id is None:
        if q.agency is None and q.bill_number is None:
            raise ValidationFailed("a treasury key lists one agency's invoices at a time: give agency=CODE, or "
                                   "bill_number= to find one invoice",
                                   errors=[{"field": "agency", "message": "agency or bill_number is required",
                                            "code": "missing"}])
        if q.agency is not None:
            agency_id = await request.app[POOL].fetchval(Q.agency_id_by_code, q.agency)
            if agency_id is None:
                raise ValidationFailed(f"agency: there is no agency {q.agency!r}",
                                       errors=[{"field": "agency", "message": "no such agency", "code": "unknown"}])
    items, cursor = await invoicing.list_invoices(
        request.app[POOL], request.app[CTX], agency_id=agency_id, status=q.status, reference=q.reference,
        created_from=q.created_from, created_to=q.created_to, cursor=q.cursor, limit=q.limit,
        bill_number=q.bill_number,
    )
    return json_response(InvoicePage(data=items, next_cursor=cursor))


async def cancel(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:write")
    inv = await invoicing.cancel_invoice(request.app[POOL], request.app[CTX], agency_id=p.require_agency(),
                                         invoice_id=request.match_info["id"])
    return json_response(inv)


async def erase_payer(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:write")
    inv = await invoicing.erase_payer(request.app[POOL], request.app[CTX], agency_id=p.require_agency(),
                                      invoice_id=request.match_info["id"])
    return json_response(inv)


async def khqr_current(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:read")
    row, code = await invoicing.current_khqr(request.app[POOL], request.app[CTX], invoice_id=request.match_info["id"],
                                             agency_id=p.require_agency())
    return json_response(KhqrCurrent(invoice_id=row["id"], status="open", **code.model_dump()))


async def _public_code(request: web.Request) -> KhqrOut:
    _, code = await invoicing.current_khqr(request.app[POOL], request.app[CTX], invoice_id=request.match_info["id"],
                                           agency_id=None)
    return code


def _image_headers(code: KhqrOut) -> dict[str, str]:
    # The image changes when the code is refreshed: never let a cache serve an expired code.
    return {"Cache-Control": "no-store", "X-Khqr-Md5": code.md5, "X-Khqr-Expires-At": code.expires_at.isoformat()}


async def qr_png(request: web.Request) -> web.Response:
    code = await _public_code(request)
    raw = request.query.get("scale", "8")
    if not WHOLE_NUMBER.fullmatch(raw) or not 2 <= int(raw) <= 20:  # digits only, as any number in a query
        raise MalformedRequest("scale must be an integer from 2 to 20")
    scale = int(raw)
    png = qrimage.render_png(code.payload, box_size=scale)
    return web.Response(body=png, content_type="image/png", headers=_image_headers(code))


async def qr_svg(request: web.Request) -> web.Response:
    code = await _public_code(request)
    resp = web.Response(text=qrimage.render_svg(code.payload), content_type="image/svg+xml",
                        headers=_image_headers(code))
    resp.enable_compression()  # 12 KB of repetitive text, about 2.5 KB compressed: on a phone's prepaid data
    return resp


_READERS = "invoices:read (own agency) or treasury (every agency, without the payer)"

ROUTES = [
    Route("POST", "/v1/invoices", create, "Create a fee invoice and its first KHQR code", scope="invoices:write",
          body=InvoiceCreate, response=InvoiceOut, status=201, tags=("invoices",)),
    Route("GET", "/v1/invoices", list_, "List invoices, newest first", scope=_READERS,
          query=InvoiceListQuery, response=InvoicePage, tags=("invoices",)),
    Route("GET", "/v1/invoices/{id}", get_one, "One invoice with its payments", scope=_READERS,
          response=InvoiceOut, tags=("invoices",)),
    Route("POST", "/v1/invoices/{id}/cancel", cancel, "Cancel an open invoice", scope="invoices:write",
          response=InvoiceOut, tags=("invoices",)),
    Route("DELETE", "/v1/invoices/{id}/payer", erase_payer, "Erase the invoice's payer details (a citizen's "
          "request); the invoice and its payments stay", scope="invoices:write", response=InvoiceOut,
          tags=("invoices",)),
    Route("GET", "/v1/invoices/{id}/khqr", khqr_current, "The current KHQR code (a fresh one if the last expired)",
          scope="invoices:read", response=KhqrCurrent, tags=("invoices",)),
    Route("GET", "/v1/invoices/{id}/qr.png", qr_png, "The current KHQR code as a PNG image (public)",
          query=QrImageQuery, content_type="image/png", tags=("invoices",)),
    Route("GET", "/v1/invoices/{id}/qr.svg", qr_svg, "The current KHQR code as an SVG image (public)",
          content_type="image/svg+xml", tags=("invoices",)),
]


def setup(app: web.Application, ctx: invoicing.InvoiceContext) -> None:
    app[CTX] = ctx
    add_routes(app, ROUTES)
