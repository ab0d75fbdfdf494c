"""Settlement reconciliation at scale: 1,000,000 captured payments and a settlement file of ~1,000,000 lines.

    python -m load.settlement_bench [--payments 1000000] [--admin-dsn URL]

The server is PAYSVC_BENCH_DATABASE_URL's, or the local one (over its Unix socket where there is one).

Creates a scratch database (dropped at the end), builds the fixture set-based, then reconciles end to end
through the same code the API uses (parse → COPY → match → capture the missing → post → report) and prints
the time of each phase and the process's peak memory (ru_maxrss; PostgreSQL's memory is its own).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

import ledger
from paysvc.db import connect, create_pool
from paysvc.migrate import migrate
from paysvc.settings import Settings
from paysvc.settlement_days import TZ
from paysvc.settlement_import import Rules, file_digest, import_settlement
from paysvc.settlement_report import report, report_csv
from providers.sandbox import SETTLEMENT_HEADER, create
from load.service import ADMIN_DSN

DAY = date.today() - timedelta(days=10)   # past its grace: unsettled payments are raised at import
BATCH = 10_000
MISMATCH_EVERY, DUPLICATE_EVERY, OMIT_EVERY = 1000, 1000, 1000
NEW_LINES = 100


def _paid_at(n: int, total: int) -> datetime:
    start = datetime.combine(DAY, datetime.min.time(), tzinfo=TZ)
    return (start + timedelta(seconds=1 + (n * 86000) // total)).astimezone(UTC)


def _mb(kb: int) -> float:
    return kb / 1024


async def build_fixture(dsn: str, total: int) -> dict[str, float]:
    t: dict[str, float] = {}
    async with connect(dsn) as conn:
        agency = await conn.fetchval(
            """INSERT INTO agencies (code, name, name_km, bakong_account, mcc, city)
               VALUES ('MOI', 'MOI Fees Office', 'ក្រសួងមហាផ្ទៃ', 'moi@nbcq', '9399', 'Phnom Penh') RETURNING id""")
        t0 = time.perf_counter()
        expires = datetime.now(UTC) + timedelta(days=1)

        def invoices():
            for n in range(total):
                yield (f"inv_b{n}", f"PS{n:010d}", agency, f"R{n}", "Bench fee", "KHR", 10_000 + n % 5000,
                       10_000 + n % 5000, "paid", expires, _paid_at(n, total))
        await conn.copy_records_to_table(
            "invoices", records=invoices(),
            columns=("id", "bill_number", "agency_id", "reference", "description", "currency", "amount",
                     "amount_paid", "status", "expires_at", "paid_at"))
        t["invoices COPY"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        async with conn.transaction():
            # One capture entry per 10,000 payments (debit clearing, credit the agency's revenue, the batch's
            # total): the same balances as one entry per payment, built in seconds instead of minutes.
            drafts = []
            for b in range(0, total, BATCH):
                amount = sum(10_000 + n % 5000 for n in range(b, min(b + BATCH, total)))
                drafts.append(ledger.EntryDraft(
                    kind="payment_captured", description=f"bench capture batch {b // BATCH}",
                    effective_at=_paid_at(b, total), idempotency_key=f"bench:{b}",
                    postings=[ledger.Posting(account="provider:sandbox:clearing:KHR", side="debit", amount=amount,
                                             currency="KHR"),
                              ledger.Posting(account="agency:MOI:revenue:KHR", side="credit", amount=amount,
                                             currency="KHR")]))
            await ledger.post_entries(conn, drafts)

        def payments():
            for n in range(total):
                amount = 10_000 + n % 5000
                yield (f"pay_b{n}", "sandbox", f"sbx-{n}", f"inv_b{n}", agency, f"PS{n:010d}", "KHR", amount, amount,
                       0, _paid_at(n, total), "callback")
        await conn.copy_records_to_table(
            "payments", records=payments(),
            columns=("id", "provider", "provider_transaction_id", "invoice_id", "agency_id", "bill_number",
                     "currency", "amount", "applied_amount", "suspense_amount", "paid_at", "source"))
        await conn.execute("ANALYZE payments")
        t["payments COPY + ledger"] = time.perf_counter() - t0
    return t


def write_file(path: Path, total: int) -> dict[str, int]:
    """Stream the sandbox CSV to disk: every payment once, but some altered, duplicated, omitted, plus new."""
    counts = {"lines": 0, "mismatch": 0, "duplicate": 0, "omitted": 0, "new": 0}
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(SETTLEMENT_HEADER) + "\n")
        for n in range(total):
            if n % OMIT_EVERY == 7:
                counts["omitted"] += 1
                continue
            amount = 10_000 + n % 5000
            if n % MISMATCH_EVERY == 3:
                amount -= 100
                counts["mismatch"] += 1
            row = f"sbx-{n},,PS{n:010d},{amount},KHR,{_paid_at(n, total).isoformat()},25\n"
            fh.write(row)
            counts["lines"] += 1
            if n % DUPLICATE_EVERY == 5:
                fh.write(row)
                counts["lines"] += 1
                counts["duplicate"] += 1
        for k in range(NEW_LINES):
            fh.write(f"sbx-new-{k},,,{5000 + k},KHR,{_paid_at(k, total).isoformat()},0\n")
            counts["lines"] += 1
            counts["new"] += 1
    return counts


async def reconcile(dsn: str, path: Path) -> tuple[dict[str, float], dict]:
    settings = Settings(database_url=dsn, db_pool_min=1, db_pool_max=2)
    rules = Rules(cutoff=datetime.strptime("23:59:59.999", "%H:%M:%S.%f").time(), grace_days=2,
                  bank_account="nbc-treasury")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    data = path.read_bytes()
    t["read file"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest = file_digest(data)
    t["sha256"] = time.perf_counter() - t0
    parser = create({"secrets": ["bench-secret"]})
    pool = await create_pool(dsn, settings)
    try:
        async with pool.acquire() as conn:
            t0 = time.perf_counter()
            async with conn.transaction():
                done = await import_settlement(
                    conn, parser.parse_settlement(data), data_sha256=digest, file_size=len(data), provider="sandbox",
                    fmt="sandbox", business_date=DAY, file_name=path.name, imported_by="bench",
                    now=datetime.now(UTC), rules=rules, timings=t)
                c0 = time.perf_counter()
            t["commit"] = time.perf_counter() - c0
            t["import total"] = time.perf_counter() - t0
            del data
            t0 = time.perf_counter()
            rep = await report(conn, done.settlement_id, rules=rules, today=date.today(), lines_limit=200)
            t["report (JSON)"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            size = 0
            async with conn.transaction(readonly=True):
                async for chunk in report_csv(conn, done.settlement_id, rules=rules):
                    size += len(chunk)
            t["report CSV (all lines, streamed)"] = time.perf_counter() - t0
            rep["csv_bytes"] = size
            clearing = await ledger.balance(conn, "provider:sandbox:clearing:KHR")
            rep["clearing_after"] = clearing
    finally:
        await pool.close()
    return t, rep


async def main(total: int, admin_dsn: str) -> None:
    name = f"paysvc_bench_settle_{uuid.uuid4().hex[:8]}"
    dsn = urlparse(admin_dsn)._replace(path=f"/{name}").geturl()  # keeps a ?host=/socket/dir query
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with connect(dsn) as conn:
            await migrate(conn)
        print(f"scratch database {name}; business day {DAY} (Asia/Phnom_Penh), past its 2-day grace")
        print(f"fixture: {total:,} invoices and {total:,} captured sandbox payments inserted with COPY (not through "
              f"the API); the ledger holds one capture entry per {BATCH:,} payments (debit clearing, credit revenue, "
              "the batch's total), posted with ledger.post_entries (real captures post one entry per payment)")
        fixture = await build_fixture(dsn, total)
        for k, v in fixture.items():
            print(f"  {k:<34} {v:7.2f} s")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "settlement.csv"
            t0 = time.perf_counter()
            counts = write_file(path, total)
            print(f"  {'write settlement CSV':<34} {time.perf_counter() - t0:7.2f} s  ({counts['lines']:,} lines, "
                  f"{path.stat().st_size / 1e6:.1f} MB: {counts['mismatch']} altered amounts, {counts['duplicate']} "
                  f"duplicated lines, {counts['omitted']} payments omitted, {counts['new']} lines never captured)")
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            timings, rep = await reconcile(dsn, path)
        print("reconciliation, end to end (one transaction: parse → COPY → match → capture missing → lines and "
              "exceptions → settlement entry → report and events):")
        phases = ["read file", "sha256", "parse_and_copy", "match", "capture_missing", "store_lines", "post",
                  "report_and_events", "commit", "import total", "report (JSON)", "report CSV (all lines, streamed)"]
        for k in phases:
            print(f"  {k:<34} {timings.get(k, 0):7.2f} s")
        e2e = timings["read file"] + timings["sha256"] + timings["import total"] + timings["report (JSON)"]
        print(f"  {'END TO END (read → report)':<34} {e2e:7.2f} s   target < 60 s: {'OK' if e2e < 60 else 'MISSED'}")
        cats = {k: v["count"] for k, v in rep["lines_by_category"].items()}
        pays = {k: v["count"] for k, v in rep["payments_of_the_day"].items()}
        print(f"lines by category:    {cats}")
        print(f"payments of the day:  {pays}")
        posted = {(p['account'], p['side']): p['amount'] for p in rep['settlement_entry']['postings']}
        print(f"settlement entry:     {posted}")
        print(f"clearing after:       {rep['clearing_after']:,} KHR; left in clearing by reason: "
              f"{ {k: v['amounts'] for k, v in rep['clearing_remaining'].items() if v['count']} }")
        print(f"open exceptions:      {len(rep['open_exceptions'])}; CSV report {rep['csv_bytes'] / 1e6:.1f} MB")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak memory (ru_maxrss, this process): {_mb(peak):.0f} MiB (before reconciling: "
              f"{_mb(rss_before):.0f} MiB); target < 1024 MiB: {'OK' if peak < 1024 * 1024 else 'MISSED'}; "
              "PostgreSQL's memory is separate")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=1_000_000)
    ap.add_argument("--admin-dsn", default=ADMIN_DSN,
                    help="a database URL on the server to use (default: PAYSVC_BENCH_DATABASE_URL, else the local one)")
    a = ap.parse_args()
    asyncio.run(main(a.payments, a.admin_dsn))

