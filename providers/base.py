"""The ``Provider`` protocol every plugin implements, and a small base class for the methods it skips.

Three patterns (``pattern``) say which methods matter:

- ``pull`` (Bakong): the service calls :meth:`Provider.poll` with the codes it waits on, at most
  ``poll_batch_size`` at a time (one request to the provider), and captures each call's notices before
  the next call;
- ``push_confirm`` (ABA PayWay): a callback is only a hint; the service stores it, calls
  ``verify_callback`` and ``parse_callback`` (hints, ``confirmed=False``), then :meth:`Provider.confirm`
  on each and books what comes back;
- ``signed_push`` (the sandbox, banks that sign): ``verify_callback`` checks the signature and time window
  over the raw body, then ``parse_callback`` returns confirmed notices.

Every provider may read settlement files (``parse_settlement``). Plugins never touch storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from providers.errors import Unsupported
from providers.models import PaymentNotice, PendingKhqr, PollResult, SettlementLine

Pattern = Literal["pull", "push_confirm", "signed_push"]


@runtime_checkable
class Provider(Protocol):
    """A bank or wallet, as the service sees it."""

    name: str
    pattern: Pattern
    poll_batch_size: int  # pull: the most codes one request asks about; the service passes no more per poll()

    def verify_callback(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> None:
        """Check a push over its raw bytes; raise ``SignatureError``/``MalformedCallback``, else return."""
        ...

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> list[PaymentNotice]:
        """Turn a verified push into notices (hints, ``confirmed=False``, for ``push_confirm``)."""
        ...

    async def confirm(self, notice: PaymentNotice) -> PaymentNotice:
        """Ask the provider's API about a hint: a confirmed notice, or ``NotConfirmed``/``ProviderUnavailable``."""
        ...

    async def poll(self, pending: Sequence[PendingKhqr]) -> PollResult:
        """Ask the provider which of these codes were paid: confirmed notices for those that were, and each
        item of the answer that could not be read (skipped; the rest of the answer still counts). An answer
        that cannot be read as a whole (not the documented envelope, 429, 5xx, auth) raises."""
        ...

    def parse_settlement(self, data: bytes) -> Iterator[SettlementLine]:
        """Read a settlement file lazily, line by line; ``SettlementFormatError`` names the bad line."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (its HTTP session). Safe to call twice."""
        ...


class ProviderBase:
    """Defaults for the methods a pattern does not use: each raises :class:`Unsupported` (a NotImplementedError)."""

    name: str = ""
    # What a citizen calls it (the payment page's receipt names the provider a payment came through); the
    # service uses ``name`` where a plugin has no ``title``.
    title: str = ""
    pattern: Pattern
    poll_batch_size: int = 1  # a pull provider sets its own
    # False for a plugin that only reads settlement files of another provider's payments (a bank statement
    # format): no payment is ever captured under its name, so a settlement cannot be filed under it.
    captures_payments: bool = True

    def replay_key(self, headers: Mapping[str, str], body: bytes) -> bytes | None:
        """A signed_push provider's digest of the message its signature covers: the service refuses a callback
        whose key is already in the inbox (a replay; a provider's own retry signs anew). None: no such check."""
        return None

    def verify_callback(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> None:
        """Refuse: this provider sends no callbacks."""
        raise Unsupported(f"{self.name} ({self.pattern}) sends no callbacks", provider=self.name)

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> list[PaymentNotice]:
        """Refuse: this provider sends no callbacks."""
        raise Unsupported(f"{self.name} ({self.pattern}) sends no callbacks", provider=self.name)

    async def confirm(self, notice: PaymentNotice) -> PaymentNotice:
        """Refuse: only ``push_confirm`` providers confirm hints."""
        raise Unsupported(f"{self.name} ({self.pattern}) has nothing to confirm: its notices are already "
                          "trusted or come from poll()", provider=self.name)

    async def poll(self, pending: Sequence[PendingKhqr]) -> PollResult:
        """Refuse: only ``pull`` providers are polled."""
        raise Unsupported(f"{self.name} ({self.pattern}) is not polled; it pushes callbacks", provider=self.name)

    def parse_settlement(self, data: bytes) -> Iterator[SettlementLine]:
        """Refuse: no settlement file format is defined for this provider."""
        raise Unsupported(f"{self.name} has no settlement file format", provider=self.name)

    async def aclose(self) -> None:
        """Nothing to release."""


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value by case-insensitive name (works on plain dicts as well as aiohttp's CIMultiDict)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header, by case-insensitive name, in the order received: a header may be repeated.

    aiohttp's ``CIMultiDict`` keeps each repetition (``getall``); a plain dict can hold one per spelling.
    """
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    lowered = name.lower()
    return [val for key, val in headers.items() if key.lower() == lowered]
