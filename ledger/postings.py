"""The values the ledger takes and gives: postings, entry drafts, posted entries. Pure and frozen."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ledger.accounts import account_spec

MAX_AMOUNT = 10**15  # far above any fee; keeps every balance sum inside a signed 64-bit integer
MAX_POSTINGS = 1000


def _no_nul(v: str | None) -> str | None:
    if v is not None and "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


class Posting(BaseModel):
    """One line of an entry: an amount in minor units (riel, cents) debited or credited to an account."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    account: str
    side: Literal["debit", "credit"]
    amount: Annotated[int, Field(gt=0, le=MAX_AMOUNT, strict=True)]
    currency: Literal["KHR", "USD"]

    @model_validator(mode="after")
    def _account_matches(self) -> "Posting":
        spec = account_spec(self.account)  # InvalidAccount is a ValueError: reported as a validation error
        if spec.currency != self.currency:
            raise ValueError(f"posting in {self.currency} to {self.account}, an account in {spec.currency}")
        return self


class EntryDraft(BaseModel):
    """A journal entry to post: balanced per currency, at least two postings."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    description: Annotated[str, Field(max_length=500)]
    effective_at: datetime
    postings: Annotated[tuple[Posting, ...], Field(min_length=2, max_length=MAX_POSTINGS)]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    invoice_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    payment_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    settlement_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    reverses: Annotated[int, Field(gt=0)] | None = None

    @field_validator("description", "idempotency_key", "invoice_id", "payment_id", "settlement_id")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return _no_nul(v)

    @field_validator("effective_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("effective_at needs a timezone")
        return v

    @model_validator(mode="after")
    def _balanced(self) -> "EntryDraft":
        net: dict[str, int] = defaultdict(int)
        for p in self.postings:
            net[p.currency] += p.amount if p.side == "debit" else -p.amount
        unbalanced = {cur: n for cur, n in net.items() if n}
        if unbalanced:
            raise ValueError("entry does not balance: debits minus credits is "
                             + ", ".join(f"{n} {cur}" for cur, n in sorted(unbalanced.items())))
        return self


class PostedEntry(BaseModel):
    """A journal entry as recorded. ``replayed`` is true when its idempotency key had been used already:
    the entry is then the first one, and nothing was written."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: int
    kind: str
    description: str
    effective_at: datetime
    recorded_at: datetime
    postings: tuple[Posting, ...]
    idempotency_key: str | None = None
    invoice_id: str | None = None
    payment_id: str | None = None
    settlement_id: str | None = None
    reverses: int | None = None
    content_hash: str
    seal_position: int | None = None
    chain_hash: str | None = None
    replayed: bool = False
