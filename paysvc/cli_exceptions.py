"""``paysvc exceptions``: treasury's reconciliation exceptions from the command line: list them, resolve one.

The same rules and entries as ``POST /v1/reconciliation/exceptions/{id}/resolve`` and the treasury pages (one
function resolves for all three); the resolution is recorded as made by ``cli:<user>``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys

from paysvc.settings import Settings

LIST_COLUMNS = ("id", "reason", "state", "provider", "business_date", "amount", "payment_id", "invoice_id")


async def _list(settings: Settings, dsn: str, args) -> list[dict]:
    from paysvc.db import connect
    from paysvc.queries import Q

    async with connect(dsn) as conn:
        rows = await conn.fetch(Q.exceptions_list, args.provider, args.date, args.reason, args.state, None, None,
                                args.limit)
    return [dict(r) for r in rows]


async def _resolve(settings: Settings, dsn: str, args) -> dict:
    from paysvc.api_reconciliation import resolve_exception
    from paysvc.db import create_pool

    pool = await create_pool(dsn, settings)
    try:
        return await resolve_exception(args.exception_id, args.body, pool=pool,
                                       bank_account=settings.treasury_bank_account,
                                       by=f"cli:{getpass.getuser()}"[:100])
    finally:
        await pool.close()


def _run(settings: Settings, fn, args):
    from paysvc.cli import _migrate, database

    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        return asyncio.run(fn(settings, dsn, args))


def cmd_list(settings: Settings, args) -> int:
    from typing import get_args

    from paysvc.api_reconciliation import Reason
    from paysvc.cli import CliError
    from paysvc.cli_settlements import _business_date
    from paysvc.pages import amount_display

    if args.reason is not None and args.reason not in get_args(Reason):
        raise CliError(f"--reason {args.reason!r} is not a reason; one of: {', '.join(get_args(Reason))}")
    if args.date is not None:
        args.date = _business_date("--date", args.date)
    rows = _run(settings, _list, args)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str, ensure_ascii=False))
        return 0
    table = [[str(r[c]) if r[c] is not None else "" for c in LIST_COLUMNS[:5]]
             + [amount_display(r["currency"], r["amount"]), r["payment_id"] or "", r["invoice_id"] or ""]
             for r in rows]
    if not table:   # found by review: max() of the header alone raised TypeError, a traceback for "none"
        print("no exceptions" + (" match" if any((args.reason, args.state, args.provider, args.date)) else ""),
              file=sys.stderr)
        return 0
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(LIST_COLUMNS)]
    for row in [list(LIST_COLUMNS), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if len(rows) == args.limit:
        print(f"(the newest {args.limit}; --limit for more, or narrow with --reason, --state, --provider, --date)",
              file=sys.stderr)
    return 0


def cmd_resolve(settings: Settings, args) -> int:
    from pydantic import ValidationError

    from paysvc.api_reconciliation import ResolveBody
    from paysvc.cli import CliError
    from paysvc.errors import pydantic_errors

    try:
        args.body = ResolveBody(action=args.action, note=args.note, invoice_id=args.invoice)
    except ValidationError as exc:  # the API's own checks, said with the options' names
        first = pydantic_errors(exc)[0]
        option = {"invoice_id": "--invoice", "note": "--note", "action": "--action"}.get(first["field"])
        raise CliError(f"{option + ': ' if option else ''}{first['message']}") from None
    out = _run(settings, _resolve, args)
    print(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    return 0


def _limit(text: str) -> int:
    import argparse

    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 1000")
    return int(text)


def register(sub) -> None:
    ex = sub.add_parser("exceptions", help="treasury: list and resolve reconciliation exceptions").add_subparsers(
        dest="action_name", required=True)
    p = ex.add_parser("list", help="the newest exceptions first (open and resolved unless --state)")
    p.add_argument("--state", choices=("open", "resolved"))
    p.add_argument("--reason", help="e.g. underpaid, amount_mismatch, missing_in_settlement")
    p.add_argument("--provider")
    p.add_argument("--date", help="business date YYYY-MM-DD")
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="1 to 1000 (50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line, evidence included")
    p.set_defaults(func=cmd_list)
    p = ex.add_parser("resolve", help="resolve an open exception (final): match_to_invoice, refund_due or write_off")
    p.add_argument("exception_id")
    p.add_argument("--action", required=True, choices=("match_to_invoice", "refund_due", "write_off"))
    p.add_argument("--note", required=True, help="why (kept with the resolution)")
    p.add_argument("--invoice", help="the invoice id, for match_to_invoice only")
    p.set_defaults(func=cmd_resolve)
