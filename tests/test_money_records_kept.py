"""The records the ledger's entries stand on (invoices, codes, payments and their reports, exceptions,
settlements and their lines) are kept as written: the database refuses their removal, and any change to what a
payment, a settlement line or a settlement is, whoever asks; the service's role has no such privilege at all.

Found by an auditor's walk-through: as the service's role, a resolved exception could be deleted (its resolution
entry then had nothing behind it, and verify and reconcile passed), a settlement's lines deleted and its business
date moved."""

from __future__ import annotations

import asyncpg
import pytest

from providers.sandbox import write_settlement_csv
from tests.payments_helpers import new_invoice
from tests.test_settlement import line, paid, resolve, upload


@pytest.fixture
async def history(api, portal, treasury, invoice_body):
    """Two paid invoices and a settlement file with its lines, one settling 1,000 less (an exception, resolved)."""
    await paid(api, portal, invoice_body, "TX-1")
    await paid(api, portal, invoice_body, "TX-3")
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 50000), line("TX-3", 49000)]))
    assert r.status == 201, await r.text()
    exc = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury,
                                       params={"state": "open"})).json())["data"][0]
    assert (await resolve(api, treasury, exc["id"], "write_off")).status == 200
    conn = await asyncpg.connect(api.dsn)
    # Another channel's report of TX-1 under its own id (what a second channel's notice of one code leaves)
    await conn.execute("INSERT INTO payment_reports (provider, provider_transaction_id, payment_id, source, notice, "
                       "reported_at) SELECT 'sandbox', 'OTHER-1', id, 'poll', '{}', now() FROM payments "
                       "WHERE provider_transaction_id = 'TX-1'")
    for table in ("invoices", "khqr_codes", "payments", "payment_reports", "reconciliation_exceptions",
                  "settlements", "settlement_lines"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}"), f"no {table} row: nothing would be refused"
    assert await conn.fetchval("SELECT count(*) FROM reconciliation_exceptions WHERE state = 'resolved'")
    yield conn
    await conn.close()


REMOVALS = ["DELETE FROM invoices", "DELETE FROM khqr_codes", "DELETE FROM payments", "DELETE FROM payment_reports",
            "DELETE FROM reconciliation_exceptions WHERE state = 'resolved'", "DELETE FROM settlements",
            "DELETE FROM settlement_lines", "TRUNCATE invoices CASCADE", "TRUNCATE reconciliation_exceptions CASCADE",
            "TRUNCATE settlement_lines"]
REWRITES = ["UPDATE payments SET amount = amount + 1, applied_amount = applied_amount + 1",
            "UPDATE payments SET paid_at = paid_at - interval '1 day'",
            "UPDATE payments SET invoice_id = NULL, agency_id = NULL, applied_amount = 0, suspense_amount = amount",
            "UPDATE payment_reports SET reported_at = reported_at - interval '1 day'",
            "UPDATE settlement_lines SET amount = amount + 1",
            "UPDATE settlement_lines SET payment_id = NULL, category = 'duplicate_in_settlement'",
            "UPDATE payments SET khqr_seq = coalesce(khqr_seq, 0) + 7",
            "UPDATE settlements SET business_date = business_date - 1",
            "UPDATE settlements SET journal_entry_id = NULL",
            "UPDATE settlements SET line_count = line_count + 1",           # totals: written once, at import
            "UPDATE settlements SET summary = '{}'"]


@pytest.mark.parametrize("sql", REMOVALS + REWRITES)
async def test_the_database_refuses_to_remove_or_rewrite_them_whoever_asks(history, sql):
    before = await history.fetchval("SELECT count(*) FROM payments") if "payments" in sql else None
    with pytest.raises(asyncpg.RestrictViolationError) as refused:   # as a superuser, triggers enabled
        await history.execute(sql)
    assert "never deleted" in str(refused.value) or "cannot be changed" in str(refused.value)
    assert "correct" in (refused.value.hint or "")
    if "cannot be changed" in str(refused.value):   # it names the row (ids only: no payer data)
        named = {"payments": "row pay_", "payment_reports": "row sandbox OTHER-1 ", "settlement_lines": " line ",
                 "settlements": "row stl_"}[sql.split()[1]]
        assert named in str(refused.value), refused.value
    if before is not None:
        assert await history.fetchval("SELECT count(*) FROM payments") == before


@pytest.mark.parametrize("sql", REMOVALS + REWRITES)
async def test_the_service_role_has_no_such_privilege(history, sql):
    # It updates a settlement's totals, so what a settlement is stays guarded by the trigger alone for it
    refusal = asyncpg.RestrictViolationError if sql.startswith("UPDATE settlements") else \
        asyncpg.InsufficientPrivilegeError
    with pytest.raises(refusal):
        async with history.transaction():
            await history.execute("SET LOCAL ROLE paysvc_app")
            await history.execute(sql)


async def test_what_the_service_changes_it_still_may(history, api, portal, invoice_body):
    """A settlement's totals (once, as its import finishes), an invoice's state, and the tables the service prunes;
    and, for the owner (a migration erasing payer data), a payment's evidence and payer account and a report's
    notice."""
    assert await history.execute("UPDATE payments SET evidence = evidence || '{\"checked\": true}', "
                                 "from_account = NULL") != "UPDATE 0"
    assert await history.execute("UPDATE payment_reports SET notice = '{\"erased\": true}'") != "UPDATE 0"
    async with history.transaction():
        await history.execute("SET LOCAL ROLE paysvc_app")
        await history.execute("INSERT INTO settlements (id, provider, format, business_date, file_sha256, file_size, "
                              "imported_at, imported_by) VALUES ('stl_new', 'sandbox', 'sandbox', '2026-01-02', "
                              "sha256('x'), 1, now(), 'test')")
        assert await history.execute("UPDATE settlements SET line_count = 0, summary = '{\"lines\": []}' "
                                     "WHERE id = 'stl_new'") == "UPDATE 1"
        with pytest.raises(asyncpg.RestrictViolationError, match="settlements row stl_new cannot be changed"):
            async with history.transaction():
                await history.execute("UPDATE settlements SET line_count = 5 WHERE id = 'stl_new'")
        await history.execute("DELETE FROM idempotency_keys")
        await history.execute("DELETE FROM provider_inbox WHERE false")
        await history.execute("DELETE FROM outbox_events WHERE false")
        await history.execute("DELETE FROM treasury_sessions")
    inv = await new_invoice(api, portal, invoice_body)
    assert (await api.client.post(f"/v1/invoices/{inv['id']}/cancel", headers=portal)).status == 200


def _reconcile(dsn: str):
    from tests.test_ledger_db import run_cli

    return run_cli(dsn, "reconcile")


async def test_reconcile_finds_an_entry_without_its_record_and_a_record_without_its_entry(history, api):
    """Found by an auditor's walk-through: a resolution entry posted with no exception behind it (and, before 0052,
    an entry whose exception was deleted) passed verify and reconcile alike."""
    import asyncio
    from datetime import UTC, datetime

    import ledger

    ok = await asyncio.to_thread(_reconcile, api.dsn)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "records reconciled: each of the 2 settlement, resolution and refund entries" in ok.stdout, ok.stdout
    resolved = await history.fetchrow("SELECT id, resolution_entry_id FROM reconciliation_exceptions "
                                      "WHERE resolution_entry_id IS NOT NULL")
    settlement = await history.fetchrow("SELECT id, journal_entry_id FROM settlements")

    # 1. a resolution entry no exception names (posted through the ledger's own function, balanced and hashed)
    forged = await ledger.post_entry(history, ledger.EntryDraft(
        kind="exception_resolved", description="missing_in_ledger exc_x resolved: match_to_invoice",
        effective_at=datetime.now(UTC), idempotency_key="resolution:exc_forged", postings=[
            ledger.Posting(account="suspense:unmatched:KHR", side="debit", amount=7000, currency="KHR"),
            ledger.Posting(account="agency:MOI:revenue:KHR", side="credit", amount=7000, currency="KHR")]))
    bad = await asyncio.to_thread(_reconcile, api.dsn)
    assert bad.returncode == 1, bad.stdout
    assert f"entry {forged.id}: the resolution entry is named by 0 exceptions (0 resolved), not one" in bad.stdout
    assert "DO NOT agree" in bad.stderr

    # 2. a settlement entry reversed (found by review: reversals passed whatever they undid; the service reverses
    #    nothing but, in a correction, a capture)
    undone = await ledger.reverse_entry(history, int(settlement["journal_entry_id"]), description="undo",
                                        effective_at=datetime.now(UTC))
    bad = await asyncio.to_thread(_reconcile, api.dsn)
    assert f"entry {undone.id}: a reversal of entry {settlement['journal_entry_id']} (settlement): the service " \
        "corrects only captures so" in bad.stdout, bad.stdout

    # 3. the exception behind a real resolution entry, and the settlement behind its entry, gone or unlinked
    #    (as a superuser with triggers off: 0052 refuses it otherwise)
    await history.execute("SET session_replication_role = replica")
    await history.execute("DELETE FROM reconciliation_exceptions WHERE id = $1", resolved["id"])
    await history.execute("UPDATE settlements SET journal_entry_id = 999999 WHERE id = $1", settlement["id"])
    await history.execute("SET session_replication_role = DEFAULT")
    bad = await asyncio.to_thread(_reconcile, api.dsn)
    assert bad.returncode == 1
    assert f"entry {resolved['resolution_entry_id']}: the resolution entry is named by 0 exceptions" \
        in bad.stdout, bad.stdout
    assert f"entry {settlement['journal_entry_id']}: the settlement entry is named by 0 settlements" in bad.stdout
    assert f"settlement {settlement['id']}: the settlement's entry 999999 does not exist" in bad.stdout
