"""The pure side of the ledger: account codes, drafts that refuse to be unbalanced, canonical hashing."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import ledger
from ledger import EntryDraft, Posting, entries

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=7)))


def test_ledger_imports_nothing_of_paysvc_or_providers():
    code = ("import sys, ledger, ledger.entries; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('paysvc', 'providers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("code, type_, side", [
    ("provider:sandbox:clearing:KHR", "asset", "debit"),
    ("agency:MOI:revenue:USD", "revenue", "credit"),
    ("suspense:unmatched:KHR", "liability", "credit"),
    ("treasury:bank:ACLEDA-001:KHR", "asset", "debit"),
    ("expense:provider-fees:aba_payway:USD", "expense", "debit"),
    ("equity:opening:KHR", "equity", "credit"),
])
def test_account_type_and_currency_follow_from_the_code(code, type_, side):
    spec = ledger.account_spec(code)
    assert (spec.type, spec.normal_side, spec.currency) == (type_, side, code[-3:])


@pytest.mark.parametrize("code", ["bogus:thing:KHR", "agency:MOI:revenue:EUR", "agency", "Agency:MOI:KHR", ""])
def test_unknown_account_types_and_currencies_are_refused(code):
    with pytest.raises(ledger.InvalidAccount):
        ledger.account_spec(code)


def p(account: str, side: str, amount: int, currency: str = "KHR") -> Posting:
    return Posting(account=account, side=side, amount=amount, currency=currency)


def test_a_draft_must_balance_per_currency():
    with pytest.raises(ValidationError, match="does not balance"):
        EntryDraft(kind="x", description="", effective_at=T0, postings=(
            p("provider:s:clearing:KHR", "debit", 100), p("agency:MOI:revenue:KHR", "credit", 99)))
    # balanced in total but not per currency
    with pytest.raises(ValidationError, match="does not balance"):
        EntryDraft(kind="x", description="", effective_at=T0, postings=(
            p("provider:s:clearing:KHR", "debit", 100), p("agency:MOI:revenue:USD", "credit", 100, "USD")))


def test_a_draft_needs_two_postings_positive_amounts_and_matching_currencies():
    with pytest.raises(ValidationError):
        EntryDraft(kind="x", description="", effective_at=T0, postings=(p("provider:s:clearing:KHR", "debit", 1),))
    with pytest.raises(ValidationError):
        p("provider:s:clearing:KHR", "debit", 0)
    with pytest.raises(ValidationError):
        p("provider:s:clearing:KHR", "debit", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="account in KHR"):
        p("provider:s:clearing:KHR", "debit", 100, "USD")
    with pytest.raises(ValidationError, match="unknown type"):
        p("wallet:s:KHR", "debit", 100)
    with pytest.raises(ValidationError, match="timezone"):
        EntryDraft(kind="x", description="", effective_at=datetime(2026, 1, 1), postings=(
            p("provider:s:clearing:KHR", "debit", 1), p("agency:MOI:revenue:KHR", "credit", 1)))


def test_drafts_are_frozen():
    d = entries.payment_captured(provider="sandbox", agency="MOI", amount=50_000, currency="KHR", effective_at=T0,
                                 invoice_id="inv_1", payment_id="pay_1")
    with pytest.raises(ValidationError):
        d.description = "changed"  # type: ignore[misc]


def test_canonical_encoding_is_stable():
    """A fixed vector: changing the encoding would orphan every hash already recorded."""
    d = EntryDraft(kind="payment.captured", description="Passport fee ពន្ធ", effective_at=T0,
                   postings=(p("provider:sandbox:clearing:KHR", "debit", 50_000),
                             p("agency:MOI:revenue:KHR", "credit", 50_000)),
                   idempotency_key="k1", invoice_id="inv_1", payment_id="pay_1")
    assert ledger.canonical_content(**{k: getattr(d, k) for k in (
        "kind", "description", "effective_at", "postings", "idempotency_key", "invoice_id", "payment_id",
        "settlement_id", "reverses")}) == (
        'paysvc.ledger.entry.v1\n{"description":"Passport fee ពន្ធ","effective_at_us":1772332200000000,'
        '"idempotency_key":"k1","invoice_id":"inv_1","kind":"payment.captured","payment_id":"pay_1",'
        '"postings":[{"account":"provider:sandbox:clearing:KHR","amount":50000,"currency":"KHR","side":"debit"},'
        '{"account":"agency:MOI:revenue:KHR","amount":50000,"currency":"KHR","side":"credit"}],'
        '"reverses":null,"settlement_id":null}').encode()
    same_instant = d.model_copy(update={"effective_at": T0.astimezone(timezone.utc)})
    assert ledger.content_hash(same_instant) == ledger.content_hash(d)
    assert ledger.content_hash(d.model_copy(update={"description": "Passport fee"})) != ledger.content_hash(d)
    assert ledger.chain_hash(bytes(32), 1, 7, ledger.content_hash(d)) != ledger.chain_hash(
        bytes(32), 2, 7, ledger.content_hash(d))


def test_entry_builders_follow_the_posting_table():
    s = entries.settlement_received(provider="sandbox", bank_account="NBC-1", gross=100_000, fees=1_000,
                                    currency="KHR", effective_at=T0, settlement_id="st_1")
    assert [(x.account, x.side, x.amount) for x in s.postings] == [
        ("treasury:bank:NBC-1:KHR", "debit", 99_000), ("expense:provider-fees:sandbox:KHR", "debit", 1_000),
        ("provider:sandbox:clearing:KHR", "credit", 100_000)]
    u = entries.payment_to_suspense(provider="sandbox", amount=60_000, owed=50_000, agency="MOI", currency="KHR",
                                    effective_at=T0, payment_id="pay_2", invoice_id="inv_2")
    assert {(x.account, x.side, x.amount) for x in u.postings} == {
        ("provider:sandbox:clearing:KHR", "debit", 60_000), ("suspense:unmatched:KHR", "credit", 10_000),
        ("agency:MOI:revenue:KHR", "credit", 50_000)}
    r = entries.refund(provider="sandbox", agency="MOI", amount=5, currency="USD", effective_at=T0,
                       payment_id="pay_3", refund_id="rf_1")
    assert [(x.account, x.side) for x in r.postings] == [("agency:MOI:revenue:USD", "debit"),
                                                         ("provider:sandbox:clearing:USD", "credit")]


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # any Unicode but lone surrogates


@settings(max_examples=300)
@given(kind=_text, description=_text, micros=st.integers(-2**62, 2**62), reverses=st.none() | st.integers(1, 2**62),
       keys=st.tuples(*[st.none() | _text] * 4),
       postings=st.lists(st.tuples(_text, st.sampled_from(["debit", "credit"]), st.integers(1, 10**15),
                                   st.sampled_from(["KHR", "USD"])), max_size=5))
def test_the_fast_canonical_encoding_writes_exactly_the_reference_bytes(kind, description, micros, reverses, keys,
                                                                       postings):
    from types import SimpleNamespace

    from ledger.canonical import reference_canonical_content

    fields = dict(
        kind=kind, description=description, effective_at=datetime(1970, 1, 1, tzinfo=timezone.utc)
        + timedelta(microseconds=micros % (2**53)), reverses=reverses,
        idempotency_key=keys[0], invoice_id=keys[1], payment_id=keys[2], settlement_id=keys[3],
        postings=[SimpleNamespace(account=a, side=s, amount=n, currency=c) for a, s, n, c in postings])
    assert ledger.canonical_content(**fields) == reference_canonical_content(**fields)
