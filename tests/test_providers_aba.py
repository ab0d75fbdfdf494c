"""The ABA PayWay plugin (push, then confirm) against a real local server answering as PayWay does."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers import (MalformedCallback, NotConfirmed, PaymentNotice, PaymentPending, ProviderAuthError,
                       ProviderError, ProviderUnavailable, RateLimited, Unsupported)
from providers.aba_payway import PayWayConfig, PayWayProvider, create, request_hash
from tests.fakes.aba import FakePayWay

MERCHANT = "ec000002"
API_KEY = "test-api-key"
NOW = datetime(2025, 6, 1, 9, 30, 5, tzinfo=timezone.utc)
TRAN = "INV-2025-000199"
# PayWay's pushback, as its docs show it: no signature, nothing that can be trusted.
GOLDEN_CALLBACK = b'{"tran_id":"INV-2025-000199","apv":"619195","status":"00","return_params":"inv=7f3a"}'
# base64(HMAC-SHA512("20250601093005ec000002INV-2025-000199", "test-api-key")), computed with openssl.
GOLDEN_HASH = "QX6TrFqlhs4Lr0lL/s/gmUqjaqSetaBzp8N0lKYiDHwvR+y7zFkcrEj6w4rJz6A4+tET1JyUZK41t6rp3wFk9Q=="


@pytest.fixture
async def fake():
    server = FakePayWay(merchant_id=MERCHANT, api_key=API_KEY)
    await server.start()
    yield server
    await server.close()


def provider_for(fake: FakePayWay, **overrides) -> PayWayProvider:
    config = PayWayConfig(**{"merchant_id": MERCHANT, "api_key": API_KEY, "base_url": fake.url, "timeout": 2,
                             **overrides})
    return PayWayProvider(config, clock=lambda: NOW)


@pytest.fixture
async def aba(fake):
    provider = provider_for(fake)
    yield provider
    await provider.aclose()


def hint(tran_id: str = TRAN) -> PaymentNotice:
    body = GOLDEN_CALLBACK.replace(TRAN.encode(), tran_id.encode())
    return create({"merchant_id": MERCHANT, "api_key": API_KEY}).parse_callback({}, body)[0]


def test_request_hash_matches_the_payway_formula():
    assert request_hash("20250601093005", MERCHANT, TRAN, API_KEY) == GOLDEN_HASH


def test_callback_is_only_a_hint():
    provider = create({"merchant_id": MERCHANT, "api_key": API_KEY})
    assert provider.pattern == "push_confirm"
    provider.verify_callback({}, GOLDEN_CALLBACK, now=NOW)  # no signature to check, only its form
    [notice] = provider.parse_callback({}, GOLDEN_CALLBACK)
    assert notice == PaymentNotice(provider="aba_payway", transaction_id=TRAN, bill_number=TRAN, confirmed=False,
                                   raw=json.loads(GOLDEN_CALLBACK))
    assert (notice.amount, notice.currency, notice.paid_at) == (None, None, None)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"apv":"1","status":"00"}', b'{"tran_id":"","status":"00"}',
    b'{"tran_id":"INV 1; DROP","status":"00"}', b'{"tran_id":"INV-1"}', b'{"tran_id":12,"status":"00"}',
    b'{"tran_id":"INV-1","status":"00","apv":7}', b'{"tran_id":"' + b"x" * 51 + b'","status":"00"}',
])
def test_malformed_callback_is_refused(body):
    provider = create({"merchant_id": MERCHANT, "api_key": API_KEY})
    with pytest.raises(MalformedCallback):
        provider.verify_callback({}, body, now=NOW)
    with pytest.raises(MalformedCallback):
        provider.parse_callback({}, body)


@pytest.mark.parametrize("body, says", [
    (b'{"tran_id":"T1","status":0,"apv":"\\u0000"}', "NUL"),
    (b'{"tran_id":"T1","status":0,"note":"\\u0000"}', "NUL"),
    (b'{"tran_id":"T1","status":0,"\\u0000":"x"}', "NUL"),
    (b'{"tran_id":"T1","status":0,"x":' + b"[" * 900 + b"]" * 900 + b"}", "nested too deeply"),
], ids=["nul_in_apv", "nul_in_other_field", "nul_in_a_key", "deep_nesting"])
def test_a_callback_that_cannot_be_a_notice_is_malformed_not_an_error(body, says):
    # Found by an API fuzz audit: these passed the form check, then building the notice raised pydantic's
    # ValidationError or RecursionError, so the service answered 202 and retried the row forever.
    provider = create({"merchant_id": MERCHANT, "api_key": API_KEY})
    with pytest.raises(MalformedCallback, match=says):
        provider.parse_callback({}, body)


def test_callback_status_as_int_zero_like_the_older_docs_is_accepted():
    provider = create({"merchant_id": MERCHANT, "api_key": API_KEY})
    provider.verify_callback({}, b'{"tran_id":"1632300046","apv":"000011","status":0}', now=NOW)


async def test_confirm_approved_takes_amount_currency_and_date_from_payway(fake, aba):
    fake.add_transaction(TRAN, status="APPROVED", amount="12.5", currency="USD",
                         transaction_date="2025-06-01 16:30:05")
    confirmed = await aba.confirm(hint())
    assert confirmed.confirmed is True
    assert (confirmed.transaction_id, confirmed.bill_number) == (TRAN, TRAN)
    assert (confirmed.amount, confirmed.currency) == (1250, "USD")
    assert confirmed.paid_at == datetime(2025, 6, 1, 9, 30, 5, tzinfo=timezone.utc)  # Phnom Penh is UTC+7
    assert confirmed.to_account is None and confirmed.md5 is None
    assert confirmed.raw["check_transaction"]["payment_status"] == "APPROVED"
    assert confirmed.raw["callback"]["apv"] == "619195"
    sent = fake.requests[0].json
    assert sent == {"req_time": "20250601093005", "merchant_id": MERCHANT, "tran_id": TRAN, "hash": GOLDEN_HASH}


async def test_confirm_khr(fake, aba):
    fake.add_transaction(TRAN, amount=100000, currency="KHR")
    confirmed = await aba.confirm(hint())
    assert (confirmed.amount, confirmed.currency) == (100000, "KHR")


async def test_golden_check_transaction_answer(fake, aba):
    fake.fail_next(200, (b'{"data":{"payment_status_code":0,"total_amount":0.1,"original_amount":0.1,'
                         b'"refund_amount":0,"discount_amount":0,"payment_amount":0.1,"payment_currency":"USD",'
                         b'"apv":"225808","payment_status":"APPROVED","transaction_date":"2025-02-13 13:56:20"},'
                         b'"status":{"code":"00","message":"Success!","tran_id":"INV-2025-000199"}}'))
    confirmed = await aba.confirm(hint())
    assert (confirmed.amount, confirmed.currency) == (10, "USD")
    assert confirmed.paid_at == datetime(2025, 2, 13, 6, 56, 20, tzinfo=timezone.utc)


@pytest.mark.parametrize("status", ["DECLINED", "CANCELLED", "REFUNDED", "PRE-AUTH"])
async def test_any_status_but_approved_is_not_confirmed(fake, aba, status):
    fake.add_transaction(TRAN, status=status)
    with pytest.raises(NotConfirmed) as err:
        await aba.confirm(hint())
    assert err.value.status == status and not isinstance(err.value, PaymentPending)


@pytest.mark.parametrize("spelled", ["approved", "Approved", "APPROVED ", "SETTLED"])
async def test_only_approved_as_documented_captures_and_a_status_not_understood_is_asked_again(fake, aba, spelled):
    # Found by review: the status was upper-cased first, so "approved" captured; the API says "APPROVED". A status
    # PayWay does not document is not a final "not paid" either (that would drop the callback): it is an answer
    # not understood, asked again later.
    fake.fail_next(200, json.dumps({"status": {"code": "00"}, "data": {
        "payment_status": spelled, "payment_amount": 1, "payment_currency": "USD",
        "transaction_date": "2025-06-01 10:00:00"}}).encode())
    with pytest.raises(ProviderUnavailable) as err:
        await aba.confirm(hint())
    assert not isinstance(err.value, NotConfirmed) and "none of PayWay's statuses" in str(err.value)


async def test_pending_is_not_confirmed_yet(fake, aba):
    fake.add_transaction(TRAN, status="PENDING")
    with pytest.raises(PaymentPending) as err:
        await aba.confirm(hint())
    assert isinstance(err.value, NotConfirmed) and err.value.code == "payment_pending"


async def test_unknown_tran_id_is_not_confirmed(fake, aba):
    with pytest.raises(NotConfirmed) as err:
        await aba.confirm(hint("FORGED-1"))
    assert err.value.status == "NOT_FOUND"


async def test_a_wrong_key_is_rejected_by_payway_so_our_hash_is_what_it_checks(fake):
    fake.add_transaction(TRAN)
    wrong = provider_for(fake, api_key="not-the-key")
    try:
        with pytest.raises(ProviderAuthError, match="Wrong Hash"):
            await wrong.confirm(hint())
    finally:
        await wrong.aclose()
    assert fake.requests[-1].json["hash"] != fake.expected_hash("20250601093005", TRAN)
    other_merchant = provider_for(fake, merchant_id="ec999999")
    try:
        with pytest.raises(ProviderAuthError):
            await other_merchant.confirm(hint())
    finally:
        await other_merchant.aclose()


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_unavailable(fake, aba, status):
    fake.fail_next(status, b"<html>oops</html>", content_type="text/html")
    with pytest.raises(ProviderUnavailable):
        await aba.confirm(hint())


async def test_429_is_rate_limited(fake, aba):
    fake.fail_next(429, b"{}", headers={"Retry-After": "3"})
    with pytest.raises(RateLimited) as err:
        await aba.confirm(hint())
    assert err.value.retry_after == 3.0


async def test_timeout_is_unavailable(fake):
    fake.delay = 1.0
    provider = provider_for(fake, timeout=0.2)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.confirm(hint())
    finally:
        await provider.aclose()


@pytest.mark.parametrize("body", [
    b"garbage", b"{}", b'{"status":{"code":"00"}}', b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED"}}',
    b'{"status":{"code":"00","tran_id":"OTHER"},"data":{"payment_status":"APPROVED","payment_amount":1,'
    b'"payment_currency":"USD","transaction_date":"2025-06-01 10:00:00"}}',
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":1.234,'
    b'"payment_currency":"USD","transaction_date":"2025-06-01 10:00:00"}}',
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":1,'
    b'"payment_currency":"USD","transaction_date":"June 1st"}}',
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":0,'
    b'"payment_currency":"USD","transaction_date":"2025-06-01 10:00:00"}}',
    b'{"status":{"code":"99","message":"Service busy"}}',
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":1,'
    b'"payment_currency":"USD","transaction_date":"0001-01-01 00:00:00"}}',     # before year 1 once in UTC
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":1,'
    b'"payment_currency":"USD","transaction_date":"9999-12-31 23:59:59"}}',
    b'{"status":{"code":"00"},"data":{"payment_status":"APPROVED","payment_amount":1,'
    b'"payment_currency":"USD","transaction_date":"1999-12-31 23:59:59"}}',
    # found by review: a status.code that is a list or an object raised TypeError; true is not a code
    b'{"status":{"code":["00"]}}', b'{"status":{"code":{}}}', b'{"status":{"code":true}}',
])
async def test_an_answer_not_in_the_documented_shape_is_unavailable(fake, aba, body):
    fake.fail_next(200, body)
    with pytest.raises(ProviderUnavailable):
        await aba.confirm(hint())


async def test_confirm_only_for_its_own_notices(aba):
    other = PaymentNotice(provider="sandbox", transaction_id="x", amount=1, currency="KHR", paid_at=NOW,
                          confirmed=True)
    with pytest.raises(ValueError):
        await aba.confirm(other)


async def test_payway_is_not_polled(aba):
    with pytest.raises(Unsupported):
        await aba.poll([])
    with pytest.raises(NotImplementedError):
        aba.parse_settlement(b"")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["tran_id", "apv", "status", "return_params", "x"]),
                                 st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=60),
                                           st.booleans(), st.lists(st.text(max_size=3), max_size=2)))
                 .map(lambda d: json.dumps(d).encode())))
def test_verify_and_parse_callback_on_arbitrary_bytes_raise_only_provider_errors(body):
    provider = create({"merchant_id": MERCHANT, "api_key": API_KEY})
    try:
        provider.verify_callback({}, body, now=NOW)
    except ProviderError:
        pass
    try:
        notices = provider.parse_callback({}, body)
    except ProviderError:
        return
    assert all(not n.confirmed for n in notices)


@pytest.mark.parametrize("body, says", [
    (b'{"tran_id":"T1"}', "status is missing"),
    (b'{"tran_id":"T1","status":1e999999}', "status must be a string or a JSON integer"),
    (b'{"tran_id":"T1","status":true}', "status must be a string or a JSON integer"),
])
def test_a_status_that_is_not_a_string_or_integer_is_not_called_missing(body, says):
    # Found by a fuzz audit: every bad status was reported as missing.
    with pytest.raises(MalformedCallback, match=says):
        create({"merchant_id": MERCHANT, "api_key": API_KEY}).parse_callback({}, body)
