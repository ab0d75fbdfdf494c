"""ABA PayWay: a **push, then confirm** provider.

Callback (a hint)
    PayWay POSTs ``{"tran_id", "apv", "status", "return_params"}`` (``status`` ``"00"``/``"0"``/``0`` on
    success) with **no signature**. ``verify_callback`` only checks the body is a JSON object with a usable
    ``tran_id`` and a ``status``; nothing in it is trusted. ``parse_callback`` returns one **hint**: a
    :class:`PaymentNotice` with ``confirmed=False``, ``transaction_id`` = ``bill_number`` = ``tran_id``
    (the service uses the invoice's bill number as PayWay's ``tran_id``) and ``amount``, ``currency``,
    ``paid_at`` left ``None``: the callback does not carry them, and would not be believed if it did.

Confirmation
    ``confirm(hint)`` POSTs ``{base_url}/api/payment-gateway/v1/payments/check-transaction-2`` with JSON
    ``{req_time, merchant_id, tran_id, hash}``: ``req_time`` UTC ``YYYYmmddHHMMSS``, ``hash =
    base64(HMAC-SHA512(req_time + merchant_id + tran_id, key=api_key))``. The answer
    ``{"data": {...}, "status": {"code": "00", "message", "tran_id"}}`` pays only when
    ``data.payment_status == "APPROVED"``: the confirmed notice takes ``amount`` from
    ``data.payment_amount`` (else ``data.total_amount``) in ``data.payment_currency``, ``paid_at`` from
    ``data.transaction_date`` (``YYYY-MM-DD HH:MM:SS``, Cambodian time, UTC+7), ``to_account`` ``None``
    (PayWay names no Bakong account; the money is in the configured merchant's account by construction).
    ``PENDING`` raises :class:`PaymentPending`, any other status :class:`NotConfirmed`, an unknown
    ``tran_id`` (``status.code`` 6) ``NotConfirmed("NOT_FOUND")``; "Wrong Hash" (``status.code`` 1, HTTP
    403) and 401/403 :class:`ProviderAuthError`; 429, 5xx, timeouts and unreadable answers
    :class:`ProviderUnavailable`.

Config: ``{"merchant_id": "...", "api_key": "...", "base_url": "https://checkout.payway.com.kh",
"timeout": 10}`` (sandbox base: ``https://checkout-sandbox.payway.com.kh``). No settlement format yet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from providers.base import Pattern, ProviderBase
from providers.errors import (AmountError, MalformedCallback, NotConfirmed, PaymentPending, ProviderAuthError,
                              ProviderConfigError, ProviderUnavailable, RateLimited)
from providers.models import (EXPONENT, PaymentNotice, callback_object, first_error, json_safe, loads_exact,
                              to_minor)
from providers.transport import HttpAnswer, JsonClient, retry_after_seconds

NAME = "aba_payway"
DEFAULT_BASE_URL = "https://checkout.payway.com.kh"
CHECK_PATH = "/api/payment-gateway/v1/payments/check-transaction-2"
PHNOM_PENH = timezone(timedelta(hours=7), "ICT")  # Cambodia keeps UTC+7 all year
_TRAN_ID = re.compile(r"[A-Za-z0-9._-]{1,50}", re.ASCII)
_OK_CODES = {"00", "0", 0}
_NOT_FOUND_CODES = {"6", "06", 6}
_WRONG_HASH_CODES = {"1", "01", 1}
_MALFORMED = object()  # a status.code that is neither a string nor a number
_NOT_PAID = {"DECLINED", "CANCELLED", "REFUNDED", "PRE-AUTH"}  # PayWay's statuses of a payment not (or no longer) made


class PayWayConfig(BaseModel):
    """ABA PayWay's settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    merchant_id: str = Field(min_length=1, max_length=30)
    api_key: SecretStr = Field(min_length=1)
    base_url: str = DEFAULT_BASE_URL
    timeout: float = Field(10.0, gt=0, le=120)


def request_hash(req_time: str, merchant_id: str, tran_id: str, api_key: str) -> str:
    """PayWay's request hash: ``base64(HMAC-SHA512(req_time + merchant_id + tran_id, key=api_key))``."""
    mac = hmac.new(api_key.encode(), (req_time + merchant_id + tran_id).encode(), hashlib.sha512)
    return base64.b64encode(mac.digest()).decode()


def req_time(now: datetime) -> str:
    """``now`` as PayWay's ``req_time``: UTC ``YYYYmmddHHMMSS``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class PayWayProvider(ProviderBase):
    """Push then confirm: an unsigned callback is a hint; ``check-transaction-2`` says what was paid."""

    name = NAME
    title = "ABA PayWay"
    pattern: Pattern = "push_confirm"

    def __init__(self, config: PayWayConfig, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.merchant_id = config.merchant_id
        self._api_key = config.api_key
        self.base_url = config.base_url.rstrip("/")
        self._clock = clock
        self._http = JsonClient(NAME, timeout=config.timeout)

    def verify_callback(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> None:
        """PayWay signs nothing: only check the body is a well-formed callback (its content stays untrusted)."""
        _read_callback(body)

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> list[PaymentNotice]:
        """One hint (``confirmed=False``) naming ``tran_id``; :meth:`confirm` must follow."""
        doc = _read_callback(body)
        try:
            return [PaymentNotice(provider=NAME, transaction_id=doc["tran_id"], bill_number=doc["tran_id"],
                                  confirmed=False, raw=json_safe(doc))]
        except ValidationError as exc:  # a NUL in a field _read_callback does not read, say
            raise MalformedCallback(first_error(exc), provider=NAME) from None
        except RecursionError:
            raise MalformedCallback("the callback's JSON is nested too deeply to keep", provider=NAME) from None

    async def confirm(self, notice: PaymentNotice) -> PaymentNotice:
        """Ask ``check-transaction-2`` about ``notice.transaction_id``; a confirmed notice only if APPROVED."""
        if notice.provider != NAME:
            raise ValueError(f"{NAME} cannot confirm a {notice.provider} notice")
        tran_id = notice.transaction_id
        when = req_time(self._clock())
        payload = {"req_time": when, "merchant_id": self.merchant_id, "tran_id": tran_id,
                   "hash": request_hash(when, self.merchant_id, tran_id, self._api_key.get_secret_value())}
        answer = await self._http.post_json(self.base_url + CHECK_PATH, payload)
        return parse_check_answer(answer, hint=notice, merchant_id=self.merchant_id)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._http.aclose()


def _read_callback(body: bytes) -> dict[str, Any]:
    doc = callback_object(body, NAME)
    tran_id = doc.get("tran_id")
    if not isinstance(tran_id, str) or not _TRAN_ID.fullmatch(tran_id):
        raise MalformedCallback("tran_id must be 1-50 letters, digits, '.', '_' or '-'", provider=NAME)
    status = doc.get("status")
    if status is None:
        raise MalformedCallback("status is missing", provider=NAME)
    if isinstance(status, bool) or not isinstance(status, (str, int)):
        # found by a fuzz audit: 1e999999 or true was reported as "missing"
        raise MalformedCallback("status must be a string or a JSON integer", provider=NAME)
    for key in ("apv", "return_params"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise MalformedCallback(f"{key} must be a string", provider=NAME)
    return doc


def parse_check_answer(answer: HttpAnswer, *, hint: PaymentNotice, merchant_id: str) -> PaymentNotice:
    """Read one ``check-transaction-2`` answer about ``hint`` (pure): a confirmed notice, or raise."""
    status = answer.status
    if status == 429:
        raise RateLimited("PayWay answered 429 Too Many Requests", provider=NAME,
                          retry_after=retry_after_seconds(answer.headers))
    if status >= 500:
        raise ProviderUnavailable(f"PayWay answered HTTP {status}", provider=NAME,
                                  retry_after=retry_after_seconds(answer.headers))
    try:
        doc = loads_exact(answer.body)
    except (ValueError, RecursionError):
        doc = None
    block = doc.get("status") if isinstance(doc, dict) else None
    code = block.get("code") if isinstance(block, dict) else None
    if isinstance(code, bool) or not isinstance(code, (str, int, type(None))):
        code = _MALFORMED  # found by review: a list or object raised TypeError in the set lookups below
    message = block.get("message") if isinstance(block, dict) else None
    if status in (401, 403) or code in _WRONG_HASH_CODES:
        raise ProviderAuthError(f"PayWay refused the request (HTTP {status}, code {code!r}: {message!r}); "
                                "check merchant_id and api_key", provider=NAME)
    if status != 200:
        raise ProviderUnavailable(f"PayWay answered HTTP {status}", provider=NAME)
    if not isinstance(doc, dict) or not isinstance(block, dict):
        raise _shape("no status object")
    if code is _MALFORMED:
        raise _shape(f"status.code {block.get('code')!r} is neither a string nor a number")
    if code in _NOT_FOUND_CODES:
        raise NotConfirmed("NOT_FOUND", f"PayWay knows no transaction {hint.transaction_id!r}", provider=NAME)
    if code not in _OK_CODES:
        raise ProviderUnavailable(f"PayWay status code {code!r}: {message!r}", provider=NAME)
    answered = block.get("tran_id")
    if answered is not None and str(answered) != hint.transaction_id:
        raise _shape(f"answer is about tran_id {answered!r}, not {hint.transaction_id!r}")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("payment_status"), str):
        raise _shape("data.payment_status is missing")
    payment_status = data["payment_status"]  # exactly as documented: "approved" is not "APPROVED" (found by review)
    if payment_status == "PENDING":
        raise PaymentPending(payment_status, provider=NAME)
    if payment_status in _NOT_PAID:
        raise NotConfirmed(payment_status, provider=NAME)
    if payment_status != "APPROVED":
        # Not a status PayWay documents: an answer not understood is asked again later (deferred), never taken
        # as a final "not paid", which would drop the callback of money that may have moved (found by review).
        raise _shape(f"data.payment_status {payment_status[:40]!r} is none of PayWay's statuses")
    currency = data.get("payment_currency")
    if currency not in EXPONENT:
        raise _shape(f"data.payment_currency {currency!r} is not KHR or USD")
    amount = data.get("payment_amount")
    if amount is None:
        amount = data.get("total_amount")
    if isinstance(amount, bool) or not isinstance(amount, (int, Decimal, str)):
        raise _shape("data.payment_amount and data.total_amount are missing")
    try:
        minor = to_minor(currency, amount)
    except AmountError as exc:
        raise _shape(f"data.payment_amount: {exc.detail}") from None
    paid_at = _transaction_date(data.get("transaction_date"))
    try:
        return PaymentNotice(
            provider=NAME, transaction_id=hint.transaction_id, bill_number=hint.bill_number or hint.transaction_id,
            amount=minor, currency=currency, paid_at=paid_at, confirmed=True,
            raw={"callback": hint.raw, "check_transaction": json_safe(data), "merchant_id": merchant_id})
    except ValidationError as exc:
        raise _shape(first_error(exc)) from None


def _transaction_date(value: Any) -> datetime:
    if not isinstance(value, str):
        raise _shape("data.transaction_date is missing")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _shape(f"data.transaction_date {value!r} is not YYYY-MM-DD HH:MM:SS") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=PHNOM_PENH)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01 00:00:00 read as UTC+7 falls before year 1
        raise _shape(f"data.transaction_date {value!r} is out of range") from None


def _shape(reason: str) -> ProviderUnavailable:
    return ProviderUnavailable(f"PayWay answer not in the documented shape: {reason}", provider=NAME)


def create(config: Mapping[str, Any]) -> PayWayProvider:
    """Entry point ``aba_payway``: build the provider from ``{"merchant_id", "api_key", "base_url", "timeout"}``."""
    try:
        return PayWayProvider(PayWayConfig.model_validate(dict(config)))
    except ValidationError as exc:
        raise ProviderConfigError(f"bad aba_payway config: {first_error(exc)}", provider=NAME) from None
