"""What every provider answers with: frozen models and the money rules they follow.

Money is an ``int`` in the currency's minor unit (KHR riel, exponent 0; USD cents, exponent 2) plus its
currency. Providers speak major units (Bakong's ``amount`` is a JSON number, PayWay's ``12.50``);
:func:`to_minor` converts exactly, through :class:`~decimal.Decimal`, never through ``float``.

A :class:`PaymentNotice` is either **confirmed** (its content can be trusted: a verified signed push, a
pull result, or a push confirmed with the provider's API) or a **hint** (``confirmed=False``: an unsigned
push, e.g. PayWay's callback). A hint carries what the push said and may lack ``amount``, ``currency``
and ``paid_at``; the service must pass it to ``Provider.confirm`` and book only what comes back. A
confirmed notice always has all three.

A pull provider's :meth:`~providers.base.Provider.poll` answers with a :class:`PollResult`: the notices
it could read, and an :class:`UnreadableItem` for each item of the answer it could not (skipped, so one
bad item never hides the good ones beside it).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from providers.errors import AmountError, MalformedCallback

Currency = Literal["KHR", "USD"]
EXPONENT: dict[str, int] = {"KHR": 0, "USD": 2}

_DECIMAL_TEXT = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?", re.ASCII)
_MD5 = re.compile(r"[0-9a-f]{32}", re.ASCII)


def to_minor(currency: str, value: str | int | Decimal) -> int:
    """Convert a major-unit amount (``"12.50"``, ``12``, ``Decimal("12.5")``) to integer minor units.

    Exact: digits beyond the currency's exponent must be zeros (``"12.505"`` USD and ``"1.5"`` KHR are
    refused; ``"25000.0"`` KHR is 25000). ``float`` and ``bool`` are refused outright: parse JSON with
    ``parse_float=Decimal`` (see :func:`loads_exact`). Raises :class:`AmountError`.
    """
    if currency not in EXPONENT:
        raise AmountError(f"unsupported currency {currency!r}; only KHR and USD")
    if isinstance(value, bool) or isinstance(value, float):
        raise AmountError(f"amount {value!r} is a {type(value).__name__}; give decimal text, int or Decimal")
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise AmountError(f"amount {value} is not a finite number")
        dec = value
    elif isinstance(value, str):
        text = value.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise AmountError(f"amount {value!r} is not a decimal number like 12.50")
        try:
            dec = Decimal(text)
        except InvalidOperation as exc:  # pragma: no cover - the pattern already excludes this
            raise AmountError(f"amount {value!r} is not a decimal number") from exc
    else:
        raise AmountError(f"amount of type {type(value).__name__} is not supported")
    scaled = dec.scaleb(EXPONENT[currency])
    if scaled != scaled.to_integral_value():
        raise AmountError(f"{currency} amount {dec} has more than {EXPONENT[currency]} decimal places")
    return int(scaled)


def from_minor(currency: str, minor: int) -> str:
    """Write minor units as major-unit text: USD 1250 → ``"12.50"``, KHR 25000 → ``"25000"``."""
    if currency not in EXPONENT:
        raise AmountError(f"unsupported currency {currency!r}; only KHR and USD")
    if isinstance(minor, bool) or not isinstance(minor, int):
        raise AmountError(f"minor amount must be an int, not {type(minor).__name__}")
    exp = EXPONENT[currency]
    return str(Decimal(minor).scaleb(-exp).quantize(Decimal(1).scaleb(-exp)))


class NotANumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in JSON: not a number any amount can be."""


def _reject_constant(name: str) -> Any:
    raise NotANumber(f"{name} is not a number")


class DuplicateKey(ValueError):
    """A JSON object names the same key twice: which value was meant is ambiguous, so it is refused."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} appears twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: the object as a dict, :class:`DuplicateKey` if a key repeats
    (plain ``json.loads`` keeps the last value silently, where another reader might keep the first)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


def loads_exact(data: bytes | str) -> Any:
    """``json.loads`` with every fractional number as :class:`~decimal.Decimal`, NaN/Infinity refused and a
    key repeated in one object refused (:class:`DuplicateKey`).

    Raises ``ValueError`` (``json.JSONDecodeError`` or ``UnicodeDecodeError`` are subclasses) on bad input.
    """
    return json.loads(data, parse_float=Decimal, parse_constant=_reject_constant, object_pairs_hook=unique_keys)


def callback_object(body: bytes, provider: str) -> dict[str, Any]:
    """A callback body parsed with :func:`loads_exact`; :class:`MalformedCallback` unless it is a JSON object.

    Each refusal says what is wrong in the sender's terms: not JSON, a key given twice, nested too deeply, or
    an integer of more digits than Python reads (``sys.get_int_max_str_digits()``, 4300 by default).
    """
    try:
        doc = loads_exact(body)
    except DuplicateKey as exc:
        raise MalformedCallback(f"body is ambiguous: {exc}; send each key once", provider=provider) from None
    except (json.JSONDecodeError, UnicodeDecodeError, NotANumber, TypeError) as exc:
        raise MalformedCallback(f"body is not JSON: {exc}", provider=provider) from None
    except RecursionError:
        raise MalformedCallback("body is nested too deeply to read", provider=provider) from None
    except ValueError:  # an integer literal of thousands of digits (Python's int_max_str_digits)
        raise MalformedCallback(f"body cannot be read: a number in it has more than "
                                f"{sys.get_int_max_str_digits()} digits", provider=provider) from None
    if not isinstance(doc, dict):
        raise MalformedCallback("body must be a JSON object", provider=provider)
    return doc


def first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field: message``, or the message alone for a rule over the whole
    model; a validator's own words without pydantic's "Value error, " prefix (found by a treasury walk-through:
    "line 2: value: Value error, fee 200 is larger than the amount 100")."""
    err = exc.errors(include_url=False)[0]
    cause = (err.get("ctx") or {}).get("error")
    message = str(cause) if isinstance(cause, ValueError) else err.get("msg", "invalid")
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {message}" if where else message


def json_safe(value: Any) -> Any:
    """A copy of parsed JSON with each Decimal turned into its exact text (``12.50`` → ``"12.50"``)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must be timezone-aware")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


def _md5(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.lower()
    if not _MD5.fullmatch(value):
        raise ValueError("must be 32 hexadecimal characters")
    return value


# The largest amount in minor units a notice or settlement line may carry: the ledger's own limit per posting,
# which keeps every balance sum inside a signed 64-bit integer.
MAX_AMOUNT = 10**15

# The times a payment or a settlement line may carry: 2000-01-01 to the end of 2099, in UTC (the range of
# business dates settlement accepts). A time outside it is no payment's: 9999-12-31T23:59:59.999999Z is
# Python's datetime.max, which PostgreSQL stores as `infinity` and which no later reader can compare.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(2100, 1, 1, tzinfo=timezone.utc)   # excluded


def _in_range(value: datetime | None) -> datetime | None:
    if value is not None and not EARLIEST_TIME <= value < LATEST_TIME:
        raise ValueError(f"{value.isoformat()} is out of range: a payment time must lie between 2000-01-01 "
                         "and 2099-12-31 (UTC)")
    return value


# A KHQR md5 (32 hex, lower-cased) and a time converted to UTC (naive refused), shared by the models;
# PaymentTime is such a time within [EARLIEST_TIME, LATEST_TIME).
Md5 = Annotated[str | None, AfterValidator(_md5)]
UtcTime = Annotated[datetime | None, AfterValidator(_utc)]
PaymentTime = Annotated[datetime | None, AfterValidator(_utc), AfterValidator(_in_range)]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PaymentNotice(_Frozen):
    """Money a provider reports as moved (``confirmed=True``), or a hint that it may have (``False``)."""

    provider: str = Field(min_length=1, max_length=64)
    transaction_id: str = Field(min_length=1, max_length=200)   # the provider's unique id for the movement
    md5: Md5 = None                                              # KHQR md5, when known
    bill_number: str | None = Field(default=None, max_length=100)
    amount: int | None = Field(default=None, gt=0, le=MAX_AMOUNT)  # minor units; None only on a hint
    currency: Currency | None = None                             # None only on a hint
    to_account: str | None = Field(default=None, max_length=200)
    from_account: str | None = Field(default=None, max_length=200)
    paid_at: PaymentTime = None                                  # UTC, 2000..2099; None only on a hint
    confirmed: bool
    raw: dict[str, Any] = Field(default_factory=dict)           # the provider's own fields, JSON-safe

    @model_validator(mode="after")
    def _storable_text(self) -> PaymentNotice:
        # A NUL cannot be stored as text (PostgreSQL refuses it): refuse it here, so such a notice is
        # rejected as malformed instead of failing at every processing attempt.
        fields = {"provider": self.provider, "transaction_id": self.transaction_id, "bill_number": self.bill_number,
                  "to_account": self.to_account, "from_account": self.from_account, "raw": self.raw}
        bad = [name for name, value in fields.items() if _has_nul([value])]
        if bad:  # named, so the provider's operator knows what to fix (found by a fuzz audit: it said only "value")
            raise ValueError(f"text fields must not contain NUL characters: {', '.join(bad)}")
        return self

    @model_validator(mode="after")
    def _confirmed_is_complete(self) -> PaymentNotice:
        if self.confirmed:
            missing = [f for f in ("amount", "currency", "paid_at") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a confirmed notice needs {', '.join(missing)}")
        return self


class UnreadableItem(_Frozen):
    """One item of a poll answer that is not in the provider's documented shape: skipped, not guessed at.

    ``paid`` is True when the item says the code was paid (Bakong ``status: SUCCESS``): money moved that
    this answer cannot book. The service logs it at ERROR and counts it each time it is seen; the code stays
    open and is asked about again.
    """

    provider: str = Field(min_length=1, max_length=64)
    md5: str | None = None                  # the code the item answers, as the provider wrote it, if it did
    paid: bool                              # the provider says this code was paid
    reason: str = Field(min_length=1)       # what is wrong with it, naming the field
    transaction_id: str | None = None       # the provider's id for the movement, when it could be read
    raw: Any = None                         # the item as received, JSON-safe (evidence; may hold payer data)


class PollResult(_Frozen):
    """What one :meth:`~providers.base.Provider.poll` call learned: the confirmed notices it could read,
    and the items it had to skip."""

    notices: list[PaymentNotice] = Field(default_factory=list)
    unreadable: list[UnreadableItem] = Field(default_factory=list)


class PendingKhqr(_Frozen):
    """A KHQR code the service issued and still waits on: what a pull provider is asked about."""

    md5: str
    bill_number: str | None = None
    currency: Currency
    amount: int = Field(gt=0)                                    # minor units
    to_account: str
    expires_at: datetime

    @field_validator("md5")
    @classmethod
    def _check_md5(cls, v: str) -> str:
        return _md5(v)  # type: ignore[return-value]

    @field_validator("expires_at")
    @classmethod
    def _check_expires_at(cls, v: datetime) -> datetime:
        return _utc(v)  # type: ignore[return-value]


class SettlementLine(_Frozen):
    """One line of a provider's settlement file; ``line_no`` is its physical line (the header is line 1)."""

    line_no: int = Field(ge=1)
    transaction_id: str | None = Field(default=None, min_length=1, max_length=200)
    md5: Md5 = None
    bill_number: str | None = Field(default=None, max_length=100)
    amount: int = Field(gt=0, le=MAX_AMOUNT)                     # minor units
    currency: Currency
    paid_at: PaymentTime = None                                  # UTC, 2000..2099
    fee: int = Field(default=0, ge=0, le=MAX_AMOUNT)             # minor units, same currency
    reference: str | None = Field(default=None, max_length=500)
    # transaction_id is the bank's own reference for the line (a camt.053 entry without EndToEndId or TxId), not
    # the transaction id the provider's callbacks and polls give.
    id_is_reference: bool = False

    @model_validator(mode="after")
    def _fee_within_amount(self) -> SettlementLine:
        if self.fee > self.amount:
            raise ValueError(f"fee {self.fee} is larger than the amount {self.amount}")
        return self

