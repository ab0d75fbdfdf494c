"""The migration runner: order, checksums, one transaction per file, concurrent runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import asyncpg
import pytest

from ledger.sql import load_blocks
from paysvc.migrate import MigrationError, load_migrations, migrate, migrations_dir
from tests.conftest import TEST_PII_KEYS


@pytest.fixture
def mig_dir(tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_b.sql").write_text("CREATE TABLE b (x int); INSERT INTO a VALUES (1);")
    return tmp_path


@pytest.fixture
async def empty_db(db_dsn):
    conn = await asyncpg.connect(db_dsn)
    await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    yield conn
    await conn.close()


async def migrate_before(conn: asyncpg.Connection, tmp_path, first: str) -> None:
    """Apply the project's migrations numbered before ``first`` (e.g. "0038"): a database as it was then."""
    import shutil

    before = tmp_path / "before"
    before.mkdir()
    for m in sorted(migrations_dir().glob("*.sql")):
        if m.name < first:
            shutil.copy(m, before / m.name)
    await migrate(conn, before)


async def test_applies_in_order_and_records_checksums(empty_db, mig_dir):
    assert await migrate(empty_db, mig_dir) == ["0001_a", "0002_b"]
    rows = await empty_db.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(1, "a"), (2, "b")]
    assert all(len(r["checksum"]) == 64 for r in rows)
    assert await migrate(empty_db, mig_dir) == []


async def test_refuses_a_changed_applied_file(empty_db, mig_dir):
    await migrate(empty_db, mig_dir)
    (mig_dir / "0001_a.sql").write_text("CREATE TABLE a (x bigint);")
    with pytest.raises(MigrationError, match="0001_a.sql was changed"):
        await migrate(empty_db, mig_dir)


async def test_each_file_in_its_own_transaction(empty_db, mig_dir):
    (mig_dir / "0003_bad.sql").write_text("CREATE TABLE c (x int); SELECT 1/0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, mig_dir)
    applied = [r["version"] for r in await empty_db.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    assert applied == [1, 2]
    assert await empty_db.fetchval("SELECT to_regclass('c')") is None


async def test_concurrent_runs_are_safe(db_dsn, mig_dir):
    admin = await asyncpg.connect(db_dsn)
    await admin.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    conns = [await asyncpg.connect(db_dsn) for _ in range(4)]
    results = await asyncio.gather(*(migrate(c, mig_dir) for c in conns))
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]
    assert await admin.fetchval("SELECT count(*) FROM a") == 1
    for c in conns + [admin]:
        await c.close()


def test_bad_file_name_is_refused(tmp_path):
    (tmp_path / "1_x.sql").write_text("")
    with pytest.raises(MigrationError, match="NNNN_name.sql"):
        load_migrations(tmp_path)


def test_project_migrations_are_numbered_from_one():
    versions = [m.version for m in load_migrations(migrations_dir())]
    assert versions == list(range(1, len(versions) + 1))


def test_cli_migrate_and_bad_setting(db_dsn):
    env = {**os.environ, "PAYSVC_DATABASE_URL": db_dsn, "PAYSVC_PII_KEYS": TEST_PII_KEYS}
    out = subprocess.run([sys.executable, "-m", "paysvc", "migrate"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "paysvc", "migrate"], env={**env, "PAYSVC_PORT": "eighty"},
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "PAYSVC_PORT" in bad.stderr and "Traceback" not in bad.stderr


def test_an_empty_migrations_folder_is_an_error_not_an_empty_schema(tmp_path):
    with pytest.raises(MigrationError, match="no migration files"):
        load_migrations(tmp_path)


def test_installed_package_carries_its_migrations(tmp_path):
    """A wheel built from the project holds the migrations, and the runner finds them there."""
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), root],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("paysvc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("paysvc/migrations/") and n.endswith(".sql"))
    assert [n.rsplit("/", 1)[1] for n in shipped] == sorted(p.name for p in migrations_dir().glob("*.sql"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run(
        [sys.executable, "-c", "from paysvc.migrate import load_migrations; print(len(load_migrations()))"],
        capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.returncode == 0, probe.stderr
    assert int(probe.stdout) == len(shipped)



async def test_event_data_stored_as_a_json_string_is_turned_back_into_its_object(db):
    # Migration 0020 repairs events that a capture wrote double-encoded; run its SQL again on such a row.
    from paysvc.agencies import add_agency

    await add_agency(db, code="MOI", name="Interior", name_km="មហាផ្ទៃ", bakong_account="moi@nbcq")
    agency = await db.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
    body = {"invoice_id": "inv_1", "status": "paid"}
    for data in (json.dumps(body), body):  # a string holding the object (what the bug wrote), and the object
        await db.execute("INSERT INTO outbox_events (id, agency_id, type, occurred_at, data) "
                         "VALUES (gen_random_uuid(), $1, 'invoice.paid', now(), $2)", agency, data)
    await db.execute((migrations_dir() / "0020_outbox_event_data_as_objects.sql").read_text())
    rows = await db.fetch("SELECT jsonb_typeof(data) AS t, data FROM outbox_events ORDER BY pos")
    assert [(r["t"], r["data"]) for r in rows] == [("object", body), ("object", body)]


async def test_payments_stored_without_their_code_are_numbered_on_it(empty_db, tmp_path):
    # Migration 0038: before it, a code's second payment was stored without the code's md5. It takes the md5 its
    # notice named when that is a code of its invoice, numbered after the first (whose number stays NULL, read as
    # 1); other payments keep theirs. A third payment captured after the migration is numbered after them.
    await migrate_before(empty_db, tmp_path, "0038")
    from paysvc.agencies import add_agency

    await add_agency(empty_db, code="MOI", name="Interior", name_km="មហាផ្ទៃ", bakong_account="moi@nbcq")
    agency = await empty_db.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
    md5, other = "a" * 32, "b" * 32
    for inv, code in (("inv_1", md5), ("inv_2", other)):
        await empty_db.execute(
            "INSERT INTO invoices (id, bill_number, agency_id, reference, description, currency, amount, expires_at)"
            " VALUES ($1, 'PS' || lpad(nextval('invoice_number_seq')::text, 8, '0'), $2, $1, 'fee', 'KHR', 100,"
            " now() + interval '1 hour')", inv, agency)
        await empty_db.execute(
            "INSERT INTO khqr_codes (md5, invoice_id, payload, to_account, currency, amount, created_at, expires_at)"
            " VALUES ($1, $2, 'x', 'moi@nbcq', 'KHR', 100, now(), now() + interval '1 hour')", code, inv)
    rows = [  # id, md5 column, md5 its notice named, invoice, captured (seconds ago)
        ("pay_first", md5, md5, "inv_1", 30), ("pay_third", None, md5, "inv_1", 10),
        ("pay_second", None, md5, "inv_1", 20), ("pay_other_invoice", None, other, "inv_1", 5),
        ("pay_unknown", None, "c" * 32, None, 5)]
    for pid, col, named, inv, ago in rows:
        await empty_db.execute(
            "INSERT INTO payments (id, provider, provider_transaction_id, invoice_id, agency_id, khqr_md5, currency,"
            " amount, applied_amount, suspense_amount, paid_at, captured_at, source, evidence)"
            " VALUES ($1, 'sandbox', $1, $2, $3, $4, 'KHR', 100, 0, 100, now(), now() - make_interval(secs => $5),"
            " 'callback', jsonb_build_object('notice', jsonb_build_object('md5', $6::text)))",
            pid, inv, agency if inv else None, col, ago, named)
    await migrate(empty_db)
    got = {r["id"]: (r["khqr_md5"], r["khqr_seq"])
           for r in await empty_db.fetch("SELECT id, khqr_md5, khqr_seq FROM payments")}
    assert got == {"pay_first": (md5, None),  # read as 1: not rewritten
                   "pay_second": (md5, 2), "pay_third": (md5, 3),
                   "pay_other_invoice": (None, None),  # names a code of another invoice
                   "pay_unknown": (None, None)}
    seq = await empty_db.fetchval(
        "SELECT (on_code -> -1 ->> 'seq')::int FROM (" + load_blocks("paysvc.queries")["capture_target"] + ") t",
        md5, None, "sandbox", "none")
    assert seq == 3


async def _post_through_ledger_post(conn: asyncpg.Connection, *drafts, fold_now: bool = False) -> None:
    """Post as the library did before migration 0058, through ledger_post: on a database migrated only to before
    it, ledger_post_pair does not exist yet."""
    from ledger.canonical import content_hash
    from ledger.journal import _post

    await _post(conn, drafts, [content_hash(d) for d in drafts], fold_now)


def _capture(n: int, agency: str, amount: int = 100):
    from ledger import entries

    return entries.payment_captured(provider="sandbox", agency=agency, amount=amount, currency="KHR",
                                    effective_at=datetime(2026, 11, 25, 5, 0, tzinfo=timezone.utc),
                                    invoice_id=f"inv_{n}", payment_id=f"pay_{n}")


@pytest.mark.parametrize("analyzed", [True, False])
async def test_ledger_accounts_get_their_slots_and_entries_keep_their_rules(empty_db, tmp_path, analyzed):
    # Migrations 0055 and 0056, on a ledger written before them: every account gets its 16 balance slots
    # (balances and their posting counts unchanged), an entry's effective time keeps its rule and constraint name
    # (now a domain's), and ledger_entries is neither rewritten nor reindexed. Its statistics are gathered again
    # when it had some (the column's type change drops them); a table never analyzed stays so (plans on a new
    # database, 0017).
    import ledger

    await migrate_before(empty_db, tmp_path, "0055")
    for n in range(40):
        await _post_through_ledger_post(empty_db, _capture(n, f"A{n % 3}", 100 + n))
    if analyzed:
        await empty_db.execute("ANALYZE ledger_entries")
    balances = await empty_db.fetch("SELECT * FROM ledger_balances ORDER BY account_id")
    assert await empty_db.fetchval("SELECT count(*) FROM ledger_balance_slots") < 4 * 16
    files = "SELECT c.relname, c.relfilenode FROM pg_class c WHERE c.relname LIKE 'ledger_entries%' ORDER BY 1"
    files_before = await empty_db.fetch(files)

    await migrate(empty_db)
    assert await empty_db.fetch(files) == files_before
    assert await empty_db.fetch("SELECT * FROM ledger_balances ORDER BY account_id") == balances
    per_account = await empty_db.fetch(
        "SELECT account_id, count(*) AS n FROM ledger_balance_slots GROUP BY account_id ORDER BY account_id")
    assert [r["n"] for r in per_account] == [16] * 4
    assert (await ledger.verify(empty_db)).ok
    stats = await empty_db.fetchval(
        "SELECT count(*) FROM pg_stats WHERE tablename = 'ledger_entries' AND attname = 'effective_at'")
    reltuples = await empty_db.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'ledger_entries'")
    assert (stats, reltuples) == ((1, 40) if analyzed else (0, -1))
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await empty_db.execute("INSERT INTO ledger_entries (kind, description, effective_at, "
                               "content_hash, posting_count) VALUES ('raw', 'x', 'infinity', decode(repeat('00', 32), "
                               "'hex'), 2)")
    assert err.value.constraint_name == "ledger_entries_effective_at_in_range"


async def test_ledger_migrations_0055_and_0056_while_writers_post(empty_db, db_dsn, tmp_path):
    # Found by review: as one migration, writing the missing slot rows and then waiting for ledger_entries' lock
    # deadlocked with writers folding into those rows. Two writers post (folded now and at commit, some to new
    # accounts) into 1,500 accounts that lack most slots while the two migrations run: none fails.
    import random

    import ledger

    await migrate_before(empty_db, tmp_path, "0055")
    accounts = 1500
    for b in range(0, accounts, 100):
        await _post_through_ledger_post(empty_db, *[_capture(i, f"A{i}") for i in range(b, b + 100)])
    stop = asyncio.Event()
    errors: list[str] = []
    posted = [0, 0]

    async def writer(k: int) -> None:
        conn = await asyncpg.connect(db_dsn)
        rng, n = random.Random(k), 10**6 * (k + 1)
        try:
            while not stop.is_set():
                n += 1
                try:
                    await _post_through_ledger_post(conn, _capture(n, f"A{rng.randrange(accounts + 100)}"),
                                                    fold_now=n % 2 == 0)
                    posted[k] += 1
                except asyncpg.PostgresError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(k)) for k in range(2)]
    await asyncio.sleep(0.3)
    applied = await migrate(empty_db)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*writers)
    assert [a[:4] for a in applied][:2] == ["0055", "0056"]  # and any later ones, applied the same way
    assert errors == [] and min(posted) > 0
    assert await empty_db.fetchval("SELECT count(*) FROM ledger_balance_slots") == 16 * await empty_db.fetchval(
        "SELECT count(*) FROM ledger_accounts")
    assert (await ledger.verify(empty_db)).ok
