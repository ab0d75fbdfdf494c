"""``paysvc settlements``: import a provider's settlement file, re-check overdue payments, print a report."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path

from paysvc.settings import Settings


def _enabled_providers(settings: Settings) -> dict:
    """The providers the settings enable, or none when their configuration does not load (a parser needing no
    configuration still loads on its own where it is asked for)."""
    from paysvc.provider_settings import provider_config
    from providers import load_providers

    try:
        return load_providers(provider_config(settings))
    except Exception:
        return {}


async def _import(settings: Settings, dsn: str, args) -> dict:
    from paysvc.api_settlements import SettlementFileInvalid, rules_of, run_import
    from paysvc.db import create_pool
    from paysvc.invoicing import now_utc
    from paysvc.settlement_days import business_date
    from paysvc.settlement_report import report

    data = args.data
    enabled = _enabled_providers(settings)
    pool = await create_pool(dsn, settings)
    try:
        try:
            done = await run_import(pool, enabled, settings, provider=args.provider, fmt=args.format, day=args.date,
                                    data=data, file_name=Path(args.file).name,
                                    imported_by=f"cli:{getpass.getuser()}"[:100])
        except SettlementFileInvalid as exc:
            raise SystemExit(f"paysvc settlements: {exc.detail}") from None
        rules = rules_of(settings)
        async with pool.acquire() as conn:
            out = await report(conn, done.settlement_id, rules=rules, today=business_date(now_utc(), rules.cutoff),
                               lines_limit=0)
        out["replayed"] = not done.created
        return out
    finally:
        await pool.close()


async def _recheck(settings: Settings, dsn: str, args) -> int:
    from paysvc.api_settlements import rules_of
    from paysvc.db import connect
    from paysvc.invoicing import now_utc
    from paysvc.settlement_days import business_date
    from paysvc.settlement_import import raise_overdue

    rules = rules_of(settings)
    now = now_utc()
    async with connect(dsn) as conn:
        async with conn.transaction():
            # every payment, not only those since the provider's last check: the recheck is the way to look again
            return await raise_overdue(conn, provider=args.provider, today=args.today or business_date(now, rules.cutoff),
                                       rules=rules, now=now, full=True)


async def _report(settings: Settings, dsn: str, args) -> dict | None:
    from paysvc.api_settlements import rules_of
    from paysvc.db import connect
    from paysvc.invoicing import now_utc
    from paysvc.queries import Q
    from paysvc.settlement_days import business_date
    from paysvc.settlement_report import report_csv, report

    rules = rules_of(settings)
    async with connect(dsn) as conn:
        if args.csv:
            async with conn.transaction(readonly=True):
                if await conn.fetchrow(Q.settlement_get, args.settlement_id) is None:
                    return None  # found by review: report_csv of an unknown id printed a traceback
                async for chunk in report_csv(conn, args.settlement_id, rules=rules):
                    sys.stdout.buffer.write(chunk)
            return _STREAMED
        return await report(conn, args.settlement_id, rules=rules, today=business_date(now_utc(), rules.cutoff))


def _run(settings: Settings, fn, args):
    from paysvc.cli import _migrate, database

    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        return asyncio.run(fn(settings, dsn, args))


def _business_date(option: str, text: str):
    """``text`` as a business date, with the API's bounds and message; a CliError (one line) otherwise."""
    from paysvc.api_settlements import check_business_date, iso_date
    from paysvc.cli import CliError

    try:
        day = iso_date(text)
    except ValueError:
        raise CliError(f"{option} {text!r} is not a date: write it YYYY-MM-DD") from None
    try:
        return check_business_date(day)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_import(settings: Settings, args) -> int:
    from paysvc.cli import CliError

    args.date = _business_date("--date", args.date)
    try:  # before the database starts: a wrong path is the commonest mistake
        args.data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the settlement file {args.file!r}: {exc.strerror or exc}") from None
    out = _run(settings, _import, args)
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_recheck(settings: Settings, args) -> int:
    from paysvc.api_settlements import check_provider, rules_of
    from paysvc.cli import CliError
    from paysvc.invoicing import now_utc
    from paysvc.settlement_days import TIME_ZONE_NAME, business_date

    if args.provider is not None:
        # Found by a walk-through: a misspelt provider checked nothing and said so as "raised 0", every day.
        check_provider(args.provider, _enabled_providers(settings))
    if args.today is not None:
        args.today = _business_date("--today", args.today)
        today = business_date(now_utc(), rules_of(settings).cutoff)
        if args.today > today:
            # Found by a walk-through: checking as a day to come raised missing_in_settlement for payments still
            # within their grace, which treasury could then write off or refund.
            raise CliError(f"--today {args.today.isoformat()} has not begun yet: today is {today.isoformat()} "
                           f"({TIME_ZONE_NAME}); give a day that has begun, or leave --today out")
    n = _run(settings, _recheck, args)
    print(f"raised {n} missing_in_settlement exception(s)")
    return 0


_STREAMED: dict = {}  # _report's answer once it has written the CSV to standard output


def cmd_report(settings: Settings, args) -> int:
    out = _run(settings, _report, args)
    if out is None:
        print(f"paysvc settlements: no settlement {args.settlement_id!r}", file=sys.stderr)
        return 1
    if out is not _STREAMED:
        print(json.dumps(out, indent=2, default=str))
    return 0


def register(sub) -> None:
    st = sub.add_parser("settlements", help="settlement files and reconciliation").add_subparsers(
        dest="action", required=True)
    p = st.add_parser("import", help="import a provider's settlement file for a business day; prints the report")
    p.add_argument("--provider", required=True, help="whose payments the file settles (e.g. sandbox, bakong)")
    p.add_argument("--date", required=True,
                   help="business date YYYY-MM-DD (an Asia/Phnom_Penh day, 2000-01-01 to 2099-12-31)")
    p.add_argument("--format", help="parser: a provider plugin name such as camt053 (default: the provider's own)")
    p.add_argument("file")
    p.set_defaults(func=cmd_import)
    p = st.add_parser("recheck", help="raise missing_in_settlement for payments unsettled after the grace days (reads every payment)")
    p.add_argument("--provider", help="only this provider")
    p.add_argument("--today", help="the business day to check as, YYYY-MM-DD, not after today (default: today)")
    p.set_defaults(func=cmd_recheck)
    p = st.add_parser("report", help="print a settlement's report (JSON, or --csv)")
    p.add_argument("settlement_id")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_report)
