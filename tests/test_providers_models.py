"""The shared models and money rules every provider answers with."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from providers import AmountError, PaymentNotice, PendingKhqr, SettlementLine, from_minor, loads_exact, to_minor

ICT = timezone(timedelta(hours=7))


@pytest.mark.parametrize("currency, value, minor", [
    ("USD", "12.50", 1250), ("USD", "12.5", 1250), ("USD", "100", 10000), ("USD", Decimal("0.01"), 1),
    ("USD", 7, 700), ("KHR", "25000", 25000), ("KHR", 25000, 25000), ("KHR", Decimal("25000.0"), 25000),
    ("USD", loads_exact(b"12.5"), 1250), ("USD", loads_exact(b"0.29"), 29),
])
def test_to_minor_is_exact(currency, value, minor):
    assert to_minor(currency, value) == minor


@pytest.mark.parametrize("currency, value", [
    ("USD", "12.505"), ("KHR", "1.5"), ("KHR", Decimal("0.1")), ("USD", 12.5), ("USD", True), ("USD", "1e3"),
    ("USD", "12,50"), ("USD", " "), ("USD", "١٢"), ("EUR", "1"), ("USD", Decimal("NaN")), ("USD", None),
])
def test_to_minor_refuses_what_is_not_a_whole_number_of_minor_units(currency, value):
    with pytest.raises(AmountError):
        to_minor(currency, value)


def test_float_arithmetic_would_be_wrong_here_and_we_do_not_use_it():
    assert int(0.29 * 100) == 28  # why floats are refused
    assert to_minor("USD", "0.29") == 29


@given(st.sampled_from(["KHR", "USD"]), st.integers(min_value=0, max_value=10**15))
def test_from_minor_and_to_minor_round_trip(currency, minor):
    assert to_minor(currency, from_minor(currency, minor)) == minor


def test_from_minor_writes_khqr_style_text():
    assert from_minor("USD", 1250) == "12.50"
    assert from_minor("KHR", 25000) == "25000"


def test_loads_exact_refuses_nan_and_keeps_decimals():
    assert loads_exact(b'{"a": 12.50}') == {"a": Decimal("12.50")}
    with pytest.raises(ValueError):
        loads_exact(b'{"a": NaN}')


def test_confirmed_notice_needs_amount_currency_and_paid_at_and_is_frozen():
    with pytest.raises(ValidationError, match="amount, currency, paid_at"):
        PaymentNotice(provider="x", transaction_id="t", confirmed=True)
    n = PaymentNotice(provider="x", transaction_id="t", amount=1, currency="KHR", confirmed=True,
                      paid_at=datetime(2025, 6, 1, 9, 0, tzinfo=ICT), md5="A" * 32)
    assert n.paid_at == datetime(2025, 6, 1, 2, 0, tzinfo=timezone.utc) and n.paid_at.tzinfo == timezone.utc
    assert n.md5 == "a" * 32
    with pytest.raises(ValidationError):
        n.amount = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        PaymentNotice(provider="x", transaction_id="t", amount=1, currency="KHR", confirmed=True,
                      paid_at=datetime(2025, 6, 1, 9, 0))  # naive
    with pytest.raises(ValidationError):
        PaymentNotice(provider="x", transaction_id="t", amount=0, currency="KHR", confirmed=True,
                      paid_at=datetime(2025, 6, 1, tzinfo=timezone.utc))
    with pytest.raises(ValidationError):
        PaymentNotice(provider="x", transaction_id="t", confirmed=False, surprise=1)


def test_pending_and_settlement_line_validate():
    PendingKhqr(md5="a" * 32, currency="USD", amount=1250, to_account="fees@devb",
                expires_at=datetime(2025, 6, 1, tzinfo=timezone.utc))
    with pytest.raises(ValidationError):
        PendingKhqr(md5="short", currency="USD", amount=1250, to_account="a@b",
                    expires_at=datetime(2025, 6, 1, tzinfo=timezone.utc))
    with pytest.raises(ValidationError):
        SettlementLine(line_no=2, amount=5, currency="USD", fee=-1)


@pytest.mark.parametrize("paid_at", [
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),   # datetime.max: `infinity` in PostgreSQL
    datetime(2100, 1, 1, tzinfo=timezone.utc),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
    datetime(1, 1, 1, tzinfo=timezone.utc),
    datetime(2000, 1, 1, 6, 59, tzinfo=ICT),                            # 1999 once in UTC
])
def test_a_time_no_payment_can_have_is_refused(paid_at):
    with pytest.raises(ValidationError, match="out of range"):
        PaymentNotice(provider="x", transaction_id="t", amount=1, currency="KHR", confirmed=True, paid_at=paid_at)
    with pytest.raises(ValidationError, match="out of range"):
        SettlementLine(line_no=2, amount=5, currency="KHR", paid_at=paid_at)


def test_the_edges_of_the_payment_time_range_are_accepted():
    for paid_at in (datetime(2000, 1, 1, tzinfo=timezone.utc),
                    datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)):
        n = PaymentNotice(provider="x", transaction_id="t", amount=1, currency="KHR", confirmed=True, paid_at=paid_at)
        assert n.paid_at == paid_at
        assert SettlementLine(line_no=2, amount=5, currency="KHR", paid_at=paid_at).paid_at == paid_at


@pytest.mark.parametrize("field", ["transaction_id", "bill_number", "to_account", "from_account"])
def test_a_nul_in_a_notice_is_refused_naming_the_field(field):
    # Found by a fuzz audit: the refusal said only "value", not which field held the NUL.
    fields = {"provider": "sandbox", "transaction_id": "T1", "confirmed": False, field: "a\x00b"}
    with pytest.raises(ValidationError, match=f"must not contain NUL characters: {field} "):
        PaymentNotice(**fields)
    with pytest.raises(ValidationError, match="must not contain NUL characters: raw "):
        PaymentNotice(provider="sandbox", transaction_id="T1", confirmed=False, raw={"k": ["a\x00"]})
