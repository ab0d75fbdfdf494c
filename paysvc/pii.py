"""Encryption of personal data at rest: AES-256-GCM with rotating keys.

The ciphertext is stored with the id of the key that made it, so old rows stay readable after a new key
becomes active. The row's id is bound in as associated data: a ciphertext copied to another row fails.
"""

from __future__ import annotations

import base64
import json
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from paysvc.settings import Settings, SettingsError, demo_secret, parse_pii_keys



class PiiCipher:
    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = {kid: AESGCM(k) for kid, k in keys.items()}
        self.active_key_id = next(iter(keys))

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
