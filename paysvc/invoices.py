"""Invoices: the request and response shapes and the pure rules (amounts, states, KHQR content)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator, model_validator

from paysvc import khqr
from paysvc.errors import FieldValueError

Currency = Literal["KHR", "USD"]
Status = Literal["open", "paid", "expired", "cancelled"]
EXPONENT = {"KHR": 0, "USD": 2}
MAX_EXPIRES_IN = 30 * 24 * 3600
DEFAULT_EXPIRES_IN = 24 * 3600

_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
_PHONE = re.compile(r"\+?[0-9 ().-]{6,32}")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def max_amount(currency: str) -> int:
    """The largest amount whose KHQR form fits tag 54's 13 characters."""
    return 10**13 - 1 if EXPONENT[currency] == 0 else 10**12 - 1


REFERENCE = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, no spaces

class LineItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    code: Annotated[_Text, StringConstraints(max_length=32)]
    description: Annotated[_Text, StringConstraints(max_length=200)]
    amount: Annotated[StrictInt, Field(gt=0)]


class Payer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Annotated[_Text, StringConstraints(max_length=200)] | None = None
    phone: str | None = Field(None, description="6 to 20 digits, optionally starting with + and grouped with "
                                                "spaces, hyphens, dots or parentheses: +855 12 345 678, 012-345-678",
                              json_schema_extra={"pattern": f"^{_PHONE.pattern}$", "examples": ["+855 12 345 678"]})
    # The service's own rule as a pattern, not "format": "email", which a validator may read more strictly
    # (found by review: an address the service accepts, with non-ASCII letters say, could be refused by a portal)
    email: str | None = Field(None, description="an address such as name@example.com",
                              json_schema_extra={"pattern": _EMAIL.pattern, "maxLength": 254})

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        # fullmatch: match() let a trailing newline through (fuzz audit). Written as people write numbers (found by
        # a walk-through: 012-345-678 was refused, and "012" was told it must be digits)
        if v is not None and not (_PHONE.fullmatch(v) and 6 <= sum(c.isdigit() for c in v) <= 20):
            raise ValueError("phone must be 6 to 20 digits, optionally starting with + and grouped with spaces, "
                             "hyphens, dots or parentheses, e.g. +855 12 345 678 or 012-345-678")
        return v

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 254 or not _EMAIL.fullmatch(v)):
            raise ValueError("email must look like name@example.com")
        return v


class InvoiceCreate(BaseModel):
    """Body of ``POST /v1/invoices``. Amounts are integers in the currency's minor unit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    reference: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="the portal's own reference, unique per agency (printable ASCII, no spaces)",
        json_schema_extra={"pattern": f"^{REFERENCE.pattern}$"},
    )
    description: Annotated[_Text, StringConstraints(max_length=500)]
    currency: Currency
    amount: Annotated[StrictInt, Field(gt=0, description="minor units: riel for KHR, cents for USD; at most "
                                                         f"{max_amount('KHR')} for KHR and {max_amount('USD')} for "
                                                         "USD (what a KHQR code's amount can hold)",
                                       json_schema_extra={"maximum": max_amount("KHR")})]
    line_items: Annotated[list[LineItem], Field(max_length=100)] = []
    payer: Payer | None = None
    expires_in: Annotated[StrictInt, Field(ge=60, le=MAX_EXPIRES_IN)] = DEFAULT_EXPIRES_IN
    metadata: dict[Annotated[str, StringConstraints(min_length=1, max_length=40)],
                   Annotated[str, StringConstraints(max_length=500)]] = Field(
        {}, description="the portal's own string keys and values, at most 20", json_schema_extra={"maxProperties": 20})

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        if not REFERENCE.fullmatch(v):
            raise ValueError("reference must be printable ASCII without spaces, e.g. PP-2026-000123")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 20:
            raise ValueError("metadata holds at most 20 keys")
        return v

    @model_validator(mode="after")
    def _amounts(self) -> "InvoiceCreate":
        if self.amount > max_amount(self.currency):
            raise FieldValueError("amount", f"amount is too large for {self.currency}: at most "
                                            f"{max_amount(self.currency)}")
        if self.line_items:
            total = sum(li.amount for li in self.line_items)
            if total != self.amount:
                raise FieldValueError("line_items", f"line_items sum to {total} but amount is {self.amount}; "
                                                    "they must be equal")
        return self


class KhqrOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    payload: str
    md5: str
    expires_at: datetime


class PaymentOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    provider: str
    provider_transaction_id: str
    amount: int
    currency: Currency
    paid_at: datetime
    status: str


class InvoiceSummary(BaseModel):
    """An invoice as listed: everything but its payer and payments (read one invoice for those)."""

    model_config = ConfigDict(frozen=True)
    id: str
    agency: str = Field(description="the code of the agency whose invoice it is")
    status: Status
    reference: str
    description: str
    currency: Currency
    amount: int
    amount_paid: int
    line_items: list[LineItem]
    metadata: dict[str, str]
    bill_number: str
    khqr: KhqrOut | None = Field(description="the current code; null once the invoice is no longer open")
    qr_png_url: str
    qr_svg_url: str
    pay_url: str
    expires_at: datetime
    created_at: datetime
    paid_at: datetime | None = None
    cancelled_at: datetime | None = None
    expired_at: datetime | None = None


class InvoiceOut(InvoiceSummary):
    """One invoice, with its payer (decrypted) and every payment captured for it."""

    payer: Payer | None = None
    payer_erased_at: datetime | None = Field(None, description="when its payer details were erased (on request, "
                                                               "or past their retention); payer is null since")
    payments: list[PaymentOut]


class InvoicePage(BaseModel):
    model_config = ConfigDict(frozen=True)
    data: list[InvoiceSummary]
    next_cursor: str | None


def khqr_window(now: datetime, invoice_expires_at: datetime, ttl: timedelta) -> datetime | None:
    """When a code issued ``now`` expires: after ``ttl`` or with the invoice, whichever is first."""
    end = min(now + ttl, invoice_expires_at)
    return end if end > now else None


def khqr_content(agency, *, currency: str, amount: int, bill: str, created_ms: int, expires_ms: int) -> khqr.KhqrData:
    """The KHQR fields for one code of an invoice of ``agency`` (a row with the agency's columns)."""
    return khqr.KhqrData(
        point_of_initiation="12",
        bakong_account_id=agency["bakong_account"],
        merchant_id=agency["merchant_id"],
        acquiring_bank=agency["acquiring_bank"],
        merchant_category_code=agency["mcc"],
        currency=currency,
        amount=amount,
        merchant_name=agency["name"],
        merchant_city=agency["city"],
        bill_number=bill,
        language_preference="km",
        merchant_name_alternate=agency["name_km"],
        created_at_ms=created_ms,
        expires_at_ms=expires_ms,
    )


def can_cancel(status: str) -> bool:
    return status == "open"
