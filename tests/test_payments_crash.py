"""Kill the service while callbacks arrive: every callback that got a 2xx is captured exactly once."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import asyncpg

from tests.payments_helpers import sandbox_body, sandbox_headers
from tests.service_process import ServiceProcess


async def test_sigkill_while_callbacks_arrive_loses_nothing(db_dsn):
    svc = ServiceProcess(db_dsn, PAYSVC_INBOX_LEASE_SECONDS="1", PAYSVC_INBOX_INTERVAL_SECONDS="0.2").start()
    try:
        agency = svc.cli("agencies", "add", "MOI", "--name", "MOI Fees Office", "--name-km", "ក្រសួងមហាផ្ទៃ",
                         "--bakong-account", "moi@nbcq")
        assert agency.returncode == 0, agency.stderr
        key = svc.cli("keys", "create", "--agency", "MOI", "--scope", "invoices:write", "--scope", "invoices:read")
        auth = {"Authorization": f"Bearer {key.stdout.strip()}"}
        acked: set[str] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            invoices = []
            for i in range(150):
                async with http.post(f"{svc.url}/v1/invoices", headers=auth, json={
                        "reference": f"K{i}", "description": "fee", "currency": "KHR", "amount": 1000 + i}) as r:
                    invoices.append(await r.json())

            enough = asyncio.Event()
            gate = asyncio.Semaphore(12)

            async def send(inv):
                body = sandbox_body(inv, txid=f"TX-{inv['reference']}")
                async with gate:
                    try:
                        async with http.post(f"{svc.url}/v1/providers/sandbox/callbacks", data=body,
                                             headers=sandbox_headers(body)) as r:
                            if 200 <= r.status < 300:
                                acked.add(f"TX-{inv['reference']}")
                                if len(acked) >= 40:
                                    enough.set()
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass  # the process died under this request: no 2xx, so the bank would send it again

            sends = [asyncio.create_task(send(inv)) for inv in invoices]
            await asyncio.wait_for(enough.wait(), timeout=30)
            svc.kill()  # mid-burst: some callbacks stored and answered, some stored only, some never sent
            await asyncio.gather(*sends)
        assert 40 <= len(acked) < 150

        svc.start()  # a new process; the inbox worker finds what the dead one left
        conn = await asyncpg.connect(db_dsn)
        try:
            for _ in range(100):
                pending = await conn.fetchval("SELECT count(*) FROM provider_inbox WHERE state = 'received'")
                if pending == 0:
                    break
                await asyncio.sleep(0.2)
            assert pending == 0
            captured = {r["provider_transaction_id"]: r["n"] for r in await conn.fetch(
                "SELECT provider_transaction_id, count(*) AS n FROM payments GROUP BY 1")}
            assert acked <= set(captured), f"acknowledged but not captured: {sorted(acked - set(captured))}"
            assert set(captured.values()) == {1}
            # Every stored callback was captured (stored ones are never dropped), once.
            stored = {json.loads(bytes(r["body"]))["transaction_id"] for r in await conn.fetch(
                "SELECT body FROM provider_inbox")}
            assert set(captured) == stored
            totals = await conn.fetch("""SELECT a.currency, sum(CASE WHEN p.side = 'debit' THEN p.amount ELSE 0 END) d,
                                                sum(CASE WHEN p.side = 'credit' THEN p.amount ELSE 0 END) c
                                           FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
                                          GROUP BY a.currency""")
            assert totals and all(t["d"] == t["c"] for t in totals)
            assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == len(captured)
        finally:
            await conn.close()
    finally:
        svc.stop()


async def test_sandbox_pay_command_pays_the_current_code(db_dsn):
    svc = ServiceProcess(db_dsn).start()
    try:
        svc.cli("agencies", "add", "MOI", "--name", "MOI Fees Office", "--name-km", "ក្រសួងមហាផ្ទៃ",
                "--bakong-account", "moi@nbcq")
        key = svc.cli("keys", "create", "--agency", "MOI", "--scope", "invoices:write", "--scope", "invoices:read")
        auth = {"Authorization": f"Bearer {key.stdout.strip()}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{svc.url}/v1/invoices", headers=auth, json={
                    "reference": "P1", "description": "fee", "currency": "USD", "amount": 1250}) as r:
                inv = await r.json()
            out = svc.cli("sandbox", "pay", inv["id"], "--url", svc.url)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["status"] == "processed"
            async with http.get(f"{svc.url}/v1/invoices/{inv['id']}", headers=auth) as r:
                got = await r.json()
            assert got["status"] == "paid" and got["amount_paid"] == 1250
            again = svc.cli("sandbox", "pay", inv["id"], "--url", svc.url)
            assert again.returncode == 1 and "paid" in again.stderr and "Traceback" not in again.stderr
            assert "--code" in again.stderr
            # The code still on the citizen's screen, paid again: kept, and raised as a second payment.
            twice = svc.cli("sandbox", "pay", inv["id"], "--url", svc.url, "--code", inv["khqr"]["payload"])
            assert twice.returncode == 0, twice.stderr
            assert json.loads(twice.stdout)["payments"][0]["exception"] == "duplicate_payment"
            bad = svc.cli("sandbox", "pay", inv["id"], "--url", svc.url, "--code", "000201nonsense")
            assert bad.returncode == 1 and "a bank app would refuse this code" in bad.stderr
    finally:
        svc.stop()
