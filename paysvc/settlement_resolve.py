"""Resolving a reconciliation exception: what each action means for each kind of exception, and its entry.

The rule (``plan``) is pure; ``resolve`` applies it in the caller's transaction. Where the money in question
sits decides what an action can do:

* **in suspense** (exceptions raised at capture: unknown_khqr, overpaid, paid_at_implausible, …):
  ``match_to_invoice`` debit ``suspense:unmatched``, credit ``agency:{a}:revenue`` (the invoice's
  ``amount_paid`` grows; it is paid when complete); ``refund_due`` debit ``suspense:unmatched``, credit
  ``suspense:refunds-due`` (a liability: owed back to the payer until treasury pays it out);
  ``write_off`` debit ``suspense:unmatched``, credit ``equity:written-off`` (unclaimed money kept).
* **applied to an invoice** (``missing_in_ledger`` whose late capture paid its invoice): only
  ``match_to_invoice`` to that invoice, which acknowledges it; no money moves, no entry.
* **at the bank, not yet in the ledger** (``duplicate_in_settlement``): ``match_to_invoice`` and
  ``refund_due`` bring it in (debit ``treasury:bank`` net + ``expense:provider-fees`` fee) and credit the
  agency's revenue or ``suspense:refunds-due``; ``write_off`` says the line was a listing error: nothing
  arrived, no entry. For a payment written off as never settled, the money first makes good what is left of
  that loss (credit ``expense:write-offs`` of the payment's provider) with ``refund_due``, as its late line does;
  only the rest is owed back, and ``match_to_invoice`` is refused while some of the loss is left (what it gave
  would hang on the order the payment's lines are resolved in). A line in another provider's file can come
  before the write-off: it is not matched while its payment is neither settled nor its
  ``missing_in_settlement`` resolved, and a later write-off makes good the loss from what such lines left owed
  back. A line in another currency than such a payment cannot make good the loss: ``refund_due`` keeps it
  (credit ``equity:written-off`` in its currency) for treasury to convert against what is left of the loss, or
  return, outside the service. Resolutions of one payment's exceptions take the payment's lock (its payouts'
  too).
* **conflicting_notice** (a second notice for captured money that says something else; nothing of it was
  booked): only ``write_off``, which records that treasury checked it: no entry.
* **amount_mismatch** (we captured C, the file settled L): every action first settles the line — debit bank
  L − fee and fees, credit clearing C — and places the difference D = L − C: when the provider paid more
  (D > 0) credit agency revenue (``match_to_invoice``), ``suspense:refunds-due`` (``refund_due``) or
  ``equity:written-off`` (``write_off``); when it paid less (D < 0) only ``write_off``: debit
  ``expense:write-offs:{p}``. When the line is in another currency (no exchange rate here) only ``write_off``,
  each currency on its own: debit ``expense:write-offs:{p}:{cur}``, credit clearing C; debit bank L − fee and
  fees, credit ``equity:written-off:{cur2}`` L.
* **missing_in_settlement** (captured C, never settled): ``write_off`` debit ``expense:write-offs:{p}``,
  credit clearing C (the provider will not pay it); ``refund_due`` says the provider returned it to the payer:
  debit what the payment credited (agency revenue, and its suspense part from where it is now: where an
  earlier resolution of its capture exception moved it, refunds-due, written-off or the matched agency's
  revenue; refused while that exception is open), credit clearing C (the ledger's refund row; a paid invoice
  is not reopened; an open or expired one that the payment's money was matched to has its ``amount_paid``
  lowered by that part, so it asks for it again). ``match_to_invoice`` is refused: a later settlement line
  settles it.

* **expired_part_paid** (an expired invoice holds H of its amount in its agency's revenue, beyond what earlier
  write-offs of it left with the agency): ``refund_due`` debit the agency's revenue, credit
  ``suspense:refunds-due`` H; ``match_to_invoice`` debit it, credit the other invoice's agency revenue H; both
  lower the expired invoice's ``amount_paid`` by H. ``write_off``: the agency keeps H (no entry; recorded, never
  raised again). Every action waits until each payment whose money the invoice holds is settled (or its
  missing_in_settlement resolved): its provider could otherwise still give it back, taking that part from the
  invoice again. One paid in full since is closed as ``paid_in_full``.

Each agency whose accounts a resolution entry moves gets a ``journal.posted`` event (its own postings, and the
exception id) in the same transaction.

* **settled_after_resolution** (a line L, fee F, for a payment captured C whose missing_in_settlement treasury
  had resolved with write_off or refund_due; that resolution already credited clearing C, and the line was
  not posted): ``match_to_invoice`` to the payment's own invoice says the money did arrive for it: debit bank
  L − F and fees F, credit back each account the earlier resolution debited (``expense:write-offs`` C, or
  the agency revenue and suspense it took), and place D = L − C: D > 0 credit ``suspense:refunds-due``,
  D < 0 debit ``expense:write-offs``. The refund recorded which invoices it lowered and by how much: each
  gets that part back into its ``amount_paid`` as far as it still owes it, the rest of it to
  ``suspense:refunds-due``; revenue it took without lowering an invoice comes back as taken. ``refund_due``:
  it arrived and is owed back to the payer: debit bank L − F and fees F, credit ``suspense:refunds-due`` L;
  after a ``write_off`` (which refunded nothing: the invoice stayed paid) it makes good what is left of the loss
  instead, as ``match_to_invoice`` then does, credit ``expense:write-offs`` up to it (a duplicate line may have
  made good some), and only the rest is owed back; with the line in another currency than the payment the loss
  stays and what arrived is kept, credit ``equity:written-off`` in the line's currency. ``write_off``: a listing
  error, nothing arrived: no entry.

Every entry leaves the provider's clearing account where the day's story says it should be: after every
exception of a day is resolved, its clearing balance is zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

import asyncpg

import ledger
from ledger import accounts
from paysvc.invoicing import open_expired_part_paid
from paysvc.outbox import add_event, journal_posted
from paysvc.queries import Q
from paysvc.settlement_days import TZ as PHNOM_PENH
from paysvc.settlement_import import lock_provider

Action = Literal["match_to_invoice", "refund_due", "write_off"]
# Exceptions an import reads (sorting its lines) or closes (settled late): resolved under the provider's lock.
IMPORT_READS = ("missing_in_settlement", "settled_after_resolution")

CAPTURE_REASONS = ("unknown_khqr", "currency_mismatch", "account_mismatch", "invoice_expired", "invoice_cancelled",
                   "duplicate_payment", "underpaid", "overpaid", "paid_at_implausible")


class ResolutionRefused(Exception):
    """The action does not make sense for this exception; ``detail`` says which would."""

    def __init__(self, detail: str, *, field: str = "action") -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field  # the request field the refusal is about: the action, or the invoice it names


class AlreadyResolved(Exception):
    pass


@dataclass(frozen=True)
class Facts:
    """What the rule needs to know about the exception and the money around it."""

    reason: str
    provider: str
    currency: str
    amount: int
    payment_amount: int | None = None
    payment_applied: int = 0
    payment_suspense: int = 0
    payment_agency: str | None = None
    payment_invoice: str | None = None
    line_amount: int | None = None
    line_fee: int = 0
    line_currency: str | None = None
    earlier_debits: tuple[tuple[str, int], ...] = ()   # settled_after_resolution: what the earlier entry debited
    earlier_action: str | None = None                   # ... and the earlier resolution (write_off or refund_due)
    # ... and the invoices that earlier refund lowered: (invoice id, agency code, status now, owed now, lowered by)
    lowered: tuple[tuple[str, str, str, int, int], ...] = ()
    payment_currency: str | None = None
    payment_provider: str | None = None   # may differ from the exception's: a line in another provider's file
    # A line of a payment written off as never settled (settled_after_resolution, duplicate_in_settlement): the loss
    # that write-off booked, and what lines of the payment have made good of it since
    write_off_loss: int = 0
    loss_recovered: int = 0
    payment_payable: bool = True   # a duplicate's payment: settled, or its missing_in_settlement resolved
    duplicates_owed: int = 0       # missing_in_settlement: what its payment's duplicates left owed back (see below)
    # Where the payment's suspense part is now: (account, amount) pairs. Earlier resolutions of the payment's
    # capture exception moved it (to refunds-due, written-off, an agency's revenue); None: still in suspense.
    suspense_now: tuple[tuple[str, int], ...] | None = None
    suspense_held_by: str | None = None   # an open exception that still holds the payment's suspense part
    # expired_part_paid: the expired invoice (id, agency code, what it holds of its amount now), and the payments
    # whose money it holds that their provider may still give back (not settled yet)
    part_paid: tuple[str, str, int] | None = None
    unsettled: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """The invoice money is matched to (``match_to_invoice``)."""

    invoice_id: str
    agency_code: str
    currency: str
    owed: int
    status: str


@dataclass(frozen=True)
class Plan:
    postings: tuple[tuple[str, str, int], ...]   # (account, side, amount); the currency is the account's own
    invoice_amount: int = 0                       # how much the target invoice's amount_paid grows
    restored: tuple[tuple[str, int], ...] = ()    # other invoices whose amount_paid grows back: (id, amount)
    cleared: tuple[str, int] | None = None        # an expired invoice whose amount_paid is lowered: (id, amount)


def _write_off_account(f: Facts) -> str:
    """Where the write-off of the payment's ``missing_in_settlement`` booked its loss: its own provider's account,
    in its currency, whichever provider's file the line being resolved came in (found by review: a line matched to
    the payment from another provider's statement read that provider's account, found no loss, and owed all of
    it back while the loss stayed booked)."""
    return accounts.write_offs(f.payment_provider or f.provider, f.payment_currency or f.currency)


def plan(f: Facts, action: Action, target: Target | None, *, bank_account: str) -> Plan:
    """The postings of resolving an exception with ``action`` (pure). Raises ``ResolutionRefused``."""
    cur = f.currency
    clearing = accounts.provider_clearing(f.provider, cur)
    refunds = accounts.refunds_due(cur)
    written_off = accounts.written_off(cur)
    losses = accounts.write_offs(f.provider, cur)

    def to_invoice(amount: int) -> tuple[str, int]:
        if target is None:
            raise ResolutionRefused("match_to_invoice needs invoice_id", field="invoice_id")
        if target.currency != cur:
            raise ResolutionRefused(f"invoice {target.invoice_id} is in {target.currency}, the money in {cur}",
                                    field="invoice_id")
        if target.status not in ("open", "expired"):
            raise ResolutionRefused(f"invoice {target.invoice_id} is {target.status}: it owes nothing",
                                    field="invoice_id")
        if amount > target.owed:
            raise ResolutionRefused(f"invoice {target.invoice_id} owes {target.owed}, less than the {amount} "
                                    "in question; choose refund_due for the money or another invoice",
                                    field="invoice_id")
        return accounts.agency_revenue(target.agency_code, cur), amount

    def bank_in(gross: int, fee: int, currency: str = cur) -> list[tuple[str, str, int]]:
        out = []
        if gross - fee > 0:
            out.append((accounts.treasury_bank(bank_account, currency), "debit", gross - fee))
        if fee:
            out.append((accounts.provider_fees(f.provider, currency), "debit", fee))
        return out

    if f.reason in CAPTURE_REASONS:
        a = f.payment_suspense or f.amount
        if action == "match_to_invoice":
            acct, n = to_invoice(a)
            return Plan(((accounts.suspense(cur), "debit", a), (acct, "credit", n)), invoice_amount=n)
        credit = refunds if action == "refund_due" else written_off
        return Plan(((accounts.suspense(cur), "debit", a), (credit, "credit", a)))

    if f.reason == "missing_in_ledger":
        if f.payment_suspense:
            a = f.payment_suspense
            if action == "match_to_invoice":
                acct, n = to_invoice(a)
                return Plan(((accounts.suspense(cur), "debit", a), (acct, "credit", n)), invoice_amount=n)
            credit = refunds if action == "refund_due" else written_off
            return Plan(((accounts.suspense(cur), "debit", a), (credit, "credit", a)))
        if action != "match_to_invoice" or target is None or target.invoice_id != f.payment_invoice:
            why = {"write_off": "nothing was lost: the money arrived and paid it",
                   "refund_due": "a refund of a paid invoice is not a reconciliation action"}.get(
                action, "the money is that invoice's, not another's")
            raise ResolutionRefused(f"this payment was captured late and already paid invoice {f.payment_invoice}; "
                                    f"acknowledge it with match_to_invoice to that invoice ({action}: {why})")
        return Plan(())

    if f.reason == "duplicate_in_settlement":
        gross, fee = f.line_amount or f.amount, f.line_fee
        if action == "write_off":
            return Plan(())
        # A payment written off as never settled (its late line resolved as a listing error, say): what arrives
        # in its currency makes good what is left of that loss first, as its late line does, and only the rest is
        # owed back to the payer (found by review: refund_due owed all of it back, the invoice staying paid and the
        # loss booked; and making good only a loss nothing had made good yet gave another outcome when the late
        # line was resolved first, a short one leaving loss and refund both)
        if action == "match_to_invoice" and not f.payment_payable:
            # A line in another provider's file, of a payment its own provider has not settled: the payment may
            # still be written off, and this money then makes good that loss (found by review: matched first, the
            # invoice got it and the loss stayed booked)
            raise ResolutionRefused("this line's payment is neither settled nor has its missing_in_settlement "
                                    "resolved: if it is written off, this money makes good the loss. Resolve it "
                                    "with refund_due (owed back until then, moved to the loss by a write-off), or "
                                    "resolve the payment's missing_in_settlement first", field="action")
        if action == "match_to_invoice" and f.write_off_loss and (
                cur != f.payment_currency or f.write_off_loss > f.loss_recovered):
            # While some of the loss is left, what such a line gives an invoice would hang on whether the payment's
            # other lines made it good before or after (found by review: the same lines and actions gave the
            # invoice 60,000 in one order, 10,000 in the other, the payer 50,000). Once the loss is made good it
            # stays so, and a match then takes the whole line in any order (one code paid twice, say)
            raise ResolutionRefused("this line is of a payment written off as never settled, whose loss is not "
                                    "made good yet: what it gives an invoice would depend on the order its lines "
                                    "are resolved in. Resolve it with refund_due (it makes good the loss first; the "
                                    "rest is owed back), or write_off if it is a listing error", field="action")
        if f.write_off_loss and f.payment_currency is not None and cur != f.payment_currency:
            # A line in another currency cannot make good the loss without an exchange rate, nor can the service
            # tell whether it stands for the payment or is surplus: it is kept in its currency, as the payment's
            # late line in another currency is, and treasury converts it against what is left of the loss, or
            # returns it, outside the service. Always, so that the lines of one payment end the same whatever the
            # order they are resolved in (found by two review rounds: owed back, it paid the payer the only money
            # that arrived; kept only while some loss was left, or only the first such line, the outcome hung on
            # which line a desk resolved first)
            return Plan((*bank_in(gross, fee), (written_off, "credit", gross)))
        recover = min(gross, max(f.write_off_loss - f.loss_recovered, 0)) if f.payment_currency == cur else 0
        base = [*bank_in(gross, fee), *([(_write_off_account(f), "credit", recover)] if recover else [])]
        rest = gross - recover
        if not rest:
            return Plan(tuple(base))
        if action == "match_to_invoice":
            acct, n = to_invoice(rest)
            return Plan((*base, (acct, "credit", n)), invoice_amount=n)
        return Plan((*base, (refunds, "credit", rest)))

    if f.reason == "amount_mismatch":
        if f.line_amount is None or f.payment_amount is None:
            raise ResolutionRefused("this amount mismatch has lost its line or payment")
        if f.line_currency != cur:
            # The provider settled in another currency. Without an exchange rate (FX is outside the service)
            # each currency is closed on its own: the captured amount was not settled in its currency (a loss,
            # as a write_off of a missing payment), and what arrived in the other is kept (as a write_off of
            # unclaimed money). Treasury books the conversion between the two outside the service.
            if action != "write_off":
                raise ResolutionRefused(
                    f"the provider settled {f.line_amount} {f.line_currency} for a payment captured as "
                    f"{f.payment_amount} {cur}; without an exchange rate only write_off applies: the {cur} is "
                    f"written off from clearing and the {f.line_currency} that arrived is kept, each in its currency")
            lcur = f.line_currency
            return Plan(((losses, "debit", f.payment_amount), (clearing, "credit", f.payment_amount),
                         *bank_in(f.line_amount, f.line_fee, lcur),
                         (accounts.written_off(lcur), "credit", f.line_amount)))
        diff = f.line_amount - f.payment_amount
        base = [*bank_in(f.line_amount, f.line_fee), (clearing, "credit", f.payment_amount)]
        if diff < 0:
            if action != "write_off":
                raise ResolutionRefused(f"the provider settled {-diff} less than was captured: only write_off "
                                        "(a loss) applies")
            return Plan((*base, (losses, "debit", -diff)))
        if diff == 0:
            return Plan(tuple(base))
        if action == "match_to_invoice":
            acct, n = to_invoice(diff)
            return Plan((*base, (acct, "credit", n)), invoice_amount=n)
        return Plan((*base, (refunds if action == "refund_due" else written_off, "credit", diff)))

    if f.reason == "expired_part_paid":
        # The invoice expired holding part of its amount, in its agency's revenue (treasury applied held money to
        # it; the rest never came). Refund it, carry it to another invoice, or record that the agency keeps it.
        assert f.part_paid is not None
        invoice, agency, held = f.part_paid
        if not held:
            if action == "write_off":
                return Plan(())   # nothing left to decide
            raise ResolutionRefused(f"invoice {invoice} holds nothing of its amount any more (its provider gave the "
                                    "money back); close this with write_off")
        if f.unsettled:
            # Whatever is decided of the part is final (refunded, carried, or the agency's for good: found by
            # review, a write_off followed by another part refunded both), so it waits for the money to be.
            raise ResolutionRefused(
                f"invoice {invoice} holds money of payment{'s' if len(f.unsettled) > 1 else ''} "
                f"{', '.join(f.unsettled)}, not settled yet: its provider may still give it back, which takes that "
                "part from the invoice again. Resolve this once a settlement file has settled it (or its "
                "missing_in_settlement is resolved)")
        if action == "write_off":
            return Plan(())   # the agency keeps it (its rules, or it settled with the citizen itself): recorded
        source = (accounts.agency_revenue(agency, cur), "debit", held)
        if action == "refund_due":
            return Plan((source, (refunds, "credit", held)), cleared=(invoice, held))
        if target is not None and target.invoice_id == invoice:
            raise ResolutionRefused(f"invoice {invoice} is the one that expired: match the money to another "
                                    "invoice (one issued for the same fee, say), or refund_due", field="invoice_id")
        acct, n = to_invoice(held)
        return Plan((source, (acct, "credit", n)), invoice_amount=n, cleared=(invoice, held))

    if f.reason == "conflicting_notice":
        # A second notice for captured money that says otherwise: nothing of it was booked.
        if action == "write_off":
            return Plan(())
        raise ResolutionRefused("nothing was booked for a conflicting notice: the payment captured from the first "
                                "notice stands. Resolve it with write_off once checked with the provider; if the "
                                "provider did move other money, its settlement line raises it")

    if f.reason == "missing_in_settlement":
        a = f.payment_amount or f.amount
        if action == "write_off":
            # What lines in other providers' files, resolved before this, left owed back makes good the loss now,
            # as it would have had the write-off come first (found by review: resolved in that order, the payer
            # was owed back the money the loss needed)
            x = min(a, f.duplicates_owed)
            return Plan(((losses, "debit", a), (clearing, "credit", a),
                         *(((refunds, "debit", x), (losses, "credit", x)) if x else ())))
        if action == "refund_due":
            # The provider returned the whole payment: take back the applied part from the agency's revenue and
            # the suspense part from wherever it is now (an earlier resolution may have moved it), once.
            if f.suspense_held_by is not None:
                raise ResolutionRefused(
                    f"exception {f.suspense_held_by} still holds {f.payment_suspense} of this payment in suspense; "
                    "resolve it first (its money is then taken back from where that resolution puts it)")
            out: dict[str, int] = {}
            if f.payment_applied:
                out[accounts.agency_revenue(f.payment_agency, cur)] = f.payment_applied
            where = f.suspense_now if f.suspense_now is not None else ((accounts.suspense(cur), f.payment_suspense),)
            for acct, n in where:
                if n:
                    out[acct] = out.get(acct, 0) + n
            return Plan((*((acct, "debit", n) for acct, n in out.items()), (clearing, "credit", a)))
        raise ResolutionRefused("a payment missing in settlement is settled by a later file's line; resolve it "
                                "with write_off (the provider will not pay) or refund_due (it returned the money)")
    if f.reason == "settled_after_resolution":
        gross, fee = f.line_amount or f.amount, f.line_fee
        if action == "write_off":
            return Plan(())
        # The exception is in the line's currency; the payment may be in another (no exchange rate here)
        fx = f.payment_currency is not None and f.line_currency != f.payment_currency
        if action == "refund_due" and f.earlier_action == "write_off" and fx:
            # The loss stays booked in the payment's currency; what arrived is kept in its own, as for an
            # amount_mismatch in another currency, and treasury books the conversion outside (found by review:
            # the make-good below credited the write-off from money in another currency, an unbalanced entry)
            return Plan((*bank_in(gross, fee), (written_off, "credit", gross)))
        if f.earlier_action == "write_off" and not fx and (
                action == "refund_due" or (action == "match_to_invoice" and f.payment_invoice is not None
                                           and target is not None and target.invoice_id == f.payment_invoice)):
            # The write-off booked the payment as a loss and left what it paid as it was: its invoice paid, and
            # what a resolution of its capture exception owed back to the payer still owed. The money that arrived
            # makes good what is left of that loss (a duplicate line may have made good some already); only the
            # rest is the payer's (found by review: owing all of it back as well paid a payer who sent 36,000 back
            # 39,000, the invoice staying paid; and crediting back the whole loss after a duplicate had made it good
            # credited it twice).
            recover = min(gross, max(f.write_off_loss - f.loss_recovered, 0))
            out = [*bank_in(gross, fee), *([(_write_off_account(f), "credit", recover)] if recover else [])]
            if gross - recover:
                out.append((refunds, "credit", gross - recover))
            return Plan(tuple(out))
        if action == "refund_due":
            return Plan((*bank_in(gross, fee), (refunds, "credit", gross)))
        if f.payment_invoice is None or target is None or target.invoice_id != f.payment_invoice:
            raise ResolutionRefused("match_to_invoice here restores the payment's own invoice "
                                    f"({f.payment_invoice or 'it has none'}): name it, or choose refund_due (the "
                                    "money is owed back) or write_off (nothing arrived)")
        if fx or f.payment_amount is None:
            raise ResolutionRefused("the line and the payment are in different currencies; no action can "
                                    "balance them here (FX is outside the service): refund_due or write_off")
        if sum(n for _, n in f.earlier_debits) != f.payment_amount:
            raise ResolutionRefused("the earlier resolution's entry does not account for the payment; "
                                    "choose refund_due or write_off")
        diff = gross - f.payment_amount
        # What the earlier refund took from each invoice it lowered (it asked for that part again) goes back into
        # that invoice's amount_paid as far as it still owes it; the rest of that part (paid in full again since,
        # or cancelled) is owed back to the payer. Revenue it took without lowering an invoice (an invoice paid
        # by then) comes back as it was taken. Found by review: judging by the payment's own invoice and its
        # paid_at restored the wrong invoice, or collected a fee twice.
        lowered_from: dict[str, int] = {}
        restored: list[tuple[str, int]] = []
        owed_back = 0
        back_to: dict[str, int] = {}
        for invoice, agency, status, owed, n in f.lowered:
            account = accounts.agency_revenue(agency, cur)
            lowered_from[account] = lowered_from.get(account, 0) + n
            r = min(n, max(owed, 0)) if status in ("open", "expired") else 0
            if r:
                restored.append((invoice, r))
                back_to[account] = back_to.get(account, 0) + r
            owed_back += n - r
        taken: dict[str, int] = {}
        for a, n in f.earlier_debits:
            taken[a] = taken.get(a, 0) + n
        if any(lowered_from.get(a, 0) > n for a, n in taken.items()) or not set(lowered_from) <= set(taken):
            raise ResolutionRefused("the earlier refund's entry does not account for the invoices it lowered; "
                                    "choose refund_due or write_off")
        out = [*bank_in(gross, fee)]
        for a, n in taken.items():
            if credit := n - lowered_from.get(a, 0) + back_to.get(a, 0):
                out.append((a, "credit", credit))
        if owed_back + max(diff, 0):
            out.append((refunds, "credit", owed_back + max(diff, 0)))
        if diff < 0:
            out.append((losses, "debit", -diff))
        return Plan(tuple(out), restored=tuple(restored))
    raise ResolutionRefused(f"no resolution rule for reason {f.reason!r}")


async def resolve(conn: asyncpg.Connection, exception_id: str, *, action: Action, note: str,
                  invoice_id: str | None, by: str, now: datetime, bank_account: str) -> dict:
    """Resolve one open exception in the caller's transaction; raises LookupError, AlreadyResolved,
    ResolutionRefused."""
    peek = await conn.fetchrow(Q.exception_reason_provider, exception_id)
    if peek is not None and peek["reason"] in IMPORT_READS and peek["provider"] is not None:
        # An import of this provider reads these exceptions when it sorts its lines and closes those its lines
        # settle: resolve one only between imports (its provider's lock, taken before the row lock, in the
        # import's order). Found by review: a write_off committed while an import ran, after it had sorted
        # its line as matched, so the import's entry credited the provider's clearing a second time.
        await lock_provider(conn, peek["provider"])
    if peek is not None and peek["reason"] == "expired_part_paid" and peek["invoice_id"] is not None:
        # Its invoices before its row, in id order, as a refund of one of its payments takes them (the invoice, then
        # this row, whose amount it lowers): row first here deadlocked with it (found by review)
        for i in sorted({peek["invoice_id"], *([invoice_id] if action == "match_to_invoice" and invoice_id else [])}):
            await conn.execute(Q.invoice_lock, i, None)
    if peek is not None and peek["payment_id"] is not None:
        # One at a time per payment with its other resolutions and its refund payouts (the payouts' lock, taken
        # before the exception's row lock as a payout takes it before its insert's key locks): two lines of a
        # written-off payment resolved at once each read the loss as unrecovered and both made it good (found by
        # review), and a provider's refund takes from what a payout reads as owed.
        await conn.execute(Q.refund_case_lock, peek["payment_id"])
    e = await conn.fetchrow(Q.exception_for_resolve, exception_id)
    if e is None:
        raise LookupError(exception_id)
    if e["state"] != "open":
        raise AlreadyResolved(exception_id)
    if e["reason"] == "missing_in_settlement" and e["payment_id"] is not None:
        settled = await conn.fetchrow(Q.settling_line_of_payment, e["payment_id"])
        if settled is not None:
            # Not missing (opened by a recheck that raced an import before the two shared a lock): closed as the
            # import closes those its lines settle. The action asked for would credit clearing a second time.
            closed = await conn.fetchrow(
                Q.exception_close_settled_late, exception_id, now, settled["settlement_id"], settled["line_no"],
                settled["category"], settled["exception_id"],
                str(settled["journal_entry_id"]) if settled["journal_entry_id"] is not None else None)
            return {"id": exception_id, "state": "resolved", "resolution": "settled_late",
                    "resolved_by": closed["resolved_by"], "resolved_at": now.isoformat(),
                    "resolution_note": closed["resolution_note"],
                    "resolution_entry_id": int(closed["resolution_entry_id"]) if closed["resolution_entry_id"]
                    else None, "postings": []}
    pay = await conn.fetchrow(Q.payment_for_resolve, e["payment_id"]) if e["payment_id"] else None
    line = await conn.fetchrow(Q.line_of_exception, exception_id)
    facts = Facts(
        reason=e["reason"], provider=e["provider"], currency=e["currency"], amount=e["amount"],
        payment_amount=pay["amount"] if pay else None, payment_applied=pay["applied_amount"] if pay else 0,
        payment_suspense=pay["suspense_amount"] if pay else 0, payment_agency=pay["agency_code"] if pay else None,
        payment_invoice=pay["invoice_id"] if pay else None,
        line_amount=line["amount"] if line else None, line_fee=line["fee"] if line else 0,
        line_currency=line["currency"] if line else None, payment_currency=pay["currency"] if pay else None,
        payment_provider=pay["provider"] if pay else None)
    if facts.reason == "amount_mismatch" and pay is not None:
        facts = replace(facts, currency=pay["currency"])
    if facts.reason == "settled_after_resolution":
        facts = replace(facts, earlier_debits=await _earlier_debits(conn, e["evidence"]),
                        earlier_action=_earlier_resolution(e["evidence"]).get("resolution"))
        if action == "match_to_invoice":
            facts = replace(facts, lowered=await _lowered(conn, e["evidence"], also_lock=invoice_id))
    if facts.reason == "missing_in_settlement" and action == "refund_due" and pay is not None:
        facts = await _where_suspense_is(conn, facts, exception_id, pay)
    if facts.reason in ("duplicate_in_settlement", "settled_after_resolution") and pay is not None \
            and action != "write_off":
        loss = await conn.fetchrow(Q.payment_write_off_loss, pay["id"], _write_off_account(facts))
        facts = replace(facts, write_off_loss=loss["written_off"], loss_recovered=loss["recovered"])
    if facts.reason == "duplicate_in_settlement" and pay is not None and action == "match_to_invoice":
        facts = replace(facts, payment_payable=await conn.fetchval(Q.refund_payable, pay["id"]))
    if facts.reason == "missing_in_settlement" and action == "write_off" and pay is not None:
        facts = replace(facts, duplicates_owed=await conn.fetchval(
            Q.payment_duplicates_owed, pay["id"], accounts.refunds_due(pay["currency"])))
    if facts.reason == "expired_part_paid":
        # Both invoices locked in id order (the expired one, and the one money is matched to)
        ids = sorted({e["invoice_id"], *([invoice_id] if action == "match_to_invoice" and invoice_id else [])})
        rows = {i: await conn.fetchrow(Q.invoice_for_resolve, i) for i in ids}
        held = rows[e["invoice_id"]]
        if held["status"] == "paid":
            # Paid in full since (treasury applied the rest): nothing is left to decide. Closed as such, whatever
            # was asked: the match that paid it closes it too, unless it found it being resolved (this).
            closed = await conn.fetchrow(Q.exceptions_close_paid_in_full, e["invoice_id"], now, by)
            if closed is None:
                raise AlreadyResolved(exception_id)
            return {"id": exception_id, "state": "resolved", "resolution": "paid_in_full", "resolved_by": by,
                    "resolved_at": now.isoformat(), "resolution_note": closed["resolution_note"],
                    "resolution_entry_id": None, "postings": []}
        part = held["amount_paid"] - await conn.fetchval(Q.part_paid_kept, e["invoice_id"])
        unsettled = tuple(r["payment_id"] for r in await conn.fetch(Q.part_paid_unsettled_payments, e["invoice_id"])) \
            if part > 0 else ()
        facts = replace(facts, part_paid=(held["id"], held["agency_code"], max(part, 0)), unsettled=unsettled)
    target = None
    inv = None
    if action == "match_to_invoice":
        if not invoice_id:
            raise ResolutionRefused("match_to_invoice needs invoice_id", field="invoice_id")
        inv = await conn.fetchrow(Q.invoice_for_resolve, invoice_id)
        if inv is None:
            raise ResolutionRefused(f"no invoice {invoice_id!r}", field="invoice_id")
        target = Target(inv["id"], inv["agency_code"], inv["currency"], inv["amount"] - inv["amount_paid"],
                        inv["status"])
    p = plan(facts, action, target, bank_account=bank_account)
    entry_id = None
    if p.postings:
        draft = ledger.EntryDraft(
            kind="exception_resolved",
            description=f"{e['reason']} {exception_id} resolved: {action}"[:500],
            effective_at=now,
            postings=[ledger.Posting(account=a, side=s, amount=n, currency=accounts.account_spec(a).currency)
                      for a, s, n in p.postings],
            idempotency_key=f"resolution:{exception_id}", payment_id=e["payment_id"],
            invoice_id=invoice_id if action == "match_to_invoice" else e["invoice_id"],
            settlement_id=line["settlement_id"] if line else None)
        entry = await ledger.post_entry(conn, draft)
        entry_id = entry.id
        await _tell_agencies(conn, entry, exception_id=exception_id, exception_invoice_id=e["invoice_id"], now=now)
    if facts.reason == "missing_in_settlement" and action == "refund_due" and pay is not None:
        # The refund takes back what treasury had applied of this payment to an invoice; one still open asks for
        # it again (found by review: it kept counting the part as paid, so paying the rest "paid" an invoice
        # whose agency kept only that rest). A paid invoice is not reopened.
        lowered = await conn.fetch(Q.invoices_refunded_part, pay["id"], [*CAPTURE_REASONS, "missing_in_ledger"])
        for r in lowered:  # an expired one's open expired_part_paid now holds less
            await conn.execute(Q.exception_part_paid_amount, r["id"], await conn.fetchval(Q.part_paid_kept, r["id"]))
        # Kept for a line that may still settle the payment (settled_after_resolution); an empty list too, so
        # that "lowered nothing" is recorded as such (found by review).
        await conn.execute(Q.exception_record_lowered, exception_id,
                           [{"invoice_id": r["id"], "amount": r["amount"]} for r in lowered])
    if p.cleared is not None:
        if await conn.fetchval(Q.invoice_clear_part_paid, *p.cleared) is None:
            raise ResolutionRefused(f"invoice {p.cleared[0]} no longer holds {p.cleared[1]}: try again")
    if facts.reason == "expired_part_paid" and facts.part_paid is not None:
        # What was decided of how much, kept with the exception: a write_off's part is the agency's for good (not
        # raised again), and a match keeps naming the expired invoice (its invoice_id), the other in evidence.
        _, _, part = facts.part_paid
        await conn.execute(Q.exception_add_evidence, exception_id,
                           {"kept": part} if action == "write_off" else
                           {"moved": part, **({"matched_to": invoice_id} if action == "match_to_invoice" else {})})
    grown = [(inv["id"], p.invoice_amount)] if p.invoice_amount and inv is not None else []
    for invoice, n in [*grown, *p.restored]:
        row = await conn.fetchrow(Q.invoice_apply_resolution, invoice, n, now)
        if row is not None and row["status"] == "paid":
            await add_event(conn, agency_id=row["agency_id"], type="invoice.paid", occurred_at=now, data={
                "invoice_id": row["id"], "reference": row["reference"], "bill_number": row["bill_number"],
                "status": row["status"], "currency": row["currency"], "amount": row["amount"],
                "amount_paid": row["amount_paid"], "paid_at": now.isoformat(), "exception_id": exception_id})
            # An expired invoice paid in full after all: its expired_part_paid, if open, has nothing left to decide
            await conn.fetchval(Q.exceptions_close_paid_in_full, row["id"], now, f"{by} ({exception_id})")
        elif row is not None and row["status"] == "expired" and 0 < row["amount_paid"] < row["amount"]:
            # Money applied to an expired invoice that still owes the rest (a late payment matched to it, say):
            # raised as the expiry would have raised it
            if await open_expired_part_paid(conn, row["id"], now=now, business_day=e["business_date"]
                                            or now.astimezone(PHNOM_PENH).date()) is None:
                # one is open: it holds more now
                await conn.execute(Q.exception_part_paid_amount, row["id"],
                                   await conn.fetchval(Q.part_paid_kept, row["id"]))
    done = await conn.fetchval(Q.exception_resolve, exception_id, now, by, action, note,
                               str(entry_id) if entry_id else None,
                               invoice_id if action == "match_to_invoice" and facts.reason != "expired_part_paid"
                               else None)
    if done is None:
        raise AlreadyResolved(exception_id)
    return {"id": exception_id, "state": "resolved", "resolution": action, "resolved_by": by,
            "resolved_at": now.isoformat(), "resolution_note": note, "resolution_entry_id": entry_id,
            "postings": [{"account": a, "side": s, "amount": n, "currency": accounts.account_spec(a).currency}
                         for a, s, n in p.postings]}


async def _lowered(conn: asyncpg.Connection, evidence, *, also_lock: str | None
                   ) -> tuple[tuple[str, str, str, int, int], ...]:
    """The invoices the earlier refund (of the payment's missing_in_settlement) lowered, as it recorded them,
    with their state now: (id, agency code, status, owed, lowered by). Locks them, and ``also_lock`` (the
    invoice the resolution names), in id order. A refund without the record (made before refunds lowered
    invoices) lowered nothing."""
    exception_id = _earlier_resolution(evidence).get("exception_id")
    recorded = await conn.fetchval(Q.exception_lowered, exception_id) if exception_id else None
    if isinstance(recorded, str):
        recorded = json.loads(recorded)
    by = {r["invoice_id"]: int(r["amount"]) for r in recorded or []}
    ids = sorted(set(by) | ({also_lock} if also_lock else set()))
    rows = {r["id"]: r for r in await conn.fetch(Q.invoices_for_restore, ids)} if ids else {}
    return tuple((i, rows[i]["agency_code"], rows[i]["status"], rows[i]["owed"], n)
                 for i, n in sorted(by.items()) if i in rows)


def _earlier_resolution(evidence) -> dict:
    """What a settled_after_resolution exception's evidence says of the earlier resolution ({} if nothing)."""
    if isinstance(evidence, str):
        evidence = json.loads(evidence)
    return (evidence or {}).get("earlier_resolution") or {}


async def _earlier_debits(conn: asyncpg.Connection, evidence) -> tuple[tuple[str, int], ...]:
    """What the entry of the earlier resolution (write_off, refund_due of missing_in_settlement) debited."""
    entry_id = _earlier_resolution(evidence).get("resolution_entry_id")
    if not entry_id:
        return ()
    rows = await conn.fetch(Q.settlement_entry_postings, int(entry_id))
    return tuple((r["account"], r["amount"]) for r in rows if r["side"] == "debit")


async def _where_suspense_is(conn: asyncpg.Connection, facts: Facts, exception_id: str, pay) -> Facts:
    """``facts`` with where the payment's suspense part is now, or the open exception still holding it.

    The holder is locked first, so a resolution of it that is committing is waited for and then seen."""
    if not facts.payment_suspense:
        return facts
    held_by = await conn.fetchval(Q.payment_suspense_holder, pay["id"], exception_id,
                                  [*CAPTURE_REASONS, "missing_in_ledger"])
    if held_by is not None:
        return replace(facts, suspense_held_by=held_by)
    moved = [(r["account"], r["amount"]) for r in
             await conn.fetch(Q.payment_suspense_moves, pay["id"], accounts.suspense(facts.currency))]
    left = facts.payment_suspense - sum(n for _, n in moved)
    if left > 0:
        moved.append((accounts.suspense(facts.currency), left))
    return replace(facts, suspense_now=tuple(moved))


async def _tell_agencies(conn: asyncpg.Connection, entry, *, exception_id: str, exception_invoice_id: str | None,
                         now: datetime) -> None:
    """A ``journal.posted`` event to each agency whose accounts ``entry`` moves, with its own postings only.

    Each names only an invoice of its own: the entry's (the invoice treasury matched the money to) or else the
    exception's (the invoice the money came from). An invoice's id is the only secret of its public pages, and
    treasury may match one agency's money to another's invoice (found by a security review: the event to the
    agency the money left named the other agency's invoice)."""
    codes = sorted({p.account.split(":")[1] for p in entry.postings if p.account.startswith("agency:")})
    if not codes:
        return
    ids = {r["code"]: r["id"] for r in await conn.fetch(Q.agencies_by_code, codes)}
    candidates = [i for i in (entry.invoice_id, exception_invoice_id) if i]
    owner = {r["id"]: r["code"] for r in await conn.fetch(Q.invoice_agencies, candidates)} if candidates else {}
    for code in codes:
        invoice_id = next((i for i in candidates if owner.get(i) == code), None)
        await add_event(conn, agency_id=ids[code], type="journal.posted", occurred_at=now, data=journal_posted(
            entry, code, payment_id=entry.payment_id, invoice_id=invoice_id, exception_id=exception_id))
