"""Account codes: what an account is follows from its code.

``provider:{p}:clearing:{cur}`` is an asset, ``agency:{a}:revenue:{cur}`` revenue, ``suspense:unmatched:{cur}``
a liability, ``treasury:bank:{acct}:{cur}`` an asset, ``expense:provider-fees:{p}:{cur}`` an expense,
``equity:…:{cur}`` equity. The last segment is the currency. The database checks the same rules.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ledger.errors import InvalidAccount

AccountType = Literal["asset", "liability", "revenue", "expense", "equity"]
Currency = Literal["KHR", "USD"]
Side = Literal["debit", "credit"]

TYPE_BY_PREFIX: dict[str, AccountType] = {
    "provider": "asset",
    "treasury": "asset",
    "agency": "revenue",
    "suspense": "liability",
    "expense": "expense",
    "equity": "equity",
}
CURRENCIES: tuple[Currency, ...] = ("KHR", "USD")
_CODE = re.compile(r"^[a-z][a-z-]*(:[A-Za-z0-9_.@-]+)+$")


class AccountSpec(BaseModel):
    """An account as derived from its code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    code: str
    type: AccountType
    currency: Currency
    normal_side: Side


@lru_cache(maxsize=65_536)  # every posting asks; a service uses a few thousand codes (errors aren't cached)
def account_spec(code: str) -> AccountSpec:
    """Derive type, currency and normal side from an account code; raise ``InvalidAccount`` if it has none."""
    if len(code) > 200 or not _CODE.match(code):
        raise InvalidAccount(f"account code {code!r} is malformed: use segments like 'agency:MOI:revenue:KHR'")
    prefix, currency = code.split(":", 1)[0], code.rsplit(":", 1)[1]
    type_ = TYPE_BY_PREFIX.get(prefix)
    if type_ is None:
        raise InvalidAccount(f"account code {code!r} has an unknown type prefix {prefix!r}; "
                             f"use one of {sorted(TYPE_BY_PREFIX)}")
    if currency not in CURRENCIES:
        raise InvalidAccount(f"account code {code!r} must end with a currency, KHR or USD")
    side: Side = "debit" if type_ in ("asset", "expense") else "credit"
    return AccountSpec(code=code, type=type_, currency=currency, normal_side=side)  # type: ignore[arg-type]


def signed(normal_side: str, debits: int, credits: int) -> int:
    """A balance signed in the account's normal side: positive when it holds what its type expects."""
    return debits - credits if normal_side == "debit" else credits - debits


# Codes of the posting table (docs/ledger.md).
def provider_clearing(provider: str, currency: str) -> str:
    """``provider:{p}:clearing:{cur}``: money a provider has received for us and not yet settled."""
    return f"provider:{provider}:clearing:{currency}"


def agency_revenue(agency: str, currency: str) -> str:
    """``agency:{a}:revenue:{cur}``: fees earned by an agency."""
    return f"agency:{agency}:revenue:{currency}"


def suspense(currency: str) -> str:
    """``suspense:unmatched:{cur}``: money received that no invoice owes yet."""
    return f"suspense:unmatched:{currency}"


def treasury_bank(bank_account: str, currency: str) -> str:
    """``treasury:bank:{acct}:{cur}``: the treasury's bank account."""
    return f"treasury:bank:{bank_account}:{currency}"


def provider_fees(provider: str, currency: str) -> str:
    """``expense:provider-fees:{p}:{cur}``: fees a provider kept from a settlement."""
    return f"expense:provider-fees:{provider}:{currency}"


def refunds_due(currency: str) -> str:
    """``suspense:refunds-due:{cur}``: money owed back to payers until treasury pays it out."""
    return f"suspense:refunds-due:{currency}"


def write_offs(provider: str, currency: str) -> str:
    """``expense:write-offs:{p}:{cur}``: what a provider never paid (a payment never settled, or settled short)."""
    return f"expense:write-offs:{provider}:{currency}"


def written_off(currency: str) -> str:
    """``equity:written-off:{cur}``: money kept that no one is owed (unclaimed, or in another currency to convert)."""
    return f"equity:written-off:{currency}"
