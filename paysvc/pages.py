"""The citizen's payment page: ``GET /pay/{id}`` (HTML) and the small public JSON it polls.

Both are public: the invoice id (128 random bits) is the only secret, so neither ever shows payer data,
the portal's reference or metadata. The page is one self-contained response (style and script inline,
nothing from another host): citizens pay from phones on weak connections.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.resources
import re
import string
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from paysvc import invoicing
from paysvc.api_invoices import CTX
from paysvc.errors import InvalidState, NotFound
from paysvc.invoices import Currency, KhqrOut, Status
from paysvc.queries import Q
from paysvc.settlement_days import TZ as PHNOM_PENH
from paysvc.web import POOL, PROVIDERS, Route, add_routes, json_response

# Ids are "inv_" + base32; anything else cannot be an invoice, so it never reaches the database.
_INVOICE_ID = re.compile(r"^inv_[a-z2-7]{1,60}$")
DEFAULT_POLL_SECONDS = 5
_SIGN = {"KHR": "៛", "USD": "$"}


class PayAgency(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    name_km: str


class PayLine(BaseModel):
    """One line of the fee, as the portal itemised it."""

    model_config = ConfigDict(frozen=True)
    code: str
    description: str
    amount: int = Field(description="minor units")
    amount_display: str = Field(description="as a citizen reads it: '40,000 ៛' or '$12.50'")


class PayState(BaseModel):
    """What the public payment page shows and polls: no payer data."""

    model_config = ConfigDict(frozen=True)
    invoice_id: str
    status: Status
    currency: Currency
    amount: int = Field(description="the invoice's amount, in minor units: riel for KHR, cents for USD")
    amount_due: int = Field(description="what is left to pay while open (less than amount once treasury has "
                                        "applied a part payment); the amount otherwise")
    amount_display: str = Field(description="the amount due as a citizen reads it: '50,000 ៛' or '$12.50'")
    agency: PayAgency
    description: str
    line_items: list[PayLine] = Field(description="the fee's lines, when the portal itemised it (they sum to amount)")
    khqr: KhqrOut | None = Field(description="the code to pay now; null once the invoice is no longer open")
    qr_svg_url: str | None = Field(description="relative URL of the current code's image; null when not open")
    server_time: datetime = Field(description="the server's clock, so a countdown does not trust the phone's")
    paid_at: datetime | None = Field(None, description="when it was paid (the payment that completed it); null "
                                                       "unless paid")
    paid_with: str | None = Field(None, description="once paid, the provider of the last payment booked to it, as "
                                                    "a citizen knows it ('Bakong', 'ABA PayWay'); null when none "
                                                    "was booked as it came (treasury applied a held payment, or it "
                                                    "was captured from a settlement file)")
    payment_reference: str | None = Field(None, description="that payment's transaction id at its provider (the "
                                                            "reference the citizen's bank app shows); null with "
                                                            "paid_with")
    expires_at: datetime = Field(description="the invoice's deadline (each code lives 10 minutes at most, and a new "
                                             "one comes by itself until then)")
    payment_held: bool = Field(False, description="a payment on it does not match what is due (amount, currency, "
                                                  "account, time) and is held for treasury to resolve: the citizen "
                                                  "should not pay again, and should contact the agency")


def amount_display(currency: str, amount: int) -> str:
    """``50,000 ៛`` for riel, ``$12.50`` for dollars (amount in minor units)."""
    if currency == "KHR":
        return f"{amount:,} ៛"
    return f"${amount // 100:,}.{amount % 100:02d}"


def paid_at_display(t: datetime) -> str:
    """When an invoice was paid as a citizen reads it on a receipt: Phnom Penh's day and time (UTC+7, no summer
    time), e.g. ``27/11/2026 09:31``. pay.js writes the same from the state's ``paid_at``."""
    local = t.astimezone(PHNOM_PENH)
    return f"{local.day:02d}/{local.month:02d}/{local.year} {local.hour:02d}:{local.minute:02d}"


def _mmss(seconds: float) -> str:
    s = max(0, int(seconds + 0.999))
    return f"{s // 60:02d}:{s % 60:02d}"


def provider_title(request: web.Request, name: str) -> str:
    """A provider as a citizen knows it: its plugin's ``title``, else its name (a plugin since disabled, say)."""
    return getattr(request.app[PROVIDERS].get(name), "title", "") or name


async def _state(request: web.Request, invoice_id: str) -> tuple[PayState, str]:
    """The public state of an invoice and its bill number; raises NotFound."""
    if not _INVOICE_ID.match(invoice_id):
        raise NotFound(f"no invoice {invoice_id!r}")
    row = await request.app[POOL].fetchrow(Q.pay_page_invoice, invoice_id)
    if row is None:
        raise NotFound(f"no invoice {invoice_id!r}")
    status, code, paid = row["status"], None, row["amount_paid"]
    if status == "open" and row["expires_at"] <= invoicing.now_utc():
        status = "expired"  # the background sweep has not marked it yet; the page must not offer a code
    if status == "open":
        try:
            invoice, code = await invoicing.current_khqr(request.app[POOL], request.app[CTX], invoice_id=invoice_id,
                                                         agency_id=None)
            paid = invoice["amount_paid"]  # as read with the code (a part payment applied meanwhile changes both)
        except InvalidState as exc:  # paid, cancelled or run out since we read it
            status = exc.extra.get("invoice_status", "expired")
            if status == "paid":
                # Paid while we read it (the code waited for the capture's lock): read it again for when and how,
                # or the page says paid with neither, and stops asking (found by review).
                row = await request.app[POOL].fetchrow(Q.pay_page_invoice, invoice_id)
    due = row["amount"] - paid if status == "open" else row["amount"]
    paid_by = row["paid_with"] if status == "paid" else None  # the query finds one only for a paid invoice
    return PayState(
        invoice_id=invoice_id,
        status=status,
        currency=row["currency"],
        amount=row["amount"],
        amount_due=due,
        amount_display=amount_display(row["currency"], due),
        agency=PayAgency(name=row["agency_name"], name_km=row["agency_name_km"]),
        description=row["description"],
        line_items=[PayLine(code=li["code"], description=li["description"], amount=li["amount"],
                            amount_display=amount_display(row["currency"], li["amount"]))
                    for li in row["line_items"]],
        khqr=code,
        qr_svg_url=f"/v1/invoices/{invoice_id}/qr.svg" if code is not None else None,
        server_time=invoicing.now_utc(),
        paid_at=row["paid_at"] if status == "paid" else None,
        paid_with=provider_title(request, paid_by) if paid_by else None,
        payment_reference=row["payment_reference"] if paid_by else None,
        expires_at=row["expires_at"],
        payment_held=row["payment_held"] and status != "paid",
    ), row["bill_number"]


@dataclass(frozen=True)
class _Page:
    template: string.Template
    css: str
    js: str
    headers: dict[str, str]


PAGE = web.AppKey("pay_page", _Page)


def _load_page() -> _Page:
    static = importlib.resources.files("paysvc") / "static"
    css = (static / "pay.css").read_text(encoding="utf-8")
    js = (static / "pay.js").read_text(encoding="utf-8")
    if "</" in css or "</script" in js.lower():
        raise RuntimeError("pay.css and pay.js are inlined in <style>/<script>: they must not contain '</'")

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    # The browser refuses anything but our own inline style and script, and talks to no other host.
    csp = (f"default-src 'none'; script-src {sha(js)}; style-src {sha(css)}; img-src 'self' data: blob:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",  # the URL holds the invoice id, which is the page's only secret
        "X-Content-Type-Options": "nosniff",
        "X-Robots-Tag": "noindex, nofollow",
    }
    return _Page(string.Template((static / "pay.html").read_text(encoding="utf-8")), css, js, headers)


# The tab's title says what the page says (found by a citizen's walk-through: "Pay" on a paid invoice)
_TITLES = {"open": "ទូទាត់ · Pay", "paid": "បានបង់ · Paid", "expired": "ផុតកំណត់ · Expired",
           "cancelled": "លុបចោល · Cancelled"}


def _render(page: _Page, state: PayState | None, bill_number: str, poll: int) -> str:
    values = dict(status="notfound", invoice_id="", md5="", expires_at="", server_time="", poll=str(poll),
                  agency_name="", agency_name_km="", amount_display="", currency="", currency_sign="",
                  description="", bill_number="", qr_src="data:,", countdown="00:00",
                  title="រកមិនឃើញវិក្កយបត្រ · Invoice not found", noscript_refresh="", paid_at="",
                  paid_hidden="hidden", paid_with="", payment_reference="", reference_hidden="hidden",
                  pay_by="", pay_by_hidden="hidden", held_hidden="hidden", qr_png="", save_name="")
    if state is not None:
        values.update(
            status=state.status, invoice_id=state.invoice_id, server_time=state.server_time.isoformat(),
            agency_name=state.agency.name, agency_name_km=state.agency.name_km,
            amount_display=state.amount_display, currency=state.currency, currency_sign=_SIGN[state.currency],
            description=state.description, bill_number=bill_number,
            title=f"{_TITLES[state.status]} {state.amount_display} · {state.agency.name}",
        )
        if state.paid_at is not None:
            values.update(paid_at=paid_at_display(state.paid_at), paid_hidden="")
        if state.payment_reference is not None:
            values.update(paid_with=state.paid_with or "", payment_reference=state.payment_reference,
                          reference_hidden="")
        if state.status == "open":
            values.update(pay_by=paid_at_display(state.expires_at), pay_by_hidden="")
        if state.payment_held:
            values.update(held_hidden="")
        if state.khqr is not None:
            values.update(
                qr_png=f"/v1/invoices/{state.invoice_id}/qr.png?scale=8", save_name=f"KHQR-{bill_number}.png",
                md5=state.khqr.md5, expires_at=state.khqr.expires_at.isoformat(), qr_src=state.qr_svg_url,
                countdown=_mmss((state.khqr.expires_at - state.server_time).total_seconds()),
            )
    escaped = {k: html.escape(v) for k, v in values.items()}
    escaped["lines"] = _lines(state.line_items) if state is not None else ""
    escaped["description"] = _in_its_language(values["description"])
    # Without JavaScript (a data-saving browser) an open page reloads itself, so its code and state stay
    # current (found by a citizen's walk-through: it froze, saying it updates by itself)
    refresh = '<noscript><meta http-equiv="refresh" content="30"></noscript>' if values["status"] == "open" else ""
    return page.template.substitute(escaped, css=page.css, js=page.js, noscript_refresh=refresh)


def _lines(items: list[PayLine]) -> str:
    """The fee's lines as rows of the facts list (each value escaped here: the template inserts this as is)."""
    return "".join(
        f'  <div class="line"><dt>{_in_its_language(li.description)}</dt><dd lang="en">'
        f"{html.escape(li.amount_display)}</dd></div>\n" for li in items)


# A run starts with a Khmer letter and goes on through Khmer, the joiners and spaces inside Khmer words, and the
# punctuation between them, up to the next Latin letter or digit.
_KHMER_RUN = re.compile(r"[\u1780-\u17ff\u19e0-\u19ff][\u1780-\u17ff\u19e0-\u19ff\u200b-\u200d\s()\[\],.;:!?/'\"-]*"
                        r"(?<![\s(\[])")


def _in_its_language(text: str) -> str:
    """A portal's text (a fee's description) as HTML, escaped, each run of Khmer marked ``lang="km"`` and the
    rest ``lang="en"``: the page's own language follows the citizen's choice, and a screen reader would read a
    Khmer description with an English voice, or the reverse (found by a citizen's walk-through)."""
    parts, at = [], 0
    for m in _KHMER_RUN.finditer(text):
        if m.start() > at:
            parts.append(f'<span lang="en">{html.escape(text[at:m.start()])}</span>')
        parts.append(f'<span lang="km">{html.escape(m.group())}</span>')
        at = m.end()
    if at < len(text):
        parts.append(f'<span lang="en">{html.escape(text[at:])}</span>')
    return "".join(parts)


def _poll_seconds(request: web.Request) -> int:
    try:
        return min(60, max(1, int(request.query.get("poll", DEFAULT_POLL_SECONDS))))
    except ValueError:
        return DEFAULT_POLL_SECONDS


async def pay_page(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    try:
        state, bill = await _state(request, request.match_info["id"])
        status = 200
    except NotFound:
        state, bill, status = None, "", 404
    resp = web.Response(text=_render(page, state, bill, _poll_seconds(request)), status=status,
                        content_type="text/html", headers=page.headers)
    resp.enable_compression()
    return resp


async def pay_state(request: web.Request) -> web.Response:
    state, _ = await _state(request, request.match_info["id"])
    return json_response(state, headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex"})


ROUTES = [
    Route("GET", "/pay/{id}", pay_page, "The citizen's payment page: KHQR card in Khmer and English (public)",
          content_type="text/html", tags=("pages",)),
    Route("GET", "/pay/{id}/state", pay_state, "What the payment page polls: status and current KHQR (public)",
          response=PayState, tags=("pages",)),
]


def setup(app: web.Application) -> None:
    app[PAGE] = _load_page()
    add_routes(app, ROUTES)
