"""Treasury pages, the gaps a treasury review found: a day without a file, a header-only file, a day with two
files, and a day with many open exceptions. HTTP + HTML only (no browser)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html import unescape

import asyncpg
import pytest

from paysvc import treasury_pages
from paysvc.api_settlements import rules_of
from paysvc.db import connect
from paysvc.settlement_days import business_date, parse_cutoff
from paysvc.settlement_import import raise_overdue
from paysvc.web import SETTINGS
from providers.sandbox import write_settlement_csv
from tests.test_settlement import DAY, line, paid, upload
from tests.test_treasury_pages import login, origin


@pytest.fixture
async def treasury_key(api):
    return await api.key(None, scopes=["treasury"], name="Treasury desk")


def _today():
    return business_date(datetime.now(UTC), parse_cutoff("23:59:59.999"))


async def _raise_overdue_of(api, day) -> int:
    """Raise missing_in_settlement for the unsettled payments of ``day`` (as the recheck does after the grace)."""
    async with connect(api.dsn) as conn:
        return await raise_overdue(conn, provider="sandbox", today=day + timedelta(days=3),
                                   rules=rules_of(api.client.app[SETTINGS]), now=datetime.now(UTC))


def _cell(page: str, day) -> str:
    return page.split(f'<td data-day="{day}" data-provider="sandbox">')[1].split("</td>")[0]


def _exception_ids(page: str) -> list[str]:
    return re.findall(r'<tr id="exc-([^"]+)"', page)


def _csrf(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


async def test_a_day_without_a_file_shows_and_resolves_its_open_exceptions(api, portal, treasury_key,
                                                                            invoice_body):
    now, today = datetime.now(UTC), _today()
    await paid(api, portal, invoice_body, "TX-1", at=now)
    await paid(api, portal, invoice_body, "TX-2", at=now)
    assert await _raise_overdue_of(api, today) == 2
    assert (await login(api, treasury_key)).status == 303
    cell = _cell(await (await api.client.get("/treasury")).text(), today)
    assert "not received" in cell and "2 open" in cell
    assert f'<a href="/treasury/days/{today}/sandbox">' in cell
    r = await api.client.get(f"/treasury/days/{today}/sandbox")
    assert r.status == 200
    page = await r.text()
    assert 'id="no-file"' in page and "No settlement file has been received" in page
    ids = _exception_ids(page)
    assert len(ids) == 2 and page.split('id="exceptions"')[1].count("<td>missing_in_settlement</td>") == 2
    assert "2 open exceptions" in page
    assert 'id="clean"' not in page
    form = {"action": "write_off", "note": "never settled", "csrf": _csrf(page),
            "back": f"/treasury/days/{today}/sandbox"}
    r = await api.client.post(f"/treasury/exceptions/{ids[0]}/resolve", data=form, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 303, await r.text()
    page = await (await api.client.get(r.headers["Location"])).text()
    assert _exception_ids(page) == ids[1:]
    # A provider the service does not know, on a day with nothing, is still not found.
    r = await api.client.get(f"/treasury/days/{today}/nosuchprovider")
    assert r.status == 404 and r.content_type == "text/html" and "no such provider is enabled" in await r.text()
    # Nor is the day written otherwise than YYYY-MM-DD (Python alone would read these as the same day); each is
    # a page saying so, not the API's JSON (found by a treasury walk-through)
    for other in (today.strftime("%Y%m%d"), today.strftime("%G-W%V-%u"), "2026-13-45"):
        r = await api.client.get(f"/treasury/days/{other}/sandbox")
        assert r.status == 404 and r.content_type == "text/html", other
        assert "a day is written like 2026-11-24" in await r.text(), other


async def test_a_header_only_file_does_not_make_the_day_matched(api, portal, treasury, treasury_key,
                                                                 invoice_body):
    now, today = datetime.now(UTC), _today()
    await paid(api, portal, invoice_body, "TX-1", at=now)
    r = await upload(api, treasury, write_settlement_csv([]), day=today)
    assert r.status == 201, await r.text()
    rep = await r.json()
    assert rep["clean"] is False and rep["open_exceptions"] == []       # money still expected in clearing
    assert (await login(api, treasury_key)).status == 303
    cell = _cell(await (await api.client.get("/treasury")).text(), today)
    assert "matched" not in cell and "state-matched" not in cell
    assert "left in clearing" in cell and f'href="/treasury/days/{today}/sandbox"' in cell
    page = await (await api.client.get(f"/treasury/days/{today}/sandbox")).text()
    assert 'id="clean"' not in page and "expected" in page
    # Once the file settles it, the same day is matched.
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000, at=now)]), day=today)
    assert r.status == 201 and (await r.json())["clean"] is True
    cell = _cell(await (await api.client.get("/treasury")).text(), today)
    assert "state-matched" in cell
    page = await (await api.client.get(f"/treasury/days/{today}/sandbox")).text()
    assert 'id="clean"' in page


async def test_every_file_of_the_day_lists_its_lines_paged(api, portal, treasury, treasury_key, invoice_body,
                                                           monkeypatch):
    await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-2")
    await paid(api, portal, invoice_body, "TX-3")
    r1 = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000)]), name="first.csv")
    r2 = await upload(api, treasury, write_settlement_csv(
        [line("TX-2", 50000), line("TX-3", 50000), line("<b>TX-x</b>", 700)]), name="second.csv")
    s1, s2 = (await r1.json())["id"], (await r2.json())["id"]
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    assert "<td>TX-1</td>" in page and "<td>TX-2</td>" in page and "<td>TX-3</td>" in page
    assert f'id="lines-{s1}"' in page and f'id="lines-{s2}"' in page
    assert "&lt;b&gt;TX-x&lt;/b&gt;" in page and "<b>TX-x" not in page        # provider text is escaped
    monkeypatch.setattr(treasury_pages, "LINES_PAGE", 2, raising=False)
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    second = page.split(f'id="lines-{s2}"')[1].split("</table>")[0]
    assert "<td>TX-2</td>" in second and "<td>TX-3</td>" in second and "TX-x" not in second
    more = unescape(page.split(f'id="more-lines-{s2}" href="')[1].split('"')[0])
    assert f'id="more-lines-{s1}"' not in page                                   # file 1 fits in one page
    page = await (await api.client.get(more)).text()
    second = page.split(f'id="lines-{s2}"')[1].split("</table>")[0]
    assert "&lt;b&gt;TX-x&lt;/b&gt;" in second and "TX-2" not in second
    assert f'id="more-lines-{s2}"' not in page
    assert "<td>TX-1</td>" in page                                               # the other file: its first page


async def test_open_exceptions_are_paged_and_stay_resolvable(api, portal, treasury_key, invoice_body, monkeypatch):
    for i in range(5):
        await paid(api, portal, invoice_body, f"TX-{i}")
    assert await _raise_overdue_of(api, DAY) == 5
    monkeypatch.setattr(treasury_pages, "EXCEPTIONS_PAGE", 2, raising=False)
    assert (await login(api, treasury_key)).status == 303
    url = f"/treasury/days/{DAY}/sandbox"
    seen: list[str] = []
    pages = 0
    while url:
        r = await api.client.get(url)
        assert r.status == 200
        page = await r.text()
        pages += 1
        assert "5 open exceptions" in page
        ids = _exception_ids(page)
        assert 1 <= len(ids) <= 2
        seen += ids
        nxt = re.search(r'<a id="next-exceptions" href="([^"]+)"', page)
        url = unescape(nxt.group(1)) if nxt else None
        if pages == 2:
            second_url, second_page = unescape(r.url.path_qs), page
    assert pages == 3 and len(set(seen)) == 5
    conn = await asyncpg.connect(api.dsn)
    assert set(seen) == {r["id"] for r in await conn.fetch("SELECT id FROM reconciliation_exceptions")}
    # Resolving from the second page comes back to the second page, whose form still works.
    exc = _exception_ids(second_page)[0]
    back = second_page.split(f'<tr id="exc-{exc}"')[1].split('name="back" value="')[1].split('"')[0]
    assert unescape(back) == second_url
    form = {"action": "refund_due", "note": "refund the citizen", "csrf": _csrf(second_page), "back": unescape(back)}
    r = await api.client.post(f"/treasury/exceptions/{exc}/resolve", data=form, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith(second_url + "&msg=")
    page = await (await api.client.get(r.headers["Location"])).text()
    assert 'id="flash"' in page and "4 open exceptions" in page and exc not in _exception_ids(page)
    assert await conn.fetchval("SELECT state FROM reconciliation_exceptions WHERE id = $1", exc) == "resolved"
    await conn.close()


async def test_a_day_with_thirty_thousand_open_exceptions_is_a_small_page(api, treasury_key):
    """The review's day: 29,991 open exceptions made a 24.5 MB page. It now shows one page of them and says
    how many there are."""
    conn = await asyncpg.connect(api.dsn)
    await conn.execute(
        "INSERT INTO reconciliation_exceptions (id, reason, provider, currency, amount, business_date) "
        "SELECT 'exc_' || lpad(i::text, 32, '0'), 'unknown_khqr', 'sandbox', 'KHR', i, $1 "
        "FROM generate_series(1, 29991) i", DAY)
    await conn.close()
    assert (await login(api, treasury_key)).status == 303
    r = await api.client.get(f"/treasury/days/{DAY}/sandbox")
    assert r.status == 200
    page = await r.text()
    assert len(page.encode()) < 200_000
    assert "29,991 open exceptions" in page and 'id="no-file"' in page
    assert len(_exception_ids(page)) == treasury_pages.EXCEPTIONS_PAGE
    assert page.count('name="csrf"') >= treasury_pages.EXCEPTIONS_PAGE
    assert re.search(r'<a id="next-exceptions" href="[^"]+exceptions_after=exc_0+100"', page)


async def test_each_open_exception_says_what_it_is_about_and_no_action_is_chosen_for_treasury(
        api, portal, treasury, treasury_key, invoice_body):
    """Found by a treasury walk-through: an exception showed only its reason, payment and amount (a short
    settlement read like a long one, though only write_off applies to it), and every form came with "match to
    invoice" chosen and the invoice filled in, for a duplicate payment too."""
    now, today = datetime.now(UTC), _today()
    short = await paid(api, portal, invoice_body, "TX-SHORT", at=now)
    await paid(api, portal, invoice_body, "TX-LONG", at=now)
    data = write_settlement_csv([line("TX-SHORT", 48000, at=now), line("TX-LONG", 50500, at=now)])
    r = await upload(api, treasury, data, day=today)
    assert r.status == 201, await r.text()
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{today}/sandbox")).text()
    rows = {i: page.split(f'<tr id="exc-{i}">')[1].split("</tr>")[0] for i in _exception_ids(page)}
    assert len(rows) == 2
    [less] = [r for r in rows.values() if "TX-SHORT" in r]
    [more] = [r for r in rows.values() if "TX-LONG" in r]
    assert f"bill {short['bill_number']}" in less
    assert f"paid 50,000 ៛ as TX-SHORT {now.strftime('%Y-%m-%d %H:%M')}" in less
    assert ("<strong>settled 2,000 ៛ less than captured</strong> (48,000 ៛ for 50,000 ៛; only write off applies)"
            in less)
    assert "<strong>settled 500 ៛ more than captured</strong> (50,500 ៛ for 50,000 ៛)" in more
    assert re.search(r"line [12]\b", less) and "only write off" not in more
    for row in rows.values():
        assert '<select name="action" required><option value="" selected disabled>choose an action</option>' in row
        assert 'value="match_to_invoice" selected' not in row
    assert "From the first line, at most" in page and "Lines after line 0" not in page
    cell = _cell(await (await api.client.get("/treasury")).text(), today)
    assert "exceptions open" in cell and "(2)" in cell and "2 open" not in cell  # the state says open already
    r = await api.client.get("/treasury/days/2026-13-45/sandbox")
    text = unescape(await r.text())
    assert "'2026-13-45' is not a day" in text and "month must be" not in text


async def test_a_lines_exceptions_are_on_the_day_page(api, portal, treasury, treasury_key, invoice_body):
    """Found by an auditor's walk-through: a line settling a payment paid short read "matched" on the day page,
    nothing saying the payment was treasury's; nor did a line's own exception show."""
    from tests.payments_helpers import new_invoice, pay
    from tests.test_settlement import AT, issued_before

    await paid(api, portal, invoice_body, "TX-1")
    short = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    assert (await pay(api.client, short, txid="TX-SHORT", amount=20000, paid_at=AT)).status == 200
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 49000), line("TX-SHORT", 20000)]))
    lines = {ln["transaction_id"]: ln for ln in (await r.json())["lines"]}
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    row = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td class=\"num\">\d+</td><td>(TX-[A-Z0-9]+)</td>.*?</tr>",
                                                        page)}
    assert f"{lines['TX-1']['exception_id']} (open)" in row["TX-1"]                     # its own: amount_mismatch
    assert f"payment: underpaid {lines['TX-SHORT']['payment_exception_id']} (open)" in row["TX-SHORT"]


async def test_an_invoice_is_found_by_its_bill_number_with_its_payments_and_exceptions(api, portal, treasury_key,
                                                                                       invoice_body):
    # Found by review: a citizen who calls treasury names a bill number; the pages could not find its invoice.
    from tests.payments_helpers import new_invoice, pay

    inv = await new_invoice(api, portal, invoice_body, payer={"name": "Sok Dara", "phone": "+855 12 345 678"},
                            amount=50000)
    r = await pay(api.client, inv, amount=20000, txid="SHORT-1")  # paid short: held, an exception opened
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    await login(api, treasury_key)
    grid = await (await api.client.get("/treasury")).text()
    assert 'action="/treasury/invoices"' in grid and 'name="q"' in grid
    for q in (inv["bill_number"], inv["id"], f"  {inv['bill_number']} "):
        r = await api.client.get("/treasury/invoices", params={"q": q})
        page = unescape(await r.text())
        assert r.status == 200, page
        assert f"Invoice {inv['bill_number']}" in page and "MOI" in page and "open" in page
        assert "SHORT-1" in page and "underpaid" in page and "Sok Dara" not in page and "345 678" not in page
        [exc] = re.findall(r'data-exception="([^"]+)"', page)
        assert re.search(r'href="/treasury/days/\d{4}-\d{2}-\d{2}/sandbox"', page)  # where it is resolved
    async with connect(api.dsn) as conn:
        assert await conn.fetchval("SELECT invoice_id FROM reconciliation_exceptions WHERE id = $1", exc) == inv["id"]
    r = await api.client.get("/treasury/invoices", params={"q": "PS99999999"})
    assert r.status == 404 and "No invoice has bill number PS99999999" in await r.text()
    for bad in ("", "<script>", "PS12", "select 1"):
        r = await api.client.get("/treasury/invoices", params={"q": bad})
        assert r.status == 400 and "Give a bill number" in await r.text() and "<script>" not in await r.text()
    # Two, of which the page read the first (found by fuzzing): which one was meant is not for it to guess
    r = await api.client.get("/treasury/invoices", params=[("q", inv["bill_number"]), ("q", "PS99999999")])
    assert r.status == 400 and "Give one bill number or invoice id" in await r.text()
    api.client.session.cookie_jar.clear()
    r = await api.client.get("/treasury/invoices", params={"q": inv["bill_number"]}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/treasury/login"  # not without a session


async def test_an_invoice_page_shows_the_expired_invoices_part_treasury_carried_to_it(api, portal, treasury,
                                                                                    treasury_key, invoice_body):
    # Found by review: the exception of an expired invoice's part keeps that invoice's id; the invoice the part
    # was carried to showed its amount paid with no exception to explain it.
    from tests.payments_helpers import new_invoice
    from tests.test_expired_part_paid import exceptions, expire, part_paid, resolve

    old = await part_paid(api, portal, treasury, invoice_body, txid="PP-C")
    await upload(api, treasury, write_settlement_csv([line("PP-C", 400, at=datetime.now(UTC))]),
                 day=datetime.now(UTC).date())
    new = await new_invoice(api, portal, invoice_body, amount=1000)
    await expire(api, old)
    [part] = await exceptions(api, treasury, reason="expired_part_paid")
    assert (await resolve(api, treasury, part["id"], "match_to_invoice", invoice_id=new["id"])).status == 200
    await login(api, treasury_key)
    page = unescape(await (await api.client.get("/treasury/invoices", params={"q": new["bill_number"]})).text())
    assert re.findall(r'data-exception="([^"]+)"', page) == [part["id"]], page
    assert "expired_part_paid" in page and "match_to_invoice" in page
