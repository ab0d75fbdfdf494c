"""Building signed sandbox callbacks the way a bank would, straight from the documented scheme."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime

from paysvc import khqr
from tests.conftest import TEST_SANDBOX_SECRET


def sandbox_body(invoice: dict, *, amount: int | None = None, currency: str | None = None,
                 to_account: str | None = None, md5: str | None = None, txid: str | None = None,
                 paid_at: datetime | None = None) -> bytes:
    code = khqr.decode(invoice["khqr"]["payload"]) if invoice.get("khqr") else None
    return json.dumps({
        "transaction_id": txid or uuid.uuid4().hex,
        "md5": md5 if md5 is not None else invoice["khqr"]["md5"],
        "bill_number": invoice["bill_number"],
        "amount": amount if amount is not None else invoice["amount"],
        "currency": currency or invoice["currency"],
        "to_account": to_account or (code.bakong_account_id if code else "moi@nbcq"),
        "paid_at": (paid_at or datetime.now(UTC)).isoformat(),
    }).encode()


def sandbox_headers(body: bytes, *, secret: str = TEST_SANDBOX_SECRET, t: int | None = None) -> dict[str, str]:
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Sandbox-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


async def pay(client, invoice: dict, **kw):
    body = sandbox_body(invoice, **kw)
    return await client.post("/v1/providers/sandbox/callbacks", data=body, headers=sandbox_headers(body))


async def new_invoice(api, portal, invoice_body, **kw) -> dict:
    """Create an invoice through the API as the portal would; fail the test unless it is created."""
    r = await api.client.post("/v1/invoices", json=invoice_body(**kw), headers=portal)
    assert r.status == 201, await r.text()
    return await r.json()
