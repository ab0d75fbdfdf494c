"""Capture: turn one confirmed payment notice into a payment, exactly once.

In one transaction: the payment row (unique on provider + transaction id, and on the KHQR code it
paid), the invoice's new state, the journal entry, the reconciliation exception when something is off,
and the outbox events. The service checks amount, currency and receiving account against the code it
issued; a provider is never trusted on those.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

import ledger
import ledger.entries
from paysvc.outbox import events_args
from paysvc.queries import Q
from providers import PaymentNotice


@dataclass(frozen=True)
class Decision:
    """How a payment is booked: ``applied`` to the invoice, ``suspense`` held for treasury."""

    applied: int
    suspense: int
    reason: str | None          # why some or all went to suspense; None when all is well
    pays_invoice: bool


def decide(notice: PaymentNotice, invoice: dict | None, code: dict | None) -> Decision:
    """The pure rule: given what the provider reported and what we issued, where does the money go."""
    if invoice is None:
        return Decision(0, notice.amount, "unknown_khqr", False)
    if notice.currency != invoice["currency"]:
        return Decision(0, notice.amount, "currency_mismatch", False)
    expected_account = code["to_account"] if code is not None else invoice["bakong_account"]
    if notice.to_account is not None and notice.to_account != expected_account:
        return Decision(0, notice.amount, "account_mismatch", False)
    status = invoice["status"]
    if status == "cancelled":
        return Decision(0, notice.amount, "invoice_cancelled", False)
    if status == "paid":
        return Decision(0, notice.amount, "duplicate_payment", False)
    if status == "expired" and notice.paid_at > invoice["expires_at"]:
        # Paid after the invoice closed. A payment made in time but reported late still pays it.
        return Decision(0, notice.amount, "invoice_expired", False)
    owed = invoice["amount"] - invoice["amount_paid"]
    if notice.amount < owed:
        # Dynamic codes carry the exact amount: less than owed is not a normal partial payment.
        return Decision(0, notice.amount, "underpaid", False)
    if notice.amount > owed:
        return Decision(owed, notice.amount - owed, "overpaid", True)
    return Decision(owed, 0, None, True)


def journal_draft(notice: PaymentNotice, decision: Decision, *, agency_code: str | None, payment_id: str,
                  invoice_id: str | None) -> ledger.EntryDraft:
    """DESIGN's posting table: all owed → the agency's revenue; what is not owed → suspense."""
    if decision.suspense == 0:
        return ledger.entries.payment_captured(
            provider=notice.provider, agency=agency_code, amount=notice.amount, currency=notice.currency,
            effective_at=notice.paid_at, invoice_id=invoice_id, payment_id=payment_id)
    return ledger.entries.payment_to_suspense(
        provider=notice.provider, amount=notice.amount, currency=notice.currency, effective_at=notice.paid_at,
        payment_id=payment_id, invoice_id=invoice_id, owed=decision.applied,
        agency=agency_code if decision.applied else None,
        description=f"payment {payment_id} held in suspense: {decision.reason}")


def new_id(prefix: str) -> str:
    return f"{prefix}_" + base64.b32encode(secrets.token_bytes(15)).decode().lower()


@dataclass(frozen=True)
class CaptureResult:
    payment_id: str
    created: bool                # False: this money was already captured (a duplicate notice)
    reason: str | None
    invoice_id: str | None


async def capture(conn: asyncpg.Connection, notice: PaymentNotice, *, source: str, now: datetime,
                  inbox_id: int | None = None, flag: str | None = None,
                  completes_inbox: bool = False) -> CaptureResult:
    """Capture ``notice`` inside the caller's transaction. Idempotent per provider transaction and KHQR code.

    ``flag`` adds an exception reason even when the money matches (settlement uses it for
    ``missing_in_ledger``: captured late, from the settlement line). ``completes_inbox`` also marks the
    inbox row ``inbox_id`` processed, in the same transaction (and the same statement as the events).
    """
    done_inbox = inbox_id if completes_inbox else None
    if not notice.confirmed:
        raise ValueError("only confirmed notices are captured")
    for _ in range(2):
        # The code and its invoice (or the invoice by bill number), the invoice row locked, and the payments
        # already captured for this money: one round trip.
        target = await conn.fetchrow(Q.capture_target, notice.md5, notice.bill_number, notice.provider,
                                     notice.transaction_id)
        invoice = target if target["id"] is not None else None
        code = target if target["md5"] is not None else None
        prior = target["prior"]
        for p in prior:
            if p["provider"] == notice.provider and p["provider_transaction_id"] == notice.transaction_id:
                await _finish(conn, [], now, done_inbox)
                return CaptureResult(p["id"], False, None, p["invoice_id"])
        same = prior[0] if prior else None  # a payment already on this code
        if same is not None:
            if same["provider"] != notice.provider and same["amount"] == notice.amount \
                    and same["currency"] == notice.currency:
                # One code paid once, reported by two channels (a bank's callback and the Bakong poll): same money.
                await _finish(conn, [], now, done_inbox)
                return CaptureResult(same["id"], False, None, same["invoice_id"])
            code = None  # other money on an already-paid code: a second payment, booked on its own

        decision = decide(notice, dict(invoice) if invoice else None, dict(code) if code else None)
        if flag is not None and decision.reason is None:
            decision = Decision(decision.applied, decision.suspense, flag, decision.pays_invoice)
        payment_id = new_id("pay")
        agency_id = invoice["agency_id"] if invoice else None
        agency_code = invoice["agency_code"] if invoice else None
        invoice_id = invoice["id"] if invoice else None
        evidence: dict[str, Any] = {"notice": notice.model_dump(mode="json"), "source": source}
        # The payment, its code marked, and when it pays, the invoice's new state: one statement.
        written = await conn.fetchrow(
            Q.payment_insert, payment_id, notice.provider, notice.transaction_id, invoice_id, agency_id,
            code["md5"] if code else None, notice.bill_number, notice.currency, notice.amount, decision.applied,
            decision.suspense, notice.to_account, notice.from_account, notice.paid_at, now, source, inbox_id,
            evidence, decision.pays_invoice,
        )
        if written is not None:
            break
        # Nothing was written (the insert met a unique index). The payments above were read with the
        # statement's snapshot, taken before its wait for the invoice lock, so a capture of this money that
        # committed during that wait was not among them. This transaction holds the lock now, and a new
        # statement sees that commit: decide again from a fresh read.
    else:
        # Still in the way after a fresh read. Not expected: an insert that meets another transaction's row
        # waits for it to commit, so the second read sees it. The caller rolls back and retries.
        raise DuplicateCapture(notice.provider, notice.transaction_id)

    events: list[tuple[int, str, dict]] = []
    if decision.pays_invoice:
        events.append((agency_id, "invoice.paid", {
            "invoice_id": invoice_id, "reference": written["reference"], "bill_number": written["bill_number"],
            "status": written["status"], "currency": written["currency"], "amount": written["amount"],
            "amount_paid": written["amount_paid"], "paid_at": notice.paid_at.isoformat(), "payment_id": payment_id,
            "provider": notice.provider,
        }))
    if decision.reason is not None:
        exc_id = new_id("exc")
        await conn.execute(
            Q.exception_insert, exc_id, decision.reason, notice.provider, payment_id, invoice_id, agency_id,
            notice.currency, decision.suspense if decision.suspense else notice.amount, None,
            {"payment_id": payment_id, "notice": notice.model_dump(mode="json"),
             "invoice": _invoice_evidence(invoice), "khqr_md5": notice.md5},
            now,
        )
        if agency_id is not None:
            events.append((agency_id, "reconciliation.exception_opened", {
                "exception_id": exc_id, "reason": decision.reason, "payment_id": payment_id,
                "invoice_id": invoice_id, "currency": notice.currency, "amount": decision.suspense or notice.amount}))
    entry = await ledger.post_entry(conn, journal_draft(
        notice, decision, agency_code=agency_code, payment_id=payment_id, invoice_id=invoice_id))
    if agency_id is not None and decision.applied:
        events.append((agency_id, "journal.posted", {
            "entry_id": entry.id, "kind": entry.kind, "payment_id": payment_id, "invoice_id": invoice_id,
            "effective_at": entry.effective_at.isoformat(),
            "postings": [{"account": p.account, "side": p.side, "amount": p.amount, "currency": p.currency}
                         for p in entry.postings if p.account.startswith(f"agency:{agency_code}:")],
        }))
    await _finish(conn, events, now, done_inbox)
    return CaptureResult(payment_id, True, decision.reason, invoice_id)


async def _finish(conn: asyncpg.Connection, events: list[tuple[int, str, dict]], now: datetime,
                  inbox_id: int | None) -> None:
    """Write the outbox events and mark the inbox row processed: one statement, or none when neither applies."""
    if events or inbox_id is not None:
        ids, agencies, types, data = events_args(events)
        await conn.execute(Q.capture_events, ids, agencies, types, now, data, inbox_id)


def _invoice_evidence(invoice) -> dict | None:
    if invoice is None:
        return None
    return {"id": invoice["id"], "status": invoice["status"], "currency": invoice["currency"],
            "amount": invoice["amount"], "amount_paid": invoice["amount_paid"],
            "expires_at": invoice["expires_at"].isoformat()}


class DuplicateCapture(Exception):
    """Raised when a concurrent transaction captured the same money first; the caller rolls back."""
