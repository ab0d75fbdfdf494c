"""The sandbox: our own payment simulator, a **signed push** provider (tests, demo, load).

Callback
    ``POST /v1/providers/sandbox/callbacks`` with ``Content-Type: application/json`` and the body::

        {"transaction_id": "sbx-…", "md5": "<32 hex>" | null, "bill_number": "INV-…" | null,
         "amount": 25000, "currency": "KHR", "to_account": "fees@devb" | null,
         "paid_at": "2025-06-01T09:30:00+07:00"}

    ``amount`` is a JSON integer in minor units (riel, cents): ``12.5`` or ``1250.0`` is refused.
    ``from_account`` may be added; any other key is refused.

Signature
    Header ``Sandbox-Signature: t=<unix seconds>,v1=<hex>`` where
    ``hex = HMAC-SHA256(secret, "<t>.<raw body>")``, lower-case hex over the exact bytes sent. Several
    ``v1=`` may be given (key rotation): the callback is valid when any matches any configured secret.
    A valid signature whose ``t`` is more than ``tolerance_seconds`` (300) away from ``now``, either
    way, is :class:`StaleTimestamp`. The signature is checked before the body is parsed.

Settlement CSV
    UTF-8 (optional BOM), header exactly ``transaction_id,md5,bill_number,amount,currency,paid_at,fee``;
    ``amount`` and ``fee`` integer minor units (``fee`` may be empty: 0), ``md5`` and ``bill_number``
    may be empty, ``paid_at`` ISO 8601 with offset. The header is line 1.

Config: ``{"secrets": ["<secret>", ...], "tolerance_seconds": 300}``; the first secret signs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from providers import settlement_csv
from providers.base import Pattern, ProviderBase, header_values
from providers.errors import (MalformedCallback, ProviderConfigError, SettlementFormatError, SignatureError,
                              StaleTimestamp)
from providers.models import EXPONENT, MAX_AMOUNT, PaymentNotice, SettlementLine, callback_object, first_error

NAME = "sandbox"
SIGNATURE_HEADER = "Sandbox-Signature"
SETTLEMENT_HEADER = ("transaction_id", "md5", "bill_number", "amount", "currency", "paid_at", "fee")

_TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_REQUIRED = ("transaction_id", "amount", "currency", "paid_at")
_OPTIONAL = ("md5", "bill_number", "to_account", "from_account")


class SandboxConfig(BaseModel):
    """The sandbox's settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secrets: list[SecretStr] = Field(min_length=1)
    tolerance_seconds: int = Field(300, ge=1, le=3600)


def signature(secret: str, body: bytes, t: int) -> str:
    """The hex HMAC-SHA256 of ``"<t>.<body>"`` under ``secret``."""
    return hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int) -> str:
    """The ``Sandbox-Signature`` header value for ``body`` sent at unix time ``t``: ``t=<t>,v1=<hex>``."""
    return f"t={t},v1={signature(secret, body, t)}"


def build_callback(*, transaction_id: str, amount: int, currency: str, paid_at: datetime, md5: str | None = None,
                   bill_number: str | None = None, to_account: str | None = None,
                   from_account: str | None = None) -> bytes:
    """The raw JSON body of a sandbox callback (compact, UTF-8), as the simulator sends it."""
    if paid_at.tzinfo is None:
        raise ValueError("paid_at must be timezone-aware")
    doc: dict[str, Any] = {"transaction_id": transaction_id, "md5": md5, "bill_number": bill_number,
                           "amount": amount, "currency": currency, "to_account": to_account,
                           "paid_at": paid_at.isoformat()}
    if from_account is not None:
        doc["from_account"] = from_account
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def write_settlement_csv(lines: Iterable[SettlementLine]) -> bytes:
    """A sandbox settlement file holding ``lines`` (their ``line_no`` is ignored)."""
    return settlement_csv.write(SETTLEMENT_HEADER, (
        [ln.transaction_id or "", ln.md5 or "", ln.bill_number or "", str(ln.amount), ln.currency,
         ln.paid_at.isoformat() if ln.paid_at else "", str(ln.fee)]
        for ln in lines))


class SandboxProvider(ProviderBase):
    """Signed push: verify ``Sandbox-Signature`` over the raw body, then trust the content."""

    name = NAME
    title = "Sandbox"
    pattern: Pattern = "signed_push"

    def __init__(self, config: SandboxConfig) -> None:
        self._secrets = [s.get_secret_value().encode() for s in config.secrets]
        self.tolerance_seconds = config.tolerance_seconds

    def sign(self, body: bytes, *, t: int) -> str:
        """The header value the simulator sends with ``body``, signed with the first secret."""
        return sign(self._secrets[0].decode(), body, t)

    def replay_key(self, headers: Mapping[str, str], body: bytes) -> bytes | None:
        """SHA-256 of what the signature covers, ``"<t>.<body>"``: the same for every copy of one signed
        message, however its header is spelt (spaces, case, extra or other ``v1`` values), and new for a retry,
        which signs anew with a new ``t``. None when the header is missing, repeated or unreadable
        (verification refuses the callback then)."""
        values = header_values(headers, SIGNATURE_HEADER)
        if len(values) != 1:
            return None
        try:
            t, _ = _parse_signature_header(values[0])
        except SignatureError:
            return None
        return hashlib.sha256(f"{NAME}\n{t}.".encode() + bytes(body)).digest()

    def verify_callback(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> None:
        """Raise :class:`SignatureError` unless some ``v1`` matches some secret; :class:`StaleTimestamp` if old."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if not isinstance(body, (bytes, bytearray)):
            raise MalformedCallback("callback body must be bytes", provider=NAME)
        values = header_values(headers, SIGNATURE_HEADER)
        if not values:
            raise SignatureError(f"no {SIGNATURE_HEADER} header", provider=NAME)
        if len(values) > 1:
            # Which one counts would depend on who reads the headers: send one (it may carry several v1=).
            raise SignatureError(f"{SIGNATURE_HEADER} header is given {len(values)} times; send it once",
                                 provider=NAME)
        t_text, candidates = _parse_signature_header(values[0])
        signed = t_text.encode() + b"." + bytes(body)
        matched = False
        for secret in self._secrets:
            expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
            for candidate in candidates:
                matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise SignatureError("signature does not match the body", provider=NAME)
        skew = now.timestamp() - int(t_text)
        if abs(skew) > self.tolerance_seconds:
            when = "old" if skew > 0 else "in the future"
            raise StaleTimestamp(f"signature timestamp is {abs(skew):.0f} s {when} (limit "
                                 f"{self.tolerance_seconds} s)", provider=NAME)

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> list[PaymentNotice]:
        """The one confirmed notice a (verified) sandbox callback carries; :class:`MalformedCallback` if bad."""
        doc = callback_object(body, NAME)
        unknown = sorted(set(doc) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise MalformedCallback(f"unknown fields: {', '.join(unknown)}", provider=NAME)
        missing = [k for k in _REQUIRED if doc.get(k) is None]
        if missing:
            raise MalformedCallback(f"missing fields: {', '.join(missing)}", provider=NAME)
        for key in ("transaction_id", "currency", "paid_at", *_OPTIONAL):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise MalformedCallback(f"{key} must be a string", provider=NAME)
        amount = doc["amount"]
        if isinstance(amount, Decimal):
            # A JSON number with a fraction or an exponent: 12.5 is a fraction; 1e2 is whole but not written as
            # an integer (found by a fuzz audit: it was called a fraction).
            if amount == amount.to_integral_value():
                raise MalformedCallback(f"amount {amount} must be written as a JSON integer of minor units (e.g. "
                                        f"{int(amount) if abs(amount) < 10**18 else 120000}), without a fraction "
                                        "part or exponent", provider=NAME)
            raise MalformedCallback(f"amount {amount} must be a whole number of minor units, not a fraction",
                                    provider=NAME)
        if type(amount) is not int or amount <= 0:
            raise MalformedCallback("amount must be a positive JSON integer (minor units)", provider=NAME)
        if amount > MAX_AMOUNT:
            raise MalformedCallback(f"amount {amount} is more than {MAX_AMOUNT} minor units, the most one payment "
                                    "may carry", provider=NAME)
        if doc["currency"] not in EXPONENT:
            raise MalformedCallback(f"currency {doc['currency']!r} is not KHR or USD", provider=NAME)
        try:
            paid_at = datetime.fromisoformat(doc["paid_at"])
        except ValueError:
            raise MalformedCallback(f"paid_at {doc['paid_at']!r} is not ISO 8601", provider=NAME) from None
        if paid_at.tzinfo is None or paid_at.utcoffset() is None:
            raise MalformedCallback("paid_at must state its UTC offset", provider=NAME)
        try:
            return [PaymentNotice(
                provider=NAME, transaction_id=doc["transaction_id"], md5=doc.get("md5"),
                bill_number=doc.get("bill_number"), amount=amount, currency=doc["currency"],
                to_account=doc.get("to_account"), from_account=doc.get("from_account"), paid_at=paid_at,
                confirmed=True, raw=doc)]
        except ValidationError as exc:
            raise MalformedCallback(first_error(exc), provider=NAME) from None

    def parse_settlement(self, data: bytes) -> Iterator[SettlementLine]:
        """The lines of a sandbox settlement CSV, lazily; :class:`SettlementFormatError` names a bad line."""
        for line_no, f in settlement_csv.rows(data, SETTLEMENT_HEADER, provider=NAME):
            tx, md5, bill, amount, currency, paid_at, fee = (x.strip() for x in f)
            if not tx:
                raise SettlementFormatError(line_no, "transaction_id is empty", provider=NAME)
            if currency not in EXPONENT:
                raise SettlementFormatError(line_no, f"currency {currency!r} is not KHR or USD", provider=NAME)
            try:
                yield SettlementLine(
                    line_no=line_no, transaction_id=tx, md5=md5 or None, bill_number=bill or None,
                    amount=settlement_csv.int_field(line_no, "amount", amount, provider=NAME),
                    currency=currency,  # type: ignore[arg-type]
                    paid_at=settlement_csv.aware_datetime(line_no, "paid_at", paid_at, provider=NAME),
                    fee=settlement_csv.int_field(line_no, "fee", fee, provider=NAME, optional=True))
            except ValidationError as exc:
                raise SettlementFormatError(line_no, first_error(exc), provider=NAME) from None


def _parse_signature_header(value: str) -> tuple[str, list[str]]:
    if len(value) > 4096:
        raise SignatureError(f"{SIGNATURE_HEADER} header is too long", provider=NAME)
    t_values: list[str] = []
    v1: list[str] = []
    for part in value.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"{SIGNATURE_HEADER}: {part.strip()!r} is not key=value", provider=NAME)
        if key == "t":
            t_values.append(val)
        elif key == "v1":
            if not _HEX64.fullmatch(val):
                raise SignatureError(f"{SIGNATURE_HEADER}: v1 must be 64 hex digits", provider=NAME)
            v1.append(val.lower())
        # other schemes (a future v2) are ignored, as long as a v1 matches
    if len(t_values) != 1 or not _TIMESTAMP.fullmatch(t_values[0]):
        raise SignatureError(f"{SIGNATURE_HEADER}: needs exactly one t=<unix seconds>", provider=NAME)
    if not v1:
        raise SignatureError(f"{SIGNATURE_HEADER}: no v1 signature", provider=NAME)
    if len(v1) > 8:
        raise SignatureError(f"{SIGNATURE_HEADER}: too many v1 signatures", provider=NAME)
    return t_values[0], v1


def create(config: Mapping[str, Any]) -> SandboxProvider:
    """Entry point ``sandbox``: build the provider from ``{"secrets": [...], "tolerance_seconds": 300}``."""
    try:
        return SandboxProvider(SandboxConfig.model_validate(dict(config)))
    except ValidationError as exc:
        raise ProviderConfigError(f"bad sandbox config: {first_error(exc)}", provider=NAME) from None
