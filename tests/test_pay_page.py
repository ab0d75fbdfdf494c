"""The citizen's payment page: plain HTTP checks, then a real headless Chromium at a phone's size."""

from __future__ import annotations

import asyncio
import importlib.resources
import io
import json
import os
import re

import asyncpg
import pytest
import pytest_asyncio

from paysvc import khqr
from paysvc.pages import amount_display
from tests.payments_helpers import pay, sandbox_body, sandbox_headers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/pay_page.png"
STATE_FIELDS = {"invoice_id", "status", "currency", "amount", "amount_due", "amount_display", "agency", "description",
                "line_items", "khqr",
                "qr_svg_url", "server_time", "paid_at", "paid_with", "payment_reference", "expires_at",
                "payment_held"}


async def open_invoice(api, invoice_body, h: dict | None = None, **kw) -> tuple[dict, dict]:
    h = h or await api.portal("MOI")
    r = await api.client.post("/v1/invoices", json=invoice_body(**kw), headers=h)
    assert r.status == 201, await r.text()
    return await r.json(), h


async def sql(api, query: str, *args) -> None:
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


# --- plain HTTP ---------------------------------------------------------------------------------------------

def test_amounts_read_the_way_citizens_write_them():
    assert amount_display("KHR", 50000) == "50,000 ៛"
    assert amount_display("KHR", 500) == "500 ៛"
    assert amount_display("USD", 1250) == "$12.50"
    assert amount_display("USD", 5) == "$0.05"
    assert amount_display("USD", 123456789) == "$1,234,567.89"


async def test_page_for_an_open_invoice_shows_the_khqr_card(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body, amount=50000)
    r = await api.client.get(f"/pay/{inv['id']}")
    assert r.status == 200 and r.content_type == "text/html"
    page = await r.text()
    assert "MOI Fees Office" in page and "ក្រសួងមហាផ្ទៃ" in page
    assert "50,000 ៛" in page and ">KHR<" in page
    assert "ស្កេន" in page and '<html lang="km">' in page and 'lang="en"' in page
    assert f'data-md5="{inv["khqr"]["md5"]}"' in page and 'data-status="open"' in page
    assert f'src="/v1/invoices/{inv["id"]}/qr.svg"' in page and 'alt="' in page
    assert 'aria-live="polite"' in page
    assert re.search(r'role="timer">(0\d|10):\d\d<', page)
    assert inv["bill_number"] in page
    assert r.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert len(page.encode()) < 30 * 1024
    # Found by a citizen's walk-through: without JavaScript the page froze, saying it updates by itself; a
    # screen reader found no heading on the code; the image went uncompressed over prepaid data.
    assert '<noscript><meta http-equiv="refresh" content="30"></noscript>' in page
    assert '<h1 class="sr">' in page and "<title>ទូទាត់ · Pay 50,000 ៛ · MOI Fees Office</title>" in page
    img = await api.client.get(f"/v1/invoices/{inv['id']}/qr.svg", headers={"Accept-Encoding": "gzip"})
    assert img.status == 200 and img.headers.get("Content-Encoding") == "gzip"


async def test_usd_amount_is_written_with_a_dollar_sign(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body, currency="USD", amount=1250)
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert "$12.50" in page and ">USD<" in page


async def test_page_and_its_assets_reach_no_other_host(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body)
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    static = importlib.resources.files("paysvc") / "static"
    for name, text in [("page", page)] + [(n, (static / n).read_text(encoding="utf-8"))
                                          for n in ("pay.html", "pay.js", "pay.css")]:
        # The only absolute URL allowed is the SVG namespace, which is a name, never fetched.
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?//""", text), name
        assert "@import" not in text and 'rel="stylesheet"' not in text and "<script src" not in text, name


async def test_state_json_is_public_small_and_without_payer_data(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body, payer={"name": "Sok Dara", "phone": "+855 12 345 678"},
                                metadata={"case": "SECRET-CASE"})
    r = await api.client.get(f"/pay/{inv['id']}/state")  # no Authorization header: public
    assert r.status == 200 and r.content_type == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    text = await r.text()
    for private in ("Sok Dara", "345 678", "SECRET-CASE", inv["reference"]):
        assert private not in text
    s = await r.json()
    assert set(s) == STATE_FIELDS
    assert s["invoice_id"] == inv["id"] and s["status"] == "open"
    assert (s["currency"], s["amount"], s["amount_display"]) == ("KHR", 50000, "50,000 ៛")
    assert s["agency"] == {"name": "MOI Fees Office", "name_km": "ក្រសួងមហាផ្ទៃ"}
    assert s["description"] == "Passport fee"
    assert s["khqr"] == inv["khqr"]
    assert s["qr_svg_url"] == f"/v1/invoices/{inv['id']}/qr.svg"
    assert s["server_time"].endswith("Z") or "+00:00" in s["server_time"]


async def test_state_hands_out_a_fresh_code_when_the_last_ran_out(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body)
    await sql(api, "UPDATE khqr_codes SET created_at = now() - interval '11 minutes', "
                   "expires_at = now() - interval '1 minute' WHERE invoice_id = $1", inv["id"])
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["status"] == "open" and s["khqr"]["md5"] != inv["khqr"]["md5"]
    svg = await api.client.get(s["qr_svg_url"])
    assert svg.headers["X-Khqr-Md5"] == s["khqr"]["md5"]


async def test_unknown_invoice_gets_a_friendly_html_404(api):
    for path in ("/pay/inv_aaaaaaaaaaaaaaaaaaaaaaaaaa", "/pay/not-an-id", "/pay/%3Cscript%3Ealert(1)%3C%2Fscript%3E"):
        r = await api.client.get(path)
        assert r.status == 404 and r.content_type == "text/html", path
        page = await r.text()
        assert "Invoice not found" in page and "រកមិនឃើញវិក្កយបត្រ" in page
        assert 'data-status="notfound"' in page and "alert(1)" not in page  # the id is never echoed
    r = await api.client.get("/pay/inv_aaaaaaaaaaaaaaaaaaaaaaaaaa/state")
    assert r.status == 404 and r.content_type == "application/problem+json"


async def test_cancelled_invoice_shows_its_state_and_no_code(api, invoice_body):
    inv, h = await open_invoice(api, invoice_body)
    assert (await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)).status == 200
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["status"] == "cancelled" and s["khqr"] is None and s["qr_svg_url"] is None
    r = await api.client.get(f"/pay/{inv['id']}")
    page = await r.text()
    assert r.status == 200 and 'data-status="cancelled"' in page and "qr.svg" not in page
    assert 'data-md5=""' in page and "This invoice was cancelled" in page
    assert "<title>លុបចោល · Cancelled " in page and 'http-equiv="refresh"' not in page


async def test_paid_and_overdue_invoices_show_their_state(api, invoice_body):
    paid, h = await open_invoice(api, invoice_body)
    # Paid at 00:30 in Phnom Penh (UTC+7), still the day before in UTC: the receipt gives the local day.
    await sql(api, "UPDATE invoices SET status='paid', paid_at='2026-11-26T17:30:00Z', amount_paid=amount "
                   "WHERE id=$1", paid["id"])
    s = await (await api.client.get(f"/pay/{paid['id']}/state")).json()
    assert s["status"] == "paid" and s["khqr"] is None and s["paid_at"].startswith("2026-11-26T17:30:00")
    text = await (await api.client.get(f"/pay/{paid['id']}")).text()
    assert 'data-status="paid"' in text
    assert '<div id="paid-row" >' in text and '<dd id="paid-at" lang="en">27/11/2026 00:30</dd>' in text

    # Past its expiry but not yet swept by the background job: the page already says expired.
    late, _ = await open_invoice(api, invoice_body, h)
    await sql(api, "UPDATE invoices SET expires_at = now() - interval '1 second' WHERE id=$1", late["id"])
    await sql(api, "UPDATE khqr_codes SET created_at = now() - interval '5 minutes', expires_at = now() "
                   "- interval '1 second' WHERE invoice_id=$1", late["id"])
    s = await (await api.client.get(f"/pay/{late['id']}/state")).json()
    assert s["status"] == "expired" and s["khqr"] is None and s["paid_at"] is None
    assert '<div id="paid-row" hidden>' in await (await api.client.get(f"/pay/{late['id']}")).text()


async def test_page_itemises_the_fee_as_the_portal_did(api, invoice_body):
    """The citizen sees what the amount is made of; each line is escaped like every other value."""
    lines = [{"code": "PP-48", "description": "លិខិតឆ្លងដែន 48 pages", "amount": 40000},
             {"code": "EXP", "description": "Express <b>service</b> & delivery", "amount": 10000}]
    inv, h = await open_invoice(api, invoice_body, amount=50000, line_items=lines)
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["line_items"] == [{**lines[0], "amount_display": "40,000 ៛"}, {**lines[1], "amount_display": "10,000 ៛"}]
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    # each run of Khmer or not in its own language, for a screen reader's voice (found by a citizen's walk-through)
    assert ('<div class="line"><dt><span lang="km">លិខិតឆ្លងដែន</span><span lang="en"> 48 pages</span></dt>'
            '<dd lang="en">40,000 ៛</dd></div>') in page
    assert ('<div class="line"><dt><span lang="en">Express &lt;b&gt;service&lt;/b&gt; &amp; delivery</span></dt>'
            '<dd lang="en">10,000 ៛</dd></div>') in page
    assert "<b>service" not in page
    plain, _ = await open_invoice(api, invoice_body, h)  # not itemised: no lines
    assert (await (await api.client.get(f"/pay/{plain['id']}/state")).json())["line_items"] == []
    assert 'class="line"' not in await (await api.client.get(f"/pay/{plain['id']}")).text()


async def test_receipt_gives_the_reference_of_the_payment_that_paid_it(api, invoice_body, treasury):
    """A citizen who disputes a payment needs the reference their bank app shows, not only the bill number."""
    inv, h = await open_invoice(api, invoice_body, amount=1000)
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["paid_with"] is None and s["payment_reference"] is None
    assert '<div id="ref-row" class="stack" hidden>' in await (await api.client.get(f"/pay/{inv['id']}")).text()

    # Paid short: held for treasury, who applies it; the citizen pays the rest with the next code.
    assert (await (await pay(api.client, inv, amount=400, txid="SBX-SHORT-1")).json())["payments"][0]["exception"] \
        == "underpaid"
    [exc] = (await (await api.client.get("/v1/reconciliation/exceptions", params={"reason": "underpaid"},
                                         headers=treasury)).json())["data"]
    r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury, json={
        "action": "match_to_invoice", "invoice_id": inv["id"], "note": "the citizen will pay the rest"})
    assert r.status == 200, await r.text()
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert (s["status"], s["payment_reference"]) == ("open", None)
    code = (await (await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)).json())
    # The bank also reports the paying account: personal data, never on this public page.
    body = json.loads(sandbox_body({**inv, "khqr": code}, amount=600, txid="SBX-REST-2"))
    raw = json.dumps({**body, "from_account": "citizen-acct@aclb"}).encode()
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=raw, headers=sandbox_headers(raw))
    assert (await r.json())["payments"][0]["exception"] is None
    # Then the same code paid again: held as a duplicate, it is not what paid the invoice.
    assert (await (await pay(api.client, {**inv, "khqr": code}, amount=600, txid="SBX-AGAIN-3")).json()
            )["payments"][0]["exception"] == "duplicate_payment"

    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["status"] == "paid"
    assert (s["paid_with"], s["payment_reference"]) == ("Sandbox", "SBX-REST-2")
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert '<div id="ref-row" class="stack" >' in page
    assert '<span id="paid-with">Sandbox</span> <span id="payment-ref" class="ref">SBX-REST-2</span>' \
        in page
    for hidden in ("SBX-SHORT-1", "SBX-AGAIN-3", "citizen-acct"):
        assert hidden not in page and hidden not in json.dumps(s), hidden


async def test_receipt_names_no_payment_for_an_invoice_paid_without_one(api, invoice_body):
    inv, _ = await open_invoice(api, invoice_body)
    await sql(api, "UPDATE invoices SET status='paid', paid_at=now(), amount_paid=amount WHERE id=$1", inv["id"])
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["status"] == "paid" and s["paid_with"] is None and s["payment_reference"] is None
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert '<div id="paid-row" >' in page and '<div id="ref-row" class="stack" hidden>' in page


async def test_receipt_gives_no_reference_for_a_payment_captured_from_a_settlement_file(api, invoice_body,
                                                                                         treasury):
    """Found by review: a file's line id may be the bank statement's own reference, or the text a payer typed
    (camt.053's EndToEndId), not what the citizen's bank app shows: never on the public page."""
    from providers.sandbox import write_settlement_csv
    from tests.test_settlement import AT, issued_before, line, upload

    inv, _ = await open_invoice(api, invoice_body, amount=50000)
    inv = await issued_before(api.dsn, inv, AT)
    data = write_settlement_csv([line("SOK DARA 012345678", 50000, md5=inv["khqr"]["md5"], bill=inv["bill_number"])])
    r = await upload(api, treasury, data)
    assert r.status == 201, await r.text()
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert s["status"] == "paid" and s["paid_at"] is not None
    assert s["paid_with"] is None and s["payment_reference"] is None
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert "SOK DARA" not in page and '<div id="ref-row" class="stack" hidden>' in page


async def test_state_read_while_a_payment_commits_says_when_it_was_paid(api, invoice_body):
    """Found by review: a poll that reads the invoice open, then waits for the capture's lock to issue the next
    code, learns it is paid only from the refusal; it answered paid with no time, and the page stopped asking."""
    inv, _ = await open_invoice(api, invoice_body)
    await sql(api, "UPDATE khqr_codes SET created_at = now() - interval '10 minutes', expires_at = now() "
                   "- interval '1 second' WHERE invoice_id = $1", inv["id"])  # the poll must issue a new code
    conn = await asyncpg.connect(api.dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE invoices SET status='paid', paid_at='2026-11-27T02:31:00Z', amount_paid=amount "
                           "WHERE id=$1", inv["id"])  # a capture, holding the invoice until it commits
        poll = asyncio.ensure_future(api.client.get(f"/pay/{inv['id']}/state"))
        await asyncio.sleep(0.5)
        assert not poll.done()  # it read the invoice open and waits for the lock
        await tx.commit()
        s = await (await poll).json()
    finally:
        await conn.close()
    assert s["status"] == "paid" and s["paid_at"].startswith("2026-11-27T02:31:00"), s


async def test_openapi_documents_the_state(api):
    spec = await (await api.client.get("/openapi.json")).json()
    op = spec["paths"]["/pay/{id}/state"]["get"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert STATE_FIELDS <= set(schema["properties"])
    assert "text/html" in spec["paths"]["/pay/{id}"]["get"]["responses"]["200"]["content"]


# --- a real browser at a phone's size ----------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest_asyncio.fixture(scope="module")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture
async def phone(browser, api):
    """A fresh phone-sized page that records every request and console error."""
    ctx = await browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                    is_mobile=True, has_touch=True, locale="km-KH")
    page = await ctx.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda req: page.requests.append(req.url))
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    try:
        yield page
    finally:
        await ctx.close()


async def open_pay_page(api, phone, invoice_id: str):
    url = str(api.client.make_url(f"/pay/{invoice_id}?poll=1"))
    resp = await phone.goto(url)
    assert resp.status == 200
    await phone.evaluate("window.sameDocument = true")  # gone if the page reloads
    return url


async def countdown_seconds(phone) -> int:
    text = await phone.locator("#countdown").inner_text()
    assert re.fullmatch(r"\d\d:\d\d", text), text
    return int(text[:2]) * 60 + int(text[3:])


async def eventually(phone, js: str, timeout: float = 10) -> None:
    """Wait until the JS expression is true. (Playwright's wait_for_function evaluates strings with eval,
    which the page's Content-Security-Policy rightly refuses; evaluate() is not subject to it.)"""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await phone.evaluate(js):
        assert asyncio.get_running_loop().time() < deadline, f"not true within {timeout} s: {js}"
        await asyncio.sleep(0.1)


async def codes_on_screen(phone) -> list[str]:
    """The md5 of every QR code a phone camera would read off the screen."""
    import zxingcpp
    from PIL import Image

    shot = await phone.screenshot(full_page=True)
    return [khqr.md5(b.text) for b in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)))]


def assert_only_own_host(api, phone):
    own = str(api.client.make_url("/"))
    assert all(u.startswith((own, "blob:" + own, "data:")) for u in phone.requests), phone.requests
    assert phone.errors == []  # includes Content-Security-Policy refusals


@needs_chromium
async def test_citizen_sees_the_card_then_the_cancellation_without_reload(api, invoice_body, phone):
    inv, h = await open_invoice(api, invoice_body, amount=50000)
    await open_pay_page(api, phone, inv["id"])

    assert await phone.get_by_text("50,000 ៛").is_visible()
    assert await phone.get_by_text("MOI Fees Office").is_visible()
    assert await phone.get_by_text("ក្រសួងមហាផ្ទៃ").is_visible()
    qr = phone.locator("#qr")
    assert await qr.is_visible()
    await eventually(phone, "document.getElementById('qr').complete")
    assert await qr.evaluate("img => img.naturalWidth") > 0
    box = await qr.bounding_box()
    assert box["width"] >= 180 and box["height"] >= 180 and box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert (await qr.get_attribute("alt")).strip()

    first = await countdown_seconds(phone)
    assert 9 * 60 <= first <= 10 * 60
    await asyncio.sleep(2.2)
    assert await countdown_seconds(phone) < first
    await phone.screenshot(path=SCREENSHOT, full_page=True)
    assert await codes_on_screen(phone) == [inv["khqr"]["md5"]]  # the mark in the middle does not spoil it

    assert (await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)).status == 200
    await phone.locator("#card[data-status=cancelled]").wait_for(state="attached", timeout=10_000)
    assert await phone.get_by_text("This invoice was cancelled", exact=True).is_visible()
    assert not await qr.is_visible()
    await eventually(phone, "document.getElementById('live').textContent.includes('cancelled')")
    assert await phone.evaluate("window.sameDocument === true")
    await phone.screenshot(path="/tmp/pay_page_cancelled.png")
    assert_only_own_host(api, phone)


@needs_chromium
async def test_page_swaps_to_a_new_code_when_the_old_one_runs_out(api, invoice_body, phone):
    inv, _ = await open_invoice(api, invoice_body)
    await open_pay_page(api, phone, inv["id"])
    card = phone.locator("#card")
    assert await card.get_attribute("data-md5") == inv["khqr"]["md5"]

    await sql(api, "UPDATE khqr_codes SET expires_at = now() + interval '3 seconds', "
                   "created_at = now() - interval '1 minute' WHERE invoice_id = $1", inv["id"])
    await eventually(phone, f"document.getElementById('card').dataset.md5 !== {inv['khqr']['md5']!r}")
    new_md5 = await card.get_attribute("data-md5")
    conn = await asyncpg.connect(api.dsn)
    try:
        assert await conn.fetchval("SELECT current_khqr_md5 FROM invoices WHERE id=$1", inv["id"]) == new_md5
    finally:
        await conn.close()
    await eventually(phone, "document.getElementById('qr').src.startsWith('blob:')")
    assert await phone.locator("#qr").evaluate("img => img.complete && img.naturalWidth > 0")
    assert await countdown_seconds(phone) >= 9 * 60  # the countdown restarted for the new code
    assert await codes_on_screen(phone) == [new_md5]
    assert await phone.evaluate("window.sameDocument === true")
    assert_only_own_host(api, phone)


@needs_chromium
async def test_page_turns_to_paid_without_reload(api, invoice_body, phone):
    inv, _ = await open_invoice(api, invoice_body, line_items=[
        {"code": "PP", "description": "Passport, 48 pages, valid 10 years (ordinary service)", "amount": 40000},
        {"code": "EXP", "description": "Express", "amount": 10000}])
    await open_pay_page(api, phone, inv["id"])
    assert await phone.locator(".facts .line").count() == 2   # the fee's lines, read on a phone
    assert await phone.locator(".facts .line dd").nth(0).text_content() == "40,000 ៛"
    assert not await phone.locator("#paid-row").is_visible()
    assert not await phone.locator("#ref-row").is_visible()
    txid = "9f3c2a7be1d04c58a6f1e2d3c4b5a6978877665544332211ffeeddccbbaa0099"  # as long as a Bakong hash
    r = await pay(api.client, inv, txid=txid)
    assert (await r.json())["payments"][0]["exception"] is None
    await sql(api, "UPDATE invoices SET paid_at='2026-11-27T02:31:00Z' WHERE id=$1", inv["id"])  # a fixed time
    await phone.locator("#card[data-status=paid]").wait_for(state="attached", timeout=10_000)
    assert await phone.locator("#card").get_by_text("Paid", exact=True).is_visible()
    assert await phone.locator("#paid-row").is_visible()  # the receipt says when, in Phnom Penh's time
    assert await phone.locator("#paid-at").text_content() == "27/11/2026 09:31"
    assert await phone.locator("#ref-row").is_visible()   # and the payment's reference at its provider
    assert await phone.locator("#payment-ref").text_content() == txid
    assert await phone.locator("#paid-with").text_content() == "Sandbox"
    assert await phone.title() == "បានបង់ប្រាក់រួចរាល់ / Paid"     # the tab says so too
    assert await phone.locator("#card").get_by_text("បានបង់ប្រាក់រួចរាល់", exact=True).is_visible()
    # announced to a screen reader, each language's words marked as such
    await eventually(phone, "document.querySelector('#live [lang=en]') !== null")
    assert await phone.locator("#live [lang=km]").text_content() == "បានបង់ប្រាក់រួចរាល់"
    assert await phone.locator("#live [lang=en]").text_content() == " / Paid"
    assert not await phone.locator("#qr").is_visible()
    assert not await phone.locator("#countdown").is_visible()
    assert not await phone.locator("#pay-by-row").is_visible()  # no deadline on a receipt (found by review)
    assert await phone.evaluate("window.sameDocument === true")
    await phone.screenshot(path="/tmp/pay_page_paid.png")
    assert_only_own_host(api, phone)


@needs_chromium
async def test_page_back_online_asks_at_once_instead_of_waiting_out_its_back_off(api, invoice_body, phone):
    """Found by a citizen's walk-through: after the connection came back, the page waited out its back-off
    (up to a minute) before it showed anything new."""
    inv, _ = await open_invoice(api, invoice_body)
    await open_pay_page(api, phone, inv["id"])
    await phone.context.set_offline(True)
    await eventually(phone, "!document.getElementById('offline').hidden", timeout=15)
    await asyncio.sleep(16)            # four failed polls: the next one is about 16 s away (poll=1 doubles)
    await sql(api, "UPDATE invoices SET status='paid', paid_at=now(), amount_paid=amount WHERE id=$1", inv["id"])
    await phone.context.set_offline(False)
    await eventually(phone, "document.getElementById('card').dataset.status === 'paid'", timeout=4)
    assert await phone.evaluate("window.sameDocument === true")


async def test_a_payment_held_for_treasury_tells_the_citizen_not_to_pay_again(api, invoice_body):
    """Found by a citizen's walk-through: after paying short the page still asked for the whole amount and said
    nothing, so a citizen would pay it all again."""
    inv, h = await open_invoice(api, invoice_body, amount=12000)
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert re.search(r'<p id="held" class="held" hidden>', page)
    assert (await (await api.client.get(f"/pay/{inv['id']}/state")).json())["payment_held"] is False
    r = await pay(api.client, inv, amount=5000)
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert (s["status"], s["payment_held"], s["amount_due"]) == ("open", True, 12000)  # nothing applied yet
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert re.search(r'<p id="held" class="held" >', page) and "Do not pay again" in page
    # once treasury has resolved it, the notice goes, and the page asks for what is left
    treasury = {"Authorization": f"Bearer {await api.key(None, scopes=['treasury'])}"}
    [exc] = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury)).json())["data"]
    r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury,
                              json={"action": "match_to_invoice", "invoice_id": inv["id"], "note": "part"})
    assert r.status == 200, await r.text()
    s = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert (s["payment_held"], s["amount_due"], s["amount_display"]) == (False, 7000, "7,000 ៛")


async def test_an_open_page_offers_the_code_as_an_image_and_says_when_to_pay_by(api, invoice_body):
    """Found by a citizen's walk-through: on one phone a citizen cannot scan its own screen, and the page gave
    only the code's ten-minute countdown, never the invoice's deadline."""
    inv, h = await open_invoice(api, invoice_body, expires_in=3600)
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    save = re.search(r'<a id="save" href="([^"]+)" download="([^"]+)">', page)
    assert save and save.group(1) == f"/v1/invoices/{inv['id']}/qr.png?scale=8"
    assert save.group(2) == f"KHQR-{inv['bill_number']}.png"
    r = await api.client.get(save.group(1))
    assert r.status == 200 and r.content_type == "image/png"
    from datetime import datetime, timedelta
    due = datetime.fromisoformat(inv["expires_at"]) + timedelta(hours=7)  # Phnom Penh, no summer time
    assert re.search(r'<div id="pay-by-row" >.*?<dd lang="en">' + re.escape(due.strftime("%d/%m/%Y %H:%M")), page)
    await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)
    page = await (await api.client.get(f"/pay/{inv['id']}")).text()
    assert '<div id="pay-by-row" hidden>' in page and 'href="" download=""' in page


@needs_chromium
async def test_page_shows_a_held_payment_without_reload(api, invoice_body, phone):
    inv, _ = await open_invoice(api, invoice_body, amount=12000)
    await open_pay_page(api, phone, inv["id"])
    assert not await phone.locator("#held").is_visible()
    await pay(api.client, inv, amount=5000)
    await eventually(phone, "!document.getElementById('held').hidden", timeout=10)
    assert "Do not pay again" in await phone.locator("#held").inner_text()
    assert await phone.evaluate("window.sameDocument === true")


@needs_chromium
async def test_a_hanging_request_is_given_up_and_try_now_asks_at_once(api, invoice_body, phone):
    """Found by a citizen's walk-through: a request that hung stopped the page's polling for good, silently."""
    inv, _ = await open_invoice(api, invoice_body)
    await phone.goto(str(api.client.make_url(f"/pay/{inv['id']}?poll=10")))  # its next poll is 10 s or more away
    await phone.evaluate("window.sameDocument = true")
    hanging = []
    await phone.route("**/state", lambda route: hanging.append(route))  # never answered
    await eventually(phone, "!document.getElementById('offline').hidden", timeout=30)  # given up after 15 s
    assert len(hanging) == 1
    await phone.unroute("**/state")
    await sql(api, "UPDATE invoices SET status='cancelled', cancelled_at=now() WHERE id=$1", inv["id"])
    await phone.locator("#retry").click()
    await eventually(phone, "document.getElementById('card').dataset.status === 'cancelled'", timeout=3)
    assert await phone.evaluate("window.sameDocument === true")


@needs_chromium
async def test_a_response_whose_body_stalls_after_its_headers_is_given_up_too(api, invoice_body, phone):
    """Found by review: the page's timer stopped once the headers had come, so an answer whose body then stalled
    held the polling as a request that never answered had. The stalled answer comes from a server of the test's
    own, which sends a 200, its headers and the first bytes of a JSON body, then nothing."""
    from aiohttp import web

    asked, release = [], asyncio.Event()

    async def stall(request):
        asked.append(request.path)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 4096
        await resp.prepare(request)
        await resp.write(b'{"status": "op')
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", stall)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]
        inv, _ = await open_invoice(api, invoice_body)
        await phone.goto(str(api.client.make_url(f"/pay/{inv['id']}?poll=10")))  # its next poll is 10 s or more away
        await phone.evaluate("window.sameDocument = true")

        async def to_stall(route):
            await route.continue_(url=f"http://127.0.0.1:{port}/state")

        await phone.route("**/state", to_stall)
        await eventually(phone, "!document.getElementById('offline').hidden", timeout=30)  # given up after 15 s
        assert asked == ["/state"]
        await phone.unroute("**/state")
        await sql(api, "UPDATE invoices SET status='cancelled', cancelled_at=now() WHERE id=$1", inv["id"])
        await phone.locator("#retry").click()
        await eventually(phone, "document.getElementById('card').dataset.status === 'cancelled'", timeout=3)
        assert await phone.evaluate("window.sameDocument === true")
    finally:
        release.set()
        await runner.cleanup()


@needs_chromium
async def test_the_code_shows_as_loading_until_its_image_has_come_and_a_failed_one_is_fetched_again(
        api, invoice_body, phone):
    """Found by review: the first poll took the loading overlay off an image still on its way, and an image that
    failed to load stayed broken for the code's ten minutes."""
    inv, h = await open_invoice(api, invoice_body)
    seen = []

    async def slow_first(route):
        seen.append(route.request.resource_type)
        if len(seen) == 1:  # the page's first image
            await asyncio.sleep(3)
        await route.continue_()

    await phone.route("**/qr.svg", slow_first)
    await phone.goto(str(api.client.make_url(f"/pay/{inv['id']}?poll=1")), wait_until="domcontentloaded")
    await asyncio.sleep(1.5)  # a poll (every second here) has answered meanwhile, same code
    assert await phone.evaluate("!document.getElementById('qr').complete")
    assert await phone.evaluate("document.getElementById('qrbox').classList.contains('busy')")
    await eventually(phone, "document.getElementById('qr').naturalWidth > 0", timeout=6)
    await eventually(phone, "!document.getElementById('qrbox').classList.contains('busy')", timeout=3)
    await phone.unroute("**/qr.svg")

    failed = await open_invoice(api, invoice_body, h)
    await phone.route("**/qr.svg", lambda route: route.abort() if route.request.resource_type == "image"
                      else route.continue_())  # the <img> fails; the page's own fetch goes through
    await open_pay_page(api, phone, failed[0]["id"])
    await eventually(phone, "document.getElementById('qr').naturalWidth > 0", timeout=6)  # fetched again
    assert await phone.evaluate("document.getElementById('qr').src.startsWith('blob:')")
    await eventually(phone, "!document.getElementById('qrbox').classList.contains('busy')", timeout=3)


@needs_chromium
async def test_page_reads_at_200_percent_zoom_on_a_small_phone(api, invoice_body, browser):
    """Found by a citizen's walk-through: at 180 CSS pixels (a 360 px phone zoomed to 200%) the page scrolled
    sideways and the bill number broke one character a line."""
    inv, _ = await open_invoice(api, invoice_body, amount=9_999_999_999_999, description="ការបង់ថ្លៃលិខិតឆ្លងដែន Passport fee")
    ctx = await browser.new_context(viewport={"width": 180, "height": 640}, is_mobile=True, has_touch=True)
    try:
        page = await ctx.new_page()
        await page.goto(str(api.client.make_url(f"/pay/{inv['id']}")))
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        bill = page.locator(".facts dd.bill")
        assert (await bill.bounding_box())["height"] < 40  # one line
    finally:
        await ctx.close()


@needs_chromium
async def test_the_citizen_chooses_khmer_english_or_both_and_the_phone_remembers(api, invoice_body, phone):
    """Found by a citizen's walk-through: pressing the chosen language again brought both back, and no button
    said so."""
    inv, _ = await open_invoice(api, invoice_body)
    await open_pay_page(api, phone, inv["id"])
    hint_km, hint_en = phone.locator(".hint .t[lang=km]"), phone.locator(".hint .t[lang=en]")
    both = phone.locator(".lang[data-lang='']")
    assert await both.get_attribute("aria-pressed") == "true" and await hint_km.is_visible() and await hint_en.is_visible()
    await phone.locator(".lang[data-lang=en]").click()
    assert not await hint_km.is_visible() and await hint_en.is_visible()
    assert await phone.evaluate("document.documentElement.lang") == "en"
    await phone.locator(".lang[data-lang=en]").click()  # pressed again: stays English
    assert not await hint_km.is_visible()
    await phone.reload()
    assert not await hint_km.is_visible() and await hint_en.is_visible()  # remembered on this phone
    assert await phone.locator(".lang[data-lang=en]").get_attribute("aria-pressed") == "true"
    await both.click()
    assert await hint_km.is_visible() and await hint_en.is_visible()
    assert await both.get_attribute("aria-pressed") == "true"
    assert await phone.evaluate("document.documentElement.lang") == "km"
