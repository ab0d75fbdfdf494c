"""``paysvc sandbox pay``: pay an invoice's current KHQR code as a citizen's bank would.

It reads the code the payment page shows, decodes it like a bank app (refusing an expired or
malformed code), and sends the sandbox provider's signed callback to the running service.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from datetime import UTC, datetime

from paysvc.settings import Settings


INVOICE_ID = re.compile(r"inv_[A-Za-z0-9_-]{1,100}")


class SandboxError(Exception):
    pass


async def _json(r) -> dict:
    """The answer's JSON object; SandboxError when it is not one (another server on that address, say)."""
    try:
        doc = await r.json(content_type=None)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise SandboxError(f"{r.url} answered HTTP {r.status} with something other than paysvc's JSON: is --url "
                           "the paysvc service?")
    return doc


async def pay(settings: Settings, invoice_id: str, amount: int | None, base_url: str, payload: str | None = None,
              *, late: bool = False) -> dict:
    """Pay the invoice's current code, or with ``payload`` that code (one a citizen still has on screen: of an
    invoice paid or cancelled since, say), as a bank app would: an expired or malformed code is refused, unless
    ``late`` (a bank whose report comes after the code, or the invoice, ran out: the payment is dated now)."""
    import aiohttp

    from paysvc import khqr
    from paysvc.provider_settings import sandbox_secrets
    from providers.sandbox import sign

    if not INVOICE_ID.fullmatch(invoice_id):
        raise SandboxError(f"{invoice_id!r} is not an invoice id (they look like inv_ followed by letters and digits)")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.get(f"{base_url}/pay/{invoice_id}/state") as r:
            state = await _json(r)
            if r.status != 200:
                raise SandboxError(f"cannot read invoice {invoice_id}: {state.get('detail', f'HTTP {r.status}')}")
        if payload is None:
            if state.get("status") != "open" or not state.get("khqr"):
                # Found by a portal developer's walk-through: with --late already given, this told them to add it.
                how = ("--late needs the code itself: pass the code it issued before (the khqr.payload your portal "
                       "got when it created the invoice) with --code" if late else
                       "to pay a code it issued before, as a citizen may, pass it with --code; add --late for one "
                       "that has run out")
                raise SandboxError(f"invoice {invoice_id} is {state.get('status')}: there is no code to pay ({how})")
            payload = state["khqr"]["payload"]
        try:
            code = khqr.decode(payload, now_ms=None if late else int(time.time() * 1000))
        except khqr.KhqrError as exc:
            hint = " (to report it paid anyway, as a bank that reports late would, add --late)" \
                if exc.code == "expired" else ""
            raise SandboxError(f"a bank app would refuse this code: {exc.reason}{hint}") from None
        body = json.dumps({
            "transaction_id": "sbx_" + uuid.uuid4().hex,
            "md5": khqr.md5(payload),
            "bill_number": code.bill_number,
            "amount": amount if amount is not None else code.amount,
            "currency": code.currency,
            "to_account": code.bakong_account_id,
            "paid_at": datetime.now(UTC).isoformat(),
        }).encode()
        headers = {"Content-Type": "application/json",
                   "Sandbox-Signature": sign(sandbox_secrets(settings)[0], body, int(time.time()))}
        async with http.post(f"{base_url}/v1/providers/sandbox/callbacks", data=body, headers=headers) as r:
            out = await _json(r)
            if r.status >= 300:
                raise SandboxError(f"the service refused the callback ({r.status}): {out.get('detail')}")
            return out


def cmd_pay(settings: Settings, args) -> int:
    import aiohttp

    base = (args.url or settings.base_url).rstrip("/")
    try:
        out = asyncio.run(pay(settings, args.invoice_id, args.amount, base, args.code, late=args.late))
    except SandboxError as exc:
        print(f"paysvc sandbox: {exc}", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError) as exc:
        print(f"paysvc sandbox: cannot reach {base}: {exc}; is `paysvc serve` running, and is --url its base URL "
              "(e.g. http://127.0.0.1:8080)?", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def register(sub) -> None:
    sb = sub.add_parser("sandbox", help="the sandbox bank simulator").add_subparsers(dest="action", required=True)
    p = sb.add_parser("pay", help="pay an invoice's current KHQR as a citizen's bank would (signed callback)")
    p.add_argument("invoice_id")
    p.add_argument("--amount", type=int, help="pay this many minor units instead of the code's amount")
    p.add_argument("--code", metavar="KHQR", help="pay this code of the invoice (its khqr.payload, e.g. from the "
                                                  "create answer) instead of its current one: a code still on a "
                                                  "citizen's screen after the invoice was paid or cancelled")
    p.add_argument("--late", action="store_true",
                   help="pay it even if the code has run out, dated now: a bank that reports a payment late (how "
                        "to try invoice_expired)")
    p.add_argument("--url", help="the service's base URL (default: PAYSVC_PUBLIC_URL or http://HOST:PORT)")
    p.set_defaults(func=cmd_pay)
