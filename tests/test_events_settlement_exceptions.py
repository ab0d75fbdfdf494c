"""Exceptions a settlement import or a recheck opens are events to their agency, like those capture opens:
one reconciliation.exception_opened per exception with an agency, in the same transaction, same data."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from paysvc.db import connect
from providers.sandbox import write_settlement_csv
from tests.conftest import TEST_PII_KEYS
from tests.test_settlement import DAY, AT, issued_before, line, paid, upload
from tests.payments_helpers import new_invoice

DATA_KEYS = {"exception_id", "reason", "payment_id", "invoice_id", "currency", "amount"}


async def feed(api, headers) -> list[dict]:
    r = await api.client.get("/v1/events", params={"after": 0, "limit": 1000}, headers=headers)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


def opened(events: list[dict]) -> dict[str, dict]:
    """The exception_opened events by reason (each reason at most once in these tests)."""
    out: dict[str, dict] = {}
    for e in events:
        if e["type"] == "reconciliation.exception_opened":
            assert e["data"]["reason"] not in out, e
            out[e["data"]["reason"]] = e
    return out


async def exceptions(dsn: str) -> dict[str, dict]:
    async with connect(dsn) as conn:
        rows = await conn.fetch("SELECT e.*, a.code AS agency FROM reconciliation_exceptions e "
                                "LEFT JOIN agencies a ON a.id = e.agency_id")
    return {r["id"]: dict(r) for r in rows}


async def assert_one_event_per_exception_with_an_agency(dsn: str) -> None:
    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT e.id, e.agency_id, count(o.id) AS events, min(o.agency_id) AS event_agency "
            "  FROM reconciliation_exceptions e "
            "  LEFT JOIN outbox_events o ON o.type = 'reconciliation.exception_opened' "
            "                           AND o.data->>'exception_id' = e.id "
            " GROUP BY e.id, e.agency_id")
    for r in rows:
        assert r["events"] == (1 if r["agency_id"] is not None else 0), dict(r)
        if r["agency_id"] is not None:
            assert r["event_agency"] == r["agency_id"], dict(r)


async def test_an_import_opens_its_exceptions_as_events_in_the_agencys_feed(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    inv3 = await paid(api, portal, invoice_body, "TX-3")             # the provider settles 1,000 less
    await paid(api, portal, invoice_body, "TX-4")                    # never settled: overdue at import
    inv6 = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body), AT)  # callback never came
    before = opened(await feed(api, portal))
    assert before == {}

    data = write_settlement_csv([
        line("TX-1", 50000),
        line("TX-3", 49000),
        line("TX-1", 50000),                                          # listed twice
        line("TX-6", 50000, md5=inv6["khqr"]["md5"], bill=inv6["bill_number"]),
        line("TX-7", 7000),                                           # nobody issued this: no agency
    ])
    r = await upload(api, treasury, data)
    assert r.status == 201, await r.text()

    events = await feed(api, portal)
    got = opened(events)
    # missing_in_ledger (TX-6) is opened by capture, the other three by the import itself.
    assert set(got) == {"amount_mismatch", "duplicate_in_settlement", "missing_in_settlement", "missing_in_ledger"}
    excs = await exceptions(api.dsn)
    for reason, e in got.items():
        assert set(e["data"]) == DATA_KEYS, e                       # the shape capture writes
        assert e["agency"] == "MOI" and isinstance(e["seq"], int)
        x = excs[e["data"]["exception_id"]]
        assert x["reason"] == reason and x["agency"] == "MOI"
        assert e["data"] == {"exception_id": x["id"], "reason": x["reason"], "payment_id": x["payment_id"],
                             "invoice_id": x["invoice_id"], "currency": x["currency"], "amount": x["amount"]}
    assert got["amount_mismatch"]["data"]["amount"] == 1000
    assert got["amount_mismatch"]["data"]["invoice_id"] == inv3["id"]
    # Written in the import's transaction: before its settlement.reconciled event, numbered without gaps.
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    last_opened = max(i for i, t in enumerate(types) if t == "reconciliation.exception_opened")
    assert types.index("settlement.reconciled") > last_opened
    await assert_one_event_per_exception_with_an_agency(api.dsn)

    # The same file again changes nothing, so it writes no event either.
    r = await upload(api, treasury, data)
    assert r.status in (200, 201), await r.text()
    assert len(await feed(api, portal)) == len(events)


async def test_a_recheck_opens_missing_in_settlement_as_an_event(api, portal, invoice_body):
    inv = await paid(api, portal, invoice_body, "TX-1")              # 2 June, never settled
    env = {**os.environ, "PAYSVC_DATABASE_URL": api.dsn, "PAYSVC_PII_KEYS": TEST_PII_KEYS,
           "PAYSVC_LOG_LEVEL": "WARNING"}

    async def recheck(today) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "paysvc", "settlements", "recheck", "--provider", "sandbox",
            "--today", today.isoformat(), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, (out, err)

    await recheck(DAY + timedelta(days=2))                           # still in its grace
    assert opened(await feed(api, portal)) == {}
    await recheck(DAY + timedelta(days=3))                           # overdue: raised
    got = opened(await feed(api, portal))
    assert set(got) == {"missing_in_settlement"}
    e = got["missing_in_settlement"]
    [x] = (await exceptions(api.dsn)).values()
    assert e["data"] == {"exception_id": x["id"], "reason": "missing_in_settlement", "payment_id": x["payment_id"],
                         "invoice_id": inv["id"], "currency": "KHR", "amount": 50000}
    await recheck(DAY + timedelta(days=9))                           # raised once: no second event
    assert len([ev for ev in await feed(api, portal) if ev["type"] == "reconciliation.exception_opened"]) == 1
    await assert_one_event_per_exception_with_an_agency(api.dsn)


async def test_an_exception_without_an_agency_writes_no_event(api, portal, treasury, invoice_body):
    # A line nobody issued, listed twice: its duplicate_in_settlement exception has no payment, no agency.
    r = await upload(api, treasury, write_settlement_csv([line("TX-9", 7000), line("TX-9", 7000)]))
    assert r.status == 201, await r.text()
    excs = await exceptions(api.dsn)
    assert any(x["reason"] == "duplicate_in_settlement" and x["agency_id"] is None for x in excs.values()), excs
    await assert_one_event_per_exception_with_an_agency(api.dsn)
    assert opened(await feed(api, portal)) == {}
