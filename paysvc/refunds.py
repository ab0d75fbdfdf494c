"""Refunds owed back to payers, and treasury's record of paying them out.

A resolution that owes money back to the payer credits ``suspense:refunds-due:{cur}`` (a liability). Treasury
sends the money by its bank, then records the transfer here: the payout's entry debits
``suspense:refunds-due:{cur}`` and credits ``treasury:bank:{acct}:{cur}``, the account it left from.

What is owed is counted per **case**:

* an exception about a payment: the payment. Every entry about it adds to what is owed or takes from it,
  whichever of its exceptions was resolved (an ``overpaid`` refunded, then the payment missing from settlement
  and refunded by its provider, which takes that refund back, then settled after all, which owes it again);
* any other (a ``duplicate_in_settlement`` line of no payment, an ``expired_part_paid`` invoice): the exception,
  by its resolution entry.

A payment's refund is paid only once nothing can take it back (``refund_payable``): a line has settled the payment,
or its ``missing_in_settlement`` is resolved. Until then its provider may still give the money back to the payer
itself, and the refund that records that takes back what the case was owed; a payout before it would pay the
payer twice.

The bank's reference of the transfer is unique: recording the same transfer again returns the first record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

import ledger
from ledger import accounts
from paysvc.capture import new_id
from paysvc.queries import Q


class RefundRefused(Exception):
    """Nothing was recorded; ``detail`` says why and what would do, ``field`` which request field it is about."""

    def __init__(self, detail: str, *, field: str = "amount") -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class ReferenceTaken(Exception):
    """The bank reference records another payout (``payout``): the same transfer cannot be two payouts."""

    def __init__(self, payout: dict) -> None:
        super().__init__(payout["reference"])
        self.payout = payout


@dataclass(frozen=True)
class Recorded:
    payout: dict
    replayed: bool   # the same transfer recorded before: nothing new was written


def _payout(row: asyncpg.Record) -> dict:
    return dict(row)   # refund_payout_by_reference and refund_payout_insert name exactly the payout's fields


async def owed(conn: asyncpg.Connection, exc: asyncpg.Record) -> dict[str, int]:
    """What the case of exception ``exc`` (its payment, else itself) is still owed back, per currency."""
    if exc["payment_id"] is not None:
        due = await conn.fetch(Q.refund_due_of_payment, exc["payment_id"])
        paid = await conn.fetch(Q.refund_paid_of_payment, exc["payment_id"])
    else:
        entry_id = exc["resolution_entry_id"]
        due = await conn.fetch(Q.refund_due_of_entry, int(entry_id)) if (entry_id or "").isdigit() else []
        paid = await conn.fetch(Q.refund_paid_of_exception, exc["id"])
    out = {r["currency"]: r["due"] for r in due}
    for r in paid:
        out[r["currency"]] = out.get(r["currency"], 0) - r["paid"]
    return out


async def record_payout(conn: asyncpg.Connection, *, exception_id: str, currency: str, amount: int,
                        reference: str, note: str, by: str, now: datetime, bank_account: str) -> Recorded:
    """Record, in the caller's transaction, that ``amount`` was paid back to the payer of ``exception_id``'s case.

    Raises ``LookupError`` (no such exception), ``RefundRefused`` (nothing recorded: not resolved, nothing owed in
    that currency, more than is owed, not payable yet) and ``ReferenceTaken``."""
    exc = await conn.fetchrow(Q.exception_for_refund, exception_id)
    if exc is None:
        raise LookupError(exception_id)
    case = exc["payment_id"] or exc["id"]
    await conn.execute(Q.refund_case_lock, case)
    # Read again under the lock, waiting for a resolution of the row itself: one that committed while this waited
    # has changed it (found by review: a payout waiting on the resolution that made it owed was refused as "still
    # open"; an exception about no payment has no case lock to wait on, so the row's own lock is waited for)
    exc = await conn.fetchrow(Q.exception_for_refund_locked, exception_id)
    earlier = await conn.fetchrow(Q.refund_payout_by_reference, reference)
    if earlier is not None:
        first = _payout(earlier)
        if (first["exception_id"], first["currency"], first["amount"]) == (exception_id, currency, amount):
            return Recorded(first, replayed=True)
        raise ReferenceTaken(first)
    if exc["state"] != "resolved":
        raise RefundRefused(f"exception {exception_id} is still open: resolve it (refund_due says the money is owed "
                            "back) before recording a payout", field="exception_id")
    whose = f"payment {exc['payment_id']} (all its exceptions)" if exc["payment_id"] else f"exception {exception_id}"
    # Payable first, what is owed second: a resolution of the payment's missing_in_settlement (its provider's
    # refund, or its write-off: the only entries that take from refunds-due) that commits between the two is then
    # either seen by the second or keeps the first false (found by review: read the other way round, a payout
    # could pass on what was owed before that refund took it back)
    if exc["payment_id"] and not await conn.fetchval(Q.refund_payable, exc["payment_id"]):
        raise RefundRefused(f"payment {exc['payment_id']} is not settled yet (no settlement line settled it, and its "
                            "missing_in_settlement, if raised, is not resolved): its provider may still give the "
                            "money back to the payer, and paying the refund now could pay them twice. Pay it once a "
                            "file settles the payment or its missing_in_settlement is resolved",
                            field="exception_id")
    left = await owed(conn, exc)
    if left.get(currency, 0) <= 0:
        others = ", ".join(f"{n} {c}" for c, n in sorted(left.items()) if n > 0 and c != currency)
        raise RefundRefused(f"nothing is owed back for {whose} in {currency}"
                            + (f"; it is owed {others}" if others else "")
                            + ": a payout pays what a resolution (refund_due, or money found to be the payer's) put in "
                              "suspense:refunds-due", field="currency" if others else "exception_id")
    if amount > left[currency]:
        raise RefundRefused(f"{amount} {currency} is more than the {left[currency]} {currency} still owed back for "
                            f"{whose}: record what left the bank, at most what is owed")
    payout_id = new_id("rfp")
    bank = accounts.treasury_bank(bank_account, currency)
    entry = await ledger.post_entry(conn, ledger.EntryDraft(
        kind="refund_paid", description=f"refund {payout_id} paid back for {whose}, bank reference {reference}"[:500],
        effective_at=now, idempotency_key=f"refund-payout:{payout_id}", payment_id=exc["payment_id"],
        invoice_id=exc["invoice_id"],
        postings=[ledger.Posting(account=accounts.refunds_due(currency), side="debit", amount=amount,
                                 currency=currency),
                  ledger.Posting(account=bank, side="credit", amount=amount, currency=currency)]))
    row = await conn.fetchrow(Q.refund_payout_insert, payout_id, exception_id, exc["payment_id"], currency, amount,
                              reference, bank_account, note, by, now, entry.id)
    if row is None:  # the same reference recorded by another case's payout meanwhile (not under this case's lock)
        raise ReferenceTaken(_payout(await conn.fetchrow(Q.refund_payout_by_reference, reference)))
    return Recorded(_payout(row), replayed=False)
