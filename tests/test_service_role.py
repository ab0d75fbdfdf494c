"""The service runs as a member of paysvc_app: it can do its work, and cannot rewrite the journal."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.conftest import ADMIN_DSN, running_api
from tests.payments_helpers import pay


@pytest.fixture
async def app_login(db_dsn):
    """A login role that is a member of paysvc_app, and a DSN for the test database as that role."""
    name = f"paysvc_login_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE paysvc_app')
    try:
        base, _, dbname = db_dsn.rpartition("/")
        yield f"{base.replace('postgres@', f'{name}@')}/{dbname}"
    finally:
        await admin.execute(f'DROP OWNED BY "{name}"')
        await admin.execute(f'DROP ROLE "{name}"')
        await admin.close()


async def test_invoices_payments_and_events_work_as_the_service_role(db_dsn, app_login, invoice_body):
    async with running_api(db_dsn) as setup:          # agencies and keys are made by an operator
        h = await setup.portal("MOI")
    async with running_api(app_login) as api:          # the service itself, as paysvc_app
        r = await api.client.post("/v1/invoices", json=invoice_body(), headers=h)
        assert r.status == 201, await r.text()
        inv = await r.json()
        r = await pay(api.client, inv)
        assert r.status == 200, await r.text()
        got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=h)).json()
        assert got["status"] == "paid"
        assert (await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=h)).status == 409
        feed = await (await api.client.get("/v1/events", params={"after": "0"}, headers=h)).json()
        assert [e["type"] for e in feed["data"]] == ["invoice.created", "invoice.paid", "journal.posted"]
    conn = await asyncpg.connect(app_login)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE ledger_postings SET amount = amount + 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE ledger_balance_slots SET debits = 0")
    finally:
        await conn.close()


def test_the_service_starts_as_the_service_role_and_leaves_migrating_to_the_owner(db_dsn, app_login):
    """Found by an operator's walk-through: `paysvc serve` began by creating the migration history table, so it
    could not start as a member of paysvc_app at all (permission denied for schema public)."""
    import asyncio

    from tests.service_process import ServiceProcess
    from tests.test_cli_errors import assert_clean_failure, run

    svc = ServiceProcess(app_login).start()                  # ready: /readyz answered 200
    svc.stop()
    out = run(app_login, "migrate")
    assert out.returncode == 0 and "database is up to date" in out.stdout, out.stderr

    async def forget_the_last_migration() -> None:
        admin = await asyncpg.connect(db_dsn)
        try:
            await admin.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM "
                                "schema_migrations)")
        finally:
            await admin.close()

    asyncio.run(forget_the_last_migration())
    for command in ("migrate", "serve"):
        out = run(app_login, command)
        assert_clean_failure(out, 1, "the database needs migrating and this role may not change its schema",
                             "run `paysvc migrate` as the database's owner")


@pytest.mark.parametrize("change, says", [
    ("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'from_a_newer_version', 'x')",
     "database has migrations this code does not know: [9999]; upgrade paysvc"),
    ("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
     "migration 0001_invoicing.sql was changed after it was applied"),
])
def test_the_service_role_is_told_what_is_wrong_with_a_history_it_cannot_continue(db_dsn, app_login, change, says):
    """Found by review: each was reported as 'needs migrating' (run paysvc migrate), which cannot help."""
    import asyncio

    from tests.test_cli_errors import assert_clean_failure, run

    async def edit() -> None:
        admin = await asyncpg.connect(db_dsn)
        try:
            await admin.execute(change)
        finally:
            await admin.close()

    asyncio.run(edit())
    assert_clean_failure(run(app_login, "migrate"), 1, says)


async def test_the_service_role_starting_while_the_owner_migrates_waits_and_finds_it_done(db_dsn, app_login):
    """Found by review: it failed with 'may not change its schema' although the owner was finishing."""
    import asyncio

    from paysvc.migrate import _LOCK_KEY
    from tests.test_cli_errors import run

    owner = await asyncpg.connect(db_dsn)
    try:
        row = await owner.fetchrow("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM "
                                   "schema_migrations) RETURNING version, name, checksum")
        await owner.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)       # the owner's migrate, under way
        started = asyncio.create_task(asyncio.to_thread(run, app_login, "migrate"))
        await asyncio.sleep(2)
        assert not started.done()                                           # it waits for the owner
        await owner.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)", *row)
        await owner.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        out = await started
        assert out.returncode == 0 and "database is up to date" in out.stdout, out.stderr
    finally:
        await owner.close()


async def test_settlement_import_and_resolutions_work_as_the_service_role(db_dsn, app_login, invoice_body):
    """Treasury's work as paysvc_app: a file imported (lines, entry, exceptions, totals written once), exceptions
    resolved and the day rechecked, under the privileges 0052 left it (found by review: nothing ran an import or
    a resolution as the service's role)."""
    from providers.sandbox import write_settlement_csv
    from tests.test_settlement import AT, issued_before, line, resolve, upload

    async with running_api(db_dsn) as setup:
        h = await setup.portal("MOI")
        treasury = {"Authorization": f"Bearer {await setup.key(None, scopes=['treasury'], name='Treasury desk')}"}
    async with running_api(app_login) as api:
        invoices = []
        for txid in ("TX-1", "TX-2"):
            inv = await issued_before(db_dsn, await (await api.client.post(
                "/v1/invoices", json=invoice_body(amount=50000), headers=h)).json(), AT)
            assert (await pay(api.client, inv, txid=txid, paid_at=AT)).status == 200
            invoices.append(inv)
        r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000), line("TX-2", 49000),
                                                              line("TX-9", 7000)]))
        assert r.status == 201, await r.text()
        opened = (await (await api.client.get("/v1/reconciliation/exceptions", params={"state": "open"},
                                              headers=treasury)).json())["data"]
        assert sorted(e["reason"] for e in opened) == ["amount_mismatch", "unknown_khqr"]   # TX-9: captured from the file
        for e in opened:
            action = "write_off" if e["reason"] == "amount_mismatch" else "refund_due"
            r = await resolve(api, treasury, e["id"], action)
            assert r.status == 200, await r.text()
    conn = await asyncpg.connect(app_login)
    try:
        assert await conn.fetchval("SELECT count(*) FROM reconciliation_exceptions WHERE state = 'resolved'") == 2
        assert await conn.fetchval("SELECT line_count FROM settlements") == 3
    finally:
        await conn.close()
