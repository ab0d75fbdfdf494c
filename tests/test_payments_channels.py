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
from providers import ProviderAuthError, ProviderUnavailable, RateLimited, TokenRefused
from tests.conftest import running_api
from tests.fakes.aba import FakePayWay
from tests.fakes.bakong import FakeBakong, dumps, envelope
from tests.payments_helpers import pay
from tests.pg_stats import table_counter

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


async def answered_alike(r) -> None:
    """An unsigned callback that is not malformed gets one answer whatever becomes of it: its sender learns
    nothing of ours (whether its bill number is an open invoice's, the invoice's id, the inbox's row count)."""
    assert (r.status, r.content_type, await r.json()) == (200, "application/json", {"status": "received"})


async def test_payway_hint_is_confirmed_before_capture(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="12.50", currency="USD")
    r = await aba_callback(api, inv["bill_number"])
    await answered_alike(r)
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["status"] == "paid" and got["payments"][0]["amount"] == 1250


async def test_payway_callback_that_cannot_be_a_notice_is_refused_and_kept_not_retried(payway):
    api, _ = payway
    body = b'{"tran_id":"T1a2b3c","status":0,"apv":"\\u0000"}'
    r = await api.client.post("/v1/providers/aba_payway/callbacks", data=body,
                              headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.content_type == "application/problem+json", await r.text()
    assert "NUL" in (await r.json())["detail"]
    assert "inbox_id" not in await r.json()  # an unsigned callback's sender learns nothing of the inbox
    assert await count(api.dsn, "SELECT state FROM provider_inbox") == "rejected"
    conn = await asyncpg.connect(api.dsn)
    try:  # nothing left for the worker to retry, even once its lease has run out
        await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second'")
    finally:
        await conn.close()
    assert await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS]) is None


async def test_payway_declined_is_kept_but_captures_nothing(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="DECLINED", amount="12.50", currency="USD")
    await answered_alike(await aba_callback(api, inv["bill_number"]))
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 0
    assert await count(api.dsn, "SELECT state FROM provider_inbox") == "rejected"


async def test_payway_not_knowing_a_transaction_of_ours_yet_is_asked_again_a_few_times(payway, invoice_body):
    """Found by review: PayWay's NOT_FOUND (status code 6) made the callback final at once, so if its status API
    lagged its own callback by a moment, an approved payment's only callback was dropped (the money then came
    only with the settlement file). For a tran_id that is the bill number of an open invoice of ours it is asked
    again, with the inbox's backoff, for NOT_FOUND_PATIENCE after PayWay first said so (not a count of tries,
    nor time from the callback's arrival, which an outage would use up); then rejected. A tran_id of no open
    invoice of ours is rejected at once: an unsigned callback (anyone can send one) buys a few PayWay calls."""
    from datetime import UTC, datetime

    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    await answered_alike(await aba_callback(api, inv["bill_number"]))  # PayWay does not know it yet
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="12.50", currency="USD")
    conn = await asyncpg.connect(api.dsn)
    try:
        assert await conn.fetchval("SELECT state FROM provider_inbox") == "received"
        await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second'")
        await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])
        assert await conn.fetchval("SELECT state FROM provider_inbox") == "processed"
        got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
        assert got["status"] == "paid"

        other = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                             headers=h)).json()
        await answered_alike(await aba_callback(api, other["bill_number"]))
        last = "SELECT state FROM provider_inbox ORDER BY id DESC LIMIT 1"
        # PayWay was down for an hour (many tries, each deferred as unavailable), then says NOT_FOUND: its
        # window starts then, so it is asked again
        await conn.execute("UPDATE provider_inbox SET attempts = 9, received_at = now() - interval '1 hour', "
                           "reason = 'provider_unavailable: PayWay answered HTTP 503', "
                           "next_attempt_at = now() - interval '1 second' WHERE state = 'received'")
        await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])
        reason = await conn.fetchval("SELECT reason FROM provider_inbox ORDER BY id DESC LIMIT 1")
        window = reason[reason.index("NOT_FOUND asked again until"):]
        assert await conn.fetchval(last) == "received"
        # PayWay fails once more (503): the window is kept, not opened anew by the next NOT_FOUND (found by review)
        fake.fail_next(503, b"busy")
        await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second' "
                           "WHERE state = 'received'")
        await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])
        reason = await conn.fetchval("SELECT reason FROM provider_inbox ORDER BY id DESC LIMIT 1")
        assert reason.endswith(window) and "503" in reason and await conn.fetchval(last) == "received"
        past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        await conn.execute("UPDATE provider_inbox SET reason = regexp_replace(reason, 'until \\S+$', 'until ' || $1), "
                           "next_attempt_at = now() - interval '1 second' WHERE state = 'received'", past)
        await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])  # its window is over: still unknown
        assert await conn.fetchval(last) == "rejected"

        await answered_alike(await aba_callback(api, "NOT-OURS-1"))
        assert await conn.fetchval(last) == "rejected"  # not one of ours: not asked again
        await api.client.post(f"/v1/invoices/{other['id']}/cancel", headers=h)
        await answered_alike(await aba_callback(api, other["bill_number"]))  # a cancelled invoice's bill
        assert await conn.fetchval(last) == "rejected"  # not one to wait for
    finally:
        await conn.close()


async def test_payway_outage_or_pending_is_retried_by_the_worker(payway, invoice_body):
    api, fake = payway
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="PENDING", amount="12.50", currency="USD")
    await answered_alike(await aba_callback(api, inv["bill_number"]))  # stored; not yet approved
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
        return await table_counter(conn, "coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)", "khqr_codes")

    conn = await asyncpg.connect(api.dsn)
    try:
        before = await rows_read(conn)
        claimed = await conn.fetch(Q.poll_claim, timedelta(minutes=30), timedelta(0), 50, timedelta(minutes=1))
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


async def test_a_failing_later_call_keeps_what_the_earlier_calls_captured(bakong, invoice_body):
    """60 codes are two calls (50 + 10). The first call reports A paid; the second is answered 503. A is
    captured all the same, and the codes of the failed call are free to be asked again."""
    from providers import ProviderUnavailable

    api, fake = bakong
    h = await api.portal("MOI")
    a = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    for _ in range(59):
        await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    fake.add_payment(a["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq", tx_hash="a" * 64)
    fake.fail_next(503, b"<html>busy</html>", content_type="text/html", after=1)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    with pytest.raises(ProviderUnavailable):
        await poll_once(pool, provider, NOW_POLICY)
    got = await (await api.client.get(f"/v1/invoices/{a['id']}", headers=h)).json()
    assert got["status"] == "paid" and got["payments"][0]["provider"] == "bakong"
    assert [len(json.loads(r.body)) for r in fake.requests] == [50, 10]  # the second one answered 503
    assert a["khqr"]["md5"] in fake.requests[0].json
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE poll_lease_until IS NOT NULL") == 0
    fake.requests.clear()
    assert await poll_once(pool, provider, NOW_POLICY) == (59, 0)  # all still open ones, the failed ten too


async def test_two_slow_pollers_never_ask_about_one_code_at_once_nor_clear_each_others_lease(
        bakong, invoice_body):
    """The reviewer's case: 430 open codes, Bakong answering each call after 9 s against the poller's 60 s
    lease, two service instances polling; here scaled down fifteen times (0.6 s calls, a 4 s lease, as leases
    are the database's clock and cannot be sped up). No md5 may be in two requests in flight at the same time,
    and a code being asked about keeps the lease of the instance asking until its answer is in."""
    from providers.bakong import create

    api, fake = bakong
    h = await api.portal("MOI")
    for _ in range(430):
        await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    pool = api.client.app[POOL]
    fake.delay = 0.6
    lease_lost: list[str] = []

    class Instance:
        """One service instance's Bakong plugin; checks, as each answer arrives, that its codes are still
        leased (not cleared by the other instance, not expired under it)."""

        def __init__(self) -> None:
            self.provider = create({"token": "bk-token", "base_url": fake.base_url, "timeout": 5})

        def __getattr__(self, name: str):
            return getattr(self.provider, name)

        async def poll(self, pending):
            out = await self.provider.poll(pending)
            rows = await pool.fetch("SELECT md5 FROM khqr_codes WHERE md5 = ANY($1::text[]) "
                                    "AND (poll_lease_until IS NULL OR poll_lease_until <= now())",
                                    [p.md5 for p in pending])
            lease_lost.extend(r["md5"] for r in rows)
            return out

    # 400 codes a pass: eight calls of 0.6 s, longer than the 4 s lease; the other instance takes the other 30.
    policy = PollPolicy(min_interval=timedelta(hours=1), batch=400, lease=timedelta(seconds=4),
                        call_timeout=timedelta(seconds=1.9))
    instances = [Instance(), Instance()]

    async def keep_polling(inst: Instance) -> int:
        asked = 0
        while True:  # like Poller.run with a short interval, until nothing is left to ask about
            a, _ = await poll_once(pool, inst, policy)
            asked += a
            if a == 0 and await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE last_polled_at IS NULL") == 0:
                return asked
            await asyncio.sleep(0.05)

    try:
        totals = await asyncio.wait_for(asyncio.gather(*(keep_polling(i) for i in instances)), 60)
    finally:
        for i in instances:
            await i.provider.aclose()
    calls = [r for r in fake.requests if r.path.endswith("_md5_list")]
    assert all(r.answered is not None for r in calls)
    overlaps = []
    for i, r in enumerate(calls):
        for s in calls[i + 1:]:
            if r.arrived < s.answered and s.arrived < r.answered:  # in flight at the same time
                both = set(r.json) & set(s.json)
                if both:
                    overlaps.append(len(both))
    assert not overlaps, f"{len(overlaps)} pairs of calls asked about the same md5s at once ({sum(overlaps)} md5s)"
    assert not lease_lost, f"{len(lease_lost)} codes lost their lease while being asked about"
    asked = [m for r in calls for m in r.json]
    assert len(asked) == len(set(asked)) == 430  # each asked once, by one instance or the other
    assert sorted(totals) == [30, 400] and max(len(r.json) for r in calls) <= 50


async def test_a_release_clears_only_the_callers_own_lease(bakong, invoice_body):
    """Instance 1's lease ran out and instance 2 claimed the code; instance 1's late release must leave
    instance 2's lease (and its record of the ask) alone. Instance 2's own release then clears it."""
    from paysvc.queries import Q

    api, _ = bakong
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    md5 = inv["khqr"]["md5"]
    conn = await asyncpg.connect(api.dsn)
    try:
        def claim(lease: timedelta):
            return conn.fetch(Q.poll_claim, timedelta(minutes=30), timedelta(0), 50, lease)

        [first] = await claim(timedelta(seconds=1))
        assert first["md5"] == md5
        assert await claim(timedelta(seconds=60)) == []  # leased
        await asyncio.sleep(1.1)  # instance 1 is still asking; its lease has run out
        [second] = await claim(timedelta(seconds=60))
        lease1, lease2 = first["lease_until"], second["lease_until"]
        assert lease2 > lease1
        await conn.execute(Q.poll_release, [md5], True, lease1, None, [])  # instance 1, late
        row = await conn.fetchrow("SELECT poll_lease_until, last_polled_at FROM khqr_codes WHERE md5 = $1", md5)
        assert (row["poll_lease_until"], row["last_polled_at"]) == (lease2, None)
        await conn.execute(Q.poll_release, [md5], True, lease2, None, [])  # instance 2
        row = await conn.fetchrow("SELECT poll_lease_until, last_polled_at, now() AS db_now FROM khqr_codes "
                                  "WHERE md5 = $1", md5)
        assert row["poll_lease_until"] is None and lease1 < row["last_polled_at"] <= row["db_now"]
    finally:
        await conn.close()


def test_a_call_fits_in_the_half_lease_left_when_it_starts():
    policy = PollPolicy()
    assert (policy.lease, policy.call_timeout) == (timedelta(seconds=60), timedelta(seconds=20))
    for lease, call in ((60, 30), (60, 0), (10, 20)):
        with pytest.raises(ValueError, match="half the lease"):
            PollPolicy(lease=timedelta(seconds=lease), call_timeout=timedelta(seconds=call))


async def test_a_pass_renews_its_leases_and_drops_codes_it_no_longer_holds(bakong, invoice_body):
    """200 codes are four calls of 0.7 s under a 2 s lease: the pass must renew its lease before a call
    would start with less than half of it left. At the end of the first call after which that is so, the
    codes not yet asked are taken over by "another instance" (their lease set to its own): the renewal
    leaves them to it, and the pass asks about no code whose lease is not its own."""
    api, fake = bakong
    h = await api.portal("MOI")
    for _ in range(200):
        await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    pool, real = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    policy = PollPolicy(min_interval=timedelta(hours=1), lease=timedelta(seconds=2),
                        call_timeout=timedelta(seconds=0.9))
    theirs = datetime.now(UTC) + timedelta(hours=1)
    taken: list[str] = []
    not_ours: list[str] = []

    class Provider:
        name, pattern, poll_batch_size = real.name, real.pattern, real.poll_batch_size

        async def poll(self, pending):
            md5s = [p.md5 for p in pending]
            [ours] = {r["poll_lease_until"] for r in await pool.fetch(
                "SELECT poll_lease_until FROM khqr_codes WHERE md5 = ANY($1::text[])", md5s)}
            if ours is None or ours <= datetime.now(UTC) or ours == theirs:
                not_ours.extend(md5s)
            result = await real.poll(pending)
            await asyncio.sleep(0.7)
            if not taken and ours - datetime.now(UTC) < policy.lease / 2:  # the pass renews before its next call
                taken.extend(r["md5"] for r in await pool.fetch(
                    "UPDATE khqr_codes SET poll_lease_until = $1 WHERE poll_lease_until = $2 "
                    "AND NOT md5 = ANY($3::text[]) RETURNING md5", theirs, ours, md5s))
            return result

    asked, _ = await poll_once(pool, Provider(), policy)
    assert taken and asked == 200 - len(taken) and not not_ours
    asked_md5 = [m for r in fake.requests for m in r.json]
    assert len(asked_md5) == len(set(asked_md5)) == asked and not set(taken) & set(asked_md5)
    conn = await asyncpg.connect(api.dsn)
    try:
        left = await conn.fetch("SELECT md5, poll_lease_until, last_polled_at FROM khqr_codes "
                                "WHERE poll_lease_until IS NOT NULL OR last_polled_at IS NULL")
    finally:
        await conn.close()
    assert {r["md5"] for r in left} == set(taken)  # still theirs, untouched by the pass
    assert all(r["poll_lease_until"] == theirs and r["last_polled_at"] is None for r in left)


async def test_a_call_past_the_pollers_deadline_is_given_up_and_its_codes_released(bakong, invoice_body):
    """The poller does not trust the plugin's own timeout to keep a call inside its lease."""
    from providers import ProviderUnavailable

    api, fake = bakong
    h = await api.portal("MOI")
    await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    fake.delay = 1.0
    with pytest.raises(ProviderUnavailable, match="within 0.2 s"):
        await poll_once(pool, provider, PollPolicy(min_interval=timedelta(0), call_timeout=timedelta(seconds=0.2)))
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE poll_lease_until IS NOT NULL") == 0
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE last_polled_at IS NOT NULL") == 1


async def test_a_code_paid_during_a_pass_is_dropped_when_the_pass_renews_its_leases(bakong, invoice_body):
    """Found by review: the renewal kept codes a callback had captured meanwhile, so Bakong was asked about
    money already booked. 200 codes, four calls of 0.7 s under a 2 s lease: the pass renews before its third
    call. During the first call, the codes of the last two calls are captured (marked) by "a callback"."""
    api, fake = bakong
    h = await api.portal("MOI")
    for _ in range(200):
        await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    pool, real = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    policy = PollPolicy(min_interval=timedelta(hours=1), lease=timedelta(seconds=2),
                        call_timeout=timedelta(seconds=0.9))
    paid_meanwhile: list[str] = []

    class Provider:
        name, pattern, poll_batch_size = real.name, real.pattern, real.poll_batch_size

        async def poll(self, pending):
            result = await real.poll(pending)
            if not paid_meanwhile:
                asked_now = [p.md5 for p in pending]
                paid_meanwhile.extend(r["md5"] for r in await pool.fetch(
                    "UPDATE khqr_codes SET captured_at = now() WHERE md5 IN (SELECT md5 FROM khqr_codes "
                    "WHERE poll_lease_until IS NOT NULL AND NOT md5 = ANY($1::text[]) ORDER BY created_at DESC, md5 DESC "
                    "LIMIT 100) RETURNING md5", asked_now))
            await asyncio.sleep(0.7)
            return result

    asked, _ = await poll_once(pool, Provider(), policy)
    asked_md5 = {m for r in fake.requests for m in r.json}
    assert len(paid_meanwhile) == 100 and asked == 100
    assert not asked_md5 & set(paid_meanwhile)


async def test_an_exception_the_poll_opens_is_dated_its_business_day(bakong, invoice_body):
    """As for callbacks (see test_payments): the poller's policy carries the business-day cut-off."""
    from datetime import UTC, datetime, time

    from paysvc.settlement_days import business_date

    api, fake = bakong
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    fake.add_payment(inv["khqr"]["md5"], amount="40000", currency="KHR", to_account="moi@nbcq", tx_hash="b" * 64)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    cutoff = time(23, 59, 59, 999000)
    assert await poll_once(pool, provider, PollPolicy(min_interval=timedelta(0), business_cutoff=cutoff)) == (1, 1)
    conn = await asyncpg.connect(api.dsn)
    try:
        row = await conn.fetchrow("SELECT reason, business_date FROM reconciliation_exceptions")
    finally:
        await conn.close()
    assert (row["reason"], row["business_date"]) == ("underpaid", business_date(datetime.now(UTC), cutoff))


async def test_the_pollers_successes_and_failures_are_in_metrics(bakong, invoice_body):
    """Found by review: a Bakong outage (or an expired token, which Bakong answers with errorCode 6) showed only in
    logs. /metrics now has when the poller last succeeded (an answer read, or a pass with nothing due: an idle
    service is not an alert) and the failed passes by error."""
    import time as clock

    import prometheus_client

    from paysvc.poller import Poller

    api, fake = bakong
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    sample = prometheus_client.REGISTRY.get_sample_value
    gauge = ("paysvc_poll_last_success_timestamp_seconds", {"provider": "bakong"})

    async def run_until(done) -> None:
        task = asyncio.create_task(Poller(pool, provider, NOW_POLICY, interval=3600).run())
        try:
            for _ in range(100):
                if done():
                    break
                await asyncio.sleep(0.05)
            assert done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    before = clock.time()
    await run_until(lambda: (sample(*gauge) or 0) >= before)  # nothing due: an idle pass is a success
    assert fake.requests == []
    h = await api.portal("MOI")
    await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
    before = clock.time()
    await poll_once(pool, provider, NOW_POLICY)
    answered = sample(*gauge)
    assert answered >= before
    labels = {"provider": "bakong", "error": "ProviderAuthError"}
    failed = sample("paysvc_poll_failures_total", labels) or 0
    fake.token = "renewed-elsewhere"  # ours has expired: errorCode 6
    await run_until(lambda: (sample("paysvc_poll_failures_total", labels) or 0) > failed)
    assert sample("paysvc_poll_failures_total", labels) == failed + 1
    assert sample(*gauge) == answered  # no success since


async def _expire(dsn: str, md5: str, ago: timedelta) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE khqr_codes SET expires_at = now() - $2::interval, created_at = now() - interval "
                           "'100 hours' WHERE md5 = $1", md5, ago)
    finally:
        await conn.close()


async def test_a_code_is_asked_about_until_bakong_has_answered_once_its_grace_was_over(bakong, invoice_body):
    """Found by review: the poll window was the grace period by the clock, so a Bakong outage (or a refused
    token) longer than it left codes that expired meanwhile unasked for good, and a payment on one came only
    with the settlement file. Now a code is asked about until an answer read after its grace says nothing
    more (migration 0037), however long that takes, up to the give-up time."""
    api, fake = bakong
    h = await api.portal("MOI")
    paid, quiet, fresh, unreadable, ancient = [
        (await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json())
        for _ in range(5)]
    fake.add_payment(paid["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq", tx_hash="c" * 64)
    fake.add_payment(unreadable["khqr"]["md5"], amount="50000.5", currency="KHR", to_account="moi@nbcq",
                     tx_hash="d" * 64)
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    policy = PollPolicy(min_interval=timedelta(0), grace=timedelta(minutes=30), give_up=timedelta(hours=72))
    fake.token = "renewed-elsewhere"  # an outage: every call refused
    with pytest.raises(ProviderAuthError):
        await poll_once(pool, provider, policy)
    for inv, ago in ((paid, timedelta(minutes=41)), (quiet, timedelta(minutes=41)), (fresh, timedelta(minutes=1)),
                     (unreadable, timedelta(minutes=41)), (ancient, timedelta(hours=73))):
        await _expire(api.dsn, inv["khqr"]["md5"], ago)  # the outage outlasted their grace
    fake.token = "bk-token"  # back
    fake.requests.clear()
    assert await poll_once(pool, provider, policy) == (4, 1)  # all but the one past the give-up time
    got = await (await api.client.get(f"/v1/invoices/{paid['id']}", headers=h)).json()
    assert got["payments"][0]["provider"] == "bakong"  # captured, if late (its invoice's code had expired)
    fake.requests.clear()
    await poll_once(pool, provider, policy)
    asked_now = {md5 for r in fake.requests for md5 in json.loads(r.body)}
    # answered after its grace: done; still in its grace, or its item unreadable: asked again
    assert asked_now == {fresh["khqr"]["md5"], unreadable["khqr"]["md5"]}


async def test_a_code_past_its_grace_stays_asked_when_its_answer_is_not_one_to_trust(bakong, invoice_body,
                                                                                      monkeypatch):
    """Found by review: the poll cleared codes past their grace although (a) the call failed, (b) the capture of
    its answer failed, or (c) an item of the answer could not be read and named no code of the call (its md5
    with a trailing space, say), where that item, saying "paid", may be about any of them. None of these ends
    a code's polling; an answer read in full does."""
    import paysvc.poller as poller_module
    from tests.fakes.bakong import envelope

    api, fake = bakong
    h = await api.portal("MOI")
    invs = [(await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()) for _ in range(2)]
    md5s = [inv["khqr"]["md5"] for inv in invs]
    for md5 in md5s:
        await _expire(api.dsn, md5, timedelta(minutes=41))
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    policy = PollPolicy(min_interval=timedelta(0))

    async def asked_next() -> set[str]:
        fake.requests.clear()
        await poll_once(pool, provider, policy)
        return {md5 for r in fake.requests for md5 in json.loads(r.body)}

    fake.fail_next(500, b"oops")  # (a)
    with pytest.raises(ProviderUnavailable):
        await poll_once(pool, provider, policy)
    real_capture = poller_module.capture_notices

    async def failing_capture(*args, **kwargs):
        raise RuntimeError("the database went away")
    monkeypatch.setattr(poller_module, "capture_notices", failing_capture)  # (b)
    import prometheus_client
    gauge = ("paysvc_poll_last_success_timestamp_seconds", {"provider": "bakong"})
    before = prometheus_client.REGISTRY.get_sample_value(*gauge)
    with pytest.raises(RuntimeError):
        await poll_once(pool, provider, policy)
    assert prometheus_client.REGISTRY.get_sample_value(*gauge) == before  # not a success: nothing captured
    monkeypatch.setattr(poller_module, "capture_notices", real_capture)
    paid_item = {"md5": md5s[0] + " ", "status": "SUCCESS", "data": {
        "hash": "e" * 64, "fromAccountId": "x@y", "toAccountId": "moi@nbcq", "currency": "KHR", "amount": 50000,
        "description": None, "createdDateMs": 1, "acknowledgedDateMs": 1, "externalRef": None}}
    fake.fail_next(200, json.dumps(envelope([paid_item, {"md5": md5s[1], "status": "NOT_FOUND", "data": None}])
                                   ).encode())  # (c)
    await poll_once(pool, provider, policy)
    assert await asked_next() == set(md5s)  # still pending after all three
    assert await asked_next() == set()      # read in full (both not found): done


# --- A refused Bakong token, renewed and shared (PAYSVC_BAKONG_EMAIL) -------------------------------------------


@pytest.fixture
async def renewing(db_dsn):
    """The service with PAYSVC_BAKONG_EMAIL, and a second instance's Bakong provider and poller on the same
    database, both configured with the same token: (api, fake, poller A, poller B)."""
    from paysvc.pii import cipher_from_settings
    from paysvc.poller import Poller
    from providers import load_providers
    from tests.conftest import make_settings

    async with FakeBakong(token="bk-token") as fake:
        async with running_api(db_dsn, providers="sandbox,bakong", bakong_token="bk-token",
                               bakong_email=fake.email, bakong_base_url=fake.base_url) as api:
            cipher = cipher_from_settings(make_settings(db_dsn))
            pool = api.client.app[POOL]
            other = load_providers({"bakong": {"token": "bk-token", "email": fake.email,
                                               "base_url": fake.base_url}})["bakong"]
            try:
                yield (api, fake, Poller(pool, api.client.app[PROVIDERS]["bakong"], NOW_POLICY, 3600, cipher=cipher),
                       Poller(pool, other, NOW_POLICY, 3600, cipher=cipher))
            finally:
                await other.aclose()


async def _paid_code(api, fake, invoice_body, h: dict) -> dict:
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
    fake.add_payment(inv["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq")
    return inv


async def test_a_refused_token_is_renewed_once_and_shared_by_every_instance(renewing, invoice_body):
    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"  # Bakong no longer accepts bk-token
    h = await api.portal("MOI")
    await _paid_code(api, fake, invoice_body, h)
    with pytest.raises(TokenRefused):
        await poll_once(a.pool, a.provider, NOW_POLICY)
    assert await a.recover_token()
    assert fake.renewals == 1 and a.provider.current_token() == fake.token
    assert await poll_once(a.pool, a.provider, NOW_POLICY) == (1, 1)
    # The other instance's token is refused too: it takes the stored one, and Bakong is not asked again (a
    # renewal may end the token before it: found by review, instances renewing on their own refused each
    # other's tokens in turn).
    second = await _paid_code(api, fake, invoice_body, h)
    with pytest.raises(TokenRefused):
        await poll_once(b.pool, b.provider, NOW_POLICY)
    assert await b.recover_token()
    assert fake.renewals == 1 and b.provider.current_token() == fake.token
    assert await poll_once(b.pool, b.provider, NOW_POLICY) == (1, 1)
    assert await poll_once(a.pool, a.provider, NOW_POLICY) == (0, 0)  # A's token still good
    stored = await count(api.dsn, "SELECT ciphertext FROM provider_tokens WHERE provider = 'bakong'")
    assert fake.token.encode() not in bytes(stored)  # encrypted
    assert (await (await api.client.get(f"/v1/invoices/{second['id']}", headers=h)).json())["status"] == "paid"


@pytest.mark.parametrize("renewal", ["refused", "500", "answered but unreadable"])
async def test_a_renewal_is_asked_at_most_once_per_ten_minutes_across_instances(renewing, renewal):
    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"
    if renewal == "refused":
        fake.email = "someone.else@agency.gov.kh"
    elif renewal == "500":
        fake.fail_next(500)
    else:
        fake.fail_next(200, dumps(envelope({"token": "two words"})))
    assert not await a.recover_token()  # logged and counted; the poller backs off
    assert not await b.recover_token()  # the other instance: too soon after that answer
    assert not await a.recover_token()
    assert len([r for r in fake.requests if r.path.endswith("/renew_token")]) == 1
    # Ten minutes later it is asked again.
    await count(api.dsn, "UPDATE provider_tokens SET attempted_at = attempted_at - interval '10 minutes'")
    fake.email = "ops@agency.gov.kh"
    assert await b.recover_token() and b.provider.current_token() == fake.token


async def test_a_revoked_renewed_token_is_renewed_again_only_after_ten_minutes(renewing):
    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"
    assert await a.recover_token()
    fake.token = "revoked-again"
    assert not await a.recover_token()  # the stored token is the one refused, and the renewal too recent
    assert fake.renewals == 1


async def test_without_an_email_the_token_is_not_renewed(bakong):
    api, fake = bakong
    from paysvc.pii import cipher_from_settings
    from paysvc.poller import Poller
    from tests.conftest import make_settings

    poller = Poller(api.client.app[POOL], api.client.app[PROVIDERS]["bakong"], NOW_POLICY, 3600,
                    cipher=cipher_from_settings(make_settings(api.dsn)))
    fake.token = "issued-after-90-days"
    assert not await poller.recover_token()
    assert not [r for r in fake.requests if r.path.endswith("/renew_token")]


async def test_the_running_poller_renews_the_token_and_captures(renewing, invoice_body):
    import prometheus_client

    api, fake, a, _ = renewing
    sample = prometheus_client.REGISTRY.get_sample_value
    failed = sample("paysvc_poll_failures_total", {"provider": "bakong", "error": "ProviderAuthError"}) or 0
    renewed = sample("paysvc_provider_token_renewals_total", {"provider": "bakong", "outcome": "renewed"}) or 0
    fake.token = "issued-after-90-days"
    h = await api.portal("MOI")
    inv = await _paid_code(api, fake, invoice_body, h)
    a.interval = 0.05
    task = asyncio.create_task(a.run())
    try:
        for _ in range(200):
            got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
            if got["status"] == "paid":
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got["status"] == "paid" and fake.renewals == 1
    # A refused token counts as ProviderAuthError, as before renewal existed (alerts keep firing).
    assert sample("paysvc_poll_failures_total", {"provider": "bakong", "error": "ProviderAuthError"}) == failed + 1
    assert sample("paysvc_provider_token_renewals_total", {"provider": "bakong", "outcome": "renewed"}) == renewed + 1


async def test_an_instance_without_the_email_takes_the_token_another_renewed(renewing, db_dsn, invoice_body):
    """Found by review: in a fleet where only some instances have PAYSVC_BAKONG_EMAIL (a rolling change), one
    without it kept the token the renewal had ended, though a valid one was stored."""
    from paysvc.pii import cipher_from_settings
    from paysvc.poller import Poller
    from providers import load_providers
    from tests.conftest import make_settings

    api, fake, a, _ = renewing
    fake.token = "issued-after-90-days"
    assert await a.recover_token()
    await _paid_code(api, fake, invoice_body, await api.portal("MOI"))
    plain = load_providers({"bakong": {"token": "bk-token", "base_url": fake.base_url}})["bakong"]
    try:
        c = Poller(a.pool, plain, NOW_POLICY, 3600, cipher=cipher_from_settings(make_settings(db_dsn)))
        with pytest.raises(TokenRefused):
            await poll_once(c.pool, plain, NOW_POLICY)
        assert await c.recover_token() and plain.current_token() == fake.token
        assert await poll_once(c.pool, plain, NOW_POLICY) == (1, 1)
    finally:
        await plain.aclose()
    assert fake.renewals == 1


async def test_no_lock_or_transaction_is_held_while_bakong_is_asked_for_a_token(renewing):
    """Found by review: the transaction and its lock were held across the call; a connection lost meanwhile
    (a failover, idle_in_transaction_session_timeout) ended the poller's task and lost the new token."""
    api, fake, a, _ = renewing
    fake.token = "issued-after-90-days"
    renew = a.provider.renew_token
    seen = []

    async def watched():
        seen.append(await count(api.dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))
        seen.append(await count(api.dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                         "AND state LIKE 'idle in transaction%'"))
        return await renew()

    a.provider.renew_token = watched
    assert await a.recover_token()
    assert seen == [0, 0]


async def test_whatever_fails_while_looking_for_a_token_the_poller_goes_on(renewing):
    api, fake, a, _ = renewing

    async def broken():
        raise RuntimeError("the connection was lost")  # what asyncpg raises is not a provider error

    a.provider.renew_token = broken
    fake.token = "issued-after-90-days"
    assert not await a.recover_token()  # logged; Poller.run backs off and carries on
    attempted = await count(api.dsn, "SELECT attempted_at IS NOT NULL FROM provider_tokens")
    assert attempted  # counted: the next renewal waits ten minutes


async def test_a_token_stored_under_an_older_key_is_stored_again_under_the_active_one(renewing, db_dsn):
    import base64

    from paysvc.pii import PiiCipher, cipher_from_settings
    from paysvc.poller import Poller
    from tests.conftest import make_settings

    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"
    assert await a.recover_token()  # stored under the test key t1
    old = cipher_from_settings(make_settings(db_dsn))
    rotated = PiiCipher({"t2": b"n" * 32, **{k: v for k, v in [("t1", base64.b64decode(
        make_settings(db_dsn).pii_keys.get_secret_value().split(":", 1)[1]))]}})
    assert old.active_key_id == "t1" and rotated.active_key_id == "t2"
    c = Poller(b.pool, b.provider, NOW_POLICY, 3600, cipher=rotated)
    assert await c.recover_token() and b.provider.current_token() == fake.token  # read with t1
    assert await count(api.dsn, "SELECT key_id FROM provider_tokens") == "t2"


async def test_a_renewal_stored_late_does_not_overwrite_a_newer_one(renewing):
    """Found by review: instance A's renewal was stored after the pace of renewals had let B renew (which ended
    A's token); A's store overwrote B's token with the ended one."""
    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"
    release = asyncio.Event()
    renew = a.provider.renew_token

    async def slow():
        token = await renew()
        await release.wait()
        return token

    a.provider.renew_token = slow
    first = asyncio.create_task(a.recover_token())
    for _ in range(100):
        if fake.renewals:
            break
        await asyncio.sleep(0.02)
    await count(api.dsn, "UPDATE provider_tokens SET attempted_at = attempted_at - interval '10 minutes'")
    assert await b.recover_token()  # B renews: A's token is ended
    release.set()
    assert await first
    assert fake.renewals == 2 and b.provider.current_token() == fake.token
    c_token = await count(api.dsn, "SELECT key_id FROM provider_tokens")
    assert c_token == "t1"
    # The stored token is B's: an instance refused now takes it.
    assert await a.recover_token() and a.provider.current_token() == fake.token


async def test_a_renewed_token_whose_store_fails_once_is_stored_on_the_next_try(renewing, monkeypatch):
    from paysvc import provider_tokens

    api, fake, a, b = renewing
    fake.token = "issued-after-90-days"
    failed = []

    class Flaky:
        """The pool, whose first connection after Bakong issued the token cannot be had."""

        def __init__(self, pool):
            self.pool = pool

        def acquire(self, *args, **kw):
            if fake.renewals and not failed:
                failed.append(True)
                raise OSError("connection refused")
            return self.pool.acquire(*args, **kw)

    a.pool = Flaky(a.pool)
    monkeypatch.setattr(provider_tokens, "STORE_RETRY_SECONDS", 0)
    assert await a.recover_token()
    monkeypatch.undo()
    assert failed
    assert await count(api.dsn, "SELECT renewed_at IS NOT NULL FROM provider_tokens")  # stored on the next try
    assert await b.recover_token()
    assert b.provider.current_token() == fake.token and fake.renewals == 1


async def test_at_start_a_token_stored_under_an_older_key_is_stored_under_the_active_one(renewing, db_dsn):
    import base64

    from paysvc.pii import PiiCipher, check_pii_keys
    from paysvc import provider_tokens
    from tests.conftest import make_settings

    api, fake, a, _ = renewing
    fake.token = "issued-after-90-days"
    assert await a.recover_token()  # stored under t1
    t1 = base64.b64decode(make_settings(db_dsn).pii_keys.get_secret_value().split(":", 1)[1])
    rotated = PiiCipher({"t2": b"n" * 32, "t1": t1})
    await provider_tokens.reencrypt(a.pool, rotated)
    assert await count(api.dsn, "SELECT key_id FROM provider_tokens") == "t2"
    await check_pii_keys(a.pool, PiiCipher({"t2": b"n" * 32}))  # t1 can go once payer data is moved too


def test_the_backoff_of_a_loop_failing_for_days_does_not_overflow():
    from paysvc.background import backoff

    assert backoff(5.0, 1, 300) == 10.0
    assert backoff(5.0, 1024, 300) == 300  # 5.0 * 2 ** 1024 raised OverflowError (found by review)
    assert backoff(5.0, 10**6, 300) == 300


async def test_the_poll_judges_by_the_databases_clock_not_the_instances(bakong, invoice_body, monkeypatch):
    """Leases, when codes were asked, which codes are done and when a polled payment was received are the
    database's clock. An instance whose clock is an hour ahead does not take codes another instance leased a
    moment ago (before, a skew of about 10 s let two ask about one code at once), nor end the polling of codes
    still payable; one whose clock is ten minutes behind books what it polls (found by review: it held every
    polled payment as paid_at_implausible); codes issued by an instance ahead are polled at once."""
    from paysvc import inbox, invoicing
    from paysvc import poller as poller_mod
    from paysvc.queries import Q

    def skewed(by: timedelta) -> None:
        monkeypatch.undo()
        for module in (invoicing, inbox, poller_mod):
            monkeypatch.setattr(module, "now_utc", lambda: datetime.now(UTC) + by, raising=False)

    api, fake = bakong
    h = await api.portal("MOI")
    invs = [await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json() for _ in range(3)]
    skewed(timedelta(hours=1))
    ahead = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    monkeypatch.undo()
    pool, provider = api.client.app[POOL], api.client.app[PROVIDERS]["bakong"]
    leased = {r["md5"] for r in await pool.fetch(Q.poll_claim, timedelta(hours=72), timedelta(0), 2,
                                                 timedelta(seconds=60))}
    assert leased == {invs[0]["khqr"]["md5"], invs[1]["khqr"]["md5"]}  # the longest waiting
    skewed(timedelta(hours=1))
    assert await poll_once(pool, provider, NOW_POLICY) == (2, 0)
    asked = {m for r in fake.requests for m in r.json}
    assert asked == {invs[2]["khqr"]["md5"], ahead["khqr"]["md5"]}  # not the leased ones
    monkeypatch.undo()
    assert await count(api.dsn, "SELECT count(*) FROM khqr_codes WHERE NOT poll_pending "
                                "OR last_polled_at > now() + interval '1 minute'") == 0  # still payable, pending
    # Paid now; an instance ten minutes behind polls it and books it as paid.
    skewed(-timedelta(minutes=10))
    fake.add_payment(invs[2]["khqr"]["md5"], amount=str(invs[2]["amount"]), currency="KHR", to_account="moi@nbcq")
    await pool.execute("UPDATE khqr_codes SET poll_lease_until = NULL")
    assert (await poll_once(pool, provider, NOW_POLICY))[1] == 1
    monkeypatch.undo()
    got = await (await api.client.get(f"/v1/invoices/{invs[2]['id']}", headers=h)).json()
    assert got["status"] == "paid"


async def test_a_payway_callback_again_is_confirmed_again_and_a_different_answer_is_raised(payway, invoice_body):
    # PayWay has no settlement format here, so a second callback's confirmation is where the service sees that
    # PayWay now says otherwise about booked money. (A change that skipped the call for booked transactions,
    # to save PayWay calls on replayed callbacks, lost this silently and was reverted after review.)
    api, fake = payway
    h = await api.portal("MOI")
    treasury = {"Authorization": f"Bearer {await api.key(None, scopes=['treasury'])}"}
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250),
                                       headers=h)).json()
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="12.50", currency="USD")
    assert (await aba_callback(api, inv["bill_number"])).status == 200
    fake.add_transaction(inv["bill_number"], status="APPROVED", amount="99.00", currency="USD")
    r = await aba_callback(api, inv["bill_number"])
    assert r.status == 200, await r.text()
    assert len(fake.requests) == 2  # asked again
    raised = await (await api.client.get("/v1/reconciliation/exceptions", params={"reason": "conflicting_notice"},
                                         headers=treasury)).json()
    assert len(raised["data"]) == 1, raised
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 1
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["amount_paid"] == 1250  # what was booked stands; the difference is treasury's to look at
