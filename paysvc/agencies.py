"""Agencies: the ministries and departments that issue fees, each with its Bakong account."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from paysvc import khqr
from paysvc.errors import Conflict, ValidationFailed, pydantic_errors
from paysvc.queries import Q


class AgencyIn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    code: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{1,15}$")]
    name: Annotated[str, StringConstraints(min_length=1, max_length=25)]
    name_km: Annotated[str, StringConstraints(min_length=1, max_length=25)]
    bakong_account: Annotated[str, StringConstraints(min_length=3, max_length=32, pattern=r"^[^@\s]+@[^@\s]+$")]
    merchant_id: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    acquiring_bank: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    mcc: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}$")] = "9399"
    city: Annotated[str, StringConstraints(min_length=1, max_length=15)] = "Phnom Penh"

    @model_validator(mode="after")
    def _tag30(self) -> "AgencyIn":
        if (self.merchant_id is None) != (self.acquiring_bank is None):
            raise ValueError("--merchant-id and --acquiring-bank go together (KHQR tag 30 needs both)")
        # Prove now that a valid KHQR code can be made for this agency, not at the first invoice.
        khqr.encode(khqr.KhqrData(
            bakong_account_id=self.bakong_account, merchant_id=self.merchant_id, acquiring_bank=self.acquiring_bank,
            merchant_category_code=self.mcc, currency="KHR", amount=1, merchant_name=self.name,
            merchant_city=self.city, bill_number="PS00000001", language_preference="km",
            merchant_name_alternate=self.name_km, created_at_ms=1_700_000_000_000, expires_at_ms=1_700_000_600_000,
        ))
        return self


async def add_agency(conn: asyncpg.Connection, **fields) -> str:
    try:
        a = AgencyIn(**fields)
    except ValidationError as exc:
        errs = pydantic_errors(exc)
        raise ValidationFailed("; ".join(f"{e['field']}: {e['message']}" for e in errs), errors=errs) from None
    except khqr.KhqrError as exc:
        raise ValidationFailed(f"the agency's KHQR fields are not valid: {exc.reason}") from None
    try:
        async with conn.transaction():
            agency_id = await conn.fetchval(
                """INSERT INTO agencies (code, name, name_km, bakong_account, merchant_id, acquiring_bank, mcc, city)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id""",
                a.code, a.name, a.name_km, a.bakong_account, a.merchant_id, a.acquiring_bank, a.mcc, a.city,
            )
            await conn.execute(Q.agency_event_seq_init, agency_id)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"agency {a.code} already exists") from None
    tag = "30 (corporate)" if a.merchant_id else "29 (individual)"
    return f"agency {a.code} added: KHQR tag {tag}, account {a.bakong_account}, MCC {a.mcc}"
