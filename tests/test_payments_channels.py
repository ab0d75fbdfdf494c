"""Bakong polling and ABA PayWay push-then-confirm, end to end against local fakes of their APIs."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from paysvc import inbox
from paysvc.poller import PollPolicy, poll_once
from paysvc.web import POOL, PROVIDERS
from providers import RateLimited
from tests.conftest import running_api
from tests.fakes.aba import FakePayWay
from tests.fakes.bakong import FakeBakong
from tests.payments_helpers import pay

NOW_POLICY = PollPolicy(min_interval=timedelta(0))


@pytest.fixture
async def bakong(db_dsn):
    async with FakeBakong(token="bk-token") as fake:
        async with running_api(db_dsn, providers="sandbox,bakong", bakong_token="bk-token",
                               bakong_base_url=fake.base_url) as api:
            yield api, fake


async def count(dsn: str, sql: str):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_bakong_poll_captures_a_paid_code(bakong, invoice_body):
    api, fake = bakong
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    other = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    fake.add_payment(inv["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq", tx_hash="a" * 64)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    asked, captured = await poll_once(pool, provider, NOW_POLICY)
    assert (asked, captured) == (2, 1)
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["status"] == "paid" and got["payments"][0]["provider"] == "bakong"
    assert (await (await api.client.get(f"/v1/invoices/{other['id']}", headers=h)).json())["status"] == "open"
    # The paid code is not asked about again; the open one is.
    fake.requests.clear()
    await poll_once(pool, provider, NOW_POLICY)
    asked_now = [md5 for r in fake.requests for md5 in json.loads(r.body)]
    assert asked_now == [other["khqr"]["md5"]]


@pytest.mark.parametrize("first", ["callback", "poll"])
async def test_callback_and_poll_for_the_same_payment_make_one_payment(bakong, invoice_body, first):
    api, fake = bakong
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    fake.add_payment(inv["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq")
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    if first == "callback":
        assert (await pay(api.client, inv)).status == 200
        # The poller skips a code that is already paid; make it ask anyway, as a race would.
        await provider.poll([])  # no-op call keeps the session warm
        from providers import PendingKhqr
        result = await provider.poll([PendingKhqr(md5=inv["khqr"]["md5"], currency="KHR", amount=50000,
                                                  to_account="moi@nbcq", expires_at=inv["khqr"]["expires_at"])])
        await inbox.capture_notices(pool, result.notices, source="poll")
    else:
        await poll_once(pool, provider, NOW_POLICY)
        assert (await pay(api.client, inv)).status == 200
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 1
    assert await count(api.dsn, "SELECT count(*) FROM ledger_entries") == 1
    assert await count(api.dsn, "SELECT count(*) FROM reconciliation_exceptions") == 0


async def test_bakong_rate_limit_is_raised_and_codes_are_asked_again_later(bakong, invoice_body):
    api, fake = bakong
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    fake.fail_next(429, b'{"responseCode":1}', headers={"Retry-After": "7"})
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    with pytest.raises(RateLimited) as err:
        await poll_once(pool, provider, NOW_POLICY)
    assert err.value.retry_after == 7
    fake.add_payment(inv["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq")
    assert await poll_once(pool, provider, NOW_POLICY) == (1, 1)


async def test_two_pollers_never_ask_about_the_same_code_at_once(bakong, invoice_body):
    api, fake = bakong
    h = await api.portal("MOI")
    for _ in range(120):
        await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    policy = PollPolicy(min_interval=timedelta(minutes=5), batch=60)
    results = await asyncio.gather(poll_once(pool, provider, policy), poll_once(pool, provider, policy))
    assert sorted(a for a, _ in results) == [60, 60]
    asked = [md5 for r in fake.requests for md5 in json.loads(r.body)]
    assert len(asked) == len(set(asked)) == 120
    assert max(fake.batch_sizes()) <= 50


@pytest.fixture
async def payway(db_dsn):
    async with FakePayWay(merchant_id="ec-moi", api_key="aba-key") as fake:
        async with running_api(db_dsn, providers="aba_payway", aba_merchant_id="ec-moi", aba_api_key="aba-key",
                               aba_base_url=fake.url) as api:
            yield api, fake


async def aba_callback(api, tran_id: str):
    body = json.dumps({"tran_id": tran_id, "apv": "619195", "status": "00", "return_params": ""}).encode()
    return await api.client.post("/v1/providers/aba_payway/callbacks", data=body,
                                 headers={"Content-Type": "application/json"})


async def test_payway_hint_is_confirmed_before_capture(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="12.50", currency="USD")
    r = await aba_callback(api, inv["bill_number"])
    assert r.status == 200, await r.text()
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["status"] == "paid" and got["payments"][0]["amount"] == 1250


async def test_payway_declined_is_kept_but_captures_nothing(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="DECLINED", amount="12.50", currency="USD")
    r = await aba_callback(api, inv["bill_number"])
    assert r.status == 200 and (await r.json())["status"] == "not_confirmed"
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 0
    assert await count(api.dsn, "SELECT state FROM provider_inbox") == "rejected"


async def test_payway_outage_or_pending_is_retried_by_the_worker(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="PENDING", amount="12.50", currency="USD")
    r = await aba_callback(api, inv["bill_number"])
    assert r.status == 202  # stored; not yet approved
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="12.50", currency="USD")
    conn = await asyncpg.connect(api.dsn)
    await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second'")  # as if the backoff had passed
    fake.fail_next(500, b"oops")
    await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])
    assert await conn.fetchval("SELECT state FROM provider_inbox") == "received"  # 500: deferred again
    await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second'")
    await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])
    assert await conn.fetchval("SELECT state FROM provider_inbox") == "processed"
    await conn.close()
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["status"] == "paid"


async def test_a_capture_marks_its_code_and_the_poll_claim_reads_only_unpaid_codes(bakong, invoice_body):
    """Nearly every code is paid within minutes, but stays in the poll window (validity plus grace) for long
    after. The claim must not read those: what a poll reads follows what is left to poll, not the payment
    rate. Counted in PostgreSQL's table statistics (rows read by scans and fetched through indexes)."""
    from paysvc.queries import Q

    api, fake = bakong
    h = await api.portal("MOI")
    n_paid = 150
    for _ in range(n_paid):
        inv = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
        assert (await pay(api.client, inv)).status == 200
    unpaid = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE captured_at IS NOT NULL") == n_paid
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes k JOIN payments p ON p.khqr_md5 = k.md5 "
                                "WHERE k.captured_at = p.captured_at") == n_paid

    async def rows_read(conn) -> int:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return await conn.fetchval("SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
                                   "FROM pg_stat_user_tables WHERE relname = 'khqr_codes'")

    conn = await asyncpg.connect(api.dsn)
    try:
        before = await rows_read(conn)
        now = datetime.now(UTC)
        claimed = await conn.fetch(Q.poll_claim, now, now - timedelta(minutes=30), now, 50, now + timedelta(minutes=1))
        await conn.execute("SELECT pg_stat_force_next_flush()")  # its counters reach the view when it idles
        after = await rows_read(conn)
    finally:
        await conn.close()
    assert [r["md5"] for r in claimed] == [unpaid["khqr"]["md5"]]
    assert after - before < 20, f"the claim read {after - before} codes for 1 unpaid and {n_paid} paid"


# --- one bad item, a failing later call, two slow pollers -------------------------------------------


async def test_an_unreadable_item_is_skipped_and_logged_while_the_good_ones_are_captured(bakong, invoice_body,
                                                                                          caplog):
    """Two paid codes in one answer: A as Bakong documents it, D with 50000.5 KHR (riel have no decimals).
    A is captured at once; D is skipped, logged at ERROR on every pass with its md5 and why, and counted;
    the poller keeps its pace (an item is not an outage: no backoff)."""
    import logging

    import prometheus_client

    from paysvc.poller import Poller

    api, fake = bakong
    h = await api.portal("MOI")
    a = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    d = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    md5_a, md5_d = a["khqr"]["md5"], d["khqr"]["md5"]
    fake.add_payment(md5_d, amount="50000.5", currency="KHR", to_account="moi@nbcq", tx_hash="d" * 64)
    fake.add_payment(md5_a, amount="50000", currency="KHR", to_account="moi@nbcq", tx_hash="a" * 64)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    labels = {"provider": "bakong", "paid": "yes"}
    counted_before = prometheus_client.REGISTRY.get_sample_value("paysvc_poll_unreadable_items_total", labels) or 0
    caplog.set_level(logging.INFO)
    poller = Poller(pool, provider, NOW_POLICY, interval=0.05)
    task = asyncio.create_task(poller.run())
    try:
        async def asked_about_d() -> int:
            return sum(md5_d in json.loads(r.body) for r in fake.requests)
        for _ in range(200):
            if await asked_about_d() >= 3:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    passes = sum(md5_d in json.loads(r.body) for r in fake.requests)
    assert passes >= 3, "polling stopped or slowed down after the bad item"
    got_a = await (await api.client.get(f"/v1/invoices/{a['id']}", headers=h)).json()
    assert got_a["status"] == "paid" and got_a["payments"][0]["provider"] == "bakong"
    assert (await (await api.client.get(f"/v1/invoices/{d['id']}", headers=h)).json())["status"] == "open"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and md5_d in r.getMessage()]
    assert len(errors) >= passes - 1  # every pass that finished says it again
    assert "decimal places" in errors[0].getMessage() and "paid" in errors[0].getMessage()
    assert not [r for r in caplog.records if "unavailable" in r.getMessage() or "poll failed" in r.getMessage()]
    assert poller._failures == 0
    counted = prometheus_client.REGISTRY.get_sample_value("paysvc_poll_unreadable_items_total", labels)
    assert counted is not None and counted - counted_before >= len(errors)
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 1
