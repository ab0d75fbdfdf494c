"""Payments through the sandbox provider: capture exactly once, and every odd case kept and raised."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from paysvc import inbox
from paysvc.web import POOL, PROVIDERS, SETTINGS
from tests.payments_helpers import new_invoice, pay, sandbox_body, sandbox_headers


async def balances(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetch("""SELECT a.code, sum(CASE WHEN p.side = 'debit' THEN p.amount ELSE -p.amount END) AS net
                                 FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
                                GROUP BY a.code""")
    await conn.close()
    return {r["code"]: int(r["net"]) for r in rows}


async def test_signed_callback_pays_the_invoice_and_books_revenue(api, portal, invoice_body):
    import prometheus_client

    labels = {"provider": "sandbox", "source": "callback", "outcome": "captured"}
    before = prometheus_client.REGISTRY.get_sample_value("paysvc_payments_captured_total", labels) or 0
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    r = await pay(api.client, inv)
    assert r.status == 200, await r.text()
    assert prometheus_client.REGISTRY.get_sample_value("paysvc_payments_captured_total", labels) == before + 1
    out = await r.json()
    assert out["status"] == "processed" and out["payments"][0]["exception"] is None
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == "paid" and got["amount_paid"] == 50000 and got["paid_at"]
    assert [p["amount"] for p in got["payments"]] == [50000]
    assert await balances(api.dsn) == {"provider:sandbox:clearing:KHR": 50000, "agency:MOI:revenue:KHR": -50000}
    conn = await asyncpg.connect(api.dsn)
    events = await conn.fetch("SELECT type, data FROM outbox_events ORDER BY seq")
    entry = await conn.fetchrow("SELECT e.id, e.kind, e.effective_at FROM ledger_entries e "
                                "JOIN payments p ON p.id = e.payment_id WHERE p.invoice_id = $1", inv["id"])
    await conn.close()
    assert [e["type"] for e in events] == ["invoice.created", "invoice.paid", "journal.posted"]
    # The agency's view of the entry, with the id the ledger gave it in the same statement.
    # Each event's data is a JSON object, as agencies read it (not a JSON string holding one).
    paid, posted = json.loads(events[1]["data"]), json.loads(events[2]["data"])
    assert paid["invoice_id"] == inv["id"] and paid["status"] == "paid" and paid["amount_paid"] == 50000
    assert posted["entry_id"] == entry["id"] and posted["kind"] == entry["kind"] == "payment.captured"
    assert posted["invoice_id"] == inv["id"] and posted["payment_id"] == out["payments"][0]["payment_id"]
    assert datetime.fromisoformat(posted["effective_at"]) == entry["effective_at"]
    assert posted["postings"] == [{"account": "agency:MOI:revenue:KHR", "side": "credit", "amount": 50000,
                                   "currency": "KHR"}]


async def test_fifty_identical_callbacks_make_one_payment(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv, txid="TX-SAME")
    # A provider's retries: the same body, each signed anew when sent (the same signature again is a replay).
    now = int(time.time())
    rs = await asyncio.gather(*(api.client.post("/v1/providers/sandbox/callbacks", data=body,
                                                headers=sandbox_headers(body, t=now - i))
                                for i in range(50)))
    assert all(r.status in (200, 202) for r in rs), [r.status for r in rs]
    await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS])  # anything deferred
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 1
    assert await conn.fetchval("SELECT count(*) FROM provider_inbox") == 50
    assert await conn.fetchval("SELECT count(*) FROM provider_inbox WHERE state = 'processed'") == 50
    assert await conn.fetchval("SELECT count(*) FROM reconciliation_exceptions") == 0
    await conn.close()


@pytest.mark.parametrize("case, reason, suspense", [
    ("underpaid", "underpaid", 40000),
    ("overpaid", "overpaid", 10000),
    ("currency", "currency_mismatch", 50000),
    ("account", "account_mismatch", 50000),
    ("unknown", "unknown_khqr", 50000),
    ("cancelled", "invoice_cancelled", 50000),
    ("expired", "invoice_expired", 50000),
    ("twice", "duplicate_payment", 50000),
])
async def test_odd_payments_are_kept_in_suspense_and_raised(api, portal, treasury, invoice_body, case, reason,
                                                             suspense):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    kw: dict = {}
    if case == "underpaid":
        kw["amount"] = 40000
    elif case == "overpaid":
        kw["amount"] = 60000
    elif case == "currency":
        kw["currency"] = "USD"
    elif case == "account":
        kw["to_account"] = "someone@else"
    elif case == "unknown":
        kw["md5"] = "0" * 32
        inv = {**inv, "bill_number": "PS99999999"}
    elif case == "cancelled":
        await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=portal)
    elif case == "expired":
        conn = await asyncpg.connect(api.dsn)
        await conn.execute("UPDATE invoices SET status='expired', expired_at=now(), expires_at=now() - interval '1 s',"
                           " created_at = created_at - interval '1 hour' WHERE id=$1", inv["id"])
        await conn.close()
    elif case == "twice":
        assert (await pay(api.client, inv)).status == 200
    r = await pay(api.client, inv, **kw)
    assert r.status == 200, await r.text()
    assert (await r.json())["payments"][0]["exception"] == reason

    listed = await (await api.client.get("/v1/reconciliation/exceptions", params={"reason": reason},
                                         headers=treasury)).json()
    assert len(listed["data"]) == 1
    exc = listed["data"][0]
    assert exc["state"] == "open" and exc["provider"] == "sandbox" and exc["amount"] == suspense
    assert exc["evidence"]["notice"]["transaction_id"]
    cur = kw.get("currency", "KHR")
    b = await balances(api.dsn)
    assert b[f"suspense:unmatched:{cur}"] == -suspense
    assert sum(v for k, v in b.items() if k.endswith(cur)) == 0
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json() if case != "unknown" else None
    if case == "overpaid":
        assert got["status"] == "paid" and got["amount_paid"] == 50000 and b["agency:MOI:revenue:KHR"] == -50000
    elif case == "underpaid":
        assert got["status"] == "open" and got["amount_paid"] == 0


async def test_a_payment_for_an_expired_invoice_is_held_for_treasury_even_when_made_in_time(api, portal, treasury,
                                                                                          invoice_body):
    """Expired is final: the portal was told, and may have issued another invoice. A payment made before the
    expiry but reported after the expiry job ran goes to suspense as invoice_expired (it used to pay the invoice,
    so invoice.paid followed invoice.expired: found by review); treasury can still match it to the invoice."""
    inv = await new_invoice(api, portal, invoice_body)
    paid_at = datetime.now(UTC)
    conn = await asyncpg.connect(api.dsn)
    await conn.execute("UPDATE invoices SET status='expired', expired_at=now(), expires_at=$2 WHERE id=$1",
                       inv["id"], paid_at + timedelta(milliseconds=1))
    await conn.close()
    r = await pay(api.client, inv, paid_at=paid_at)
    assert (await r.json())["payments"][0]["exception"] == "invoice_expired"
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == "expired" and got["amount_paid"] == 0
    assert (await balances(api.dsn))["suspense:unmatched:KHR"] == -inv["amount"]
    [exc] = await exceptions(api, treasury, reason="invoice_expired")
    r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury, json={
        "action": "match_to_invoice", "invoice_id": inv["id"], "note": "paid in time; the bank reported it late"})
    assert r.status == 200, await r.text()
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == "paid" and got["amount_paid"] == inv["amount"]


async def test_a_part_payment_treasury_applies_leaves_a_code_for_the_rest(api, portal, treasury, invoice_body):
    """Found by review: after treasury applied an underpaid payment to its invoice, every new code (and the
    payment page) still asked for the whole amount, so finishing meant paying it all again (booked overpaid),
    and the invoice could be cancelled with the part paid left in the agency's revenue."""
    from paysvc import khqr

    inv = await new_invoice(api, portal, invoice_body, amount=1000)
    r = await pay(api.client, inv, amount=400)
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    [exc] = await exceptions(api, treasury, reason="underpaid")
    r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury, json={
        "action": "match_to_invoice", "invoice_id": inv["id"], "note": "the citizen will pay the rest"})
    assert r.status == 200, await r.text()
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"], got["khqr"]) == ("open", 400, None)  # the old code asked for 1000

    r = await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=portal)
    assert r.status == 200, await r.text()
    code = await r.json()
    assert code["md5"] != inv["khqr"]["md5"] and khqr.decode(code["payload"]).amount == 600
    state = await (await api.client.get(f"/pay/{inv['id']}/state")).json()
    assert (state["amount"], state["amount_due"], state["amount_display"]) == (1000, 600, "600 ៛")
    assert state["khqr"]["md5"] == code["md5"]

    r = await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=portal)
    assert r.status == 409 and "400 of this invoice's 1000 is paid" in (await r.json())["detail"]

    r = await pay(api.client, {**inv, "khqr": code}, amount=600)
    assert (await r.json())["payments"][0]["exception"] is None
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("paid", 1000)
    b = await balances(api.dsn)
    assert b["agency:MOI:revenue:KHR"] == -1000 and b["suspense:unmatched:KHR"] == 0


async def test_exceptions_need_a_treasury_key(api, portal):
    r = await api.client.get("/v1/reconciliation/exceptions", headers=portal)
    assert r.status == 403


@pytest.mark.parametrize("case, status", [
    ("bad_signature", 401), ("stale", 401), ("future", 401), ("malformed_json", 400), ("content_type", 415),
    ("oversize", 413), ("missing_signature", 401), ("unknown_provider", 404), ("compressed", 415),
    ("replayed", 409), ("signature_twice", 401),
])
async def test_bad_callbacks_are_refused_and_never_processed(api, portal, invoice_body, case, status):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    headers = sandbox_headers(body)
    url = "/v1/providers/sandbox/callbacks"
    if case == "bad_signature":
        headers = sandbox_headers(body, secret="not-the-secret")
    elif case == "stale":
        headers = sandbox_headers(body, t=int(time.time()) - 301)
    elif case == "future":
        headers = sandbox_headers(body, t=int(time.time()) + 301)
    elif case == "malformed_json":
        body = b'{"transaction_id": '
        headers = sandbox_headers(body)
    elif case == "content_type":
        headers = {**headers, "Content-Type": "text/plain"}
    elif case == "oversize":
        body = b'{"x": "' + b"a" * 70000 + b'"}'
        headers = sandbox_headers(body)
    elif case == "missing_signature":
        headers = {"Content-Type": "application/json"}
    elif case == "unknown_provider":
        url = "/v1/providers/nobank/callbacks"
    elif case == "compressed":
        body = gzip.compress(body)
        headers = {**sandbox_headers(body), "Content-Encoding": "gzip"}
    elif case == "replayed":
        # The same signed bytes are in the inbox already (their first request is still processing them).
        await inbox.store(api.client.app[POOL], "sandbox", headers, body, lease=timedelta(hours=1),
                          replay_key=inbox.replay_key(api.client.app[PROVIDERS]["sandbox"], headers, body,
                                                      now=datetime.now(UTC)))
    elif case == "signature_twice":
        from multidict import CIMultiDict

        headers = CIMultiDict(headers)
        headers.add("Sandbox-Signature", sandbox_headers(body, t=int(time.time()) - 1)["Sandbox-Signature"])
    r = await api.client.post(url, data=body, headers=headers)
    assert r.status == status, await r.text()
    assert r.content_type == "application/problem+json"
    assert (await r.json())["detail"]
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT count(*) FROM payments") == 0
    kept = await conn.fetch("SELECT id, state, reason, body FROM provider_inbox ORDER BY id")
    await conn.close()
    if case in ("bad_signature", "stale", "future", "malformed_json", "content_type", "missing_signature",
                "compressed", "signature_twice"):
        assert [k["state"] for k in kept] == ["rejected"] and kept[0]["reason"]
        assert bytes(kept[0]["body"]) == body  # the bytes as they came, compressed ones included
    elif case == "replayed":
        assert [k["state"] for k in kept] == ["received", "rejected"]
        assert f"inbox row {kept[0]['id']}" in kept[1]["reason"] and bytes(kept[1]["body"]) == body
        problem = await r.json()
        assert problem["first_inbox_id"] == kept[0]["id"] and problem["inbox_id"] == kept[1]["id"]
        assert f"already received as inbox row {kept[0]['id']}" in problem["detail"]
    else:
        assert kept == []
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == "open"


async def test_replayed_callback_is_refused_once_its_window_passed(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    old = sandbox_headers(body, t=int(time.time()) - 400)  # captured earlier, sent again now
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=old)
    assert r.status == 401


async def test_a_stored_callback_whose_request_died_is_processed_by_the_worker(api, portal, invoice_body):
    """As if the process died right after the inbox commit: the worker finds the row and captures it."""
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    pool = api.client.app[POOL]
    inbox_id = (await inbox.store(pool, "sandbox", sandbox_headers(body), body)).id
    conn = await asyncpg.connect(api.dsn)
    await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 second' WHERE id = $1", inbox_id)  # lease over
    assert await inbox.work(pool, api.client.app[PROVIDERS]) == "processed 1 of 1 inbox rows"
    assert await inbox.work(pool, api.client.app[PROVIDERS]) is None
    assert await conn.fetchval("SELECT state FROM provider_inbox WHERE id=$1", inbox_id) == "processed"
    assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    await conn.close()


async def test_database_refuses_a_second_payment_row_for_one_transaction(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    await pay(api.client, inv, txid="TX1")
    conn = await asyncpg.connect(api.dsn)
    row = await conn.fetchrow("SELECT * FROM payments")
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, currency, amount, applied_amount,"
            " suspense_amount, paid_at, source) VALUES ('pay_x', 'sandbox', 'TX1', 'KHR', 1, 0, 1,"
            " now(), 'callback')")
    await conn.close()
    assert row["provider_transaction_id"] == "TX1"


async def test_a_callback_with_text_the_database_cannot_store_is_refused_and_kept(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv, txid="TX\x00NUL")
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=sandbox_headers(body))
    assert r.status == 400, await r.text()
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT state FROM provider_inbox") == "rejected"
    assert await conn.fetchval("SELECT count(*) FROM payments") == 0
    await conn.close()


async def exceptions(api, treasury, **params) -> list[dict]:
    r = await api.client.get("/v1/reconciliation/exceptions", params=params, headers=treasury)
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def test_a_payment_after_expiry_is_late_even_before_the_expiry_job_marks_the_invoice(api, portal, treasury,
                                                                                         invoice_body):
    answers = []
    for job_ran in (False, True):
        inv = await new_invoice(api, portal, invoice_body, amount=50000)
        conn = await asyncpg.connect(api.dsn)
        await conn.execute("UPDATE invoices SET expires_at = now() - interval '1 hour', created_at = created_at - "
                           "interval '2 hours' WHERE id = $1", inv["id"])
        if job_ran:
            await conn.execute("UPDATE invoices SET status = 'expired', expired_at = now() WHERE id = $1", inv["id"])
        await conn.close()
        r = await pay(api.client, inv)
        assert r.status == 200, await r.text()
        answers.append((await r.json())["payments"][0]["exception"])
        got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
        assert got["status"] == ("expired" if job_ran else "open") and got["amount_paid"] == 0
    assert answers == ["invoice_expired", "invoice_expired"]
    assert len(await exceptions(api, treasury, reason="invoice_expired")) == 2
    assert (await balances(api.dsn))["suspense:unmatched:KHR"] == -100000


@pytest.mark.parametrize("paid_at, job_ran", [
    (datetime(2020, 1, 1, tzinfo=UTC), True),                  # long before the invoice existed
    (datetime(2000, 1, 1, tzinfo=UTC), False),
    (datetime.now(UTC) + timedelta(hours=1), False),           # after it reached us
])
async def test_a_payment_time_that_cannot_be_true_is_held_for_treasury_and_booked_when_received(
        api, portal, treasury, invoice_body, paid_at, job_ran):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    if job_ran:
        conn = await asyncpg.connect(api.dsn)
        await conn.execute("UPDATE invoices SET status='expired', expired_at=now(), expires_at=now() - interval '1 s'"
                           " WHERE id=$1", inv["id"])
        await conn.close()
    before = datetime.now(UTC)
    r = await pay(api.client, inv, paid_at=paid_at)
    assert r.status == 200, await r.text()
    assert (await r.json())["payments"][0]["exception"] == "paid_at_implausible"
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == ("expired" if job_ran else "open") and got["amount_paid"] == 0
    [exc] = await exceptions(api, treasury, reason="paid_at_implausible")
    assert exc["amount"] == 50000 and exc["invoice_id"] == inv["id"]
    assert datetime.fromisoformat(exc["evidence"]["times"]["paid_at"]) == paid_at
    assert (await balances(api.dsn))["suspense:unmatched:KHR"] == -50000
    conn = await asyncpg.connect(api.dsn)
    try:
        entry = await conn.fetchrow("SELECT e.effective_at, p.paid_at FROM ledger_entries e "
                                    "JOIN payments p ON p.id = e.payment_id")
    finally:
        await conn.close()
    # The journal is dated when the money reached us; the payment keeps what the provider said, as evidence.
    assert before - timedelta(seconds=5) <= entry["effective_at"] <= datetime.now(UTC)
    assert entry["paid_at"] == paid_at
    # Treasury can still give it to the invoice once checked.
    r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury, json={
        "action": "match_to_invoice", "invoice_id": inv["id"], "note": "bank confirms it was paid today"})
    assert r.status == 200, await r.text()
    assert (await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json())["status"] == "paid"


async def test_a_code_we_never_issued_is_unknown_even_when_its_bill_number_names_an_invoice(api, portal, treasury,
                                                                                          invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    r = await pay(api.client, inv, md5="f" * 32)
    assert r.status == 200, await r.text()
    out = (await r.json())["payments"][0]
    assert out["exception"] == "unknown_khqr" and out["invoice_id"] is None
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["status"] == "open" and got["amount_paid"] == 0 and got["payments"] == []
    [exc] = await exceptions(api, treasury, reason="unknown_khqr")
    assert exc["amount"] == 50000 and exc["evidence"]["khqr_md5"] == "f" * 32
    assert exc["evidence"]["invoice_by_bill_number"]["id"] == inv["id"]  # for treasury to match it, if right
    assert (await balances(api.dsn))["suspense:unmatched:KHR"] == -50000


async def test_a_notice_without_an_md5_is_still_matched_by_its_bill_number(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    body = json.loads(sandbox_body(inv))
    body["md5"] = None
    raw = json.dumps(body).encode()
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=raw, headers=sandbox_headers(raw))
    assert (await r.json())["payments"][0]["exception"] is None
    assert (await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json())["status"] == "paid"


async def test_a_second_notice_that_contradicts_a_captured_one_is_raised_once_and_booked_never(api, portal, treasury,
                                                                                             invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    at = datetime.now(UTC)
    first = await pay(api.client, inv, txid="TX-C", paid_at=at)
    assert (await first.json())["payments"][0]["new"] is True
    ledger_before = await balances(api.dsn)
    answers = []
    # A conflicting notice, the same again, a plain retry, another: each signed anew, as a provider retries. Signed
    # i seconds ahead (within the allowed skew), never at the first callback's second: signed i seconds back, the
    # plain retry (the first's very body) was a replay whenever these requests began 3 s after it (a slow CI run)
    for i, amount in enumerate((999999, 999999, 50000, 777), start=1):
        body = sandbox_body(inv, txid="TX-C", amount=amount, paid_at=at)
        r = await api.client.post("/v1/providers/sandbox/callbacks", data=body,
                                  headers=sandbox_headers(body, t=int(time.time()) + i))
        assert r.status == 200, await r.text()
        answers.append((await r.json())["payments"][0])
    assert [a["new"] for a in answers] == [False] * 4
    assert [a["exception"] for a in answers] == ["conflicting_notice", "conflicting_notice", None,
                                                 "conflicting_notice"]
    assert {a["payment_id"] for a in answers} == {(await first.json())["payments"][0]["payment_id"]}
    assert await balances(api.dsn) == ledger_before  # nothing booked twice
    raised = await exceptions(api, treasury, reason="conflicting_notice")
    assert sorted(e["evidence"]["notice"]["amount"] for e in raised) == [777, 999999]  # once per distinct notice
    for e in raised:
        assert e["evidence"]["captured_notice"]["amount"] == 50000 and e["evidence"]["fields"] == ["amount"]
        assert e["payment_id"] == answers[0]["payment_id"] and e["invoice_id"] == inv["id"]
    conn = await asyncpg.connect(api.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE type = "
                                   "'reconciliation.exception_opened'") == 2
    finally:
        await conn.close()
    # Nothing of it was booked, so nothing can be moved: treasury closes it once checked.
    e = raised[0]
    r = await api.client.post(f"/v1/reconciliation/exceptions/{e['id']}/resolve", headers=treasury,
                              json={"action": "refund_due", "note": "x"})
    assert r.status == 422
    r = await api.client.post(f"/v1/reconciliation/exceptions/{e['id']}/resolve", headers=treasury,
                              json={"action": "write_off", "note": "provider confirms 50,000"})
    assert r.status == 200, await r.text()
    assert (await r.json())["postings"] == []
    assert await balances(api.dsn) == ledger_before


@pytest.mark.parametrize("valid_first", [True, False])
async def test_a_signature_header_sent_twice_is_refused_and_both_values_are_kept(api, portal, invoice_body,
                                                                                 valid_first):
    from multidict import CIMultiDict

    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    valid = sandbox_headers(body)["Sandbox-Signature"]
    invalid = sandbox_headers(body, secret="not-the-secret")["Sandbox-Signature"]
    sent = [valid, invalid] if valid_first else [invalid, valid]
    headers = CIMultiDict({"Content-Type": "application/json"})
    for v in sent:
        headers.add("Sandbox-Signature", v)
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=headers)
    assert r.status == 401, await r.text()
    assert "given 2 times" in (await r.json())["detail"]
    conn = await asyncpg.connect(api.dsn)
    try:
        row = await conn.fetchrow("SELECT state, reason, headers FROM provider_inbox")
        assert await conn.fetchval("SELECT count(*) FROM payments") == 0
    finally:
        await conn.close()
    assert row["state"] == "rejected" and "given 2 times" in row["reason"]
    assert json.loads(row["headers"])["Sandbox-Signature"] == sent  # every value, in the order received
    assert json.loads(row["headers"])["Content-Type"] == "application/json"  # one value: a string, as before


async def test_a_row_stored_before_repeated_headers_were_kept_is_still_processed(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    conn = await asyncpg.connect(api.dsn)
    try:
        # The old form: one string per header name.
        inbox_id = await conn.fetchval(
            "INSERT INTO provider_inbox (provider, received_at, headers, body, next_attempt_at) "
            "VALUES ('sandbox', now(), $1::text::jsonb, $2, now() - interval '1 second') RETURNING id",
            json.dumps(sandbox_headers(body)), body)
        assert await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS]) == "processed 1 of 1 inbox rows"
        assert await conn.fetchval("SELECT state FROM provider_inbox WHERE id = $1", inbox_id) == "processed"
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    finally:
        await conn.close()


async def test_a_replayed_callback_is_refused_and_kept_and_a_retry_signed_anew_is_processed(api, portal, treasury,
                                                                                            invoice_body):
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    body = sandbox_body(inv, txid="TX-R")
    now = int(time.time())
    headers = sandbox_headers(body, t=now)
    first = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=headers)
    assert first.status == 200, await first.text()
    first_id = (await first.json())["inbox_id"]
    again = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=headers)  # inside 300 s
    assert again.status == 409 and again.content_type == "application/problem+json"
    problem = await again.json()
    assert problem["type"] == "urn:paysvc:problem:callback-replayed" and problem["first_inbox_id"] == first_id
    retry = await api.client.post("/v1/providers/sandbox/callbacks", data=body,
                                  headers=sandbox_headers(body, t=now + 1))   # the provider's own retry
    assert retry.status == 200, await retry.text()
    assert (await retry.json())["payments"][0]["new"] is False
    conn = await asyncpg.connect(api.dsn)
    try:
        rows = await conn.fetch("SELECT id, state, reason FROM provider_inbox ORDER BY id")
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 1
    finally:
        await conn.close()
    assert [r["state"] for r in rows] == ["processed", "rejected", "processed"]
    assert rows[1]["id"] == problem["inbox_id"] and f"inbox row {first_id}" in rows[1]["reason"]
    assert await exceptions(api, treasury) == []


async def test_a_forged_copy_sent_first_does_not_get_the_genuine_callback_refused_as_its_replay(
        api, portal, invoice_body):
    # Found by review: the replay key was taken from any callback, so a copy of a signed timestamp and body
    # with a bad signature, stored first, used up the key and the genuine notice got 409: money that moved was
    # never captured from its callback.
    inv = await new_invoice(api, portal, invoice_body, amount=50000)
    body = sandbox_body(inv, txid="TX-F")
    now = int(time.time())
    genuine = sandbox_headers(body, t=now)
    forged = {**genuine, "Sandbox-Signature": f"t={now},v1={'0' * 64}"}
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=forged)
    assert r.status == 401, await r.text()
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=genuine)
    assert r.status == 200, await r.text()
    assert (await r.json())["payments"][0]["new"] is True
    again = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=genuine)
    assert again.status == 409  # the genuine message itself is still refused when replayed
    conn = await asyncpg.connect(api.dsn)
    try:
        assert [x["state"] for x in await conn.fetch("SELECT state FROM provider_inbox ORDER BY id")] == [
            "rejected", "processed", "rejected"]
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
    finally:
        await conn.close()


async def test_of_identical_signed_callbacks_sent_at_once_exactly_one_is_processed(api, portal, invoice_body):
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    headers = sandbox_headers(body)
    rs = await asyncio.gather(*(api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=headers)
                                for _ in range(50)))
    # 50 byte-for-byte identical callbacks at once: one payment, one journal entry; the other 49 are replays
    assert sorted(r.status for r in rs) == [200] + [409] * 49, [r.status for r in rs]
    conn = await asyncpg.connect(api.dsn)
    try:
        states = [r["state"] for r in await conn.fetch("SELECT state FROM provider_inbox ORDER BY id")]
        assert sorted(states) == ["processed"] + ["rejected"] * 49
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 1
    finally:
        await conn.close()


async def test_finding_a_replay_is_one_index_probe(api):
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute("SET enable_seqscan = off")  # a plan that can avoid the table must not need it
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) SELECT id FROM provider_inbox "
                                   "WHERE provider = 'sandbox' AND replay_key = '\\x00'::bytea")
    finally:
        await conn.close()
    assert "provider_inbox_replay" in json.dumps(plan)


@pytest.mark.parametrize("respell", [
    lambda h: h.replace(",v1=", ", v1="),                 # spaces around a part
    lambda h: h.split("v1=")[0] + "v1=" + h.split("v1=")[1].upper(),  # the hex in capitals
    lambda h: h + ",v1=" + "0" * 64,                      # one more (wrong) signature beside the right one
    lambda h: " " + h,                                     # leading space
])
async def test_a_replay_is_refused_however_its_signature_header_is_written(api, portal, invoice_body, respell):
    """Found by review: the replay key hashed the header's text, so the same signed message with its header
    written another way (all of which verify) was processed again instead of refused."""
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    headers = sandbox_headers(body)
    first = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=headers)
    assert first.status == 200, await first.text()
    again = {**headers, "Sandbox-Signature": respell(headers["Sandbox-Signature"])}
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=again)
    assert r.status == 409, await r.text()
    conn = await asyncpg.connect(api.dsn)
    try:
        assert [x["state"] for x in await conn.fetch("SELECT state FROM provider_inbox ORDER BY id")] == [
            "processed", "rejected"]
    finally:
        await conn.close()


async def test_an_exception_opened_at_capture_is_dated_its_business_day(api, portal, treasury, invoice_body):
    """Found by review: exceptions opened at capture had no business date until an import of their provider
    for that day gave them one, so a day's page and GET /v1/reconciliation/exceptions?business_date= left out
    the money held in suspense on exactly the days whose file had not come. They take the business day the
    payment is booked in (Asia/Phnom_Penh, the configured cut-off)."""
    from paysvc.settlement_days import business_date, parse_cutoff
    from paysvc.web import SETTINGS

    inv = await new_invoice(api, portal, invoice_body, amount=30000)
    r = await pay(api.client, inv, amount=1000)
    assert (await r.json())["payments"][0]["exception"] == "underpaid"
    day = business_date(datetime.now(UTC), parse_cutoff(api.client.app[SETTINGS].business_day_cutoff))
    [exc] = await exceptions(api, treasury, business_date=day.isoformat(), reason="underpaid")
    assert exc["invoice_id"] == inv["id"] and exc["business_date"] == day.isoformat()
    assert await exceptions(api, treasury, business_date=(day - timedelta(days=1)).isoformat()) == []


async def test_ledger_reconcile_finds_a_payment_booked_otherwise_than_recorded(api, portal, invoice_body):
    """Found by an auditor's walk-through: verify checks the ledger against itself only; a payment row changed
    (the service role could update payments, before 0052) or a capture entry with no payment behind it went unseen."""
    import subprocess
    import sys

    from tests.conftest import TEST_PII_KEYS

    def reconcile() -> subprocess.CompletedProcess:
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PAYSVC_")}
        env.update(PAYSVC_DATABASE_URL=api.dsn, PAYSVC_PII_KEYS=TEST_PII_KEYS)
        return subprocess.run([sys.executable, "-m", "paysvc", "ledger", "reconcile"], env=env, capture_output=True,
                              text=True, timeout=60)

    exact = await new_invoice(api, portal, invoice_body, amount=50000)
    short = await new_invoice(api, portal, invoice_body, amount=50000)
    assert (await pay(api.client, exact, txid="TX-EXACT")).status == 200
    assert (await pay(api.client, short, txid="TX-SHORT", amount=20000)).status == 200   # held in suspense
    ok = await asyncio.to_thread(reconcile)
    assert ok.returncode == 0 and "each of the 2 payments has one capture entry" in ok.stdout, ok.stdout + ok.stderr
    conn = await asyncpg.connect(api.dsn)
    try:
        # A payment is kept as written (0052): changed here as a superuser with triggers disabled
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE payments SET amount = 52000, applied_amount = 52000 WHERE provider_transaction_id "
                           "= 'TX-EXACT'")
        bad = await asyncio.to_thread(reconcile)
        assert bad.returncode == 1 and "are not the payment's" in bad.stdout, bad.stdout + bad.stderr
        await conn.execute("UPDATE payments SET amount = 50000, applied_amount = 50000 WHERE provider_transaction_id "
                           "= 'TX-EXACT'")
        await conn.execute("SET session_replication_role = DEFAULT")
        import ledger
        await ledger.post_entry(conn, ledger.entries.payment_captured(
            provider="sandbox", agency="MOI", amount=7000, currency="KHR", effective_at=datetime.now(UTC),
            invoice_id=exact["id"], payment_id="pay_forged"))
        bad = await asyncio.to_thread(reconcile)
        assert bad.returncode == 1 and "payment pay_forged" in bad.stdout and "names no payment" in bad.stdout
        # A capture corrected (reversed, posted again) is one capture; reversed alone, none (found by review)
        forged = await conn.fetchval("SELECT id FROM ledger_entries WHERE payment_id = 'pay_forged'")
        await ledger.reverse_entry(conn, forged, description="forged", effective_at=datetime.now(UTC))
        exact_capture = await conn.fetchval(
            "SELECT e.id FROM ledger_entries e JOIN payments p ON p.id = e.payment_id "
            "WHERE p.provider_transaction_id = 'TX-EXACT' AND e.kind = 'payment.captured'")
        await ledger.reverse_entry(conn, exact_capture, description="correction", effective_at=datetime.now(UTC))
        bad = await asyncio.to_thread(reconcile)
        assert bad.returncode == 1 and "the payment has no capture entry" in bad.stdout, bad.stdout
        assert "pay_forged" not in bad.stdout
        paid = await conn.fetchrow("SELECT id, invoice_id FROM payments WHERE provider_transaction_id = 'TX-EXACT'")
        again = ledger.entries.payment_captured(
            provider="sandbox", agency="MOI", amount=50000, currency="KHR", effective_at=datetime.now(UTC),
            invoice_id=paid["invoice_id"], payment_id=paid["id"])
        # posted again under its own key (the capture's key would return the reversed entry)
        await ledger.post_entry(conn, again.model_copy(update={"idempotency_key": f"correction:{paid['id']}"}))
        ok = await asyncio.to_thread(reconcile)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # The suspense capture undone, then the undoing undone: it books the payment again (found by review)
        held = await conn.fetchval("SELECT e.id FROM ledger_entries e JOIN payments p ON p.id = e.payment_id "
                                   "WHERE p.provider_transaction_id = 'TX-SHORT' AND e.kind = 'payment.suspense'")
        undo = await ledger.reverse_entry(conn, held, description="by mistake", effective_at=datetime.now(UTC))
        assert (await asyncio.to_thread(reconcile)).returncode == 1
        await ledger.reverse_entry(conn, undo.id, description="mistake undone", effective_at=datetime.now(UTC))
        ok = await asyncio.to_thread(reconcile)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        await conn.close()


async def test_callbacks_cannot_fill_the_inbox(api, portal, invoice_body):
    """Found by a security review: every unauthenticated request was stored for good with all its headers (90
    padding headers of 4 KB made rows of about 440 KB)."""
    from datetime import timedelta

    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    padded = {**sandbox_headers(body), **{f"X-Pad-{n}": "x" * 4000 for n in range(5)}}
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=padded)
    assert r.status == 431 and "a callback's must fit in 16384" in (await r.json())["detail"]
    conn = await asyncpg.connect(api.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM provider_inbox") == 0
        # Rejected callbacks are evidence for a while, then go; nothing else does.
        bad = sandbox_headers(body, secret="not-the-secret")
        for _ in range(2):
            assert (await api.client.post("/v1/providers/sandbox/callbacks", data=body, headers=bad)).status == 401
        assert (await pay(api.client, inv, txid="TX-KEPT")).status == 200
        await conn.execute("UPDATE provider_inbox SET received_at = now() - interval '91 days'")
        await conn.execute("UPDATE provider_inbox SET received_at = now() WHERE id = (SELECT min(id) FROM "
                           "provider_inbox WHERE state = 'rejected')")
        said = await inbox.prune_rejected(api.client.app[POOL], retention=timedelta(days=90))
        assert said == "pruned 1 rejected callbacks"
        left = await conn.fetch("SELECT state FROM provider_inbox ORDER BY id")
        assert [r["state"] for r in left] == ["rejected", "processed"]
    finally:
        await conn.close()


async def test_the_simulator_reports_a_code_that_ran_out_only_when_told_late(api, portal, invoice_body, monkeypatch):
    """Found by a treasury walk-through: the README gives `sandbox pay --code` as how to try the exceptions, but an
    expired code was refused as a bank app refuses it (in milliseconds since 1970), so invoice_expired could not
    be tried. `--late` reports it as a bank that reports late would."""
    from paysvc import cli_sandbox, invoicing

    monkeypatch.setattr(invoicing, "now_utc", lambda: datetime.now(UTC) - timedelta(hours=2))
    inv = await new_invoice(api, portal, invoice_body, amount=1000, expires_in=3600)  # ran out an hour ago
    monkeypatch.undo()
    settings, base = api.client.app[SETTINGS], str(api.client.make_url("")).rstrip("/")
    with pytest.raises(cli_sandbox.SandboxError) as refused:
        await cli_sandbox.pay(settings, inv["id"], None, base, inv["khqr"]["payload"])
    message = str(refused.value)
    assert "a bank app would refuse this code: the code expired at 20" in message and " UTC, before now" in message
    assert "--late" in message and " ms" not in message
    with pytest.raises(cli_sandbox.SandboxError) as no_code:
        await cli_sandbox.pay(settings, inv["id"], None, base)
    assert "--code" in str(no_code.value) and "--late" in str(no_code.value)
    # --late given, no --code (a portal developer's walk-through was told to add the --late it had given)
    with pytest.raises(cli_sandbox.SandboxError) as late_only:
        await cli_sandbox.pay(settings, inv["id"], None, base, late=True)
    assert "--late needs the code itself" in str(late_only.value) and "with --code" in str(late_only.value)
    assert "add --late" not in str(late_only.value)

    out = await cli_sandbox.pay(settings, inv["id"], None, base, inv["khqr"]["payload"], late=True)
    assert out["payments"][0]["exception"] == "invoice_expired"
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert got["amount_paid"] == 0 and [p["status"] for p in got["payments"]] == ["exception"]
