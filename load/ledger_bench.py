"""Ledger write benchmark: ``python -m load.ledger_bench`` (from the repository root).

Creates its own scratch databases on PostgreSQL (``PAYSVC_BENCH_DATABASE_URL``; default: the local server's
Unix socket in /var/run/postgresql if there is one, else postgresql://postgres@127.0.0.1:5432/postgres; pgbench
connects the same way), runs each scenario with 16 concurrent asyncpg writers, checks
the trial balance and every maintained balance after each run, runs pgbench (TPC-B-like) for the same
duration on its own scratch database, prints a table and drops everything it created.

Scenarios (balanced 2-posting entries, balances maintained in the same transaction). Each transaction is
one ``ledger.post_entries`` statement sent outside a transaction block, so it commits on its own in one
round trip; scenario x shows the same work wrapped in BEGIN ... COMMIT (three round trips) for reference.
Each transaction posts once, so it posts with ``fold_now=True`` (checked and folded in the posting statement);
``--fold-at-commit`` measures the default instead (checked and folded by the commit-time trigger). The
writers run on uvloop where it is installed, as the service does.
  a  one entry per transaction, 10,000 accounts            target >= 5,000 entries/s, p99 < 20 ms
  x  as a, inside BEGIN ... COMMIT                          (reference)
  b  one entry per transaction, every entry on 2 hot accounts  target >= 1,500 entries/s
  c  micro-batches: one statement posts a batch of entries  target >= 15,000 entries/s
  p  as a, but posted by pgbench (C) calling ledger_post_pair (reference: the database's own limit for a)

Scenario p sends scenario a's statement (the same function, arguments and fold) from pgbench's 16 clients
instead of Python's: the gap between a and p is what the Python client costs on the shared cores. Its
entries carry a placeholder content hash (pgbench cannot compute the canonical hash), so its scratch
database would fail ``paysvc ledger verify``; it is dropped after the run like the others.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

import asyncpg

import ledger
from ledger import EntryDraft, Posting
from load.service import ADMIN_DSN, LOOP, dsn_for
from load.service import run as run_on_loop
from paysvc.migrate import migrate

WRITERS = 16
N_ACCOUNTS = 10_000


@dataclass
class Result:
    name: str
    target: str
    entries: int = 0
    commits: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    deadlocks: int = 0
    errors: int = 0
    trial_balance: str = "?"
    balances_exact: bool = False
    client_cpu: float = 0.0  # CPU seconds the client (this process, or pgbench in p) used while writing

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] * 1000


def _draft(debit: str, credit: str, amount: int, n: int) -> EntryDraft:
    return EntryDraft(
        kind="payment.captured", description=f"bench payment {n}", effective_at=datetime.now(timezone.utc),
        postings=(Posting(account=debit, side="debit", amount=amount, currency="KHR"),
                  Posting(account=credit, side="credit", amount=amount, currency="KHR")),
    )


def _accounts() -> tuple[list[str], list[str]]:
    debit = [f"provider:p{i:05d}:clearing:KHR" for i in range(N_ACCOUNTS // 2)]
    credit = [f"agency:A{i:05d}:revenue:KHR" for i in range(N_ACCOUNTS // 2)]
    return debit, credit


async def _seed(dsn: str) -> None:
    """Create the 10,000 accounts (and their balance rows) up front, as a running service would have them."""
    debit, credit = _accounts()
    conn = await asyncpg.connect(dsn)
    try:
        for i in range(0, len(debit), 500):
            async with conn.transaction():
                await ledger.post_entries(conn, [_draft(d, c, 1, 0) for d, c in zip(debit[i:i + 500],
                                                                                 credit[i:i + 500])])
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def _check(dsn: str, r: Result) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        tb = await ledger.trial_balance(conn)
        r.trial_balance = ", ".join(f"{t.currency} {t.debits - t.credits:+d}" for t in tb.totals) or "empty"
        mismatched = await conn.fetchval(
            """SELECT count(*) FROM ledger_balances b
                 LEFT JOIN (SELECT account_id, sum(amount) FILTER (WHERE side = 'debit') AS d,
                                   sum(amount) FILTER (WHERE side = 'credit') AS c
                              FROM ledger_postings GROUP BY account_id) s ON s.account_id = b.account_id
                WHERE b.debits <> coalesce(s.d, 0) OR b.credits <> coalesce(s.c, 0)""")
        r.balances_exact = mismatched == 0 and tb.balanced
    finally:
        await conn.close()


# One entry per transaction, scenario a's accounts drawn at random, sent as the library sends a two-posting entry
# (ledger_post_pair), as pgbench's script. pgbench reads every ':name' in a command as a variable, string
# literals included, so the account codes are spelled with ';' and translated to ':' by the server.
_DEBIT = "translate('provider;p' || lpad(:d::text, 5, '0') || ';clearing;KHR', ';', chr(58))"
_CREDIT = "translate('agency;A' || lpad(:c::text, 5, '0') || ';revenue;KHR', ';', chr(58))"
_PGBENCH_POST = f"""\\set d random(0, {N_ACCOUNTS // 2 - 1})
\\set c random(0, {N_ACCOUNTS // 2 - 1})
\\set amount random(100, 500000)
SELECT * FROM ledger_post_pair('payment.captured', 'bench payment', now(), NULL, NULL, NULL, NULL,
  sha256(random()::text::bytea), {_DEBIT}, 'debit', {_CREDIT}, :amount::bigint, 'KHR', :fold_now::boolean);
"""


async def _run(dsn: str, r: Result, seconds: float, make_batch, explicit: bool, fold_now: bool) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(WRITERS)]
    stop = time.perf_counter() + seconds
    rng = random.Random(7)

    async def writer(conn: asyncpg.Connection, w: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            batch = make_batch(rng, n)
            n += 1
            t0 = time.perf_counter()
            try:
                if explicit:
                    async with conn.transaction():
                        await ledger.post_entries(conn, batch, fold_now=fold_now)
                else:
                    # one statement outside a transaction block is a transaction of its own: the entries,
                    # their postings and the balance fold commit together in one round trip
                    await ledger.post_entries(conn, batch, fold_now=fold_now)
            except asyncpg.DeadlockDetectedError:
                r.deadlocks += 1
                continue
            except asyncpg.PostgresError as exc:
                r.errors += 1
                print(f"writer {w}: {exc!r}", file=sys.stderr)
                continue
            r.latencies.append(time.perf_counter() - t0)
            r.commits += 1
            r.entries += len(batch)

    started, cpu0 = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*(writer(c, i) for i, c in enumerate(conns)))
    finally:
        r.seconds = time.perf_counter() - started
        r.client_cpu = time.process_time() - cpu0
        for c in conns:
            await c.close()


async def _scenario(name: str, target: str, seconds: float, make_batch, explicit: bool, fold_now: bool) -> Result:
    db = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{db}"')
    try:
        dsn = dsn_for(db)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        await _seed(dsn)
        r = Result(name, target)
        before = await admin.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", db)
        if make_batch is None:
            await asyncio.to_thread(_pgbench_post, db, r, seconds, fold_now)
        else:
            await _run(dsn, r, seconds, make_batch, explicit, fold_now)
        await _check(dsn, r)
        after = await admin.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", db)
        r.deadlocks = max(r.deadlocks, (after or 0) - (before or 0))
        return r
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


def _pgbench_env() -> dict[str, str]:
    u = urlparse(ADMIN_DSN)
    socket_dir = parse_qs(u.query).get("host", [None])[0]
    env = dict(os.environ, PGHOST=socket_dir or u.hostname or "127.0.0.1", PGPORT=str(u.port or 5432),
               PGUSER=u.username or "postgres")
    if u.password:
        env["PGPASSWORD"] = u.password
    return env


def _pgbench_post(db: str, r: Result, seconds: float, fold_now: bool) -> None:
    """Scenario p: pgbench's clients call ledger_post_pair as scenario a's writers do; fills ``r`` from its logs."""
    exe = shutil.which("pgbench")
    if exe is None:
        r.errors = 1
        print("scenario p: pgbench not found", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "post.sql")
        with open(script, "w") as f:
            f.write(_PGBENCH_POST)
        # -n: no vacuum of pgbench's own tables (there are none here); -M prepared, as asyncpg prepares
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [exe, "-n", "-M", "prepared", "-f", script, "-D", f"fold_now={'true' if fold_now else 'false'}",
             "-c", str(WRITERS), "-j", "2", "-T", str(int(seconds)), "-l", "--log-prefix", os.path.join(tmp, "log"),
             db], env=_pgbench_env(), capture_output=True, text=True)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r.client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        if out.returncode != 0:
            r.errors = 1
            print(f"scenario p: pgbench exited {out.returncode}: {out.stderr.strip()[-500:]}", file=sys.stderr)
        m = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
        r.entries = r.commits = int(m.group(1)) if m else 0
        r.seconds = int(seconds)
        for name in os.listdir(tmp):
            if name.startswith("log"):
                with open(os.path.join(tmp, name)) as f:
                    # client, transaction number, latency in µs, script, epoch seconds, µs
                    r.latencies.extend(int(line.split()[2]) / 1e6 for line in f)


def pgbench_tpcb(seconds: float, scale: int = 16) -> tuple[float, str]:
    """pgbench's TPC-B-like run with 16 clients on a scratch database of its own: the machine's speed at the
    moment, as (transactions/s, a note). NaN when pgbench is not installed."""
    exe = shutil.which("pgbench")
    if exe is None:
        return float("nan"), "pgbench not found"
    env = _pgbench_env()
    db = f"ledger_bench_pgb_{uuid.uuid4().hex[:8]}"
    subprocess.run(["createdb", db], env=env, check=True)
    try:
        subprocess.run([exe, "-i", "-q", "-s", str(scale), db], env=env, check=True, capture_output=True)
        out = subprocess.run([exe, "-c", str(WRITERS), "-j", "2", "-T", str(int(seconds)), db], env=env,
                             check=True, capture_output=True, text=True).stdout
        m = re.search(r"tps = ([\d.]+)", out)
        lat = re.search(r"latency average = ([\d.]+) ms", out)
        return (float(m.group(1)) if m else float("nan")), (f"avg latency {lat.group(1)} ms" if lat else "")
    finally:
        subprocess.run(["dropdb", "--force", db], env=env, check=False)


def _table(results: list[Result], pgb_tps: float, pgb_note: str, scale: int) -> str:
    head = (f"{'scenario':<44} {'entries/s':>10} {'commits/s':>10} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
            f"{'deadlk':>6} {'errors':>6} {'trial balance':>14} {'balances':>9} {'x pgbench':>9} {'client':>6}  target")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.name:<44} {r.rate:>10,.0f} {r.commits / r.seconds:>10,.0f} {r.pct(.50):>7.2f} {r.pct(.95):>7.2f} "
            f"{r.pct(.99):>7.2f} {r.deadlocks:>6} {r.errors:>6} {r.trial_balance:>14} "
            f"{'exact' if r.balances_exact else 'WRONG':>9} {r.rate / pgb_tps:>9.2f} {r.client_cpu / r.seconds:>6.2f}  "
            f"{r.target}")
    lines.append(f"{'pgbench TPC-B-like, -c 16 -j 2, scale ' + str(scale):<44} {pgb_tps:>10,.0f}  tx/s ({pgb_note})")
    return "\n".join(lines)


async def _settings() -> str:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        rows = await conn.fetch("""SELECT name, setting FROM pg_settings WHERE name IN
            ('synchronous_commit', 'fsync', 'shared_buffers', 'max_connections', 'wal_level', 'server_version')""")
        return ", ".join(f"{r['name']}={r['setting']}" for r in rows)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="duration of each scenario (default 10)")
    ap.add_argument("--batch", type=int, default=100, help="entries per statement in scenario c (default 100)")
    ap.add_argument("--pgbench-scale", type=int, default=16, help="pgbench -i -s (default 16: one branch per client)")
    ap.add_argument("--only", default="axbcp", help="scenarios to run, e.g. 'ac' (default axbcp)")
    ap.add_argument("--fold-at-commit", action="store_true",
                    help="post without fold_now: balances checked and folded by the commit-time trigger")
    args = ap.parse_args(argv)

    debit, credit = _accounts()

    def spread(rng: random.Random, n: int) -> list[EntryDraft]:
        return [_draft(rng.choice(debit), rng.choice(credit), rng.randint(100, 500_000), n)]

    def hot(rng: random.Random, n: int) -> list[EntryDraft]:
        return [_draft(debit[0], credit[0], rng.randint(100, 500_000), n)]

    def batch(rng: random.Random, n: int) -> list[EntryDraft]:
        return [_draft(rng.choice(debit), rng.choice(credit), rng.randint(100, 500_000), n)
                for _ in range(args.batch)]

    scenarios = {
        "a": (f"a) 1 entry/tx, {N_ACCOUNTS:,} accounts", ">= 5,000/s, p99 < 20 ms", spread, False),
        "x": ("x) as a), BEGIN + post + COMMIT", "(reference: 3 round trips)", spread, True),
        "b": ("b) 1 entry/tx, 2 hot accounts", ">= 1,500/s", hot, False),
        "c": (f"c) micro-batch {args.batch} entries/statement", ">= 15,000/s", batch, False),
        "p": ("p) as a), posted by pgbench calling ledger_post_pair", "(reference: without Python)", None, False),
    }
    fold_now = not args.fold_at_commit
    print(f"ledger benchmark: {WRITERS} writers on {LOOP}, {args.seconds:.0f} s per scenario, {os.cpu_count()} "
          f"cores; balances folded {'in the posting statement (fold_now)' if fold_now else 'at commit'}; "
          f"PostgreSQL {run_on_loop(_settings())}; connecting to {ADMIN_DSN}", flush=True)
    results = []
    for key in args.only:
        name, target, make, explicit = scenarios[key]
        print(f"running {name} ...", flush=True)
        results.append(run_on_loop(_scenario(name, target, args.seconds, make, explicit, fold_now)))
    print(f"running pgbench for {args.seconds:.0f} s ...", flush=True)
    pgb_tps, pgb_note = pgbench_tpcb(args.seconds, args.pgbench_scale)
    print()
    print(_table(results, pgb_tps, pgb_note, args.pgbench_scale))
    ok = all(r.balances_exact and r.deadlocks == 0 and r.errors == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
