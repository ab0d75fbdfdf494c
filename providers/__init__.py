"""Payment provider plugins (banks and wallets). Imports nothing of ``paysvc`` or ``ledger``.

The public API: the :class:`Provider` protocol and its three patterns, the frozen models every provider
answers with, the typed errors, money helpers, and the entry-point registry. See ``docs/providers.md``.
"""

from providers.base import Pattern, Provider, ProviderBase
from providers.errors import (AmountError, MalformedCallback, NotConfirmed, PaymentPending, ProviderAuthError,
                              ProviderConfigError, ProviderError, ProviderUnavailable, RateLimited,
                              SettlementFormatError, SignatureError, StaleTimestamp, TokenRefused, UnknownProvider,
                              Unsupported)
from providers.models import (EXPONENT, Currency, PaymentNotice, PendingKhqr, PollResult, SettlementLine,
                              UnreadableItem, from_minor, loads_exact, to_minor)
from providers.registry import GROUP, available_providers, load_providers

__all__ = [
    "EXPONENT", "GROUP", "AmountError", "Currency", "MalformedCallback", "NotConfirmed", "Pattern", "PaymentNotice",
    "PaymentPending", "PendingKhqr", "PollResult", "Provider", "ProviderAuthError", "ProviderBase",
    "ProviderConfigError", "ProviderError", "ProviderUnavailable", "RateLimited", "SettlementFormatError",
    "SettlementLine", "SignatureError", "StaleTimestamp", "TokenRefused", "UnknownProvider", "UnreadableItem", "Unsupported",
    "available_providers", "from_minor", "load_providers", "loads_exact", "to_minor",
]
