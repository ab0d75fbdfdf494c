"""Capture: turn one confirmed payment notice into a payment, exactly once.

In one transaction: the payment row (unique on provider + transaction id, and on the KHQR code it
paid), the invoice's new state, the journal entry, the reconciliation exception when something is off,
and the outbox events. The service checks amount, currency and receiving account against the code it
issued; a provider is never trusted on those.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

import asyncpg

import ledger
import ledger.entries
from paysvc.outbox import events_args, journal_posted
from paysvc.queries import Q
from paysvc.settlement_days import business_date
from providers import PaymentNotice


@dataclass(frozen=True)
class Decision:
    """How a payment is booked: ``applied`` to the invoice, ``suspense`` held for treasury."""

    applied: int
    suspense: int
    reason: str | None          # why some or all went to suspense; None when all is well
    pays_invoice: bool
    time_trusted: bool = True   # False: the reported paid_at is implausible; book at the time received


# How far a provider's clock may be from ours: a payment reported as made up to this long before its code
# was issued, or after it reached us, is still believed.
CLOCK_SKEW = timedelta(minutes=5)


def issued_at(invoice: dict | None, code: dict | None) -> datetime | None:
    """When what was paid was issued: the code, or without one its invoice."""
    return (code or {}).get("created_at") or (invoice or {}).get("created_at")


def paid_at_plausible(notice: PaymentNotice, invoice: dict | None, code: dict | None,
                      received_at: datetime | None) -> bool:
    """False when ``notice.paid_at`` cannot be true: before the code it paid (or, without one, its invoice)
    was issued, or after the notice reached us (``received_at``), give or take ``CLOCK_SKEW``."""
    issued = issued_at(invoice, code)
    if issued is not None and notice.paid_at < issued - CLOCK_SKEW:
        return False
    return received_at is None or notice.paid_at <= received_at + CLOCK_SKEW


def decide(notice: PaymentNotice, invoice: dict | None, code: dict | None, *,
           received_at: datetime | None = None) -> Decision:
    """The pure rule: given what the provider reported and what we issued, where does the money go.

    ``code`` is the KHQR code the notice's md5 names, ``None`` when it names none or one we never issued;
    ``invoice`` is that code's invoice, or else the invoice of the notice's bill number. ``received_at``
    is when the notice reached us (``None``: not checked against it).
    """
    trusted = paid_at_plausible(notice, invoice, code, received_at)

    def to_suspense(reason: str) -> Decision:
        return Decision(0, notice.amount, reason, False, trusted)

    if invoice is None or (notice.md5 is not None and code is None):
        # No invoice, or an md5 that names no code we issued: whatever invoice its bill number names, this
        # is not a payment on anything of ours.
        return to_suspense("unknown_khqr")
    if notice.currency != invoice["currency"]:
        return to_suspense("currency_mismatch")
    expected_account = code["to_account"] if code is not None else invoice["bakong_account"]
    if notice.to_account is not None and notice.to_account != expected_account:
        return to_suspense("account_mismatch")
    status = invoice["status"]
    if status == "cancelled":
        return to_suspense("invoice_cancelled")
    if status == "paid":
        return to_suspense("duplicate_payment")
    if not trusted:
        # The time cannot say whether it was paid in time: treasury decides.
        return to_suspense("paid_at_implausible")
    if status == "expired":
        # Expired is final: the portal was told (invoice.expired) and may have issued another invoice, so money
        # that arrives now is held for treasury, who can still match it to this invoice (found by review: a
        # payment made in time but reported after the expiry job ran paid the invoice, and invoice.paid
        # followed invoice.expired).
        return to_suspense("invoice_expired")
    if notice.paid_at > invoice["expires_at"]:
        # Paid after the invoice closed, before the expiry job marked it. One made in time and reported before
        # the job ran pays it.
        return to_suspense("invoice_expired")
    owed = invoice["amount"] - invoice["amount_paid"]
    if notice.amount < owed:
        # Dynamic codes carry the exact amount: less than owed is not a normal partial payment.
        return to_suspense("underpaid")
    if notice.amount > owed:
        return Decision(owed, notice.amount - owed, "overpaid", True)
    return Decision(owed, 0, None, True)


def journal_draft(notice: PaymentNotice, decision: Decision, *, agency_code: str | None, payment_id: str,
                  invoice_id: str | None, effective_at: datetime | None = None) -> ledger.EntryDraft:
    """DESIGN's posting table: all owed → the agency's revenue; what is not owed → suspense.

    ``effective_at`` defaults to the notice's paid_at; the caller passes the time it received the notice
    when that paid_at is not to be believed."""
    effective_at = effective_at or notice.paid_at
    if decision.suspense == 0:
        return ledger.entries.payment_captured(
            provider=notice.provider, agency=agency_code, amount=notice.amount, currency=notice.currency,
            effective_at=effective_at, invoice_id=invoice_id, payment_id=payment_id)
    return ledger.entries.payment_to_suspense(
        provider=notice.provider, amount=notice.amount, currency=notice.currency, effective_at=effective_at,
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
                  completes_inbox: bool = False, received_at: datetime | None = None,
                  business_cutoff: time | None = None, listed: AbstractSet[str] = frozenset()) -> CaptureResult:
    """Capture ``notice`` inside the caller's transaction. Idempotent per provider transaction; a payment another
    channel captured already (same code, amount and currency) is kept as this channel's report of it.

    ``flag`` adds an exception reason even when the money matches (settlement uses it for
    ``missing_in_ledger``: captured late, from the settlement line). ``completes_inbox`` also marks the
    inbox row ``inbox_id`` processed, in the same transaction (and the same statement as the events).
    ``received_at`` is when the notice reached us (its callback's arrival; default ``now``): a paid_at later
    than that is not believed, and a payment whose paid_at is not believed is booked at that time.
    ``business_cutoff``: an exception opened here is dated the business day the payment is booked in (a
    conflicting notice, the day it arrived), so treasury's day pages list it before that day's file comes
    (found by review: it had no date until an import of its provider for that day gave it one). None leaves
    it undated: the settlement import dates what it captures with its file's day.
    ``listed``: the payments other lines of the settlement file being imported were taken for (see
    ``same_money``).
    """
    received_at = received_at or now
    done_inbox = inbox_id if completes_inbox else None
    if not notice.confirmed:
        raise ValueError("only confirmed notices are captured")
    events: list[tuple[int, str, dict]] = []
    for _ in range(2):
        # The code and its invoice (or the invoice by bill number), the invoice row locked, what this provider
        # transaction was captured as already, and the payments on the code: one round trip.
        target = await conn.fetchrow(Q.capture_target, notice.md5, notice.bill_number, notice.provider,
                                     notice.transaction_id)
        invoice = _invoice_of(target)
        code = _code_of(target)
        own = target["own"]
        if own is not None:
            # This money is captured already, as a payment or as another channel's report of one. A notice that
            # says the same is a retry; one that says something else is raised to treasury (once per distinct
            # notice), and nothing is booked. A settlement line is not compared, on either side: the import's
            # own categories (amount_mismatch…) say how the file differs from what was captured, and a payment
            # captured from a line holds the file's times, not those a callback or the poll reports.
            differs = _differences(own, notice) if "settlement" not in (source, own["source"]) else []
            if differs:
                await _raise_conflict(conn, own, notice, differs, source=source, now=now, events=events,
                                      business_day=business_date(now, business_cutoff)
                                      if business_cutoff is not None else None)
            await _finish(conn, events, now, done_inbox)
            return CaptureResult(own["id"], False, "conflicting_notice" if differs else None, own["invoice_id"])
        on_code = target["on_code"] if code is not None else []
        same = same_money(notice, on_code, listing=source == "settlement", listed=listed)
        if same is not None:
            # One payment reported by two channels (a bank's callback and the Bakong poll): kept as this
            # channel's report of it, nothing booked; once kept, a later notice of this provider for the same
            # code and amount is another payment. Except a settlement line (it matched none of its provider's
            # payments): the import raises it (duplicate_in_settlement) for treasury to say what it is, and no
            # report is kept. A file names its lines by its own references (a camt.053 statement: the bank's
            # reference, or its file and line), so neither "this provider reported that payment already" nor
            # "this line is that report" can be told from its id (found by review: a bank's callback kept as its
            # report of the poll's payment, then its file's line under the bank's reference was booked as a
            # second payment; and a line kept as a report made the bank's own late callback a second payment).
            if source != "settlement":
                reported = await conn.fetchval(Q.report_insert, notice.provider, notice.transaction_id,
                                               same["id"], source, inbox_id, notice.model_dump(mode="json"), now)
                if reported is None:
                    continue  # a concurrent capture took this transaction or this report first: read again
            await _finish(conn, [], now, done_inbox)
            return CaptureResult(same["id"], False, None, same["invoice_id"])
        pay_md5 = code["md5"] if code is not None else None
        # Its number on the code: after every payment on it. A concurrent capture that committed another while
        # this one waited for the invoice lock took that number: the insert meets it, and this capture reads
        # again.
        seq = max((p["seq"] for p in on_code), default=0) + 1 if pay_md5 is not None else None

        decision = decide(notice, invoice, code, received_at=received_at)
        if flag is not None and decision.reason is None:
            decision = Decision(decision.applied, decision.suspense, flag, decision.pays_invoice, decision.time_trusted)
        named_by_bill = None
        if decision.reason == "unknown_khqr" and invoice is not None:
            # The md5 names no code we issued; its bill number names an invoice. The money is not that
            # invoice's on a bill number alone: it is held unattached, and treasury is told which invoice.
            named_by_bill, invoice = invoice, None
        booked_at = notice.paid_at if decision.time_trusted else received_at
        payment_id = new_id("pay")
        agency_id = invoice["agency_id"] if invoice else None
        agency_code = invoice["agency_code"] if invoice else None
        invoice_id = invoice["id"] if invoice else None
        evidence: dict[str, Any] = {"notice": notice.model_dump(mode="json"), "source": source}
        # The payment, its code marked, and when it pays, the invoice's new state: one statement.
        written = await conn.fetchrow(
            Q.payment_insert, payment_id, notice.provider, notice.transaction_id, invoice_id, agency_id,
            pay_md5, notice.bill_number, notice.currency, notice.amount, decision.applied,
            decision.suspense, notice.to_account, notice.from_account, notice.paid_at, now, source, inbox_id,
            evidence, decision.pays_invoice, seq,
        )
        if written is not None:
            break
        # Nothing was written (the insert met a unique index, or a report of this transaction). The payments
        # above were read with the statement's snapshot, taken before its wait for the invoice lock, so a
        # capture that committed during that wait was not among them. This transaction holds the lock now, and
        # a new statement sees that commit: decide again from a fresh read.
    else:
        # Still in the way after a fresh read. Not expected: an insert that meets another transaction's row
        # waits for it to commit, so the second read sees it. The caller rolls back and retries.
        raise DuplicateCapture(notice.provider, notice.transaction_id)

    if decision.pays_invoice:
        events.append((agency_id, "invoice.paid", {
            "invoice_id": invoice_id, "reference": written["reference"], "bill_number": written["bill_number"],
            "status": written["status"], "currency": written["currency"], "amount": written["amount"],
            "amount_paid": written["amount_paid"], "paid_at": notice.paid_at.isoformat(), "payment_id": payment_id,
            "provider": notice.provider,
        }))
    if decision.reason is not None:
        exc_id = new_id("exc")
        exc_evidence: dict[str, Any] = {"payment_id": payment_id, "notice": notice.model_dump(mode="json"),
                                        "invoice": _invoice_evidence(invoice), "khqr_md5": notice.md5}
        if named_by_bill is not None:
            exc_evidence["invoice_by_bill_number"] = _invoice_evidence(named_by_bill)
        if not decision.time_trusted:
            issued = issued_at(invoice or named_by_bill, code)
            exc_evidence["times"] = {"paid_at": notice.paid_at.isoformat(), "received_at": received_at.isoformat(),
                                     "issued_at": issued.isoformat() if issued else None,
                                     "booked_at": booked_at.isoformat()}
        await conn.execute(
            Q.exception_insert, exc_id, decision.reason, notice.provider, payment_id, invoice_id, agency_id,
            notice.currency, decision.suspense if decision.suspense else notice.amount,
            business_date(booked_at, business_cutoff) if business_cutoff is not None else None, exc_evidence, now,
        )
        if agency_id is not None:
            events.append((agency_id, "reconciliation.exception_opened", {
                "exception_id": exc_id, "reason": decision.reason, "payment_id": payment_id,
                "invoice_id": invoice_id, "currency": notice.currency, "amount": decision.suspense or notice.amount}))
    entry = await ledger.post_entry(conn, journal_draft(
        notice, decision, agency_code=agency_code, payment_id=payment_id, invoice_id=invoice_id,
        effective_at=booked_at))
    if agency_id is not None and decision.applied:
        events.append((agency_id, "journal.posted",
                       journal_posted(entry, agency_code, payment_id=payment_id, invoice_id=invoice_id)))
    await _finish(conn, events, now, done_inbox)
    return CaptureResult(payment_id, True, decision.reason, invoice_id)


def same_money(notice: PaymentNotice, on_code: list[dict], *, listing: bool = False,
               listed: AbstractSet[str] = frozenset()) -> dict | None:
    """The payment on the notice's code that the notice reports again through another channel, or None.

    For a callback or a poll, that is the first payment on the code, of the same amount and currency, that this
    provider has not reported yet and that is either another provider's, or this provider's own captured from
    its settlement file under the file's own reference (a camt.053 entry without EndToEndId or TxId, or a line
    with no id at all), not the transaction id its callback gives (found by review: the bank's late callback for
    a payment its statement had booked was booked again; and a file line with the provider's real id is not
    such a payment, since a callback under another id is another payment). Each channel reports a payment once,
    under its own transaction id, so a second report of this provider is a second payment. When two payments
    on one code are alike, which of them a report is taken for does not change what is booked.

    ``listing``: the notice is a settlement line that matched none of its provider's payments, and its id says
    nothing of what its provider reported: another provider's payment is taken, first one this provider has not
    reported and no other line of the file (``listed``) was taken for (found by review: a file's line for the
    code's second payment was raised against the first), else any."""
    alike = [p for p in on_code if p["amount"] == notice.amount and p["currency"] == notice.currency]
    if listing:
        others = [p for p in alike if p["provider"] != notice.provider]
        fresh = [p for p in others if notice.provider not in p["reported_by"] and p["id"] not in listed]
        return (fresh or others or [None])[0]
    for p in alike:
        if notice.provider in p["reported_by"]:
            continue
        if p["provider"] != notice.provider or p["file_ref"]:
            return p
    return None


def _invoice_of(target) -> dict | None:
    if target["id"] is None:
        return None
    return {"id": target["id"], "agency_id": target["agency_id"], "agency_code": target["agency_code"],
            "bakong_account": target["bakong_account"], "status": target["status"], "currency": target["currency"],
            "amount": target["amount"], "amount_paid": target["amount_paid"], "expires_at": target["expires_at"],
            "created_at": target["invoice_created_at"]}


def _code_of(target) -> dict | None:
    if target["md5"] is None:
        return None
    return {"md5": target["md5"], "to_account": target["to_account"], "created_at": target["code_created_at"]}


# What two notices of one provider transaction must agree on. md5, bill number and accounts only when both
# report them (a provider may leave them out); the rest is always set on a confirmed notice.
ALWAYS_COMPARED = ("amount", "currency", "paid_at")
COMPARED_WHEN_REPORTED = ("md5", "bill_number", "to_account", "from_account")


def _differences(prior: dict, notice: PaymentNotice) -> list[str]:
    """The fields in which ``notice`` contradicts the notice the payment ``prior`` was captured from."""
    first = prior.get("notice")
    new = notice.model_dump(mode="json")
    if not isinstance(first, dict):  # a payment written without its notice: compare what the row holds
        first = {"amount": prior["amount"], "currency": prior["currency"]}
        return [f for f in ("amount", "currency") if first[f] != new[f]]
    out = [f for f in ALWAYS_COMPARED if f in first and first[f] != new[f]]
    out += [f for f in COMPARED_WHEN_REPORTED if first.get(f) is not None and new[f] is not None
            and first[f] != new[f]]
    return out


async def _raise_conflict(conn: asyncpg.Connection, prior: dict, notice: PaymentNotice, differs: list[str], *,
                          source: str, now: datetime, events: list, business_day=None) -> None:
    """Open a ``conflicting_notice`` exception for treasury, once per distinct conflicting notice.

    Its id is derived from the payment and what the notice says, so the same notice again (a retry, or a
    concurrent copy) finds it opened already and opens nothing."""
    said = notice.model_dump(mode="json", include={"transaction_id", *ALWAYS_COMPARED, *COMPARED_WHEN_REPORTED})
    digest = hashlib.sha256(f"{prior['id']}|{json.dumps(said, sort_keys=True)}".encode()).digest()
    exc_id = "exc_" + base64.b32encode(digest[:15]).decode().lower()
    evidence = {"payment_id": prior["id"], "fields": differs, "captured_notice": prior.get("notice"),
                "notice": notice.model_dump(mode="json"), "source": source, "khqr_md5": notice.md5}
    opened = await conn.fetchval(Q.exception_insert, exc_id, "conflicting_notice", notice.provider, prior["id"],
                                 prior["invoice_id"], prior.get("agency_id"), notice.currency, notice.amount,
                                 business_day, evidence, now)
    if opened is not None and prior.get("agency_id") is not None:
        events.append((prior["agency_id"], "reconciliation.exception_opened", {
            "exception_id": exc_id, "reason": "conflicting_notice", "payment_id": prior["id"],
            "invoice_id": prior["invoice_id"], "currency": notice.currency, "amount": notice.amount}))


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
