"""Entry drafts for the service's events (the posting table in docs/ledger.md). Pure: no IO."""

from __future__ import annotations

from datetime import datetime

from ledger import accounts as acct
from ledger.postings import EntryDraft, Posting


def _pair(debit: str, credit: str, amount: int, currency: str) -> tuple[Posting, Posting]:
    return (Posting(account=debit, side="debit", amount=amount, currency=currency),  # type: ignore[arg-type]
            Posting(account=credit, side="credit", amount=amount, currency=currency))  # type: ignore[arg-type]


def payment_captured(*, provider: str, agency: str, amount: int, currency: str, effective_at: datetime,
                     invoice_id: str, payment_id: str, description: str | None = None) -> EntryDraft:
    """A payment for an invoice: debit the provider's clearing, credit the agency's revenue."""
    return EntryDraft(
        kind="payment.captured", description=description or f"payment {payment_id} for invoice {invoice_id}",
        effective_at=effective_at,
        postings=_pair(acct.provider_clearing(provider, currency), acct.agency_revenue(agency, currency),
                       amount, currency),
        idempotency_key=f"payment.captured:{payment_id}", invoice_id=invoice_id, payment_id=payment_id,
    )


def payment_to_suspense(*, provider: str, amount: int, currency: str, effective_at: datetime, payment_id: str,
                        invoice_id: str | None = None, owed: int = 0, agency: str | None = None,
                        description: str | None = None) -> EntryDraft:
    """A payment with no valid invoice, the wrong amount or late: what is not owed goes to suspense.

    ``owed`` (with ``agency``) is the part an invoice did owe, credited to the agency's revenue.
    """
    if not 0 <= owed < amount:
        raise ValueError("owed must be at least 0 and less than the amount (all of it owed is a capture)")
    if owed and agency is None:
        raise ValueError("owed needs the agency it is owed to")
    postings = [Posting(account=acct.provider_clearing(provider, currency), side="debit", amount=amount,
                        currency=currency),  # type: ignore[arg-type]
                Posting(account=acct.suspense(currency), side="credit", amount=amount - owed,
                        currency=currency)]  # type: ignore[arg-type]
    if owed:
        postings.append(Posting(account=acct.agency_revenue(agency, currency), side="credit", amount=owed,  # type: ignore[arg-type]
                                currency=currency))  # type: ignore[arg-type]
    return EntryDraft(
        kind="payment.suspense", description=description or f"payment {payment_id} held in suspense",
        effective_at=effective_at, postings=tuple(postings), idempotency_key=f"payment.suspense:{payment_id}",
        invoice_id=invoice_id, payment_id=payment_id,
    )


def settlement_received(*, provider: str, bank_account: str, gross: int, fees: int, currency: str,
                        effective_at: datetime, settlement_id: str, description: str | None = None) -> EntryDraft:
    """A provider's settlement: the bank receives gross minus fees, fees are an expense, clearing is emptied."""
    if not 0 <= fees < gross:
        raise ValueError("fees must be at least 0 and less than the gross amount")
    postings = [Posting(account=acct.treasury_bank(bank_account, currency), side="debit", amount=gross - fees,
                        currency=currency)]  # type: ignore[arg-type]
    if fees:
        postings.append(Posting(account=acct.provider_fees(provider, currency), side="debit", amount=fees,
                                currency=currency))  # type: ignore[arg-type]
    postings.append(Posting(account=acct.provider_clearing(provider, currency), side="credit", amount=gross,
                            currency=currency))  # type: ignore[arg-type]
    return EntryDraft(
        kind="settlement", description=description or f"settlement {settlement_id} from {provider}",
        effective_at=effective_at, postings=tuple(postings), idempotency_key=f"settlement:{settlement_id}",
        settlement_id=settlement_id,
    )


def suspense_resolved(*, agency: str, amount: int, currency: str, effective_at: datetime, payment_id: str,
                      invoice_id: str, description: str | None = None) -> EntryDraft:
    """An exception resolved to an invoice: move the money from suspense to the agency's revenue."""
    return EntryDraft(
        kind="suspense.resolved", description=description or f"payment {payment_id} resolved to {invoice_id}",
        effective_at=effective_at,
        postings=_pair(acct.suspense(currency), acct.agency_revenue(agency, currency), amount, currency),
        idempotency_key=f"suspense.resolved:{payment_id}", invoice_id=invoice_id, payment_id=payment_id,
    )


def refund(*, provider: str, agency: str, amount: int, currency: str, effective_at: datetime, payment_id: str,
           refund_id: str, invoice_id: str | None = None, description: str | None = None) -> EntryDraft:
    """A refund: debit the agency's revenue, credit the provider's clearing."""
    return EntryDraft(
        kind="refund", description=description or f"refund {refund_id} of payment {payment_id}",
        effective_at=effective_at,
        postings=_pair(acct.agency_revenue(agency, currency), acct.provider_clearing(provider, currency),
                       amount, currency),
        idempotency_key=f"refund:{refund_id}", invoice_id=invoice_id, payment_id=payment_id,
    )
