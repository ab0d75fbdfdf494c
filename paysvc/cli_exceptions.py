"""``paysvc exceptions``: treasury's reconciliation exceptions from the command line: list them, resolve one;
``paysvc refunds``: the refunds still owed back to payers, and recording one paid out.

The same rules and entries as ``POST /v1/reconciliation/exceptions/{id}/resolve``, ``POST
/v1/reconciliation/refunds`` and the treasury pages (one function does each for all three); what is done is
recorded as made by ``cli:<user>``.
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


async def _owed(settings: Settings, dsn: str, args) -> list[dict]:
    from paysvc.db import connect
    from paysvc.queries import Q

    async with connect(dsn) as conn:
        return [dict(r) for r in await conn.fetch(Q.refunds_owed, None, None, None, args.limit)]


async def _pay(settings: Settings, dsn: str, args) -> tuple[dict, bool]:
    from paysvc.api_refunds import record
    from paysvc.db import create_pool

    pool = await create_pool(dsn, settings)
    try:
        return await record(args.body, pool=pool, bank_account=settings.treasury_bank_account,
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


OWED_COLUMNS = ("case_id", "since", "outstanding", "paid", "payable", "exception_ids")


def cmd_owed(settings: Settings, args) -> int:
    from paysvc.pages import amount_display

    rows = _run(settings, _owed, args)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str, ensure_ascii=False))
        return 0
    if not rows:
        print("no refunds are owed", file=sys.stderr)
        return 0
    table = [[r["case_id"], r["since"].isoformat(timespec="seconds"), amount_display(r["currency"], r["outstanding"]),
              amount_display(r["currency"], r["paid"]), "yes" if r["payable"] else "not yet (not settled)",
              ",".join(r["exception_ids"])] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(OWED_COLUMNS)]
    for row in [list(OWED_COLUMNS), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if len(rows) == args.limit:
        print(f"(the oldest {args.limit}; --limit for more)", file=sys.stderr)
    return 0


def cmd_pay(settings: Settings, args) -> int:
    from pydantic import ValidationError

    from paysvc.api_refunds import PayoutBody
    from paysvc.cli import CliError
    from paysvc.errors import pydantic_errors

    try:
        args.body = PayoutBody(exception_id=args.exception_id, currency=args.currency, amount=args.amount,
                               reference=args.reference, note=args.note)
    except ValidationError as exc:  # the API's own checks, said with the options' names
        first = pydantic_errors(exc)[0]
        option = {"exception_id": "exception_id", "currency": "--currency", "amount": "--amount",
                  "reference": "--reference", "note": "--note"}.get(first["field"])
        raise CliError(f"{option + ': ' if option else ''}{first['message']}") from None
    payout, replayed = _run(settings, _pay, args)
    if replayed:
        print(f"this transfer was recorded before, as payout {payout['id']}: nothing new was written",
              file=sys.stderr)
    print(json.dumps(payout, indent=2, default=str, ensure_ascii=False))
    return 0


def _amount(text: str) -> int:
    import argparse

    from paysvc.api_refunds import MAX_AMOUNT, minor_units

    n = minor_units(text)
    if n is None or not 1 <= n <= MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number of minor units from 1 to 10^15")
    return n


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
    rf = sub.add_parser("refunds", help="treasury: refunds owed back to payers, and recording one paid out"
                        ).add_subparsers(dest="action_name", required=True)
    p = rf.add_parser("owed", help="what is still owed back, oldest first, and whether each can be paid yet")
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="1 to 1000 (50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_owed)
    p = rf.add_parser("pay", help="record a refund paid back by bank transfer (posts its entry); the same "
                                  "--reference again finds the first")
    p.add_argument("exception_id", help="an exception whose resolution owes money back (any of the payment's)")
    p.add_argument("--currency", required=True, choices=("KHR", "USD"))
    p.add_argument("--amount", required=True, type=_amount, help="minor units: riel, or US cents")
    p.add_argument("--reference", required=True, help="the bank's reference of the transfer")
    p.add_argument("--note", required=True, help="what was done (kept with the payout)")
    p.set_defaults(func=cmd_pay)
