"""Treasury pages: a treasury key exchanged for a session cookie, CSRF-safe forms, and the whole flow in a
real (headless) Chromium: log in, see the day grid, open a day, resolve an exception, download the CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import ledger

from paysvc.db import connect as connect_db
from paysvc.settlement_days import business_date, parse_cutoff
from providers.sandbox import write_settlement_csv
from tests.conftest import running_api
from tests.test_ledger_db import seal_everything
from tests.test_pay_page import CHROMIUM, needs_chromium
from tests.test_settlement import AT, DAY, line, paid, upload

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def treasury_key(api):
    return await api.key(None, scopes=["treasury"], name="Treasury desk")


def origin(api) -> str:
    return str(api.client.make_url("")).rstrip("/")


async def login(api, key: str):
    return await api.client.post("/treasury/login", data={"key": key}, headers={"Origin": origin(api)},
                                 allow_redirects=False)


async def a_day_with_one_exception(api, portal, treasury_key, invoice_body, day=DAY, at=AT) -> str:
    await paid(api, portal, invoice_body, "TX-1", at=at)
    await paid(api, portal, invoice_body, "TX-2", at=at)
    r = await upload(api, {"Authorization": f"Bearer {treasury_key}"}, day=day, data=write_settlement_csv(
        [line("TX-1", 50000, fee=100, at=at), line("TX-2", 49000, fee=100, at=at)]))
    assert r.status == 201
    return (await r.json())["id"]


async def test_login_sets_a_strict_http_only_session_cookie(api, treasury_key):
    r = await login(api, treasury_key)
    assert r.status == 303 and r.headers["Location"] == "/treasury"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/treasury" in cookie
    assert "Secure" not in cookie                              # PAYSVC_PUBLIC_URL is http here
    conn = await asyncpg.connect(api.dsn)
    row = await conn.fetchrow("SELECT key_name, expires_at > now() AS live FROM treasury_sessions")
    await conn.close()
    assert row["key_name"] == "Treasury desk" and row["live"]
    assert treasury_key.split("_", 2)[2] not in cookie  # the key is never the cookie


async def test_the_cookie_is_secure_behind_https(db_dsn):
    async with running_api(db_dsn, public_url="https://paysvc.example") as api:
        key = await api.key(None, scopes=["treasury"], name="Treasury desk")
        r = await api.client.post("/treasury/login", data={"key": key}, allow_redirects=False,
                                  headers={"Origin": "https://paysvc.example"})
        assert r.status == 303 and "Secure" in r.headers["Set-Cookie"]


async def test_only_treasury_keys_log_in(api, portal, treasury_key):
    r = await login(api, portal["Authorization"].split()[1])
    assert r.status == 401 and "paysvc_treasury" not in r.headers.get("Set-Cookie", "")
    r = await api.client.get("/treasury", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/treasury/login"


async def test_the_day_grid_shows_the_ledger_chain_head_to_record(api, portal, treasury_key, invoice_body):
    r = await login(api, treasury_key)
    cookie = {"Cookie": r.headers["Set-Cookie"].split(";", 1)[0]}
    page = await (await api.client.get("/treasury", headers=cookie)).text()
    assert "No journal entry is sealed yet" in page
    await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-2")
    async with connect_db(api.dsn) as conn:
        await seal_everything(conn)  # the sealer waits for older transactions of the whole server
        head = await ledger.chain_head(conn)
        assert head is not None and head.position == 2
    page = await (await api.client.get("/treasury", headers=cookie)).text()
    assert f'<p id="chain-head"><code>{head.anchor}</code>' in page and "As stored, not verified here" in page


async def test_a_form_giving_a_field_twice_is_refused(api, treasury_key):
    # Found by a fuzz audit: key=<valid>&key=bad logged in with the first.
    r = await api.client.post("/treasury/login", data=f"key={treasury_key}&key=bad",
                              headers={"Origin": origin(api), "Content-Type": "application/x-www-form-urlencoded"},
                              allow_redirects=False)
    assert r.status == 400 and "paysvc_treasury" not in r.headers.get("Set-Cookie", "")


async def test_login_from_another_origin_is_refused(api, treasury_key):
    r = await api.client.post("/treasury/login", data={"key": treasury_key}, allow_redirects=False,
                              headers={"Origin": "https://evil.example"})
    assert r.status == 403


async def test_forms_need_the_session_token_and_our_origin(api, portal, treasury_key, invoice_body):
    await a_day_with_one_exception(api, portal, treasury_key, invoice_body)
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    exc_id = page.split('id="exc-')[1].split('"')[0]
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    form = {"action": "write_off", "note": "short-paid by the provider", "back": f"/treasury/days/{DAY}/sandbox"}
    url = f"/treasury/exceptions/{exc_id}/resolve"
    r = await api.client.post(url, data=form, headers={"Origin": origin(api)}, allow_redirects=False)
    assert r.status == 403                                      # no token
    r = await api.client.post(url, data={**form, "csrf": "x" * 43}, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 403                                      # wrong token
    r = await api.client.post(url, data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"},
                              allow_redirects=False)
    assert r.status == 403                                      # right token, wrong origin
    r = await api.client.post(url, data={**form, "csrf": csrf}, allow_redirects=False)
    assert r.status == 403                                      # no Origin at all
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT state FROM reconciliation_exceptions WHERE id = $1", exc_id) == "open"
    r = await api.client.post(url, data={**form, "csrf": csrf}, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 303
    row = await conn.fetchrow("SELECT state, resolved_by, resolution FROM reconciliation_exceptions WHERE id = $1",
                              exc_id)
    await conn.close()
    assert tuple(row) == ("resolved", f"Treasury desk (key {treasury_key.split('_')[1]})", "write_off")


async def test_a_back_link_with_control_characters_sends_back_to_the_treasury_home(api, portal, treasury_key,
                                                                                   invoice_body):
    """The resolution is written, then the redirect goes to a page of ours: a ``back`` holding CR/LF would
    otherwise break the answer after the work was done (found by fuzzing)."""
    await a_day_with_one_exception(api, portal, treasury_key, invoice_body)
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    exc_id = page.split('id="exc-')[1].split('"')[0]
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    form = {"action": "write_off", "note": "short-paid by the provider", "csrf": csrf,
            "back": "/treasury/x\r\nX-Injected: 1"}
    r = await api.client.post(f"/treasury/exceptions/{exc_id}/resolve", data=form, headers={"Origin": origin(api)},
                              allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/treasury?msg=")
    assert "X-Injected" not in r.headers


async def test_a_form_that_cannot_be_read_is_400(api, treasury_key):
    assert (await login(api, treasury_key)).status == 303
    for content_type, data in [("multipart/form-data", b"--x\r\n"),
                               ("application/x-www-form-urlencoded; charset=nonexistent", b"key=abc"),
                               ("application/x-www-form-urlencoded; charset=rot13", b"key=abc")]:
        r = await api.client.post("/treasury/login", data=data, allow_redirects=False,
                                  headers={"Origin": origin(api), "Content-Type": content_type})
        assert r.status == 400 and "could not be read" in await r.text(), content_type


async def test_pages_carry_a_strict_content_security_policy(api, treasury_key):
    r = await api.client.get("/treasury/login")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and "script-src" not in csp
    assert "<script" not in await r.text()


@needs_chromium
async def test_treasury_staff_reconcile_a_day_in_the_browser(api, portal, treasury_key, invoice_body, tmp_path):
    from playwright.async_api import async_playwright

    now = datetime.now(UTC)
    today = business_date(now, parse_cutoff("23:59:59.999"))             # the grid shows the last 14 days
    settlement_id = await a_day_with_one_exception(api, portal, treasury_key, invoice_body, day=today, at=now)
    base = origin(api)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(accept_downloads=True)
            await page.goto(f"{base}/treasury")
            assert page.url.endswith("/treasury/login")
            await page.fill("#key", treasury_key)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{base}/treasury")
            assert await page.locator("#grid tbody tr").count() == 14
            cell = page.locator(f'td[data-day="{today}"][data-provider="sandbox"]')
            assert "exceptions open" in await cell.inner_text()
            yesterday = page.locator(f'td[data-day="{today - timedelta(days=1)}"][data-provider="sandbox"]')
            assert "not received" in await yesterday.inner_text()
            await cell.locator("a").click()
            await page.wait_for_selector("#exceptions")
            assert await page.locator("#exceptions tbody tr").count() == 1
            assert "amount_mismatch" in await page.locator("#exceptions").inner_text()
            await page.select_option("select[name=action]", "write_off")
            await page.fill("textarea[name=note]", "NBC statement shows 49,000: short-paid")
            await page.click("#exceptions button[type=submit]")
            await page.wait_for_selector("#flash")
            assert await page.locator("#no-exceptions").count() == 1
            assert await page.locator("#clean").count() == 1
            async with page.expect_download() as info:
                await page.click(f"#csv-{settlement_id}")
            download = await info.value
            path = tmp_path / "report.csv"
            await download.save_as(path)
            # A citizen calls about a bill: found from the grid's form
            async with connect_db(api.dsn) as conn:
                bill = await conn.fetchval("SELECT bill_number FROM invoices ORDER BY number LIMIT 1")
            await page.goto(f"{base}/treasury")
            await page.fill("form.find input[name=q]", bill)
            await page.click("form.find button[type=submit]")
            await page.wait_for_selector("#invoice")
            assert bill in await page.locator("h1").inner_text()
            assert "paid" in await page.locator("#invoice").inner_text()
            assert await page.locator("#payments tbody tr").count() == 1
        finally:
            await browser.close()
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["category"] for r in rows] == ["matched", "amount_mismatch"]
    assert rows[1]["exception_state"] == "resolved"
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT resolved_by FROM reconciliation_exceptions") == \
        f"Treasury desk (key {treasury_key.split('_')[1]})"
    await conn.close()


async def test_a_refused_form_names_the_field_and_a_filled_in_invoice_is_not_in_the_way(api, portal, treasury_key,
                                                                                      invoice_body):
    """The form fills in the exception's invoice for match_to_invoice; another action leaves it aside. A form
    refused names what to fix (found by a walk-through: an empty note said only "Field required")."""
    await a_day_with_one_exception(api, portal, treasury_key, invoice_body)
    assert (await login(api, treasury_key)).status == 303
    page = await (await api.client.get(f"/treasury/days/{DAY}/sandbox")).text()
    exc_id = page.split('id="exc-')[1].split('"')[0]
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    url = f"/treasury/exceptions/{exc_id}/resolve"
    form = {"action": "write_off", "csrf": csrf, "back": f"/treasury/days/{DAY}/sandbox", "invoice_id": "inv_x"}
    r = await api.client.post(url, data=form, headers={"Origin": origin(api)}, allow_redirects=False)
    text = await r.text()
    assert r.status == 422 and "note: Field required" in text, text
    r = await api.client.post(url, data={**form, "action": "match_to_invoice", "invoice_id": "",
                                         "note": "the citizen's"}, headers={"Origin": origin(api)},
                              allow_redirects=False)
    text = await r.text()
    assert r.status == 422 and "invoice_id: match_to_invoice needs invoice_id" in text and "Value error" not in text
    r = await api.client.post(url, data={**form, "note": "short-paid by the provider"},
                              headers={"Origin": origin(api)}, allow_redirects=False)
    assert r.status == 303, await r.text()
    conn = await asyncpg.connect(api.dsn)
    try:
        assert await conn.fetchval("SELECT resolution FROM reconciliation_exceptions WHERE id = $1",
                                   exc_id) == "write_off"
    finally:
        await conn.close()
