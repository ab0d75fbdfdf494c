"""Treasury pages: log in with a treasury API key, see business days × providers, open a day's report,
resolve exceptions, download the CSV, see the refunds owed back to payers and record one paid out.

The key is exchanged once for a session cookie (HttpOnly, SameSite=Strict, Secure when PAYSVC_PUBLIC_URL is
https, path /treasury). Sessions live server-side (``treasury_sessions``: only the token's SHA-256) until
they expire or the key is revoked. Every POST must come from our own origin (``Origin`` header) and, once
logged in, carry the session's CSRF token in a hidden field. Pages are self-contained like the payment page:
inline style under a hash-pinned CSP, no script at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import importlib.resources
import re
import secrets
import string
from datetime import UTC, date, timedelta
from urllib.parse import quote, urlsplit

from aiohttp import web
from pydantic import BaseModel, Field

import ledger

from paysvc.api_reconciliation import ResolveBody, resolve_exception
from paysvc.api_refunds import PayoutBody, minor_units, record as record_payout
from paysvc.api_settlements import iso_date, rules_of, stream_csv
from paysvc.auth import actor
from paysvc.api_invoices import CTX as INVOICE_CTX
from paysvc.errors import NotFound, Problem, pydantic_errors
from paysvc.invoicing import get_invoice, now_utc
from paysvc.pages import amount_display
from paysvc.queries import Q
from paysvc.settlement_days import TIME_ZONE_NAME, business_date
from paysvc.settlement_report import day_grid, day_overview, settlement_page
from paysvc.web import (AUTH, BODY_SECONDS, POOL, PROVIDERS, SETTINGS, UNREADABLE_FORM, Route, add_routes,
                        body_encoding)
from pydantic import ValidationError

COOKIE = "paysvc_treasury"
_BILL = re.compile(r"PS[0-9]{8,23}")
_INVOICE_ID = re.compile(r"inv_[a-z0-9]{20,40}")
GRID_DAYS = 14
LINES_PAGE = 500        # lines of each settlement file on a day page
EXCEPTIONS_PAGE = 100   # open exceptions on a day page (each carries a resolve form)
REFUNDS_PAGE = 200      # refunds owed on the refunds page, oldest first (each carries a payout form)
TEMPLATE = web.AppKey("treasury_template", tuple)
FORM = web.RequestKey("treasury_form", object)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _load() -> tuple[string.Template, str, dict[str, str]]:
    static = importlib.resources.files("paysvc") / "static"
    css = (static / "treasury.css").read_text(encoding="utf-8")
    if "</" in css:
        raise RuntimeError("treasury.css is inlined in <style>: it must not contain '</'")
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    headers = {
        "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'self' data:; "
                                   "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        "Cache-Control": "no-store", "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    return string.Template((static / "treasury.html").read_text(encoding="utf-8")), css, headers


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _page(request: web.Request, title: str, body: str, *, session: dict | None = None, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    template, css, base = request.app[TEMPLATE]
    account = ""
    if session is not None:
        account = (f'<form method="post" action="/treasury/logout">{_csrf(session)}<span>{_e(session["key_name"])}'
                   f'</span> <button type="submit">Log out</button></form>')
    text = template.substitute(title=_e(title), css=css, body=body, account=account)
    return web.Response(text=text, status=status, content_type="text/html", headers={**base, **(headers or {})})


def _csrf(session: dict) -> str:
    return f'<input type="hidden" name="csrf" value="{_e(session["csrf_token"])}">'


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    allowed = {f"{request.scheme}://{request.host}"}
    public = request.app[SETTINGS].public_url
    if public:
        parts = urlsplit(public)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin in allowed


def _forbidden(request: web.Request, why: str) -> web.Response:
    return _page(request, "Refused", f'<p class="error">{_e(why)}</p>', status=403)


async def _read_form(request: web.Request):
    """The posted form, or None when it cannot be read (see ``UNREADABLE_FORM``), comes compressed, stalls, or
    gives a field twice."""
    if body_encoding(request) is not None:
        return None
    try:
        async with asyncio.timeout(BODY_SECONDS):  # a form that stalls holds its admission slot until then
            form = await request.post()
    except (*UNREADABLE_FORM, TimeoutError):
        return None
    if len(set(form.keys())) != len(form):  # a field given twice: which one counts is not for us to guess
        return None
    return form


def _unreadable_form(request: web.Request) -> web.Response:
    return _page(request, "Refused", '<p class="error">The form could not be read: send it again from the page.</p>',
                 status=400)


async def _session(request: web.Request) -> dict | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 100:
        return None
    row = await request.app[POOL].fetchrow(Q.treasury_session_get, _token_hash(token), now_utc())
    return dict(row) if row else None


async def _require(request: web.Request, *, post: bool = False) -> dict | web.Response:
    """The session, or the response to send instead (login redirect, 403 for a forged POST)."""
    if post and not _same_origin(request):
        return _forbidden(request, "This form must be sent from the treasury pages themselves (Origin check).")
    session = await _session(request)
    if session is None:
        if post:
            return _forbidden(request, "Your session has ended: log in again.")
        return _see_other("/treasury/login")
    if post:
        form = await _read_form(request)
        if form is None:
            return _unreadable_form(request)
        sent = form.get("csrf")
        if not isinstance(sent, str) or not hmac.compare_digest(sent, session["csrf_token"]):
            return _forbidden(request, "The form's security token is missing or wrong: reload the page and retry.")
        request[FORM] = form
    return session


async def login_form(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    msg = f'<p class="error">{_e(error)}</p>' if error else ""
    body = (f'<div class="login"><h1>Log in</h1>{msg}<form method="post" action="/treasury/login">'
            '<label for="key">Treasury API key</label>'
            '<input id="key" name="key" type="password" autocomplete="off" required>'
            '<button type="submit">Log in</button></form>'
            '<p class="note">Your key is exchanged for a session that ends after a few hours.</p></div>')
    return _page(request, "Log in", body, status=status)


async def login(request: web.Request) -> web.Response:
    if not _same_origin(request):
        return _forbidden(request, "Log in from the treasury login page (Origin check).")
    form = await _read_form(request)
    if form is None:
        return _unreadable_form(request)
    key = form.get("key")
    try:
        p = await request.app[AUTH].authenticate(f"Bearer {key}" if isinstance(key, str) else None)
        p.require("treasury")
    except Problem:
        return await login_form(request, "That key is not a valid treasury key.", status=401)
    settings = request.app[SETTINGS]
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = now_utc()
    expires = now + timedelta(hours=settings.treasury_session_hours)
    async with request.app[POOL].acquire() as conn:
        await conn.execute(Q.treasury_sessions_prune, now)
        await conn.execute(Q.treasury_session_create, _token_hash(token), p.key_id, p.name, csrf, now, expires)
    resp = _see_other("/treasury")
    resp.set_cookie(COOKIE, token, path="/treasury", httponly=True, samesite="Strict",
                    secure=(settings.public_url or "").startswith("https://"),
                    max_age=int(settings.treasury_session_hours * 3600))
    return resp


async def logout(request: web.Request) -> web.Response:
    session = await _require(request, post=True)
    if isinstance(session, web.Response):
        return session
    await request.app[POOL].execute(Q.treasury_session_delete, _token_hash(request.cookies[COOKIE]))
    resp = _see_other("/treasury/login")
    resp.del_cookie(COOKIE, path="/treasury")
    return resp


def _today(request: web.Request) -> date:
    return business_date(now_utc(), rules_of(request.app[SETTINGS]).cutoff)


async def grid(request: web.Request) -> web.Response:
    session = await _require(request)
    if isinstance(session, web.Response):
        return session
    providers = sorted(request.app[PROVIDERS])
    async with request.app[POOL].acquire() as conn:
        cells = await day_grid(conn, today=_today(request), days=GRID_DAYS, providers=providers,
                               rules=rules_of(request.app[SETTINGS]))
        chain = await ledger.chain_head(conn)
    names = sorted({c["provider"] for c in cells})
    by = {(c["business_date"], c["provider"]): c for c in cells}
    days = sorted({c["business_date"] for c in cells}, reverse=True)
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for d in days:
        tds = []
        for n in names:
            c = by[(d, n)]
            cls = "state-" + c["state"].replace(" ", "-")
            label = f'<span class="state {cls}">{_e(c["state"])}</span>'
            if c["settlements"] or c["open_exceptions"]:  # a day with open exceptions has a page, file or not
                label = f'<a href="{_e(_day_url(d, n))}">{label}</a>'
            # The count alone where the state already says open (found by a walk-through: "exceptions open 8 open")
            count = c["open_exceptions"]
            extra = "" if not count else (f' <span class="note">({count})</span>' if "open" in c["state"] else
                                          f' <span class="note">{count} open</span>')
            tds.append(f'<td data-day="{d}" data-provider="{_e(n)}">{label}{extra}</td>')
        rows.append(f"<tr><th>{d}</th>{''.join(tds)}</tr>")
    body = (f"<h1>Business days</h1><p class=\"note\">Business days are {TIME_ZONE_NAME} days; the last "
            f"{GRID_DAYS} are shown.</p><table id=\"grid\"><thead><tr><th>Business day</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>" + _FIND_FORM
            + '<p><a id="refunds-link" href="/treasury/refunds">Refunds owed back to payers</a></p>'
            + _chain_note(chain))
    return _page(request, "Business days", body, session=session)


_FIND_FORM = ('<form method="get" action="/treasury/invoices" class="find"><label>Find an invoice '
              '<input name="q" maxlength="64" placeholder="bill number (PS…) or invoice id (inv_…)" required>'
              '</label> <button type="submit">Find</button></form>')


class FindInvoiceQuery(BaseModel):
    """The query of the "Find an invoice" page (documented; the page reads it itself)."""

    q: str = Field(description="a bill number (PS and 8 to 23 digits, as on the receipt) or an invoice id (inv_…)")


async def invoice_page(request: web.Request) -> web.Response:
    """One invoice, found by its bill number (on the citizen's receipt and in the bank app) or its id: its state,
    its payments and every exception about it, each linked to its day. Without the payer's details, as through the
    API: the agency holds those (found by review: treasury could not look up the invoice a citizen called about)."""
    session = await _require(request)
    if isinstance(session, web.Response):
        return session
    q = request.query.get("q", "").strip()

    def answer(title: str, why: str, status: int) -> web.Response:
        return _page(request, title, f'<h1>{_e(title)}</h1><p class="error">{_e(why)}</p>{_FIND_FORM}'
                                     '<p><a href="/treasury">Back to the last 14 days</a></p>',
                     session=session, status=status)

    if len(request.query.getall("q", ())) > 1:  # which one to find is not for us to guess (found by fuzzing)
        return answer("Find an invoice", "Give one bill number or invoice id, not several.", 400)

    if not (_BILL.fullmatch(q) or _INVOICE_ID.fullmatch(q)):
        return answer("Find an invoice", "Give a bill number (PS and 8 to 23 digits, e.g. PS00000123) or an invoice "
                                         "id (inv_ and 26 letters and digits).", 400)
    pool = request.app[POOL]
    invoice_id = await pool.fetchval(Q.invoice_by_bill, q) if q.startswith("PS") else q
    try:
        inv = await get_invoice(pool, request.app[INVOICE_CTX], agency_id=None, invoice_id=invoice_id or "",
                                with_payer=False)
    except NotFound:
        return answer("No such invoice", f"No invoice has {'bill number' if q.startswith('PS') else 'id'} {q}.", 404)
    exceptions = await pool.fetch(Q.exceptions_of_invoice, inv.id, [p.id for p in inv.payments])

    def when(t) -> str:
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "—"
    facts = [("Agency", inv.agency), ("Bill number", inv.bill_number), ("Status", inv.status),
             ("Amount", amount_display(inv.currency, inv.amount)),
             ("Paid so far", amount_display(inv.currency, inv.amount_paid)), ("Description", inv.description),
             ("Created", when(inv.created_at)), ("Expires", when(inv.expires_at)), ("Paid", when(inv.paid_at)),
             ("Cancelled", when(inv.cancelled_at)), ("Expired", when(inv.expired_at)), ("Invoice id", inv.id)]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    pays = "".join(f"<tr><td>{_e(p.provider)}</td><td>{_e(p.provider_transaction_id)}</td>"
                   f"<td class=\"num\">{_e(amount_display(p.currency, p.amount))}</td><td>{_e(when(p.paid_at))}</td>"
                   f"<td>{_e(p.status)}</td></tr>" for p in inv.payments)
    excs = []
    for x in exceptions:
        day_link = (f'<a href="{_e(_day_url(x["business_date"], x["provider"]))}">{x["business_date"]}</a>'
                    if x["business_date"] else "not dated yet")
        excs.append(f'<tr data-exception="{_e(x["id"])}"><td>{_e(x["reason"])}</td><td>{_e(x["state"])}'
                    f'{" (" + _e(x["resolution"]) + ")" if x["resolution"] else ""}</td><td>{_e(x["provider"])}</td>'
                    f'<td>{day_link}</td><td class="num">{_e(amount_display(x["currency"], x["amount"]))}</td></tr>')
    body = (f"<h1>Invoice {_e(inv.bill_number)}</h1><table id=\"invoice\">{rows}</table>"
            "<h2>Payments</h2>" + (f"<table id=\"payments\"><thead><tr><th>Provider</th><th>Transaction</th>"
                                   f"<th>Amount</th><th>Paid</th><th>Status</th></tr></thead><tbody>{pays}</tbody>"
                                   "</table>" if pays else "<p>None.</p>")
            + "<h2>Exceptions</h2>" + (f"<table id=\"exceptions\"><thead><tr><th>Reason</th><th>State</th>"
                                      f"<th>Provider</th><th>Business day (resolve it there)</th><th>Amount</th></tr>"
                                      f"</thead><tbody>{''.join(excs)}</tbody></table>" if excs else "<p>None.</p>")
            + '<p class="note">The payer\'s details are not shown here: the agency holds them.</p>'
            + _FIND_FORM + '<p><a href="/treasury">Back to the last 14 days</a></p>')
    return _page(request, f"Invoice {inv.bill_number}", body, session=session)


def _chain_note(chain: "ledger.ChainHead | None") -> str:
    """The ledger's chain head, for staff to record outside paysvc: checked later with ``paysvc ledger verify
    --anchor``, it shows any sealed entry deleted or changed since, which the chain alone cannot."""
    if chain is None:
        return '<h2>Ledger chain head</h2><p class="note" id="chain-head">No journal entry is sealed yet.</p>'
    sealed = chain.sealed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if chain.sealed_at else ""
    return ('<h2>Ledger chain head</h2><p class="note">As stored, not verified here. At the day\'s sign-off, run '
            '<code>paysvc ledger verify</code> with every chain head recorded before (<code>--anchor</code> each); '
            'when it passes, record this line outside paysvc. A later check with it fails if any entry sealed up '
            'to it was deleted or changed since.</p>'
            f'<p id="chain-head"><code>{_e(chain.anchor)}</code> <span class="note">seal {chain.position}, '
            f'entry {chain.entry_id}, sealed {_e(sealed)}</span></p>')


def _amounts(amounts: dict) -> str:
    return ", ".join(amount_display(cur, n) for cur, n in sorted(amounts.items())) or "—"


def _day_url(d, provider: str, **params) -> str:
    """The day page's address (not HTML-escaped), with the query ``params`` that are not None."""
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items() if v is not None)
    return f"/treasury/days/{d}/{quote(provider, safe='')}" + (f"?{query}" if query else "")


def _cursor_param(request: web.Request, name: str) -> str | None:
    v = request.query.get(name)
    return v if v and len(v) <= 100 and v.isascii() and v.isprintable() else None


def _line_param(request: web.Request) -> int:
    v = request.query.get("after_line", "")
    return int(v) if v.isascii() and v.isdigit() and len(v) <= 9 else 0


def _totals_rows(totals: dict) -> str:
    return "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{v['count']}</td><td class=\"num\">"
                   f"{_e(_amounts(v['amounts']))}</td></tr>" for k, v in totals.items())


async def day(request: web.Request) -> web.Response:
    """A provider's business day: each settlement file with its totals and its lines (paged per file), the
    day's payments, what is left in clearing, and the day's open exceptions (paged), each with a resolve
    form. A day with no file still has a page when the provider is ours or exceptions are open on it."""
    session = await _require(request)
    if isinstance(session, web.Response):
        return session
    # A page, not the API's JSON, when there is no such day (found by a treasury walk-through)
    def not_found(why: str) -> web.Response:
        return _page(request, "No such day", f'<p class="error">{_e(why)}</p><p><a href="/treasury">Back to the '
                                             'last 14 days</a></p>', session=session, status=404)

    try:
        d = iso_date(request.match_info["date"])
    except ValueError:
        return not_found(f"{request.match_info['date']!r} is not a day: a day is written like 2026-11-24")
    provider = request.match_info["provider"]
    rules = rules_of(request.app[SETTINGS])
    exc_after = _cursor_param(request, "exceptions_after")
    lines_of, after_line = _cursor_param(request, "lines_of"), _line_param(request)
    async with request.app[POOL].acquire() as conn:
        settlements = await conn.fetch(Q.settlements_of_day, provider, d)
        day_ = await day_overview(conn, provider, d, rules=rules, exceptions_limit=EXCEPTIONS_PAGE,
                                  exceptions_after=exc_after)
        if not settlements and not day_["open_exception_count"] and provider not in request.app[PROVIDERS]:
            return not_found(f"no settlement file or open exception for provider {provider!r} on {d.isoformat()}, "
                             "and no such provider is enabled")
        files = [await settlement_page(conn, s["id"], lines_limit=LINES_PAGE,
                                       after_line=after_line if s["id"] == lines_of else 0)
                 for s in settlements]
    here = _day_url(d, provider, exceptions_after=exc_after,
                    lines_of=lines_of if after_line else None, after_line=after_line or None)
    flash = request.query.get("msg")
    parts = [f"<h1>{_e(provider)} · {d} <span class=\"note\">({TIME_ZONE_NAME} business day)</span></h1>"]
    if flash:
        parts.append(f'<p class="note" id="flash">{_e(flash)}</p>')
    if not files:
        parts.append('<p class="note" id="no-file">No settlement file has been received for this day.</p>')
    for f in files:
        sid = f["id"]
        parts.append(
            f"<h2>Settlement {_e(sid)}</h2><p class=\"note\">{_e(f['format'])} file {_e(f['file']['name'])}, "
            f"{f['file']['lines']} lines, imported {_e(f['imported_at'])} (UTC) by {_e(f['imported_by'])}. "
            f"<a id=\"csv-{_e(sid)}\" href=\"/treasury/settlements/{_e(sid)}/report.csv\">Download CSV</a></p>"
            f"<table class=\"totals\"><thead><tr><th>Lines</th><th>Count</th><th>Amount</th></tr></thead>"
            f"<tbody>{_totals_rows(f['lines_by_category'])}</tbody></table>")
    parts.append(f"<h2>Payments of the day</h2><table><thead><tr><th>State</th><th>Count</th><th>Amount</th></tr>"
                 f"</thead><tbody>{_totals_rows(day_['payments_of_the_day'])}</tbody></table>")
    remaining = "".join(f"<li>{_e(k)}: {_e(_amounts(v['amounts']))}</li>"
                        for k, v in day_["clearing_remaining"].items() if v["count"])
    if remaining:
        left = f"<ul>{remaining}</ul>"
    elif not files:
        left = '<p id="nothing-left">Nothing, but no file has been received.</p>'
    elif day_["clean"]:
        left = '<p id="clean">Nothing: the day is clean.</p>'
    else:
        left = '<p id="nothing-left">Nothing, but exceptions are still open.</p>'
    parts.append("<h2>Left in clearing</h2>" + left)
    back = _e(here)
    exc_rows = []
    for e in day_["open_exceptions"]:
        # No action chosen in advance (found by a treasury walk-through: "match to invoice" was, with the invoice
        # filled in, for a duplicate payment too); the invoice field is read for match_to_invoice only.
        exc_rows.append(
            f"<tr id=\"exc-{_e(e['id'])}\"><td>{_e(e['reason'])}</td><td>{_e(e['payment_id'])}</td>"
            f"<td class=\"num\">{_e(amount_display(e['currency'], e['amount']))}</td>"
            f"<td class=\"details\">{_exception_details(e)}</td><td>"
            f"<form class=\"resolve\" method=\"post\" action=\"/treasury/exceptions/{_e(e['id'])}/resolve\">"
            f"{_csrf(session)}<input type=\"hidden\" name=\"back\" value=\"{back}\">"
            "<select name=\"action\" required><option value=\"\" selected disabled>choose an action</option>"
            "<option value=\"match_to_invoice\">match to invoice</option>"
            "<option value=\"refund_due\">refund due</option><option value=\"write_off\">write off</option></select>"
            f"<input name=\"invoice_id\" placeholder=\"invoice id (match to invoice)\" "
            f"value=\"{_e(e['invoice_id'])}\">"
            "<textarea name=\"note\" placeholder=\"why (required)\" required></textarea>"
            "<button type=\"submit\">Resolve</button></form></td></tr>")
    count = day_["open_exception_count"]
    nav = []
    if exc_after:
        nav.append(f'<a id="first-exceptions" href="{_e(_day_url(d, provider))}">First page</a>')
    if day_["next_exceptions_after"]:
        nxt = _day_url(d, provider, exceptions_after=day_["next_exceptions_after"])
        nav.append(f'<a id="next-exceptions" href="{_e(nxt)}">Next {EXCEPTIONS_PAGE}</a>')
    shown = (f"{count:,} open exception{'s' if count != 1 else ''}, oldest first; {len(exc_rows)} on this page "
             f"(at most {EXCEPTIONS_PAGE}).")
    parts.append(f"<h2>Open exceptions</h2><p class=\"note\" id=\"exception-count\">{_e(shown)} {' · '.join(nav)}</p>"
                 + ("<table id=\"exceptions\"><thead><tr><th>Reason</th><th>Payment</th><th>Amount</th>"
                    f"<th>Details</th><th>Resolve</th></tr></thead><tbody>{''.join(exc_rows)}</tbody></table>" if exc_rows else
                    '<p id="no-exceptions">None.</p>' if not count else ""))
    for f in files:
        sid = f["id"]
        line_rows = "".join(
            f"<tr><td class=\"num\">{ln['line_no']}</td><td>{_e(ln['transaction_id'])}</td>"
            f"<td class=\"num\">{_e(amount_display(ln['currency'], ln['amount']))}</td><td>{_e(ln['paid_at'])}</td>"
            f"<td>{_e(ln['category'])}</td><td>{_e(ln['payment_id'])}</td><td>{_line_exceptions(ln)}</td></tr>"
            for ln in f["lines"])
        nav = []
        if f["after_line"]:
            nav.append(f'<a id="first-lines-{_e(sid)}" href="{_e(_day_url(d, provider, exceptions_after=exc_after))}'
                       f'#lines-{_e(sid)}">First lines</a>')
        if f["next_after_line"] is not None:
            nxt = _day_url(d, provider, exceptions_after=exc_after, lines_of=sid, after_line=f["next_after_line"])
            nav.append(f'<a id="more-lines-{_e(sid)}" href="{_e(nxt)}#lines-{_e(sid)}">Next {LINES_PAGE} lines</a>')
        parts.append(
            f"<h2>Lines of {_e(sid)}</h2><p class=\"note\">Times are UTC. "
            + (f"Lines after line {f['after_line']}" if f["after_line"] else "From the first line")
            + f", at most {LINES_PAGE} at a time; the CSV has them all. {' · '.join(nav)}</p>"
            f"<table id=\"lines-{_e(sid)}\" class=\"lines\"><thead><tr><th>Line</th><th>Transaction</th><th>Amount</th>"
            f"<th>Paid at (UTC)</th><th>Category</th><th>Payment</th><th>Exceptions</th></tr></thead>"
            f"<tbody>{line_rows}</tbody></table>")
    return _page(request, f"{provider} {d}", "".join(parts), session=session)


def _line_exceptions(ln: dict) -> str:
    """A line's exceptions, as HTML: its own (the import's, or its capture's for a line captured from the file),
    and that of the payment it settles when the capture held money for treasury (found by an auditor's
    walk-through: such lines read "matched" with nothing to say the payment was still treasury's)."""
    out = []
    if ln.get("exception_id"):
        out.append(f"{_e(ln['exception_id'])} ({_e(ln['exception_state'])})")
    if ln.get("payment_exception_id"):
        out.append(f"payment: {_e(ln['payment_exception_reason'])} {_e(ln['payment_exception_id'])} "
                   f"({_e(ln['payment_exception_state'])})")
    return "<br>".join(out)


def _exception_details(e: dict) -> str:
    """What an open exception is about, as HTML: the bill, the payment (provider id, amount, time in UTC), the file
    line and, for an amount mismatch, which way the file differs (found by a treasury walk-through: the amount
    alone did not say whether the provider settled more or less, which decides the actions allowed)."""
    parts = []
    if e.get("bill_number"):
        parts.append(f"bill {_e(e['bill_number'])}")
    if e.get("provider_transaction_id"):
        when = e["payment_paid_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M") if e.get("payment_paid_at") else ""
        parts.append(f"paid {_e(amount_display(e['payment_currency'], e['payment_amount']))} as "
                     f"{_e(e['provider_transaction_id'])} {_e(when)}".rstrip())
    if e.get("line_no") is not None:
        parts.append(f"line {e['line_no']}")
    if (e["reason"] == "amount_mismatch" and e.get("line_amount") is not None and e.get("payment_amount") is not None
            and e.get("line_currency") == e.get("payment_currency")):
        diff = e["line_amount"] - e["payment_amount"]
        way = "more" if diff > 0 else "less"
        parts.append(f"<strong>settled {_e(amount_display(e['payment_currency'], abs(diff)))} {way} than captured"
                     f"</strong> ({_e(amount_display(e['line_currency'], e['line_amount']))} for "
                     f"{_e(amount_display(e['payment_currency'], e['payment_amount']))}"
                     + ("; only write off applies" if diff < 0 else "") + ")")
    elif e["reason"] == "amount_mismatch" and e.get("line_currency") and e.get("line_currency") != \
            e.get("payment_currency"):
        parts.append(f"settled in {_e(e['line_currency'])}, captured in {_e(e.get('payment_currency') or '?')}: "
                     "only write off applies")
    return "; ".join(parts) or "—"


async def resolve_form(request: web.Request) -> web.Response:
    session = await _require(request, post=True)
    if isinstance(session, web.Response):
        return session
    form = request[FORM]
    back = form.get("back") if isinstance(form.get("back"), str) else "/treasury"
    if not back.startswith("/treasury/") or not back.isprintable() or not back.isascii():
        back = "/treasury"  # our own pages only; no control characters (they would break the redirect)
    fields = {k: form.get(k) for k in ("action", "note", "invoice_id") if form.get(k)}
    if fields.get("action") != "match_to_invoice":
        fields.pop("invoice_id", None)  # the form fills it in with the exception's invoice, for match_to_invoice
    try:
        body = ResolveBody.model_validate(fields)
    except ValidationError as exc:
        # each error under its field's name (found by a walk-through: an empty note said only "Field required")
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in pydantic_errors(exc))
        return _page(request, "Not resolved", f'<p class="error">{_e(msg)}</p><p><a href="{_e(back)}">Back</a></p>',
                     session=session, status=422)
    try:
        await resolve_exception(request.match_info["id"], body, pool=request.app[POOL],
                                bank_account=request.app[SETTINGS].treasury_bank_account, by=actor(session["key_name"], session["key_id"]))
    except Problem as p:
        return _page(request, "Not resolved", f'<p class="error">{_e(p.detail)}</p><p><a href="{_e(back)}">Back</a></p>',
                     session=session, status=p.status)
    back = back.split("&msg=")[0].split("?msg=")[0]      # a page already showing a message: one message
    sep = "&" if "?" in back else "?"
    return _see_other(f"{back}{sep}msg={quote('Exception ' + request.match_info['id'] + ' resolved')}")


async def refunds_page(request: web.Request) -> web.Response:
    """The refunds still owed back to payers, oldest first, each with a form to record it paid (once nothing can
    take it back: see ``refund_payable``), and the latest payouts recorded."""
    session = await _require(request)
    if isinstance(session, web.Response):
        return session
    async with request.app[POOL].acquire() as conn:
        owed = await conn.fetch(Q.refunds_owed, None, None, None, REFUNDS_PAGE + 1)
        recent = await conn.fetch(Q.refund_payouts_page, None, None, None, 20)
    parts = ["<h1>Refunds owed back to payers</h1>"]
    if flash := request.query.get("msg"):
        parts.append(f'<p class="note" id="flash">{_e(flash)}</p>')
    parts.append("<p class=\"note\">What resolutions put in suspense:refunds-due and nobody has paid out yet, per "
                 "payment (or per exception when it is about no payment). Send the money by the bank, then record "
                 "the transfer with the bank's reference: its entry moves it from refunds-due to the treasury bank "
                 "account. A payment's refund is paid once a file has settled the payment, or its "
                 "missing_in_settlement is resolved.</p>")
    rows = []
    for r in owed[:REFUNDS_PAGE]:
        cur = r["currency"]
        if r["payable"] and r["exception_ids"]:
            action = (f"<form class=\"resolve\" method=\"post\" action=\"/treasury/refunds\">{_csrf(session)}"
                      f"<input type=\"hidden\" name=\"exception_id\" value=\"{_e(r['exception_ids'][0])}\">"
                      f"<input type=\"hidden\" name=\"currency\" value=\"{_e(cur)}\">"
                      f"<input name=\"amount\" inputmode=\"numeric\" value=\"{r['outstanding']}\" required "
                      f"title=\"minor units: riel, or US cents\">"
                      "<input name=\"reference\" maxlength=\"140\" placeholder=\"bank reference (required)\" required>"
                      "<textarea name=\"note\" placeholder=\"what was done (required)\" required></textarea>"
                      "<button type=\"submit\">Record payout</button></form>")
        else:
            action = ('<span class="note">not settled yet: its provider may still give the money back to the '
                      'payer</span>')
        rows.append(f"<tr id=\"refund-{_e(r['case_id'])}-{_e(cur)}\"><td>{_e(r['case_id'])}</td>"
                    f"<td>{_e(', '.join(r['exception_ids']))}</td><td>{_e(r['since'].strftime('%Y-%m-%d %H:%M'))}</td>"
                    f"<td class=\"num\">{_e(amount_display(cur, r['outstanding']))}</td>"
                    f"<td class=\"num\">{_e(amount_display(cur, r['paid']))}</td><td>{action}</td></tr>")
    if rows:
        more = (f"<p class=\"note\">The oldest {REFUNDS_PAGE} are shown; record these and the next appear.</p>"
                if len(owed) > REFUNDS_PAGE else "")
        parts.append("<table id=\"refunds\"><thead><tr><th>Payment or exception</th><th>Exceptions</th>"
                     "<th>Owed since (UTC)</th><th>Outstanding</th><th>Paid</th><th>Record a payout</th></tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table>{more}")
    else:
        parts.append('<p id="no-refunds">None: nothing is owed back.</p>')
    if recent:
        parts.append("<h2>Latest payouts</h2><table id=\"payouts\"><thead><tr><th>Payout</th><th>Recorded (UTC)"
                     "</th><th>Amount</th><th>Bank reference</th><th>Payment or exception</th><th>By</th></tr></thead>"
                     "<tbody>" + "".join(
                         f"<tr><td>{_e(p['id'])}</td><td>{_e(p['recorded_at'].strftime('%Y-%m-%d %H:%M'))}</td>"
                         f"<td class=\"num\">{_e(amount_display(p['currency'], p['amount']))}</td>"
                         f"<td>{_e(p['reference'])}</td><td>{_e(p['payment_id'] or p['exception_id'])}</td>"
                         f"<td>{_e(p['recorded_by'])}</td></tr>" for p in recent) + "</tbody></table>")
    parts.append('<p><a href="/treasury">Business days</a></p>')
    return _page(request, "Refunds owed", "".join(parts), session=session)


async def refund_form(request: web.Request) -> web.Response:
    session = await _require(request, post=True)
    if isinstance(session, web.Response):
        return session
    form = request[FORM]
    back = '<p><a href="/treasury/refunds">Back</a></p>'
    fields = {k: form.get(k) for k in ("exception_id", "currency", "amount", "reference", "note")
              if isinstance(form.get(k), str)}
    amount = fields.get("amount", "").strip().replace(",", "")
    if (n := minor_units(amount)) is not None:   # anything else stays text, which the model refuses
        fields["amount"] = n
    try:
        body = PayoutBody.model_validate(fields)
    except ValidationError as exc:
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in pydantic_errors(exc))
        return _page(request, "Not recorded", f'<p class="error">{_e(msg)}</p>{back}', session=session, status=422)
    try:
        payout, replayed = await record_payout(body, pool=request.app[POOL],
                                               bank_account=request.app[SETTINGS].treasury_bank_account,
                                               by=actor(session["key_name"], session["key_id"]))
    except Problem as p:
        return _page(request, "Not recorded", f'<p class="error">{_e(p.detail)}</p>{back}', session=session,
                     status=p.status)
    said = (f"Payout {payout['id']} was already recorded for this transfer: nothing new" if replayed else
            f"Payout {payout['id']} recorded: {amount_display(payout['currency'], payout['amount'])}")
    return _see_other(f"/treasury/refunds?msg={quote(said)}")


async def csv_download(request: web.Request) -> web.StreamResponse:
    session = await _require(request)
    if isinstance(session, web.Response):
        return session
    return await stream_csv(request, request.match_info["id"])


async def index(request: web.Request) -> web.Response:
    return _see_other("/treasury")


ROUTES = [
    Route("GET", "/treasury/login", login_form, "Treasury login page", content_type="text/html", tags=("pages",)),
    Route("POST", "/treasury/login", login, "Exchange a treasury key for a session cookie", content_type="text/html",
          status=303, tags=("pages",)),
    Route("POST", "/treasury/logout", logout, "End the session", content_type="text/html", status=303,
          tags=("pages",)),
    Route("GET", "/treasury", grid, "Business days × providers", content_type="text/html", tags=("pages",)),
    Route("GET", "/treasury/", index, "Business days × providers", content_type="text/html", status=303,
          tags=("pages",)),
    Route("GET", "/treasury/days/{date}/{provider}", day, "A day's reconciliation", content_type="text/html",
          tags=("pages",)),
    Route("GET", "/treasury/invoices", invoice_page, "An invoice found by bill number or id (?q=)",
          content_type="text/html", query=FindInvoiceQuery, tags=("pages",)),
    Route("POST", "/treasury/exceptions/{id}/resolve", resolve_form, "Resolve an exception (form)",
          content_type="text/html", status=303, tags=("pages",)),
    Route("GET", "/treasury/refunds", refunds_page, "Refunds owed back to payers, and the latest payouts",
          content_type="text/html", tags=("pages",)),
    Route("POST", "/treasury/refunds", refund_form, "Record a refund paid out (form)", content_type="text/html",
          status=303, tags=("pages",)),
    Route("GET", "/treasury/settlements/{id}/report.csv", csv_download, "A settlement's report as CSV",
          content_type="text/csv", tags=("pages",)),
]


def setup(app: web.Application) -> None:
    app[TEMPLATE] = _load()
    add_routes(app, ROUTES)
