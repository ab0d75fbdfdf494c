"""The ledger's HTTP reads: agency isolation (404), treasury sees all, trial balance, pagination."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import ledger
from ledger import entries
from paysvc.db import connect
from tests.test_ledger_db import run_cli, seal_everything

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)


async def book(api, agency: str, n: int, amount: int = 10_000, at: datetime = T0) -> None:
    async with connect(api.dsn) as conn:
        async with conn.transaction():
            await ledger.post_entries(conn, [entries.payment_captured(
                provider="sandbox", agency=agency, amount=amount, currency="KHR", effective_at=at + timedelta(minutes=i),
                invoice_id=f"inv_{agency}_{i}", payment_id=f"pay_{agency}_{i}") for i in range(n)])


async def setup(api):
    moi = await api.portal("MOI")
    await api.portal("MEF")
    treasury = {"Authorization": f"Bearer {await api.key(agency=None, scopes=('treasury',))}"}
    await book(api, "MOI", 5)
    await book(api, "MEF", 2, amount=7_000)
    return moi, treasury


async def test_agency_sees_only_its_accounts(api):
    moi, _ = await setup(api)
    r = await api.client.get("/v1/ledger/accounts", headers=moi)
    assert r.status == 200
    assert [a["code"] for a in (await r.json())["data"]] == ["agency:MOI:revenue:KHR"]
    r = await api.client.get("/v1/ledger/accounts?prefix=agency:", headers=moi)  # cannot widen its view
    assert [a["code"] for a in (await r.json())["data"]] == ["agency:MOI:revenue:KHR"]
    for other in ("agency:MEF:revenue:KHR", "provider:sandbox:clearing:KHR", "agency:MOI:revenue:USD"):
        r = await api.client.get(f"/v1/ledger/accounts/{quote(other)}", headers=moi)
        assert r.status == 404
        assert (await r.json())["type"] == "urn:paysvc:problem:not-found"
    r = await api.client.get("/v1/ledger/accounts/agency:MOI:revenue:KHR", headers=moi)
    body = await r.json()
    assert r.status == 200 and body["account"]["balance"] == 50_000 and len(body["postings"]) == 5
    r = await api.client.get("/v1/ledger/entries", headers=moi)
    data = (await r.json())["data"]
    assert len(data) == 5 and all(e["invoice_id"].startswith("inv_MOI") for e in data)
    r = await api.client.get("/v1/ledger/entries?account=agency:MEF:revenue:KHR", headers=moi)
    assert r.status == 404
    tb = await (await api.client.get("/v1/ledger/trial-balance", headers=moi)).json()
    assert [ln["account"] for ln in tb["lines"]] == ["agency:MOI:revenue:KHR"]
    # a part of the ledger need not balance: neither "balanced" nor "unbalanced", and it says which part
    assert tb["scope"] == "agency:MOI:" and tb["balanced"] is None
    assert tb["totals"] == [{"currency": "KHR", "debits": 0, "credits": 50_000, "balanced": None}]


async def test_treasury_sees_everything_and_the_trial_balance_balances(api):
    _, treasury = await setup(api)
    r = await api.client.get("/v1/ledger/accounts", headers=treasury)
    assert {a["code"] for a in (await r.json())["data"]} == {
        "agency:MEF:revenue:KHR", "agency:MOI:revenue:KHR", "provider:sandbox:clearing:KHR"}
    r = await api.client.get("/v1/ledger/accounts/provider:sandbox:clearing:KHR", headers=treasury)
    assert (await r.json())["account"]["balance"] == 64_000
    tb = await (await api.client.get("/v1/ledger/trial-balance", headers=treasury)).json()
    assert tb["balanced"] is True and tb["scope"] is None and tb["totals"] == [{"currency": "KHR", "debits": 64_000, "credits": 64_000,
                                                "balanced": True}]
    as_of = quote((T0 + timedelta(minutes=1, seconds=30)).isoformat())
    tb = await (await api.client.get(f"/v1/ledger/trial-balance?as_of={as_of}", headers=treasury)).json()
    assert tb["totals"][0]["debits"] == 2 * 10_000 + 2 * 7_000
    r = await api.client.get("/v1/ledger/trial-balance?as_of=2026-03-01T00:00:00", headers=treasury)
    assert r.status == 422
    # ISO 8601 only: a bare number was read as seconds since 1970; an unencoded + is explained
    for path, name, written, says in [
            ("/v1/ledger/trial-balance", "as_of", "1700000000", "ISO 8601"),
            ("/v1/ledger/accounts/provider:sandbox:clearing:KHR", "as_of", "2026-03-01T00:00:00 07:00", "%2B"),
            ("/v1/ledger/entries", "effective_from", "2026-03-01", "ISO 8601"),
            ("/v1/ledger/entries", "effective_to", "1700000000", "ISO 8601")]:
        r = await api.client.get(path, params={name: written}, headers=treasury)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == name, (path, body)
        assert says in body["errors"][0]["message"], (path, body)
    r = await api.client.get("/v1/ledger/entries?invoice_id=inv_MEF_1", headers=treasury)
    [e] = (await r.json())["data"]
    assert e["seal_position"] is None and len(e["postings"]) == 2


async def test_keys_without_the_scope_are_refused(api):
    await setup(api)
    writer_only = {"Authorization": f"Bearer {await api.key('MOI', scopes=('invoices:write',))}"}
    assert (await api.client.get("/v1/ledger/accounts", headers=writer_only)).status == 403
    assert (await api.client.get("/v1/ledger/accounts")).status == 401


async def test_pagination_walks_every_posting_and_entry_once(api):
    _, treasury = await setup(api)
    seen, url = [], "/v1/ledger/accounts/provider:sandbox:clearing:KHR?limit=3"
    while url:
        body = await (await api.client.get(url, headers=treasury)).json()
        seen += [p["entry_id"] for p in body["postings"]]
        url = (f"/v1/ledger/accounts/provider:sandbox:clearing:KHR?limit=3&cursor={body['next_cursor']}"
               if body["next_cursor"] else None)
    assert len(seen) == 7 and seen == sorted(seen, reverse=True)
    ids, url = [], "/v1/ledger/entries?limit=2"
    while url:
        body = await (await api.client.get(url, headers=treasury)).json()
        ids += [e["id"] for e in body["data"]]
        url = f"/v1/ledger/entries?limit=2&cursor={body['next_cursor']}" if body["next_cursor"] else None
    assert len(ids) == len(set(ids)) == 7
    codes, url = [], "/v1/ledger/accounts?limit=1"
    while url:
        body = await (await api.client.get(url, headers=treasury)).json()
        codes += [a["code"] for a in body["data"]]
        url = f"/v1/ledger/accounts?limit=1&cursor={body['next_cursor']}" if body["next_cursor"] else None
    assert len(codes) == 3
    assert (await api.client.get("/v1/ledger/entries?cursor=!!", headers=treasury)).status == 400


async def test_treasury_reads_the_chain_head_to_keep_as_an_anchor(api):
    moi, treasury = await setup(api)
    r = await api.client.get("/v1/ledger/chain-head", headers=treasury)
    assert r.status == 404 and "nothing is sealed yet" in (await r.json())["detail"]
    async with connect(api.dsn) as conn:
        # The sealer waits for every older transaction in the cluster to end (other tests' databases on the
        # same server keep some open briefly): seal until all 7 entries are.
        await seal_everything(conn)
        count = await conn.fetchval("SELECT count(*) FROM ledger_seals")
        expected = await ledger.chain_head(conn)
    assert count == 7
    body = await (await api.client.get("/v1/ledger/chain-head", headers=treasury)).json()
    assert body["position"] == 7 and body["chain_hash"] == expected.chain_hash
    assert body["anchor"] == f"7:{expected.chain_hash}" and body["entry_id"] == expected.entry_id
    third = await (await api.client.get("/v1/ledger/chain-head?position=3", headers=treasury)).json()
    assert third["position"] == 3 and third["chain_hash"] != body["chain_hash"]
    assert (await api.client.get("/v1/ledger/chain-head?position=8", headers=treasury)).status == 404
    for bad in ("0", "-1", "x", str(2**63)):  # a bigint's range, like any query value out of range: 422
        r = await api.client.get(f"/v1/ledger/chain-head?position={bad}", headers=treasury)
        assert r.status == 422 and "position" in (await r.text()), bad
    assert (await api.client.get("/v1/ledger/chain-head", headers=moi)).status == 403
    async with connect(api.dsn) as conn:  # what the endpoint gives is what verify checks
        assert (await ledger.verify(conn, anchors=[ledger.parse_anchor(body["anchor"])])).ok


async def test_openapi_documents_the_ledger_routes(api):
    spec = await (await api.client.get("/openapi.json")).json()
    for path in ("/v1/ledger/accounts", "/v1/ledger/accounts/{code}", "/v1/ledger/trial-balance",
                 "/v1/ledger/entries", "/v1/ledger/chain-head"):
        assert "get" in spec["paths"][path]
    params = {p["name"] for p in spec["paths"]["/v1/ledger/trial-balance"]["get"]["parameters"]}
    assert "as_of" in params


async def test_the_service_seals_in_the_background(db_dsn):
    from aiohttp.test_utils import TestClient, TestServer

    from paysvc.app import create_app
    from tests.conftest import make_settings

    async with connect(db_dsn) as conn:
        async with conn.transaction():
            await ledger.post_entry(conn, entries.payment_captured(
                provider="sandbox", agency="MOI", amount=1, currency="KHR", effective_at=T0, invoice_id="i",
                payment_id="p"))
        client = TestClient(TestServer(create_app(make_settings(db_dsn), db_dsn, background=True)))
        await client.start_server()
        try:
            for _ in range(200):
                if await conn.fetchval("SELECT count(*) FROM ledger_seals"):
                    break
                await asyncio.sleep(0.1)
            assert await conn.fetchval("SELECT count(*) FROM ledger_seals") == 1
        finally:
            await client.close()


async def test_an_account_as_of_a_time_lists_only_the_postings_behind_that_balance(api):
    moi, treasury = await setup(api)  # MOI: five entries of 10,000 at T0, T0+1 min, ... T0+4 min
    as_of = quote((T0 + timedelta(minutes=1, seconds=30)).isoformat())
    for headers in (moi, treasury):
        body = await (await api.client.get(f"/v1/ledger/accounts/agency:MOI:revenue:KHR?as_of={as_of}",
                                           headers=headers)).json()
        assert body["account"]["balance"] == 20_000
        assert [p["amount"] for p in body["postings"]] == [10_000, 10_000]
        assert [datetime.fromisoformat(p["effective_at"]) for p in body["postings"]] == [
            T0 + timedelta(minutes=1), T0]
    before = quote((T0 - timedelta(days=1)).isoformat())
    body = await (await api.client.get(f"/v1/ledger/accounts/agency:MOI:revenue:KHR?as_of={before}",
                                       headers=moi)).json()
    assert body["account"]["balance"] == 0 and body["postings"] == []
    # paging through an as_of statement stays inside it
    r = await api.client.get(f"/v1/ledger/accounts/agency:MOI:revenue:KHR?as_of={as_of}&limit=1", headers=moi)
    page = await r.json()
    r = await api.client.get(f"/v1/ledger/accounts/agency:MOI:revenue:KHR?as_of={as_of}&limit=1"
                             f"&cursor={page['next_cursor']}", headers=moi)
    last = await r.json()
    assert len(page["postings"]) == len(last["postings"]) == 1 and last["next_cursor"] is None


async def test_a_trial_balance_up_to_a_recorded_chain_head_does_not_move_when_entries_are_dated_back(api):
    """Found by an auditor's walk-through: an entry posted later but dated back changed a signed-off day's trial
    balance, and nothing showed it. Counting only the entries sealed up to the head recorded at the sign-off gives
    figures that never change; the difference from today's answer for the same time is what was sealed since."""
    moi, treasury = await setup(api)                       # 7 entries effective T0 .. T0 + 4 min
    async with connect(api.dsn) as conn:
        await seal_everything(conn)
        head = await ledger.chain_head(conn)
    as_of = (T0 + timedelta(hours=1)).isoformat()
    signed_off = await (await api.client.get("/v1/ledger/trial-balance", params={"as_of": as_of},
                                             headers=treasury)).json()
    async with connect(api.dsn) as conn:                  # posted now, dated the day before
        await ledger.post_entry(conn, entries.payment_captured(
            provider="sandbox", agency="MOI", amount=3_000, currency="KHR", effective_at=T0 - timedelta(days=1),
            invoice_id="inv_MOI_late", payment_id="pay_MOI_late"))
    async with connect(api.dsn) as conn:
        await seal_everything(conn)
    now = await (await api.client.get("/v1/ledger/trial-balance", params={"as_of": as_of},
                                      headers=treasury)).json()
    r = await api.client.get("/v1/ledger/trial-balance", params={"as_of": as_of, "sealed_upto": head.position},
                             headers=treasury)
    then = await r.json()
    assert r.status == 200, then
    revenue = {tb_name: {ln["account"]: ln["balance"] for ln in tb["lines"]}["agency:MOI:revenue:KHR"]
               for tb_name, tb in (("signed_off", signed_off), ("now", now), ("then", then))}
    assert revenue == {"signed_off": 50_000, "now": 53_000, "then": 50_000}
    assert then["lines"] == signed_off["lines"] and then["balanced"] is True
    assert then["sealed_upto"] == 7 and then["anchor"] == head.anchor and now["sealed_upto"] is None
    # a position not sealed yet, or out of range, is refused, naming what is sealed; agencies may not ask
    r = await api.client.get("/v1/ledger/trial-balance", params={"sealed_upto": 9}, headers=treasury)
    body = await r.json()
    assert r.status == 422 and "position 9 is not sealed yet: the last seal is 8" in body["detail"], body
    assert body["errors"][0]["field"] == "sealed_upto"
    for bad in ("0", "x", str(2**63)):
        r = await api.client.get("/v1/ledger/trial-balance", params={"sealed_upto": bad}, headers=treasury)
        assert r.status == 422 and "sealed_upto" in await r.text(), bad
    assert (await api.client.get("/v1/ledger/trial-balance", params={"sealed_upto": 7}, headers=moi)).status == 403


async def test_the_trial_balance_from_the_command_line(api):
    """`paysvc ledger trial-balance`, with --as-of and --sealed-upto as the API takes them (an auditor's
    walk-through found no command-line trial balance)."""
    await setup(api)
    async with connect(api.dsn) as conn:
        await seal_everything(conn)
        head = await ledger.chain_head(conn)

    def cli(*args: str):
        return run_cli(api.dsn, "trial-balance", *args)

    done = await asyncio.to_thread(cli, "--as-of", (T0 + timedelta(minutes=2)).isoformat(),
                                   "--sealed-upto", str(head.position))
    assert done.returncode == 0, done.stderr
    assert f"entries sealed up to {head.anchor}" in done.stdout
    rows = {line.split()[0]: line.split()[2:] for line in done.stdout.splitlines()[2:]}
    assert rows["agency:MOI:revenue:KHR"] == ["0", "30,000", "30,000"]        # 3 of MOI's 5, by T0 + 2 min
    assert rows["agency:MEF:revenue:KHR"] == ["0", "14,000", "14,000"]
    assert rows["total"] == ["44,000", "44,000", "balanced"]                  # "total KHR"
    as_json = await asyncio.to_thread(cli, "--json")
    assert as_json.returncode == 0 and '"balanced":true' in as_json.stdout and '"sealed_upto":null' in as_json.stdout
    for args, says in ((["--sealed-upto", "99"], "position 99 is not sealed yet: the last seal is 7"),
                       (["--sealed-upto", "0"], "positions count from 1"),
                       (["--sealed-upto", "99999999999999999999"], "positions count from 1 (and fit 64 bits)"),
                       (["--as-of", "2026-03-01T03:00"], "has no UTC offset"),
                       (["--as-of", "yesterday"], "is not an ISO 8601 time")):
        bad = await asyncio.to_thread(cli, *args)
        assert bad.returncode != 0 and says in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


async def test_a_periods_journal_from_the_command_line(api):
    """`paysvc ledger journal --from --to`: one row per posting of the entries effective in [from, to), as CSV or JSON
    lines (an auditor's walk-through found no period export: the API's 200-entry JSON pages only)."""
    import csv
    import io
    import json

    await setup(api)                     # MOI: T0 .. T0+4 min, MEF: T0, T0+1 min

    def cli(*args: str):
        return run_cli(api.dsn, "journal", *args)

    period = ("--from", (T0 + timedelta(minutes=1)).isoformat(), "--to", (T0 + timedelta(minutes=3)).isoformat())
    done = await asyncio.to_thread(cli, *period)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    # in effective time, then entry id (MOI's were posted first: MOI_1 before MEF_1 at T0+1 min), then line
    assert [(r["invoice_id"], r["line"], r["account"], r["side"], r["amount"]) for r in rows] == [
        ("inv_MOI_1", "1", "provider:sandbox:clearing:KHR", "debit", "10000"),
        ("inv_MOI_1", "2", "agency:MOI:revenue:KHR", "credit", "10000"),
        ("inv_MEF_1", "1", "provider:sandbox:clearing:KHR", "debit", "7000"),
        ("inv_MEF_1", "2", "agency:MEF:revenue:KHR", "credit", "7000"),
        ("inv_MOI_2", "1", "provider:sandbox:clearing:KHR", "debit", "10000"),
        ("inv_MOI_2", "2", "agency:MOI:revenue:KHR", "credit", "10000")]
    assert all(r["effective_at"].endswith("+00:00") and r["kind"] == "payment.captured" for r in rows)
    assert "3 entries, 6 postings" in done.stderr
    as_json = await asyncio.to_thread(cli, *period, "--format", "jsonl")
    assert [json.loads(line)["amount"] for line in as_json.stdout.splitlines()] == [int(r["amount"]) for r in rows]
    everything = await asyncio.to_thread(cli)
    assert "7 entries, 14 postings" in everything.stderr
    # A description that would start a spreadsheet formula is written as text; JSON lines stay one per posting
    # whatever the text holds (found by review)
    async with connect(api.dsn) as conn:
        await ledger.post_entry(conn, entries.payment_captured(
            provider="sandbox", agency="MOI", amount=1, currency="KHR", effective_at=T0 - timedelta(days=1),
            invoice_id="inv_odd", payment_id="pay_odd", description='=HYPERLINK("http://x","y")\u2028next'))
    day_before = ("--to", T0.isoformat())
    odd = list(csv.DictReader(io.StringIO((await asyncio.to_thread(cli, *day_before)).stdout)))
    assert [r["description"] for r in odd] == ["'=HYPERLINK(\"http://x\",\"y\")\u2028next"] * 2
    lines = (await asyncio.to_thread(cli, *day_before, "--format", "jsonl")).stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["description"] == '=HYPERLINK("http://x","y")\u2028next'
    bad = await asyncio.to_thread(cli, "--from", T0.isoformat(), "--to", T0.isoformat())
    assert bad.returncode == 1 and "--to must be later than --from" in bad.stderr
    bad = await asyncio.to_thread(cli, "--from", "2026-03-01")
    assert bad.returncode == 1 and "--from '2026-03-01' has no UTC offset" in bad.stderr
