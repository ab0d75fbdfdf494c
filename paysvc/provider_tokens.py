"""A provider's API token, renewed by the service and shared by its instances (Bakong's tokens last 90 days).

When a poll raises ``TokenRefused``, the poller calls :func:`recover`. Under a per-provider advisory lock, so
that instances take turns: if the database holds a token other than the one just refused (another instance
renewed it), the provider uses that one; otherwise, unless Bakong answered a renewal less than
``RENEW_EVERY`` ago (whatever it answered, from any instance), the provider renews its token and the new one
is stored, encrypted like payer data, for every instance. Found by review: instances renewing each on its
own refused each other's tokens in turn, if a renewal ends the token before it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import asyncpg

from paysvc.pii import PiiCipher
from paysvc.queries import Q
from providers import ProviderAuthError, ProviderUnavailable, RateLimited

log = logging.getLogger(__name__)

RENEW_EVERY = timedelta(minutes=10)


def _aad(provider: str) -> str:
    return f"provider_token:{provider}"


async def recover(pool: asyncpg.Pool, cipher: PiiCipher, provider, *, now: datetime) -> str:
    """After ``provider`` had its token refused: give it another one to try. Returns ``renewed`` (a new token,
    stored), ``shared`` (the one another instance stored), ``waiting`` (none: the last renewal was asked less
    than ``RENEW_EVERY`` ago) or ``unsupported`` (the provider cannot renew: no e-mail configured).

    Raises what a renewal raises (``ProviderAuthError``: Bakong refused it; ``ProviderUnavailable``: no usable
    answer), once the attempt is recorded."""
    if not getattr(provider, "can_renew_token", False):
        return "unsupported"
    refused = provider.current_token()
    failure: Exception | None = None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(Q.token_lock, provider.name)
        row = await conn.fetchrow(Q.token_stored, provider.name)
        if row is not None and row["ciphertext"] is not None:
            try:
                stored = cipher.decrypt(row["key_id"], bytes(row["ciphertext"]), aad=_aad(provider.name))["token"]
            except Exception as exc:  # a key no longer configured, a damaged row: renew instead
                log.warning("%s: the stored token cannot be read (%s: %s); renewing", provider.name,
                            type(exc).__name__, exc)
            else:
                if stored != refused:
                    try:
                        provider.use_token(stored)
                    except ValueError as exc:
                        log.warning("%s: the stored token cannot be used (%s); renewing", provider.name, exc)
                    else:
                        log.info("%s: using the token another instance renewed on %s", provider.name,
                                 row["renewed_at"].isoformat())
                        return "shared"
        if row is not None and now - row["attempted_at"] < RENEW_EVERY:
            log.warning("%s: token refused; the last renewal was asked at %s, the next may be asked %s",
                        provider.name, row["attempted_at"].isoformat(), (row["attempted_at"] + RENEW_EVERY).isoformat())
            return "waiting"
        try:
            token = await provider.renew_token()
            provider.use_token(token)
        except RateLimited:
            raise  # not an answer to the renewal: asked again after the poller's backoff
        except (ProviderAuthError, ProviderUnavailable, ValueError) as exc:
            # Answered, or not reachable: either way not asked again before RENEW_EVERY (found by review: a
            # renewal answered 500 was asked again at every pass).
            await conn.execute(Q.token_attempted, provider.name, now)
            failure = exc
        else:
            key_id, blob = cipher.encrypt({"token": token}, aad=_aad(provider.name))
            await conn.execute(Q.token_renewed, provider.name, key_id, blob, now)
            log.warning("%s: the API token was refused; renewed it and stored it for every instance",
                        provider.name)
            return "renewed"
    if isinstance(failure, ValueError):
        raise ProviderUnavailable(f"the renewed token cannot be used: {failure}", provider=provider.name)
    raise failure
