"""The ``paysvc`` command line: serve, migrate, agencies, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Iterator
from urllib.parse import urlsplit

from paysvc.settings import Settings, SettingsError, load_settings

log = logging.getLogger("paysvc")


class CliError(Exception):
    pass


def reader_gone() -> int:
    """After a BrokenPipeError on standard output (the reader went away: ``| head``): point it at devnull, as
    Python's documentation of SIGPIPE advises, so the flush at exit does not fail again; the exit status a
    shell gives a process ended by SIGPIPE."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database, or the embedded one in the data folder (stopped on exit)."""
    from paysvc.db import EmbeddedPostgres, database_dsn

    dsn = database_dsn(settings)
    if dsn is not None:
        asyncio.run(_reachable(dsn))
        yield dsn
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        yield embedded.uri
    finally:
        embedded.close()


async def _reachable(dsn: str) -> None:
    """Connect once, so that a database that cannot be used stops the command with one line naming the setting
    (found by an operator's walk-through: a bad URL, a refused connection or a missing database ended in a
    traceback)."""
    import asyncpg

    parts = urlsplit(dsn)
    try:
        where = f"{parts.hostname or 'the local socket'}:{parts.port or 5432}{parts.path or ''}"
    except ValueError:
        where = "the URL given"
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError as exc:
        why = f"{exc} (create it, or name another in the URL)"
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        why = f"{exc} (check the user and password in the URL)"
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError) as exc:
        why = str(exc) or type(exc).__name__
    else:
        await conn.close()
        return
    raise CliError(f"PAYSVC_DATABASE_URL: cannot connect to {where}: {why}")


async def _migrate(dsn: str, settings: Settings | None = None) -> list[str]:
    from paysvc.db import connect
    from paysvc.migrate import migrate

    async with connect(dsn) as conn:
        return await migrate(conn, settings.migrations_dir if settings else None)


async def _require_migrated(dsn: str, settings: Settings | None = None) -> None:
    """For commands that only read (the ledger's verify, reconcile, export, trial-balance, journal): the database
    must be at this version's migrations, and is never changed, not even by its owner: an auditor checking a
    restored copy must not alter it (found by a review of the docs: these commands checked nothing, and on a
    database not yet migrated failed on the old schema, not saying why)."""
    from paysvc.db import connect
    from paysvc.migrate import up_to_date

    async with connect(dsn) as conn:
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL "
                               "AND NOT has_table_privilege('schema_migrations', 'SELECT')"):
            # Found by review: such a role (an auditor's, granted the ledger only) was told to migrate.
            raise CliError("this role may not read schema_migrations, which says whether the database is at this "
                           "version of paysvc: grant it SELECT on schema_migrations")
        if not await up_to_date(conn, settings.migrations_dir if settings else None):
            raise CliError("the database is not migrated to this version of paysvc: run `paysvc migrate` (as the "
                           "database's owner) first; this command only reads and changes nothing")


def cmd_migrate(settings: Settings, args) -> int:
    with database(settings) as dsn:
        applied = asyncio.run(_migrate(dsn, settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def check_required(settings: Settings) -> None:
    """With a real database, every setting it requires that is missing or malformed, named at once (found by an
    operator's walk-through: three failed starts to learn of PAYSVC_PII_KEYS, PAYSVC_SANDBOX_SECRET and
    PAYSVC_EVENT_SIGNING_KEYS one by one). Without one, the demo makes its own keys in its data folder."""
    from paysvc.event_keys import signer_from_settings
    from paysvc.pii import cipher_from_settings
    from paysvc.provider_settings import provider_config

    if settings.database_url is None:
        return
    problems = []
    for check in (cipher_from_settings, provider_config, signer_from_settings):
        try:
            check(settings)
        except SettingsError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("\npaysvc: ".join(problems))


def cmd_serve(settings: Settings, args) -> int:
    from aiohttp import web

    from paysvc.app import create_app

    check_required(settings)
    with database(settings) as dsn:
        applied = asyncio.run(_migrate(dsn, settings))
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        app = create_app(settings, dsn)

        def listening(_aiohttp_message: str) -> None:  # called once the port is bound and startup is done
            print(f"paysvc listening on {settings.base_url}  (Ctrl-C to stop)", file=sys.stderr)
            if settings.links_guessed:
                log.warning("PAYSVC_PUBLIC_URL is not set: the payment links and QR image URLs handed to portals "
                            "name %s; set it to the address citizens' phones reach this service at",
                            settings.base_url)

        async def stopping(_app: web.Application) -> None:
            # Said when it starts and ends (found by an operator's walk-through: a stop left no line in the log)
            print("paysvc stopping: no new connections; finishing the requests in progress", file=sys.stderr)

        app.on_shutdown.append(stopping)
        try:
            web.run_app(app, host=settings.host, port=settings.port, print=listening, access_log=None,
                        loop=_event_loop(settings))
            print("paysvc stopped", file=sys.stderr)
        except OSError as exc:
            import errno

            fix = ("set PAYSVC_PORT to a free port" if exc.errno == errno.EADDRINUSE else
                   "set PAYSVC_PORT to a port this user may open (above 1023 unless privileged)"
                   if exc.errno == errno.EACCES else
                   "set PAYSVC_HOST to an address of this machine (0.0.0.0 for all, 127.0.0.1 for this one only)")
            raise CliError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}; {fix}") from None
    return 0


def _event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (Linux and macOS), else asyncio's own."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; serving on asyncio's own event loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _agencies_add(dsn: str, args) -> str:
    from paysvc import agencies
    from paysvc.db import connect

    async with connect(dsn) as conn:
        return await agencies.add_agency(
            conn, code=args.code, name=args.name, name_km=args.name_km, bakong_account=args.bakong_account,
            merchant_id=args.merchant_id, acquiring_bank=args.acquiring_bank, mcc=args.mcc, city=args.city,
        )


def cmd_agencies_add(settings: Settings, args) -> int:
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        print(asyncio.run(_agencies_add(dsn, args)))
    if settings.amqp_url is None:
        print("no PAYSVC_AMQP_URL: the agency's queue will be declared by `paysvc events declare` or the relay",
              file=sys.stderr)
        return 0
    from paysvc.relay import declare_agency_queue

    try:
        queue = asyncio.run(declare_agency_queue(
            settings.amqp_url.get_secret_value(), args.code, exchange=settings.events_exchange,
            queue_prefix=settings.events_queue_prefix))
    except Exception as exc:  # the agency exists; the queue can be declared later
        from paysvc.relay import broker_error

        why = broker_error(exc, settings.amqp_url.get_secret_value()) or str(exc)
        raise CliError(f"agency added, but its queue could not be declared ({why}); "
                       f"run `paysvc events declare --agency {args.code}` when the broker is reachable") from None
    print(f"queue {queue} bound to {args.code}.# on exchange {settings.events_exchange}", file=sys.stderr)
    return 0


async def _agencies_list(dsn: str) -> list:
    from paysvc.db import connect

    async with connect(dsn) as conn:
        return await conn.fetch("SELECT code, name, name_km, bakong_account, merchant_id, mcc, city FROM agencies ORDER BY code")


def cmd_agencies_list(settings: Settings, args) -> int:
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        for r in asyncio.run(_agencies_list(dsn)):
            tag = "30" if r["merchant_id"] else "29"
            print(f"{r['code']}\t{r['name']}\t{r['name_km']}\t{r['bakong_account']}\ttag {tag}\tmcc {r['mcc']}\t{r['city']}")
    return 0


async def _keys_create(dsn: str, args) -> str:
    from paysvc.auth import create_key
    from paysvc.db import connect

    async with connect(dsn) as conn:
        name = args.name or (f"{args.agency} portal" if args.agency else "key")
        _, full = await create_key(conn, name=name, scopes=args.scope, agency_code=args.agency)
        return full


def cmd_keys_create(settings: Settings, args) -> int:
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        key = asyncio.run(_keys_create(dsn, args))
    print(key)  # the key alone on stdout, so scripts can capture it
    print("store this key now: it is not shown again", file=sys.stderr)
    return 0


async def _keys_revoke(dsn: str, key_id: str) -> bool:
    from paysvc.auth import revoke_key
    from paysvc.db import connect

    async with connect(dsn) as conn:
        return await revoke_key(conn, key_id)


def cmd_keys_revoke(settings: Settings, args) -> int:
    import re

    # Named by its id alone in what is printed, however the whole key was pasted (with spaces, a "Bearer "
    # before it: found by review), and never echoed when it is neither a key nor an id: it may hold a secret.
    given = args.key_id.strip()
    found = re.search(r"psk_([0-9a-f]+)_", given)
    key_id = found.group(1) if found else given if re.fullmatch(r"[0-9a-f]{1,64}", given) else None
    if key_id is None:
        raise CliError("give a key's id (as `paysvc keys list` shows it) or the whole key (psk_…)")
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        if not asyncio.run(_keys_revoke(dsn, key_id)):
            raise CliError(f"no active key with id {key_id!r}")
    print(f"revoked key {key_id}", file=sys.stderr)
    return 0


async def _keys_list(dsn: str) -> list:
    from paysvc.db import connect

    async with connect(dsn) as conn:
        return await conn.fetch(
            """SELECT k.id, k.name, k.scopes, a.code, k.created_at, k.revoked_at
                 FROM api_keys k LEFT JOIN agencies a ON a.id = k.agency_id ORDER BY k.created_at""")


def cmd_keys_list(settings: Settings, args) -> int:
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        for r in asyncio.run(_keys_list(dsn)):
            state = f"revoked {r['revoked_at']:%Y-%m-%d}" if r["revoked_at"] else "active"
            print(f"{r['id']}\t{r['name']}\t{r['code'] or '-'}\t{','.join(r['scopes'])}\t{state}")
    return 0


def cmd_pii_reencrypt(settings: Settings, args) -> int:
    from paysvc.db import create_pool
    from paysvc.pii import cipher_from_settings, reencrypt_stored

    cipher = cipher_from_settings(settings)

    async def run(dsn: str) -> dict[str, int]:
        pool = await create_pool(dsn, settings)
        try:
            return await reencrypt_stored(pool, cipher)
        finally:
            await pool.close()

    from cryptography.exceptions import InvalidTag

    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        try:
            moved = asyncio.run(run(dsn))
        except LookupError as exc:
            raise CliError(f"PAYSVC_PII_KEYS: {exc}; give every key stored rows use, the new one first") from None
        except InvalidTag:
            raise CliError("PAYSVC_PII_KEYS: a key does not decrypt what was stored under its id: give the keys as "
                           "they were, the new one first") from None
        except RuntimeError as exc:
            raise CliError(str(exc)) from None
    print(f"stored again under key {cipher.active_key_id}: {moved['invoices']} payers, {moved['webhooks']} webhook "
          "secrets; keys other than it are now used only by idempotency records (kept "
          f"{settings.idempotency_retention_hours:g} hours)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paysvc", description="Payment core: invoices, KHQR, ledger, reconciliation.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="migrate and run the HTTP service")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("migrate", help="apply pending database migrations")
    s.set_defaults(func=cmd_migrate)

    ag = sub.add_parser("agencies", help="manage agencies").add_subparsers(dest="action", required=True)
    a = ag.add_parser("add", help="add an agency (tag 29 without --merchant-id, tag 30 with one)")
    a.add_argument("code", help="short upper-case code, e.g. MOI")
    a.add_argument("--name", required=True, help="merchant name shown by bank apps (≤ 25 characters)")
    a.add_argument("--name-km", required=True, help="Khmer name (≤ 25 characters)")
    a.add_argument("--bakong-account", required=True, help="Bakong account id, name@bank")
    a.add_argument("--merchant-id", help="corporate merchant id (makes codes use tag 30)")
    a.add_argument("--acquiring-bank", help="acquiring bank (required with --merchant-id)")
    a.add_argument("--mcc", default="9399", help="merchant category code (default 9399, government services)")
    a.add_argument("--city", default="Phnom Penh", help="merchant city (≤ 15 characters)")
    a.set_defaults(func=cmd_agencies_add)
    a = ag.add_parser("list", help="list agencies")
    a.set_defaults(func=cmd_agencies_list)

    ks = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    k = ks.add_parser("create", help="create an API key; prints the key alone on standard output")
    k.add_argument("--agency", help="agency code the key belongs to (portal keys)")
    k.add_argument("--name", help="who uses the key, e.g. 'Passport portal' or 'Treasury desk'")
    k.add_argument("--scope", action="append", required=True,
                   help="invoices:write, invoices:read, treasury or admin (repeat for several)")
    k.set_defaults(func=cmd_keys_create)
    k = ks.add_parser("revoke", help="revoke a key (by its id or the whole key)")
    k.add_argument("key_id")
    k.set_defaults(func=cmd_keys_revoke)
    k = ks.add_parser("list", help="list keys (ids, names, scopes; never the secrets)")
    k.set_defaults(func=cmd_keys_list)

    pi = sub.add_parser("pii", help="payer data keys").add_subparsers(dest="action", required=True)
    k = pi.add_parser("reencrypt", help="store every payer and webhook secret again under the first key of "
                                        "PAYSVC_PII_KEYS, so that an older key can be removed")
    k.set_defaults(func=cmd_pii_reencrypt)

    from paysvc import cli_events, cli_ledger, cli_sandbox

    cli_ledger.register(sub)
    cli_events.register(sub)
    cli_sandbox.register(sub)
    from paysvc import cli_exceptions, cli_settlements

    cli_settlements.register(sub)
    cli_exceptions.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from paysvc.logs import setup_logging

    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        return args.func(settings, args)
    except SettingsError as exc:
        print(f"paysvc: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"paysvc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from paysvc.errors import Problem
        from paysvc.migrate import MigrationError

        if isinstance(exc, (Problem, MigrationError)):
            print(f"paysvc: {getattr(exc, 'detail', exc)}", file=sys.stderr)
            return 1
        raise
