"""Typed errors of the provider plugins. Each has a stable ``code`` that callers may switch on and log.

The service maps them; a plugin only ever raises these (or ``NotImplementedError`` through
:class:`Unsupported`, for a method its pattern does not use).
"""

from __future__ import annotations


class ProviderError(Exception):
    """Base of every error a provider plugin raises on purpose."""

    code: str = "provider_error"

    def __init__(self, detail: str, *, provider: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.provider = provider

    def __str__(self) -> str:
        return f"{self.provider}: {self.detail}" if self.provider else self.detail


class SignatureError(ProviderError):
    """The callback's signature is missing, malformed or does not match: nothing in it can be trusted."""

    code = "signature_invalid"


class StaleTimestamp(SignatureError):
    """The signature is valid but its timestamp is outside the accepted window (a replay, or a bad clock)."""

    code = "signature_stale"


class MalformedCallback(ProviderError):
    """The callback body (already verified where the pattern signs) is not what the provider sends."""

    code = "callback_malformed"


class ProviderUnavailable(ProviderError):
    """The provider could not answer usefully now (timeout, 5xx, an unreadable answer): retry later."""

    code = "provider_unavailable"

    def __init__(self, detail: str, *, provider: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(detail, provider=provider)
        self.retry_after = retry_after


class RateLimited(ProviderUnavailable):
    """The provider answered 429; ``retry_after`` (seconds) is its ``Retry-After`` when it sent one."""

    code = "provider_rate_limited"


class NotConfirmed(ProviderError):
    """The provider's own API says this payment is not (or not yet) paid; ``status`` is what it said."""

    code = "payment_not_confirmed"

    def __init__(self, status: str, detail: str | None = None, *, provider: str | None = None) -> None:
        super().__init__(detail or f"provider reports status {status!r}, not a completed payment", provider=provider)
        self.status = status


class PaymentPending(NotConfirmed):
    """Not paid *yet* (PayWay ``PENDING``): unlike other ``NotConfirmed``, asking again later may succeed."""

    code = "payment_pending"


class ProviderAuthError(ProviderError):
    """Our credentials were refused (HTTP 401/403, Bakong errorCode 6, PayWay "Wrong Hash"): fix the config."""

    code = "provider_auth"


class TokenRefused(ProviderAuthError):
    """Our API token was refused as such (expired or revoked: Bakong's HTTP 401 or errorCode 6), not the request:
    a renewed token may be accepted."""

    code = "provider_token_refused"


class SettlementFormatError(ProviderError):
    """A settlement file is not in the provider's format; ``line_no`` is the 1-based physical line."""

    code = "settlement_format"

    def __init__(self, line_no: int, reason: str, *, provider: str | None = None) -> None:
        super().__init__(f"line {line_no}: {reason}", provider=provider)
        self.line_no = line_no
        self.reason = reason


class AmountError(ProviderError, ValueError):
    """An amount that is not a whole number of minor units of its currency (or not a number at all)."""

    code = "amount_invalid"


class ProviderConfigError(ProviderError, ValueError):
    """A provider's configuration is missing or wrong; ``detail`` says which key."""

    code = "provider_config"


class UnknownProvider(ProviderError, LookupError):
    """No plugin of that name is registered in the ``paysvc.providers`` entry-point group."""

    code = "provider_unknown"


class Unsupported(ProviderError, NotImplementedError):
    """The method belongs to a pattern this provider does not follow (e.g. ``poll`` on a push provider)."""

    code = "provider_unsupported"
