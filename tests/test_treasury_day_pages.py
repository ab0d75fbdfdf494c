"""Treasury pages, the gaps a treasury review found: a day without a file, a header-only file, a day with two
files, and a day with many open exceptions. HTTP + HTML only (no browser)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html import unescape

import asyncpg

from paysvc import treasury_pages
from paysvc.api_settlements import rules_of
from paysvc.db import connect
from paysvc.settlement_days import business_date, parse_cutoff
from paysvc.settlement_import import raise_overdue
from paysvc.web import SETTINGS
from providers.sandbox import write_settlement_csv
from tests.test_settlement import DAY, line, paid, upload
from tests.test_treasury_pages import login, origin, treasury_key  # noqa: F401 (fixture)


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
