"""Bakong (National Bank of Cambodia's open API): a **pull** provider. Bakong sends no callbacks.

Polling
    ``poll(pending)`` POSTs ``{base_url}/check_transaction_by_md5_list`` with a bare JSON array of at most
    ``batch_size`` (≤ 50) md5 per call, ``Authorization: Bearer <token>``. The service passes at most
    ``poll_batch_size`` (= ``batch_size``) codes per ``poll``, so one poll is one call; a longer list is
    split, calls made one after another, and a failing call raises for the whole poll. Envelope
    ``{"responseCode", "responseMessage", "errorCode", "data"}``; with ``responseCode 0``, ``data`` is
    ``[{"md5", "status", "data"}]``: ``SUCCESS`` becomes a confirmed :class:`PaymentNotice`
    (``transaction_id`` = ``data.hash``, ``amount`` = ``data.amount`` — a JSON number in major units,
    converted exactly — ``to_account`` = ``toAccountId``, ``from_account`` = ``fromAccountId``, ``paid_at``
    = ``acknowledgedDateMs``, else ``createdDateMs``); ``NOT_FOUND`` and ``STATIC_QR`` give nothing.
    Each item stands alone: one not in that shape (no md5, an md5 that was not asked, another status, a
    ``SUCCESS`` whose payment cannot be read exactly, e.g. ``50000.5`` KHR) is skipped and reported as an
    :class:`UnreadableItem` with its md5 and the reason, and the other items of the answer still count.
    ``responseCode 1`` with ``errorCode`` 1 (not found) or 3 (failed) gives nothing; with ``errorCode 6``,
    or HTTP 401, :class:`TokenRefused` (a :class:`ProviderAuthError`); HTTP 403 (also what a request from
    outside Cambodia gets) :class:`ProviderAuthError`. HTTP 429 is :class:`RateLimited` (with ``Retry-After``);
    5xx, timeouts and an answer that is not a Bakong envelope with a ``data`` list
    :class:`ProviderUnavailable`. The plugin reports what Bakong said; it does not compare amounts or
    accounts with what was issued (the service does).

Settlement CSV (a bank's export of Bakong transactions)
    UTF-8 (optional BOM), header exactly
    ``hash,md5,from_account,to_account,amount,currency,created_date_ms,fee``: ``hash`` the Bakong
    transaction hash (required, becomes ``transaction_id``), ``md5`` the KHQR md5 (may be empty),
    ``from_account``/``to_account`` Bakong account ids (checked present, not carried: a settlement line
    has no account fields), ``amount`` and ``fee`` decimal text in major units (``12.50``, ``25000``; at
    most the currency's decimals; ``fee`` may be empty: 0), ``currency`` KHR or USD,
    ``created_date_ms`` Unix epoch milliseconds (13 digits). The header is line 1.

Token renewal
    Bakong's tokens last 90 days. A token Bakong refuses (HTTP 401, ``errorCode 6``) raises
    :class:`TokenRefused`. With ``email`` configured (the address the token was issued to),
    ``renew_token()`` asks ``POST {base_url}/renew_token {"email"}`` (without the refused token) for
    ``data.token``, and ``use_token(token)`` sends it from then on; the service decides when to renew and
    shares the token between its instances. A refused renewal is :class:`ProviderAuthError`.

Config: ``{"token": "...", "email": "ops@agency.gov.kh", "base_url": "https://api-bakong.nbc.gov.kh/v1",
"timeout": 10, "batch_size": 50}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from providers import settlement_csv
from providers.base import Pattern, ProviderBase
from providers.errors import (AmountError, ProviderAuthError, ProviderConfigError, ProviderUnavailable, RateLimited,
                              SettlementFormatError, TokenRefused)
from providers.models import (EXPONENT, PaymentNotice, PendingKhqr, PollResult, SettlementLine, UnreadableItem,
                              first_error, json_safe, loads_exact, to_minor)
from providers.transport import HttpAnswer, JsonClient, retry_after_seconds

NAME = "bakong"
DEFAULT_BASE_URL = "https://api-bakong.nbc.gov.kh/v1"
MAX_MD5_PER_CALL = 50
SETTLEMENT_HEADER = ("hash", "md5", "from_account", "to_account", "amount", "currency", "created_date_ms", "fee")
_QUIET_ERROR_CODES = {1, 3}  # not found, failed transaction: nothing was paid
_AUTH_ERROR_CODE = 6
# A bearer token as Bakong issues it: printable ASCII without spaces (anything else could not be sent in a header).
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")


class BakongConfig(BaseModel):
    """Bakong's settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr = Field(min_length=1)
    # The e-mail address the token was issued to: when set, a refused token is renewed (``renew_token``).
    email: str | None = Field(None, min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    base_url: str = DEFAULT_BASE_URL
    timeout: float = Field(10.0, gt=0, le=120)
    batch_size: int = Field(MAX_MD5_PER_CALL, ge=1, le=MAX_MD5_PER_CALL)


class BakongProvider(ProviderBase):
    """Pull: ask Bakong about open KHQR md5s, ≤ 50 a call."""

    name = NAME
    title = "Bakong"
    pattern: Pattern = "pull"

    def __init__(self, config: BakongConfig) -> None:
        self._token = config.token
        self._email = config.email
        self.base_url = config.base_url.rstrip("/")
        self.batch_size = self.poll_batch_size = config.batch_size
        self._http = JsonClient(NAME, timeout=config.timeout)

    async def poll(self, pending: Sequence[PendingKhqr]) -> PollResult:
        """Confirmed notices for the codes Bakong reports paid (``SUCCESS``), and the items it could not read;
        one call per ``batch_size`` md5 (the service passes no more, so one poll is one call)."""
        md5s = list(dict.fromkeys(p.md5 for p in pending))
        notices: list[PaymentNotice] = []
        unreadable: list[UnreadableItem] = []
        for start in range(0, len(md5s), self.batch_size):
            result = await self._check_batch(md5s[start:start + self.batch_size])
            notices.extend(result.notices)
            unreadable.extend(result.unreadable)
        return PollResult(notices=notices, unreadable=unreadable)

    async def _check_batch(self, md5s: list[str]) -> PollResult:
        answer = await self._http.post_json(
            f"{self.base_url}/check_transaction_by_md5_list", md5s,
            headers={"Authorization": f"Bearer {self._token.get_secret_value()}"})
        return parse_md5_list_answer(answer, asked=md5s)

    # Token renewal: the service calls these after a poll raised TokenRefused (it shares the renewed token
    # between its instances and decides when to renew; see the module docstring).

    @property
    def can_renew_token(self) -> bool:
        """Whether ``renew_token`` can be asked: an e-mail is configured."""
        return self._email is not None

    def current_token(self) -> str:
        return self._token.get_secret_value()

    def use_token(self, token: str) -> None:
        """Send ``token`` from now on. Raises ``ValueError`` unless it can be sent as a bearer token."""
        if not _TOKEN.fullmatch(token):
            raise ValueError("not a token that can be sent in an Authorization header")
        self._token = SecretStr(token)

    async def renew_token(self) -> str:
        """A new token from Bakong (``renew_token`` with the configured e-mail); it is not used until
        ``use_token``. Raises ``ProviderAuthError`` when Bakong refuses, ``ProviderUnavailable`` when it does not
        answer as documented. Sent without the refused token (the endpoint is how one gets a token)."""
        if self._email is None:
            raise ProviderConfigError("no email configured: Bakong's token cannot be renewed", provider=NAME)
        answer = await self._http.post_json(f"{self.base_url}/renew_token", {"email": self._email})
        return parse_renew_answer(answer)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._http.aclose()

    def parse_settlement(self, data: bytes) -> Iterator[SettlementLine]:
        """The lines of a Bakong settlement CSV (see the module docstring), lazily."""
        for line_no, f in settlement_csv.rows(data, SETTLEMENT_HEADER, provider=NAME):
            tx_hash, md5, from_account, to_account, amount, currency, created_ms, fee = (x.strip() for x in f)
            if not tx_hash:
                raise SettlementFormatError(line_no, "hash is empty", provider=NAME)
            if not from_account or not to_account:
                raise SettlementFormatError(line_no, "from_account and to_account are required", provider=NAME)
            if currency not in EXPONENT:
                raise SettlementFormatError(line_no, f"currency {currency!r} is not KHR or USD", provider=NAME)
            if len(created_ms) != 13:
                raise SettlementFormatError(line_no, "created_date_ms must be 13 digits (epoch milliseconds)",
                                            provider=NAME)
            ms = settlement_csv.int_field(line_no, "created_date_ms", created_ms, provider=NAME)
            try:
                minor = to_minor(currency, amount)
                fee_minor = to_minor(currency, fee) if fee else 0
                yield SettlementLine(line_no=line_no, transaction_id=tx_hash, md5=md5 or None, amount=minor,
                                     currency=currency,  # type: ignore[arg-type]
                                     paid_at=_from_ms(ms), fee=fee_minor)
            except AmountError as exc:
                raise SettlementFormatError(line_no, exc.detail, provider=NAME) from None
            except ValidationError as exc:
                raise SettlementFormatError(line_no, first_error(exc), provider=NAME) from None


def parse_md5_list_answer(answer: HttpAnswer, *, asked: Sequence[str]) -> PollResult:
    """Read one ``check_transaction_by_md5_list`` answer exactly as Bakong documents it (pure).

    The envelope is all or nothing (it raises); each item of ``data`` stands alone: one that cannot be read
    is skipped and reported in ``unreadable``, and the others are kept.
    """
    doc, code, error_code = _envelope(answer)
    if code == 1:
        if error_code == _AUTH_ERROR_CODE:
            raise TokenRefused(f"Bakong: {doc.get('responseMessage') or 'unauthorized'} (errorCode 6)", provider=NAME)
        if error_code in _QUIET_ERROR_CODES:
            return PollResult()
        raise ProviderUnavailable(f"Bakong error {error_code}: {doc.get('responseMessage')!r}", provider=NAME)
    if code != 0:
        raise _shape(f"responseCode {code!r} is neither 0 nor 1")
    items = doc.get("data")
    if not isinstance(items, list):
        raise _shape("data is not a list")
    wanted = set(asked)
    notices: list[PaymentNotice] = []
    unreadable: list[UnreadableItem] = []
    for i, item in enumerate(items):
        try:
            notice = _item(item, i, wanted)
        except _ItemError as exc:
            unreadable.append(_unreadable(item, exc.reason))
            continue
        if notice is not None:
            notices.append(notice)
    return PollResult(notices=notices, unreadable=unreadable)


class _ItemError(Exception):
    """One item of the answer is not in the documented shape (the rest of the answer may well be)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _item(item: Any, i: int, wanted: set[str]) -> PaymentNotice | None:
    if not isinstance(item, dict):
        raise _ItemError(f"data[{i}] is not an object")
    if not isinstance(item.get("md5"), str):
        raise _ItemError(f"data[{i}] has no md5")
    md5 = item["md5"].lower()
    if md5 not in wanted:
        raise _ItemError(f"data[{i}] answers md5 {item['md5']!r}, which was not asked")
    state = item.get("status")
    if state == "SUCCESS":
        return _notice(md5, item.get("data"), i)
    if state in ("NOT_FOUND", "STATIC_QR"):
        return None
    raise _ItemError(f"data[{i}].status {state!r} is not SUCCESS, NOT_FOUND or STATIC_QR")


def _unreadable(item: Any, reason: str) -> UnreadableItem:
    md5 = item.get("md5") if isinstance(item, dict) else None
    data = item.get("data") if isinstance(item, dict) else None
    tx_hash = data.get("hash") if isinstance(data, dict) else None
    return UnreadableItem(
        provider=NAME, md5=md5.lower()[:100] if isinstance(md5, str) else None,
        paid=isinstance(item, dict) and item.get("status") == "SUCCESS",
        reason=f"Bakong answer item not in the documented shape: {reason}",
        transaction_id=tx_hash[:200] if isinstance(tx_hash, str) and tx_hash else None, raw=json_safe(item))


def _notice(md5: str, data: Any, i: int) -> PaymentNotice:
    where = f"data[{i}].data"
    if not isinstance(data, dict):
        raise _ItemError(f"{where} is missing for a SUCCESS item")
    for key in ("hash", "toAccountId", "currency"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _ItemError(f"{where}.{key} is missing")
    if data["currency"] not in EXPONENT:
        raise _ItemError(f"{where}.currency {data['currency']!r} is not KHR or USD")
    amount = data.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
        raise _ItemError(f"{where}.amount is not a number")
    try:
        minor = to_minor(data["currency"], amount)
    except AmountError as exc:
        raise _ItemError(f"{where}.amount: {exc.detail}") from None
    ms = data.get("acknowledgedDateMs")
    if ms is None:
        ms = data.get("createdDateMs")
    if isinstance(ms, bool) or not isinstance(ms, int) or not 0 < ms < 10**14:
        raise _ItemError(f"{where} has no acknowledgedDateMs or createdDateMs")
    from_account = data.get("fromAccountId")
    try:
        return PaymentNotice(
            provider=NAME, transaction_id=data["hash"], md5=md5, amount=minor, currency=data["currency"],
            to_account=data["toAccountId"], from_account=from_account if isinstance(from_account, str) else None,
            paid_at=_from_ms(ms), confirmed=True, raw=json_safe({"md5": md5, "status": "SUCCESS", "data": data}))
    except ValidationError as exc:
        raise _ItemError(f"{where}: {first_error(exc)}") from None


def _envelope(answer: HttpAnswer, *, quote_body: bool = True) -> tuple[dict, int, int | None]:
    """The HTTP status and Bakong's envelope of an answer, checked: (document, responseCode, errorCode).
    ``quote_body=False``: errors do not quote the body."""
    status = answer.status
    if status == 429:
        raise RateLimited("Bakong answered 429 Too Many Requests", provider=NAME,
                          retry_after=retry_after_seconds(answer.headers))
    if status == 401:
        raise TokenRefused("Bakong refused the token (HTTP 401)", provider=NAME)
    if status == 403:
        raise ProviderAuthError("Bakong refused the request (HTTP 403; also what a request from outside Cambodia "
                                "gets)", provider=NAME)
    if status >= 500:
        raise ProviderUnavailable(f"Bakong answered HTTP {status}", provider=NAME,
                                  retry_after=retry_after_seconds(answer.headers))
    quoted = f": {_snippet(answer.body)}" if quote_body else ""
    if status != 200:
        raise ProviderUnavailable(f"Bakong answered HTTP {status}{quoted}", provider=NAME)
    try:
        doc = loads_exact(answer.body)
    except (ValueError, RecursionError):
        raise _shape(f"answer is not JSON{quoted}") from None
    if not isinstance(doc, dict) or "responseCode" not in doc:
        raise _shape("answer is not a Bakong envelope (no responseCode)")
    code, error_code = doc.get("responseCode"), doc.get("errorCode")
    # Numbers only (found by review: a list raised TypeError, and true/false passed for 1/0, as True == 1).
    if type(code) is not int:
        raise _shape(f"responseCode {code!r} is not a number")
    if error_code is not None and type(error_code) is not int:
        raise _shape(f"errorCode {error_code!r} is not a number")
    return doc, code, error_code


def parse_renew_answer(answer: HttpAnswer) -> str:
    """The new token in a ``renew_token`` answer (pure): ``responseCode 0`` with ``data.token``.

    Bakong refusing (``responseCode 1``, HTTP 401/403) is :class:`ProviderAuthError`; 429, 5xx and an answer
    not in that shape (a token that cannot be sent in a header too) are :class:`ProviderUnavailable`. No error
    quotes the answer's body: it may hold the token (found by review)."""
    try:
        doc, code, error_code = _envelope(answer, quote_body=False)
    except TokenRefused as exc:
        raise ProviderAuthError(f"Bakong refused to renew the token: {exc}", provider=NAME) from None
    if code != 0:
        raise ProviderAuthError(f"Bakong refused to renew the token: {doc.get('responseMessage')!r} "
                                f"(errorCode {error_code})", provider=NAME)
    data = doc.get("data")
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise _shape("renew_token answer has no data.token that can be sent as a bearer token")
    return token


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, tz=timezone.utc) + timedelta(milliseconds=ms % 1000)


def _shape(reason: str) -> ProviderUnavailable:
    return ProviderUnavailable(f"Bakong answer not in the documented shape: {reason}", provider=NAME)


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace")


def create(config: Mapping[str, Any]) -> BakongProvider:
    """Entry point ``bakong``: build the provider from ``{"token", "email", "base_url", "timeout", "batch_size"}``."""
    try:
        return BakongProvider(BakongConfig.model_validate(dict(config)))
    except ValidationError as exc:
        raise ProviderConfigError(f"bad bakong config: {first_error(exc)}", provider=NAME) from None
