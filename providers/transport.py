"""The one way plugins talk HTTP: a JSON POST with a timeout and a size cap, transport errors typed.

Status codes are left to the caller (each provider reads them its own way); a connection failure, a
timeout or an oversized answer becomes :class:`ProviderUnavailable` here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from providers.errors import ProviderUnavailable

MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class HttpAnswer:
    """An HTTP answer, fully read."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class JsonClient:
    """A lazily opened ``aiohttp.ClientSession`` with a total timeout per call."""

    def __init__(self, provider: str, *, timeout: float, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.provider = provider
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_answer_bytes = max_answer_bytes
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def post_json(self, url: str, payload: Any, *, headers: Mapping[str, str] | None = None) -> HttpAnswer:
        """POST ``payload`` as JSON; the whole answer, or ``ProviderUnavailable`` on timeout or network error."""
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        sent = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        try:
            async with self._open().post(url, data=data, headers=sent, allow_redirects=False) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self.max_answer_bytes:
                        raise ProviderUnavailable(f"answer larger than {self.max_answer_bytes} bytes",
                                                  provider=self.provider)
                return HttpAnswer(resp.status, dict(resp.headers), bytes(body))
        except asyncio.TimeoutError as exc:
            raise ProviderUnavailable(f"no answer within {self.timeout.total:g} s", provider=self.provider) from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"HTTP error: {type(exc).__name__}: {exc}", provider=self.provider) from exc

    async def aclose(self) -> None:
        """Close the session if one was opened."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds: delta-seconds, or an HTTP date measured against the answer's ``Date``."""
    value = _get(headers, "Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 86400))
    try:
        when = parsedate_to_datetime(value)
        date = _get(headers, "Date")
        sent = parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError, IndexError):
        return None
    if sent is None or when.tzinfo is None or sent.tzinfo is None:
        return None
    return max(0.0, min((when - sent).total_seconds(), 86400.0))


def _get(headers: Mapping[str, str], name: str) -> str | None:
    for key, val in headers.items():
        if key.lower() == name.lower():
            return val
    return None
