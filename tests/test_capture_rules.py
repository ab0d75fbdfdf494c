"""The pure capture rule: where each riel of a reported payment goes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from paysvc.capture import decide
from providers import PaymentNotice

T0 = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)


def notice(**kw) -> PaymentNotice:
    base = dict(provider="sandbox", transaction_id="t1", amount=50000, currency="KHR", to_account="moi@nbcq",
                paid_at=T0, confirmed=True)
    base.update(kw)
    return PaymentNotice(**base)


def invoice(**kw) -> dict:
    base = dict(id="inv_1", status="open", currency="KHR", amount=50000, amount_paid=0,
                expires_at=T0 + timedelta(hours=1), bakong_account="moi@nbcq")
    base.update(kw)
    return base


CODE = {"to_account": "moi@nbcq"}


@given(amount=st.integers(1, 10**9), owed=st.integers(1, 10**9),
       status=st.sampled_from(["open", "paid", "expired", "cancelled"]),
       currency=st.sampled_from(["KHR", "USD"]), account=st.sampled_from(["moi@nbcq", "x@y"]),
       late=st.booleans())
def test_every_riel_lands_somewhere_and_never_more_than_owed(amount, owed, status, currency, account, late):
    inv = invoice(status=status, amount=owed, expires_at=T0 - timedelta(seconds=1) if late else T0)
    d = decide(notice(amount=amount, currency=currency, to_account=account), inv, CODE)
    assert d.applied + d.suspense == amount
    assert 0 <= d.applied <= owed
    assert (d.reason is None) == (d.suspense == 0)
    assert d.pays_invoice == (d.applied > 0)


def test_the_reasons():
    assert decide(notice(), invoice(), CODE).reason is None
    assert decide(notice(), None, None).reason == "unknown_khqr"
    assert decide(notice(currency="USD"), invoice(), CODE).reason == "currency_mismatch"
    assert decide(notice(to_account="else@bank"), invoice(), CODE).reason == "account_mismatch"
    assert decide(notice(), invoice(status="cancelled"), CODE).reason == "invoice_cancelled"
    assert decide(notice(), invoice(status="paid"), CODE).reason == "duplicate_payment"
    assert decide(notice(amount=40000), invoice(), CODE).reason == "underpaid"
    over = decide(notice(amount=60000), invoice(), CODE)
    assert (over.reason, over.applied, over.suspense) == ("overpaid", 50000, 10000)
    late = invoice(status="expired", expires_at=T0 - timedelta(seconds=1))
    assert decide(notice(), late, CODE).reason == "invoice_expired"
    in_time = invoice(status="expired", expires_at=T0)
    assert decide(notice(), in_time, CODE).reason is None  # paid before expiry, reported after


def test_provider_silent_on_account_is_not_a_mismatch():
    # PayWay reports no Bakong account; amount and currency are still checked.
    assert decide(notice(to_account=None), invoice(), CODE).reason is None
