"""The invoicing API against a real PostgreSQL: the contract's status codes, idempotency, isolation."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from paysvc import khqr
from paysvc.db import init_connection
from paysvc.errors import Unauthenticated
from paysvc.invoicing import expire_due


async def test_create_returns_invoice_with_a_valid_dynamic_khqr(api, invoice_body):
    h = await api.portal("MOI")
    body = invoice_body(amount=50000, line_items=[
        {"code": "PASS", "description": "Passport", "amount": 45000},
        {"code": "SVC", "description": "Service", "amount": 5000},
    ], payer={"name": "Sok Dara", "phone": "+855 12 345 678", "email": "dara@example.com"}, metadata={"case": "A1"})
    r = await api.client.post("/v1/invoices", json=body, headers=h)
    assert r.status == 201, await r.text()
    inv = await r.json()
    assert inv["id"].startswith("inv_") and len(inv["id"]) >= 30
    assert r.headers["Location"] == f"/v1/invoices/{inv['id']}"
    assert inv["status"] == "open" and inv["amount"] == 50000 and inv["amount_paid"] == 0
    assert inv["currency"] == "KHR" and inv["reference"] == body["reference"]
    assert inv["payer"] == body["payer"]
    assert inv["pay_url"] == f"http://paysvc.test/pay/{inv['id']}"
    assert inv["qr_png_url"].endswith(f"/v1/invoices/{inv['id']}/qr.png")

    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    code = khqr.decode(inv["khqr"]["payload"], now_ms=now_ms)  # a bank app would accept it now
    assert code.point_of_initiation == "12"
    assert code.amount == 50000 and code.currency == "KHR"
    assert code.bakong_account_id == "moi@nbcq" and code.merchant_id is None
    assert code.merchant_category_code == "9399"
    assert code.bill_number == inv["bill_number"]
    assert code.merchant_name_alternate == "ក្រសួងមហាផ្ទៃ" and code.language_preference == "km"
    assert khqr.md5(inv["khqr"]["payload"]) == inv["khqr"]["md5"]
    assert code.expires_at_ms - code.created_at_ms == 10 * 60 * 1000


async def test_usd_invoice_and_tag30_agency(api, invoice_body):
    h = await api.portal("GDT", merchant_id="GDT001", acquiring_bank="ABA Bank")
    r = await api.client.post("/v1/invoices", json=invoice_body(currency="USD", amount=1250), headers=h)
    assert r.status == 201, await r.text()
    code = khqr.decode((await r.json())["khqr"]["payload"])
    assert code.currency == "USD" and code.amount == 1250 and code.merchant_id == "GDT001"
    assert "540512.50" in (await r.json())["khqr"]["payload"]


async def test_payer_data_is_encrypted_at_rest(api, invoice_body):
    h = await api.portal("MOI")
    r = await api.client.post("/v1/invoices", json=invoice_body(payer={"name": "Sok Dara", "phone": "012345678"}),
                              headers=h)
    inv = await r.json()
    conn = await asyncpg.connect(api.dsn)
    row = await conn.fetchrow("SELECT payer_key_id, payer_ciphertext, i::text AS whole FROM invoices i WHERE id=$1",
                              inv["id"])
    await conn.close()
    assert row["payer_key_id"] == "t1"
    assert b"Sok Dara" not in row["payer_ciphertext"] and "Sok Dara" not in row["whole"]
    assert "012345678" not in row["whole"]


@pytest.mark.parametrize("patch, field", [
    ({"amount": 12.5}, "amount"),
    ({"amount": "100"}, "amount"),
    ({"amount": 0}, "amount"),
    ({"currency": "EUR"}, "currency"),
    ({"line_items": [{"code": "A", "description": "a", "amount": 10}]}, ""),
    ({"expires_in": 31 * 86400}, "expires_in"),
    ({"metadata": {f"k{i}": "v" for i in range(21)}}, "metadata"),
    ({"payer": {"email": "not-an-email"}}, "payer.email"),
    ({"unknown": 1}, "unknown"),
    ({"reference": "has space"}, "reference"),
    ({"currency": "USD", "amount": 10**12}, ""),
])
async def test_invalid_bodies_get_422_with_field_errors(api, invoice_body, patch, field):
    h = await api.portal("MOI")
    r = await api.client.post("/v1/invoices", json=invoice_body(**patch), headers=h)
    assert r.status == 422, await r.text()
    assert r.content_type == "application/problem+json"
    p = await r.json()
    assert p["type"] == "urn:paysvc:problem:validation-error" and p["detail"]
    assert any(e["field"].startswith(field) for e in p["errors"]), p
    # the detail itself says what to fix: the first error, and how many more (a walk-through found it generic)
    first = p["errors"][0]
    assert p["detail"].startswith(f"fields not valid: {first['field']}: {first['message']}"), p
    assert ("more: see errors" in p["detail"]) == (len(p["errors"]) > 1)


async def test_malformed_json_wrong_type_and_auth_errors(api, invoice_body):
    h = await api.portal("MOI")
    r = await api.client.post("/v1/invoices", data=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["type"].endswith("malformed-request")
    r = await api.client.post("/v1/invoices", data=b"a=b", headers={**h, "Content-Type": "text/plain"})
    assert r.status == 415
    r = await api.client.post("/v1/invoices", data=b"[" * 70000, headers={**h, "Content-Type": "application/json"})
    assert r.status == 413
    r = await api.client.post("/v1/invoices", json=invoice_body())
    assert r.status == 401 and r.content_type == "application/problem+json"
    r = await api.client.post("/v1/invoices", json=invoice_body(), headers={"Authorization": "Bearer psk_x_y"})
    assert r.status == 401
    read_only = {"Authorization": f"Bearer {await api.key('MOI', scopes=['invoices:read'])}"}
    r = await api.client.post("/v1/invoices", json=invoice_body(), headers=read_only)
    assert r.status == 403
    r = await api.client.get("/v1/nothing-here")
    assert r.status == 404 and r.content_type == "application/problem+json"
    r = await api.client.delete("/v1/invoices")
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD, POST"  # HEAD wherever GET (RFC 9110)
    assert "allowed: GET, HEAD, POST" in (await r.json())["detail"]


async def test_duplicate_reference_is_409(api, invoice_body):
    h = await api.portal("MOI")
    body = invoice_body()
    first = await (await api.client.post("/v1/invoices", json=body, headers=h)).json()
    r = await api.client.post("/v1/invoices", json=invoice_body(reference=body["reference"]), headers=h)
    assert r.status == 409
    assert (await r.json())["invoice_id"] == first["id"]


async def test_idempotency_replays_first_response_and_refuses_other_body(api, invoice_body):
    h = await api.portal("MOI")
    body = invoice_body()
    hk = {**h, "Idempotency-Key": "abc-1"}
    r1 = await api.client.post("/v1/invoices", json=body, headers=hk)
    r2 = await api.client.post("/v1/invoices", json=body, headers=hk)
    assert r1.status == r2.status == 201
    assert await r1.json() == await r2.json()
    assert r2.headers.get("Idempotent-Replayed") == "true"
    r3 = await api.client.post("/v1/invoices", json=invoice_body(), headers=hk)
    assert r3.status == 422 and (await r3.json())["type"].endswith("idempotency-key-reused")
    # another agency's identical key is its own key space
    h2 = await api.portal("GDT")
    r4 = await api.client.post("/v1/invoices", json=body, headers={**h2, "Idempotency-Key": "abc-1"})
    assert r4.status == 201 and (await r4.json())["id"] != (await r1.json())["id"]
    # An answer kept before invoices named their agency is replayed with it (found by review)
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute("UPDATE idempotency_keys SET response = response - 'agency' WHERE key = 'abc-1'")
    finally:
        await conn.close()
    r5 = await api.client.post("/v1/invoices", json=body, headers=hk)
    assert r5.status == 201 and await r5.json() == await r1.json() and (await r5.json())["agency"] == "MOI"


async def test_twenty_identical_requests_at_once_make_one_invoice(api, invoice_body):
    h = await api.portal("MOI")
    body = invoice_body()
    hk = {**h, "Idempotency-Key": "burst"}
    responses = await asyncio.gather(*(api.client.post("/v1/invoices", json=body, headers=hk) for _ in range(20)))
    statuses = sorted(r.status for r in responses)
    ids = {(await r.json())["id"] for r in responses if r.status == 201}
    assert set(statuses) <= {201, 409} and statuses.count(201) >= 1, statuses
    assert len(ids) == 1
    for r in responses:
        if r.status == 409:
            assert (await r.json())["type"].endswith("idempotency-in-progress")
    conn = await asyncpg.connect(api.dsn)
    assert await conn.fetchval("SELECT count(*) FROM invoices") == 1
    await conn.close()


async def test_in_progress_request_gets_409(api, invoice_body):
    """While the first request holds the key (its transaction is open), a second one is told to wait."""
    h = await api.portal("MOI")
    conn = await asyncpg.connect(api.dsn)
    tx = conn.transaction()
    await tx.start()
    assert await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))", "MOI:slow")
    r = await api.client.post("/v1/invoices", json=invoice_body(), headers={**h, "Idempotency-Key": "slow"})
    assert r.status == 409 and r.headers["Retry-After"] == "1"
    await tx.rollback()
    r = await api.client.post("/v1/invoices", json=invoice_body(), headers={**h, "Idempotency-Key": "slow"})
    assert r.status == 201
    await conn.close()


async def test_agency_never_sees_another_agencys_invoice(api, invoice_body):
    moi = await api.portal("MOI")
    gdt = await api.portal("GDT")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=moi)).json()
    for method, path in [("GET", f"/v1/invoices/{inv['id']}"), ("POST", f"/v1/invoices/{inv['id']}/cancel"),
                         ("GET", f"/v1/invoices/{inv['id']}/khqr")]:
        r = await api.client.request(method, path, headers=gdt)
        assert r.status == 404, (method, path, r.status)
    listed = await (await api.client.get("/v1/invoices", headers=gdt)).json()
    assert listed["data"] == []
    assert (await api.client.get(f"/v1/invoices/{inv['id']}", headers=moi)).status == 200


async def test_revoked_key_stops_working(api, invoice_body):
    from paysvc.auth import revoke_key

    await api.agency("MOI")
    key = await api.key("MOI")
    h = {"Authorization": f"Bearer {key}"}
    assert (await api.client.get("/v1/invoices", headers=h)).status == 200
    conn = await asyncpg.connect(api.dsn)
    assert await revoke_key(conn, key)
    await conn.close()
    from paysvc.web import AUTH

    api.client.app[AUTH]._cache.clear()  # the cache keeps a key for at most 5 s; skip the wait
    assert (await api.client.get("/v1/invoices", headers=h)).status == 401


async def test_made_up_key_ids_never_send_a_real_keys_requests_back_to_the_database(api, monkeypatch):
    # Found by a security review: found keys and ids looked up in vain shared one cache, cleared when it held
    # 10,000 ids, so anyone sending made-up ids flushed the real keys from it.
    import paysvc.auth
    from paysvc.auth import _UNKNOWN_IDS, Authenticator

    # What is tested is that the two are kept apart, not how long an entry lives: on a slow machine the 10,005
    # lookups below took longer than the cache's 5 s, and the real key was looked up again because it had expired.
    monkeypatch.setattr(paysvc.auth, "_CACHE_SECONDS", 3600.0)

    class CountingPool:  # the real pool, with its lookups counted
        def __init__(self, pool):
            self.pool, self.lookups = pool, 0

        async def fetchrow(self, *args):
            self.lookups += 1
            return await self.pool.fetchrow(*args)

    await api.agency("MOI")
    key = await api.key("MOI")
    pool = await asyncpg.create_pool(api.dsn, min_size=1, max_size=2)
    try:
        auth = Authenticator(CountingPool(pool))
        counting = auth._pool
        assert (await auth.authenticate(f"Bearer {key}")).agency_code == "MOI" and counting.lookups == 1
        for n in range(_UNKNOWN_IDS + 5):
            with pytest.raises(Unauthenticated):
                await auth.authenticate(f"Bearer psk_made{n}up_secret")
        assert counting.lookups == 1 + _UNKNOWN_IDS + 5
        await auth.authenticate(f"Bearer {key}")
        assert counting.lookups == 1 + _UNKNOWN_IDS + 5  # still known: no lookup
        with pytest.raises(Unauthenticated):  # an id looked up in vain moments ago is not looked up again
            await auth.authenticate(f"Bearer psk_made{_UNKNOWN_IDS + 4}up_secret")
        assert counting.lookups == 1 + _UNKNOWN_IDS + 5
        with pytest.raises(Unauthenticated):  # nor is a known id with a wrong secret
            await auth.authenticate(f"Bearer {key[:-3]}xyz")
        with pytest.raises(Unauthenticated):  # nor an id longer than any key's (they are 12 characters)
            await auth.authenticate(f"Bearer psk_{'a' * 33}_secret")
        assert counting.lookups == 1 + _UNKNOWN_IDS + 5 and len(auth._unknown) <= _UNKNOWN_IDS
    finally:
        await pool.close()


async def test_treasury_reads_every_agencys_invoices_without_their_payer(api, portal, treasury, invoice_body):
    # Found by review: a citizen who calls treasury about an invoice could not be answered from the API; a
    # treasury key now reads any agency's invoice (with its payments), but not the citizen's details.
    from tests.payments_helpers import pay

    mpwt = await api.portal("MPWT")
    mine = await (await api.client.post("/v1/invoices", headers=portal, json=invoice_body(
        reference="PP-1", payer={"name": "Sok Dara", "phone": "+855 12 345 678"}))).json()
    theirs = await (await api.client.post("/v1/invoices", headers=mpwt, json=invoice_body(reference="VT-1"))).json()
    assert (mine["agency"], theirs["agency"], mine["payer"]["name"]) == ("MOI", "MPWT", "Sok Dara")
    await pay(api.client, mine)

    r = await api.client.get(f"/v1/invoices/{mine['id']}", headers=treasury)
    got = await r.json()
    assert r.status == 200 and (got["agency"], got["status"], got["payer"]) == ("MOI", "paid", None), got
    assert len(got["payments"]) == 1 and "Sok Dara" not in await r.text()
    assert (await (await api.client.get(f"/v1/invoices/{mine['id']}", headers=portal)).json())["payer"]["name"] == "Sok Dara"
    assert (await api.client.get("/v1/invoices/inv_nosuchinvoice", headers=treasury)).status == 404
    # read only: no create, cancel, erasure or code with a treasury key
    assert (await api.client.post(f"/v1/invoices/{theirs['id']}/cancel", headers=treasury)).status == 403
    assert (await api.client.post("/v1/invoices", headers=treasury, json=invoice_body())).status == 403
    assert (await api.client.get(f"/v1/invoices/{theirs['id']}/khqr", headers=treasury)).status == 403

    async def listed(headers, **params):
        r = await api.client.get("/v1/invoices", params=params, headers=headers)
        return r.status, await r.json()

    status, body = await listed(treasury)
    assert status == 422 and "agency=CODE" in body["detail"] and "bill_number=" in body["detail"], body
    status, body = await listed(treasury, agency="MPWT")
    assert status == 200 and [(i["id"], i["agency"]) for i in body["data"]] == [(theirs["id"], "MPWT")]
    status, body = await listed(treasury, bill_number=mine["bill_number"])
    assert status == 200 and [i["id"] for i in body["data"]] == [mine["id"]]
    assert (await listed(treasury, bill_number="PS99999999"))[1]["data"] == []
    status, body = await listed(treasury, agency="NOPE")
    assert status == 422 and "no agency 'NOPE'" in body["detail"], body
    status, body = await listed(treasury, agency="MOI", bill_number=theirs["bill_number"])
    assert status == 200 and body["data"] == []  # both filters hold
    # an agency's key: its own only, by bill number too
    assert [i["id"] for i in (await listed(portal, bill_number=mine["bill_number"]))[1]["data"]] == [mine["id"]]
    assert (await listed(portal, bill_number=theirs["bill_number"]))[1]["data"] == []
    status, body = await listed(portal, agency="MPWT")
    assert status == 422 and "MOI's invoices only" in body["detail"], body
    assert (await listed(portal, agency="MOI"))[0] == 200
    status, body = await listed(portal, bill_number="INV-1")
    assert status == 422 and body["errors"][0]["field"] == "bill_number", body


async def test_list_filters_and_cursor_pagination(api, invoice_body):
    h = await api.portal("MOI")
    ids, created = [], []
    for i in range(7):
        inv = await (await api.client.post("/v1/invoices", json=invoice_body(reference=f"R{i}"), headers=h)).json()
        ids.append(inv["id"])
        created.append((datetime.fromisoformat(inv["created_at"]), inv["id"]))
        if i == 4:
            await asyncio.sleep(0.002)  # times are kept to the millisecond: R5 and R6 are surely newer
    await api.client.post(f"/v1/invoices/{ids[0]}/cancel", headers=h)
    seen, cursor = [], None
    while True:
        q = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        page = await (await api.client.get("/v1/invoices", params=q, headers=h)).json()
        seen += [i["id"] for i in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    # Newest first, each once. Invoices made within the same millisecond (times are kept to the millisecond,
    # as KHQR carries them) come in id order, the documented tie-break.
    assert seen == [i for _, i in sorted(created, reverse=True)]
    assert seen[:2] == [ids[6], ids[5]]
    page = await (await api.client.get("/v1/invoices", params={"status": "cancelled"}, headers=h)).json()
    assert [i["id"] for i in page["data"]] == [ids[0]]
    page = await (await api.client.get("/v1/invoices", params={"reference": "R3"}, headers=h)).json()
    assert [i["id"] for i in page["data"]] == [ids[3]]
    # A reference no invoice can have is refused, not answered "none" (a portal developer's walk-through: an
    # unencoded + read as a space, and the empty list read as "no such invoice")
    for bad, says in (("/v1/invoices?reference=PP+2026/1", "a + in a query string reads as a space"),
                      ("/v1/invoices?reference=", "1-64 printable ASCII"),
                      ("/v1/invoices?reference=" + "R" * 65, "1-64 printable ASCII")):
        r = await api.client.get(bad, headers=h)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == "reference" and says in str(body), body
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    page = await (await api.client.get("/v1/invoices", params={"created_from": future}, headers=h)).json()
    assert page["data"] == []
    r = await api.client.get("/v1/invoices", params={"limit": "201"}, headers=h)
    assert r.status == 422
    r = await api.client.get("/v1/invoices", params={"cursor": "!!!"}, headers=h)
    assert r.status == 400
    r = await api.client.get("/v1/invoices", params={"status": "bogus"}, headers=h)
    assert r.status == 422


async def test_cancel_open_then_refuse_second_cancel(api, invoice_body):
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(payer={"name": "Sok Dara"}), headers=h)).json()
    r = await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)
    assert r.status == 200
    out = await r.json()
    assert out["status"] == "cancelled" and out["khqr"] is None and out["cancelled_at"]
    assert out["payer"]["name"] == "Sok Dara" and out["payments"] == []  # the whole invoice, as GET gives it
    r = await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)
    assert r.status == 409 and (await r.json())["invoice_status"] == "cancelled"
    r = await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)
    assert r.status == 409
    assert (await api.client.get(f"/v1/invoices/{inv['id']}/qr.png")).status == 409


async def test_expired_code_is_replaced_by_a_new_one(api, invoice_body):
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    same = await (await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)).json()
    assert same["md5"] == inv["khqr"]["md5"]
    conn = await asyncpg.connect(api.dsn)
    # Let the current code run out (as if ten minutes had passed).
    await conn.execute("UPDATE khqr_codes SET created_at = created_at - interval '11 minutes', "
                       "expires_at = expires_at - interval '10 minutes' WHERE invoice_id = $1", inv["id"])
    fresh = await (await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)).json()
    assert fresh["md5"] != inv["khqr"]["md5"]
    decoded = khqr.decode(fresh["payload"], now_ms=int(datetime.now(UTC).timestamp() * 1000))
    assert decoded.bill_number == inv["bill_number"]
    assert await conn.fetchval("SELECT count(*) FROM khqr_codes WHERE invoice_id=$1", inv["id"]) == 2
    assert await conn.fetchval("SELECT current_khqr_md5 FROM invoices WHERE id=$1", inv["id"]) == fresh["md5"]
    await conn.close()
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["khqr"]["md5"] == fresh["md5"]


async def test_code_never_outlives_the_invoice(api, invoice_body):
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(expires_in=120), headers=h)).json()
    assert inv["khqr"]["expires_at"] == inv["expires_at"]


async def test_concurrent_refreshes_issue_distinct_codes(api, invoice_body):
    h = await api.portal("MOI")
    invs = [await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json() for _ in range(5)]
    conn = await asyncpg.connect(api.dsn)
    await conn.execute("UPDATE khqr_codes SET created_at = created_at - interval '11 minutes', "
                       "expires_at = expires_at - interval '10 minutes'")
    await conn.close()
    got = await asyncio.gather(*(api.client.get(f"/v1/invoices/{i['id']}/khqr", headers=h)
                                 for i in invs for _ in range(4)))
    bodies = [await r.json() for r in got]
    assert all(r.status == 200 for r in got)
    per_invoice = {}
    for b in bodies:
        per_invoice.setdefault(b["invoice_id"], set()).add(b["md5"])
    assert all(len(v) == 1 for v in per_invoice.values())  # one refresh each, not four
    assert len({b["md5"] for b in bodies}) == 5


async def test_background_expiry_marks_overdue_invoices_and_emits_events(api, invoice_body):
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(expires_in=60), headers=h)).json()
    keep = await (await api.client.post("/v1/invoices", json=invoice_body(), headers=h)).json()
    conn = await asyncpg.connect(api.dsn)
    await conn.execute("UPDATE invoices SET expires_at = now() - interval '1 second', "
                       "created_at = created_at - interval '2 minutes' WHERE id=$1", inv["id"])
    pool = await asyncpg.create_pool(api.dsn, min_size=2, max_size=2, init=init_connection)
    # Two instances at once: each overdue invoice expires exactly once.
    counts = await asyncio.gather(expire_due(pool), expire_due(pool))
    await pool.close()
    assert sorted(counts) == [0, 1]
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
    assert got["status"] == "expired" and got["khqr"] is None and got["expired_at"]
    assert (await (await api.client.get(f"/v1/invoices/{keep['id']}", headers=h)).json())["status"] == "open"
    r = await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)
    assert r.status == 409
    from paysvc.outbox import sequence

    assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE seq IS NULL") == 3  # not numbered yet
    await init_connection(conn)
    assert await sequence(conn) == 3
    rows = await conn.fetch("SELECT type, seq FROM outbox_events ORDER BY seq")
    assert [(r["type"], r["seq"]) for r in rows] == [
        ("invoice.created", 1), ("invoice.created", 2), ("invoice.expired", 3)]
    assert await sequence(conn) == 0  # numbered once
    await conn.close()


async def test_health_ready_metrics(api):
    assert (await api.client.get("/healthz")).status == 200
    r = await api.client.get("/readyz")
    assert r.status == 200 and (await r.json())["database"] == "ok"
    # A database that answers but is not migrated as this version needs is not ready (found by an operator's
    # walk-through: an empty database made again under the same name answered "ready")
    conn = await asyncpg.connect(api.dsn)
    try:
        row = await conn.fetchrow("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM "
                                  "schema_migrations) RETURNING *")
        r = await api.client.get("/readyz")
        body = await r.json()
        last = row["version"]
        assert r.status == 503 and body["schema"].startswith(f"at migration {last - 1}, this version needs {last}")
        await conn.execute("ALTER TABLE schema_migrations RENAME TO schema_migrations_gone")
        r = await api.client.get("/readyz")
        assert r.status == 503 and (await r.json())["schema"].startswith("at migration none"), await r.text()
        await conn.execute("ALTER TABLE schema_migrations_gone RENAME TO schema_migrations")
        await conn.execute("INSERT INTO schema_migrations SELECT * FROM json_populate_record(NULL::schema_migrations, "
                           "$1::json)", json.dumps({k: str(v) for k, v in dict(row).items()}))
        # Migrated past this version (a newer one ran `paysvc migrate`): upgrading this instance is the fix, since
        # `paysvc migrate` refuses a schema it does not know (found by an operator's walk-through).
        await conn.execute("INSERT INTO schema_migrations SELECT * FROM json_populate_record(NULL::schema_migrations, "
                           "$1::json)", json.dumps({**{k: str(v) for k, v in dict(row).items()},
                                                    "version": str(last + 1), "name": "from_a_newer_version"}))
        r = await api.client.get("/readyz")
        body = await r.json()
        assert r.status == 503 and body["schema"] == (f"at migration {last + 1}, newer than this version knows "
                                                      f"({last}): upgrade paysvc on this instance"), body
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", last + 1)
    finally:
        await conn.close()
    assert (await api.client.get("/readyz")).status == 200
    await api.client.get("/v1/invoices/inv_nope", headers={"Authorization": "Bearer psk_x_y"})
    r = await api.client.get("/metrics")
    text = await r.text()
    assert r.status == 200 and "python_info" in text
    # Requests are counted per route template, not per invoice id.
    assert 'paysvc_http_requests_total{method="GET",route="/v1/invoices/{id}",status="401"}' in text
    assert "paysvc_http_request_duration_seconds_bucket" in text
    r = await api.client.get("/healthz", headers={"X-Request-Id": "req-123"})
    assert r.headers["X-Request-Id"] == "req-123"


async def test_openapi_matches_the_real_routes(api):
    spec = await (await api.client.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = set()
    for res in api.client.app.router.resources():
        info = res.get_info()
        path = info.get("path") or info.get("formatter")
        for route in res:
            if route.method != "HEAD":
                served.add((route.method, path))
    assert documented == served
    create = spec["paths"]["/v1/invoices"]["post"]
    schema_ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = schema_ref.rsplit("/", 1)[1]
    body = spec["components"]["schemas"][name]
    assert {"reference", "currency", "amount"} <= set(body["required"])
    # The limits the service enforces, in the schema too (they were in the README only), and each the real one
    from paysvc.invoices import InvoiceCreate, Payer
    assert body["properties"]["amount"]["maximum"] == 10**13 - 1 and body["properties"]["metadata"]["maxProperties"] == 20
    InvoiceCreate(reference="R", description="d", currency="KHR", amount=10**13 - 1)
    with pytest.raises(ValueError, match="too large"):
        InvoiceCreate(reference="R", description="d", currency="KHR", amount=10**13)
    with pytest.raises(ValueError, match="at most 20"):
        InvoiceCreate(reference="R", description="d", currency="KHR", amount=1, metadata={str(i): "" for i in range(21)})
    payer = spec["components"]["schemas"]["Payer"]["properties"]
    assert payer["email"]["maxLength"] == 254
    for email in ("dara@example.com", "ដារ៉ា@example.com.kh"):
        assert re.fullmatch(payer["email"]["pattern"], email) and Payer(email=email).email == email
    for email in ("dara@example", "da ra@example.com"):
        assert not re.fullmatch(payer["email"]["pattern"], email)
        with pytest.raises(ValueError, match="email must"):
            Payer(email=email)
    for phone in payer["phone"]["examples"] + ["012-345-678", "(012) 345.678"]:
        assert re.fullmatch(payer["phone"]["pattern"], phone) and Payer(phone=phone).phone == phone
    for phone in ("12 345 678 x", "+855\n12345678"):
        assert not re.fullmatch(payer["phone"]["pattern"], phone)
        with pytest.raises(ValueError, match="phone must be"):
            Payer(phone=phone)
    # What a portal relies on beyond the bodies (a portal developer's walk-through found none of it documented):
    # headers, the error answers by cause, the image's scale
    assert {"Location", "Idempotent-Replayed", "X-Request-Id"} <= set(create["responses"]["201"]["headers"])
    assert {"400", "401", "403", "409", "413", "415", "422", "503"} <= set(create["responses"])
    assert "Retry-After" in create["responses"]["503"]["headers"]
    cancel = spec["paths"]["/v1/invoices/{id}/cancel"]["post"]["responses"]
    assert "`cancelled` when a cancel already went through" in cancel["409"]["description"] and "404" in cancel
    png = spec["paths"]["/v1/invoices/{id}/qr.png"]["get"]
    [scale] = [p for p in png["parameters"] if p["name"] == "scale"]
    assert (scale["schema"]["minimum"], scale["schema"]["maximum"], scale["schema"]["default"]) == (2, 20, 8)
    assert "409" in png["responses"] and "401" not in png["responses"]            # public, and not once paid
    assert "400" in png["responses"] and "422" not in png["responses"]            # it reads scale itself: 400
    callbacks = spec["paths"]["/v1/providers/{name}/callbacks"]["post"]["responses"]
    assert {"400", "401", "404", "409", "413", "415", "431"} <= set(callbacks)
    conflicts = {(m, p) for p, ops in spec["paths"].items() for m, op in ops.items() if "409" in op["responses"]}
    assert conflicts == {("post", "/v1/invoices"), ("post", "/v1/invoices/{id}/cancel"),     # only where one comes
                         ("get", "/v1/invoices/{id}/khqr"), ("get", "/v1/invoices/{id}/qr.png"),
                         ("get", "/v1/invoices/{id}/qr.svg"), ("post", "/v1/reconciliation/exceptions/{id}/resolve"),
                         ("post", "/v1/settlements"), ("post", "/v1/providers/{name}/callbacks")}


async def test_last_code_of_an_invoice_is_not_reissued_on_every_request(api, invoice_body):
    """In an invoice's last seconds its code ends with the invoice; asking again must not mint new ones."""
    h = await api.portal("MOI")
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(expires_in=60), headers=h)).json()
    conn = await asyncpg.connect(api.dsn)
    end = datetime.now(UTC) + timedelta(seconds=10)
    await conn.execute("UPDATE invoices SET expires_at = $2 WHERE id = $1", inv["id"], end)
    await conn.execute("UPDATE khqr_codes SET expires_at = $2 WHERE invoice_id = $1", inv["id"], end)
    for _ in range(5):
        r = await api.client.get(f"/v1/invoices/{inv['id']}/khqr", headers=h)
        assert r.status == 200
        assert (await r.json())["md5"] == inv["khqr"]["md5"]
    assert await conn.fetchval("SELECT count(*) FROM khqr_codes WHERE invoice_id = $1", inv["id"]) == 1
    await conn.close()


async def test_text_the_database_cannot_store_is_a_400_not_a_500(api, invoice_body):
    h = await api.portal("MOI")
    r = await api.client.get("/v1/invoices/inv_%00x", headers=h)
    assert r.status == 400 and "NUL" in (await r.json())["detail"]
    body = b'{"reference": "N1", "description": "a\\u0000b", "currency": "KHR", "amount": 100}'
    r = await api.client.post("/v1/invoices", data=body, headers={**h, "Content-Type": "application/json"})
    assert r.status == 400 and "NUL" in (await r.json())["detail"]
    body = b'{"reference": "N2", "description": "a\\ud800b", "currency": "KHR", "amount": 100}'
    r = await api.client.post("/v1/invoices", data=body, headers={**h, "Content-Type": "application/json"})
    assert r.status in (400, 422) and r.content_type == "application/problem+json"  # validation may see it first
    assert (await r.json())["detail"]


async def test_idempotency_keys_are_kept_for_the_retention_then_forgotten(api, invoice_body):
    from paysvc.invoicing import prune_idempotency_keys

    h = await api.portal("MOI")
    body = invoice_body()
    first = await (await api.client.post("/v1/invoices", json=body, headers={**h, "Idempotency-Key": "k-old"})).json()
    conn = await asyncpg.connect(api.dsn)
    pool = await asyncpg.create_pool(api.dsn, min_size=1, max_size=1, init=init_connection)
    try:
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '47 hours'")
        assert await prune_idempotency_keys(pool, retention=timedelta(hours=48)) is None  # still kept
        r = await api.client.post("/v1/invoices", json=body, headers={**h, "Idempotency-Key": "k-old"})
        assert (await r.json())["id"] == first["id"]
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '49 hours'")
        assert await prune_idempotency_keys(pool, retention=timedelta(hours=48)) == "pruned 1 idempotency keys"
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    finally:
        await pool.close()
        await conn.close()


async def test_a_client_that_hangs_up_mid_body_is_counted_not_reported_as_an_internal_error(api, caplog):
    import asyncio
    import re

    from aiohttp import web

    from paysvc.app import create_app
    from tests.conftest import make_settings

    headers = await api.portal()
    # Served as in production: aiohttp's test server cancels a handler whose client left, the real server
    # lets it run on and its body read fails.
    runner = web.AppRunner(create_app(make_settings(api.dsn), api.dsn, background=False))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    async def count(status: str) -> float:
        text = await (await api.client.get("/metrics")).text()  # one registry per process
        m = re.search(r'paysvc_http_requests_total\{method="POST",route="/v1/invoices",status="%s"\} ([\d.e+]+)'
                      % status, text)
        return float(m.group(1)) if m else 0.0

    try:
        before_499, before_500 = await count("499"), await count("500")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /v1/invoices HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"refer").encode())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # gone before the 1,000 announced bytes arrived
        for _ in range(100):
            if await count("499") > before_499:
                break
            await asyncio.sleep(0.02)
        assert await count("499") == before_499 + 1
        assert await count("500") == before_500
        assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
    finally:
        await runner.cleanup()


async def test_a_body_that_arrives_in_pieces_is_read_whole(api):
    import asyncio
    import json as _json

    headers = await api.portal()
    body = _json.dumps({"reference": "SLOW-1", "description": "Passport fee, sent slowly", "currency": "KHR",
                        "amount": 50_000}).encode()
    reader, writer = await asyncio.open_connection(api.client.server.host, api.client.server.port)
    writer.write((f"POST /v1/invoices HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                  ).encode() + body[:20])
    await writer.drain()
    await asyncio.sleep(0.1)  # the rest comes in a later segment
    writer.write(body[20:])
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 201"), status_line


async def test_an_instance_past_its_capacity_sheds_requests_with_retry_after(db_dsn):
    import asyncio

    from tests.conftest import running_api

    async with running_api(db_dsn, max_concurrent_requests=1, request_queue_seconds=0.2) as api:
        headers = await api.portal()
        treasury = await api.key(None, scopes=["treasury"])
        # One request holds the only slot: a settlement file (read as it streams in, once admitted) still on
        # its way. (A JSON body is read before admission: see the test below.)
        reader, writer = await asyncio.open_connection(api.client.server.host, api.client.server.port)
        writer.write((f"POST /v1/settlements HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {treasury}\r\n"
                      "Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 1000\r\n\r\n"
                      "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.csv\"\r\n\r\n").encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        r = await api.client.get("/v1/invoices", headers=headers)
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        problem = await r.json()
        assert problem["type"] == "urn:paysvc:problem:busy" and "retry in 1 s" in problem["detail"]
        assert (await api.client.get("/healthz")).status == 200       # health is never queued
        assert (await api.client.get("/readyz")).status == 200
        writer.close()                                                # the slot frees when that request ends
        for _ in range(50):
            r = await api.client.get("/v1/invoices", headers=headers)
            if r.status != 503:
                break
            await asyncio.sleep(0.05)
        assert r.status == 200
        metrics = await (await api.client.get("/metrics")).text()
        assert "paysvc_http_requests_shed_total" in metrics


async def test_a_body_that_stalls_holds_no_slot_and_is_answered_408(db_dsn, monkeypatch):
    # Found by a fuzz audit: a client that announced a JSON body and sent it slowly, or never, held an
    # admission slot until it gave up, so 64 such connections, no key needed (callbacks read their body
    # first), had every request answered busy. The body is now read before admission, within BODY_SECONDS.
    import asyncio

    import paysvc.web
    from tests.conftest import running_api

    monkeypatch.setattr(paysvc.web, "BODY_SECONDS", 1.0)
    async with running_api(db_dsn, max_concurrent_requests=1, request_queue_seconds=0.2) as api:
        headers = await api.portal()
        stalled = []
        for path in ("/v1/providers/sandbox/callbacks", "/v1/invoices"):
            reader, writer = await asyncio.open_connection(api.client.server.host, api.client.server.port)
            writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
            await writer.drain()
            stalled.append((reader, writer))
        await asyncio.sleep(0.1)
        r = await api.client.get("/v1/invoices", headers=headers)  # the one slot is free
        assert r.status == 200, await r.text()
        for reader, writer in stalled:
            answer = await asyncio.wait_for(reader.read(4096), 5)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"urn:paysvc:problem:request-timeout" in answer and b"did not arrive within 1 s" in answer
            writer.close()


async def test_openapi_documents_what_pages_and_bodiless_answers_really_send(api):
    """Found by fuzzing (schemathesis): the pages' errors were documented as problem documents though they are
    pages, their redirects not at all, the treasury page's `q` was missing, and a 204 was given a JSON body."""
    spec = await (await api.client.get("/openapi.json")).json()

    def documented(method: str, path: str, r) -> None:
        responses = spec["paths"][path][method.lower()]["responses"]
        entry = responses.get(str(r.status)) or responses["default"]
        assert ("content" in entry) == (r.content_type != "application/octet-stream"), (path, r.status, entry)
        if "content" in entry:
            assert r.content_type in entry["content"], (path, r.status, r.content_type, entry)

    r = await api.client.get("/pay/inv_nope")
    assert r.status == 404
    documented("GET", "/pay/{id}", r)
    for path, real in [("/treasury/days/{date}/{provider}", "/treasury/days/2026-11-26/sandbox"),
                       ("/treasury/invoices", "/treasury/invoices?q=PS00000001"),
                       ("/treasury/settlements/{id}/report.csv", "/treasury/settlements/stl_x/report.csv")]:
        r = await api.client.get(real, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/treasury/login"
        documented("GET", path, r)
    r = await api.client.post("/treasury/login", data={"key": "psk_nope"}, allow_redirects=False)
    assert r.status == 403  # no Origin: a page saying so
    documented("POST", "/treasury/login", r)
    assert "303" in spec["paths"]["/treasury/login"]["post"]["responses"]
    assert [p["name"] for p in spec["paths"]["/treasury/invoices"]["get"]["parameters"]] == ["q"]
    deleted = spec["paths"]["/v1/webhooks/{id}"]["delete"]["responses"]["204"]
    assert "content" not in deleted


async def test_one_invoice_carries_payer_and_payments_and_a_listed_one_neither(api, invoice_body):
    """A list does not decrypt every payer or read every invoice's payments; it leaves both fields out rather
    than show null, which would read as "no payer" and "no payments"."""
    from tests.payments_helpers import pay

    h = await api.portal("MOI")
    created = await (await api.client.post("/v1/invoices", json=invoice_body(payer={"name": "Sok Dara"}),
                                           headers=h)).json()
    assert created["payer"]["name"] == "Sok Dara" and created["payments"] == []
    r = await pay(api.client, created)
    assert r.status == 200, await r.text()
    one = await (await api.client.get(f"/v1/invoices/{created['id']}", headers=h)).json()
    assert one["payer"]["name"] == "Sok Dara" and len(one["payments"]) == 1
    [listed] = (await (await api.client.get("/v1/invoices", headers=h)).json())["data"]
    assert listed["id"] == created["id"] and listed["status"] == "paid"
    assert "payer" not in listed and "payments" not in listed


async def test_a_key_whose_first_request_committed_after_our_look_is_replayed_not_called_a_conflict(
        api, invoice_body, monkeypatch):
    """Found by review (1 in ~3,000 concurrent same-key requests): the claim's snapshot predates the key's
    lock, so the first request's record, committed in between, was not seen; the insert then met the
    reference the first request took, and the answer was 409 "reference already used". Here the claim is
    made to miss the record, as that snapshot did: the same request must still be replayed."""
    from paysvc.queries import Q

    h = {**await api.portal("MOI"), "Idempotency-Key": "late-look"}
    body = invoice_body(reference="R-LATE")
    first = await api.client.post("/v1/invoices", json=body, headers=h)
    assert first.status == 201
    monkeypatch.setattr(Q, "idempotency_claim", "SELECT pg_try_advisory_xact_lock(hashtextextended($1 || ':' || "
                        "$2, 7)) AS locked, NULL::text AS request_hash, NULL::int AS status, NULL::jsonb AS response")
    again = await api.client.post("/v1/invoices", json=body, headers=h)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true", await again.text()
    assert (await again.json())["id"] == (await first.json())["id"]
    other = await api.client.post("/v1/invoices", json=invoice_body(reference="R-LATE", amount=7),
                                  headers={**h, "Idempotency-Key": "late-look"})
    assert other.status == 422  # same key, another body: still refused
    taken = await api.client.post("/v1/invoices", json=body, headers={**h, "Idempotency-Key": "another-key"})
    assert taken.status == 409 and "Idempotency-Key to retry" not in (await taken.json())["detail"]


async def test_an_idempotent_answer_is_kept_without_the_payer_in_clear_and_replayed_whole(api, invoice_body):
    """Found by review: the idempotency record kept the first answer with the payer's name and phone in clear
    text for 48 h, beside the invoice that holds them only encrypted."""
    h = {**await api.portal("MOI"), "Idempotency-Key": "with-payer"}
    body = invoice_body(payer={"name": "Sok Dara", "phone": "+855 12 345 678"})
    first = await api.client.post("/v1/invoices", json=body, headers=h)
    assert first.status == 201
    conn = await asyncpg.connect(api.dsn)
    try:
        kept = await conn.fetchval("SELECT response::text FROM idempotency_keys WHERE key = 'with-payer'")
    finally:
        await conn.close()
    assert "Sok Dara" not in kept and "345 678" not in kept, kept
    again = await api.client.post("/v1/invoices", json=body, headers=h)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert await again.json() == await first.json()   # the payer included, decrypted from the invoice


async def test_an_idempotency_record_keeps_a_keyed_digest_nobody_can_test_payer_guesses_against(db_dsn, invoice_body):
    """Found by review: the record kept a plain SHA-256 of the request, payer included; every other field of
    the body can be read from the invoice's row, so trying names and phone numbers against the hash found the
    payer in seconds. The digest is now an HMAC under the payer-data key (key id first). A record written
    before (plain SHA-256) still replays; so does one after the key rotated (the old key kept); a record whose
    key is gone is refused with what to do, never taken for a match."""
    import base64
    import hashlib

    from paysvc.db import connect
    from paysvc.invoicing import canonical_request
    from tests.conftest import TEST_PII_KEYS, running_api

    body = invoice_body(payer={"name": "Sok Dara", "phone": "+855 12 345 678"})
    async with running_api(db_dsn) as api:
        h = await api.portal("MOI")
        hk = {**h, "Idempotency-Key": "k-1"}
        r = await api.client.post("/v1/invoices", json=body, headers=hk)
        assert r.status == 201
        first = await r.json()
        async with connect(db_dsn) as conn:
            stored = await conn.fetchval("SELECT request_hash FROM idempotency_keys WHERE key = 'k-1'")
            plain = hashlib.sha256(canonical_request(body)).hexdigest()
            assert stored.startswith("t1:") and plain not in stored
            await conn.execute("UPDATE idempotency_keys SET request_hash = $1 WHERE key = 'k-1'", plain)
        r = await api.client.post("/v1/invoices", json=body, headers=hk)  # a record from before: plain SHA-256
        assert r.status == 201 and r.headers.get("Idempotent-Replayed") == "true" and await r.json() == first
        r = await api.client.post("/v1/invoices", json={**body, "amount": 50001}, headers=hk)
        assert r.status == 422
        async with connect(db_dsn) as conn:
            await conn.execute("UPDATE idempotency_keys SET request_hash = $1 WHERE key = 'k-1'", stored)
        no_payer = invoice_body()
        r = await api.client.post("/v1/invoices", json=no_payer, headers={**h, "Idempotency-Key": "k-2"})
        assert r.status == 201

    rotated = "t2:" + base64.b64encode(b"n" * 32).decode() + "," + TEST_PII_KEYS
    async with running_api(db_dsn, pii_keys=rotated) as api:
        r = await api.client.post("/v1/invoices", json=body, headers=hk)
        assert r.status == 201 and await r.json() == first
        r = await api.client.post("/v1/invoices", json={**body, "description": "other"}, headers=hk)
        assert r.status == 422

    # t1 removed while records keyed with it are kept: the service refuses to start (as for payers it encrypted),
    # even once no invoice holds a payer under t1.
    from paysvc.errors import IdempotencyMismatch
    from paysvc.invoicing import InvoiceContext, request_digest_matches
    from paysvc.pii import PiiCipher
    from paysvc.settings import SettingsError

    async with connect(db_dsn) as conn:
        await conn.execute("UPDATE invoices SET payer_key_id = NULL, payer_ciphertext = NULL")
        k2 = await conn.fetchval("SELECT request_hash FROM idempotency_keys WHERE key = 'k-2'")
    with pytest.raises(SettingsError, match="t1.*idempotency records"):
        async with running_api(db_dsn, pii_keys="t2:" + base64.b64encode(b"n" * 32).decode()):
            pass
    # and were one compared without its key, it would be refused with what to do, never taken for a match
    ctx = InvoiceContext(cipher=PiiCipher({"t2": b"n" * 32}), khqr_ttl=timedelta(minutes=10), base_url="http://x")
    with pytest.raises(IdempotencyMismatch, match="can no longer be compared"):
        request_digest_matches(ctx, k2, canonical_request(no_payer))


@pytest.mark.parametrize("written, says", [
    ("1700000000", "ISO 8601"),                      # was read as seconds since 1970
    ("2026-01-01", "ISO 8601"),                      # a date alone: whose midnight?
    ("notadate", "ISO 8601"),
    ("2026-01-01T00:00:00 07:00", "%2B"),            # a + sent unencoded reads as a space
    ("2026-01-31 10:30", "timezone offset required"),  # no offset at all: said so, not taken for a lost +
])
async def test_a_query_time_not_written_iso_8601_with_its_offset_says_how_to_write_it(api, invoice_body, written,
                                                                                       says):
    h = await api.portal("MOI")
    for path, name in (("/v1/invoices", "created_from"), ("/v1/invoices", "created_to")):
        r = await api.client.get(path, params={name: written}, headers=h)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == name and says in body["errors"][0]["message"], body
    r = await api.client.get("/v1/invoices", params={"created_from": "2026-01-01T00:00:00+07:00"}, headers=h)
    assert r.status == 200


@pytest.mark.parametrize("phone, ok", [("012-345-678", True), ("(012) 345 678", True), ("+855 12 345 678", True),
                                       ("012", False), ("012 345 67a", False), ("+", False)])
async def test_a_phone_is_taken_as_people_write_it_and_a_short_one_is_told_the_rule(api, invoice_body, phone, ok):
    h = await api.portal("MOI")
    body = invoice_body()
    r = await api.client.post("/v1/invoices", json={**body, "payer": {"name": "Sok", "phone": phone}}, headers=h)
    got = await r.json()
    if ok:
        assert r.status == 201, got
    else:
        assert r.status == 422 and got["errors"][0]["field"] == "payer.phone", got
        assert "6 to 20 digits" in got["errors"][0]["message"], got


async def test_a_payer_stored_under_an_earlier_rule_is_read_as_stored(api, invoice_body):
    """A stored payer is not checked again (found by review: a phone the earlier rule took, "12 34 5", made its
    invoice's read, replay and cancel answer 500, the cancel after it had committed)."""
    from paysvc.pii import cipher_from_settings
    from paysvc.settings import Settings
    from tests.conftest import TEST_PII_KEYS

    h = {**await api.portal("MOI"), "Idempotency-Key": "old-phone"}
    body = {**invoice_body(), "payer": {"name": "Sok", "phone": "123456"}}
    inv = await (await api.client.post("/v1/invoices", json=body, headers=h)).json()
    old = {"name": "Sok", "phone": "12 34 5"}
    key_id, blob = cipher_from_settings(Settings(pii_keys=TEST_PII_KEYS)).encrypt(old, aad=inv["id"])
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute("UPDATE invoices SET payer_key_id = $2, payer_ciphertext = $3 WHERE id = $1",
                           inv["id"], key_id, blob)
    finally:
        await conn.close()
    r = await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)
    assert r.status == 200 and (await r.json())["payer"] == {**old, "email": None}
    r = await api.client.post("/v1/invoices", json=body, headers=h)
    assert r.status == 201 and (await r.json())["payer"]["phone"] == "12 34 5"
    r = await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)
    assert r.status == 200 and (await r.json())["status"] == "cancelled"


async def test_payers_and_webhook_secrets_move_to_the_new_key_so_the_old_one_can_go(api, invoice_body):
    """Found by an operator's walk-through: nothing stored payers again under a new key, so a retired key could
    never be removed."""
    import base64
    import os

    from paysvc.pii import PiiCipher, check_pii_keys, reencrypt_stored
    from paysvc.settings import SettingsError, parse_pii_keys
    from paysvc.web import POOL
    from tests.conftest import TEST_PII_KEYS

    h = await api.portal("MOI")
    for n in range(3):
        r = await api.client.post("/v1/invoices", json={**invoice_body(), "payer": {"name": f"Sok {n}"}}, headers=h)
        assert r.status == 201
    r = await api.client.post("/v1/webhooks", json={"url": "https://portal.example/hook",
                                                   "event_types": ["invoice.paid"]}, headers=h)
    assert r.status == 201, await r.text()
    pool = api.client.app[POOL]
    new = "k2:" + base64.b64encode(os.urandom(32)).decode()
    both = PiiCipher(parse_pii_keys(f"{new},{TEST_PII_KEYS}"))
    assert await reencrypt_stored(pool, both, batch=2) == {"invoices": 3, "webhooks": 1}
    assert await reencrypt_stored(pool, both) == {"invoices": 0, "webhooks": 0}      # again: nothing left
    only_new = PiiCipher(parse_pii_keys(new))
    await check_pii_keys(pool, only_new)                       # the old key is used by nothing now
    row = await pool.fetchrow("SELECT id, payer_key_id, payer_ciphertext FROM invoices LIMIT 1")
    assert only_new.decrypt(row["payer_key_id"], bytes(row["payer_ciphertext"]), aad=row["id"])["name"].startswith("Sok")
    with pytest.raises(SettingsError):
        await check_pii_keys(pool, PiiCipher(parse_pii_keys(TEST_PII_KEYS)))  # and the old key alone no longer does


async def test_reencrypting_waits_for_a_row_another_transaction_holds(api, invoice_body):
    """Found by review: a row held by a capture or a cancel was passed over, and the command said all were
    moved."""
    import base64
    import os

    from paysvc.pii import PiiCipher, reencrypt_stored
    from paysvc.settings import parse_pii_keys
    from paysvc.web import POOL
    from tests.conftest import TEST_PII_KEYS

    h = await api.portal("MOI")
    ids = [(await (await api.client.post("/v1/invoices", json={**invoice_body(), "payer": {"name": "Sok"}},
                                         headers=h)).json())["id"] for _ in range(3)]
    both = PiiCipher(parse_pii_keys("k2:" + base64.b64encode(os.urandom(32)).decode() + "," + TEST_PII_KEYS))
    pool = api.client.app[POOL]
    holder = await asyncpg.connect(api.dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM invoices WHERE id = $1 FOR UPDATE", ids[1])
        with pytest.raises(RuntimeError, match="1 invoices are still stored under older keys"):
            await reencrypt_stored(pool, both, patience=0.5)               # held throughout: said, not hidden
        moving = asyncio.create_task(reencrypt_stored(pool, both, patience=30))
        await asyncio.sleep(0.5)
        await tx.rollback()                                                 # released: it is moved too
        assert await moving == {"invoices": 1, "webhooks": 0}
    finally:
        await holder.close()
    assert await pool.fetchval("SELECT count(*) FROM invoices WHERE payer_key_id <> 'k2'") == 0


async def test_a_payer_key_rotated_in_two_steps_works_while_instances_restart_one_by_one(db_dsn, invoice_body):
    """The README's rotation: the new key added last on every instance first (each can read what another encrypts
    under it), then moved first. Mid-way through the second step one instance writes under the new key and
    another still under the old one; each reads the other's payers and replays the other's creates (found by an
    operator's walk-through: putting the new key first at once made the other instances answer 500 for those
    payers, and 422 to a create retried with the same Idempotency-Key)."""
    import base64

    from tests.conftest import TEST_PII_KEYS, running_api

    new = "t3:" + base64.b64encode(b"r" * 32).decode()
    payer = {"name": "Sok Dara", "phone": "012-345-678"}
    async with running_api(db_dsn, pii_keys=f"{new},{TEST_PII_KEYS}") as moved, \
            running_api(db_dsn, pii_keys=f"{TEST_PII_KEYS},{new}") as not_yet:
        h = await moved.portal("MOI")
        made = {}
        for name, api in (("moved", moved), ("not_yet", not_yet)):
            body = invoice_body(payer=payer)
            r = await api.client.post("/v1/invoices", json=body, headers={**h, "Idempotency-Key": f"key-{name}"})
            assert r.status == 201, await r.text()
            made[name] = (body, await r.json())
        conn = await asyncpg.connect(db_dsn)
        try:
            used = {r["payer_key_id"] for r in await conn.fetch("SELECT payer_key_id FROM invoices")}
        finally:
            await conn.close()
        assert used == {"t1", "t3"}  # each wrote under its own first key
        for name, (body, first) in made.items():
            for api in (moved, not_yet):
                got = await api.client.get(f"/v1/invoices/{first['id']}", headers=h)
                assert got.status == 200 and (await got.json())["payer"]["name"] == "Sok Dara", name
                again = await api.client.post("/v1/invoices", json=body, headers={**h, "Idempotency-Key": f"key-{name}"})
                assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true", name
                assert (await again.json())["id"] == first["id"]


async def test_answers_say_how_to_authenticate_and_are_not_cached_and_nan_is_not_json(api, invoice_body):
    """From a portal developer's walk-through: a 401 named no scheme; the invoice with its payer came without
    Cache-Control while the public pages said no-store; "amount": NaN was read as JSON and refused as a type."""
    h = await api.portal("MOI")
    r = await api.client.get("/v1/invoices")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="paysvc"'
    # a provider's callback refused for its signature is another scheme: no Bearer challenge (found by review)
    r = await api.client.post("/v1/providers/sandbox/callbacks", data=b"{}", headers={
        "Content-Type": "application/json", "Sandbox-Signature": "t=1,v1=00"})
    assert r.status == 401 and "WWW-Authenticate" not in r.headers
    inv = await (await api.client.post("/v1/invoices", json=invoice_body(payer={"name": "Sok Dara"}),
                                       headers=h)).json()
    for url in (f"/v1/invoices/{inv['id']}", "/v1/invoices", "/v1/invoices/inv_nope"):
        r = await api.client.get(url, headers=h)
        assert r.headers["Cache-Control"] == "no-store", (url, r.status)
    assert (await api.client.get("/v1/keys/events")).headers.get("Cache-Control", "").startswith("public")
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = ('{"reference": "N-1", "description": "x", "currency": "KHR", "amount": %s}' % constant).encode()
        r = await api.client.post("/v1/invoices", data=body, headers={**h, "Content-Type": "application/json"})
        doc = await r.json()
        assert r.status == 400 and f"{constant} is not a JSON value" in doc["detail"], doc
