"""Command-line mistakes end with one line saying what to fix and a non-zero exit, never a traceback; the
service says it is listening only once it is."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import asyncpg
import pytest

from tests.service_process import free_port, service_env


def run(dsn: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paysvc", *args], env=service_env(dsn, free_port(), **env),
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(out: subprocess.CompletedProcess, code: int, *says: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for s in says:
        assert s in out.stderr, out.stderr


@pytest.mark.parametrize("env, says", [
    ({"PAYSVC_PROVIDERS": "sandbox,nope"}, ("PAYSVC_PROVIDERS", "'nope'")),
    ({"PAYSVC_SANDBOX_SECRET": ","}, ("PAYSVC_SANDBOX_SECRET", "at least one secret")),
])
def test_serve_with_bad_provider_settings_names_the_variable_and_never_says_listening(db_dsn, env, says):
    out = run(db_dsn, "serve", **env)
    assert_clean_failure(out, 2, *says)
    assert "listening" not in out.stderr


def test_serve_on_a_busy_port_does_not_claim_to_be_listening(db_dsn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "paysvc", "serve"], env=service_env(db_dsn, port),
                             capture_output=True, text=True, timeout=60)
    assert_clean_failure(out, 1, "cannot listen", "PAYSVC_PORT")
    assert "listening" not in out.stderr


def test_importing_a_settlement_file_that_is_not_there(db_dsn, tmp_path):
    out = run(db_dsn, "settlements", "import", "--provider", "sandbox", "--date", "2026-11-24",
              str(tmp_path / "missing.csv"))
    assert_clean_failure(out, 1, "cannot read the settlement file", "No such file")


@pytest.mark.parametrize("args, says", [
    (("inv_x?y",), "is not an invoice id"),
    (("../../etc",), "is not an invoice id"),
    (("inv_abc", "--url", "notaurl"), "cannot reach notaurl"),
])
def test_sandbox_pay_refuses_what_it_cannot_pay(db_dsn, args, says):
    out = run(db_dsn, "sandbox", "pay", *args)
    assert_clean_failure(out, 1, says)


@pytest.mark.parametrize("scope", ["treasury", "admin"])
def test_an_agency_key_cannot_carry_a_scope_that_reads_across_agencies(db_dsn, scope):
    """Found by review: `keys create --agency MOH --scope treasury` made an agency's key that read every
    agency's settlements and exceptions, though an agency's key never sees another agency's data."""
    out = run(db_dsn, "agencies", "add", "MOH", "--name", "Health", "--name-km", "Health",
              "--bakong-account", "moh@nbcq")
    assert out.returncode == 0, out.stderr
    out = run(db_dsn, "keys", "create", "--agency", "MOH", "--scope", scope)
    assert_clean_failure(out, 1, "cannot be given to an agency's key")
    assert "psk_" not in out.stdout


async def test_serve_refuses_to_start_without_a_key_its_stored_payers_use(api, invoice_body):
    """Found by review: dropping a key from PAYSVC_PII_KEYS that rows still used made reads of those invoices
    a 500 (a cancel committed, then answered 500) and stalled deliveries to webhooks whose secret it sealed."""
    import asyncio
    import base64
    import os

    from tests.conftest import TEST_PII_KEYS

    portal = await api.portal("MOI")
    r = await api.client.post("/v1/invoices", json=invoice_body(payer={"name": "Sok Dara"}), headers=portal)
    assert r.status == 201
    used = TEST_PII_KEYS.split(":", 1)[0]
    other = "k9:" + base64.b64encode(os.urandom(32)).decode()
    out = await asyncio.to_thread(run, api.dsn, "serve", PAYSVC_PII_KEYS=other)
    assert_clean_failure(out, 2, "PAYSVC_PII_KEYS", used)
    assert "listening" not in out.stderr
    # The right id with other bytes (found by an operator's walk-through: it started, then answered 500)
    wrong = f"{other},{used}:" + base64.b64encode(os.urandom(32)).decode()
    out = await asyncio.to_thread(run, api.dsn, "serve", PAYSVC_PII_KEYS=wrong)
    assert_clean_failure(out, 2, f"PAYSVC_PII_KEYS: key '{used}' does not decrypt what was stored under it (invoice ")
    assert "listening" not in out.stderr


# The broker, as the events commands meet it (found by a consumer's walk-through: each ended in a traceback).

def _broker_url(user_password: str = "guest:guest", vhost: str = "") -> str:
    from tests.test_events_support import AMQP_URL
    from urllib.parse import urlsplit

    parts = urlsplit(AMQP_URL)
    return f"amqp://{user_password}@{parts.hostname}:{parts.port or 5672}/{vhost}"


@pytest.mark.parametrize("url, says", [
    (_broker_url("guest:not-the-password"), ("refused the user and password", "PAYSVC_AMQP_URL")),
    (_broker_url(vhost="paysvc_no_such_vhost"), ("virtual host 'paysvc_no_such_vhost'", "does that virtual host exist")),
    ("amqp://guest:guest@127.0.0.1:1/", ("cannot use the broker at 127.0.0.1:1",)),
])
def test_events_declare_says_what_the_broker_refused_in_one_line(db_dsn, url, says):
    out = run(db_dsn, "events", "declare", "--agency", "MOI", PAYSVC_AMQP_URL=url)
    assert_clean_failure(out, 1, *says)
    assert "not-the-password" not in out.stderr


def test_events_tail_says_how_to_declare_a_queue_that_is_not_there(db_dsn):
    import http.server
    import threading
    import uuid

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            body = b'{"keys": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        keys_url = f"http://127.0.0.1:{server.server_address[1]}/v1/keys/events"
        prefix = f"test.cli.{uuid.uuid4().hex[:8]}."
        out = run(db_dsn, "events", "tail", "--agency", "moi", "--keys-url", keys_url, "--idle-exit", "1",
                  PAYSVC_AMQP_URL=_broker_url(), PAYSVC_EVENTS_QUEUE_PREFIX=prefix)
        assert_clean_failure(out, 1, f"has no queue '{prefix}moi'", "upper case", "paysvc events declare --agency moi")
    finally:
        server.shutdown()
    out = run(db_dsn, "events", "tail", "--agency", "MOI", "--keys-url", "http://127.0.0.1:1/v1/keys/events",
              PAYSVC_AMQP_URL=_broker_url())
    assert_clean_failure(out, 1, "cannot read the public keys from http://127.0.0.1:1/v1/keys/events", "--keys-url")


# A database or broker setting that cannot work stops a command with one line naming it (found by an operator's
# walk-through: each of these ended in a traceback, or started and failed later).

@pytest.mark.parametrize("env, says", [
    ({"PAYSVC_DATABASE_URL": "notaurl"}, "PAYSVC_DATABASE_URL: must be a PostgreSQL URL"),
    ({"PAYSVC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}, "PAYSVC_DATABASE_URL: cannot connect to 127.0.0.1:1/x"),
    ({"PAYSVC_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/paysvc_no_such_db"},
     'database "paysvc_no_such_db" does not exist'),
    ({"PAYSVC_DB_POOL_MIN": "30"}, "PAYSVC_DB_POOL_MAX: must be at least PAYSVC_DB_POOL_MIN (30)"),
    ({"PAYSVC_AMQP_URL": "notaurl"}, "PAYSVC_AMQP_URL: must be a broker URL"),
])
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_or_broker_setting_that_cannot_work_is_named_in_one_line(db_dsn, env, says, command):
    out = run(db_dsn, command, **env)
    assert out.returncode in (1, 2), out.stderr
    assert_clean_failure(out, out.returncode, says)
    assert "Value error" not in out.stderr and "listening" not in out.stderr


def test_serve_on_a_host_that_is_not_this_machines_names_the_host_setting(db_dsn):
    out = run(db_dsn, "serve", PAYSVC_HOST="no.such.host.invalid")
    assert_clean_failure(out, 1, "cannot listen on no.such.host.invalid", "set PAYSVC_HOST")
    assert "PAYSVC_PORT" not in out.stderr and "listening" not in out.stderr


def test_revoking_a_key_given_whole_never_prints_its_secret(db_dsn):
    """Found by a security review: `keys revoke psk_…` printed the whole key back."""
    key = run(db_dsn, "keys", "create", "--name", "Treasury desk", "--scope", "treasury").stdout.strip()
    key_id, secret = key.split("_")[1], key.split("_", 2)[2]
    out = run(db_dsn, "keys", "revoke", key)
    assert out.returncode == 0 and f"revoked key {key_id}" in out.stderr, out.stderr
    assert secret not in out.stderr + out.stdout
    again = run(db_dsn, "keys", "revoke", key)                 # refused: nor then (found by review)
    assert_clean_failure(again, 1, f"no active key with id '{key_id}'")
    assert secret not in again.stderr + again.stdout
    for pasted in (f" {key}", f"Bearer {key}"):                # pasted as it came: found, never echoed
        out = run(db_dsn, "keys", "revoke", pasted)
        assert_clean_failure(out, 1, f"no active key with id '{key_id}'")
        assert secret not in out.stderr + out.stdout
    other = run(db_dsn, "keys", "create", "--name", "Second desk", "--scope", "treasury").stdout.strip()
    out = run(db_dsn, "keys", "revoke", f"Bearer {other}")
    assert out.returncode == 0 and f"revoked key {other.split('_')[1]}" in out.stderr, out.stderr
    out = run(db_dsn, "keys", "revoke", "not a key " + secret)
    assert_clean_failure(out, 1, "give a key's id")
    assert secret not in out.stderr


def test_recheck_refuses_a_provider_that_is_not_registered(db_dsn):
    """Found by a walk-through: a misspelt provider checked nothing and printed "raised 0", every day."""
    out = run(db_dsn, "settlements", "recheck", "--provider", "sandbx")
    assert_clean_failure(out, 1, "'sandbx' is not a registered provider", "sandbox")
    assert "raised" not in out.stdout


def test_recheck_refuses_a_day_that_has_not_begun(db_dsn):
    """Found by a walk-through: checking as a later day raised missing_in_settlement for payments still within
    their grace."""
    from datetime import timedelta

    from paysvc.invoicing import now_utc
    from paysvc.settlement_days import business_date, parse_cutoff

    today = business_date(now_utc(), parse_cutoff("23:59:59.999"))  # the default cut-off
    for day in (today + timedelta(days=1), today + timedelta(days=30)):
        out = run(db_dsn, "settlements", "recheck", "--provider", "sandbox", "--today", day.isoformat())
        assert_clean_failure(out, 1, f"--today {day.isoformat()} has not begun yet", "leave --today out")
        assert "raised" not in out.stdout
    out = run(db_dsn, "settlements", "recheck", "--provider", "sandbox", "--today", today.isoformat())
    assert out.returncode == 0 and "raised 0 missing_in_settlement" in out.stdout, out.stderr


def test_serve_names_every_missing_required_setting_at_once(db_dsn):
    """Found by an operator's walk-through: it took three failed starts to learn of the three settings a real
    database and broker require."""
    env = service_env(db_dsn, free_port(), PAYSVC_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/")
    del env["PAYSVC_PII_KEYS"], env["PAYSVC_SANDBOX_SECRET"]
    out = subprocess.run([sys.executable, "-m", "paysvc", "serve"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert_clean_failure(out, 2, "paysvc: PAYSVC_PII_KEYS: required", "paysvc: PAYSVC_SANDBOX_SECRET: required",
                         "paysvc: PAYSVC_EVENT_SIGNING_KEYS: required")
    assert "listening" not in out.stderr


@pytest.mark.parametrize("command", [["ledger", "verify"], ["ledger", "reconcile"], ["ledger", "export"],
                                     ["ledger", "trial-balance"], ["ledger", "journal"]])
def test_the_ledgers_read_commands_refuse_a_database_not_migrated_and_change_nothing(db_dsn, command):
    """Found by a review of the docs: these commands checked no migration, and a new version's verify or journal
    on a database not yet migrated failed on the old schema without saying why. They only read, so they do not
    migrate either (an auditor checking a restored copy must not alter it)."""
    async def newest(drop: bool) -> str:
        conn = await asyncpg.connect(db_dsn)
        try:
            version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
            if drop:  # as if this database were one version behind the code
                await conn.execute("DELETE FROM schema_migrations WHERE version = $1", version)
            return version
        finally:
            await conn.close()

    last = asyncio.run(newest(drop=True))
    out = run(db_dsn, *command)
    assert_clean_failure(out, 1, "not migrated to this version of paysvc", "run `paysvc migrate`")
    assert out.stdout == ""
    assert asyncio.run(newest(drop=False)) != last  # not applied


def test_a_ledger_read_command_as_a_role_that_may_not_read_the_migrations_says_what_to_grant(db_dsn):
    """Found by review: an auditor's role granted the ledger's tables only was told to migrate the database."""
    import uuid

    from tests.conftest import ADMIN_DSN

    name = f"paysvc_auditor_{uuid.uuid4().hex[:8]}"

    async def role(create: bool) -> None:
        admin, db = await asyncpg.connect(ADMIN_DSN), await asyncpg.connect(db_dsn)
        try:
            if create:
                await admin.execute(f'CREATE ROLE "{name}" LOGIN')
                await db.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{name}"')
                await db.execute(f'REVOKE SELECT ON schema_migrations FROM "{name}"')
            else:
                await db.execute(f'DROP OWNED BY "{name}"')
                await admin.execute(f'DROP ROLE "{name}"')
        finally:
            await admin.close()
            await db.close()

    asyncio.run(role(create=True))
    try:
        base, _, dbname = db_dsn.rpartition("/")
        out = run(f"{base.replace('postgres@', f'{name}@')}/{dbname}", "ledger", "trial-balance")
        assert_clean_failure(out, 1, "may not read schema_migrations", "grant it SELECT on schema_migrations")
    finally:
        asyncio.run(role(create=False))
