"""A provider's API token, renewed by the service and shared by its instances (Bakong's tokens last 90 days).

When a poll raises ``TokenRefused``, the poller calls :func:`recover`. Under a per-provider advisory lock, held
for a few statements, so that instances take turns: if the database holds a token other than the one just
refused (another instance renewed it), the provider uses that one (any instance, with or without an e-mail to
renew with); otherwise, unless a renewal was asked less than ``RENEW_EVERY`` ago by the database's clock
(whatever came of it, from any instance), the attempt is recorded and committed, the provider renews its token
(no database connection held during the call), and the new token is stored, encrypted like payer data, for
every instance. Found by review: instances renewing each on its own refused each other's tokens in turn, if a
renewal ends the token before it; and a transaction held across the call lost its connection and the token.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg

from paysvc.pii import PiiCipher
from paysvc.queries import Q
from providers import ProviderUnavailable

log = logging.getLogger(__name__)

RENEW_EVERY = timedelta(minutes=10)
STORE_TRIES = 3
STORE_RETRY_SECONDS = 1.0


def _aad(provider: str) -> str:
    return f"provider_token:{provider}"


async def recover(pool: asyncpg.Pool, cipher: PiiCipher, provider) -> str:
    """After ``provider`` had its token refused: give it another one to try. Returns ``shared`` (the token
    another instance stored), ``renewed`` (a new token, stored), ``waiting`` (none: the last renewal was asked
    less than ``RENEW_EVERY`` ago) or ``unsupported`` (nothing stored to try, and no e-mail to renew with).

    Raises what a renewal raises (``ProviderAuthError``: Bakong refused it; ``ProviderUnavailable``: no usable
    answer); the attempt is recorded before it is made."""
    name = provider.name
    refused = provider.current_token()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(Q.token_lock, name)
        row = await conn.fetchrow(Q.token_stored, name, RENEW_EVERY)
        stored = _read(cipher, name, row)
        if stored is not None and row["key_id"] != cipher.active_key_id:
            await _reencrypt(conn, cipher, name, stored, row["ciphertext"])
        if stored is not None and stored != refused:
            try:
                provider.use_token(stored)
            except ValueError as exc:
                log.warning("%s: the stored token cannot be used (%s)", name, exc)
            else:
                log.info("%s: using the token renewed on %s", name, row["renewed_at"].isoformat())
                return "shared"
        if not getattr(provider, "can_renew_token", False):
            return "unsupported"
        if row is not None and row["too_soon"]:
            log.warning("%s: token refused; the last renewal was asked at %s, the next may be asked %s after it",
                        name, row["attempted_at"].isoformat(), RENEW_EVERY)
            return "waiting"
        attempt = await conn.fetchval(Q.token_attempt, name)
    token = await provider.renew_token()  # raises: the attempt is recorded, the next one waits RENEW_EVERY
    try:
        provider.use_token(token)
    except ValueError as exc:
        raise ProviderUnavailable(f"the renewed token cannot be used: {exc}", provider=name) from None
    key_id, blob = cipher.encrypt({"token": token}, aad=_aad(name))
    for tries_left in reversed(range(STORE_TRIES)):
        # Bakong has issued the token (and may have ended the one before): store it for the other instances,
        # trying again a few times (found by review: one failed statement left it in this process alone).
        try:
            async with pool.acquire(timeout=10) as conn:
                kept = await conn.fetchval(Q.token_renewed, name, key_id, blob, attempt)
            break
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not tries_left:
                raise
            log.warning("%s: storing the renewed token failed (%s: %s); trying again", name, type(exc).__name__,
                        exc)
            await asyncio.sleep(STORE_RETRY_SECONDS)
    if kept is None:
        log.warning("%s: renewed the API token, but a later renewal was asked meanwhile: not stored (the next "
                    "refusal takes the stored one)", name)
    else:
        log.warning("%s: the API token was refused; renewed it and stored it for every instance", name)
    return "renewed"


async def reencrypt(pool: asyncpg.Pool, cipher: PiiCipher) -> None:
    """Store again under the active key every stored token read with an older one (at start, so that a key can
    be retired once every instance has the new one: found by review, a token is read only when one is
    refused, every 90 days or so). One that cannot be read is left: it is renewed when a token is refused."""
    for row in await pool.fetch(Q.tokens_under_older_keys, cipher.active_key_id):
        token = _read(cipher, row["provider"], row)
        if token is not None:
            await _reencrypt(pool, cipher, row["provider"], token, row["ciphertext"])


async def _reencrypt(db, cipher: PiiCipher, name: str, token: str, old_ciphertext: bytes) -> None:
    """``token`` stored again under the active key, unless the stored one changed from ``old_ciphertext``."""
    key_id, blob = cipher.encrypt({"token": token}, aad=_aad(name))
    await db.execute(Q.token_reencrypted, name, key_id, blob, old_ciphertext)


def _read(cipher: PiiCipher, name: str, row) -> str | None:
    """The stored token, or None (none stored, or it cannot be read: a key no longer configured, say)."""
    if row is None or row["ciphertext"] is None:
        return None
    try:
        return cipher.decrypt(row["key_id"], bytes(row["ciphertext"]), aad=_aad(name))["token"]
    except Exception as exc:
        log.warning("%s: the stored token cannot be read (%s: %s)", name, type(exc).__name__, exc)
        return None
