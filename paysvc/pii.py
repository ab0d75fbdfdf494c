"""Encryption of personal data at rest: AES-256-GCM with rotating keys.

The ciphertext is stored with the id of the key that made it, so old rows stay readable after a new key
becomes active. The row's id is bound in as associated data: a ciphertext copied to another row fails.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from paysvc.settings import Settings, SettingsError, demo_secret, parse_pii_keys



class PiiCipher:
    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = {kid: AESGCM(k) for kid, k in keys.items()}
        # Each key's MAC key, derived from it for that use alone (the AES key itself is never a MAC key).
        self._mac_keys = {kid: hmac.new(k, b"paysvc keyed digest v1", hashlib.sha256).digest()
                          for kid, k in keys.items()}
        self.active_key_id = next(iter(keys))
        self.key_ids = frozenset(keys)

    def keyed_digest(self, data: bytes) -> str:
        """``{key id}:{hex HMAC-SHA256 of data}`` under the active key: a digest of data that holds personal
        details (a request body with its payer), which nobody without the key can test guesses against. A plain
        hash could be: the payer's name and phone number are few enough to try them all."""
        kid = self.active_key_id
        return f"{kid}:{hmac.new(self._mac_keys[kid], data, hashlib.sha256).hexdigest()}"

    def digest_matches(self, digest: str, data: bytes) -> bool:
        """Whether ``digest`` (from ``keyed_digest``, under any configured key) is that of ``data``. Raises
        ``LookupError`` when its key is not configured."""
        kid, _, mac = digest.rpartition(":")
        try:
            key = self._mac_keys[kid]
        except KeyError:
            raise LookupError(f"the digest was made with key {kid!r}, which is not configured") from None
        return hmac.compare_digest(mac, hmac.new(key, data, hashlib.sha256).hexdigest())

    def encrypt(self, value: dict, *, aad: str) -> tuple[str, bytes]:
        nonce = os.urandom(12)
        ct = self._keys[self.active_key_id].encrypt(nonce, json.dumps(value).encode(), aad.encode())
        return self.active_key_id, nonce + ct

    def decrypt(self, key_id: str, blob: bytes, *, aad: str) -> dict:
        try:
            aes = self._keys[key_id]
        except KeyError:
            raise LookupError(f"payer data was encrypted with key {key_id!r}, which is not configured") from None
        return json.loads(aes.decrypt(blob[:12], blob[12:], aad.encode()))


def cipher_from_settings(settings: Settings) -> PiiCipher:
    """The configured keys; without any, a key kept in the data folder (fine for a demo, not for production)."""
    if settings.pii_keys is not None:
        return PiiCipher(parse_pii_keys(settings.pii_keys.get_secret_value()))
    if settings.database_url is not None:
        # Several instances on a shared database must share keys: a key made here would be this host's alone.
        raise SettingsError("PAYSVC_PII_KEYS: required when PAYSVC_DATABASE_URL is set (e.g. 'k1:<base64 of 32 bytes>')")
    return PiiCipher(parse_pii_keys(demo_secret(
        settings, "pii.key", lambda: "local:" + base64.b64encode(os.urandom(32)).decode(), "PAYSVC_PII_KEYS")))


async def check_pii_keys(pool, cipher: PiiCipher) -> None:
    """Refuse to start when ``PAYSVC_PII_KEYS`` lacks a key that stored rows were encrypted with.

    Without it those payers and webhook secrets cannot be read: reads of such an invoice would fail, a
    cancel would commit and then fail to answer, and deliveries to such a webhook would stall. One scan of
    the invoices at start (about a second per few million rows)."""
    used = await pool.fetch("""SELECT DISTINCT payer_key_id AS key_id FROM invoices WHERE payer_key_id IS NOT NULL
                               UNION SELECT DISTINCT secret_key_id FROM webhook_endpoints
                               UNION SELECT DISTINCT left(request_hash, strpos(request_hash, ':') - 1)
                                       FROM idempotency_keys WHERE strpos(request_hash, ':') > 0""")
    missing = sorted(r["key_id"] for r in used if r["key_id"] not in cipher.key_ids)
    if missing:
        raise SettingsError(f"PAYSVC_PII_KEYS: key id(s) {', '.join(missing)} encrypted stored payer data or webhook "
                            "secrets, or keyed the digests of idempotency records (kept 48 hours by default), "
                            "but are not configured; add them back (a retired key must stay, after the first, "
                            "until no row uses it)")
    # The right id with the wrong bytes (a mistake while rotating) would start, then answer 500 for every such
    # invoice (found by an operator's walk-through): one row under each key must decrypt.
    from paysvc.webhooks import endpoint_aad

    for key_id in sorted({r["key_id"] for r in used} & cipher.key_ids):  # only keys rows use: found at once
        row = await pool.fetchrow("SELECT id, payer_ciphertext FROM invoices WHERE payer_key_id = $1 LIMIT 1", key_id)
        sample = (f"invoice {row['id']}", bytes(row["payer_ciphertext"]), row["id"]) if row else None
        if sample is None:
            row = await pool.fetchrow("SELECT id, secret_blob FROM webhook_endpoints WHERE secret_key_id = $1 "
                                      "LIMIT 1", key_id)
            sample = (f"webhook {row['id']}", bytes(row["secret_blob"]), endpoint_aad(row["id"])) if row else None
        if sample is None:
            continue
        try:
            cipher.decrypt(key_id, sample[1], aad=sample[2])
        except InvalidTag:
            raise SettingsError(f"PAYSVC_PII_KEYS: key {key_id!r} does not decrypt what was stored under it ({sample[0]}): "
                                "its bytes are not the ones that encrypted it; give the key as it was") from None


async def reencrypt_stored(pool, cipher: PiiCipher, *, batch: int = 500, patience: float = 60) -> dict[str, int]:
    """Store again under the active key every payer and webhook secret stored under an older one, in batches
    (each its own transaction, rows locked so a concurrent change is not overwritten), so that a retired key
    can at last be removed (found by an operator's walk-through: nothing moved them, so an old key could never
    go). Returns how many of each were moved. Safe to run while the service runs, and again. Rows another
    transaction holds are passed over and tried again until none is left (found by review: one held row was
    left under the old key while the command said all were moved); raises ``RuntimeError`` naming how many
    remain if some stay held for ``patience`` seconds."""
    from paysvc.webhooks import endpoint_aad

    moved = {"invoices": 0, "webhooks": 0}
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT id, payer_key_id, payer_ciphertext FROM invoices WHERE payer_key_id <> $1 "
                                    "LIMIT $2 FOR UPDATE SKIP LOCKED", cipher.active_key_id, batch)
            for r in rows:
                value = cipher.decrypt(r["payer_key_id"], bytes(r["payer_ciphertext"]), aad=r["id"])
                key_id, blob = cipher.encrypt(value, aad=r["id"])
                await conn.execute("UPDATE invoices SET payer_key_id = $2, payer_ciphertext = $3 WHERE id = $1",
                                   r["id"], key_id, blob)
        moved["invoices"] += len(rows)
        if rows:
            continue
        left = await pool.fetchval("SELECT count(*) FROM invoices WHERE payer_key_id <> $1", cipher.active_key_id)
        if not left:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{left} invoices are still stored under older keys: other transactions held them for "
                               f"{patience:g} s; run the command again")
        await asyncio.sleep(0.2)
    async with pool.acquire() as conn, conn.transaction():
        for r in await conn.fetch("SELECT id, secret_key_id, secret_blob FROM webhook_endpoints "
                                  "WHERE secret_key_id <> $1 FOR UPDATE", cipher.active_key_id):
            value = cipher.decrypt(r["secret_key_id"], bytes(r["secret_blob"]), aad=endpoint_aad(r["id"]))
            key_id, blob = cipher.encrypt(value, aad=endpoint_aad(r["id"]))
            await conn.execute("UPDATE webhook_endpoints SET secret_key_id = $2, secret_blob = $3 WHERE id = $1",
                               r["id"], key_id, blob)
            moved["webhooks"] += 1
    return moved
