"""Invoice use cases: each runs in one transaction with its KHQR code and its outbox events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from typing import Any

import asyncpg
from pydantic import TypeAdapter

from paysvc import khqr
from paysvc.db import execute_in_batches, rows_affected
from paysvc.errors import Conflict, IdempotencyInProgress, IdempotencyMismatch, InvalidState, MalformedRequest, NotFound
from paysvc.invoices import InvoiceCreate, InvoiceOut, InvoiceSummary, KhqrOut, Payer, khqr_content, khqr_window
from paysvc.outbox import add_event
from paysvc.pii import PiiCipher
from paysvc.queries import Q

log = logging.getLogger(__name__)

# A code with less than this left is not handed out again: the citizen needs time to scan and pay.
KHQR_MIN_REMAINING = timedelta(seconds=30)


@dataclass(frozen=True)
class InvoiceContext:
    """What the invoice use cases need from the running service."""

    cipher: PiiCipher
    khqr_ttl: timedelta
    base_url: str
    numbers: NumberAllocator = field(default_factory=lambda: NumberAllocator())
    agencies: AgencyCache = field(default_factory=lambda: AgencyCache())


def still_current(code_expires: datetime, invoice_expires: datetime, now: datetime) -> bool:
    """Whether to hand out the last code again rather than issue a new one: it has time left for a
    citizen to scan and pay, or no new code could outlive it (it already ends with the invoice)."""
    if code_expires <= now:
        return False
    return code_expires - now >= KHQR_MIN_REMAINING or code_expires >= invoice_expires


def now_utc() -> datetime:
    """Now, to the millisecond: KHQR timestamps carry milliseconds, so stored times match them exactly."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_invoice_id() -> str:
    # 128 random bits: the id is the only secret guarding the public QR image and payment page.
    return "inv_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def canonical_request(body: Any) -> bytes:
    """The request body as the bytes its idempotency digest is made of (keys sorted, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def request_digest_matches(ctx: InvoiceContext, stored: str, request: bytes) -> bool:
    """Whether the digest an idempotency record kept is that of this request's canonical bytes.

    Digests are keyed (``{key id}:{HMAC}``, see ``PiiCipher.keyed_digest``): the body holds the payer, and a
    plain SHA-256 of it, beside the invoice's other columns, let anyone who could read the database find the
    payer's name and phone number by trying them (found by review). Records written before kept that plain
    SHA-256 (64 hex digits, no key id): compared as such until they are pruned."""
    if ":" not in stored:
        return hmac.compare_digest(stored, hashlib.sha256(request).hexdigest())
    try:
        return ctx.cipher.digest_matches(stored, request)
    except LookupError:
        raise IdempotencyMismatch("this Idempotency-Key's first request can no longer be compared (the key its "
                                  "digest was made with is no longer configured); use a new key") from None


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def _issue_khqr(
    conn: asyncpg.Connection, ctx: InvoiceContext, agency, invoice, now: datetime, after: datetime | None
) -> KhqrOut | None:
    """Issue a fresh code for an open invoice (caller holds the invoice row lock), for what it still owes:
    its amount, less a part payment treasury applied to it."""
    # Codes of one invoice differ by their creation millisecond; keep them strictly increasing.
    created_ms = _ms(now)
    if after is not None:
        created_ms = max(created_ms, _ms(after) + 1)
    created = _from_ms(created_ms)
    expires = khqr_window(created, invoice["expires_at"], ctx.khqr_ttl)
    if expires is None:
        return None
    owed = invoice["amount"] - invoice["amount_paid"]
    for _ in range(5):
        data = khqr_content(
            agency,
            currency=invoice["currency"],
            amount=owed,
            bill=invoice["bill_number"],
            created_ms=created_ms,
            expires_ms=_ms(expires),
        )
        payload = khqr.encode(data)
        digest = khqr.md5(payload)
        inserted = await conn.fetchval(
            Q.khqr_insert, digest, invoice["id"], payload, agency["bakong_account"], invoice["currency"],
            owed, _from_ms(created_ms), _from_ms(_ms(expires)),
        )
        if inserted:
            await conn.execute(Q.invoice_set_khqr, invoice["id"], digest)
            return KhqrOut(payload=payload, md5=digest, expires_at=_from_ms(_ms(expires)))
        created_ms += 1  # same string already issued in this millisecond: move on by one
    raise RuntimeError("could not issue a unique KHQR code")


def _fields(ctx: InvoiceContext, row, khqr_out: KhqrOut | None = None) -> dict[str, Any]:
    """What a listed invoice and a single one have in common, from its row."""
    if khqr_out is None and row["status"] == "open" and row.get("khqr_payload"):
        khqr_out = KhqrOut(payload=row["khqr_payload"], md5=row["current_khqr_md5"], expires_at=row["khqr_expires_at"])
    if row["status"] != "open":
        khqr_out = None
    base = ctx.base_url
    return dict(
        id=row["id"],
        agency=row["agency_code"],
        status=row["status"],
        reference=row["reference"],
        description=row["description"],
        currency=row["currency"],
        amount=row["amount"],
        amount_paid=row["amount_paid"],
        line_items=row["line_items"],
        metadata=row["metadata"],
        bill_number=row["bill_number"],
        khqr=khqr_out,
        qr_png_url=f"{base}/v1/invoices/{row['id']}/qr.png",
        qr_svg_url=f"{base}/v1/invoices/{row['id']}/qr.svg",
        pay_url=f"{base}/pay/{row['id']}",
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        paid_at=row["paid_at"],
        cancelled_at=row["cancelled_at"],
        expired_at=row["expired_at"],
    )


def _summary(ctx: InvoiceContext, row) -> InvoiceSummary:
    return InvoiceSummary(**_fields(ctx, row))


def _out(ctx: InvoiceContext, row, *, payments: list, khqr_out: KhqrOut | None = None,
         payer: Payer | None = None) -> InvoiceOut:
    """One invoice in full: its payer (``payer``, else decrypted from ``row``) and its ``payments``."""
    if payer is None and row.get("payer_ciphertext") is not None:
        payer = stored_payer(ctx, row)
    return InvoiceOut(**_fields(ctx, row, khqr_out), payer=payer, payer_erased_at=row.get("payer_erased_at"),
                      payments=payments)


def stored_payer(ctx: InvoiceContext, row) -> Payer:
    """The invoice's payer as stored, decrypted. Not checked again: the rules a payer was accepted under may
    have changed since (found by review: a phone stored under the earlier rule made its invoice unreadable, and
    a cancel answer a 500 after it had committed)."""
    return Payer.model_construct(**ctx.cipher.decrypt(row["payer_key_id"], bytes(row["payer_ciphertext"]),
                                                      aad=row["id"]))


def _event_data(row) -> dict[str, Any]:
    return {
        "invoice_id": row["id"],
        "reference": row["reference"],
        "bill_number": row["bill_number"],
        "status": row["status"],
        "currency": row["currency"],
        "amount": row["amount"],
        "amount_paid": row["amount_paid"],
        "expires_at": row["expires_at"].isoformat(),
    }


class NumberAllocator:
    """Invoice numbers taken from the database sequence in blocks, so a new invoice costs no extra round
    trip. Numbers are unique, not gapless (a restart skips the rest of a block), like any sequence."""

    def __init__(self, block: int = 64) -> None:
        self._block = block
        self._free: list[int] = []
        self._lock = asyncio.Lock()

    async def next(self, conn: asyncpg.Connection) -> int:
        if not self._free:
            async with self._lock:
                if not self._free:
                    rows = await conn.fetch(Q.invoice_numbers, self._block)
                    self._free = [r["n"] for r in reversed(rows)]
        return self._free.pop()


class AgencyCache:
    """Agency rows by id: read on every invoice and KHQR code, changed almost never."""

    def __init__(self, ttl: float = 60.0) -> None:
        self._ttl = ttl
        self._rows: dict[int, tuple[float, Any]] = {}

    async def get(self, conn: asyncpg.Connection, agency_id: int):
        now = time.monotonic()
        hit = self._rows.get(agency_id)
        if hit is None or hit[0] < now:
            row = await conn.fetchrow(Q.agency_by_id, agency_id)
            hit = (now + self._ttl, row)
            self._rows[agency_id] = hit
        return hit[1]


def bill_number(number: int) -> str:
    """The short number a citizen's bank app shows for the invoice (KHQR tag 62.01)."""
    return f"PS{number:08d}"


async def create_invoice(
    pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int, agency_code: str, body: InvoiceCreate,
    raw: Any, idempotency_key: str | None,
) -> tuple[int, dict[str, Any], bool]:
    """Create an invoice with its first code; return (status, response body, replayed)."""
    for attempt in range(2):
        try:
            return await _create_once(pool, ctx, agency_id=agency_id, agency_code=agency_code, body=body,
                                      raw=raw, idempotency_key=idempotency_key)
        except asyncpg.UniqueViolationError as exc:
            # Our idempotency record lost to a request that committed after our first look: replay it.
            if attempt or exc.constraint_name != "idempotency_keys_pkey":
                raise
    raise AssertionError("unreachable")


async def _create_once(
    pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int, agency_code: str, body: InvoiceCreate,
    raw: Any, idempotency_key: str | None,
) -> tuple[int, dict[str, Any], bool]:
    now = now_utc()
    request = canonical_request(raw) if idempotency_key is not None else None
    # Without an Idempotency-Key the work is one statement (invoice, code and event, all or nothing), so it
    # commits on its own: no BEGIN and COMMIT round trips. A key's claim must be held until the record commits.
    async with pool.acquire() as conn, (conn.transaction() if idempotency_key is not None else nullcontext()):
        if idempotency_key is not None:
            claim = await conn.fetchrow(Q.idempotency_claim, agency_code, idempotency_key)
            if not claim["locked"]:
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still being processed; retry in a moment",
                    headers={"Retry-After": "1"})
            if claim["request_hash"] is not None:
                return await _replay(conn, ctx, claim, request, agency_code)

        agency = await ctx.agencies.get(conn, agency_id)
        number = await ctx.numbers.next(conn)
        invoice_id = new_invoice_id()
        bill = bill_number(number)
        expires_at = now + timedelta(seconds=body.expires_in)
        code_expires = khqr_window(now, expires_at, ctx.khqr_ttl)
        payload = khqr.encode(khqr_content(agency, currency=body.currency, amount=body.amount, bill=bill,
                                           created_ms=_ms(now), expires_ms=_ms(code_expires)))
        code = KhqrOut(payload=payload, md5=khqr.md5(payload), expires_at=code_expires)
        key_id = blob = None
        if body.payer is not None:
            key_id, blob = ctx.cipher.encrypt(body.payer.model_dump(exclude_none=True), aad=invoice_id)
        row = {
            "id": invoice_id, "agency_code": agency_code, "status": "open", "reference": body.reference,
            "description": body.description,
            "currency": body.currency, "amount": body.amount, "amount_paid": 0,
            "line_items": [li.model_dump() for li in body.line_items], "metadata": body.metadata,
            "bill_number": bill, "expires_at": expires_at, "created_at": now, "paid_at": None,
            "cancelled_at": None, "expired_at": None,
        }
        response = _out(ctx, row, khqr_out=code, payer=body.payer, payments=[]).model_dump(mode="json")
        # The idempotency record keeps the answer for replays, but not the payer in clear text: that is kept
        # only encrypted, in the invoice, and put back into a replay from there.
        kept = {**response, "payer": PAYER_IN_INVOICE} if response.get("payer") is not None else response
        result = await conn.fetchrow(
            Q.invoice_create, invoice_id, number, bill, agency_id, body.reference, body.description, body.currency,
            body.amount, row["line_items"], body.metadata, key_id, blob, expires_at, now, code.md5, payload,
            agency["bakong_account"], code_expires, agency_code, idempotency_key,
            ctx.cipher.keyed_digest(request) if request is not None else None, kept, uuid.uuid4(),
            _event_data(row),
        )
        if not result["created"]:
            if idempotency_key is not None:
                # The request that took this reference may be this key's own, committed after our claim's
                # snapshot was taken (while we waited for the key's lock): a fresh read finds its record.
                record = await conn.fetchrow(Q.idempotency_lookup, agency_code, idempotency_key)
                if record is not None:
                    return await _replay(conn, ctx, record, request, agency_code)
            existing = await conn.fetchval(Q.invoice_reference_owner, agency_id, body.reference)
            raise Conflict(
                f"reference {body.reference!r} is already used by invoice {existing}; references are unique per "
                "agency" + ("" if idempotency_key is not None else " (send an Idempotency-Key to retry safely)"),
                invoice_id=existing,
            )
    return 201, response, False


PAYER_IN_INVOICE = "encrypted in the invoice"  # stands for the payer in a stored idempotent answer


async def _replay(conn: asyncpg.Connection, ctx: InvoiceContext, record, request: bytes | None, agency_code: str
                  ) -> tuple[int, dict[str, Any], bool]:
    """The first answer of an idempotency key again, with its payer decrypted from the invoice."""
    if request is None or not request_digest_matches(ctx, record["request_hash"], request):
        raise IdempotencyMismatch("this Idempotency-Key was used with a different body; use a new key for a new "
                                  "request")
    response = record["response"]
    if record["status"] == 201 and "agency" not in response:
        # An answer kept before invoices named their agency (found by review); the key is the agency's own
        response = {**response, "agency": agency_code}
    if response.get("payer") == PAYER_IN_INVOICE:
        row = await conn.fetchrow(Q.invoice_get, response["id"], None)
        if row["payer_ciphertext"] is not None:
            response = {**response, "payer": stored_payer(ctx, row).model_dump(mode="json")}
        else:  # erased since (on request, or past its retention): the replay holds no payer either, and says why
            erased = InvoiceOut.model_fields["payer_erased_at"]
            response = {**response, "payer": None,
                        "payer_erased_at": TypeAdapter(erased.annotation).dump_python(row["payer_erased_at"],
                                                                                       mode="json")}
    return record["status"], response, True


async def get_invoice(pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int | None, invoice_id: str,
                      with_payer: bool = True) -> InvoiceOut:
    """One invoice: an agency's own (``agency_id``), or any agency's (None: treasury), then without its payer
    unless ``with_payer``."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(Q.invoice_get, invoice_id, agency_id)
        if row is None:
            raise NotFound(f"no invoice {invoice_id!r}" + (" for this agency" if agency_id is not None else ""))
        payments = await _payments(conn, invoice_id)
    if not with_payer:
        return InvoiceOut(**_fields(ctx, row), payer=None, payer_erased_at=row.get("payer_erased_at"),
                          payments=payments)
    return _out(ctx, row, payments=payments)


async def _payments(conn: asyncpg.Connection, invoice_id: str) -> list:
    return [dict(r) for r in await conn.fetch(Q.payments_of_invoice, invoice_id)]


def encode_cursor(created_at: datetime, invoice_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{invoice_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, _, iid = raw.partition("|")
        return datetime.fromisoformat(ts), iid
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest("cursor is not valid: pass back the next_cursor of the previous page unchanged") from None


async def list_invoices(
    pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int | None, status: str | None, reference: str | None,
    created_from: datetime | None, created_to: datetime | None, cursor: str | None, limit: int,
    bill_number: str | None = None,
) -> tuple[list[InvoiceSummary], str | None]:
    """One agency's invoices, newest first; with no ``agency_id``, the invoice of ``bill_number`` (which names
    its agency), if any."""
    after_ts = after_id = None
    if cursor:
        after_ts, after_id = decode_cursor(cursor)
    if agency_id is None:
        if bill_number is None:
            raise ValueError("list_invoices needs an agency_id or a bill_number")
        agency_id = await pool.fetchval(Q.invoice_by_bill, bill_number, column=1)
        if agency_id is None:
            return [], None
    rows = await pool.fetch(
        Q.invoice_list, agency_id, status, reference, created_from, created_to, after_ts, after_id, limit + 1,
        bill_number,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return [_summary(ctx, r) for r in rows], next_cursor


async def cancel_invoice(pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int, invoice_id: str) -> InvoiceOut:
    now = now_utc()
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(Q.invoice_lock, invoice_id, agency_id)
        if row is None:
            raise NotFound(f"no invoice {invoice_id!r} for this agency")
        if row["status"] != "open":
            raise InvalidState(f"invoice is {row['status']}; only an open invoice can be cancelled",
                               invoice_status=row["status"])
        if row["amount_paid"]:
            # Cancelling would leave that money booked to the agency for an invoice that asks for nothing more.
            raise InvalidState(f"{row['amount_paid']} of this invoice's {row['amount']} is paid (a part payment "
                               "treasury applied to it), so it cannot be cancelled: the citizen can pay the rest "
                               "with its current code",
                               invoice_status=row["status"])
        row = await conn.fetchrow(Q.invoice_cancel, invoice_id, now)
        # No money moved, so nothing is posted to the ledger.
        await add_event(conn, agency_id=row["agency_id"], type="invoice.cancelled", data=_event_data(row),
                        occurred_at=now)
        payments = await _payments(conn, invoice_id)  # held in suspense, if any was paid short
    return _out(ctx, row, payments=payments)


async def erase_payer(pool: asyncpg.Pool, ctx: InvoiceContext, *, agency_id: int, invoice_id: str) -> InvoiceOut:
    """Erase the invoice's payer details (a citizen's request): the invoice, its payments and the ledger stay.
    Erasing again changes nothing (the first erasure's time stays)."""
    async with pool.acquire() as conn:
        if await conn.fetchval(Q.invoice_erase_payer, invoice_id, agency_id, now_utc()) is None:
            raise NotFound(f"no invoice {invoice_id!r} for this agency")
        row = await conn.fetchrow(Q.invoice_get, invoice_id, agency_id)  # with its current code
        payments = await _payments(conn, invoice_id)
    log.info("payer of invoice %s erased", invoice_id, extra={"invoice_id": invoice_id})
    return _out(ctx, row, payments=payments)


async def erase_payers_past_retention(pool: asyncpg.Pool, *, retention: timedelta, batch: int = 500) -> str | None:
    """Erase the payer details of invoices final for longer than ``retention`` (a background job), in batches,
    except those an open reconciliation exception names (kept until it is resolved)."""
    now = now_utc()
    total = await execute_in_batches(pool, Q.invoices_erase_payers_past_retention, now - retention, now, batch=batch)
    return f"erased the payer of {total} invoices final for over {retention.days} days" if total else None


async def current_khqr(
    pool: asyncpg.Pool, ctx: InvoiceContext, *, invoice_id: str, agency_id: int | None
) -> tuple[dict, KhqrOut]:
    """The invoice's current code, issuing a new one when the last has expired or nearly so.

    Returns (invoice summary, code). ``agency_id`` None is the public path (QR image, payment page).
    """
    now = now_utc()
    row = await pool.fetchrow(Q.invoice_get, invoice_id, agency_id)
    if row is None:
        raise NotFound(f"no invoice {invoice_id!r}" + (" for this agency" if agency_id is not None else ""))
    if row["status"] == "open" and row["khqr_payload"] and still_current(row["khqr_expires_at"], row["expires_at"], now):
        return dict(row), KhqrOut(payload=row["khqr_payload"], md5=row["current_khqr_md5"],
                                  expires_at=row["khqr_expires_at"])
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(Q.invoice_lock, invoice_id, agency_id)
        if row["status"] != "open" or row["expires_at"] <= now:
            status = "expired" if row["status"] == "open" else row["status"]
            raise InvalidState(f"invoice is {status}; it has no payable KHQR code", invoice_status=status)
        last = await conn.fetchrow(Q.khqr_by_md5, row["current_khqr_md5"]) if row["current_khqr_md5"] else None
        if last is not None and still_current(last["expires_at"], row["expires_at"], now):
            # another request refreshed it while we waited for the lock
            return dict(row), KhqrOut(payload=last["payload"], md5=last["md5"], expires_at=last["expires_at"])
        agency = await ctx.agencies.get(conn, row["agency_id"])
        code = await _issue_khqr(conn, ctx, agency, row, now, last["created_at"] if last else None)
        if code is None:
            raise InvalidState("invoice is expired; it has no payable KHQR code", invoice_status="expired")
    return dict(row), code


async def open_expired_part_paid(conn: asyncpg.Connection, invoice_id: str, *, now: datetime,
                                 business_day: date) -> str | None:
    """Raise ``expired_part_paid`` for an expired invoice that holds part of its amount (treasury applied held
    money to it and the rest never came), unless one is open for it already; tell its agency. Returns the new
    exception's id, or None."""
    from paysvc.capture import new_id

    kept = await conn.fetchval(Q.part_paid_kept, invoice_id)
    row = await conn.fetchrow(Q.exception_open_part_paid, new_id("exc"), invoice_id, business_day, now, kept)
    if row is None:
        return None
    await add_event(conn, agency_id=row["agency_id"], type="reconciliation.exception_opened", occurred_at=now, data={
        "exception_id": row["id"], "reason": "expired_part_paid", "payment_id": None, "invoice_id": row["invoice_id"],
        "currency": row["currency"], "amount": row["amount"]})
    return row["id"]


async def expire_due(pool: asyncpg.Pool, *, cutoff: day_time | None = None, batch: int = 500) -> int:
    """Mark open invoices past their expiry as expired; one that holds part of its amount is raised to treasury
    (``expired_part_paid``, dated the business day by ``cutoff``, the settings' default without one). Safe on
    several instances (SKIP LOCKED)."""
    from paysvc.settings import Settings
    from paysvc.settlement_days import business_date, parse_cutoff

    cutoff = cutoff if cutoff is not None else parse_cutoff(Settings.model_fields["business_day_cutoff"].default)
    total = 0
    while True:
        now = now_utc()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(Q.invoices_expire_due, now, batch)
            for r in rows:
                await add_event(conn, agency_id=r["agency_id"], type="invoice.expired", data=_event_data(r),
                                occurred_at=now)
                if r["amount_paid"] > 0:
                    await open_expired_part_paid(conn, r["id"], now=now, business_day=business_date(now, cutoff))
        total += len(rows)
        if len(rows) < batch:
            return total


async def prune_idempotency_keys(pool: asyncpg.Pool, *, retention: timedelta) -> str | None:
    """Forget Idempotency-Keys older than ``retention`` (at least 24 h by settings)."""
    n = rows_affected(await pool.execute(Q.idempotency_prune, now_utc() - retention))
    return f"pruned {n} idempotency keys" if n else None
