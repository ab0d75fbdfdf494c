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
    assert decide(notice(), in_time, CODE).reason == "invoice_expired"  # expired is final (see below)


def test_provider_silent_on_account_is_not_a_mismatch():
    # PayWay reports no Bakong account; amount and currency are still checked.
    assert decide(notice(to_account=None), invoice(), CODE).reason is None


def test_a_payment_after_expiry_is_late_whether_or_not_the_expiry_job_has_run():
    # The expiry job marks invoices every few seconds; the answer must not depend on whether it has yet.
    lapsed = dict(expires_at=T0 - timedelta(hours=1))
    assert decide(notice(), invoice(status="open", **lapsed), CODE).reason == "invoice_expired"
    assert decide(notice(), invoice(status="expired", **lapsed), CODE).reason == "invoice_expired"
    late = decide(notice(), invoice(status="open", **lapsed), CODE)
    assert (late.applied, late.suspense, late.pays_invoice) == (0, 50000, False)
    # Made in time, reported after the invoice closed: it pays while the job has not marked it yet; once marked
    # expired (the portal told) it is held for treasury, however early it was made.
    assert decide(notice(), invoice(status="open", expires_at=T0), CODE).reason is None
    assert decide(notice(), invoice(status="expired", expires_at=T0), CODE).reason == "invoice_expired"
    assert decide(notice(), invoice(status="expired", expires_at=T0 + timedelta(hours=1)),
                  CODE).reason == "invoice_expired"


def test_a_notice_naming_a_code_we_never_issued_is_unknown_even_when_its_bill_number_matches():
    # capture passes code=None when the md5 matches no code we issued, and the invoice its bill number names.
    assert decide(notice(md5="a" * 32), invoice(), None).reason == "unknown_khqr"
    # A provider that sends no md5 (ABA) is matched by bill number, as before.
    assert decide(notice(md5=None), invoice(), None).reason is None
    assert decide(notice(md5="a" * 32), invoice(), {**CODE, "md5": "a" * 32}).reason is None


def test_a_paid_at_that_cannot_be_true_does_not_decide_whether_it_was_paid_in_time():
    issued = {**CODE, "created_at": T0 - timedelta(minutes=1)}
    assert decide(notice(), invoice(), issued, received_at=T0).reason is None
    assert decide(notice(), invoice(), issued, received_at=T0).time_trusted
    cases = [
        # paid before its code was issued (more than the clock skew allowed)
        (notice(paid_at=datetime(2020, 1, 1, tzinfo=UTC)), invoice(), issued, T0),
        (notice(paid_at=T0 - timedelta(minutes=7)), invoice(), issued, T0),
        # no code: the invoice's creation bounds it
        (notice(paid_at=T0 - timedelta(hours=2)), invoice(created_at=T0 - timedelta(hours=1)), None, T0),
        # paid after it reached us
        (notice(paid_at=T0 + timedelta(minutes=6)), invoice(), issued, T0),
        # on an expired invoice it does not say "late": it says the time is not to be believed
        (notice(paid_at=datetime(2020, 1, 1, tzinfo=UTC)), invoice(status="expired", expires_at=T0 - timedelta(hours=1)),
         issued, T0),
    ]
    for n, inv, code, received in cases:
        d = decide(n, inv, code, received_at=received)
        assert (d.reason, d.applied, d.suspense, d.pays_invoice, d.time_trusted) == \
            ("paid_at_implausible", 0, n.amount, False, False), (n.paid_at, inv, code)
    # A few minutes of clock skew either way are allowed.
    assert decide(notice(paid_at=T0 - timedelta(minutes=5)), invoice(), {**CODE, "created_at": T0},
                  received_at=T0).reason is None
    assert decide(notice(paid_at=T0 + timedelta(minutes=5)), invoice(), issued, received_at=T0).reason is None
    # Where the time does not matter the reason stays what it was, but the time is still not trusted.
    d = decide(notice(paid_at=datetime(2020, 1, 1, tzinfo=UTC)), invoice(status="cancelled"), issued, received_at=T0)
    assert (d.reason, d.time_trusted) == ("invoice_cancelled", False)
