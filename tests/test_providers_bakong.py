"""The Bakong plugin (pull) against a real local server that answers as Bakong's API documents."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers import (PaymentNotice, PendingKhqr, PollResult, ProviderAuthError, ProviderError, ProviderUnavailable,
                       ProviderConfigError, RateLimited, SettlementFormatError, SettlementLine, TokenRefused,
                       Unsupported)
from providers.bakong import create, parse_renew_answer
from providers.transport import HttpAnswer
from tests.fakes.bakong import FakeBakong, dumps, envelope

TOKEN = "test-token"
EXPIRES = datetime(2025, 6, 1, 3, 0, tzinfo=timezone.utc)


def md5_of(i: int) -> str:
    return hashlib.md5(f"khqr-{i}".encode()).hexdigest()


def pending(*md5s: str, currency: str = "KHR", amount: int = 25000) -> list[PendingKhqr]:
    return [PendingKhqr(md5=m, bill_number=f"INV-{n}", currency=currency, amount=amount, to_account="fees@devb",
                        expires_at=EXPIRES) for n, m in enumerate(md5s)]


@pytest.fixture
async def fake():
    server = FakeBakong(token=TOKEN)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def bakong(fake):
    provider = create({"token": TOKEN, "base_url": fake.base_url, "timeout": 2})
    yield provider
    await provider.aclose()


async def test_success_usd_fraction_becomes_cents_and_all_fields_map(fake, bakong):
    m = md5_of(1)
    fake.add_payment(m, amount="12.5", currency="USD", to_account="fees@devb", from_account="citizen@aba",
                     tx_hash="a" * 64, created_ms=1748745000000, acknowledged_ms=1748745001234)
    result = await bakong.poll(pending(m, currency="USD", amount=1250))
    [notice] = result.notices
    assert result.unreadable == []
    assert notice == PaymentNotice(
        provider="bakong", transaction_id="a" * 64, md5=m, amount=1250, currency="USD", to_account="fees@devb",
        from_account="citizen@aba", paid_at=datetime(2025, 6, 1, 2, 30, 1, 234000, tzinfo=timezone.utc),
        confirmed=True, raw=notice.raw)
    assert notice.raw["data"]["amount"] == "12.5"  # evidence keeps Bakong's exact number, as text
    request = fake.requests[0]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json == [m]  # a bare JSON array


async def test_success_khr_whole_amount_and_created_date_when_not_acknowledged(fake, bakong):
    m = md5_of(2)
    fake.add_payment(m, amount=25000, currency="KHR", created_ms=1748745000000, acknowledged_ms=None)
    [notice] = (await bakong.poll(pending(m))).notices
    assert (notice.amount, notice.currency) == (25000, "KHR")
    assert notice.paid_at == datetime(2025, 6, 1, 2, 30, tzinfo=timezone.utc)


async def test_not_found_and_static_qr_report_nothing(fake, bakong):
    fake.static_qr.add(md5_of(4))
    assert await bakong.poll(pending(md5_of(3), md5_of(4))) == PollResult()
    assert await bakong.poll([]) == PollResult()
    assert len(fake.requests) == 1  # an empty list costs no call


async def test_120_md5_are_asked_in_three_calls_of_at_most_50(fake, bakong):
    md5s = [md5_of(i) for i in range(120)]
    for i in (0, 49, 50, 119):
        fake.add_payment(md5s[i], amount=100 + i, currency="KHR", tx_hash=f"{i:064x}")
    notices = (await bakong.poll(pending(*md5s))).notices
    assert fake.batch_sizes() == [50, 50, 20]
    assert sorted(n.amount for n in notices) == [100, 149, 150, 219]
    assert [m for r in fake.requests for m in r.json] == md5s  # each asked once, in order


async def test_duplicate_md5_are_asked_once(fake, bakong):
    await bakong.poll(pending(md5_of(1), md5_of(1), md5_of(2)))
    assert fake.batch_sizes() == [2]


async def test_the_fake_refuses_more_than_50_like_bakong(fake):
    provider = create({"token": TOKEN, "base_url": fake.base_url})
    try:
        answer = await provider._http.post_json(f"{fake.base_url}/check_transaction_by_md5_list",
                                                [md5_of(i) for i in range(51)],
                                                headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        await provider.aclose()
    assert answer.status == 400


async def test_429_is_rate_limited_with_retry_after(fake, bakong):
    fake.fail_next(429, dumps(envelope(None, 1, None, "Too many requests")), headers={"Retry-After": "7"})
    with pytest.raises(RateLimited) as err:
        await bakong.poll(pending(md5_of(1)))
    assert err.value.retry_after == 7.0
    assert isinstance(err.value, ProviderUnavailable)


async def test_429_with_an_http_date_retry_after(fake, bakong):
    fake.fail_next(429, b"", headers={"Retry-After": "Sun, 01 Jun 2025 02:30:30 GMT",
                                      "Date": "Sun, 01 Jun 2025 02:30:00 GMT"})
    with pytest.raises(RateLimited) as err:
        await bakong.poll(pending(md5_of(1)))
    assert err.value.retry_after == 30.0  # measured against the answer's own Date, not our clock


async def test_500_is_unavailable(fake, bakong):
    fake.fail_next(500, b"<html>Internal Server Error</html>", content_type="text/html")
    with pytest.raises(ProviderUnavailable) as err:
        await bakong.poll(pending(md5_of(1)))
    assert type(err.value) is ProviderUnavailable and "500" in str(err.value)


async def test_a_failure_in_a_later_batch_raises(fake, bakong):
    fake.fail_next(200, dumps(envelope([])))  # first batch fine (nothing found)
    fake.fail_next(503)
    with pytest.raises(ProviderUnavailable):
        await bakong.poll(pending(*[md5_of(i) for i in range(60)]))


async def test_missing_bearer_401_is_auth_error(fake):
    provider = create({"token": TOKEN, "base_url": fake.base_url})
    try:
        answer = await provider._http.post_json(f"{fake.base_url}/check_transaction_by_md5_list", [md5_of(1)])
    finally:
        await provider.aclose()
    assert answer.status == 401
    fake.fail_next(401, dumps(envelope(None, 1, 6, "Unauthorized")))
    provider = create({"token": TOKEN, "base_url": fake.base_url})
    try:
        with pytest.raises(ProviderAuthError):
            await provider.poll(pending(md5_of(1)))
    finally:
        await provider.aclose()


async def test_wrong_token_errorcode_6_is_auth_error(fake):
    provider = create({"token": "expired-token", "base_url": fake.base_url})
    try:
        with pytest.raises(ProviderAuthError, match="errorCode 6"):
            await provider.poll(pending(md5_of(1)))
    finally:
        await provider.aclose()


async def test_403_from_outside_cambodia_is_auth_error(fake, bakong):
    fake.fail_next(403, b"Forbidden", content_type="text/plain")
    with pytest.raises(ProviderAuthError):
        await bakong.poll(pending(md5_of(1)))


@pytest.mark.parametrize("body", [
    b"garbage", b"<html>maintenance</html>", b"[]", b'{"data": []}', dumps(envelope({"md5": "x"})),
    dumps(envelope(None, 1, 99, "Something else")),
    dumps(envelope(None, 2)),
    # found by review: a list raised TypeError, and true/false passed for 1/0 (True == 1 in Python)
    b'{"responseCode": 1, "errorCode": [1]}', b'{"responseCode": true, "errorCode": 1}',
    b'{"responseCode": false, "data": []}', b'{"responseCode": "0", "data": []}',
    b'{"responseCode": 1, "errorCode": true}',
])
async def test_an_answer_not_in_the_documented_shape_is_unavailable(fake, bakong, body):
    fake.fail_next(200, body)
    with pytest.raises(ProviderUnavailable) as err:
        await bakong.poll(pending(md5_of(1)))
    assert type(err.value) is ProviderUnavailable


def _success(**data) -> dict:
    return {"md5": md5_of(1), "status": "SUCCESS", "data": {"hash": "a" * 64, "toAccountId": "fees@devb", **data}}


@pytest.mark.parametrize("item, md5, paid, reason", [
    ({"md5": "f" * 32, "status": "SUCCESS", "data": None}, "f" * 32, True, "which was not asked"),
    ({"md5": md5_of(1), "status": "PAID", "data": None}, md5_of(1), False, "status 'PAID' is not SUCCESS"),
    ({"md5": md5_of(1), "status": "SUCCESS", "data": None}, md5_of(1), True, "data is missing"),
    (_success(currency="USD", amount="__rawnumber__12.505__rawnumber__", createdDateMs=1748745000000), md5_of(1),
     True, "data.amount: USD amount 12.505 has more than 2 decimal places"),
    (_success(currency="EUR", amount=5, createdDateMs=1), md5_of(1), True, "currency 'EUR' is not KHR or USD"),
    (_success(currency="USD", amount="12.50", createdDateMs=1), md5_of(1), True, "amount is not a number"),
    (_success(currency="USD", amount=5), md5_of(1), True, "no acknowledgedDateMs or createdDateMs"),
    ({"status": "SUCCESS", "data": None}, None, True, "has no md5"),
    ("SUCCESS", None, False, "is not an object"),
])
async def test_an_item_not_in_the_documented_shape_is_reported_and_the_rest_of_the_answer_kept(
        fake, bakong, item, md5, paid, reason):
    """One bad item is that item's problem, not the answer's: it is reported with its md5 and why, and the
    good items beside it (a payment, a code not found) are read as usual."""
    good = md5_of(2)
    fake.add_payment(good, amount=25000, currency="KHR", tx_hash="b" * 64)
    answer = envelope([{"md5": md5_of(3), "status": "NOT_FOUND", "data": None}, item,
                       {"md5": good, "status": "SUCCESS", "data": fake.payments[good]}])
    fake.fail_next(200, dumps(answer))
    result = await bakong.poll(pending(md5_of(1), good, md5_of(3)))
    assert [(n.md5, n.amount, n.transaction_id) for n in result.notices] == [(good, 25000, "b" * 64)]
    [bad] = result.unreadable
    assert (bad.provider, bad.md5, bad.paid) == ("bakong", md5, paid)
    assert reason in bad.reason and "data[1]" in bad.reason
    assert bad.raw == json.loads(dumps(item), parse_float=str)  # the item as received, amounts as exact text
    if isinstance(item, dict) and isinstance(item.get("data"), dict):
        assert bad.transaction_id == "a" * 64


async def test_the_reviewers_answer_a_paid_and_d_with_half_a_riel(fake, bakong):
    """A (50000 KHR) and D (50000.5 KHR: riel have no decimals) both paid, in one answer: A is a notice, D
    is reported unreadable, paid, with its md5 and the reason."""
    a, d = md5_of(10), md5_of(11)
    fake.add_payment(d, amount="50000.5", currency="KHR", to_account="passport@nbcq", tx_hash="d" * 64)
    fake.add_payment(a, amount="50000", currency="KHR", to_account="passport@nbcq", tx_hash="a" * 64)
    result = await bakong.poll(pending(d, a, amount=50000))
    [notice] = result.notices
    assert (notice.md5, notice.amount, notice.to_account) == (a, 50000, "passport@nbcq")
    [bad] = result.unreadable
    assert (bad.md5, bad.paid, bad.transaction_id) == (d, True, "d" * 64)
    assert bad.reason.endswith("data[0].data.amount: KHR amount 50000.5 has more than 0 decimal places")


async def test_list_level_not_found_reports_nothing(fake, bakong):
    fake.fail_next(200, dumps(envelope(None, 1, 1, "Transaction could not be found.")))
    assert await bakong.poll(pending(md5_of(1))) == PollResult()


async def test_golden_answer_exactly_as_bakong_writes_it(fake, bakong):
    m = md5_of(7)
    golden = ('{"responseCode":0,"responseMessage":"Getting transaction successfully.","errorCode":null,"data":['
              '{"md5":"%s","status":"SUCCESS","data":{"hash":"8465d722d7d5065f2886c5d9a5b5ef2e4fd3f6b4c8ed9ab5b0c1a4a7d'
              '8e9f0a1","fromAccountId":"bridge_sandbox@bkrt","toAccountId":"fees@devb","currency":"USD","amount":1.0,'
              '"description":"","createdDateMs":1748745000000,"acknowledgedDateMs":1748745001000,'
              '"externalRef":"100FT36774348398"}},{"md5":"%s","status":"NOT_FOUND","data":null}]}') % (m, md5_of(8))
    fake.fail_next(200, golden.encode())
    result = await bakong.poll(pending(m, md5_of(8)))
    assert result.unreadable == []
    [notice] = result.notices
    assert notice.model_dump() == {
        "provider": "bakong", "transaction_id": "8465d722d7d5065f2886c5d9a5b5ef2e4fd3f6b4c8ed9ab5b0c1a4a7d8e9f0a1",
        "md5": m, "bill_number": None, "amount": 100, "currency": "USD", "to_account": "fees@devb",
        "from_account": "bridge_sandbox@bkrt", "paid_at": datetime(2025, 6, 1, 2, 30, 1, tzinfo=timezone.utc),
        "confirmed": True, "raw": notice.raw}
    assert notice.raw["data"]["amount"] == "1.0"


async def test_timeout_is_unavailable(fake):
    fake.delay = 1.0
    provider = create({"token": TOKEN, "base_url": fake.base_url, "timeout": 0.2})
    try:
        with pytest.raises(ProviderUnavailable, match="within"):
            await provider.poll(pending(md5_of(1)))
    finally:
        await provider.aclose()


async def test_connection_refused_is_unavailable():
    provider = create({"token": TOKEN, "base_url": "http://127.0.0.1:9/v1", "timeout": 1})
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.poll(pending(md5_of(1)))
    finally:
        await provider.aclose()


async def test_bakong_sends_no_callbacks(bakong):
    assert bakong.pattern == "pull"
    with pytest.raises(NotImplementedError):
        bakong.verify_callback({}, b"{}", now=EXPIRES)
    with pytest.raises(Unsupported):
        bakong.parse_callback({}, b"{}")


# --- settlement -------------------------------------------------------------------------------------

SETTLEMENT = (
    "hash,md5,from_account,to_account,amount,currency,created_date_ms,fee\n"
    f"{'a' * 64},{md5_of(1)},citizen@aba,fees@devb,12.50,USD,1748745000000,0.10\n"
    f"{'b' * 64},,citizen@wing,fees@devb,25000,KHR,1748745060000,\n"
).encode()


def test_settlement_csv_in_major_units_becomes_minor_units():
    provider = create({"token": TOKEN})
    first, second = provider.parse_settlement(SETTLEMENT)
    assert first == SettlementLine(line_no=2, transaction_id="a" * 64, md5=md5_of(1), amount=1250, currency="USD",
                                   paid_at=datetime(2025, 6, 1, 2, 30, tzinfo=timezone.utc), fee=10)
    assert (second.amount, second.currency, second.fee, second.md5) == (25000, "KHR", 0, None)
    assert second.paid_at - first.paid_at == timedelta(minutes=1)


@pytest.mark.parametrize("line, reason", [
    (f"{'c' * 64},,x@y,fees@devb,12.505,USD,1748745000000,", "decimal places"),
    (f"{'c' * 64},,x@y,fees@devb,1.5,KHR,1748745000000,", "decimal places"),
    (f"{'c' * 64},,x@y,fees@devb,1e3,KHR,1748745000000,", "decimal number"),
    (f"{'c' * 64},,x@y,fees@devb,12.50,USD,174874500000,", "13 digits"),
    (f"{'c' * 64},,,fees@devb,12.50,USD,1748745000000,", "required"),
    (f",,x@y,fees@devb,12.50,USD,1748745000000,", "hash"),
    (f"{'c' * 64},,x@y,fees@devb,0,USD,1748745000000,", "amount"),
])
def test_bad_settlement_line_reports_its_number(line, reason):
    provider = create({"token": TOKEN})
    with pytest.raises(SettlementFormatError, match=reason) as err:
        list(provider.parse_settlement(SETTLEMENT + line.encode() + b"\n"))
    assert err.value.line_no == 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_settlement_on_arbitrary_bytes_raises_only_provider_errors(data):
    provider = create({"token": TOKEN})
    try:
        for _ in provider.parse_settlement(SETTLEMENT[:75] + data):
            pass
    except ProviderError:
        pass
    try:
        for _ in provider.parse_settlement(data):
            pass
    except ProviderError:
        pass


# --- Token renewal -------------------------------------------------------------------------------------------


@pytest.fixture
async def renewing(fake):
    """A provider whose token Bakong no longer accepts, configured with the e-mail the token was issued to."""
    provider = create({"token": "expired-token", "email": fake.email, "base_url": fake.base_url, "timeout": 2})
    yield provider
    await provider.aclose()


@pytest.mark.parametrize("refusal", ["errorCode 6", "HTTP 401"])
async def test_a_refused_token_is_token_refused_and_a_renewed_one_is_used(fake, renewing, refusal):
    if refusal == "HTTP 401":
        fake.fail_next(401, dumps(envelope(None, 1, 6, "Unauthorized")))
    with pytest.raises(TokenRefused):
        await renewing.poll(pending(md5_of(1)))
    assert renewing.can_renew_token
    token = await renewing.renew_token()
    assert token == fake.token and fake.renewals == 1
    renew = [r for r in fake.requests if r.path.endswith("/renew_token")]
    assert [r.json for r in renew] == [{"email": fake.email}]
    assert "Authorization" not in renew[0].headers  # the refused token is not sent to get a new one
    assert renewing.current_token() == "expired-token"  # not used until the service says so
    renewing.use_token(token)
    fake.add_payment(md5_of(1), amount=25000, currency="KHR")
    result = await renewing.poll(pending(md5_of(1)))
    assert [n.md5 for n in result.notices] == [md5_of(1)]
    last = [r for r in fake.requests if r.path.endswith("_md5_list")][-1]
    assert last.headers["Authorization"] == f"Bearer {token}"


async def test_without_an_email_the_token_cannot_be_renewed(fake):
    provider = create({"token": "expired-token", "base_url": fake.base_url})
    try:
        assert not provider.can_renew_token
        with pytest.raises(ProviderConfigError):
            await provider.renew_token()
    finally:
        await provider.aclose()
    assert not [r for r in fake.requests if r.path.endswith("/renew_token")]


async def test_a_403_is_not_a_refused_token(fake, renewing):
    fake.fail_next(403, b"Forbidden", content_type="text/plain")
    with pytest.raises(ProviderAuthError) as caught:
        await renewing.poll(pending(md5_of(1)))
    assert not isinstance(caught.value, TokenRefused)


async def test_a_renewal_bakong_refuses_is_an_auth_error(fake):
    provider = create({"token": "expired-token", "email": "someone.else@agency.gov.kh", "base_url": fake.base_url})
    try:
        with pytest.raises(ProviderAuthError, match="refused to renew"):
            await provider.renew_token()
    finally:
        await provider.aclose()


@pytest.mark.parametrize("body", [b"garbage", dumps(envelope(None)), dumps(envelope({"token": ""})),
                                  dumps(envelope({"token": 5})), dumps(envelope([])),
                                  # found by review: a token with a line break was kept, and every request then
                                  # failed in aiohttp's header check (ValueError), never reaching Bakong again
                                  dumps(envelope({"token": "tok\r\nX-Injected: 1"})),
                                  dumps(envelope({"token": "tok\n"})), dumps(envelope({"token": "a b"}))])
def test_a_renewal_answer_not_in_the_documented_shape_is_unavailable(body):
    with pytest.raises(ProviderUnavailable):
        parse_renew_answer(HttpAnswer(200, {}, body))


@pytest.mark.parametrize("status", [200, 201, 302, 404, 500])
def test_a_renewal_answer_is_never_quoted_in_an_error(status):
    # Found by review: an answer with another status was quoted, token and all, in the error the poller logs.
    body = b'{"responseCode": 0, "data": {"token": "SECRET-NEW-TOKEN"}, "extra": ' + (b"1}" if status != 200 else b"")
    with pytest.raises(ProviderUnavailable) as caught:
        parse_renew_answer(HttpAnswer(status, {}, body))
    assert "SECRET" not in str(caught.value)


def test_a_renewal_answer_gives_its_token():
    assert parse_renew_answer(HttpAnswer(200, {}, dumps(envelope({"token": "eyJ.new"})))) == "eyJ.new"
    with pytest.raises(ProviderAuthError, match="not registered"):
        parse_renew_answer(HttpAnswer(200, {}, dumps(envelope(None, 1, 10, "This email is not registered"))))


def test_a_token_that_cannot_be_sent_is_not_used():
    provider = create({"token": TOKEN})
    with pytest.raises(ValueError):
        provider.use_token("tok\r\nX: 1")
    assert provider.current_token() == TOKEN


def test_a_malformed_email_is_a_config_error():
    with pytest.raises(ProviderConfigError, match="email"):
        create({"token": TOKEN, "email": "not an address"})
